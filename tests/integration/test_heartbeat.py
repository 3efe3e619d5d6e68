"""SSE heartbeat comments."""

import time

import pushlet_testlib as pl
from pushlet_testlib import AsyncSSE, events_path, run_async


def test_heartbeat_comments(pushletd):
    srv = pushletd("--heartbeat", "0.3")

    async def main():
        s = await AsyncSSE(srv.addr, events_path("hb")).connect()
        t0 = time.monotonic()
        await s.wait_for(lambda s: len(s.parser.comments) >= 4, 5 * pl.time_scale(),
                         "4 heartbeat comments")
        elapsed = time.monotonic() - t0
        assert all(c.strip() == "heartbeat" for c in s.parser.comments), s.parser.comments
        # 4 beats at 0.3 s cannot arrive much faster than ~0.9 s (the first may be early)
        assert elapsed >= 0.6, f"4 heartbeats in {elapsed:.2f}s: not paced at 0.3 s"
        assert s.messages() == [], "heartbeats must be comments, not events"
        # heartbeats do not disturb messages
        mid = srv.publish("hb", "between beats")
        await s.wait_messages(1, 5)
        assert [(e.id, e.data) for e in s.messages()] == [(mid, "between beats")]
        await s.close()

    run_async(main(), 30)


def test_no_heartbeat_before_interval(pushletd):
    srv = pushletd("--heartbeat", "30")

    async def main():
        s = await AsyncSSE(srv.addr, events_path("hb")).connect()
        srv.publish("hb", "x")
        await s.wait_messages(1, 5)
        assert s.parser.comments == []
        await s.close()

    run_async(main(), 20)
