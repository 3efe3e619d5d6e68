"""Client messages and targeted sends (issue #6), in both delivery modes, with real clients (the
`websockets` library, with and without permessage-deflate, raw WebSockets and SSE streams).

Covered: WebSocket text and binary messages reach the host exactly as sent, with the right
connection and user, and only those that are no subscription command; the host answers one
connection with pushlet_send() and every connection of a user (2 WebSockets + 1 SSE stream) with
pushlet_send_user(); pushlet_close() with a code and reason as the client sees it; the per-
connection rate limit on messages; without the MESSAGE hook, the old error reply.
"""

import asyncio
import json
import os

import pytest
import websockets

import pushlet_testlib as pl
from hook_host import WS, S, SSEStream, hook_host, wait_idle, ws_open  # noqa: F401
from pushlet_testlib import events_path

MODES = ["callback", "queue"]
ENOENT, EINVAL = -11, -1
ALL_BUT_LOG = 0xFE


def connect(h, path="/ws", user=None, compression=None):
    return websockets.connect(f"ws://{pl.HOST}:{h.port}{path}", compression=compression,
                              extra_headers={"X-User": user} if user else {},
                              ping_interval=None, open_timeout=10 * S, close_timeout=5 * S)


async def recv_obj(ws, timeout=10.0):
    raw = await asyncio.wait_for(ws.recv(), timeout * S)
    assert isinstance(raw, bytes), f"server messages are binary frames, got {raw!r}"
    return json.loads(raw)


def check_sent(obj, event, data):
    """What pushlet_send() gives a WebSocket: {"event","data","timestamp"} and no topic or id
    (publish_all's shape, where they are empty strings)."""
    assert set(obj) - {"topic", "id"} == {"event", "data", "timestamp"}, obj
    assert obj.get("topic", "") == "" and obj.get("id", "") == "", obj
    assert (obj["event"], obj["data"]) == (event, data)
    assert pl.TIMESTAMP_RE.match(obj["timestamp"]), obj


@pytest.mark.parametrize("mode", MODES + ["split"])
@pytest.mark.parametrize("compression", [None, "deflate"])
def test_message_round_trip(hook_host, mode, compression):
    h = hook_host(mode)
    h.command("allow-user-from-header X-User")
    h.command("metadata tier=1")
    text = "héllo wörld " * 50   # large enough for the client to compress it
    blob = os.urandom(3000) + b"\x00\xff"
    not_commands = ['{"hello": 1}', '{"action": "dance"}', '[1,2]', "plain text"]

    async def main():
        async with connect(h, "/ws?topic=t", "alice", compression) as ws:
            if compression:
                assert ws.extensions, "permessage-deflate was not negotiated"
            assert (await recv_obj(ws))["event"] == "connected"
            assert (await recv_obj(ws)) == pl.subscribed("t")
            conn = h.wait_event("connected")["conn"]
            await ws.send(text)
            await ws.send(blob)
            for m in not_commands:
                await ws.send(m)
            await ws.send(json.dumps({"action": "ping"}))   # commands are not messages
            assert await recv_obj(ws) == {"event": "pong"}
            await ws.send(json.dumps({"action": "subscribe", "topic": "u"}).encode())
            assert await recv_obj(ws) == pl.subscribed("u")
            msgs = h.wait(lambda: h.kinds["message"] >= 6 and h.of("message"), 10, "6 messages")
            assert [m["payload"] for m in msgs] == (
                [text.encode(), blob] + [m.encode() for m in not_commands])
            assert [m["binary"] for m in msgs] == [0, 1, 0, 0, 0, 0]
            for m in msgs:
                assert (m["conn"], m["user"], m["metadata"], m["transport"], m["request"]) == (
                    conn, "alice", "tier=1", WS, 0)
                assert m["via"] == ("handler" if mode == "callback" else "queue")
            assert h.stats()["client_messages"] == 6

            # The host answers this connection.
            assert h.rc(f"send {conn} reply got {len(msgs)} messages") == 0
            check_sent(await recv_obj(ws), "reply", "got 6 messages")
            assert h.rc(f"send {conn} quote \"x\" \\ y") == 0
            check_sent(await recv_obj(ws), "quote", "\"x\" \\ y")
            await asyncio.sleep(0.3)  # nothing arrives that was not sent
            assert h.kinds["message"] == 6
        h.wait_event("disconnected", conn=conn)
        wait_idle(h)  # (DISCONNECTED comes slightly before the connection is gone: see
        #              test_hooks_lifecycle.py::test_state_agrees_with_events)
        assert h.rc(f"send {conn} reply gone") == ENOENT
        assert h.rc("send 999999 reply nobody") == ENOENT

    pl.run_async(main(), 60 * S)
    wait_idle(h)


@pytest.mark.parametrize("mode", MODES)
def test_send_user_reaches_every_connection_of_the_user(hook_host, mode):
    """3 connections of one user across transports (2 WebSocket, 1 SSE) get the message once
    each; another user's connection does not."""
    h = hook_host(mode)
    h.command("allow-user-from-header X-User")

    async def main():
        async with connect(h, "/ws", "ann") as w1, \
                connect(h, "/ws?topic=x", "ann", "deflate") as w2, \
                connect(h, "/ws", "ben") as other:
            sse = pl.AsyncSSE(h.addr, events_path("x"), headers={"X-User": "ann"})
            await sse.connect()
            for ws, n in ((w1, 1), (w2, 2), (other, 1)):
                for _ in range(n):
                    await recv_obj(ws)
            h.wait(lambda: h.kinds["connected"] == 4)
            big = "z" * 2000
            assert h.rc(f"send-user ann greet {big}") == 0
            assert h.rc("send-user ben only-ben hi ben") == 0
            assert h.rc("send-user nobody greet x") == ENOENT
            check_sent(await recv_obj(w1), "greet", big)
            check_sent(await recv_obj(w2), "greet", big)
            check_sent(await recv_obj(other), "only-ben", "hi ben")
            evs = await sse.wait_messages(1)
            assert [(e.event, e.data, e.id) for e in evs] == [("greet", big, None)], \
                "SSE gets the message once, without an id"
            # Exactly once: a marker sent after arrives next everywhere.
            assert h.rc("send-user ann marker end") == 0
            check_sent(await recv_obj(w1), "marker", "end")
            check_sent(await recv_obj(w2), "marker", "end")
            evs = await sse.wait_messages(2)
            assert [e.event for e in evs] == ["greet", "marker"]
            await sse.close()
        assert h.wait(lambda: h.kinds["disconnected"] == 4)
        wait_idle(h)
        assert h.rc("send-user ann greet late") == ENOENT

    pl.run_async(main(), 60 * S)
    wait_idle(h)


@pytest.mark.parametrize("mode", MODES)
def test_close_by_host(hook_host, mode):
    h = hook_host(mode)

    async def main():
        ws = await connect(h, "/ws?topic=a")
        await recv_obj(ws)
        await recv_obj(ws)
        conn = h.wait_event("connected")["conn"]
        assert h.rc(f"close {conn} 2000 bad code") == EINVAL
        assert h.rc(f"close {conn} 1001 reserved") == EINVAL
        assert h.rc(f"send {conn} last words") == 0
        assert h.rc(f"close {conn} 4001 go away now") == 0
        check_sent(await recv_obj(ws), "last", "words")  # queued before: still sent
        try:
            await asyncio.wait_for(ws.recv(), 5 * S)
            raise AssertionError("a message after the close")
        except websockets.ConnectionClosed:
            pass
        assert (ws.close_code, ws.close_reason) == (4001, "go away now")
        d = h.wait_event("disconnected", conn=conn)
        assert d["text"] == "closed by host"
        u = h.wait_event("unsubscribed", conn=conn, topic="a")
        assert u["text"] == "disconnected"
        wait_idle(h)
        assert h.rc(f"close {conn} 1000 again") == ENOENT
        assert h.rc(f"send {conn} after close") == ENOENT

        ws = await connect(h, "/ws")
        await recv_obj(ws)
        conn = h.wait_event("connected", n=2)["conn"]
        assert h.rc(f"close {conn} 0") == 0
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5 * S)
        assert ws.close_code == 1000

    pl.run_async(main(), 60 * S)

    s = SSEStream(h.addr, events_path("b"))
    assert s.status == 200
    conn = h.wait_event("connected", n=3)["conn"]
    assert h.rc(f"send {conn} note before close") == 0
    assert h.rc(f"close {conn} 0 server restarting") == 0
    evs = s.events_until_eof()
    assert [(e.event, e.data) for e in evs if e.event != "connected"] == [
        ("note", "before close"), ("close", "server restarting")]
    s.close()
    assert h.wait_event("disconnected", conn=conn)["text"] == "closed by host"
    wait_idle(h)


@pytest.mark.parametrize("mode", MODES)
def test_client_messages_rate_limited(hook_host, mode):
    h = hook_host(mode, "--max-client-messages", 5)
    c = ws_open(h.addr, "/ws")
    c.handshake_done()
    for i in range(40):
        c.send_text(f"m{i}")
    c.send_cmd("ping")
    replies = []
    while True:
        j = c.recv_json()
        if j == {"event": "pong"}:
            break
        replies.append(j)
    assert replies, "40 messages at once passed a limit of 5 per second"
    assert all((j["event"], j["reason"]) == ("error", "rate_limited") for j in replies), replies
    got = h.wait(lambda: h.kinds["message"] + len(replies) == 40 and h.of("message"), 10,
                 "every message either passed or refused")
    assert 5 <= len(got) <= 8, len(got)
    assert [m["payload"] for m in got] == [f"m{i}".encode() for i in range(len(got))], \
        "the first ones pass, in order"
    st = h.stats()
    assert st["client_messages"] == len(got) and st["rate_limited"] >= len(replies)
    c.close()
    wait_idle(h)


@pytest.mark.parametrize("mode", MODES)
def test_without_message_hook_the_old_error_reply(hook_host, mode):
    h = hook_host(mode, "--mask", ALL_BUT_LOG & ~0x80)
    c = ws_open(h.addr, "/ws")
    c.handshake_done()
    c.send_text("hello")
    assert c.recv_json() == {"event": "error", "reason": "bad_json",
                             "data": "commands are JSON objects"}
    c.send_text('{"action": "dance"}')
    assert c.recv_json()["reason"] == "unknown_action"
    c.send_binary(b"\x00\x01")
    assert c.recv_json()["event"] == "error"
    h.wait_event("connected")
    assert h.kinds["message"] == 0 and h.stats()["client_messages"] == 0
    c.close()
    wait_idle(h)
