"""The `hook_host` fixture: starts tests/hooks/hook_host (a program embedding the broker with the
event handler or the pull queue; see the comment at the top of hook_host.c) and steers it over
stdin. Also the small clients the hook tests share.

Every line hook_host prints is JSON. Its strings carry bytes as code points U+0000..U+00FF; here
they become str (UTF-8, undecodable bytes kept with surrogateescape), and a MESSAGE's payload is
also given as bytes in ev["payload"].

Usage in a test module:  from hook_host import hook_host  # noqa: F401 (fixture)
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import threading
import time

import pytest

import pushlet_testlib as pl

S = pl.time_scale()
SSE, WS = 1, 2


def hook_host_path() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(pl.pushletd_path())), "hook_host")


def _decode(v):
    if isinstance(v, str):
        return v.encode("latin-1").decode("utf-8", "surrogateescape")
    if isinstance(v, list):
        return [_decode(x) for x in v]
    if isinstance(v, dict):
        return {k: _decode(x) for k, x in v.items()}
    return v


class HookHost:
    """One hook_host process. .events, .answers and .replies fill from its stdout."""

    def __init__(self, mode, args, workdir):
        self.mode = mode
        self.cmd = [hook_host_path(), "--mode", mode] + [str(a) for a in args]
        self.stderr_path = os.path.join(workdir, "hook_host.stderr")
        self.cond = threading.Condition()
        self.events: list[dict] = []
        self.kinds = collections.Counter()  # events seen, by "ev"
        self.answers: list[dict] = []
        self.replies: list[dict] = []
        self.bad_lines: list[str] = []
        self.stdout_tail: list[str] = []
        self.port = None
        self.seq = 0
        self.returncode = None
        self.proc = None

    # -- process -----------------------------------------------------------------------------
    def start(self, timeout=15.0):
        if not os.path.exists(self.cmd[0]):
            pytest.fail(f"hook_host not found at {self.cmd[0]} (built next to pushletd)")
        self._err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._err)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.wait(lambda: self.port, timeout, "the PORT line")
        return self

    @property
    def addr(self):
        return (pl.HOST, self.port)

    def _read(self):
        for raw in self.proc.stdout:
            text = raw.decode("latin-1").rstrip("\n")
            with self.cond:
                self.stdout_tail = (self.stdout_tail + [text])[-80:]
                if text.startswith("PORT "):
                    self.port = int(text.split()[1])
                else:
                    try:
                        obj = _decode(json.loads(text))
                    except ValueError:
                        self.bad_lines.append(text)
                        obj = {}
                    if "ev" in obj:
                        if obj["ev"] == "message":
                            obj["payload"] = obj["text"].encode("utf-8", "surrogateescape")
                        self.events.append(obj)
                        self.kinds[obj["ev"]] += 1
                    elif "answer" in obj:
                        self.answers.append(obj)
                    elif "cmd" in obj:
                        self.replies.append(obj)
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait(self, pred, timeout=10.0, what="condition"):
        """Wait (bounded, scaled) until pred() is truthy under the lock; return its value."""
        deadline = time.monotonic() + timeout * S
        with self.cond:
            while True:
                v = pred()
                if v:
                    return v
                left = deadline - time.monotonic()
                if left <= 0:
                    raise pl.Timeout(f"hook_host: timed out after {timeout * S:.1f}s waiting for "
                                     f"{what}; last output:\n" + "\n".join(self.stdout_tail[-20:]))
                if self.proc.poll() is not None and not self.reader.is_alive():
                    raise AssertionError(f"hook_host exited ({self.proc.returncode}) while "
                                         f"waiting for {what}:\n{self.stderr_tail()}")
                self.cond.wait(min(left, 0.1))

    def command(self, line, timeout=10.0) -> dict:
        """Send one control line and return its reply."""
        self.seq += 1
        seq = self.seq
        self.proc.stdin.write(line.encode("utf-8", "surrogateescape") + b"\n")
        self.proc.stdin.flush()
        return self.wait(lambda: next((r for r in self.replies if r.get("seq") == seq), None),
                         timeout, f"the reply to {line!r}")

    def rc(self, line) -> int:
        return self.command(line)["rc"]

    def stats(self) -> dict:
        return self.command("stats")

    def count(self, topic) -> int:
        return self.command(f"count {topic}")["n"]

    def stop(self, timeout=30.0) -> int:
        """quit, then wait (bounded) for exit 0 after the broker stopped."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b"quit\n")
                self.proc.stdin.close()
            except (BrokenPipeError, ValueError):
                pass
        try:
            self.returncode = self.proc.wait(timeout * S)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            self.returncode = self.proc.returncode
            raise pl.Timeout(f"hook_host did not exit within {timeout * S:.0f}s; killed")
        finally:
            self.reader.join(10)
            self._err.close()
        return self.returncode

    def stderr_text(self):
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def stderr_tail(self, max_chars=20000):
        out = "--- last stdout lines ---\n" + "\n".join(self.stdout_tail) + \
              "\n--- stderr ---\n" + self.stderr_text()[-max_chars:]
        return out

    # -- events ------------------------------------------------------------------------------
    def of(self, ev=None, conn=None, **fields) -> list[dict]:
        """Events seen so far, filtered by kind, connection and any other field values."""
        with self.cond:
            return [e for e in self.events
                    if (ev is None or e["ev"] == ev) and (conn is None or e["conn"] == conn)
                    and all(e.get(k) == v for k, v in fields.items())]

    def wait_event(self, ev, timeout=10.0, n=1, **fields) -> dict:
        """Wait until at least n events match; returns the n-th."""
        got = self.wait(lambda: len(self.of(ev, **fields)) >= n and self.of(ev, **fields)[n - 1],
                        timeout, f"{n} x {ev} {fields}")
        return got

    def wait_n(self, ev, n, timeout=10.0, **fields) -> list[dict]:
        """Wait until at least n events match; returns them all (the caller checks how many)."""
        return self.wait(lambda: len(self.of(ev, **fields)) >= n and self.of(ev, **fields),
                         timeout, f"{n} x {ev} {fields}")

    def answer_for(self, request, timeout=10.0, n=1) -> dict:
        """The n-th answer line about request id `request`."""
        def find():
            a = [x for x in self.answers if x["answer"] == request]
            return a[n - 1] if len(a) >= n else None
        return self.wait(find, timeout, f"answer #{n} to request {request}")


@pytest.fixture
def hook_host(request, tmp_path_factory):
    """Factory: hook_host(mode, *flags) starts a host and returns it. At teardown each must exit
    0 on "quit", with no sanitizer report and no unparsable output line; a failing test's report
    gets its output."""
    hosts = []
    servers = getattr(request.node, "_pushletd_servers", None)
    if servers is None:
        servers = request.node._pushletd_servers = []

    def start(mode="callback", *args):
        h = HookHost(mode, args, str(tmp_path_factory.mktemp("hook_host")))
        hosts.append(h)
        servers.append(h)  # pushlet_fixtures attaches its output to a failure report
        return h.start()

    try:
        yield start
        problems = []
        for h in hosts:
            if h.proc is None:
                continue
            if h.returncode is None:
                try:
                    rc = h.stop()
                except pl.Timeout as e:
                    problems.append(str(e))
                    rc = h.returncode
                if rc != 0:
                    problems.append(f"hook_host exited with {rc}")
            if pl.SANITIZER_RE.search(h.stderr_text()):
                problems.append("sanitizer report in hook_host's stderr")
            if h.bad_lines:
                problems.append(f"unparsable output lines: {h.bad_lines[:3]!r}")
        if problems:
            pytest.fail("hook_host teardown problems:\n" + "\n".join(problems) + "\n" +
                        "\n".join(h.stderr_tail() for h in hosts), pytrace=False)
    finally:
        for h in hosts:
            if h.proc is not None and h.proc.poll() is None:
                os.kill(h.proc.pid, signal.SIGKILL)
                h.proc.wait(10)


# --------------------------------------------------------------------------------------------
# Clients


class SSEStream:
    """A GET on a raw socket: .response is the answer's head (and body when it is not 200).
    For a 200 stream, next_event() reads events one by one (bounded)."""

    def __init__(self, addr, path, headers=None, timeout=10.0):
        self.c = pl.RawHTTP(addr, timeout=timeout * S)
        self.c.send(pl.build_request("GET", path, b"",
                                     {"Accept": "text/event-stream", **(headers or {})}, addr))
        self.response = self.c.read_response(head_only=True)
        if self.response.status != 200:
            cl = self.response.header("content-length")
            if cl is not None:
                self.response.body = self.c.read_exact(int(cl), time.monotonic() + timeout * S)
        self.parser = pl.SSEParser()
        self.pending = self.parser.feed(self.c.buf)
        self.c.buf = b""

    @property
    def status(self):
        return self.response.status

    @property
    def body(self) -> str:
        return self.response.body.decode("utf-8", "replace")

    def next_event(self, timeout=10.0, skip=("connected",)) -> pl.Event:
        deadline = time.monotonic() + timeout * S
        while True:
            while self.pending:
                ev = self.pending.pop(0)
                if ev.event not in skip:
                    return ev
            if not self.c._fill(deadline):
                raise pl.ConnectionClosed("SSE stream ended")
            self.pending += self.parser.feed(self.c.buf)
            self.c.buf = b""

    def events_until_eof(self, timeout=10.0) -> list:
        """Every event until the server ends the stream (raises Timeout if it does not)."""
        out = list(self.pending)
        self.pending = []
        rest = self.c.wait_closed(timeout * S)
        out += self.parser.feed(self.c.buf + rest)
        self.c.buf = b""
        return out

    def close(self):
        self.c.close()


def ws_open(addr, path="/ws", headers=None, expect=101, timeout=10.0) -> pl.RawWS:
    return pl.RawWS(addr, path, headers=headers, expect=expect, timeout=timeout * S)


def wait_idle(host, timeout=10.0) -> dict:
    """Wait until the broker holds no client connection and no pending auth request; returns
    the stats then."""
    def idle():
        s = host.stats()
        return s if s["connections"] == 0 and s["auth_pending"] == 0 else None
    return pl.wait_until(idle, timeout * S, 0.05, "connections and auth_pending back to 0")
