"""A subscriber that never reads is cut off at --max-output-bytes; others are unaffected and
server memory stays bounded."""

import asyncio
import os
import time

import pytest

import pushlet_testlib as pl
from pushlet_testlib import AsyncHTTP, AsyncSSE, RawHTTP, events_path, run_async

MAX_OUT = 65536
MSG_SIZE = 8192
N_MSG = 6400            # 6400 x 8 KiB = 50 MiB published
WINDOW = 4              # fast readers are never more than 4 messages (32 KiB) behind
N_FAST = 3
RSS_LIMIT_KB = 50 * 1024


def server_env():
    """ASan keeps freed memory in a quarantine (256 MB by default): shrink it so RSS reflects
    what the server holds, not what the sanitizer delays reusing."""
    if not pl.binary_is_sanitized():
        return None
    opts = os.environ.get("ASAN_OPTIONS", "")
    return {"ASAN_OPTIONS": (opts + ":" if opts else "") + "quarantine_size_mb=8"}


def open_slow_subscriber(srv, topic):
    """Raw socket with a tiny receive buffer; reads the head and preamble, then never again."""
    c = RawHTTP(srv.addr, timeout=10, rcvbuf=4096)
    c.send(pl.build_request("GET", events_path(topic), b"", {"Accept": "text/event-stream"},
                            srv.addr))
    deadline = time.monotonic() + 10
    head = c.read_until(b"\r\n\r\n", deadline)
    assert b" 200 " in head.split(b"\r\n")[0], head
    c.read_until(b"Connection established\n\n", deadline)
    return c


@pytest.mark.timeout(240)
def test_slow_consumer_dropped_others_get_everything_memory_bounded(pushletd):
    srv = pushletd("--max-output-bytes", str(MAX_OUT), env=server_env())
    slow = open_slow_subscriber(srv, "flood")

    class Fast:
        def __init__(self):
            self.n = 0
            self.errors = []
            self.last = -1

        def __call__(self, e):
            if e.event == "connected":
                return
            seq_s, _, pad = e.data.partition(":")
            if not seq_s.isdigit() or int(seq_s) != self.n or len(e.data) != MSG_SIZE:
                self.errors.append(f"message {self.n}: got {e.data[:30]!r} ({len(e.data)} B)")
            if pl.id_seq(e.id) <= self.last:
                self.errors.append(f"id {e.id} after {self.last}")
            self.last = pl.id_seq(e.id)
            self.n += 1
            progress.set()

    progress = None
    samples = []
    drop_seen_at = None

    async def main():
        nonlocal progress, drop_seen_at
        progress = asyncio.Event()
        fast = [Fast() for _ in range(N_FAST)]
        subs = [await AsyncSSE(srv.addr, events_path("flood"), on_event=f).connect()
                for f in fast]
        readers = [asyncio.create_task(s.wait_for(lambda s, f=f: f.n >= N_MSG or f.errors,
                                                  timeout=180 * pl.time_scale(),
                                                  what=f"{N_MSG} messages"))
                   for s, f in zip(subs, fast)]
        conn = await AsyncHTTP(srv.addr).connect()
        stats_conn = await AsyncHTTP(srv.addr).connect()
        rss0 = srv.rss_kb()
        for n in range(N_MSG):
            while min(f.n for f in fast) < n - WINDOW:
                if any(r.done() for r in readers):
                    break
                progress.clear()
                try:
                    await asyncio.wait_for(progress.wait(), 20)
                except asyncio.TimeoutError:
                    raise AssertionError(f"fast subscribers stalled at {[f.n for f in fast]} "
                                         f"while publishing message {n}") from None
            if any(r.done() for r in readers):
                break
            data = f"{n}:".encode() + b"p" * (MSG_SIZE - len(f"{n}:"))
            await conn.publish("flood", data)
            if n % 200 == 0:
                samples.append((n, srv.rss_kb()))
                if drop_seen_at is None:
                    st = (await stats_conn.request("GET", "/stats")).json()
                    if st["slow_consumer_drops"] >= 1:
                        drop_seen_at = n
        await asyncio.gather(*readers)
        samples.append((N_MSG, srv.rss_kb()))
        for f in fast:
            assert not f.errors, f.errors[:5]
            assert f.n == N_MSG
        st = (await stats_conn.request("GET", "/stats")).json()
        assert st["slow_consumer_drops"] >= 1, st
        await conn.close()
        await stats_conn.close()
        for s in subs:
            await s.close()
        return rss0

    rss0 = run_async(main(), 220 * pl.time_scale())

    # the slow subscriber was disconnected: it reads a consistent prefix, then EOF or reset
    got = slow.wait_closed(timeout=10)
    slow.close()
    p = pl.SSEParser()
    evs = [e for e in p.feed(got) if e.event != "connected"]
    assert len(got) < 16 * 1024 * 1024, f"slow consumer received {len(got)} bytes"
    for i, e in enumerate(evs):
        assert e.data.startswith(f"{i}:"), f"slow consumer stream has a gap at {i}: {e.data[:20]}"
    assert drop_seen_at is not None and drop_seen_at * MSG_SIZE <= 16 * 1024 * 1024, \
        f"slow consumer dropped only after message {drop_seen_at}"
    growth = max(kb for _, kb in samples) - rss0
    assert growth < RSS_LIMIT_KB, f"RSS grew by {growth} kB (samples: {samples})"
    st = srv.stats()
    assert st["sse_connections"] == 0, st
    print(f"slow consumer got {len(evs)} messages; dropped by message {drop_seen_at}; "
          f"RSS {rss0} kB -> max {rss0 + growth} kB")


def test_slow_consumer_bound_is_per_connection_not_global(pushletd):
    """Two slow consumers on different topics: each dropped, a reader of a third topic and a
    reader of the same topics are unaffected."""
    srv = pushletd("--max-output-bytes", str(MAX_OUT))
    slow1 = open_slow_subscriber(srv, "s1")
    slow2 = open_slow_subscriber(srv, "s2")

    async def main():
        reader = await AsyncSSE(srv.addr, events_path("s1", "s2", "quiet")).connect()
        conn = await AsyncHTTP(srv.addr).connect()
        body = b"q" * MSG_SIZE
        n = 0
        deadline = time.monotonic() + 60 * pl.time_scale()
        while srv.stats()["slow_consumer_drops"] < 2:
            assert time.monotonic() < deadline, f"drops: {srv.stats()}"
            for t in ("s1", "s2"):
                await conn.publish(t, body)
                n += 1
            await reader.wait_for(lambda s: len(s.messages()) >= n, 20, f"{n} messages")
        await conn.publish("quiet", "still-here")
        await reader.wait_for(lambda s: any(e.data == "still-here" for e in s.events), 10,
                              "still-here")
        assert len(reader.messages()) == n + 1
        await conn.close()
        await reader.close()

    run_async(main(), 120 * pl.time_scale())
    for s in (slow1, slow2):
        s.wait_closed(timeout=10)
        s.close()
