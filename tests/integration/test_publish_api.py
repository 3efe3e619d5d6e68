"""The publish API (/publish, /send, /publish_all), /stats, /healthz and the demo page."""

import asyncio
import json

import pushlet_testlib as pl
from pushlet_testlib import AsyncHTTP, AsyncSSE, events_path, run_async

STATS_KEYS = {"connections", "sse_connections", "subscriptions", "topics", "messages_in",
              "messages_out", "bytes_out", "slow_consumer_drops", "publish_rejected",
              "connections_rejected", "http_errors", "connections_total"}


def test_send_get_and_post_like_the_seed(pushletd):
    srv = pushletd()

    async def main():
        s = await AsyncSSE(srv.addr, events_path("t")).connect()
        d = await AsyncSSE(srv.addr, "/events").connect()
        c = await AsyncHTTP(srv.addr).connect()
        ids = []
        r = await c.request("GET", "/send?topic=t&message=hello+world%21")
        assert r.status == 200, r
        ids.append(r.json_id())
        r = await c.request("POST", "/send?topic=t&message=via-post-query")
        assert r.status == 200, r
        ids.append(r.json_id())
        r = await c.request("POST", "/send", b"topic=t&message=form+body+%C3%A9%26more",
                            headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status == 200, r
        ids.append(r.json_id())
        r = await c.request("GET", "/send?message=to-default")   # topic defaults to "default"
        assert r.status == 200, r
        default_id = r.json_id()
        await s.wait_messages(3, 10)
        await d.wait_messages(1, 10)
        assert [(e.id, e.event, e.data) for e in s.messages()] == [
            (ids[0], "message", "hello world!"), (ids[1], "message", "via-post-query"),
            (ids[2], "message", "form body \u00e9&more")]
        assert [(e.id, e.data) for e in d.messages()] == [(default_id, "to-default")]
        for x in (s, d, c):
            await x.close()

    run_async(main(), 30)


def test_publish_answers_id_equal_to_sse_id_and_increasing(pushletd):
    srv = pushletd()

    async def main():
        s = await AsyncSSE(srv.addr, events_path("a", "b")).connect()
        c = await AsyncHTTP(srv.addr).connect()
        got = []
        for i in range(20):
            r = await c.request("POST", f"/publish?topic={'ab'[i % 2]}&event=ev{i % 3}",
                                f"payload {i}".encode())
            assert r.status == 200
            assert (r.header("content-type") or "").startswith("application/json"), r.headers
            body = json.loads(r.body)
            assert set(body) == {"id"}, body
            got.append((body["id"], f"ev{i % 3}", f"payload {i}"))
        for t in "ab":  # consecutive per topic
            ids = [pl.id_seq(g[0]) for i, g in enumerate(got) if "ab"[i % 2] == t]
            assert ids == list(range(ids[0], ids[0] + 10)), ids
        await s.wait_messages(20, 10)
        msgs = s.messages()
        assert [(e.event, e.data) for e in msgs] == [g[1:] for g in got]
        # a stream of two topics: its id is a cursor holding the latest position of each
        for i, e in enumerate(msgs):
            positions, check = pl.parse_cursor(e.id)
            assert check and positions[i % 2] == pl.id_parts(got[i][0]), (e.id, got[i])
            if i:
                assert positions[1 - i % 2] == pl.id_parts(got[i - 1][0]), (e.id, got[i - 1])
        await s.close()
        await c.close()

    run_async(main(), 30)


def test_stats_keys_and_values(pushletd):
    srv = pushletd()
    st = srv.stats()
    assert STATS_KEYS <= set(st), f"missing keys: {STATS_KEYS - set(st)}"
    for k in STATS_KEYS:
        assert isinstance(st[k], int) and not isinstance(st[k], bool) and st[k] >= 0, (k, st[k])
    assert st["sse_connections"] == 0 and st["messages_in"] == 0 and st["subscriptions"] == 0

    async def main():
        s1 = await AsyncSSE(srv.addr, events_path("x", "y")).connect()
        s2 = await AsyncSSE(srv.addr, events_path("y", "z")).connect()
        s3 = await AsyncSSE(srv.addr, "/events").connect()
        c = await AsyncHTTP(srv.addr).connect()
        for t in ("x", "y", "z", "nobody"):
            await c.publish(t, f"to-{t}")
        await s1.wait_messages(2, 10)
        await s2.wait_messages(2, 10)
        r = await c.request("GET", "/nope")
        assert r.status == 404
        st = (await c.request("GET", "/stats")).json()
        assert st["sse_connections"] == 3, st
        assert st["connections"] >= 4, st          # three streams + this connection
        assert st["subscriptions"] == 5, st        # x, y, y, z, default
        assert st["topics"] >= 4, st               # x, y, z, default have subscribers
        assert st["messages_in"] == 4, st
        assert st["messages_out"] == 4, st         # x->1, y->2, z->1 (+0 for "nobody")
        assert st["bytes_out"] > 0, st
        assert st["connections_total"] >= 4, st
        assert st["http_errors"] >= 1, st
        assert st["slow_consumer_drops"] == 0, st
        assert st["connections_rejected"] == 0, st
        for x in (s1, s2, s3):
            await x.close()
        # closed streams disappear from the gauges (the server notices asynchronously)
        for _ in range(100):
            st = (await c.request("GET", "/stats")).json()
            if st["sse_connections"] == 0 and st["subscriptions"] == 0:
                break
            await asyncio.sleep(0.05)
        assert st["sse_connections"] == 0 and st["subscriptions"] == 0, st
        assert st["connections"] >= 1
        await c.close()

    run_async(main(), 30)


def test_healthz(pushletd):
    srv = pushletd()
    r = srv.get("/healthz")
    assert r.status == 200
    assert r.body.strip() == b"ok"


def test_demo_page_served(pushletd):
    srv = pushletd()
    r = srv.get("/")
    assert r.status == 200
    assert (r.header("content-type") or "").startswith("text/html"), r.headers
    assert b"EventSource" in r.body
