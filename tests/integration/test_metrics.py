"""GET /metrics: strict Prometheus text format (0.0.4), values in step with /stats, per-topic
figures bounded to the busiest 20 topics."""

import asyncio
import re

import pushlet_testlib as pl
from pushlet_testlib import AsyncSSE, events_path, run_async

SAMPLE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([a-z_]+)="([^"\\\n]*)"\})? (-?[0-9]+)')


def parse(text):
    """Families as {name: (type, {label_value_or_None: value})}; asserts the format rules we
    rely on: HELP then TYPE before a family's samples, families contiguous, counters _total."""
    assert text.endswith("\n"), "the exposition ends with a newline"
    families, current, seen = {}, None, set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in seen, f"family {name} split"
            seen.add(name)
            current = name
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name == current and kind in ("counter", "gauge"), line
            assert (kind == "counter") == name.endswith("_total"), line
            families[name] = (kind, {})
        else:
            m = SAMPLE.fullmatch(line)
            assert m, f"not a sample line: {line!r}"
            name, key, value, number = m.groups()
            assert name == current, f"{name} outside its family"
            samples = families[name][1]
            label = (key, value) if key else None
            assert label not in samples, f"duplicate sample {line}"
            samples[label] = int(number)
    return families


def test_metrics_parse_and_match_stats(pushletd):
    srv = pushletd("--max-topics", "2")

    async def main():
        subs = []
        for i in range(25):  # more topics than the per-topic section shows
            for _ in range(1 + i % 3):
                subs.append(await AsyncSSE(srv.addr, events_path(f"m{i}")).connect())
        bad = AsyncSSE(srv.addr, events_path("x", "y", "z"))  # over --max-topics
        await bad.connect(wait_connected=False)
        assert bad.response.status == 400
        for i in range(5):
            await asyncio.to_thread(srv.publish, "m24", f"hello {i}")
        await subs[-1].wait_messages(5, 10)

        # /metrics and /stats are two requests: a connection that closes in between (the
        # refused one lingers, each request has its own) changes the count, so take the pair
        # again until both saw the same number of connections.
        for _ in range(50):
            r = srv.get("/metrics")
            assert r.status == 200
            assert r.header("content-type").startswith("text/plain; version=0.0.4")
            fam = parse(r.body.decode())
            stats = srv.stats()
            conns = fam["pushlet_connections"][1]
            if sum(conns.values()) == stats["connections"]:
                break
            await asyncio.sleep(0.1)
        assert conns[("transport", "sse")] == stats["sse_connections"] == len(subs)
        assert conns[("transport", "websocket")] == 0
        assert sum(conns.values()) == stats["connections"]
        assert fam["pushlet_messages_in_total"][1][None] == stats["messages_in"] == 5
        assert fam["pushlet_subscriptions"][1][None] == stats["subscriptions"]
        assert fam["pushlet_rejected_total"][1][("limit", "topics_per_connection")] == 1
        assert fam["pushlet_history_messages"][1][None] == 5

        top = fam["pushlet_topic_subscribers"][1]
        assert len(top) == 20, "bounded to the busiest 20"
        # 8 topics have 3 subscribers, 8 have 2, 9 have 1: the busiest first
        assert sorted(top.values(), reverse=True) == [3] * 8 + [2] * 8 + [1] * 4
        assert top[("topic", "m23")] == 3
        assert fam["pushlet_topic_history_messages"][1][("topic", "m23")] == 0
        head = srv.request("HEAD", "/metrics")
        assert head.status == 200 and head.body == b""
        assert srv.request("POST", "/metrics").status == 405
        for s in subs + [bad]:
            await s.close()

    run_async(main(), 30 * pl.time_scale())
