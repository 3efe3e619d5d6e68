"""HTTP/1.1 behaviour: keep-alive, pipelining, HEAD, CORS preflight, chunked bodies,
Expect: 100-continue, HTTP/1.0, keep-alive timeout, configuration by environment."""

import asyncio
import time

import pytest

import pushlet_testlib as pl
from pushlet_testlib import AsyncSSE, RawHTTP, events_path, run_async


def with_subscriber(srv, topic, action, n, timeout=10):
    """Subscribe to topic, run action() (blocking, in a thread), return (result, messages)."""
    async def main():
        s = await AsyncSSE(srv.addr, events_path(topic)).connect()
        result = await asyncio.to_thread(action)
        await s.wait_messages(n, timeout)
        await s.close()
        return result, s.messages()
    return run_async(main(), timeout + 20)


def test_keep_alive_two_requests_one_connection(pushletd):
    srv = pushletd()
    with RawHTTP(srv.addr) as c:
        r1 = c.request("GET", "/healthz")
        assert r1.status == 200 and r1.body.strip() == b"ok"
        assert not r1.wants_close()
        r2 = c.request("POST", "/publish?topic=k", b"kept")
        assert r2.status == 200, r2
        r2.json_id()
        r3 = c.request("GET", "/stats")
        assert r3.status == 200 and r3.json()["messages_in"] == 1


def test_pipelined_requests_answered_in_order(pushletd):
    srv = pushletd()

    def action():
        reqs = (pl.build_request("POST", "/publish?topic=p", b"first", {}, srv.addr)
                + pl.build_request("GET", "/healthz", b"", {}, srv.addr)
                + pl.build_request("POST", "/publish?topic=p", b"second\nline", {}, srv.addr)
                + pl.build_request("GET", "/nope", b"", {}, srv.addr)
                + pl.build_request("GET", "/stats", b"", {}, srv.addr))
        with RawHTTP(srv.addr) as c:
            c.send(reqs)  # one write
            return [c.read_response() for _ in range(5)]

    rs, msgs = with_subscriber(srv, "p", action, 2)
    assert [r.status for r in rs] == [200, 200, 200, 404, 200]
    id1, id2 = rs[0].json_id(), rs[2].json_id()
    assert pl.id_seq(id2) == pl.id_seq(id1) + 1  # same topic: consecutive
    assert rs[1].body.strip() == b"ok"
    assert rs[4].json()["messages_in"] == 2
    assert [(m.id, m.data) for m in msgs] == [(id1, "first"), (id2, "second\nline")]


def test_head_healthz(pushletd):
    srv = pushletd()
    with RawHTTP(srv.addr) as c:
        r = c.request("HEAD", "/healthz")
        assert r.status == 200
        assert r.body == b""
        # no body bytes follow a HEAD response: the next response parses cleanly
        r2 = c.request("GET", "/healthz")
        assert r2.status == 200 and r2.body.strip() == b"ok"
        cl = r.header("content-length")
        if cl is not None:
            assert int(cl) == len(r2.body)


@pytest.mark.parametrize("path", ["/publish?topic=t", "/events", "*", "/send"])
def test_options_cors_preflight(pushletd, path):
    srv = pushletd()
    r = srv.request("OPTIONS", path, headers={
        "Origin": "https://example.com",
        "Access-Control-Request-Method": "POST" if path != "/events" else "GET",
        "Access-Control-Request-Headers": "content-type"})
    assert r.status == 204, r
    assert r.body == b""
    methods = {m.strip().upper() for m in (r.header("access-control-allow-methods") or "").split(",")}
    assert ("GET" if path == "/events" else "POST") in methods, r.headers
    assert r.header("access-control-allow-origin") == "*"


def test_cors_origin_flag_applies_to_preflight(pushletd):
    srv = pushletd("--cors-origin", "https://app.example.org")
    r = srv.request("OPTIONS", "/publish?topic=t", headers={
        "Origin": "https://app.example.org", "Access-Control-Request-Method": "POST"})
    assert r.status == 204
    assert r.header("access-control-allow-origin") == "https://app.example.org"


def test_chunked_request_body_to_publish(pushletd):
    srv = pushletd()

    def action():
        body = (b"5\r\nhello\r\n"
                b"1;ext=1\r\n \r\n"          # a chunk extension is legal and ignored
                b"A\r\nchunked-wo\r\n"
                b"3\r\nrld\r\n"
                b"0\r\nX-Trailer: yes\r\n\r\n")  # a trailer section is legal too
        req = (b"POST /publish?topic=c HTTP/1.1\r\nHost: x\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")
        with RawHTTP(srv.addr) as c:
            c.send(req)
            for i in range(0, len(body), 7):   # dribble it in small writes
                c.send(body[i:i + 7])
                time.sleep(0.005)
            r = c.read_response()
            assert r.status == 200, r
            # the connection is still in sync after the chunked body
            r2 = c.request("GET", "/healthz")
            assert r2.status == 200
            return r.json_id()

    mid, msgs = with_subscriber(srv, "c", action, 1)
    assert [(m.id, m.data) for m in msgs] == [(mid, "hello chunked-world")]


def test_expect_100_continue(pushletd):
    srv = pushletd()

    def action():
        with RawHTTP(srv.addr) as c:
            c.send(b"POST /publish?topic=e HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n"
                   b"Expect: 100-continue\r\n\r\n")
            interim = c.read_response(allow_interim=True, timeout=5)
            assert interim.status == 100, f"expected 100 Continue, got {interim}"
            c.send(b"continued")
            r = c.read_response()
            assert r.status == 200, r
            return r.json_id()

    mid, msgs = with_subscriber(srv, "e", action, 1)
    assert [(m.id, m.data) for m in msgs] == [(mid, "continued")]


def test_expect_100_continue_with_too_large_body_gets_413_at_once(pushletd):
    """RFC 9110 10.1.1: the final status is known from the head, so no 100 is sent."""
    srv = pushletd("--max-message-size", "1024")
    with RawHTTP(srv.addr) as c:
        c.send(b"POST /publish?topic=e HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
               b"Expect: 100-continue\r\n\r\n")
        r = c.read_response(allow_interim=True, timeout=5)
    assert r.status == 413, r
    assert srv.get("/healthz").status == 200


def test_http_1_0_request(pushletd):
    srv = pushletd()
    with RawHTTP(srv.addr) as c:
        c.send(b"GET /healthz HTTP/1.0\r\n\r\n")
        r = c.read_response()
        assert r.status == 200 and r.body.strip() == b"ok"
        # without keep-alive an HTTP/1.0 connection is closed after the response
        assert c.wait_closed(timeout=5) == b""


def test_keepalive_timeout_closes_idle_connection(pushletd):
    srv = pushletd("--keepalive-timeout", "1")
    with RawHTTP(srv.addr, timeout=10) as c:
        assert c.request("GET", "/healthz").status == 200
        t0 = time.monotonic()
        assert c.wait_closed(timeout=2 + 3 * pl.time_scale()) == b""
        elapsed = time.monotonic() - t0
    assert 0.7 <= elapsed <= 1 + 3 * pl.time_scale(), f"closed after {elapsed:.2f}s"


def test_sse_stream_is_not_closed_by_keepalive_timeout(pushletd):
    srv = pushletd("--keepalive-timeout", "1", "--header-timeout", "1")

    async def main():
        s = await AsyncSSE(srv.addr, events_path("long")).connect()
        await asyncio.sleep(2.5)  # longer than both timeouts: the stream must survive
        mid = await asyncio.to_thread(srv.publish, "long", "still-open")
        await s.wait_messages(1, 10)
        assert [(e.id, e.data) for e in s.messages()] == [(mid, "still-open")]
        await s.close()

    run_async(main(), 30)


def test_configuration_by_environment(pushletd):
    srv = pushletd(env={"PUSHLET_MAX_MESSAGE_SIZE": "100", "PUSHLET_HEARTBEAT": "0.3",
                        "PUSHLET_CORS_ORIGIN": "https://env.example"})
    assert srv.request("POST", "/publish?topic=t", body=b"x" * 100).status == 200
    r = pl.http_request(srv.addr, "POST", "/publish?topic=t", body=b"x" * 101)
    assert r.status == 413, r

    async def main():
        s = await AsyncSSE(srv.addr, events_path("t")).connect()
        assert s.response.header("access-control-allow-origin") == "https://env.example"
        await s.wait_for(lambda s: len(s.parser.comments) >= 2, 5, "heartbeats")
        await s.close()

    run_async(main(), 20)


def test_flag_overrides_environment(pushletd):
    srv = pushletd("--max-message-size", "200", env={"PUSHLET_MAX_MESSAGE_SIZE": "100"})
    assert srv.request("POST", "/publish?topic=t", body=b"x" * 150).status == 200
