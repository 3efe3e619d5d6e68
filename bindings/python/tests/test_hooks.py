"""Hooks as Python callables: connection and subscribe auth (plain functions on the dispatcher
thread, `async def` on an asyncio loop), hooks that raise, lifecycle events, client messages,
send / send_user / close_connection, and the core's log records in `logging`."""

from __future__ import annotations

import asyncio
import logging
import threading

import aiohttp
import pytest
import websockets

import pushlet
from pushlet import Allow, ConnectRequest, Connection, Deny
from conftest import Recorder, base, run, sse_open, wait_until, ws_connect, ws_next


async def status_of(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s:
        async with s.get(url, headers=headers or {}) as r:
            return r.status, (await r.text()).strip() if r.status != 200 else ""


def test_sync_connect_hook_allows_with_user_and_metadata(make_broker):
    rec = Recorder()

    def on_connect(req: ConnectRequest):
        rec.add("connect", req, threading.current_thread().name)
        name = req.cookies.get("user") or req.params.get("user", [""])[0]
        if not name:
            return Deny(401, "who are you?")
        return Allow(user=name, metadata=f"tier={req.header('X-Tier', '0')}")

    p = make_broker(on_connect=on_connect, on_connected=lambda c: rec.add("connected", c))

    async def main():
        assert await status_of(f"{base(p)}/events?topic=t") == (401, "who are you?")
        async with aiohttp.ClientSession() as s:
            sse = await sse_open(s, p, "topic=t&user=bob", headers={"X-Tier": "2"})
            async with ws_connect(p, "/ws?topic=t", extra_headers={"Cookie": "user=alice"}) as ws:
                await asyncio.to_thread(rec.wait, "connected", 2)
                p.send_user("alice", "private", "for alice")
                p.send_user("bob", "private", "for bob")
                assert (await ws_next(ws))["data"] == "for alice"
                assert (await sse.until("private"))["data"] == "for bob"

    run(main())
    reqs = [c[1] for c in rec.named("connect")]
    assert [r.transport for r in reqs] == ["sse", "sse", "ws"]
    sse_req = reqs[1]
    assert (sse_req.method, sse_req.path) == ("GET", "/events")
    assert sse_req.query == "topic=t&user=bob" and sse_req.params["topic"] == ["t"]
    assert sse_req.remote.startswith("127.0.0.1:") and sse_req.header("x-tier") == "2"
    assert all(c[2] == "pushlet-dispatch" for c in rec.named("connect"))
    conns = {c[1].user: c[1] for c in rec.named("connected")}
    assert conns["bob"] == Connection(conns["bob"].id, "sse", "bob", "tier=2")
    assert conns["alice"].transport == "ws" and conns["alice"].metadata == "tier=0"


def test_sync_deny_and_false(make_broker):
    p = make_broker(on_connect=lambda req: req.params.get("ok") == ["1"])
    p2 = make_broker(on_connect=lambda req: Deny(429, "slow down"))

    async def main():
        assert (await status_of(f"{base(p)}/events?ok=0"))[0] == 403
        assert (await status_of(f"{base(p2)}/events"))[0] == 429
        with pytest.raises(websockets.InvalidStatusCode) as e:
            async with ws_connect(p2, "/ws"):
                pass
        assert e.value.status_code == 429
        async with aiohttp.ClientSession() as s:
            await sse_open(s, p, "ok=1")

    run(main())
    assert p.stats["auth_denied"] == 1


def test_hook_that_raises_denies_and_logs(make_broker, caplog):
    def on_connect(req):
        raise RuntimeError("database down")

    p = make_broker(on_connect=on_connect)
    with caplog.at_level(logging.ERROR, logger="pushlet"):
        assert run(status_of(f"{base(p)}/events"))[0] == 403
        rec = wait_until(lambda: [r for r in caplog.records if "on_connect hook raised" in
                                  r.getMessage()], what="the error record")
    assert rec[0].exc_info and "database down" in str(rec[0].exc_info[1])


def test_hook_returning_nonsense_denies(make_broker, caplog):
    p = make_broker(on_connect=lambda req: None)
    with caplog.at_level(logging.ERROR, logger="pushlet"):
        assert run(status_of(f"{base(p)}/events"))[0] == 403
        wait_until(lambda: any("returned None" in r.getMessage() for r in caplog.records))


def test_subscribe_hook_sse_and_websocket(make_broker):
    rec = Recorder()

    def on_subscribe(conn: Connection, topic: str):
        rec.add("subscribe", conn.transport, topic)
        return Deny(reason="no private topics") if topic.startswith("private/") else True

    p = make_broker(on_subscribe=on_subscribe)

    async def main():
        assert await status_of(f"{base(p)}/events?topic=ok&topic=private/x") == (
            403, "no private topics")
        async with ws_connect(p, "/ws?topic=ok") as ws:
            await ws.send('{"action":"subscribe","topic":"private/y"}')
            err = await ws_next(ws)
            assert (err["event"], err["topic"], err["reason"]) == ("error", "private/y",
                                                                   "forbidden")
            await ws.send('{"action":"subscribe","topic":"public"}')
            await asyncio.to_thread(wait_until, lambda: p.topic_subscribers("public") == 1)

    run(main())
    assert ("subscribe", "ws", "private/y") in rec.calls
    assert ("subscribe", "sse", "ok") in rec.calls


def test_async_hooks_on_a_loop():
    """`async def` hooks await on the loop given to Pushlet(loop=...); answers come later."""

    async def main():
        seen: list[str] = []
        done = asyncio.Event()

        async def on_connect(req: ConnectRequest):
            await asyncio.sleep(0.05)  # a database lookup
            seen.append(f"connect on loop thread: {threading.current_thread().name}")
            if req.params.get("user") == ["raise"]:
                raise RuntimeError("async failure")
            return Allow(user=req.params["user"][0]) if "user" in req.params else Deny(401)

        async def on_subscribe(conn: Connection, topic: str):
            await asyncio.sleep(0.01)
            return topic != "secret"

        async def on_connected(conn: Connection):
            seen.append(f"connected {conn.user}")
            done.set()

        p = pushlet.Pushlet(listen="127.0.0.1:0", loop=asyncio.get_running_loop(),
                            on_connect=on_connect, on_subscribe=on_subscribe,
                            on_connected=on_connected)
        p.start()
        try:
            assert (await status_of(f"{base(p)}/events"))[0] == 401
            assert (await status_of(f"{base(p)}/events?user=raise"))[0] == 403
            assert (await status_of(f"{base(p)}/events?user=a&topic=secret"))[0] == 403
            async with aiohttp.ClientSession() as s:
                sse = await sse_open(s, p, "user=carol&topic=news")
                await asyncio.wait_for(done.wait(), 10)
                p.publish("news", None, "async ok")
                assert (await sse.until("message"))["data"] == "async ok"
        finally:
            p.close()
        return seen

    seen = run(main())
    assert f"connect on loop thread: {threading.main_thread().name}" in seen
    assert "connected carol" in seen


def test_async_hook_without_loop_denies(make_broker, caplog):
    async def on_connect(req):
        return True

    p = make_broker(on_connect=on_connect)
    with caplog.at_level(logging.ERROR, logger="pushlet"):
        assert run(status_of(f"{base(p)}/events"))[0] == 403
        wait_until(lambda: any("no asyncio loop" in r.getMessage() for r in caplog.records))


def test_lifecycle_events(make_broker):
    rec = Recorder()
    p = make_broker(
        on_connected=lambda c: rec.add("connected", c.id, c.transport),
        on_subscribed=lambda c, t: rec.add("subscribed", c.id, t),
        on_unsubscribed=lambda c, t, why: rec.add("unsubscribed", c.id, t, why),
        on_disconnected=lambda c, why: rec.add("disconnected", c.id, why))

    async def main():
        async with aiohttp.ClientSession() as s:
            await sse_open(s, p, "topic=a&topic=b")
            async with ws_connect(p, "/ws?topic=c") as ws:
                await ws.send('{"action":"subscribe","topic":"d"}')
                await ws.send('{"action":"unsubscribe","topic":"c"}')
                await asyncio.to_thread(rec.wait, "unsubscribed", 1)
        await asyncio.to_thread(rec.wait, "disconnected", 2)

    run(main())
    (sse_id, _), (ws_id, _) = sorted(c[1:] for c in rec.named("connected"))
    assert {c[1:] for c in rec.named("connected")} == {(sse_id, "sse"), (ws_id, "ws")}
    assert sorted(c[2] for c in rec.named("subscribed")) == ["a", "b", "c", "d"]
    unsub = {(c[1], c[2], c[3]) for c in rec.named("unsubscribed")}
    assert (ws_id, "d", "disconnected") in unsub and (sse_id, "a", "disconnected") in unsub
    assert len(unsub) == 4  # c by command, d, a, b when they left
    assert {c[1] for c in rec.named("disconnected")} == {sse_id, ws_id}
    order = [c[0] for c in rec.calls if c[1] == ws_id]
    assert order[0] == "connected" and order[-1] == "disconnected"


def test_client_messages_send_and_close(make_broker):
    rec = Recorder()

    def on_message(conn: Connection, data):
        rec.add("message", conn.id, conn.user, data)
        if data == "close me":
            p.close_connection(conn, 4001, "bye")
        else:
            p.send(conn, "echo", data if isinstance(data, str) else data.hex())

    p = make_broker(on_connect=lambda r: Allow(user="u1"), on_message=on_message)

    async def main():
        async with ws_connect(p, "/ws") as ws:
            await ws.send("héllo ✓")
            assert (await ws_next(ws))["data"] == "héllo ✓"
            await ws.send(b"\x00\xffbin")
            echo = await ws_next(ws)
            assert (echo["event"], echo["data"]) == ("echo", "00ff62696e")
            await ws.send('{"not":"a command"}')
            assert (await ws_next(ws))["data"] == '{"not":"a command"}'
            await ws.send("close me")
            with pytest.raises(websockets.ConnectionClosed) as e:
                await asyncio.wait_for(ws.recv(), 10)
            assert (e.value.rcvd.code, e.value.rcvd.reason) == (4001, "bye")

    run(main())
    msgs = rec.named("message")
    assert [m[3] for m in msgs] == ["héllo ✓", b"\x00\xffbin", '{"not":"a command"}',
                                   "close me"]
    assert all(m[2] == "u1" for m in msgs)


def test_core_log_records_reach_logging(make_broker, caplog):
    with caplog.at_level(logging.INFO, logger="pushlet"):
        p = make_broker(log_level=logging.INFO)
        port = p.port
        p.stop()
        wait_until(lambda: any(r.name.startswith("pushlet.") and str(port) in r.getMessage()
                               for r in caplog.records), what="the 'listening' record")
    rec = next(r for r in caplog.records if str(port) in r.getMessage())
    assert rec.levelno == logging.INFO and rec.pushlet_component


def test_hooks_can_be_set_after_creation(broker):
    rec = Recorder()
    broker.on_connected = lambda c: rec.add("connected", c.id)

    async def main():
        async with ws_connect(broker, "/ws"):
            await asyncio.to_thread(rec.wait, "connected")

    run(main())
    broker.on_connected = None
    with pytest.raises(TypeError):
        broker.on_message = "not callable"
