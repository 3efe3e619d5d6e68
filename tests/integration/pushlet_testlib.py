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
        assert isinstance(mid, str) and mid.isdigit(), f"id must be a decimal string, got {mid!r}"
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


class AsyncHTTP:
    """A keep-alive HTTP/1.1 client connection on asyncio streams."""

    def __init__(self, addr):
        self.addr = addr
        self.reader = None
        self.writer = None

    async def connect(self, timeout=10.0):
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(*self.addr), timeout)
        return self

    async def close(self):
        if self.writer is not None:
            self.writer.close()
            try:
                await asyncio.wait_for(self.writer.wait_closed(), 5)
            except (OSError, asyncio.TimeoutError):
                pass

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


class AsyncSSE:
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

    async def close(self):
        if self.writer is not None:
            self.writer.close()
            try:
                await asyncio.wait_for(self.writer.wait_closed(), 5)
            except (OSError, asyncio.TimeoutError):
                pass


def run_async(coro, timeout):
    """Run a coroutine to completion with an overall bound."""
    async def _bounded():
        try:
            return await asyncio.wait_for(coro, timeout)
        except asyncio.TimeoutError:
            raise Timeout(f"async test body exceeded {timeout:.0f}s") from None
    return asyncio.run(_bounded())


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
