"""Real redis-server processes for the distributed-mode tests (issue #5), and pushletd nodes
pointed at them.

- RespClient: a tiny blocking RESP2 client on a raw socket (no redis-py needed): PING, AUTH,
  SELECT, KEYS, ... with every read bounded.
- RedisServer: one `redis-server` on a free 127.0.0.1 port with its own temp dir; `--save ""
  --appendonly no` by default, `persistent=True` adds `--appendonly yes --appendfsync always`,
  `password=` adds `--requirepass`. kill9() / restart() (same port, same dir: an AOF is
  reloaded) / stop(). Only processes started here are ever signalled, by PID.
- fixtures: `redis_server` (factory; every server it started is killed at teardown, after the
  pushletd servers of the test are stopped) and `cluster` (factory: N pushletd nodes with the
  same `--redis` list, on top of the suite's `pushletd` fixture and its teardown checks).

Run this file directly (`/usr/bin/python3 tests/integration/redis_fixtures.py`) for a
self-check of RespClient and RedisServer without pushletd.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time

import pytest

import pushlet_testlib as pl

REDIS_SERVER = os.environ.get("REDIS_SERVER") or shutil.which("redis-server") \
    or "/usr/bin/redis-server"
HAVE_REDIS = os.path.exists(REDIS_SERVER)
requires_redis = pytest.mark.skipif(not HAVE_REDIS, reason=f"no redis-server ({REDIS_SERVER})")


# --------------------------------------------------------------------------------------------
# RESP2


class RedisError(Exception):
    """An error reply (-ERR ..., -NOAUTH ..., -LOADING ...)."""


def resp_encode(*args) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, int):
            a = str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class RespClient:
    """One blocking connection to a Redis server; command() returns the decoded reply
    (bytes for bulk strings, str for simple strings, int, list, None) or raises RedisError."""

    def __init__(self, addr, password=None, db=0, timeout=5.0, username=None):
        self.addr = addr
        self.timeout = timeout
        if isinstance(addr, str):  # unix socket path
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(addr)
        self.buf = b""
        if password is not None:
            if username:
                self.command("AUTH", username, password)
            else:
                self.command("AUTH", password)
        if db:
            self.command("SELECT", db)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def _fill(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise pl.Timeout(f"redis {self.addr}: no complete reply within {self.timeout}s")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise pl.Timeout(f"redis {self.addr}: no complete reply within {self.timeout}s") \
                from None
        if not data:
            raise ConnectionError(f"redis {self.addr} closed the connection")
        self.buf += data

    def _line(self, deadline) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line, self.buf = self.buf[:i], self.buf[i + 2:]
                return line
            self._fill(deadline)

    def _exact(self, n, deadline) -> bytes:
        while len(self.buf) < n + 2:
            self._fill(deadline)
        out, self.buf = self.buf[:n], self.buf[n + 2:]
        return out

    def _reply(self, deadline):
        line = self._line(deadline)
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            return RedisError(rest.decode("utf-8", "replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n, deadline)
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply(deadline) for _ in range(n)]
        raise AssertionError(f"redis {self.addr}: unexpected reply line {line[:100]!r}")

    def command(self, *args):
        self.sock.sendall(resp_encode(*args))
        r = self._reply(time.monotonic() + self.timeout)
        if isinstance(r, RedisError):
            raise r
        return r

    def keys(self, pattern="*") -> list:
        """Every key matching pattern (SCAN, so a big keyspace does not block the server)."""
        out, cursor = [], b"0"
        while True:
            cursor, batch = self.command("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
            out.extend(k.decode("utf-8", "replace") for k in batch)
            if cursor in (b"0", "0"):
                return sorted(set(out))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((pl.HOST, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# redis-server


class RedisServer:
    """One redis-server process on 127.0.0.1:<free port>, with its own directory."""

    def __init__(self, workdir=None, password=None, persistent=False, extra_args=(),
                 port=None):
        self.workdir = workdir or tempfile.mkdtemp(prefix="pushlet-redis-")
        os.makedirs(self.workdir, exist_ok=True)
        self.password = password
        self.persistent = persistent
        self.extra_args = [str(a) for a in extra_args]
        self.port = port
        self.host = pl.HOST
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(self.workdir, "redis.log")
        self.starts = 0

    # -- addresses ---------------------------------------------------------------------------
    @property
    def addr(self):
        return (self.host, self.port)

    @property
    def hostport(self) -> str:
        """host:port, the plain form of pushletd's --redis."""
        return f"{self.host}:{self.port}"

    def url(self, password=None, db=None) -> str:
        """redis://[:password@]host:port[/db]."""
        auth = f":{password}@" if password is not None else ""
        path = f"/{db}" if db is not None else ""
        return f"redis://{auth}{self.host}:{self.port}{path}"

    def client(self, db=0, timeout=5.0, password=None) -> RespClient:
        return RespClient(self.addr, password=password if password is not None else self.password,
                          db=db, timeout=timeout)

    # -- lifecycle ---------------------------------------------------------------------------
    def _cmd(self):
        cmd = [REDIS_SERVER, "--port", str(self.port), "--bind", self.host,
               "--dir", self.workdir, "--logfile", self.log_path, "--daemonize", "no",
               "--save", "", "--protected-mode", "no", "--databases", "16"]
        if self.persistent:
            cmd += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            cmd += ["--appendonly", "no"]
        if self.password is not None:
            cmd += ["--requirepass", self.password]
        return cmd + self.extra_args

    def start(self, timeout=10.0):
        """Start on self.port (a free one the first time) and wait until PING answers PONG."""
        assert self.proc is None or self.proc.poll() is not None, "redis-server already running"
        fixed = self.port is not None
        for attempt in range(5):
            if not fixed:
                self.port = free_port()
            self.proc = subprocess.Popen(self._cmd(), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         cwd=self.workdir)
            self.starts += 1
            try:
                self.wait_ready(timeout * pl.time_scale())
                return self
            except _Exited:
                # the port was taken between free_port() and bind (or, on restart, is still
                # held): try another one, or the same one again a little later
                if fixed:
                    time.sleep(0.2)
                continue
        raise AssertionError(f"redis-server did not start on 127.0.0.1:{self.port}\n"
                             f"{self.log_tail()}")

    def wait_ready(self, timeout):
        """PING answers PONG (not -LOADING while an AOF is replayed); bounded."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            if self.proc.poll() is not None:
                raise _Exited(f"redis-server exited with {self.proc.returncode}: "
                              f"{self.log_tail(2000)}")
            try:
                with RespClient(self.addr, password=self.password, timeout=1.0) as c:
                    if c.command("PING") == "PONG":
                        return
            except (OSError, RedisError, ConnectionError, pl.Timeout) as e:
                last = e
            if time.monotonic() > deadline:
                raise pl.Timeout(f"redis-server on {self.hostport} did not answer PING within "
                                 f"{timeout:.0f}s (last: {last!r})\n{self.log_tail()}")
            time.sleep(0.02)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self):
        """SIGKILL (by PID) and reap: no shutdown, no final save."""
        if self.running():
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=10)

    def restart(self, timeout=10.0):
        """Start again on the same port with the same directory (a persistent server reloads
        its AOF)."""
        if self.running():
            self.kill9()
        return self.start(timeout)

    def stop(self, timeout=10.0):
        """SIGTERM, bounded; SIGKILL if it does not go."""
        if not self.running():
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill9()

    def log_tail(self, max_chars=4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                t = f.read().decode("utf-8", "replace")
        except OSError:
            return "(no redis log)"
        return t[-max_chars:]


class _Exited(AssertionError):
    pass


# --------------------------------------------------------------------------------------------
# a TCP proxy to cut one node off from Redis while the others keep it


class TcpProxy:
    """Forwards 127.0.0.1:<port> to `target`, one thread per direction per connection.

    cut(match=None): close (RST) the connections in both directions; with match (bytes), only
    those whose client side has sent those bytes, case-insensitive (e.g. b"SUBSCRIBE": the
    pub/sub connection).
    block(): from now on accepted connections are closed at once (the node cannot reach Redis);
    heal() undoes it. close() ends everything."""

    def __init__(self, target, host=pl.HOST):
        self.target = target
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((host, 0))
        self.lsock.listen(64)
        self.host, self.port = self.lsock.getsockname()
        self.blocked = False
        self.closed = False
        self.pairs = []  # [client, upstream, bytearray of client->server bytes (first 64 KiB)]
        self.lock = threading.Lock()
        self.accepted = 0
        self.cuts = 0
        self._thread = self._spawn(self._accept_loop)

    @property
    def hostport(self):
        return f"{self.host}:{self.port}"

    @staticmethod
    def _spawn(fn, *args):
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        return t

    def _accept_loop(self):
        while not self.closed:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            self.accepted += 1
            if self.blocked:
                _rst_close(c)
                continue
            try:
                u = socket.create_connection(self.target, timeout=2.0)
                u.settimeout(None)
            except OSError:
                _rst_close(c)
                continue
            pair = [c, u, bytearray()]
            with self.lock:
                self.pairs.append(pair)
            self._spawn(self._pump, c, u, pair[2], pair)
            self._spawn(self._pump, u, c, None)

    def _pump(self, src, dst, record, pair=None):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if record is not None and len(record) < 65536:
                    record += data[:65536 - len(record)]
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if pair is not None:
            with self.lock:
                if pair in self.pairs:
                    self.pairs.remove(pair)

    def cut(self, match: bytes | None = None) -> int:
        """Reset the matching connections; returns how many."""
        with self.lock:
            victims = [p for p in self.pairs
                       if match is None or match.lower() in bytes(p[2]).lower()]
            self.pairs = [p for p in self.pairs if p not in victims]
        for c, u, _ in victims:
            _rst_close(c)
            _rst_close(u)
        self.cuts += len(victims)
        return len(victims)

    def block(self):
        self.blocked = True
        self.cut()

    def heal(self):
        self.blocked = False

    def close(self):
        self.closed = True
        try:
            self.lsock.close()
        except OSError:
            pass
        self.cut()


def _rst_close(s):
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture
def redis_server(request, tmp_path_factory):
    """Factory: redis_server(password=None, persistent=False) starts a redis-server and returns
    its RedisServer. Every server started is killed (by PID) at teardown."""
    if not HAVE_REDIS:
        pytest.skip(f"no redis-server ({REDIS_SERVER})")
    servers = []
    request.node._redis_servers = servers

    def start(**kw):
        r = RedisServer(workdir=str(tmp_path_factory.mktemp("redis")), **kw)
        servers.append(r)
        return r.start()

    try:
        yield start
    finally:
        for r in servers:
            try:
                r.kill9()
            except Exception:  # noqa: BLE001 - best effort; the next one still goes
                pass


@pytest.fixture
def tcp_proxy():
    """Factory: tcp_proxy(target_addr) -> TcpProxy; all closed at teardown (after the nodes)."""
    proxies = []

    def start(target):
        p = TcpProxy(target)
        proxies.append(p)
        return p

    try:
        yield start
    finally:
        for p in proxies:
            p.close()


def redis_flags(shards, password=None, db=None) -> list:
    """pushletd flags for a shard list (RedisServer or address strings, in order)."""
    flags = []
    for s in shards:
        flags += ["--redis", s.hostport if isinstance(s, RedisServer) else str(s)]
    if password is not None:
        flags += ["--redis-password", password]
    if db is not None:
        flags += ["--redis-db", str(db)]
    return flags


@pytest.fixture
def cluster(redis_server, pushletd):
    """Factory: cluster(n, shards, *flags, password=None, db=None) starts n pushletd nodes that
    all get the same --redis list, in the same order. Requesting it orders the teardowns: the
    nodes are stopped (and checked: exit 0, no sanitizer report) while Redis still runs, then
    the redis-servers go."""

    def start(n, shards, *flags, password=None, db=None, env=None):
        common = redis_flags(shards, password, db) + [str(f) for f in flags]
        return [pushletd(*common, env=env) for _ in range(n)]

    return start


def run_pushletd_expect_exit(args, timeout=15.0, env=None):
    """Run pushletd with args (plus --listen 127.0.0.1:0) that must make it exit at startup;
    returns (returncode, stderr text, seconds). Kills it (by PID) if it is still running after
    timeout and fails."""
    binary = pl.pushletd_path()
    cmd = [binary, "--listen", f"{pl.HOST}:0"] + [str(a) for a in args]
    e = dict(os.environ)
    e.update(env or {})
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=e)
    try:
        out, err = proc.communicate(timeout=timeout * pl.time_scale())
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
        raise AssertionError(f"pushletd {' '.join(cmd)} still running after {timeout:.0f}s "
                             f"(expected it to exit); stderr:\n{err.decode(errors='replace')}")
    return proc.returncode, err.decode("utf-8", "replace"), time.monotonic() - t0


# --------------------------------------------------------------------------------------------
# self-check (no pushletd needed): python3 redis_fixtures.py


def _self_check():
    import json
    d = tempfile.mkdtemp(prefix="pushlet-redis-selfcheck-")
    plain = RedisServer(os.path.join(d, "plain"))
    pers = RedisServer(os.path.join(d, "pers"), password="pw", persistent=True)
    try:
        plain.start()
        with plain.client() as c:
            assert c.command("PING") == "PONG"
            assert c.command("SET", "pushlet:x", "1") == "OK"
            assert c.keys("pushlet:*") == ["pushlet:x"]
        port = plain.port
        plain.kill9()
        try:
            RespClient(plain.addr, timeout=1.0)
            raise AssertionError("connected to a killed redis")
        except OSError:
            pass
        plain.restart()
        assert plain.port == port
        with plain.client() as c:
            assert c.keys("*") == [], "a non-persistent redis kept data over kill -9"

        pers.start()
        try:
            RespClient(pers.addr, timeout=1.0).command("PING")
            raise AssertionError("PING without AUTH worked on a --requirepass server")
        except RedisError as e:
            assert "NOAUTH" in str(e), e
        try:
            RespClient(pers.addr, password="wrong", timeout=1.0)
            raise AssertionError("AUTH with a wrong password worked")
        except RedisError as e:
            assert "WRONGPASS" in str(e) or "invalid" in str(e).lower(), e
        with pers.client(db=3) as c:
            c.command("XADD", "pushlet:{t}:s", "*", "d", json.dumps({"a": 1}))
        pers.kill9()
        pers.restart()
        with pers.client(db=3) as c:
            assert c.command("XLEN", "pushlet:{t}:s") == 1, "AOF not reloaded after kill -9"
        with pers.client(db=0) as c:
            assert c.keys("*") == []
        proxy = TcpProxy(plain.addr)
        try:
            with RespClient((proxy.host, proxy.port), timeout=2.0) as c1, \
                    RespClient((proxy.host, proxy.port), timeout=2.0) as c2:
                assert c1.command("PING") == "PONG"
                assert c2.command("SUBSCRIBE", "x") == [b"subscribe", b"x", 1]
                assert proxy.cut(b"subscribe") == 1
                assert c1.command("PING") == "PONG", "cut the wrong connection"
                try:
                    c2.command("PING")
                    raise AssertionError("the cut connection still works")
                except (OSError, ConnectionError):
                    pass
            proxy.block()
            try:
                RespClient((proxy.host, proxy.port), timeout=2.0).command("PING")
                raise AssertionError("PING through a blocked proxy")
            except (OSError, ConnectionError):
                pass
            proxy.heal()
            with RespClient((proxy.host, proxy.port), timeout=2.0) as c:
                assert c.command("PING") == "PONG"
        finally:
            proxy.close()
        print("redis_fixtures self-check: OK",
              f"(plain on {plain.hostport}, persistent+auth on {pers.hostport})")
    finally:
        plain.kill9()
        pers.kill9()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    _self_check()
