"""pushletd --auth-url: an HTTP backend (aiohttp, on a loopback port) allows or denies every SSE
stream, WebSocket upgrade and subscription (docs/PUSHLETD.md, "Auth backend").

Covered: the request documents (connect and subscribe, every field); allow / 401 / 403 / 429 /
other 4xx / 5xx / malformed answers for SSE and WebSocket, status and reason reaching the client;
the backend's user id and metadata coming back in later subscribe requests; denied topics (SSE
?topic= → 403, WebSocket URL → 403, WebSocket command → error "forbidden"); backend down and
backend slower than --auth-timeout → 503 (logged once, not per request); keep-alive connections
reused, and re-opened when the backend closed them while idle; 200 concurrent connections all
answered; PUSHLET_AUTH_URL; bad URLs refused at start.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading
import time
import urllib.parse

import pytest

aiohttp_web = pytest.importorskip("aiohttp.web")

import pushlet_testlib as pl  # noqa: E402
from pushlet_testlib import RawWS, events_path  # noqa: E402

S = pl.time_scale()


# --------------------------------------------------------------------------------------------
# The backend


def default_policy(req: dict):
    """(status, body, delay_s) for one request document. Connect: the query decides (user=NAME
    allows as NAME, deny=STATUS denies, slow=S sleeps first, crash → 500, badjson → a 2xx with
    a broken body). Subscribe: topics under secret/ are refused."""
    if req["type"] == "subscribe":
        if req["topic"].startswith("secret/"):
            return 403, "no secrets here\nnot shown", 0
        return 200, "", 0
    q = dict(urllib.parse.parse_qsl(req["query"]))
    delay = float(q.get("slow", 0))
    if "deny" in q:
        return int(q["deny"]), {"401": "need a login", "403": "banned\r\nsecond line",
                                "429": "slow down", "404": "who?"}.get(q["deny"], ""), delay
    if "crash" in q:
        return 500, "Traceback: secret internals", delay
    if "badjson" in q:
        return 200, '{"user": "x",', delay
    if "baduser" in q:
        return 200, json.dumps({"user": {"1": "a\nb", "2": "u" * 257, "3": 7}[q["baduser"]]}), delay
    if "bigmeta" in q:
        return 200, json.dumps({"user": "m", "metadata": "x" * 5000}), delay
    if "user" in q:
        body = {"user": q["user"], "metadata": {"plan": "pro", "n": [1, 2]}}
        return 200, json.dumps(body), delay
    return 204, "", delay


class Backend:
    """aiohttp server on its own thread and loop; records every request document."""

    def __init__(self, policy=default_policy, keepalive_timeout=75.0, host=pl.HOST):
        self.policy = policy
        self.requests: list[dict] = []
        self.peers: list[int] = []  # client port of each request (keep-alive check)
        self.lock = threading.Lock()
        self.keepalive_timeout = keepalive_timeout
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        v6 = ":" in host
        self.sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{f'[{host}]' if v6 else host}:{self.port}/auth/check?k=v"

    async def handle(self, request):
        assert request.method == "POST" and request.path == "/auth/check", request.path
        assert request.query_string == "k=v"
        assert request.content_type == "application/json"
        doc = await request.json()  # must be valid JSON (UTF-8)
        with self.lock:
            self.requests.append(doc)
            self.peers.append(request.transport.get_extra_info("peername")[1])
        status, body, delay = self.policy(doc)
        if delay:
            await asyncio.sleep(delay)
        return aiohttp_web.Response(status=status, text=body,
                                    content_type="application/json" if body.startswith("{")
                                    else "text/plain")

    def start(self):
        async def _up():
            app = aiohttp_web.Application()
            app.router.add_post("/auth/check", self.handle)
            self.runner = aiohttp_web.AppRunner(app, access_log=None,
                                                keepalive_timeout=self.keepalive_timeout)
            await self.runner.setup()
            await aiohttp_web.SockSite(self.runner, self.sock).start()
        self.thread.start()
        asyncio.run_coroutine_threadsafe(_up(), self.loop).result(10)
        return self

    def stop(self):
        try:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    def of(self, type_, **match):
        with self.lock:
            return [r for r in self.requests
                    if r["type"] == type_ and all(r.get(k) == v for k, v in match.items())]


@pytest.fixture
def backend():
    made = []

    def start(**kw):
        b = Backend(**kw).start()
        made.append(b)
        return b

    yield start
    for b in made:
        b.stop()


@pytest.fixture
def srv(pushletd, backend):
    b = backend()
    s = pushletd("--auth-url", b.url)
    s.backend = b
    return s


# --------------------------------------------------------------------------------------------
# Clients


def sse(srv, path, headers=None, body=True):
    """(response, client) for GET path; the body is read unless the stream was opened."""
    c = pl.RawHTTP(srv.addr, timeout=10 * S)
    c.send(pl.build_request("GET", path, b"", {"Accept": "text/event-stream", **(headers or {})},
                            srv.addr))
    r = c.read_response(head_only=True)
    if r.status != 200 and body:
        cl = r.header("content-length")
        r.body = c.read_exact(int(cl), time.monotonic() + 10 * S) if cl else b""
    return r, c


def sse_status(srv, path, headers=None):
    r, c = sse(srv, path, headers)
    c.close()
    return r


def ws(srv, path, headers=None):
    return RawWS(srv.addr, path, headers=headers, expect=None, timeout=10 * S)


# --------------------------------------------------------------------------------------------
# Tests


def test_sse_connect_request_and_allow(srv):
    r, c = sse(srv, events_path("news", user="alice") + "&x=%20y",
               {"X-Test": "1", "Cookie": "a=1", "cookie": "b=2"})
    try:
        assert r.status == 200
        port = c.sock.getsockname()[1]
        mid = srv.publish("news", "hello")
        p = pl.SSEParser()
        evs = []
        deadline = time.monotonic() + 10 * S
        while not any(e.data == "hello" for e in evs):
            c._fill(deadline)
            evs += p.feed(c.buf)
            c.buf = b""
        assert [e.id for e in evs if e.data == "hello"] == [mid]
    finally:
        c.close()
    [conn] = srv.backend.of("connect")
    assert isinstance(conn["connection"], int) and conn["connection"] > 0
    assert conn["transport"] == "sse" and conn["method"] == "GET" and conn["path"] == "/events"
    assert conn["query"] == "topic=news&user=alice&x=%20y", "raw, without '?'"
    assert conn["remote"] == f"127.0.0.1:{port}"
    assert conn["user"] == ""
    h = conn["headers"]
    assert h["x-test"] == "1" and h["accept"] == "text/event-stream"
    assert h["cookie"] == "a=1; b=2", "repeated Cookie fields joined with '; '"
    assert all(k == k.lower() for k in h)
    assert set(conn) == {"type", "connection", "transport", "method", "path", "query", "remote",
                         "headers", "user"}
    [sub] = srv.backend.of("subscribe")
    assert sub == {"type": "subscribe", "connection": conn["connection"], "transport": "sse",
                   "user": "alice", "metadata": {"plan": "pro", "n": [1, 2]}, "topic": "news"}


@pytest.mark.parametrize("status,reason", [(401, "need a login"), (403, "banned"),
                                           (429, "slow down"), (404, "who?")])
def test_denied_connections_get_status_and_reason(srv, status, reason):
    r = sse_status(srv, events_path("t", deny=status))
    assert (r.status, r.body.decode().rstrip("\n")) == (status, reason)
    if status == 401:
        assert r.header("www-authenticate") == "Bearer"
    c = ws(srv, f"/ws?topic=t&deny={status}")
    assert (c.response.status, c.response.body.decode().rstrip("\n")) == (status, reason)
    c.close()
    assert [x["transport"] for x in srv.backend.of("connect")] == ["sse", "websocket"]
    assert srv.backend.of("subscribe") == [], "no subscription asked for a refused connection"
    assert srv.stats()["auth_denied"] == 2


def test_backend_errors_deny_with_503(srv):
    for q in ({"crash": 1}, {"badjson": 1}, {"baduser": 1}, {"baduser": 2}, {"baduser": 3},
              {"bigmeta": 1}):
        t0 = time.monotonic()
        r = sse_status(srv, events_path("t", **q))
        assert r.status == 503, (q, r)
        assert b"secret internals" not in r.body, "a 5xx body is not passed to clients"
        c = ws(srv, "/ws?" + urllib.parse.urlencode(q))
        assert c.response.status == 503
        c.close()
        assert time.monotonic() - t0 < 2 * S, f"{q}: denied at once, not by the auth timeout"


def test_websocket_allow_user_and_subscribe_commands(srv):
    c = ws(srv, "/ws?topic=room&user=carol")
    assert c.response.status == 101
    c.handshake_done(["room"])
    [conn] = srv.backend.of("connect")
    assert conn["transport"] == "websocket" and conn["path"] == "/ws"
    assert conn["headers"]["upgrade"] == "websocket"
    c.send_cmd("subscribe", "secret/plans")
    assert c.recv_json() == {"event": "error", "topic": "secret/plans", "reason": "forbidden",
                             "data": "no secrets here"}
    c.send_cmd("subscribe", "lobby")
    assert c.recv_json() == pl.subscribed("lobby")
    srv.publish("secret/plans", "not for carol")
    srv.publish("lobby", "hi")
    m = c.recv_json()
    assert (m["topic"], m["data"]) == ("lobby", "hi")
    c.close()
    subs = srv.backend.of("subscribe")
    assert [s["topic"] for s in subs] == ["room", "secret/plans", "lobby"]
    for s in subs:
        assert s["connection"] == conn["connection"] and s["transport"] == "websocket"
        assert s["user"] == "carol", "the backend's user id comes back with every subscription"
        assert s["metadata"] == {"plan": "pro", "n": [1, 2]}


def test_denied_topics_fail_the_request(srv):
    r = sse_status(srv, events_path("ok", "secret/a", user="dave"))
    assert (r.status, r.body.decode().rstrip("\n")) == (403, "no secrets here")
    c = ws(srv, "/ws?topic=secret/b&user=dave")
    assert (c.response.status, c.response.body.decode().rstrip("\n")) == (403, "no secrets here")
    c.close()
    # no topic named: the SSE default topic is asked for too
    r, cl = sse(srv, "/events?user=dave")
    cl.close()
    assert r.status == 200
    assert srv.backend.of("subscribe", topic="default")


def test_backend_down_denies_with_503(pushletd):
    s = socket.socket()
    s.bind((pl.HOST, 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    srv = pushletd("--auth-url", f"http://{pl.HOST}:{port}/auth")
    for _ in range(3):
        assert sse_status(srv, events_path("t")).status == 503
        c = ws(srv, "/ws")
        assert c.response.status == 503
        c.close()
    log = srv.stderr_text()
    assert log.count("is unreachable") == 1, "logged when it goes down, not per request\n" + log


def test_backend_slower_than_auth_timeout(pushletd, backend):
    b = backend()
    srv = pushletd("--auth-url", b.url, "--auth-timeout", "0.5", "--auth-workers", "2")
    t0 = time.monotonic()
    r = sse_status(srv, events_path("t", slow=3))
    took = time.monotonic() - t0
    assert r.status == 503
    assert took < 2.5 * S, f"denied after {took:.2f}s, expected about 0.5s"
    c = ws(srv, "/ws?slow=3")
    assert c.response.status == 503
    c.close()
    # the workers recover: the next answers are the backend's again
    assert sse_status(srv, events_path("t", user="erin")).status == 200
    assert sse_status(srv, events_path("t", deny=403)).status == 403
    assert "does not answer in time" in srv.stderr_text()


def test_keepalive_reused_and_reopened(pushletd, backend):
    b = backend(keepalive_timeout=0.5)
    srv = pushletd("--auth-url", b.url, "--auth-workers", "1")
    for i in range(5):
        assert sse_status(srv, events_path("t", user=f"u{i}")).status == 200
    assert len(b.requests) == 10 and len(set(b.peers)) == 1, "one worker, one connection"
    time.sleep(2.6)  # aiohttp closes it 0.5 s idle, checked once per second
    for i in range(2):
        assert sse_status(srv, events_path("t", user="v")).status == 200, "stale connection"
    assert len(set(b.peers)) == 2


@pytest.mark.timeout(90)
def test_many_concurrent_connections_all_answered(pushletd, backend):
    def slowish(req):
        st, body, _ = default_policy(req)
        return st, body, 0.005

    b = backend(policy=slowish)
    srv = pushletd("--auth-url", b.url, "--auth-workers", "4")
    n = 200

    async def one(i):
        path = events_path("many", user=f"u{i}") if i % 2 == 0 else \
            events_path("many", deny=403)
        c = pl.AsyncSSE(srv.addr, path)
        await c.connect(timeout=30 * S, wait_connected=True)
        return c

    async def main():
        clients = await asyncio.gather(*(one(i) for i in range(n)))
        statuses = [c.response.status for c in clients]
        try:
            srv.publish("many", "all")  # the stream is open as soon as its 200 came
            await asyncio.gather(*(c.wait_messages(1, 30 * S)
                                   for c in clients if c.response.status == 200))
        finally:
            await asyncio.gather(*(c.close() for c in clients))
        return statuses

    statuses = pl.run_async(main(), 60 * S)
    assert statuses == [200 if i % 2 == 0 else 403 for i in range(n)]
    assert len(b.of("connect")) == n and len(b.of("subscribe")) == n // 2
    assert {r["user"] for r in b.of("subscribe")} == {f"u{i}" for i in range(0, n, 2)}
    assert len(set(b.peers)) <= 4, "at most one connection per worker"


def test_hostname_resolved_at_start(pushletd, backend):
    b = backend()
    srv = pushletd("--auth-url", b.url.replace(pl.HOST, "localhost"))
    assert sse_status(srv, events_path("t", user="x")).status == 200
    assert b.of("connect")


def test_ipv6_literal(pushletd, backend):
    try:
        b = backend(host="::1")
    except OSError as e:
        pytest.skip(f"no IPv6 loopback: {e}")
    assert b.url.startswith("http://[::1]:")
    srv = pushletd("--auth-url", b.url)
    assert sse_status(srv, events_path("t", deny=403)).status == 403
    assert sse_status(srv, events_path("t", user="x")).status == 200


def test_client_gone_before_the_answer(pushletd, backend):
    b = backend()
    srv = pushletd("--auth-url", b.url, "--auth-workers", "2")
    for i, path in enumerate((events_path("t", slow=0.5), "/ws?slow=0.5")):
        c = pl.RawHTTP(srv.addr)
        hdrs = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": pl.ws_key()} if path.startswith("/ws") else {}
        c.send(pl.build_request("GET", path, b"", hdrs, srv.addr))
        pl.wait_until(lambda: len(b.requests) > i, 5 * S, what="the backend's request")
        c.close()  # leaves while the backend thinks
    time.sleep(1.0)  # the late answers find no request (PUSHLET_ENOENT): harmless
    st = srv.stats()
    assert (st["connections"], st["auth_pending"]) == (1, 0), st  # 1: this /stats request
    assert sse_status(srv, events_path("t", user="y")).status == 200


def test_jwt_checked_first_and_its_sub_sent(pushletd, backend):
    import base64
    import hashlib
    import hmac

    def b64(raw):
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    h, p = b64(b'{"alg":"HS256","typ":"JWT"}'), b64(b'{"sub":"tok-user"}')
    sig = b64(hmac.new(b"sekrit", f"{h}.{p}".encode(), hashlib.sha256).digest())
    b = backend()
    srv = pushletd("--auth-url", b.url, "--jwt-secret", "sekrit")
    assert sse_status(srv, events_path("t")).status == 401
    assert b.requests == [], "no token: refused before the backend is asked"
    auth = {"Authorization": f"Bearer {h}.{p}.{sig}"}
    assert sse_status(srv, events_path("t"), auth).status == 200  # 204: keeps the token's sub
    assert [r["user"] for r in b.requests] == ["tok-user", "tok-user"]
    assert b.requests[1]["metadata"] is None
    assert sse_status(srv, events_path("t", user="other"), auth).status == 200
    assert b.requests[-1]["user"] == "other", "the backend's user replaces the token's"


def test_env_variable(pushletd, backend):
    b = backend()
    srv = pushletd(env={"PUSHLET_AUTH_URL": b.url, "PUSHLET_AUTH_TIMEOUT": "2"})
    assert sse_status(srv, events_path("t", deny=429)).status == 429
    assert sse_status(srv, events_path("t", user="x")).status == 200


@pytest.mark.parametrize("url,why", [
    ("https://127.0.0.1/auth", "https is not supported"),
    ("ftp://x", "expected http://"),
    ("http://127.0.0.1:99999/", "bad port"),
    ("http://user:pw@127.0.0.1/", "credentials"),
    ("http://[::1/", "unterminated"),
])
def test_bad_urls_refused_at_start(url, why):
    r = subprocess.run([pl.pushletd_path(), "--listen", f"{pl.HOST}:0", "--auth-url", url],
                       capture_output=True, text=True, timeout=30 * S, stdin=subprocess.DEVNULL)
    assert r.returncode in (1, 2) and why in r.stderr, (r.returncode, r.stderr)


def test_help_mentions_auth_flags():
    r = subprocess.run([pl.pushletd_path(), "--help"], capture_output=True, text=True,
                       timeout=10 * S)
    for flag in ("--auth-url", "--auth-workers", "--auth-timeout", "https is not supported"):
        assert flag in r.stdout
