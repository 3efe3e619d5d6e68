"""Helpers shared by the pushletd integration and browser tests.

Only the Python standard library is used here: a launcher for the real pushletd binary,
raw HTTP/1.1 clients (blocking and asyncio), and an incremental Server-Sent Events parser
that follows the WHATWG "event stream interpretation" rules.

Every wait is bounded: each helper takes a timeout and raises on expiry.
"""

from __future__ import annotations

import asyncio
import os
import re
import select
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field

HOST = "127.0.0.1"
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_BINARY = os.path.join(REPO, "build", "bin", "pushletd")

LISTEN_RE = re.compile(r"pushletd: listening on http://([^\s:/]+|\[[^\]]+\]):(\d+)")
SANITIZER_RE = re.compile(r"Sanitizer|runtime error:")


def pushletd_path() -> str:
    return os.environ.get("PUSHLETD", DEFAULT_BINARY)


_sanitized_cache: dict[str, bool] = {}


def binary_is_sanitized(path: str | None = None) -> bool:
    """True when the binary was built with ASan (it then needs more memory and time)."""
    path = path or pushletd_path()
    if path not in _sanitized_cache:
        try:
            with open(path, "rb") as f:
                blob = f.read()
            _sanitized_cache[path] = b"__asan_init" in blob or b"__ubsan_handle" in blob
        except OSError:
            _sanitized_cache[path] = False
    return _sanitized_cache[path]


def time_scale() -> float:
    """Factor applied to generous timeouts (sanitized builds are several times slower)."""
    env = os.environ.get("PUSHLET_TEST_TIME_SCALE")
    if env:
        return float(env)
    return 3.0 if binary_is_sanitized() else 1.0


class Timeout(AssertionError):
    pass


def wait_until(pred, timeout: float, interval: float = 0.02, what: str = "condition"):
    """Poll pred() until it returns a truthy value; return it. Raise Timeout after `timeout` s."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = pred()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise Timeout(f"timed out after {timeout:.1f}s waiting for {what} (last value: {last!r})")
        time.sleep(interval)


# --------------------------------------------------------------------------------------------
# The server process


class Server:
    """One pushletd process listening on 127.0.0.1:<ephemeral>.

    stderr (and stdout) go to a file kept for the whole test so it can be shown on failure.
    """

    def __init__(self, args=(), env=None, binary=None, workdir=None):
        self.binary = binary or pushletd_path()
        self.args = [str(a) for a in args]
        self.workdir = workdir or tempfile.mkdtemp(prefix="pushletd-test-")
        self.stderr_path = os.path.join(self.workdir, "pushletd.stderr")
        self.stdout_path = os.path.join(self.workdir, "pushletd.stdout")
        self.stop_timeout = 5.0
        for i, a in enumerate(self.args):
            if a == "--stop-timeout" and i + 1 < len(self.args):
                self.stop_timeout = float(self.args[i + 1])
            elif a.startswith("--stop-timeout="):
                self.stop_timeout = float(a.split("=", 1)[1])
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.host = HOST
        self.port = None
        self.returncode = None
        self.stopped_by_test = False

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 15.0):
        if not os.path.exists(self.binary):
            raise FileNotFoundError(f"pushletd binary not found at {self.binary} (set PUSHLETD)")
        cmd = [self.binary]
        if not any(a == "--listen" or a.startswith("--listen=") for a in self.args):
            cmd += ["--listen", f"{HOST}:0"]
        cmd += self.args
        env = dict(os.environ)
        env.update(self.extra_env)
        self.cmd = cmd
        self._err = open(self.stderr_path, "wb")
        self._out = open(self.stdout_path, "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._out,
                                     stderr=self._err, env=env, cwd=self.workdir)
        deadline = time.monotonic() + timeout * time_scale()
        while True:
            m = LISTEN_RE.search(self.stderr_text())
            if m:
                host = m.group(1).strip("[]")
                self.port = int(m.group(2))
                assert host == HOST, f"pushletd listens on {host}, expected {HOST}"
                assert self.port != 0, "pushletd printed port 0 instead of the real port"
                return self
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"pushletd exited with {self.proc.returncode} before listening\n"
                    f"command: {' '.join(cmd)}\nstderr:\n{self.stderr_text()}")
            if time.monotonic() > deadline:
                raise Timeout(f"pushletd did not print its listening line within {timeout}s\n"
                              f"stderr:\n{self.stderr_text()}")
            time.sleep(0.01)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def addr(self):
        return (self.host, self.port)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr_text(self) -> str:
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def stderr_tail(self, max_chars: int = 20000) -> str:
        t = self.stderr_text()
        if len(t) > max_chars:
            t = "... (truncated) ...\n" + t[-max_chars:]
        return t

    def send_signal(self, sig):
        assert self.running(), "pushletd is not running"
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> int:
        """Wait for exit (bounded); kill it (by PID) and raise if it does not exit in time."""
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.returncode = self.proc.returncode
            raise Timeout(f"pushletd (pid {self.proc.pid}) did not exit within {timeout:.1f}s; "
                          f"killed with SIGKILL")
        finally:
            self._close_files()
        return self.returncode

    def stop(self, sig=signal.SIGTERM, timeout: float | None = None) -> int:
        """Graceful stop: send sig, wait (bounded) and return the exit code."""
        if timeout is None:
            timeout = (self.stop_timeout + 10.0) * time_scale()
        if self.running():
            os.kill(self.proc.pid, sig)
        return self.wait(timeout)

    def _close_files(self):
        for f in (getattr(self, "_err", None), getattr(self, "_out", None)):
            if f and not f.closed:
                f.close()

    def sanitizer_report(self) -> str | None:
        text = self.stderr_text()
        m = SANITIZER_RE.search(text)
        if not m:
            return None
        start = max(0, text.rfind("\n", 0, max(0, m.start() - 2000)))
        return text[start:start + 12000]

    def rss_kb(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS in /proc status")

    # -- convenience HTTP --------------------------------------------------------------------
    def request(self, method, path, body=b"", headers=None, timeout=10.0):
        return http_request(self.addr, method, path, body=body, headers=headers, timeout=timeout)

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def publish(self, topic, data, event=None, headers=None, timeout=10.0):
        """POST /publish; assert 200 and return the message id (a decimal string)."""
        q = {"topic": topic}
        if event is not None:
            q["event"] = event
        if isinstance(data, str):
            data = data.encode()
        r = self.request("POST", "/publish?" + urllib.parse.urlencode(q), body=data,
                         headers=headers, timeout=timeout)
        assert r.status == 200, f"publish failed: {r.status} {r.body[:300]!r}"
        return r.json_id()

    def stats(self) -> dict:
        r = self.get("/stats")
        assert r.status == 200, f"/stats answered {r.status}"
        return r.json()


# --------------------------------------------------------------------------------------------
# HTTP/1.1 responses


ID_RE = re.compile(r"([0-9a-z]{1,13})-([0-9]{1,20})")


def id_parts(mid: str) -> tuple:
    """A message ID "EPOCH-SEQ" as (epoch, seq); the sequence is per topic."""
    m = ID_RE.fullmatch(mid or "")
    assert m, f"not a message ID (EPOCH-SEQ): {mid!r}"
    return m.group(1), int(m.group(2))


def id_seq(mid: str) -> int:
    return id_parts(mid)[1]


def parse_cursor(cursor: str) -> tuple:
    """A multi-topic SSE cursor "E-s1.s2[.F-s3]~ck" as ([(epoch, seq), ...], check or None): one
    position per topic of the stream, in the request's order; no epoch = the previous one's."""
    body, _, check = cursor.partition("~")
    positions, epoch = [], None
    for part in body.split("."):
        if "-" in part:
            epoch, _, seq = part.partition("-")
        else:
            assert epoch is not None, f"first position without an epoch: {cursor!r}"
            seq = part
        assert re.fullmatch(r"[0-9a-z]{1,13}", epoch) and seq.isdigit(), cursor
        positions.append((epoch, int(seq)))
    assert check == "" or re.fullmatch(r"[0-9a-z]{4}", check), cursor
    return positions, (check or None)


class subscribed(dict):
    """Equal to a WebSocket "subscribed" reply for `topic`: {"event","topic","id"}, where id is
    the position the subscription starts at (a message ID)."""

    def __init__(self, topic):
        super().__init__(event="subscribed", topic=topic)

    def __eq__(self, other):
        return (isinstance(other, dict) and set(other) == {"event", "topic", "id"}
                and other["event"] == "subscribed" and other["topic"] == self["topic"]
                and isinstance(other["id"], str) and ID_RE.fullmatch(other["id"]) is not None)

    def __ne__(self, other):
        return not self.__eq__(other)

    __hash__ = None


@dataclass
class Response:
    status: int
    reason: str
    headers: list  # list of (name, value) in order received
    body: bytes
    version: str = "HTTP/1.1"
    interim: list = field(default_factory=list)  # 1xx responses seen before this one

    def header(self, name, default=None):
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return default

    def header_all(self, name):
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def json(self):
        import json
        return json.loads(self.body.decode("utf-8"))

    def json_id(self) -> str:
        j = self.json()
        assert isinstance(j, dict) and "id" in j, f"expected {{\"id\": ...}}, got {self.body!r}"
        mid = j["id"]
        assert isinstance(mid, str) and ID_RE.fullmatch(mid), f"id must be EPOCH-SEQ, got {mid!r}"
        return mid

    def wants_close(self) -> bool:
        conn = (self.header("connection") or "").lower()
        if "close" in conn:
            return True
        return self.version == "HTTP/1.0" and "keep-alive" not in conn


def parse_head(head: bytes):
    lines = head.split(b"\r\n")
    status_line = lines[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise AssertionError(f"malformed status line: {status_line!r}")
    version, status = parts[0], int(parts[1])
    reason = parts[2] if len(parts) > 2 else ""
    headers = []
    for ln in lines[1:]:
        if not ln:
            continue
        k, sep, v = ln.decode("latin-1").partition(":")
        if not sep:
            raise AssertionError(f"malformed response header line: {ln!r}")
        headers.append((k.strip(), v.strip()))
    return version, status, reason, headers


class ConnectionClosed(AssertionError):
    pass


class RawHTTP:
    """A blocking HTTP/1.1 client connection over a raw socket, for exact control of bytes.

    Every operation is bounded by `timeout` seconds.
    """

    def __init__(self, addr, timeout=10.0, rcvbuf=None):
        self.addr = addr
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(addr)
        self.buf = b""
        self.eof = False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def send(self, data: bytes):
        self.sock.sendall(data)

    def send_watching(self, data: bytes, chunk=4096) -> bool:
        """Send data in chunks, stopping early if the server answers (or closes) meanwhile.

        This is what a careful client does with a large body: a server may answer early
        (413, 431, ...) without reading everything. Returns True if all data was sent.
        """
        deadline = time.monotonic() + self.timeout
        off = 0
        self.sock.setblocking(False)
        try:
            while off < len(data):
                if time.monotonic() > deadline:
                    raise Timeout("timed out sending request")
                r, w, _ = select.select([self.sock], [self.sock], [], 0.5)
                if r:
                    return False
                if w:
                    try:
                        off += self.sock.send(data[off:off + chunk])
                    except (BlockingIOError, InterruptedError):
                        pass
                    except (BrokenPipeError, ConnectionResetError):
                        return False
            return True
        finally:
            self.sock.settimeout(self.timeout)

    def _fill(self, deadline) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Timeout(f"timed out reading from server (have {len(self.buf)} bytes: "
                          f"{self.buf[:200]!r})")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise Timeout(f"timed out reading from server (have {len(self.buf)} bytes: "
                          f"{self.buf[:200]!r})") from None
        finally:
            self.sock.settimeout(self.timeout)
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def read_until(self, delim: bytes, deadline, max_bytes=1 << 20) -> bytes:
        while True:
            i = self.buf.find(delim)
            if i >= 0:
                out, self.buf = self.buf[:i + len(delim)], self.buf[i + len(delim):]
                return out
            if len(self.buf) > max_bytes:
                raise AssertionError("response head too large")
            if not self._fill(deadline):
                raise ConnectionClosed(
                    f"connection closed before {delim!r} (have {self.buf[:300]!r})")

    def read_exact(self, n: int, deadline) -> bytes:
        while len(self.buf) < n:
            if not self._fill(deadline):
                raise ConnectionClosed(f"connection closed after {len(self.buf)} of {n} bytes")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_to_eof(self, deadline) -> bytes:
        while self._fill(deadline):
            pass
        out, self.buf = self.buf, b""
        return out

    def wait_closed(self, timeout) -> bytes:
        """Read until the server closes the connection (EOF or reset); return what was read."""
        deadline = time.monotonic() + timeout
        try:
            return self.read_to_eof(deadline)
        except (ConnectionResetError, BrokenPipeError):
            out, self.buf = self.buf, b""
            return out

    def read_response(self, head_only=False, timeout=None, allow_interim=False) -> Response:
        """Read one response. head_only: the request was HEAD (no body whatever the headers).

        1xx interim responses are collected into .interim unless allow_interim, in which case
        the first 1xx is returned as is.
        """
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        interim = []
        while True:
            head = self.read_until(b"\r\n\r\n", deadline)
            version, status, reason, headers = parse_head(head[:-4])
            if 100 <= status < 200:
                r = Response(status, reason, headers, b"", version)
                if allow_interim:
                    return r
                interim.append(r)
                continue
            break
        resp = Response(status, reason, headers, b"", version, interim)
        if head_only or status in (204, 304):
            return resp
        te = (resp.header("transfer-encoding") or "").lower()
        cl = resp.header("content-length")
        if "chunked" in te:
            body = b""
            while True:
                line = self.read_until(b"\r\n", deadline)
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    # trailers
                    while self.read_until(b"\r\n", deadline) != b"\r\n":
                        pass
                    break
                body += self.read_exact(size, deadline)
                assert self.read_exact(2, deadline) == b"\r\n", "bad chunk terminator"
            resp.body = body
        elif cl is not None:
            resp.body = self.read_exact(int(cl), deadline)
        else:
            resp.body = self.read_to_eof(deadline)
        return resp

    def request(self, method, path, body=b"", headers=None, timeout=None, version="HTTP/1.1"):
        self.send(build_request(method, path, body, headers, self.addr, version=version))
        return self.read_response(head_only=(method == "HEAD"), timeout=timeout)


def build_request(method, path, body=b"", headers=None, addr=None, version="HTTP/1.1") -> bytes:
    if isinstance(body, str):
        body = body.encode()
    hdrs = []
    given = {k.lower() for k, _ in (headers.items() if isinstance(headers, dict) else headers or [])}
    if "host" not in given and addr is not None:
        hdrs.append(("Host", f"{addr[0]}:{addr[1]}"))
    items = headers.items() if isinstance(headers, dict) else (headers or [])
    hdrs.extend(items)
    if body and "content-length" not in given and "transfer-encoding" not in given:
        hdrs.append(("Content-Length", str(len(body))))
    elif not body and method in ("POST", "PUT") and "content-length" not in given \
            and "transfer-encoding" not in given:
        hdrs.append(("Content-Length", "0"))
    head = f"{method} {path} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs) + "\r\n"
    return head.encode("latin-1") + body


def http_request(addr, method, path, body=b"", headers=None, timeout=10.0) -> Response:
    """One request on a fresh connection (closed afterwards)."""
    with RawHTTP(addr, timeout=timeout) as c:
        return c.request(method, path, body=body, headers=headers)


# --------------------------------------------------------------------------------------------
# Server-Sent Events


@dataclass(slots=True)
class Event:
    event: str            # event type ("message" when no event: field)
    data: str             # data buffer with the final newline removed (as EventSource shows it)
    id: str | None        # the id: field of this event block, if any
    last_id: str | None   # the stream's last event ID after this event (as EventSource tracks it)
    lines: list           # raw field lines of this event block (comments excluded)


_LINE_SPLIT = re.compile(rb"\r\n|\r|\n")


class SSEParser:
    """Incremental text/event-stream parser (WHATWG HTML "event stream interpretation").

    feed(bytes) -> list of Event dispatched by that input. Comments are collected in
    .comments, retry values in .retries, every raw line in .all_lines when keep_lines.
    """

    def __init__(self, keep_lines=False, keep_blocks=True):
        self.keep_blocks = keep_blocks
        self.pending = b""
        self.first = True
        self.data = []
        self.etype = ""
        self.eid = None
        self.last_id = None
        self.block = []
        self.comments = []
        self.retries = []
        self.keep_lines = keep_lines
        self.all_lines = []
        self.empty_blocks = []  # field blocks that dispatched nothing (no data: line)

    def feed(self, chunk: bytes) -> list:
        buf = self.pending + chunk
        if b"\r" in buf:
            # a trailing \r may be the first half of \r\n: keep it for the next chunk
            hold = buf.endswith(b"\r")
            if hold:
                buf, tail = buf[:-1], b"\r"
            else:
                tail = b""
            parts = _LINE_SPLIT.split(buf)
            self.pending = parts.pop() + tail
        else:
            parts = buf.split(b"\n")
            self.pending = parts.pop()
        out = []
        for raw in parts:
            if self.first:
                self.first = False
                if raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
            line = raw.decode("utf-8", "replace")
            if self.keep_lines:
                self.all_lines.append(line)
            ev = self._line(line)
            if ev is not None:
                out.append(ev)
        return out

    def finish_pending_cr(self):
        """At EOF a held trailing \\r is a complete line end."""
        if self.pending.endswith(b"\r"):
            return self.feed(b"\n")
        return []

    def _line(self, line: str):
        if line == "":
            block, self.block = self.block, []
            if not self.data:
                if block:
                    self.empty_blocks.append(block)
                self.etype = ""
                self.eid = None
                return None
            data = "\n".join(self.data)
            ev = Event(self.etype or "message", data, self.eid, self.last_id,
                       block if self.keep_blocks else None)
            self.data = []
            self.etype = ""
            self.eid = None
            return ev
        if line[0] == ":":
            self.comments.append(line[1:])
            return None
        if self.keep_blocks:
            self.block.append(line)
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self.data.append(value)
        elif name == "event":
            self.etype = value
        elif name == "id":
            if "\0" not in value:
                self.eid = value
                self.last_id = value
        elif name == "retry":
            if value.isdigit():
                self.retries.append(int(value))
        return None


class _AsyncStream:
    """What the asyncio clients share: a StreamWriter in self.writer (None until connected)."""

    writer = None

    async def close(self):
        if self.writer is not None:
            self.writer.close()
            try:
                await asyncio.wait_for(self.writer.wait_closed(), 5)
            except (OSError, asyncio.TimeoutError):
                pass


class AsyncHTTP(_AsyncStream):
    """A keep-alive HTTP/1.1 client connection on asyncio streams."""

    def __init__(self, addr):
        self.addr = addr
        self.reader = None
        self.writer = None

    async def connect(self, timeout=10.0):
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(*self.addr), timeout)
        return self


    async def request(self, method, path, body=b"", headers=None, timeout=10.0) -> Response:
        self.writer.write(build_request(method, path, body, headers, self.addr))
        return await asyncio.wait_for(self._read_response(method == "HEAD"), timeout)

    async def _read_response(self, head_only) -> Response:
        while True:
            head = await self.reader.readuntil(b"\r\n\r\n")
            version, status, reason, headers = parse_head(head[:-4])
            if status >= 200:
                break
        resp = Response(status, reason, headers, b"", version)
        if head_only or status in (204, 304):
            return resp
        te = (resp.header("transfer-encoding") or "").lower()
        cl = resp.header("content-length")
        if "chunked" in te:
            body = b""
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
                if size == 0:
                    while await self.reader.readuntil(b"\r\n") != b"\r\n":
                        pass
                    break
                body += await self.reader.readexactly(size)
                await self.reader.readexactly(2)
            resp.body = body
        elif cl is not None:
            resp.body = await self.reader.readexactly(int(cl))
        else:
            resp.body = await self.reader.read()
        return resp

    async def publish(self, topic, data, event=None, timeout=10.0) -> str:
        q = {"topic": topic}
        if event is not None:
            q["event"] = event
        if isinstance(data, str):
            data = data.encode()
        r = await self.request("POST", "/publish?" + urllib.parse.urlencode(q), data,
                               timeout=timeout)
        assert r.status == 200, f"publish failed: {r.status} {r.body[:300]!r}"
        assert not r.wants_close(), "server closed a keep-alive publish connection"
        return r.json_id()


class AsyncSSE(_AsyncStream):
    """An SSE subscriber on raw asyncio streams with the incremental parser above."""

    def __init__(self, addr, path="/events", headers=None, rcvbuf=None, on_event=None):
        """on_event: if given, called with each Event instead of storing it in .events."""
        self.addr = addr
        self.path = path
        self.headers = headers or {}
        self.rcvbuf = rcvbuf
        self.on_event = on_event
        self.parser = SSEParser(keep_blocks=on_event is None)
        self.events = []        # every dispatched Event, in order (unless on_event)
        self.count = 0          # number of dispatched events
        self.connected = False  # the "connected" event was seen
        self.response = None
        self.eof = False
        self.reset = False
        self.bytes = 0
        self.reader = None
        self.writer = None

    async def connect(self, timeout=10.0, wait_connected=True):
        async def _go():
            if self.rcvbuf:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
                s.setblocking(False)
                await asyncio.get_running_loop().sock_connect(s, self.addr)
                self.reader, self.writer = await asyncio.open_connection(sock=s)
            else:
                self.reader, self.writer = await asyncio.open_connection(*self.addr)
            self.writer.write(build_request("GET", self.path, b"",
                                            {"Accept": "text/event-stream", **self.headers},
                                            self.addr))
            head = await self.reader.readuntil(b"\r\n\r\n")
            version, status, reason, headers = parse_head(head[:-4])
            self.response = Response(status, reason, headers, b"", version)
            if wait_connected and status == 200:
                await self._until(lambda: self.connected)
        await asyncio.wait_for(_go(), timeout)
        return self

    async def _read_once(self):
        try:
            data = await self.reader.read(262144)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
            self.reset = True
        if not data:
            self.eof = True
            self._dispatch(self.parser.finish_pending_cr())
            return False
        self.bytes += len(data)
        self._dispatch(self.parser.feed(data))
        return True

    def _dispatch(self, evs):
        if not evs:
            return
        self.count += len(evs)
        if not self.connected and any(e.event == "connected" for e in evs):
            self.connected = True
        if self.on_event is None:
            self.events.extend(evs)
        else:
            for e in evs:
                self.on_event(e)

    async def _until(self, pred):
        while not pred():
            if self.eof or not await self._read_once():
                raise ConnectionClosed(
                    f"SSE stream {self.path} ended before the awaited condition "
                    f"({self.count} events received; reset={self.reset})")

    async def wait_for(self, pred, timeout=10.0, what="events"):
        """Read until pred(self) is true; bounded."""
        try:
            await asyncio.wait_for(self._until(lambda: pred(self)), timeout)
        except asyncio.TimeoutError:
            raise Timeout(f"timed out after {timeout}s waiting for {what} on {self.path}; "
                          f"got {len(self.events)} events, last: {self.events[-3:]!r}") from None

    def messages(self, event_type=None):
        return [e for e in self.events
                if e.event != "connected" and (event_type is None or e.event == event_type)]

    async def wait_messages(self, n, timeout=10.0, event_type=None):
        await self.wait_for(lambda s: len(s.messages(event_type)) >= n, timeout,
                            what=f"{n} messages")
        return self.messages(event_type)

    async def read_to_eof(self, timeout=10.0):
        async def _go():
            while not self.eof:
                await self._read_once()
        try:
            await asyncio.wait_for(_go(), timeout)
        except asyncio.TimeoutError:
            raise Timeout(f"SSE stream {self.path} not closed by the server within {timeout}s "
                          f"({len(self.events)} events)") from None


def run_async(coro, timeout):
    """Run a coroutine to completion with an overall bound."""
    async def _bounded():
        try:
            return await asyncio.wait_for(coro, timeout)
        except asyncio.TimeoutError:
            raise Timeout(f"async test body exceeded {timeout:.0f}s") from None
    return asyncio.run(_bounded())


def npm_ci(node_dir: str, packages) -> None:
    """Installs node_dir's locked packages unless all of `packages` are there: npm ci, offline
    first (the npm cache), then from the registry."""
    import shutil as _shutil
    mods = os.path.join(node_dir, "node_modules")
    if all(os.path.exists(os.path.join(mods, *p.split("/"), "package.json")) for p in packages):
        return
    npm = _shutil.which("npm")
    assert npm, "node is installed but npm is not"
    base = [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"]
    r = None
    for args in (base + ["--offline"], base):
        try:
            r = subprocess.run(args, cwd=node_dir, capture_output=True, text=True, timeout=300,
                               stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            continue
        if r.returncode == 0:
            return
    raise AssertionError(f"npm ci failed in {node_dir}:\n{r and r.stdout}\n{r and r.stderr}")


def events_path(*topics, **query) -> str:
    q = [("topic", t) for t in topics] + list(query.items())
    return "/events" + ("?" + urllib.parse.urlencode(q) if q else "")


def kernel_queued_bytes(port: int) -> int:
    """Bytes sitting in kernel socket queues of TCP connections to/from 127.0.0.1:port:
    the server side's send queue plus the client side's receive queue (from /proc/net/tcp).
    What a subscriber was sent minus this is still queued inside the server process."""
    total = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            local, remote, state = parts[1], parts[2], parts[3]
            tx, rx = (int(x, 16) for x in parts[4].split(":"))
            if state != "01":  # ESTABLISHED
                continue
            if int(local.split(":")[1], 16) == port:
                total += tx
            elif int(remote.split(":")[1], 16) == port:
                total += rx
    return total


# --------------------------------------------------------------------------------------------
# WebSocket (RFC 6455): a raw client over a blocking socket, for exact control of every byte
# (conformance and bad-input tests), plus a light asyncio reader for fan-out tests.

import base64 as _base64
import hashlib as _hashlib
import json as _json
import struct as _struct

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
TIMESTAMP_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


def ws_accept(key: str) -> str:
    return _base64.b64encode(_hashlib.sha1((key + WS_GUID).encode()).digest()).decode()


def ws_key() -> str:
    return _base64.b64encode(os.urandom(16)).decode()


def ws_frame(opcode: int, payload: bytes = b"", fin: bool = True, rsv: int = 0,
             mask: bool = True, mask_key: bytes | None = None,
             length: int | None = None) -> bytes:
    """Encode one client frame. rsv: the 3 RSV bits as a number (4 = RSV1, 2 = RSV2, 1 = RSV3).
    length: the length to announce in the header (default: len(payload)); lets a test lie."""
    if isinstance(payload, str):
        payload = payload.encode()
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | ((rsv & 7) << 4) | (opcode & 0x0F)
    mbit = 0x80 if mask else 0
    if n < 126:
        head = bytes([b0, mbit | n])
    elif n <= 0xFFFF:
        head = bytes([b0, mbit | 126]) + _struct.pack("!H", n)
    else:
        head = bytes([b0, mbit | 127]) + _struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = mask_key if mask_key is not None else os.urandom(4)
    return head + key + ws_mask(payload, key)


def ws_mask(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return b""
    k = (key * (len(payload) // 4 + 1))[:len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(k, "big")).to_bytes(len(payload), "big")


def ws_close_payload(code: int | None = None, reason: bytes | str = b"") -> bytes:
    if code is None:
        return b""
    if isinstance(reason, str):
        reason = reason.encode()
    return _struct.pack("!H", code) + reason


@dataclass
class WSFrame:
    fin: bool
    rsv: int
    opcode: int
    payload: bytes
    masked: bool = False

    @property
    def close_code(self):
        assert self.opcode == OP_CLOSE
        return _struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None

    @property
    def close_reason(self) -> bytes:
        return self.payload[2:]

    def json(self):
        return _json.loads(self.payload.decode("utf-8"))

    def __repr__(self):
        p = self.payload if len(self.payload) <= 80 else self.payload[:80] + b"..."
        return f"WSFrame(op={self.opcode:#x}, fin={self.fin}, rsv={self.rsv}, {len(self.payload)}B {p!r})"


def parse_server_frame(buf: bytes):
    """(frame, bytes used) or (None, 0) when buf holds no complete frame."""
    if len(buf) < 2:
        return None, 0
    b0, b1 = buf[0], buf[1]
    n = b1 & 0x7F
    off = 2
    if n == 126:
        if len(buf) < 4:
            return None, 0
        n = _struct.unpack("!H", buf[2:4])[0]
        off = 4
    elif n == 127:
        if len(buf) < 10:
            return None, 0
        n = _struct.unpack("!Q", buf[2:10])[0]
        off = 10
    masked = bool(b1 & 0x80)
    key = b""
    if masked:
        if len(buf) < off + 4:
            return None, 0
        key = buf[off:off + 4]
        off += 4
    if len(buf) < off + n:
        return None, 0
    payload = buf[off:off + n]
    if masked:
        payload = ws_mask(payload, key)
    return WSFrame(bool(b0 & 0x80), (b0 >> 4) & 7, b0 & 0x0F, payload, masked), off + n


class RawWS(RawHTTP):
    """A WebSocket client on a raw blocking socket. Every read is bounded.

    RawWS(addr, path) connects and performs the opening handshake; .response is the server's
    answer (status 101 unless the test expects a handshake error: pass expect=None).
    Frames read are kept in .frames (every frame, control frames included).
    """

    def __init__(self, addr, path="/ws", headers=None, timeout=10.0, protocols=None,
                 expect=101, key=None, method="GET", version="HTTP/1.1", nodelay=True,
                 extra=b"", rcvbuf=None):
        super().__init__(addr, timeout=timeout, rcvbuf=rcvbuf)
        if nodelay:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.key = key if key is not None else ws_key()
        self.frames: list[WSFrame] = []
        hdrs = {"Upgrade": "websocket", "Connection": "Upgrade",
                "Sec-WebSocket-Key": self.key, "Sec-WebSocket-Version": "13"}
        if protocols:
            hdrs["Sec-WebSocket-Protocol"] = ", ".join(protocols)
        if headers:
            for k, v in (headers.items() if isinstance(headers, dict) else headers):
                for existing in [h for h in hdrs if h.lower() == k.lower()]:
                    del hdrs[existing]
                if v is not None:
                    hdrs[k] = v
        self.send(build_request(method, path, b"", hdrs, addr, version=version) + extra)
        # 101 is a 1xx: take it as the answer; an error answer comes with its body
        self.response = self.read_response(head_only=True, allow_interim=True)
        if self.response.status != 101:
            cl = self.response.header("content-length")
            if cl is not None:
                self.response.body = self.read_exact(int(cl), time.monotonic() + timeout)
        if expect is not None:
            assert self.response.status == expect, (
                f"handshake answered {self.response.status} {self.response.reason}, "
                f"expected {expect}: {self.response.headers}")
        if self.response.status == 101:
            acc = self.response.header("sec-websocket-accept")
            assert acc == ws_accept(self.key), f"bad Sec-WebSocket-Accept {acc!r}"

    # -- sending ----------------------------------------------------------------------------
    def send_frame(self, opcode, payload=b"", **kw):
        self.send(ws_frame(opcode, payload, **kw))

    def send_text(self, payload, **kw):
        self.send_frame(OP_TEXT, payload, **kw)

    def send_binary(self, payload, **kw):
        self.send_frame(OP_BINARY, payload, **kw)

    def send_cmd(self, action=None, topic=None, binary=False, **fields):
        obj = dict(fields)
        if action is not None:
            obj["action"] = action
        if topic is not None:
            obj["topic"] = topic
        self.send_frame(OP_BINARY if binary else OP_TEXT, _json.dumps(obj).encode())

    def send_close(self, code=1000, reason=b""):
        self.send_frame(OP_CLOSE, ws_close_payload(code, reason))

    def send_chopped(self, data: bytes, chunk: int = 1, pause: float = 0.0):
        """Send bytes in small writes (TCP_NODELAY is on), to exercise resumable parsing."""
        for i in range(0, len(data), chunk):
            self.send(data[i:i + chunk])
            if pause:
                time.sleep(pause)

    # -- receiving --------------------------------------------------------------------------
    def recv_frame(self, timeout=None) -> WSFrame:
        """The next frame; raises ConnectionClosed at EOF, Timeout when none arrives in time."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while True:
            f, used = parse_server_frame(self.buf)
            if f is not None:
                self.buf = self.buf[used:]
                self.frames.append(f)
                return f
            try:
                more = self._fill(deadline)
            except (ConnectionResetError, BrokenPipeError):
                more = False
                self.eof = True
            if not more:
                raise ConnectionClosed(f"EOF with {len(self.buf)} unparsed bytes "
                                       f"{self.buf[:60]!r}")

    def recv_data(self, timeout=None, answer_pings=True) -> WSFrame:
        """The next data frame (text/binary, assumed unfragmented: the server never fragments);
        pings are answered (unless answer_pings=False) and skipped, pongs skipped. A close frame
        raises AssertionError."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while True:
            f = self.recv_frame(max(0.0, deadline - time.monotonic()))
            if f.opcode == OP_PING:
                if answer_pings:
                    self.send_frame(OP_PONG, f.payload)
                continue
            if f.opcode == OP_PONG:
                continue
            if f.opcode == OP_CLOSE:
                raise AssertionError(f"unexpected close frame code={f.close_code} "
                                     f"reason={f.close_reason!r}")
            assert f.fin and f.rsv == 0 and not f.masked, f"unexpected frame {f!r}"
            return f

    def recv_json(self, timeout=None, answer_pings=True) -> dict:
        f = self.recv_data(timeout, answer_pings)
        assert f.opcode == OP_BINARY, f"server messages are binary frames, got {f!r}"
        return f.json()

    def recv_event(self, event, timeout=None) -> dict:
        """Read JSON frames until one whose "event" is `event`; returns it (others are kept in
        .skipped)."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        self.skipped = getattr(self, "skipped", [])
        while True:
            j = self.recv_json(max(0.0, deadline - time.monotonic()))
            if j.get("event") == event:
                return j
            self.skipped.append(j)

    def handshake_done(self, topics=(), timeout=None) -> list:
        """Consume the connected frame and one subscribed reply per topic; return them."""
        out = [self.recv_json(timeout)]
        assert out[0] == {"event": "connected", "data": "Connection established"}, out[0]
        for t in topics:
            j = self.recv_json(timeout)
            assert j == subscribed(t), j
            out.append(j)
        return out

    def expect_close(self, code, timeout=None, eof_timeout=5.0, allow_data=False):
        """Read until a close frame: assert its code (an int, None for an empty close, or a
        collection of acceptable codes), then that the server ends the TCP connection (EOF)
        within eof_timeout and sends no frame after its close. Returns the close frame."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while True:
            try:
                f = self.recv_frame(max(0.0, deadline - time.monotonic()))
            except ConnectionClosed:
                raise AssertionError(
                    f"connection ended without a close frame (expected code {code}); "
                    f"frames: {self.frames[-5:]!r}") from None
            if f.opcode == OP_CLOSE:
                break
            if not allow_data and f.opcode not in (OP_PING, OP_PONG):
                raise AssertionError(f"expected close {code}, got {f!r}")
        got = f.close_code
        ok = got in code if isinstance(code, (set, tuple, list, frozenset)) else got == code
        assert ok, f"close code {got} (reason {f.close_reason!r}), expected {code}"
        if len(f.payload) >= 2:
            f.close_reason.decode("utf-8")  # a server's reason must be UTF-8 as well
        assert len(f.payload) <= 125 and f.fin, f"malformed close frame {f!r}"
        # RFC 6455 7.1.1: the server ends the TCP connection first, and sends nothing after
        # its close frame.
        rest = self.wait_closed(eof_timeout * time_scale())
        assert rest == b"", f"server sent {len(rest)} bytes after its close frame: {rest[:100]!r}"
        return f

    def wait_eof(self, timeout=5.0) -> bytes:
        """Bytes received until EOF (bounded: raises Timeout if the server keeps it open)."""
        out = self.buf + self.wait_closed(timeout)
        self.buf = b""
        return out

    def frames_until_eof(self, timeout=5.0) -> list:
        data = self.wait_eof(timeout)
        frames = []
        while data:
            f, used = parse_server_frame(data)
            assert f is not None, f"truncated frame at EOF: {data[:60]!r}"
            frames.append(f)
            data = data[used:]
        return frames


class AsyncWS(_AsyncStream):
    """A minimal asyncio WebSocket client (raw frames) for fan-out tests with many
    connections: cheap to parse, answers server pings, hands each data payload to on_message."""

    def __init__(self, addr, path="/ws", on_message=None, protocols=None):
        self.addr = addr
        self.path = path
        self.on_message = on_message
        self.protocols = protocols
        self.buf = bytearray()
        self.messages = []
        self.count = 0
        self.close_frame = None
        self.eof = False
        self.reader = self.writer = None

    async def connect(self, timeout=10.0):
        async def _go():
            self.reader, self.writer = await asyncio.open_connection(*self.addr)
            key = ws_key()
            hdrs = {"Upgrade": "websocket", "Connection": "Upgrade",
                    "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": "13"}
            if self.protocols:
                hdrs["Sec-WebSocket-Protocol"] = ", ".join(self.protocols)
            self.writer.write(build_request("GET", self.path, b"", hdrs, self.addr))
            head = await self.reader.readuntil(b"\r\n\r\n")
            version, status, reason, headers = parse_head(head[:-4])
            self.response = Response(status, reason, headers, b"", version)
            assert status == 101, f"handshake answered {status}"
            assert self.response.header("sec-websocket-accept") == ws_accept(key)
        await asyncio.wait_for(_go(), timeout)
        return self

    def send_frame(self, opcode, payload=b""):
        self.writer.write(ws_frame(opcode, payload))

    def send_cmd(self, action, topic=None):
        obj = {"action": action}
        if topic is not None:
            obj["topic"] = topic
        self.send_frame(OP_TEXT, _json.dumps(obj).encode())

    async def _read_once(self):
        try:
            data = await self.reader.read(262144)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        while True:
            f, used = parse_server_frame(self.buf)
            if f is None:
                break
            del self.buf[:used]
            if f.opcode == OP_PING:
                self.send_frame(OP_PONG, f.payload)
            elif f.opcode == OP_CLOSE:
                self.close_frame = f
            elif f.opcode in (OP_TEXT, OP_BINARY):
                self.count += 1
                if self.on_message is not None:
                    self.on_message(f.payload)
                else:
                    self.messages.append(f.payload)
        return True

    async def wait_for(self, pred, timeout=10.0, what="messages"):
        async def _go():
            while not pred(self):
                if self.eof or not await self._read_once():
                    raise ConnectionClosed(f"WebSocket {self.path} ended while waiting for "
                                           f"{what} ({self.count} messages)")
        try:
            await asyncio.wait_for(_go(), timeout)
        except asyncio.TimeoutError:
            raise Timeout(f"timed out after {timeout:.0f}s waiting for {what} on {self.path} "
                          f"({self.count} messages)") from None

