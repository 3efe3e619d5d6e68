"""Built-in JWT (HS256) auth (--jwt-secret): tokens from Authorization: Bearer or ?token=; exp,
nbf, signature and algorithm checked; `topics` limits every way of subscribing (SSE topics,
WebSocket URL topics and commands, resumes). Tokens are made here with hmac/hashlib."""

import base64
import hashlib
import hmac
import json
import time

import pytest

import pushlet_testlib as pl
from pushlet_testlib import RawWS, events_path

SECRET = "k3y-for-tests"


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def token(claims=None, secret=SECRET, header=None, sign=True):
    h = b64(json.dumps(header or {"alg": "HS256", "typ": "JWT"}).encode())
    p = b64(json.dumps(claims if claims is not None else {"sub": "alice"}).encode())
    sig = hmac.new(secret.encode(), f"{h}.{p}".encode(), hashlib.sha256).digest()
    return f"{h}.{p}." + (b64(sig) if sign else "")


def sse_status(srv, path, headers=None):
    with pl.RawHTTP(srv.addr) as c:
        c.send(pl.build_request("GET", path, b"", headers or {}, srv.addr))
        r = c.read_response(head_only=True)
        return r


@pytest.fixture
def srv(pushletd):
    return pushletd("--jwt-secret", SECRET)


def bearer(t):
    return {"Authorization": f"Bearer {t}"}


def test_sse_needs_a_valid_token(srv):
    now = int(time.time())
    assert sse_status(srv, events_path("a")).status == 401
    assert sse_status(srv, events_path("a")).header("www-authenticate") == "Bearer"
    assert sse_status(srv, events_path("a"), bearer(token())).status == 200
    assert sse_status(srv, events_path("a", token=token())).status == 200
    bad = {
        "expired": token({"sub": "u", "exp": now - 5}),
        "not yet valid": token({"sub": "u", "nbf": now + 60}),
        "bad signature": token(secret="other"),
        "alg none": token(header={"alg": "none"}, sign=False),
        "alg none signed": token(header={"alg": "none"}),
        "RS256": token(header={"alg": "RS256", "typ": "JWT"}),
        "HS384": token(header={"alg": "HS384"}),
        "garbage": "not.a.token",
        "tampered": token({"sub": "alice"}).rsplit(".", 2)[0] + "." +
                    b64(json.dumps({"sub": "root"}).encode()) + "." +
                    token({"sub": "alice"}).rsplit(".", 1)[1],
    }
    for what, t in bad.items():
        assert sse_status(srv, events_path("a"), bearer(t)).status == 401, what
        assert sse_status(srv, events_path("a", token=t)).status == 401, what
    assert sse_status(srv, events_path("a"), bearer(token({"sub": "u", "exp": now + 60}))
                      ).status == 200
    assert srv.stats()["auth_denied"] == 2 + 2 * len(bad)


def test_topics_claim_limits_sse_including_resume(srv):
    t = token({"sub": "bob", "topics": ["news", "chat/*"]})
    for ok in (events_path("news"), events_path("chat/x", "news"), events_path("chat/")):
        assert sse_status(srv, ok, bearer(t)).status == 200, ok
    for denied in (events_path("sports"), events_path("news", "sports"), events_path("chat"),
                   events_path()):  # no topic = "default", not granted
        assert sse_status(srv, denied, bearer(t)).status == 403, denied
    mid = srv.publish("sports", "secret score")
    r = sse_status(srv, events_path("sports"), {**bearer(t), "Last-Event-ID": mid})
    assert r.status == 403, "resuming is subscribing"
    r = sse_status(srv, events_path("sports", last_event_id=mid, token=t))
    assert r.status == 403


def test_websocket_upgrade_and_commands(srv):
    t = token({"sub": "carol", "topics": ["room/*"]})
    c = RawWS(srv.addr, "/ws", expect=None)
    assert c.response.status == 401
    c.close()
    c = RawWS(srv.addr, "/ws?topic=other", headers=bearer(t), expect=None)
    assert c.response.status == 403
    c.close()
    c = RawWS(srv.addr, f"/ws?topic=room/1&token={t}")
    c.handshake_done(["room/1"])
    mid = srv.publish("lobby", "not for carol")
    c.send_cmd("subscribe", "lobby")
    assert c.recv_json() == {"event": "error", "topic": "lobby", "reason": "forbidden",
                             "data": "not allowed to subscribe to this topic"}
    c.send_cmd("subscribe", "lobby", since=mid)  # resume path
    assert c.recv_json()["reason"] == "forbidden"
    c.send_cmd("subscribe", "room/2")
    assert c.recv_json() == pl.subscribed("room/2")
    srv.publish("lobby", "still not")
    srv.publish("room/2", "hello")
    m = c.recv_json()
    assert (m["topic"], m["data"]) == ("room/2", "hello")
    c.close()
    assert srv.stats()["auth_denied"] == 4


def test_no_secret_no_auth(pushletd):
    srv = pushletd()
    assert sse_status(srv, events_path("a")).status == 200
    assert sse_status(srv, events_path("a"), bearer("whatever")).status == 200
