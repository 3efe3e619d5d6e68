"""SSE with raw asyncio clients: several topics per stream, 1,000 x 1,000 fan-out,
publish_all, and data round-trip fidelity."""

import asyncio
import hashlib
import time
from array import array

import pytest

import pushlet_testlib as pl
from pushlet_testlib import AsyncHTTP, AsyncSSE, events_path, run_async


def test_several_topics_on_one_stream(pushletd):
    srv = pushletd()

    async def main():
        s1 = await AsyncSSE(srv.addr, events_path("x", "y", "z", "x")).connect()
        s2 = await AsyncSSE(srv.addr, events_path("y")).connect()
        assert s1.response.status == 200 and s2.response.status == 200
        pub = await AsyncHTTP(srv.addr).connect()
        sent = []
        for i in range(40):
            topic = "xyzw"[i % 4]
            sent.append((await pub.publish(topic, f"{topic}-{i}"), topic, f"{topic}-{i}"))
        end = await pub.publish("x", "end-x")
        end_y = await pub.publish("y", "end-y")
        await s1.wait_for(lambda s: any(e.data == "end-y" for e in s.events), 10, "end-y")
        await s2.wait_for(lambda s: any(e.data == "end-y" for e in s.events), 10, "end-y")
        exp1 = [(i, d) for i, t, d in sent if t in "xyz"] + [(end, "end-x"), (end_y, "end-y")]
        exp2 = [(i, d) for i, t, d in sent if t == "y"] + [(end_y, "end-y")]
        # exactly once each (a repeated topic= must not double-deliver), publish order; the
        # three-topic stream's ids are cursors (x, y, z positions), the one-topic stream's IDs
        assert [e.data for e in s1.messages()] == [d for _, d in exp1]
        for e, (mid, d) in zip(s1.messages(), exp1):
            positions, check = pl.parse_cursor(e.id)
            assert len(positions) == 3 and check and pl.id_parts(mid) in positions, (e.id, mid)
        assert [(e.id, e.data) for e in s2.messages()] == exp2
        assert all(e.event == "message" for e in s1.messages() + s2.messages())
        for s in (s1, s2, pub):
            await s.close()

    run_async(main(), 30)


@pytest.mark.timeout(180)
def test_1000_subscribers_each_get_1000_messages_in_order(pushletd):
    srv = pushletd()
    n_sub, n_msg, n_pub = 1000, 1000, 4
    per_pub = n_msg // n_pub
    budget = 60.0 * pl.time_scale()

    class Checker:
        """Validates one subscriber's stream on the fly (storing 1M events would be heavy)."""

        def __init__(self):
            self.next_seq = [0] * n_pub
            self.last_id = -1
            self.n = 0
            self.ids = array("q")
            self.digest = hashlib.sha256()
            self.errors = []

        def __call__(self, e):
            if e.event == "connected":
                return
            self.n += 1
            try:
                _, k, j = e.data.split("-")
                k, j = int(k), int(j)
                i = pl.id_seq(e.id)
            except (ValueError, TypeError):
                self.errors.append(f"unexpected event {e!r}")
                return
            if j != self.next_seq[k]:
                self.errors.append(f"publisher {k}: got seq {j}, expected {self.next_seq[k]}")
            self.next_seq[k] = j + 1
            if i <= self.last_id:
                self.errors.append(f"id {i} after {self.last_id}")
            self.last_id = i
            self.ids.append(i)
            self.digest.update(f"{e.id}|{e.event}|{e.data}\n".encode())

    async def main():
        t0 = time.monotonic()
        checkers = [Checker() for _ in range(n_sub)]
        subs = [AsyncSSE(srv.addr, events_path("load"), on_event=c) for c in checkers]
        for i in range(0, n_sub, 100):
            await asyncio.gather(*(s.connect(timeout=30) for s in subs[i:i + 100]))
        t_conn = time.monotonic() - t0

        async def stats_ok():
            c = await AsyncHTTP(srv.addr).connect()
            try:
                for _ in range(200):
                    st = (await c.request("GET", "/stats")).json()
                    if st["sse_connections"] == n_sub:
                        return st
                    await asyncio.sleep(0.05)
                raise AssertionError(f"sse_connections never reached {n_sub}: {st}")
            finally:
                await c.close()
        await stats_ok()

        async def consume(s, c):
            await s.wait_for(lambda s: c.n >= n_msg or c.errors, timeout=budget,
                             what=f"{n_msg} messages")

        consumers = [asyncio.create_task(consume(s, c)) for s, c in zip(subs, checkers)]

        published = {}  # id -> data

        async def publisher(k):
            conn = await AsyncHTTP(srv.addr).connect()
            for j in range(per_pub):
                data = f"m-{k}-{j}"
                mid = await conn.publish("load", data)
                assert mid not in published, f"id {mid} returned twice"
                published[mid] = data
            await conn.close()

        t1 = time.monotonic()
        await asyncio.gather(*(publisher(k) for k in range(n_pub)))
        t_pub = time.monotonic() - t1
        try:
            await asyncio.gather(*consumers)
        finally:
            for t in consumers:
                t.cancel()
        t_all = time.monotonic() - t1

        errs = [(i, c.errors[:3]) for i, c in enumerate(checkers) if c.errors]
        assert not errs, f"{len(errs)} subscribers saw wrong streams, e.g. {errs[:3]}"
        counts = [c.n for c in checkers]
        assert counts == [n_msg] * n_sub, f"message counts: min {min(counts)} max {max(counts)}"
        expected = hashlib.sha256()
        for mid in sorted(published, key=pl.id_seq):
            expected.update(f"{mid}|message|{published[mid]}\n".encode())
        assert all(c.ids == checkers[0].ids for c in checkers), "subscribers saw different orders"
        assert checkers[0].ids.tolist() == sorted(pl.id_seq(m) for m in published)
        assert all(c.digest.digest() == expected.digest() for c in checkers), \
            "id -> data mapping differs from the /publish answers"

        st = srv.stats()
        assert st["messages_in"] >= n_msg
        assert st["messages_out"] >= n_msg * n_sub
        assert st["slow_consumer_drops"] == 0
        print(f"connect {t_conn:.1f}s, publish {t_pub:.1f}s, all delivered {t_all:.1f}s")
        await asyncio.gather(*(s.close() for s in subs))

    run_async(main(), budget + 60)


def test_publish_all_reaches_each_connection_exactly_once(pushletd):
    srv = pushletd()

    async def main():
        a = await AsyncSSE(srv.addr, events_path("t1", "t2", "t3")).connect()
        b = await AsyncSSE(srv.addr, "/events").connect()             # default topic
        c = await AsyncSSE(srv.addr, events_path("default")).connect()
        d = await AsyncSSE(srv.addr, events_path("t1", "default")).connect()
        conn = await AsyncHTTP(srv.addr).connect()
        r = await conn.request("POST", "/publish_all?event=announce", b"hello-all")
        assert r.status == 200, r
        all_id = r.json_id()
        r = await conn.request("POST", "/publish_all", b"plain-all")
        assert r.status == 200, r
        plain_id = r.json_id()
        markers = {t: await conn.publish(t, f"marker-{t}") for t in ("t1", "t2", "t3", "default")}
        want = {a: ("t1", "t2", "t3"), b: ("default",), c: ("default",), d: ("t1", "default")}
        for s, topics in want.items():
            await s.wait_for(lambda s, topics=topics: all(
                any(e.data == f"marker-{t}" for e in s.events) for t in topics), 10, "markers")
        for s, topics in want.items():
            # publish order; publish-to-all events carry no id (not resumable)
            got = [(e.event, e.data) for e in s.messages()]
            exp = ([("announce", "hello-all"), ("message", "plain-all")]
                   + [("message", f"marker-{t}") for t in ("t1", "t2", "t3", "default")
                      if t in topics])
            assert got == exp, f"{s.path}: {got}"
            assert [e.id for e in s.messages()[:2]] == [None, None], s.path
            if len(topics) == 1:
                assert s.messages()[2].id == markers[topics[0]]
            assert pl.ID_RE.fullmatch(all_id) and pl.ID_RE.fullmatch(plain_id)
        await conn.close()
        for s in want:
            await s.close()

    run_async(main(), 30)


ROUND_TRIP = [
    ("trailing-newline", b"abc\n", "abc\n"),
    ("only-newline", b"\n", "\n"),
    ("crlf-only", b"\r\n", "\n"),
    ("empty", b"", ""),
    ("utf8", "héllo ✓ 日本語 🎉".encode(), "héllo ✓ 日本語 🎉"),
    ("leading-spaces", b"  two spaces", "  two spaces"),
    ("leading-colon", b":not a comment", ":not a comment"),
    ("field-like", b"data: x", "data: x"),
    ("mixed-endings", b"a\r\n\r\nb\r\rc\n\nd", "a\n\nb\n\nc\n\nd"),
    ("big-line", b"z" * 60000, "z" * 60000),
    ("65536-newlines", b"\n" * 65536, "\n" * 65536),   # framed ~7x larger than the data
    ("32768-crlfs", b"\r\n" * 32768, "\n" * 32768),
    ("nul-byte", b"a\x00b", "a\x00b"),
]


@pytest.mark.parametrize("name,body,want", ROUND_TRIP, ids=[r[0] for r in ROUND_TRIP])
def test_data_round_trip(pushletd, name, body, want):
    """What EventSource would show equals the published data (line ends normalised to \\n)."""
    srv = pushletd()

    async def main():
        s = await AsyncSSE(srv.addr, events_path("rt")).connect()
        conn = await AsyncHTTP(srv.addr).connect()
        r = await conn.request("POST", "/publish?topic=rt", body)
        assert r.status == 200, f"publish of {body[:40]!r} answered {r.status} {r.body!r}"
        mid = r.json_id()
        end = await conn.publish("rt", "end")
        await s.wait_for(lambda s: any(e.id == end for e in s.events), 10, "end marker")
        got = [(e.id, e.data) for e in s.messages()]
        assert got == [(mid, want), (end, "end")]
        assert not s.parser.empty_blocks
        await conn.close()
        await s.close()

    run_async(main(), 30)
