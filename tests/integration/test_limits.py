"""Every configured limit, hit once: the client gets the documented error and /stats counts it.

Covers the counters added with message IDs and history (topics_rejected, rate_limited,
oversize_rejected, timeouts, history_*) and the limits added with them (--max-body-size,
--max-subscribes-per-sec, --close-timeout, --history-memory). What other files already check
(the 408 timing, the 413 on every publish endpoint, every 1009 variant, the SSE 400 for too many
topics) is not repeated: here each limit is hit once and its counter is checked exactly, the
held connections keep working, and what was refused is not delivered.
"""

import json
import re
import time
import urllib.parse
import zlib

import pytest

import pushlet_testlib as pl
from pushlet_testlib import OP_BINARY, OP_CLOSE, OP_TEXT, RawHTTP, RawWS, events_path

S = pl.time_scale()
ID_RE = re.compile(r"^([0-9a-z]{1,13})-(\d+)$")


# --------------------------------------------------------------------------------------------
# Helpers


def check_id(mid) -> str:
    assert isinstance(mid, str) and ID_RE.match(mid), f"not an EPOCH-SEQ message ID: {mid!r}"
    return mid


def seq(mid: str) -> int:
    return int(check_id(mid).rsplit("-", 1)[1])


def publish(srv, topic, data, conn=None) -> str:
    """POST /publish (on `conn` if given, a keep-alive RawHTTP); assert 200; return the ID."""
    if isinstance(data, str):
        data = data.encode()
    path = "/publish?" + urllib.parse.urlencode({"topic": topic})
    r = conn.request("POST", path, body=data) if conn else srv.request("POST", path, body=data)
    assert r.status == 200, f"publish failed: {r.status} {r.body[:300]!r}"
    return check_id(r.json().get("id"))


def stat_after(srv, key, expected, timeout=5.0):
    """Poll /stats until stats[key] == expected (counters may move just after the answer the
    client saw, e.g. when the connection is released); return the stats."""
    last = {}

    def ok():
        nonlocal last
        last = srv.stats()
        return last if last[key] == expected else None

    try:
        return pl.wait_until(ok, timeout * S, 0.02, f"{key} == {expected}")
    except pl.Timeout:
        raise AssertionError(f"/stats {key} is {last.get(key)!r}, expected {expected}: "
                             f"{last}") from None


def stats_stay(srv, key, expected, duration=0.3):
    """stats[key] stays at `expected` for `duration` seconds (nothing counted twice, late)."""
    end = time.monotonic() + duration
    while True:
        st = srv.stats()
        assert st[key] == expected, f"/stats {key} is {st[key]}, expected {expected}: {st}"
        if time.monotonic() >= end:
            return st
        time.sleep(0.05)


def ws_open(srv, path="/ws", topics=(), **kw) -> RawWS:
    """A raw WebSocket: the connected frame and one subscribed reply per topic are consumed."""
    c = RawWS(srv.addr, path, **kw)
    obj = c.recv_json(5 * S)
    assert obj.get("event") == "connected", obj
    for t in topics:
        obj = c.recv_json(5 * S)
        assert obj.get("event") == "subscribed" and obj.get("topic") == t, obj
        check_id(obj.get("id"))
    return c


def ws_pong_next(c):
    """Nothing is pending on this connection: a ping command's pong is the very next reply."""
    c.send_cmd("ping")
    obj = c.recv_json(5 * S)
    assert obj == {"event": "pong"}, f"expected pong, got {obj}"


def pad_ping(size: int) -> bytes:
    """A ping command of exactly `size` bytes."""
    base = b'{"action":"ping","pad":""}'
    return base[:-2] + b"x" * (size - len(base)) + b'"}'


def server_close_frame(c, timeout=5.0):
    """Read frames until the server's close frame; return it."""
    deadline = time.monotonic() + timeout * S
    while True:
        f = c.recv_frame(max(0.0, deadline - time.monotonic()))
        if f.opcode == OP_CLOSE:
            return f


def sse_read_events(c: RawHTTP, parser, events, pred, timeout, what):
    """Feed a raw SSE connection's bytes to `parser` until pred(events) holds."""
    deadline = time.monotonic() + timeout * S
    while not pred(events):
        if time.monotonic() > deadline:
            raise pl.Timeout(f"timed out waiting for {what}; events: {events[-5:]!r}")
        if not c._fill(deadline):
            raise pl.ConnectionClosed(f"stream ended while waiting for {what}: {events[-5:]!r}")
        events += parser.feed(c.buf)
        c.buf = b""
    return events


def sse_open(srv, path, headers=None):
    """A raw SSE subscriber: head checked (200), returns (conn, parser, events so far)."""
    c = RawHTTP(srv.addr, timeout=10 * S)
    c.send(pl.build_request("GET", path, b"", {"Accept": "text/event-stream", **(headers or {})},
                            srv.addr))
    head = c.read_until(b"\r\n\r\n", time.monotonic() + 10 * S)
    assert b" 200 " in head.split(b"\r\n")[0], head
    parser = pl.SSEParser()
    events = parser.feed(c.buf)
    c.buf = b""
    sse_read_events(c, parser, events, lambda ev: any(e.event == "connected" for e in ev), 5,
                    "the connected event")
    return c, parser, events


# --------------------------------------------------------------------------------------------
# --max-connections: WebSocket upgrades are refused like any request, and counted exactly


def test_max_connections_refuses_websocket_upgrade_and_counts_each(pushletd):
    srv = pushletd("--max-connections", "2")
    held = [ws_open(srv, "/ws?topic=a", ["a"]) for _ in range(2)]
    rejected = 0
    for _ in range(2):
        c = RawWS(srv.addr, "/ws?topic=a", expect=None)
        assert c.response.status == 503, (c.response.status, c.response.headers)
        assert c.response.header("sec-websocket-accept") is None
        assert c.wait_eof(5 * S) == b""
        c.close()
        rejected += 1
    # free a slot. Until the server noticed, and while the previous probe's connection is
    # not yet released on its side, requests are refused too: each refused probe counts.
    held[0].close()
    probes = []

    def when_free(method, path, body=b""):
        def attempt():
            r = srv.request(method, path, body=body)
            probes.append(r.status)
            return r if r.status == 200 else None
        return pl.wait_until(attempt, 5 * S, 0.05, f"a free connection slot for {path}")

    mid = check_id(when_free("POST", "/publish?topic=a", b"after the refusals").json()["id"])
    obj = held[1].recv_json(5 * S)
    assert (obj["id"], obj["data"]) == (mid, "after the refusals"), obj
    st = when_free("GET", "/stats").json()
    assert set(probes) <= {200, 503}, probes
    rejected += probes.count(503)
    assert st["connections_rejected"] == rejected, (st, probes)
    assert st["ws_connections"] == 1, st
    held[1].close()


# --------------------------------------------------------------------------------------------
# --max-topics: SSE 400, WebSocket handshake 400, WebSocket command error; each counted


def test_max_topics_rejections_counted(pushletd):
    srv = pushletd("--max-topics", "2")
    assert srv.stats()["topics_rejected"] == 0
    # SSE: 400 with a message saying why
    r = srv.get(events_path("a", "b", "c"))
    assert r.status == 400 and b"too many topics" in r.body.lower(), r
    stat_after(srv, "topics_rejected", 1)
    # at the limit is fine, and not counted
    c, parser, events = sse_open(srv, events_path("a", "b"))
    c.close()
    # WebSocket, topics in the URL: the handshake is refused
    w = RawWS(srv.addr, "/ws?topic=a&topic=b&topic=c", expect=400)
    w.close()
    stat_after(srv, "topics_rejected", 2)
    # WebSocket command: an error reply naming the topic; the connection lives on
    w = ws_open(srv, "/ws?topic=a&topic=b", ["a", "b"])
    w.send_cmd("subscribe", "c")
    obj = w.recv_json(5 * S)
    assert (obj.get("event"), obj.get("reason"), obj.get("topic")) == \
        ("error", "too_many_topics", "c") and obj.get("data"), obj
    stat_after(srv, "topics_rejected", 3)
    # a topic already held is no new topic: subscribed, not counted
    w.send_cmd("subscribe", "a")
    obj = w.recv_json(5 * S)
    assert (obj.get("event"), obj.get("topic")) == ("subscribed", "a"), obj
    ws_pong_next(w)
    stats_stay(srv, "topics_rejected", 3)
    # nothing of the refused topic arrives
    publish(srv, "c", "refused topic")
    mid = publish(srv, "b", "held topic")
    obj = w.recv_json(5 * S)
    assert (obj.get("topic"), obj.get("id")) == ("b", mid), obj
    w.close()


# --------------------------------------------------------------------------------------------
# --max-message-size: 413 on /publish, close 1009 for a client message; both counted


def test_max_message_size_rejections_counted(pushletd):
    srv = pushletd("--max-message-size", "1000")
    sub = ws_open(srv, "/ws?topic=t", ["t"])
    # the limit itself passes, uncounted
    mid = publish(srv, "t", b"a" * 1000)
    obj = sub.recv_json(5 * S)
    assert obj["id"] == mid and len(obj["data"]) == 1000
    assert srv.stats()["oversize_rejected"] == 0
    # one byte over: 413, counted, not delivered
    r = srv.request("POST", "/publish?topic=t", body=b"b" * 1001)
    assert r.status == 413, r
    st = stat_after(srv, "oversize_rejected", 1)
    assert st["messages_in"] == 1, st
    # a client message one byte over the limit: close 1009, counted
    victim = ws_open(srv)
    victim.send_frame(OP_TEXT, pad_ping(1000))   # at the limit: answered
    assert victim.recv_json(5 * S) == {"event": "pong"}
    try:
        victim.send_watching(pl.ws_frame(OP_TEXT, pad_ping(1001)))
    except (BrokenPipeError, ConnectionResetError):
        pass
    f = server_close_frame(victim)
    assert f.close_code == 1009, f
    victim.send_close(1009)
    victim.wait_eof(10 * S)
    victim.close()
    stat_after(srv, "oversize_rejected", 2)
    # the subscriber saw only the accepted message
    ws_pong_next(sub)
    sub.close()


# --------------------------------------------------------------------------------------------
# --max-body-size: the HTTP body bound, separate from the message size


def form_body(message_chars: int, total: int) -> bytes:
    """A /send form body of exactly `total` bytes whose message decodes to message_chars 'A's
    (each sent percent-encoded, 3 bytes), padded with an ignored field."""
    body = b"topic=f&message=" + b"%41" * message_chars + b"&pad="
    assert len(body) <= total, (len(body), total)
    return body + b"x" * (total - len(body))


FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def test_max_body_size_413_counted(pushletd):
    srv = pushletd("--max-message-size", "1000", "--max-body-size", "2000")
    sub = ws_open(srv, "/ws?topic=f", ["f"])
    # a body at the bound whose message fits: accepted (the body may exceed the message size)
    r = srv.request("POST", "/send", body=form_body(600, 2000), headers=FORM)
    assert r.status == 200, r
    obj = sub.recv_json(5 * S)
    assert obj["data"] == "A" * 600, obj
    assert srv.stats()["oversize_rejected"] == 0
    # one byte over the body bound: 413, though the message would fit
    r = srv.request("POST", "/send", body=form_body(600, 2001), headers=FORM)
    assert r.status == 413, r
    stat_after(srv, "oversize_rejected", 1)
    # an announced body over the bound is refused from its head, without waiting for it
    with RawHTTP(srv.addr, timeout=10 * S) as c:
        c.send(b"POST /publish?topic=f HTTP/1.1\r\nHost: x\r\nContent-Length: 2001\r\n\r\n")
        r = c.read_response(timeout=3 * S)
        assert r.status == 413, r
    stat_after(srv, "oversize_rejected", 2)
    # a chunked body growing past the bound
    with RawHTTP(srv.addr, timeout=10 * S) as c:
        c.send(b"POST /send HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
               b"Content-Type: application/x-www-form-urlencoded\r\n\r\n")
        body = form_body(600, 2100)
        c.send_watching(b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 500]), body[i:i + 500])
                                 for i in range(0, len(body), 500)) + b"0\r\n\r\n")
        r = c.read_response(timeout=5 * S)
        assert r.status == 413, r
    stat_after(srv, "oversize_rejected", 3)
    ws_pong_next(sub)      # nothing refused was delivered
    sub.close()


def test_max_body_size_default_is_three_times_message_size_plus_1024(pushletd):
    srv = pushletd("--max-message-size", "1000")
    # a message at the size limit, fully percent-encoded, fits the default body bound (4024)
    r = srv.request("POST", "/send", body=form_body(1000, 4024), headers=FORM)
    assert r.status == 200, r
    r = srv.request("POST", "/send", body=form_body(1000, 4025), headers=FORM)
    assert r.status == 413, r
    stat_after(srv, "oversize_rejected", 1)


# --------------------------------------------------------------------------------------------
# --max-subscribes-per-sec


def test_subscribe_rate_limit(pushletd):
    srv = pushletd("--max-subscribes-per-sec", "5")
    c = ws_open(srv)
    # 15 subscribes in one write, handled in one go: 5 pass, 10 are refused
    c.send(b"".join(pl.ws_frame(OP_TEXT, json.dumps({"action": "subscribe",
                                                      "topic": f"r{i}"}).encode())
                    for i in range(15)))
    replies = [c.recv_json(5 * S) for _ in range(15)]
    assert [(o.get("event"), o.get("topic")) for o in replies[:5]] == \
        [("subscribed", f"r{i}") for i in range(5)], replies
    for i, o in enumerate(replies[5:], 5):
        assert (o.get("event"), o.get("reason"), o.get("topic")) == \
            ("error", "rate_limited", f"r{i}") and o.get("data"), o
    stat_after(srv, "rate_limited", 10)
    # other commands are not limited
    ws_pong_next(c)
    # a refused subscription subscribed to nothing
    publish(srv, "r7", "refused")
    mid = publish(srv, "r4", "accepted")
    obj = c.recv_json(5 * S)
    assert (obj["topic"], obj["id"]) == ("r4", mid), obj
    st = srv.stats()
    assert st["subscriptions"] == 5, st
    # a second later the budget is back
    time.sleep(1.2)
    c.send_cmd("subscribe", "r7")
    obj = c.recv_json(5 * S)
    assert (obj.get("event"), obj.get("topic")) == ("subscribed", "r7"), obj
    mid = publish(srv, "r7", "now allowed")
    obj = c.recv_json(5 * S)
    assert (obj["topic"], obj["id"], obj["data"]) == ("r7", mid, "now allowed"), obj
    # unsubscribes draw on the same budget
    time.sleep(1.2)
    topics = ["r0", "r1", "r2", "r3", "r4", "r7"]
    c.send(b"".join(pl.ws_frame(OP_TEXT, json.dumps({"action": "unsubscribe",
                                                      "topic": t}).encode()) for t in topics))
    replies = [c.recv_json(5 * S) for _ in topics]
    assert [(o.get("event"), o.get("topic")) for o in replies[:5]] == \
        [("unsubscribed", t) for t in topics[:5]], replies
    assert (replies[5].get("event"), replies[5].get("reason"), replies[5].get("topic")) == \
        ("error", "rate_limited", "r7"), replies[5]
    stat_after(srv, "rate_limited", 11)
    st = srv.stats()
    assert st["subscriptions"] == 1, st   # r7 is still held
    c.close()


def test_subscribe_rate_limit_is_per_connection(pushletd):
    srv = pushletd("--max-subscribes-per-sec", "3")
    a, b = ws_open(srv), ws_open(srv)
    for c in (a, b):
        c.send(b"".join(pl.ws_frame(OP_TEXT, json.dumps({"action": "subscribe",
                                                          "topic": f"p{i}"}).encode())
                        for i in range(4)))
    for c in (a, b):
        replies = [c.recv_json(5 * S) for _ in range(4)]
        assert [o.get("event") for o in replies] == ["subscribed"] * 3 + ["error"], replies
        assert replies[3].get("reason") == "rate_limited", replies
    stat_after(srv, "rate_limited", 2)
    a.close()
    b.close()


# --------------------------------------------------------------------------------------------
# --header-timeout and --keepalive-timeout: the connection goes, and /stats counts it


def test_header_timeout_408_counted(pushletd):
    srv = pushletd("--header-timeout", "1", "--keepalive-timeout", "30")
    assert srv.stats()["timeouts"] == 0
    with RawHTTP(srv.addr, timeout=10 * S) as c:
        t0 = time.monotonic()
        c.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")   # the head never ends
        r = c.read_response(timeout=(1 + 3) * S)
        elapsed = time.monotonic() - t0
    assert r.status == 408, r
    assert elapsed >= 0.8, f"408 after {elapsed:.2f}s"
    stat_after(srv, "timeouts", 1)
    # a connection that sends nothing at all is closed by the same deadline, and counted
    with RawHTTP(srv.addr, timeout=10 * S) as c:
        t0 = time.monotonic()
        got = c.wait_closed(timeout=(1 + 3) * S)
        elapsed = time.monotonic() - t0
    assert got == b"" or got.startswith(b"HTTP/1.1 408"), got[:100]
    assert elapsed >= 0.8, f"closed after {elapsed:.2f}s"
    stat_after(srv, "timeouts", 2)
    # a prompt request is not
    assert srv.get("/healthz").status == 200
    stats_stay(srv, "timeouts", 2)


def test_keepalive_timeout_counted_streams_exempt(pushletd):
    srv = pushletd("--keepalive-timeout", "1", "--header-timeout", "30")
    # a WebSocket and an SSE stream idle past the timeout: neither is touched
    w = ws_open(srv, "/ws?topic=k", ["k"])
    sse, parser, events = sse_open(srv, events_path("k"))
    with RawHTTP(srv.addr, timeout=10 * S) as c:
        assert c.request("GET", "/healthz").status == 200
        t0 = time.monotonic()
        assert c.wait_closed(timeout=(1 + 3) * S) == b""
        elapsed = time.monotonic() - t0
    assert 0.7 <= elapsed <= 1 + 3 * S, f"idle connection closed after {elapsed:.2f}s"
    stat_after(srv, "timeouts", 1)
    time.sleep(0.6)
    st = stats_stay(srv, "timeouts", 1)
    assert st["ws_connections"] == 1 and st["sse_connections"] == 1, st
    mid = publish(srv, "k", "still open")
    assert w.recv_json(5 * S)["id"] == mid
    sse_read_events(sse, parser, events, lambda ev: any(e.id == mid for e in ev), 5, mid)
    w.close()
    sse.close()


# --------------------------------------------------------------------------------------------
# --close-timeout


@pytest.mark.parametrize("close_timeout", [1, 3])
def test_close_timeout_cuts_websocket_that_never_answers_close(pushletd, close_timeout):
    srv = pushletd("--close-timeout", str(close_timeout))
    c = ws_open(srv)
    # an oversized message makes the server close (1009); this client never answers
    try:
        c.send_watching(pl.ws_frame(OP_BINARY, pad_ping(70000)))   # default limit: 65536
    except (BrokenPipeError, ConnectionResetError):
        pass
    f = server_close_frame(c)
    t0 = time.monotonic()
    assert f.close_code == 1009, f
    # the server holds the connection (waiting for our close) until the timeout, then cuts it
    gone = pl.wait_until(lambda: srv.stats()["ws_connections"] == 0 and time.monotonic(),
                         close_timeout + 5 * S, 0.02, "the WebSocket to be released")
    elapsed = gone - t0
    assert close_timeout - 0.5 <= elapsed <= close_timeout + 1.0 * S, \
        f"released {elapsed:.2f}s after its close frame (--close-timeout {close_timeout})"
    stat_after(srv, "timeouts", 1)
    # the client sees the end of the connection too (FIN or reset), and nothing after the close
    rest = c.wait_closed(2 * S)
    assert rest == b"", f"{len(rest)} bytes after the close frame: {rest[:60]!r}"
    c.close()


def test_close_timeout_not_waited_when_client_answers_close(pushletd):
    """A client that answers the server's close frame (and keeps TCP open) is released at
    once, not after --close-timeout, and is no timeout. The close comes from a compressed
    message that inflates past --max-message-size, counted as oversize."""
    srv = pushletd("--close-timeout", "5")
    c = RawWS(srv.addr, "/ws", headers={"Sec-WebSocket-Extensions": "permessage-deflate"})
    assert (c.response.header("sec-websocket-extensions") or "").startswith("permessage-deflate")
    assert c.recv_json(5 * S).get("event") == "connected"
    z = zlib.compressobj(6, zlib.DEFLATED, -15)
    bomb = z.compress(pad_ping(1 << 20)) + z.flush(zlib.Z_SYNC_FLUSH)
    c.send_frame(OP_TEXT, bomb[:-4], rsv=4)     # 1 MiB once inflated, ~1 KiB on the wire
    f = server_close_frame(c)
    t0 = time.monotonic()
    assert f.close_code == 1009, f
    c.send_close(1009)
    gone = pl.wait_until(lambda: srv.stats()["ws_connections"] == 0 and time.monotonic(),
                         5 + 5 * S, 0.02, "the WebSocket to be released")
    assert gone - t0 < 1.0 * S, f"released {gone - t0:.2f}s after the close handshake completed"
    st = stat_after(srv, "oversize_rejected", 1)
    assert st["timeouts"] == 0, st
    assert c.wait_closed(2 * S) == b""
    c.close()


def test_close_timeout_bounds_linger_after_http_error(pushletd):
    """After an error answer the server drains input (no RST over the answer) for at most
    --close-timeout, even when the client never closes its side."""
    srv = pushletd("--close-timeout", "3")
    with RawHTTP(srv.addr, timeout=10 * S) as c:
        c.send(b"GARBAGE\r\n\r\n")
        r = c.read_response(timeout=5 * S)
        assert r.status == 400, r
        t0 = time.monotonic()
        # the client keeps its side open and silent; /stats counts itself as 1 connection
        gone = pl.wait_until(lambda: srv.stats()["connections"] == 1 and time.monotonic(),
                             3 + 5 * S, 0.02, "the lingering connection to be released")
        elapsed = gone - t0
        assert 2.5 <= elapsed <= 3 + 1.0 * S, f"released after {elapsed:.2f}s (--close-timeout 3)"


# --------------------------------------------------------------------------------------------
# --history-memory


@pytest.mark.timeout(120)
def test_history_memory_budget_evicts_globally_oldest(pushletd):
    budget = 256 * 1024
    n_topics, per_topic, size = 100, 10, 1024    # 1 MiB of data: 4 x the budget
    srv = pushletd("--history-memory", str(budget))
    ids = {}
    with RawHTTP(srv.addr, timeout=10 * S) as conn:
        for t in range(n_topics):
            ids[f"h{t}"] = [publish(srv, f"h{t}", f"h{t}-{i}:".encode().ljust(size, b"."), conn)
                            for i in range(per_topic)]
            if t % 10 == 9:
                st = srv.stats()
                assert st["history_bytes"] <= budget, (t, st)
    for t, mids in ids.items():
        assert [seq(m) for m in mids] == list(range(seq(mids[0]), seq(mids[0]) + per_topic)), \
            (t, mids)
    st = srv.stats()
    total = n_topics * per_topic
    assert 0 < st["history_bytes"] <= budget, st
    assert st["history_evicted"] > 0, st
    # the count and age bounds are far away: only the budget evicted
    assert st["history_messages"] + st["history_evicted"] == total, st
    assert 0 < st["history_messages"] < total, st

    # the newest topic is still whole: a resume from its first message gets the other nine
    last = f"h{n_topics - 1}"
    c, parser, events = sse_open(srv, events_path(last), headers={"Last-Event-ID": ids[last][0]})
    sse_read_events(c, parser, events, lambda ev: any(e.id == ids[last][-1] for e in ev), 5,
                    "the replay")
    msgs = [e for e in events if e.event != "connected"]
    assert [(e.event, e.id) for e in msgs] == [("message", m) for m in ids[last][1:]], msgs
    c.close()

    # the oldest topic was evicted: a resume from its first message gets a gap first
    c, parser, events = sse_open(srv, events_path("h0"), headers={"Last-Event-ID": ids["h0"][0]})
    sse_read_events(c, parser, events, lambda ev: any(e.event == "gap" for e in ev), 5, "gap")
    live = publish(srv, "h0", "live")
    sse_read_events(c, parser, events, lambda ev: any(e.id == live for e in ev), 5, "live")
    msgs = [e for e in events if e.event != "connected"]
    assert msgs[0].event == "gap", msgs
    assert json.loads(msgs[0].data) == {"topic": "h0", "reason": "history_expired"}, msgs[0]
    assert msgs[0].id is not None, msgs[0]
    # then what history still holds of h0 (in order, after the position), then live
    replay = [e.id for e in msgs[1:-1]]
    assert all(e.event == "message" for e in msgs[1:]), msgs
    assert replay == ids["h0"][len(ids["h0"]) - len(replay):], (replay, ids["h0"])
    assert len(replay) < per_topic - 1, "nothing of h0 was evicted"
    assert (msgs[-1].id, msgs[-1].data) == (live, "live"), msgs[-1]
    c.close()

    # the same for a WebSocket resume
    w = ws_open(srv)
    w.send_cmd("subscribe", "h1", since=ids["h1"][0])
    obj = w.recv_json(5 * S)
    assert (obj.get("event"), obj.get("topic")) == ("subscribed", "h1"), obj
    obj = w.recv_json(5 * S)
    assert (obj.get("event"), obj.get("topic")) == ("gap", "h1"), obj
    assert json.loads(obj["data"]) == {"topic": "h1", "reason": "history_expired"}, obj
    live = publish(srv, "h1", "live")
    got = []
    while not got or got[-1].get("id") != live:
        got.append(w.recv_json(5 * S))
    assert [o["id"] for o in got[:-1]] == ids["h1"][per_topic - len(got) + 1:], got
    w.close()

    st = srv.stats()
    assert st["history_bytes"] <= budget, st
    assert st["gaps"] >= 2 and st["resumes"] >= 3, st


@pytest.mark.timeout(120)
def test_history_memory_budget_releases_topics(pushletd):
    """Many topics of one message each: the budget bounds them too. A topic whose history was
    evicted and that has no subscriber is forgotten (the topics gauge follows), and it comes
    back with a sequence above every position issued before."""
    budget = 128 * 1024
    n_topics = 5000
    srv = pushletd("--history-memory", str(budget))
    sub = ws_open(srv, "/ws?topic=m0", ["m0"])       # one topic keeps a subscriber
    first = {}
    with RawHTTP(srv.addr, timeout=10 * S) as conn:
        for t in range(n_topics):
            first[t] = publish(srv, f"m{t}", b"x" * 100, conn)
    st = srv.stats()
    assert 0 < st["history_bytes"] <= budget, st
    assert st["history_messages"] + st["history_evicted"] == n_topics, st
    assert st["history_evicted"] > 0, st
    # topics: those with history, plus m0 (subscribed; its message is long evicted)
    assert st["topics"] == st["history_messages"] + 1, st
    assert st["subscriptions"] == 1, st
    # a forgotten topic comes back above every position issued so far
    again = publish(srv, "m1", "again")
    assert seq(again) > max(seq(m) for m in first.values()), (first[1], again)
    # the subscribed one kept its sequence
    mid = publish(srv, "m0", "still counted")
    assert seq(mid) == seq(first[0]) + 1, (first[0], mid)
    obj = sub.recv_json(5 * S)
    assert obj["id"] == first[0]
    obj = sub.recv_json(5 * S)
    assert (obj["id"], obj["data"]) == (mid, "still counted"), obj
    sub.close()
