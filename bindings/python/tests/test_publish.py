"""Publishing from Python reaches real SSE (aiohttp) and WebSocket (websockets) clients; data
round-trips as str and bytes; concurrency; errors carry the core's message; stats, metrics."""

from __future__ import annotations

import asyncio
import json
import threading

import aiohttp
import pytest

import pushlet
from conftest import base, run, sse_open, wait_until, ws_connect, ws_next


def test_sse_and_websocket_receive_what_python_publishes(broker):
    async def main():
        async with aiohttp.ClientSession() as session, ws_connect(broker) as ws:
            sse = await sse_open(session, broker, "topic=t")
            await asyncio.to_thread(wait_until, lambda: broker.topic_subscribers("t") == 2)
            broker.publish("t", "message", "hello")
            broker.publish("t", "greeting", b"bytes too")
            ev1, ev2 = await sse.until("message"), await sse.until("greeting")
            assert (ev1["data"], ev2["data"]) == ("hello", "bytes too")
            assert ev1["id"] and ev2["id"]
            m1, m2 = await ws_next(ws), await ws_next(ws)
            assert (m1["topic"], m1["event"], m1["data"]) == ("t", "message", "hello")
            assert (m2["event"], m2["data"]) == ("greeting", "bytes too")
            assert m1["id"] == ev1["id"], "one message ID for every transport"

    run(main())


@pytest.mark.parametrize("data", ["héllo wörld ✓ 日本語 🎉", "line one\nline two\n\nfour",
                                  b"caf\xc3\xa9 raw utf-8 bytes", bytearray(b"a bytearray"),
                                  memoryview(b"a memoryview")])
def test_data_round_trips(broker, data):
    expect = data if isinstance(data, str) else bytes(data).decode()

    async def main():
        async with aiohttp.ClientSession() as session, ws_connect(broker) as ws:
            sse = await sse_open(session, broker, "topic=t")
            await asyncio.to_thread(wait_until, lambda: broker.topic_subscribers("t") == 2)
            broker.publish("t", "message", data)
            assert (await sse.until("message"))["data"] == expect
            assert (await ws_next(ws))["data"] == expect

    run(main())


def test_publish_to_all_reaches_every_connection_once(broker):
    async def main():
        async with aiohttp.ClientSession() as session, ws_connect(broker, "/ws") as ws:
            a = await sse_open(session, broker, "topic=a&topic=b")
            await asyncio.to_thread(wait_until, lambda: broker.stats["connections"] == 2)
            broker.publish_to_all("notice", "to everyone")
            broker.publish("a", "message", "after")
            assert (await a.until("notice"))["data"] == "to everyone"
            assert (await a.next())["data"] == "after", "publish_to_all came once, not per topic"
            assert (await ws_next(ws))["data"] == "to everyone"

    run(main())


def test_eight_threads_publish_every_message_delivered_once(broker):
    threads, per_thread = 8, 500
    total = threads * per_thread

    async def main():
        async with aiohttp.ClientSession() as session, ws_connect(broker) as ws:
            sse = await sse_open(session, broker, "topic=t")
            await asyncio.to_thread(wait_until, lambda: broker.topic_subscribers("t") == 2)
            start = threading.Barrier(threads)

            def publisher(n: int) -> None:
                start.wait()
                for i in range(per_thread):
                    while True:
                        try:
                            broker.publish("t", "message", f"{n}:{i}")
                            break
                        except pushlet.QueueFull:
                            pass

            workers = [threading.Thread(target=publisher, args=(n,)) for n in range(threads)]
            for w in workers:
                w.start()
            sse_got = [(await sse.until("message", 30))["data"] for _ in range(total)]
            ws_got = [(await ws_next(ws, 30))["data"] for _ in range(total)]
            for w in workers:
                await asyncio.to_thread(w.join)
            return sse_got, ws_got

    sse_got, ws_got = run(main(), 90)
    expected = sorted(f"{n}:{i}" for n in range(8) for i in range(per_thread))
    assert sorted(sse_got) == expected and sorted(ws_got) == expected
    assert sse_got == ws_got, "every subscriber sees one order"
    for n in range(threads):  # each thread's own messages stay in its order
        mine = [d for d in sse_got if d.startswith(f"{n}:")]
        assert mine == [f"{n}:{i}" for i in range(per_thread)]
    assert broker.stats["messages_in"] == total


def test_errors_carry_the_core_message(make_broker):
    p = make_broker(start=False, max_message_size=16)
    with pytest.raises(pushlet.NotRunning, match="broker not running"):
        p.publish("t", "message", "x")
    p.start()
    with pytest.raises(pushlet.MessageTooBig, match="maximum message size") as e:
        p.publish("t", "message", "x" * 17)
    assert e.value.code == -7 and isinstance(e.value, ValueError)
    with pytest.raises(pushlet.InvalidArgument, match="invalid argument"):
        p.publish("", "message", "x")
    with pytest.raises(ValueError, match="NUL"):
        p.publish("a\x00b", "message", "x")
    with pytest.raises(TypeError):
        p.publish("t", "message", 42)  # type: ignore[arg-type]
    with pytest.raises(pushlet.Busy):
        p.set_option("max_connections", 5)
    with pytest.raises(pushlet.NotFound):
        p.send(123456, "message", "nobody")
    with pytest.raises(pushlet.NotFound):
        p.send_user("nobody", "message", "x")
    with pytest.raises(TypeError, match="unknown Pushlet option"):
        pushlet.Pushlet(listen="127.0.0.1:0", no_such_option=1)
    with pytest.raises(ValueError, match="host:port"):
        pushlet.Pushlet(listen="localhost")
    with pytest.raises(pushlet.InvalidArgument, match="listen 'not-an-ip:80'"):
        pushlet.Pushlet(listen="not-an-ip:80")


def test_queue_full_is_queue_full(make_broker):
    p = make_broker(max_queued_messages=1, history_size=0)
    with pytest.raises(pushlet.QueueFull, match="publish queue full") as e:
        for _ in range(1_000_000):
            p.publish("t", None, b"x" * 1000)
    assert e.value.code == -3
    assert p.stats["publish_rejected"] >= 1


def test_address_in_use(make_broker, broker):
    other = make_broker(start=False, listen=f"127.0.0.1:{broker.port}")
    with pytest.raises(pushlet.AddressInUse, match="already in use"):
        other.start()


def test_options_heartbeat_stats_metrics(make_broker):
    p = make_broker(start=False, heartbeat=0.2, sse_path="/stream", max_connections=7)
    p.set_heartbeat_interval(0.1)
    p.start()

    async def main():
        async with aiohttp.ClientSession() as session:
            resp = await session.get(f"{base(p)}/stream?topic=x")
            assert resp.status == 200
            seen = b""
            while b": heartbeat" not in seen:  # within a second at 100 ms
                seen += await asyncio.wait_for(resp.content.readany(), 2)
            assert p.topic_subscribers("x") == 1
            resp.close()

    run(main())
    p.publish("x", None, "one")
    stats = wait_until(lambda: (s := p.stats)["messages_in"] == 1 and s)
    assert set(stats) >= {"connections", "messages_in", "messages_out", "auth_denied"}
    assert all(isinstance(v, int) for v in stats.values())
    metrics = p.metrics()
    assert "# TYPE pushlet_connections gauge" in metrics
    assert "pushlet_messages_in" in metrics
    with pytest.raises(pushlet.Busy):
        p.set_heartbeat_interval(1)


def test_json_shape_on_websocket(broker):
    async def main():
        async with ws_connect(broker) as ws:
            await asyncio.to_thread(wait_until, lambda: broker.topic_subscribers("t") == 1)
            broker.publish("t", "update", json.dumps({"k": [1, 2]}))
            m = await ws_next(ws)
            assert json.loads(m["data"]) == {"k": [1, 2]}
            assert m["timestamp"].endswith("Z")

    run(main())
