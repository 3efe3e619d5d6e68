"""Connection and subscribe auth through the embedding hooks (issue #6), with real clients,
against tests/hooks/hook_host in both delivery modes: the event handler on the loop thread
("callback") and the pull queue drained by the host's own poll() thread ("queue"); a few tests
also run "split" (the handler takes the requests, the queue the rest).

Covered: the request's fields; synchronous and deferred (another thread) allow/deny; SSE
401/403/429 with the reason as body; WebSocket upgrades refused with a status; denied topics
(SSE and WebSocket URL: the whole request fails; WebSocket commands: an error reply); resumes
(Last-Event-ID, ?last_event_id=, since) asked like any subscription; the timeout (503,
auth_timeouts); answers after the client left, twice, or after the timeout (ENOENT) with nothing
left behind; JWT and hook together.
"""

import base64
import hashlib
import hmac
import json
import time
import urllib.parse

import pytest

import pushlet_testlib as pl
from hook_host import SSE, WS, S, SSEStream, hook_host, wait_idle, ws_open  # noqa: F401
from pushlet_testlib import events_path

MODES = ["callback", "queue"]
ENOENT = -11
FORBIDDEN_DEFAULT = "not allowed to subscribe to this topic"


def answers_ok(host, events, via):
    """Every request among `events` was answered once, with rc 0, by the thread that got it."""
    for e in events:
        a = host.answer_for(e["request"])
        assert (a["rc"], a["from"]) == (0, via), (e, a)


def via_of(mode, kind):
    if mode == "callback" or (mode == "split" and kind.startswith("auth")):
        return "handler"
    return "queue"


@pytest.mark.parametrize("mode", MODES + ["split"])
def test_sse_request_fields_and_lifecycle(hook_host, mode):
    h = hook_host(mode)
    h.command("allow-user-from-header X-User")
    h.command("metadata plan=gold; région=eu")
    s = SSEStream(h.addr, events_path("news", "chat/1") + "&x=%20y",
                  {"X-User": "alice", "Cookie": "sid=42", "Authorization": "Basic Zm9vOmJhcg=="})
    assert s.status == 200, s.body
    e = h.wait_event("auth_connect")
    conn = e["conn"]
    assert conn > 0 and e["request"] > 0
    assert e["transport"] == SSE and e["via"] == via_of(mode, "auth")
    assert (e["method"], e["path"]) == ("GET", "/events")
    assert e["query"] == "topic=news&topic=chat%2F1&x=%20y", "raw query, no '?'"
    assert e["remote"] == "%s:%d" % s.c.sock.getsockname()
    assert e["user"] == "" and e["metadata"] == ""
    assert ["X-User", "alice"] in e["headers"] and ["Cookie", "sid=42"] in e["headers"]
    assert e["named"] == {"X-User": "alice", "Authorization": "Basic Zm9vOmJhcg==",
                          "Cookie": "sid=42", "Last-Event-ID": None}
    assert e["header_at_end"] == 0, "pushlet_event_header_at(count) must return 0"
    subs = h.wait(lambda: len(h.of("auth_subscribe", conn)) == 2 and h.of("auth_subscribe", conn))
    assert sorted(x["topic"] for x in subs) == ["chat/1", "news"]
    for x in subs:
        assert (x["user"], x["metadata"], x["transport"]) == ("alice", "plan=gold; région=eu", SSE)
        assert x["request"] not in (0, e["request"])
    assert subs[0]["request"] != subs[1]["request"]
    answers_ok(h, [e] + subs, via_of(mode, "auth"))

    c = h.wait_event("connected", conn=conn)
    assert (c["user"], c["metadata"], c["transport"], c["request"]) == (
        "alice", "plan=gold; région=eu", SSE, 0)
    assert c["via"] == via_of(mode, "connected")
    h.wait(lambda: len(h.of("subscribed", conn)) == 2)
    assert sorted(x["topic"] for x in h.of("subscribed", conn)) == ["chat/1", "news"]
    kinds = [x["ev"] for x in h.of(conn=conn)]
    assert kinds.index("connected") > max(i for i, k in enumerate(kinds) if k.startswith("auth"))
    assert h.count("news") == 1 and h.count("chat/1") == 1

    # The stream works: a message published to one of its topics arrives.
    r = pl.http_request(h.addr, "POST", "/publish?topic=news", b"hello")
    assert r.status == 200
    ev = s.next_event()
    assert (ev.event, ev.data) == ("message", "hello")

    s.close()
    d = h.wait_event("disconnected", conn=conn)
    unsubs = h.of("unsubscribed", conn)
    assert sorted(x["topic"] for x in unsubs) == ["chat/1", "news"]
    assert all(x["text"] == "disconnected" for x in unsubs)
    assert d["user"] == "alice" and d["text"] != ""
    assert [x["ev"] for x in h.of(conn=conn)][-1] == "disconnected"
    wait_idle(h)
    assert h.count("news") == 0


@pytest.mark.parametrize("mode", MODES)
def test_ws_request_fields_and_lifecycle(hook_host, mode):
    h = hook_host(mode)
    h.command("allow-user-from-header X-User")
    c = ws_open(h.addr, "/ws?topic=a", headers={"X-User": "bob"})
    c.handshake_done(["a"])
    e = h.wait_event("auth_connect")
    assert (e["transport"], e["path"], e["query"], e["user"]) == (WS, "/ws", "topic=a", "")
    assert e["named"]["X-User"] == "bob"
    assert any(k.lower() == "sec-websocket-key" for k, _ in e["headers"])
    sub = h.wait_event("auth_subscribe", conn=e["conn"])
    assert (sub["topic"], sub["user"], sub["transport"]) == ("a", "bob", WS)
    h.wait_event("connected", conn=e["conn"], user="bob", transport=WS)
    h.wait_event("subscribed", conn=e["conn"], topic="a")

    # A subscribe command is asked too; an unsubscribe command is reported.
    c.send_cmd("subscribe", "b")
    assert c.recv_json() == pl.subscribed("b")
    sub_b = h.wait_event("auth_subscribe", conn=e["conn"], topic="b")
    answers_ok(h, [e, sub, sub_b], via_of(mode, "auth"))
    h.wait_event("subscribed", conn=e["conn"], topic="b")
    c.send_cmd("unsubscribe", "a")
    assert c.recv_json() == {"event": "unsubscribed", "topic": "a"}
    u = h.wait_event("unsubscribed", conn=e["conn"], topic="a")
    assert u["text"] != "disconnected"
    assert h.count("a") == 0 and h.count("b") == 1
    c.send_close(1000)
    c.expect_close(1000)
    c.close()
    h.wait_event("disconnected", conn=e["conn"])
    assert [x["text"] for x in h.of("unsubscribed", e["conn"])][-1] == "disconnected"
    wait_idle(h)
    assert h.count("b") == 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("delay", [0, 200])
def test_connection_denied_sse_and_ws(hook_host, mode, delay):
    """deny: status and reason; 401 adds WWW-Authenticate; a deferred answer (another thread)
    the same; no lifecycle event and no subscribe request for a refused connection."""
    h = hook_host(mode)
    h.command("allow-user-from-header X-User")
    h.command("deny-user bob 403 banned")
    h.command("deny-user eve 401 who are you")
    h.command("deny-user mal 429 slow down")
    h.command("deny-user zed 0")
    if delay:
        h.command(f"delay-ms {delay} connect")
    cases = [("bob", 403, "banned"), ("eve", 401, "who are you"), ("mal", 429, "slow down"),
             ("zed", 403, None)]
    for user, status, reason in cases:
        t0 = time.monotonic()
        s = SSEStream(h.addr, events_path("a"), {"X-User": user})
        took = time.monotonic() - t0
        assert s.status == status, (user, s.status, s.body)
        if reason is not None:
            assert s.body.rstrip("\n") == reason
            assert s.response.header("content-type", "").startswith("text/plain")
        assert (s.response.header("www-authenticate") == "Bearer") == (status == 401)
        if delay:
            assert took >= delay / 1000 * 0.9, f"answered before the deferred deny ({took:.3f}s)"
        s.close()
        w = ws_open(h.addr, "/ws?topic=a", headers={"X-User": user}, expect=None)
        assert w.response.status == status, (user, w.response)
        if reason is not None:
            assert w.response.body.decode().rstrip("\n") == reason
        assert w.response.header("sec-websocket-accept") is None
        w.close()
    s = SSEStream(h.addr, events_path("a"), {"X-User": "alice"})
    assert s.status == 200
    reqs = h.wait_n("auth_connect", 9)
    assert len(reqs) == 9
    via = "answerer" if delay else via_of(mode, "auth")
    for e in reqs:
        assert h.answer_for(e["request"])["rc"] == 0
        assert h.answer_for(e["request"])["from"] == via
    denied = {e["conn"] for e in reqs[:8]}
    assert not [e for e in h.events if e["conn"] in denied and e["ev"] != "auth_connect"], \
        "a refused connection got lifecycle events or subscribe requests"
    assert h.wait_event("connected")["conn"] == reqs[8]["conn"]
    assert h.stats()["auth_denied"] == 8
    s.close()
    wait_idle(h)


@pytest.mark.parametrize("mode", MODES)
def test_topics_denied(hook_host, mode):
    """SSE or WebSocket URL topic denied: the whole request fails with 403 (reason, or "topic not
    allowed"); a WebSocket command gets an error reply; allowed topics still work."""
    h = hook_host(mode)
    h.command("deny-topic secret/* no secrets here")
    h.command("deny-topic vault")
    h.command("deny-topic default")
    for path, body in ((events_path("pub", "secret/x"), "no secrets here"),
                       (events_path("vault"), "topic not allowed"),
                       (events_path(), "topic not allowed")):  # no topic = "default"
        s = SSEStream(h.addr, path)
        assert (s.status, s.body.rstrip("\n")) == (403, body), path
        s.close()
    asked = {e["topic"] for e in h.wait_n("auth_subscribe", 4)}
    assert {"secret/x", "vault", "default"} <= asked
    w = ws_open(h.addr, "/ws?topic=pub&topic=secret/y", expect=403)
    assert w.response.body.decode().rstrip("\n") == "no secrets here"
    w.close()
    assert not h.of("connected"), "a refused request opened a stream"

    c = ws_open(h.addr, "/ws?topic=pub")
    c.handshake_done(["pub"])
    c.send_cmd("subscribe", "secret/z")
    assert c.recv_json() == {"event": "error", "topic": "secret/z", "reason": "forbidden",
                             "data": "no secrets here"}
    c.send_cmd("subscribe", "vault")
    assert c.recv_json() == {"event": "error", "topic": "vault", "reason": "forbidden",
                             "data": FORBIDDEN_DEFAULT}
    c.send_cmd("subscribe", "open")
    assert c.recv_json() == pl.subscribed("open")
    conn = h.wait_event("connected")["conn"]
    assert sorted(e["topic"] for e in h.wait_n("subscribed", 2, conn=conn)) == ["open", "pub"]
    assert h.count("secret/z") == 0 and h.count("vault") == 0 and h.count("open") == 1
    # Nothing published to a refused topic reaches the client.
    pl.http_request(h.addr, "POST", "/publish?topic=vault", b"gold")
    pl.http_request(h.addr, "POST", "/publish?topic=open", b"fine")
    m = c.recv_json()
    assert (m["topic"], m["data"]) == ("open", "fine")
    assert h.stats()["auth_denied"] == 6
    c.close()
    wait_idle(h)


@pytest.mark.parametrize("mode", MODES)
def test_resumes_are_asked(hook_host, mode):
    """Resuming is subscribing: Last-Event-ID, ?last_event_id= and since all ask the host, and a
    denied topic stays closed however it is resumed."""
    h = hook_host(mode, "--history", 100)
    h.command("deny-topic secret")
    sec = pl.http_request(h.addr, "POST", "/publish?topic=secret", b"s1").json_id()
    pub = pl.http_request(h.addr, "POST", "/publish?topic=pub", b"p1").json_id()
    pl.http_request(h.addr, "POST", "/publish?topic=pub", b"p2")

    s = SSEStream(h.addr, events_path("secret"), {"Last-Event-ID": sec})
    assert s.status == 403
    s.close()
    s = SSEStream(h.addr, events_path("secret", last_event_id=sec))
    assert s.status == 403
    s.close()
    assert len(h.wait_n("auth_subscribe", 2, topic="secret")) == 2
    assert h.of("auth_connect")[0]["named"]["Last-Event-ID"] == sec

    # Allowed resume: asked, then replayed from the ID.
    s = SSEStream(h.addr, events_path("pub"), {"Last-Event-ID": pub})
    assert s.status == 200
    ev = s.next_event()
    assert ev.data == "p2"
    assert len(h.wait_n("auth_subscribe", 1, topic="pub")) == 1
    s.close()

    c = ws_open(h.addr, f"/ws?topic=secret&last_event_id={urllib.parse.quote(sec)}", expect=403)
    c.close()
    c = ws_open(h.addr, "/ws")
    c.handshake_done()
    c.send_cmd("subscribe", "secret", since=sec)
    assert c.recv_json()["reason"] == "forbidden"
    c.send_cmd("subscribe", "pub", since=pub)
    assert c.recv_json() == pl.subscribed("pub")
    assert c.recv_json()["data"] == "p2"
    assert len(h.wait_n("auth_subscribe", 4, topic="secret")) == 4
    assert len(h.wait_n("auth_subscribe", 2, topic="pub")) == 2
    c.close()
    wait_idle(h)


@pytest.mark.parametrize("mode", MODES)
def test_deferred_subscribe_answers(hook_host, mode):
    """Subscribe answers from another thread: an SSE stream opens only once its topics are
    allowed; a WebSocket command is answered when the host answers; an unsubscribe while the
    subscribe is pending cancels it, and the late answer gets ENOENT."""
    h = hook_host(mode)
    h.command("delay-ms 300 subscribe")
    t0 = time.monotonic()
    s = SSEStream(h.addr, events_path("a", "b"))
    assert s.status == 200
    assert time.monotonic() - t0 >= 0.27, "the stream opened before its topics were allowed"
    for e in h.wait_n("auth_subscribe", 2):
        assert h.answer_for(e["request"]) == {"answer": e["request"], "allow": 1, "rc": 0,
                                              "from": "answerer"}
    s.close()

    h.command("deny-topic no")
    c = ws_open(h.addr, "/ws")
    c.handshake_done()
    t0 = time.monotonic()
    c.send_cmd("subscribe", "no")
    assert c.recv_json()["reason"] == "forbidden"
    assert time.monotonic() - t0 >= 0.27
    c.send_cmd("subscribe", "yes")
    assert c.recv_json() == pl.subscribed("yes")

    h.command("delay-ms 1000 subscribe")
    c.send_cmd("subscribe", "cancelled")
    req = h.wait_event("auth_subscribe", topic="cancelled")["request"]
    c.send_cmd("unsubscribe", "cancelled")
    assert c.recv_json(timeout=0.8 * S) == {"event": "unsubscribed", "topic": "cancelled"}
    assert h.answer_for(req, timeout=5)["rc"] == ENOENT
    c.send_cmd("ping")
    assert c.recv_json() == {"event": "pong"}, "no reply may follow the cancelled subscribe"
    assert h.count("cancelled") == 0
    assert not h.of("subscribed", topic="cancelled")
    c.close()
    wait_idle(h)


@pytest.mark.parametrize("mode", MODES)
def test_timeout_denies_with_503(hook_host, mode):
    h = hook_host(mode, "--auth-timeout-ms", 400)
    h.command("no-answer")
    t0 = time.monotonic()
    s = SSEStream(h.addr, events_path("a"))
    took = time.monotonic() - t0
    assert (s.status, s.body.rstrip("\n")) == (503, "authorization timed out")
    assert 0.35 <= took < 3 * S, took
    s.close()
    w = ws_open(h.addr, "/ws", expect=503)
    w.close()
    st = h.stats()
    assert st["auth_timeouts"] == 2 and st["auth_pending"] == 0
    for e in h.wait_n("auth_connect", 2):
        assert h.rc(f"answer {e['request']} allow") == 0
        assert h.answer_for(e["request"])["rc"] == ENOENT, "an answer after the timeout"

    # A subscribe that times out: SSE fails, a WebSocket command gets "forbidden".
    h.command("reset")
    h.command("no-answer subscribe")
    s = SSEStream(h.addr, events_path("a"))
    assert s.status == 503
    s.close()
    c = ws_open(h.addr, "/ws")
    c.handshake_done()
    c.send_cmd("subscribe", "slow")
    j = c.recv_json(timeout=3)
    assert (j["event"], j["topic"], j["reason"]) == ("error", "slow", "forbidden")
    assert h.stats()["auth_timeouts"] == 4
    assert not h.of("subscribed")
    c.close()
    wait_idle(h)


@pytest.mark.parametrize("mode", MODES)
def test_answer_twice_and_after_the_client_left(hook_host, mode):
    h = hook_host(mode)
    # Answered synchronously by the host: any later answer is ENOENT and changes nothing.
    s = SSEStream(h.addr, events_path("a"))
    assert s.status == 200
    req = h.wait_event("auth_connect")["request"]
    assert h.answer_for(req)["rc"] == 0
    h.command(f"answer {req} deny 403 too late")
    assert h.answer_for(req, n=2)["rc"] == ENOENT
    pl.http_request(h.addr, "POST", "/publish?topic=a", b"still here")
    assert s.next_event().data == "still here"
    s.close()
    wait_idle(h)

    # Held requests: answered twice from the main thread.
    h.command("no-answer")
    c = pl.RawHTTP(h.addr)
    c.send(pl.build_request("GET", events_path("b"), b"", {}, h.addr))
    req = h.wait_event("auth_connect", n=2)["request"]
    assert h.stats()["auth_pending"] == 1
    h.command(f"answer {req} allow")
    h.command(f"answer {req} allow")
    h.command(f"answer {req} deny 401 x")
    assert [h.answer_for(req, n=i)["rc"] for i in (1, 2, 3)] == [0, ENOENT, ENOENT]
    sub = h.wait_event("auth_subscribe", topic="b")["request"]
    h.command(f"answer {sub} allow")
    h.command(f"answer {sub} deny 403 no")
    assert [h.answer_for(sub, n=i)["rc"] for i in (1, 2)] == [0, ENOENT]
    assert c.read_response(head_only=True).status == 200
    h.wait_event("connected", conn=h.of("auth_connect")[1]["conn"])
    c.close()
    wait_idle(h)

    # The client leaves while its request waits: ENOENT, and nothing is left behind.
    for how in ("sse-connect", "ws-connect", "sse-subscribe", "ws-subscribe"):
        transport, kind = how.split("-")
        h.command("reset")
        h.command(f"no-answer {kind}")
        before = len(h.of("auth_" + kind))
        if how == "ws-subscribe":
            client = ws_open(h.addr, "/ws")
            client.handshake_done()
            client.send_cmd("subscribe", "left")
        else:
            client = pl.RawHTTP(h.addr)
            upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key":
                       pl.ws_key(), "Sec-WebSocket-Version": "13"}
            client.send(pl.build_request("GET", events_path("left") if transport == "sse" else
                                         "/ws?topic=left", b"",
                                         upgrade if transport == "ws" else {}, h.addr))
        e = h.wait_event("auth_" + kind, n=before + 1)
        assert kind == "connect" or e["topic"] == "left"
        assert h.stats()["auth_pending"] == 1
        client.close()
        st = wait_idle(h)
        assert h.rc(f"answer {e['request']} allow") == 0
        assert h.answer_for(e["request"])["rc"] == ENOENT, how
        assert st["subscriptions"] == 0 and h.count("left") == 0
        assert not h.of("subscribed", topic="left")
    # Every CONNECTED had its DISCONNECTED; none for connections that never opened.
    assert len(h.of("connected")) == len(h.of("disconnected"))
    assert h.stats()["auth_pending"] == 0


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def jwt(claims, secret="s3cret"):
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


@pytest.mark.parametrize("mode", MODES)
def test_jwt_and_hook_together(hook_host, mode):
    """The token is checked first (a bad one never reaches the host); the event's user is the
    token's sub, kept unless the host gives another; the topics claim still limits."""
    h = hook_host(mode, "--jwt-secret", "s3cret")
    good = jwt({"sub": "carol", "topics": ["room/*"], "exp": int(time.time()) + 60})
    s = SSEStream(h.addr, events_path("room/1"), {"Authorization": "Bearer " + jwt({}, "wrong")})
    assert s.status == 401
    s.close()
    assert not h.of("auth_connect"), "a request with a bad token reached the host"

    s = SSEStream(h.addr, events_path("room/1"), {"Authorization": "Bearer " + good})
    assert s.status == 200
    e = h.wait_event("auth_connect")
    assert e["user"] == "carol"
    assert h.wait_event("auth_subscribe", topic="room/1")["user"] == "carol"
    assert h.wait_event("connected", conn=e["conn"])["user"] == "carol"
    s.close()

    w = ws_open(h.addr, f"/ws?token={good}")
    w.handshake_done()
    assert h.wait_event("auth_connect", n=2)["user"] == "carol"
    w.send_cmd("subscribe", "lobby")  # outside the token's topics
    assert w.recv_json()["reason"] == "forbidden"
    w.send_cmd("subscribe", "room/2")
    assert w.recv_json() == pl.subscribed("room/2")
    w.close()

    h.command("deny-user carol 403 carol is suspended")
    s = SSEStream(h.addr, events_path("room/1"), {"Authorization": "Bearer " + good})
    assert (s.status, s.body.rstrip("\n")) == (403, "carol is suspended")
    s.close()

    h.command("reset")
    h.command("allow-user-from-header X-User")
    s = SSEStream(h.addr, events_path("room/1"),
                  {"Authorization": "Bearer " + good, "X-User": "dave"})
    assert s.status == 200
    assert h.wait_event("auth_connect", n=4)["user"] == "carol"
    conn = h.of("auth_connect")[3]["conn"]
    assert h.wait_event("connected", conn=conn)["user"] == "dave", "the host's user id wins"
    s.close()
    wait_idle(h)


@pytest.mark.parametrize("mode", MODES)
def test_no_request_when_nobody_takes_it(hook_host, mode):
    """Auth kinds left out of the mask are not asked: everything is allowed, lifecycle events
    still come."""
    mask = 0xFF & ~0x07  # no LOG, AUTH_CONNECT, AUTH_SUBSCRIBE
    h = hook_host(mode, "--mask", mask)
    h.command("allow-user-from-header X-User")  # rules that would deny, were they asked
    h.command("deny-user bob 403 no")
    h.command("deny-topic *")
    s = SSEStream(h.addr, events_path("a"), {"X-User": "bob"})
    assert s.status == 200
    c = h.wait_event("connected")
    h.wait_event("subscribed", conn=c["conn"], topic="a")
    assert not h.of("auth_connect") and not h.of("auth_subscribe")
    s.close()
    h.wait_event("disconnected", conn=c["conn"])
    wait_idle(h)
