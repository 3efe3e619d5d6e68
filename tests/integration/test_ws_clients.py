"""WebSocket clients against pushletd: the `websockets` library (a real RFC 6455 client with
automatic pong and permessage-deflate) plus raw-socket clients where exact bytes matter.

Covers: subscribe / unsubscribe with replies and in-order delivery, initial topics from the
query, fragmented commands, ping/pong both ways, heartbeats keeping a live peer and dropping a
silent one, 1,000 x 1,000 fan-out, publish_all to WS and SSE exactly once, MessagePack (via
subprotocol and query) decoded by the msgpack library, non-UTF-8 data, the seed's /send,
close 1001 on SIGTERM, permessage-deflate, and the /stats gauge.
"""

import asyncio
import datetime
import hashlib
import json
import os
import select
import signal
import time
import urllib.parse
import zlib

import msgpack
import pytest
import websockets
from websockets.legacy.client import WebSocketClientProtocol

import pushlet_testlib as pl
from pushlet_testlib import (OP_BINARY, OP_CONT, OP_PING, OP_PONG, OP_TEXT, AsyncHTTP, AsyncSSE,
                             AsyncWS, RawWS, events_path, run_async)

S = pl.time_scale()


def ws_url(srv, path="/ws", **query):
    q = []
    for k, v in query.items():
        for item in (v if isinstance(v, (list, tuple)) else [v]):
            q.append((k, item))
    return f"ws://{srv.host}:{srv.port}{path}" + ("?" + urllib.parse.urlencode(q) if q else "")


def connect(srv, path="/ws", compression=None, **kw):
    """websockets.connect with bounded open/close and no client-initiated pings."""
    kw.setdefault("ping_interval", None)
    kw.setdefault("open_timeout", 10 * S)
    kw.setdefault("close_timeout", 5 * S)
    kw.setdefault("max_size", 4 << 20)
    return websockets.connect(f"ws://{srv.host}:{srv.port}{path}", compression=compression, **kw)


async def recv_obj(ws, timeout=10.0, fmt="json"):
    """Next message: must be a binary frame holding one JSON object (or msgpack map)."""
    try:
        raw = await asyncio.wait_for(ws.recv(), timeout * S)
    except asyncio.TimeoutError:
        raise pl.Timeout(f"no message within {timeout * S:.1f}s") from None
    assert isinstance(raw, bytes), f"server messages must be binary frames, got text {raw!r}"
    if fmt == "msgpack":
        obj = msgpack.unpackb(raw, raw=False)
    else:
        obj = json.loads(raw.decode("utf-8"))
    assert isinstance(obj, dict), obj
    return obj


async def expect_reply(ws, expected, timeout=10.0, fmt="json"):
    obj = await recv_obj(ws, timeout, fmt)
    assert obj == expected, f"expected {expected}, got {obj}"
    return obj


async def send_cmd(ws, action, topic=None, binary=False):
    obj = {"action": action}
    if topic is not None:
        obj["topic"] = topic
    text = json.dumps(obj)
    await ws.send(text.encode() if binary else text)


async def handshake_done(ws, topics=(), fmt="json"):
    await expect_reply(ws, {"event": "connected", "data": "Connection established"}, fmt=fmt)
    for t in topics:
        await expect_reply(ws, pl.subscribed(t), fmt=fmt)


async def no_more_messages(ws, fmt="json"):
    """Prove nothing is pending: a ping command's pong must be the very next message."""
    await send_cmd(ws, "ping")
    obj = await recv_obj(ws, fmt=fmt)
    assert obj == {"event": "pong"}, f"unexpected message before pong: {obj}"


def check_message(obj, topic, data, mid=None, event="message"):
    assert set(obj) == {"topic", "event", "data", "id", "timestamp"}, obj
    assert obj["topic"] == topic and obj["event"] == event and obj["data"] == data, obj
    assert isinstance(obj["id"], str) and pl.ID_RE.fullmatch(obj["id"]), obj
    if mid is not None:
        assert obj["id"] == mid, obj
    check_timestamp(obj["timestamp"])


def check_timestamp(ts):
    assert pl.TIMESTAMP_RE.match(ts), f"timestamp {ts!r} is not RFC 3339 UTC with ms"
    t = datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc)
    skew = abs((datetime.datetime.now(datetime.timezone.utc) - t).total_seconds())
    assert skew < 10 * S, f"timestamp {ts} is {skew:.1f}s away from now"


# --------------------------------------------------------------------------------------------
# Subscribing


def test_subscribe_unsubscribe_and_order(pushletd):
    srv = pushletd()

    async def main():
        async with connect(srv) as ws:
            await handshake_done(ws)
            for t in ("a", "b"):
                await send_cmd(ws, "subscribe", t)
                await expect_reply(ws, pl.subscribed(t))
            pub = await AsyncHTTP(srv.addr).connect()
            sent = []
            for i in range(60):
                t = "abc"[i % 3]
                mid = await pub.publish(t, f"{t}-{i}", event="tick" if i % 2 else None)
                sent.append((t, f"{t}-{i}", mid, "tick" if i % 2 else "message"))
            want = [s for s in sent if s[0] in "ab"]
            got = [await recv_obj(ws) for _ in want]
            for obj, (t, data, mid, ev) in zip(got, want):
                check_message(obj, t, data, mid, ev)
            for t in "ab":  # sequences are per topic
                ids = [pl.id_seq(o["id"]) for o in got if o["topic"] == t]
                assert ids == list(range(ids[0], ids[0] + len(ids))), ids
            await no_more_messages(ws)   # nothing from "c", nothing twice

            # unsubscribe from "a": only "b" is delivered from now on
            await send_cmd(ws, "unsubscribe", "a")
            await expect_reply(ws, {"event": "unsubscribed", "topic": "a"})
            await pub.publish("a", "after-unsub-a")
            mb = await pub.publish("b", "after-unsub-b")
            check_message(await recv_obj(ws), "b", "after-unsub-b", mb)
            await no_more_messages(ws)

            # unsubscribe twice: the second is an error naming the topic
            await send_cmd(ws, "unsubscribe", "a")
            err = await recv_obj(ws)
            assert err["event"] == "error" and err["reason"] == "not_subscribed" \
                and err["topic"] == "a" and isinstance(err.get("data"), str), err

            # a second client on the same topics sees the same messages in the same order
            async with connect(srv, "/ws?topic=b&topic=c") as ws2:
                await handshake_done(ws2, ["b", "c"])
                ids2 = [await pub.publish("bc"[i % 2], f"x{i}") for i in range(20)]
                got1 = [await recv_obj(ws) for _ in range(10)]
                got2 = [await recv_obj(ws2) for _ in range(20)]
                assert [o["id"] for o in got2] == ids2
                assert [o["id"] for o in got1] == ids2[0::2]
            await pub.close()

    run_async(main(), 60 * S)


def test_initial_topics_from_query(pushletd):
    srv = pushletd()

    async def main():
        async with connect(srv, "/ws?topic=x&topic=y.z%3A1&topic=x") as ws:
            # one reply per distinct topic, in query order; a repeated topic counts once
            await handshake_done(ws, ["x", "y.z:1"])
            await no_more_messages(ws)
            mx = srv.publish("x", "to x")
            my = srv.publish("y.z:1", "to y")
            check_message(await recv_obj(ws), "x", "to x", mx)
            check_message(await recv_obj(ws), "y.z:1", "to y", my)
            await no_more_messages(ws)
        # without ?topic= a WebSocket starts with no subscription (not "default")
        async with connect(srv) as ws:
            await handshake_done(ws)
            srv.publish("default", "not for a bare /ws")
            await no_more_messages(ws)
            # commands in binary frames work as well as in text frames
            await send_cmd(ws, "subscribe", "default", binary=True)
            await expect_reply(ws, pl.subscribed("default"))
            m = srv.publish("default", "now yes")
            check_message(await recv_obj(ws), "default", "now yes", m)

    run_async(main(), 30 * S)


def test_fragmented_command_with_interleaved_ping(pushletd):
    srv = pushletd()
    with RawWS(srv.addr) as c:
        c.handshake_done()
        cmd = json.dumps({"action": "subscribe", "topic": "frag"}).encode()
        parts = [cmd[:7], cmd[7:20], cmd[20:]]
        c.send_frame(OP_TEXT, parts[0], fin=False)
        c.send_frame(OP_PING, b"between fragments")
        # the pong answers at once, before the message is complete
        f = c.recv_frame()
        assert (f.opcode, f.payload) == (OP_PONG, b"between fragments"), f
        c.send_frame(OP_CONT, parts[1], fin=False)
        c.send_frame(OP_CONT, parts[2], fin=True)
        assert c.recv_json() == pl.subscribed("frag")
        mid = srv.publish("frag", "after fragments")
        check_message(c.recv_json(), "frag", "after fragments", mid)
        # the same in one TCP write, binary this time, with the pieces chopped to single bytes
        cmd = json.dumps({"action": "unsubscribe", "topic": "frag"}).encode()
        blob = (pl.ws_frame(OP_BINARY, cmd[:5], fin=False) + pl.ws_frame(OP_PING, b"p")
                + pl.ws_frame(OP_CONT, cmd[5:9], fin=False) + pl.ws_frame(OP_CONT, b"", fin=False)
                + pl.ws_frame(OP_CONT, cmd[9:], fin=True))
        c.send_chopped(blob, 1)
        f = c.recv_frame()
        assert (f.opcode, f.payload) == (OP_PONG, b"p"), f
        assert c.recv_json() == {"event": "unsubscribed", "topic": "frag"}


# --------------------------------------------------------------------------------------------
# Ping / pong and heartbeats


class CountingProtocol(WebSocketClientProtocol):
    """Counts the pongs websockets sends on its own in answer to the server's pings."""
    pongs_sent = 0

    async def pong(self, data=b""):
        self.pongs_sent += 1
        await super().pong(data)


def test_client_ping_answered(pushletd):
    srv = pushletd()

    async def main():
        async with connect(srv, "/ws?topic=p") as ws:
            await handshake_done(ws, ["p"])
            for payload in (b"", b"hello", bytes(range(125))):
                waiter = await ws.ping(payload)
                await asyncio.wait_for(waiter, 5 * S)   # the pong echoes our payload
            # the JSON-level ping command
            await send_cmd(ws, "ping")
            await expect_reply(ws, {"event": "pong"})

    run_async(main(), 30 * S)


def test_server_pings_answered_keep_connection_up(pushletd):
    srv = pushletd("--heartbeat", "0.3")

    async def main():
        async with connect(srv, "/ws?topic=hb", create_protocol=CountingProtocol) as ws:
            await handshake_done(ws, ["hb"])
            # ~7 heartbeats; websockets answers each ping by itself (ping_interval=None: the
            # client sends nothing of its own, only those pongs keep it alive)
            await asyncio.sleep(2.1)
            assert ws.open, f"connection closed: {ws.close_code} {ws.close_reason}"
            assert ws.pongs_sent >= 4, f"only {ws.pongs_sent} server pings in 2.1s at 0.3s"
            mid = srv.publish("hb", "still here")
            check_message(await recv_obj(ws), "hb", "still here", mid)
            assert srv.stats()["ws_connections"] == 1

    run_async(main(), 30 * S)


def test_raw_client_sees_paced_pings_and_stays(pushletd):
    srv = pushletd("--heartbeat", "0.3")
    with RawWS(srv.addr) as c:
        c.handshake_done()
        t0 = time.monotonic()
        pings = []
        while len(pings) < 5:
            f = c.recv_frame(timeout=3 * S)
            assert f.opcode == OP_PING, f
            pings.append(time.monotonic() - t0)
            c.send_frame(OP_PONG, f.payload)
        assert pings[-1] >= 0.3 * 3.5, f"5 pings came too fast: {pings}"
        c.send_cmd("ping")
        assert c.recv_json() == {"event": "pong"}


def test_client_that_never_pongs_is_dropped(pushletd):
    srv = pushletd("--heartbeat", "0.3")
    with RawWS(srv.addr, "/ws?topic=silent") as silent, RawWS(srv.addr, "/ws?topic=silent") as live:
        silent.handshake_done(["silent"])
        live.handshake_done(["silent"])
        t0 = time.monotonic()
        # the silent client reads (so nothing backs up) but never answers: dropped by the ping
        # that finds the previous one unanswered, i.e. within ~2 heartbeats. The live client
        # answers every ping meanwhile, and for a while after.
        frames, eof_at = [], None
        deadline = t0 + 5 * S
        while time.monotonic() < deadline and (eof_at is None or time.monotonic() < eof_at + 1):
            r, _, _ = select.select([silent.sock, live.sock] if eof_at is None else [live.sock],
                                    [], [], 0.05)
            if silent.sock in r:
                try:
                    frames.append(silent.recv_frame(timeout=1 * S))
                except pl.ConnectionClosed:
                    eof_at = time.monotonic()
            if live.sock in r:
                f = live.recv_frame(timeout=1 * S)
                assert f.opcode == OP_PING, f
                live.send_frame(OP_PONG, f.payload)
        assert eof_at is not None, f"silent client not dropped within {5 * S}s: {frames}"
        elapsed = eof_at - t0
        pings = [f for f in frames if f.opcode == OP_PING]
        assert pings, f"dropped without ever being pinged: {frames}"
        assert 0.25 <= elapsed <= 0.3 * 3 + 0.5 * S, f"dropped after {elapsed:.2f}s"
        assert all(f.opcode in (OP_PING, pl.OP_CLOSE) for f in frames), frames
        mid = srv.publish("silent", "for the live one")
        check_message(live.recv_json(), "silent", "for the live one", mid)
        st = pl.wait_until(lambda: (lambda s: s if s["ws_connections"] == 1 else None)(
            srv.stats()), 5 * S, what="ws_connections == 1")
        assert st["subscriptions"] == 1, st


# --------------------------------------------------------------------------------------------
# Fan-out


@pytest.mark.timeout(150)
def test_1000_ws_subscribers_each_get_1000_messages_in_order(pushletd):
    srv = pushletd()
    n_sub, n_msg, n_pub = 1000, 1000, 4
    per_pub = n_msg // n_pub
    budget = 90.0 * S

    class Checker:
        def __init__(self):
            self.n = 0
            self.next_seq = [0] * n_pub
            self.last_id = 0
            self.digest = hashlib.sha256()
            self.errors = []
            self.replies = 0

        def __call__(self, payload):
            obj = json.loads(payload)
            if "topic" not in obj or obj.get("event") != "message":
                self.replies += 1     # connected / subscribed
                return
            self.n += 1
            try:
                _, k, j = obj["data"].split("-")
                k, j, i = int(k), int(j), pl.id_seq(obj["id"])
            except (ValueError, KeyError) as e:
                self.errors.append(f"unexpected message {obj!r}: {e}")
                return
            if j != self.next_seq[k]:
                self.errors.append(f"publisher {k}: seq {j}, expected {self.next_seq[k]}")
            self.next_seq[k] = j + 1
            if i <= self.last_id:
                self.errors.append(f"id {i} after {self.last_id}")
            self.last_id = i
            self.digest.update(payload)

    async def main():
        t0 = time.monotonic()
        checkers = [Checker() for _ in range(n_sub)]
        # a mix of clients: most are light raw asyncio clients; 50 are `websockets` clients
        n_lib = 50
        subs = [AsyncWS(srv.addr, "/ws?topic=load", on_message=c) for c in checkers[n_lib:]]
        for i in range(0, len(subs), 100):
            await asyncio.gather(*(s.connect(timeout=30 * S) for s in subs[i:i + 100]))
        libs = []
        for c in checkers[:n_lib]:
            ws = await connect(srv, "/ws?topic=load", compression=None, max_queue=None)
            libs.append(ws)
        st = pl.wait_until(lambda: (lambda s: s if s["ws_connections"] == n_sub else None)(
            srv.stats()), 30 * S, what=f"{n_sub} ws_connections")
        t_conn = time.monotonic() - t0

        async def consume_raw(s, c):
            await s.wait_for(lambda s: c.n >= n_msg or c.errors, timeout=budget,
                             what=f"{n_msg} messages")

        async def consume_lib(ws, c):
            async def go():
                while c.n < n_msg and not c.errors:
                    c(await ws.recv())
            await asyncio.wait_for(go(), budget)

        consumers = [asyncio.create_task(consume_raw(s, c))
                     for s, c in zip(subs, checkers[n_lib:])]
        consumers += [asyncio.create_task(consume_lib(ws, c))
                      for ws, c in zip(libs, checkers[:n_lib])]
        published = {}

        async def publisher(k):
            conn = await AsyncHTTP(srv.addr).connect()
            for j in range(per_pub):
                mid = await conn.publish("load", f"m-{k}-{j}")
                assert mid not in published
                published[mid] = f"m-{k}-{j}"
            await conn.close()

        t1 = time.monotonic()
        await asyncio.gather(*(publisher(k) for k in range(n_pub)))
        t_pub = time.monotonic() - t1
        await asyncio.gather(*consumers)
        t_recv = time.monotonic() - t1
        errors = [e for c in checkers for e in c.errors[:3]]
        assert not errors, errors[:10]
        assert all(c.n == n_msg for c in checkers), sorted({c.n for c in checkers})
        assert all(c.replies == 2 for c in checkers), "connected + subscribed expected once"
        # everyone saw the very same bytes in the very same order
        assert len({c.digest.hexdigest() for c in checkers}) == 1
        for s in subs:
            await s.close()
        for ws in libs:
            await ws.close()
        st = srv.stats()
        assert st["messages_out"] >= n_sub * n_msg, st
        print(f"\n1000x1000 WS: connect {t_conn:.1f}s, publish {t_pub:.1f}s, "
              f"all received {t_recv:.1f}s")

    run_async(main(), budget + 60 * S)


def test_publish_all_reaches_ws_and_sse_exactly_once(pushletd):
    srv = pushletd()

    async def main():
        wss = [await connect(srv, p, compression=c) for p, c in (
            ("/ws", None), ("/ws?topic=a", None), ("/ws?topic=a&topic=b&topic=c", "deflate"),
            ("/ws?topic=a&format=msgpack", None))]
        fmts = ["json", "json", "json", "msgpack"]
        for ws, f, n in zip(wss, fmts, (0, 1, 3, 1)):
            await recv_obj(ws, fmt=f)             # connected
            for _ in range(n):
                await recv_obj(ws, fmt=f)         # subscribed
        sses = [await AsyncSSE(srv.addr, p).connect() for p in
                (events_path(), events_path("a", "b", "c"))]
        c = await AsyncHTTP(srv.addr).connect()
        big = "everyone " * 100                    # > 256 bytes: compressed for deflate peers
        ids = []
        for data in ("to everyone", big, "sentinel"):
            r = await c.request("POST", "/publish_all?event=announce", data.encode())
            assert r.status == 200, r
            ids.append(r.json_id())
        for ws, f in zip(wss, fmts):
            got = [await recv_obj(ws, fmt=f) for _ in range(3)]
            assert [(o["event"], o["data"], o["id"]) for o in got] == [
                ("announce", "to everyone", ids[0]), ("announce", big, ids[1]),
                ("announce", "sentinel", ids[2])], got
            for o in got:
                check_timestamp(o["timestamp"])
            await no_more_messages(ws, fmt=f)
        for s in sses:
            await s.wait_for(lambda s: any(e.data == "sentinel" for e in s.events), 10 * S)
            # publish-to-all events carry no SSE id: they do not move a stream's resume position
            assert [(e.id, e.event, e.data) for e in s.messages()] == [
                (None, "announce", "to everyone"), (None, "announce", big),
                (None, "announce", "sentinel")]
        for ws in wss:
            await ws.close()
        for s in sses:
            await s.close()
        await c.close()

    run_async(main(), 60 * S)


# --------------------------------------------------------------------------------------------
# MessagePack


@pytest.mark.parametrize("how", ["subprotocol", "subprotocol-preferred", "query", "deflate"])
def test_msgpack_decoded_by_msgpack_library(pushletd, how):
    srv = pushletd()

    async def main():
        if how == "query":
            cm = connect(srv, "/ws?topic=mp&format=msgpack")
        elif how == "subprotocol":
            cm = connect(srv, "/ws?topic=mp", subprotocols=["pushlet.msgpack"])
        elif how == "deflate":   # msgpack frames compressed with permessage-deflate
            cm = connect(srv, "/ws?topic=mp", subprotocols=["pushlet.msgpack"],
                         compression="deflate")
        else:   # msgpack is chosen when offered, whatever the order
            cm = connect(srv, "/ws?topic=mp", subprotocols=["pushlet.json", "pushlet.msgpack"])
        async with cm as ws:
            if how == "query":
                assert ws.subprotocol is None
                assert ws.response_headers.get("Sec-WebSocket-Protocol") is None
            else:
                assert ws.subprotocol == "pushlet.msgpack"
            await handshake_done(ws, ["mp"], fmt="msgpack")
            samples = [b"plain text", "unicod\u00e9 \u2603 \U0001F600".encode(),
                       b"bin\xff\xfe\x00\x01", b"", b"y" * 300,
                       b'{"json":"inside"}', bytes(range(256)) * 4, ("\u00e9" * 400).encode()]
            ids = [srv.publish("mp", d, event="bin-ish") for d in samples]
            for d, mid in zip(samples, ids):
                obj = await recv_obj(ws, fmt="msgpack")
                assert set(obj) == {"topic", "event", "data", "id", "timestamp"}, obj
                assert (obj["topic"], obj["event"], obj["id"]) == ("mp", "bin-ish", mid), obj
                check_timestamp(obj["timestamp"])
                try:
                    text = d.decode("utf-8")
                except UnicodeDecodeError:
                    # not UTF-8: MessagePack bin, the bytes unchanged
                    assert obj["data"] == d and isinstance(obj["data"], bytes), obj
                else:
                    assert obj["data"] == text and isinstance(obj["data"], str), obj
            # replies to commands are msgpack too, including errors
            await send_cmd(ws, "unsubscribe", "nope")
            err = await recv_obj(ws, fmt="msgpack")
            assert err["event"] == "error" and err["reason"] == "not_subscribed" \
                and err["topic"] == "nope", err
            await send_cmd(ws, "ping")
            await expect_reply(ws, {"event": "pong"}, fmt="msgpack")

    run_async(main(), 30 * S)


def test_json_subprotocol_and_format_json(pushletd):
    srv = pushletd()

    async def main():
        async with connect(srv, "/ws?topic=j", subprotocols=["pushlet.json"]) as ws:
            assert ws.subprotocol == "pushlet.json"
            await handshake_done(ws, ["j"])
        # an explicit subprotocol wins over ?format=
        async with connect(srv, "/ws?topic=j&format=msgpack", subprotocols=["pushlet.json"]) as ws:
            assert ws.subprotocol == "pushlet.json"
            await handshake_done(ws, ["j"])
        async with connect(srv, "/ws?topic=j&format=json") as ws:
            await handshake_done(ws, ["j"])
            m = srv.publish("j", "json it is")
            check_message(await recv_obj(ws), "j", "json it is", m)

    run_async(main(), 30 * S)


# --------------------------------------------------------------------------------------------
# Data fidelity


def test_non_utf8_and_special_data_in_json(pushletd):
    srv = pushletd()

    async def main():
        async with connect(srv, "/ws?topic=u") as ws:
            await handshake_done(ws, ["u"])
            exact = [  # (bytes published, string expected in JSON)
                (b"ok\xffend", "ok\ufffdend"),
                (b"\xfe\xff", "\ufffd\ufffd"),
                (b"\xc3\x28", "\ufffd("),
                (b"\x80lone", "\ufffdlone"),
                (b"over\xc0\xafong", "over\ufffd\ufffdong"),
                ("caf\u00e9 \u2603 \U0001F600 \u2028".encode(), "caf\u00e9 \u2603 \U0001F600 \u2028"),
                (b'q"b\\s/ \x00\x01\x1f\x7f\t\r\n', 'q"b\\s/ \x00\x01\x1f\x7f\t\r\n'),
                (b'</script>{"a":1}', '</script>{"a":1}'),
            ]
            loose = [b"\xed\xa0\x80surrogate", b"trunc\xe2\x82", b"\xf4\x90\x80\x80big",
                     b"\xf0\x9f\x98" + b"x", bytes(range(256))]
            for d, _ in exact:
                srv.publish("u", d)
            for d in loose:
                srv.publish("u", d)
            for d, want in exact:
                obj = await recv_obj(ws)
                assert obj["data"] == want, (d, obj["data"])
            for d in loose:
                obj = await recv_obj(ws)
                got = obj["data"]
                # every invalid byte became U+FFFD, every valid character survived in order
                assert got.replace("\ufffd", "") == d.decode("utf-8", "ignore"), (d, got)
                assert got.count("\ufffd") >= d.decode("utf-8", "replace").count("\ufffd"), \
                    (d, got)
            # the largest publish (= --max-message-size, 65536) arrives whole (64-bit length)
            big = os.urandom(32768).hex().encode()
            m = srv.publish("u", big)
            check_message(await recv_obj(ws), "u", big.decode(), m)

    run_async(main(), 30 * S)


def test_send_endpoint_reaches_ws(pushletd):
    srv = pushletd()

    async def main():
        async with connect(srv, "/ws?topic=t") as ws, connect(srv, "/ws?topic=default") as wd:
            await handshake_done(ws, ["t"])
            await handshake_done(wd, ["default"])
            c = await AsyncHTTP(srv.addr).connect()
            r1 = await c.request("GET", "/send?topic=t&message=hello+world%21")
            r2 = await c.request("POST", "/send", b"topic=t&message=form+%C3%A9%26more",
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
            r3 = await c.request("GET", "/send?message=to-default")
            assert [r.status for r in (r1, r2, r3)] == [200, 200, 200]
            check_message(await recv_obj(ws), "t", "hello world!", r1.json_id())
            check_message(await recv_obj(ws), "t", "form \u00e9&more", r2.json_id())
            check_message(await recv_obj(wd), "default", "to-default", r3.json_id())
            await no_more_messages(ws)
            await c.close()

    run_async(main(), 30 * S)


# --------------------------------------------------------------------------------------------
# Stop, stats, extensions


def test_sigterm_flushes_then_closes_1001(pushletd):
    srv = pushletd("--stop-timeout", "5")
    lib_result = {}

    async def lib_client(ready):
        async with connect(srv, "/ws?topic=stop") as ws:
            await handshake_done(ws, ["stop"])
            ready.set()
            got = []
            try:
                while True:
                    got.append(await recv_obj(ws, timeout=20))
            except websockets.ConnectionClosed:
                pass
            lib_result.update(code=ws.close_code, reason=ws.close_reason, got=got)

    raws = [RawWS(srv.addr, "/ws?topic=stop") for _ in range(3)]
    for r in raws:
        r.handshake_done(["stop"])

    async def main():
        ready = asyncio.Event()
        task = asyncio.create_task(lib_client(ready))
        await asyncio.wait_for(ready.wait(), 10 * S)
        pub = await AsyncHTTP(srv.addr).connect()
        ids = [await pub.publish("stop", f"queued-{i}") for i in range(200)]
        await pub.close()
        srv.send_signal(signal.SIGTERM)
        await asyncio.wait_for(task, 20 * S)
        return ids

    ids = run_async(main(), 40 * S)
    assert lib_result["code"] == 1001, lib_result
    assert [o["id"] for o in lib_result["got"]] == ids, "queued messages lost before close"
    for r in raws:
        got = []
        while True:
            f = r.recv_frame(timeout=10 * S)
            if f.opcode != OP_BINARY:
                break
            got.append(f.json()["id"])
        assert f.opcode == pl.OP_CLOSE and f.close_code == 1001, f
        assert got == ids
        r.send_close(1001)
        assert r.wait_eof(10 * S) == b""
        r.close()
    assert srv.wait(20 * S) == 0


def test_ws_connections_gauge(pushletd):
    srv = pushletd()
    conns = [RawWS(srv.addr, f"/ws?topic=g{i % 3}") for i in range(5)]
    st = srv.stats()
    assert st["ws_connections"] == 5 and st["sse_connections"] == 0, st
    assert st["topics"] == 3 and st["subscriptions"] == 5, st
    for c in conns[:3]:
        c.handshake_done()
        c.send_close(1000)
        c.expect_close(1000, allow_data=True)
        c.close()
    pl.wait_until(lambda: srv.stats()["ws_connections"] == 2, 5 * S, what="gauge back to 2")
    for c in conns[3:]:
        c.close()
    st = pl.wait_until(lambda: (lambda s: s if s["ws_connections"] == 0 and
                                s["subscriptions"] == 0 else None)(srv.stats()),
                       5 * S, what="gauges back to 0")
    assert st["topics"] == 0, st


def test_permessage_deflate_with_websockets(pushletd):
    """websockets offers permessage-deflate: large messages arrive compressed and intact, and
    its compressed commands are understood."""
    srv = pushletd()

    async def main():
        async with connect(srv, "/ws?topic=z", compression="deflate") as ws:
            ext = ws.response_headers.get("Sec-WebSocket-Extensions")
            assert ext is not None and "permessage-deflate" in ext, ws.response_headers
            assert [e.name for e in ws.extensions] == ["permessage-deflate"]
            await handshake_done(ws, ["z"])
            # a long command: websockets compresses it (RSV1) and the server inflates it
            await ws.send(json.dumps({"action": "subscribe", "topic": "z2",
                                      "padding": "p" * 5000}))
            await expect_reply(ws, pl.subscribed("z2"))
            datas = ["small", "large " * 2000, os.urandom(3000).hex(), "z" * 65536]
            ids = [srv.publish("z2" if i % 2 else "z", d) for i, d in enumerate(datas)]
            for i, (d, mid) in enumerate(zip(datas, ids)):
                check_message(await recv_obj(ws), "z2" if i % 2 else "z", d, mid)
            await no_more_messages(ws)

    run_async(main(), 30 * S)


def test_raw_deflate_frames_from_server(pushletd):
    srv = pushletd()
    with RawWS(srv.addr, "/ws?topic=rz", headers={
            "Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"}) as c, \
            RawWS(srv.addr, "/ws?topic=rz") as plain:
        ext = c.response.header("sec-websocket-extensions")
        assert ext is not None and ext.split(";")[0].strip() == "permessage-deflate", ext
        params = {p.strip() for p in ext.split(";")[1:]}
        assert params <= {"server_no_context_takeover", "client_no_context_takeover",
                          "server_max_window_bits=15", "client_max_window_bits=15"}, ext
        assert plain.response.header("sec-websocket-extensions") is None
        c.handshake_done(["rz"])
        plain.handshake_done(["rz"])
        big = ("compress me " * 500).encode()
        m1 = srv.publish("rz", big)
        m2 = srv.publish("rz", b"tiny")
        f = c.recv_frame()
        assert f.opcode == OP_BINARY and f.rsv == 4, f"expected a compressed frame: {f!r}"
        assert len(f.payload) < len(big) // 4, "large repetitive message not compressed"
        obj = json.loads(zlib.decompressobj(-15).decompress(f.payload + b"\x00\x00\xff\xff"))
        check_message(obj, "rz", big.decode(), m1)
        f = c.recv_frame()
        assert f.opcode == OP_BINARY, f
        payload = (zlib.decompressobj(-15).decompress(f.payload + b"\x00\x00\xff\xff")
                   if f.rsv == 4 else f.payload)
        check_message(json.loads(payload), "rz", "tiny", m2)
        # the peer without the extension gets the same messages uncompressed
        f = plain.recv_frame()
        assert f.rsv == 0, f
        check_message(f.json(), "rz", big.decode(), m1)
        check_message(plain.recv_json(), "rz", "tiny", m2)


def test_unsubscribe_everything_then_disconnect_releases_all(pushletd):
    """A connection that ends with no subscription left (it had some) must free everything:
    the gauges return to 0, and under ASan the teardown's leak check sees no leak."""
    srv = pushletd()
    for binary in (False, True):
        with RawWS(srv.addr, "/ws?topic=q1") as c:
            c.handshake_done(["q1"])
            for t in ("q2", "q3"):
                c.send_cmd("subscribe", t, binary=binary)
                assert c.recv_json() == pl.subscribed(t)
            for t in ("q1", "q2", "q3"):
                c.send_cmd("unsubscribe", t, binary=binary)
                assert c.recv_json() == {"event": "unsubscribed", "topic": t}
            c.send_close(1000)
            c.expect_close(1000)
    st = pl.wait_until(lambda: (lambda s: s if s["ws_connections"] == 0 else None)(srv.stats()),
                       5 * S, what="ws_connections == 0")
    assert st["subscriptions"] == 0 and st["topics"] == 0, st


def test_slow_ws_consumer_dropped_others_unaffected(pushletd):
    srv = pushletd("--max-output-bytes", "262144")
    slow = RawWS(srv.addr, "/ws?topic=slow", rcvbuf=4096)   # set before connect: small window
    slow.handshake_done(["slow"])

    async def main():
        fast = await AsyncWS(srv.addr, "/ws?topic=slow").connect()
        got = []
        fast.on_message = lambda p: got.append(json.loads(p))
        await fast.wait_for(lambda s: len(got) >= 2, 10 * S, "handshake replies")
        pub = await AsyncHTTP(srv.addr).connect()
        ids = []
        for i in range(400):          # 400 x 10 KB: far over the slow reader's 256 KiB bound
            ids.append(await pub.publish("slow", f"{i:05d}" + "s" * 10000))
        await fast.wait_for(lambda s: len(got) >= 402, 30 * S, "every message")
        assert [o["id"] for o in got[2:]] == ids
        await pub.close()
        await fast.close()

    run_async(main(), 60 * S)
    st = srv.stats()
    assert st["slow_consumer_drops"] >= 1, st
    # the slow one was cut off: it reaches EOF without a complete run of every message
    frames = []
    try:
        while True:
            frames.append(slow.recv_frame(timeout=10 * S))
    except pl.ConnectionClosed:
        pass
    data = [f for f in frames if f.opcode == OP_BINARY]
    assert len(data) < 402, f"slow consumer got all {len(data)} frames: not dropped"
    slow.close()
