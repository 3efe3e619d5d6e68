"""Lifecycle events for 1,000 connections arriving and leaving (issue #6), in both delivery modes:
half SSE (asyncio streams), half WebSocket (the `websockets` library, some with
permessage-deflate), over seven topics, with subscribe and unsubscribe commands on some
WebSockets; half the WebSockets leave with a close handshake, half by dropping TCP.

Exact: one CONNECTED and one DISCONNECTED per connection, SUBSCRIBED per (connection, topic),
UNSUBSCRIBED for each command and for each topic left at disconnect (text "disconnected"), every
connection's events in order, pushlet_topic_subscribers() per topic while they are connected,
after the commands, and 0 once they are gone. And what the host reads with
pushlet_topic_subscribers() as it gets a SUBSCRIBED or UNSUBSCRIBED event already counts it.
"""

import asyncio
import collections
import json

import pytest
import websockets

import pushlet_testlib as pl
from hook_host import SSE, WS, S, SSEStream, hook_host, wait_idle  # noqa: F401
from pushlet_testlib import AsyncSSE, events_path

N = 1000
TOPICS = [f"lc/{k}" for k in range(7)]


class Plan:
    """What connection i does: its transport, URL topics, and WebSocket commands."""

    def __init__(self, i):
        self.i = i
        self.user = f"u{i}"
        self.ws = i % 2 == 1
        self.url_topics = sorted({TOPICS[i % 7], TOPICS[(i // 7) % 7]})
        # Every fourth connection (all WebSockets) subscribes to one more topic by command, and
        # every eighth then unsubscribes its first URL topic.
        self.cmd_sub = TOPICS[(i + 3) % 7] if i % 4 == 1 else None
        if self.cmd_sub in self.url_topics:
            self.cmd_sub = None
        self.cmd_unsub = self.url_topics[0] if i % 8 == 1 else None
        self.clean_close = i % 4 != 3

    def topics_after_commands(self):
        t = set(self.url_topics) | ({self.cmd_sub} if self.cmd_sub else set())
        return t - ({self.cmd_unsub} if self.cmd_unsub else set())


def expected_counts(plans, after_commands):
    c = collections.Counter()
    for p in plans:
        c.update(p.topics_after_commands() if after_commands else p.url_topics)
    return {t: c[t] for t in TOPICS}


async def recv_json(ws, timeout=10.0):
    raw = await asyncio.wait_for(ws.recv(), timeout * S)
    return json.loads(raw)


async def open_client(h, p, gate):
    async with gate:
        if not p.ws:
            c = AsyncSSE(h.addr, events_path(*p.url_topics), headers={"X-User": p.user})
            await c.connect(timeout=20 * S)
            assert c.response.status == 200
            return c
        q = "&".join(f"topic={t}" for t in p.url_topics)
        ws = await websockets.connect(
            f"ws://{pl.HOST}:{h.port}/ws?{q}", extra_headers={"X-User": p.user},
            compression="deflate" if p.i % 3 == 0 else None, ping_interval=None,
            open_timeout=20 * S, close_timeout=5 * S)
        assert (await recv_json(ws))["event"] == "connected"
        for t in p.url_topics:
            assert await recv_json(ws) == pl.subscribed(t)
        return ws


async def run_commands(p, ws):
    if p.cmd_sub:
        await ws.send(json.dumps({"action": "subscribe", "topic": p.cmd_sub}))
        assert await recv_json(ws) == pl.subscribed(p.cmd_sub)
    if p.cmd_unsub:
        await ws.send(json.dumps({"action": "unsubscribe", "topic": p.cmd_unsub}))
        assert await recv_json(ws) == {"event": "unsubscribed", "topic": p.cmd_unsub}


async def leave(p, c):
    if not p.ws:
        await c.close()
    elif p.clean_close:
        await asyncio.wait_for(c.close(), 10 * S)
    else:
        c.transport.abort()


def check_counts(h, want, when):
    got = {t: h.count(t) for t in TOPICS}
    assert got == want, f"pushlet_topic_subscribers {when}"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["callback", "queue"])
def test_thousand_connections_arrive_and_leave(hook_host, mode):
    h = hook_host(mode)
    h.command("allow-user-from-header X-User")
    plans = [Plan(i) for i in range(N)]
    n_url_subs = sum(len(p.url_topics) for p in plans)
    n_cmd_subs = sum(1 for p in plans if p.cmd_sub)
    n_cmd_unsubs = sum(1 for p in plans if p.cmd_unsub)

    async def arrive():
        gate = asyncio.Semaphore(100)
        return await asyncio.gather(*(open_client(h, p, gate) for p in plans))

    async def commands(clients):
        await asyncio.gather(*(run_commands(p, c) for p, c in zip(plans, clients) if p.ws))

    async def depart(clients):
        await asyncio.gather(*(leave(p, c) for p, c in zip(plans, clients)))

    loop = asyncio.new_event_loop()
    try:
        clients = loop.run_until_complete(asyncio.wait_for(arrive(), 120 * S))
        h.wait(lambda: h.kinds["connected"] == N and h.kinds["subscribed"] == n_url_subs,
               60, "every CONNECTED and SUBSCRIBED")
        check_counts(h, expected_counts(plans, False), "with everybody connected")
        st = h.stats()
        assert (st["connections"], st["sse_connections"], st["ws_connections"]) == (N, N // 2,
                                                                                   N // 2)
        assert st["subscriptions"] == n_url_subs

        loop.run_until_complete(asyncio.wait_for(commands(clients), 60 * S))
        h.wait(lambda: h.kinds["subscribed"] == n_url_subs + n_cmd_subs and
               h.kinds["unsubscribed"] == n_cmd_unsubs, 30, "the commands' events")
        check_counts(h, expected_counts(plans, True), "after the commands")

        loop.run_until_complete(asyncio.wait_for(depart(clients), 60 * S))
    finally:
        loop.close()
    h.wait(lambda: h.kinds["disconnected"] == N and
           h.kinds["unsubscribed"] == n_url_subs + n_cmd_subs, 60,
           "every DISCONNECTED and UNSUBSCRIBED")
    st = wait_idle(h)
    assert st["subscriptions"] == 0
    check_counts(h, {t: 0 for t in TOPICS}, "after everybody left")

    # Exact per connection, in order.
    by_conn = collections.defaultdict(list)
    for e in h.events:
        by_conn[e["conn"]].append(e)
    conns = {e["user"]: e["conn"] for e in h.events if e["ev"] == "connected"}
    assert len(conns) == N and len(by_conn) == N
    for p in plans:
        evs = [e for e in by_conn[conns[p.user]] if not e["ev"].startswith("auth_")]
        kinds = [e["ev"] for e in evs]
        assert kinds[0] == "connected" and kinds[-1] == "disconnected", (p.user, kinds)
        assert kinds.count("connected") == 1 and kinds.count("disconnected") == 1, kinds
        assert all(e["user"] == p.user and e["transport"] == (WS if p.ws else SSE)
                   for e in evs), (p.user, evs)
        subscribed = [e["topic"] for e in evs if e["ev"] == "subscribed"]
        want = p.url_topics + ([p.cmd_sub] if p.cmd_sub else [])
        assert sorted(subscribed) == sorted(want), (p.user, subscribed)
        # initial topics come before anything the connection did itself
        assert sorted(subscribed[:len(p.url_topics)]) == p.url_topics
        unsub = [(e["topic"], e["text"]) for e in evs if e["ev"] == "unsubscribed"]
        by_cmd = [t for t, why in unsub if why != "disconnected"]
        at_end = [t for t, why in unsub if why == "disconnected"]
        assert by_cmd == ([p.cmd_unsub] if p.cmd_unsub else []), (p.user, unsub)
        assert sorted(at_end) == sorted(p.topics_after_commands()), (p.user, unsub)
        assert kinds[-1 - len(at_end):-1] == ["unsubscribed"] * len(at_end), kinds
    # The auth requests: one connect request per connection, one subscribe request per topic.
    assert h.kinds["auth_connect"] == N
    assert h.kinds["auth_subscribe"] == n_url_subs + n_cmd_subs


@pytest.mark.parametrize("mode", ["callback", "queue"])
def test_state_agrees_with_events(hook_host, mode):
    """A host that gets an event and then asks the broker (in the handler, or on its queue
    thread) must find the change already made. hook_host reads pushlet_topic_subscribers() as
    each SUBSCRIBED / UNSUBSCRIBED arrives (topic_count) and tries pushlet_send() to each
    connection reported DISCONNECTED (send_rc). One connection per topic: the count must be 1 at
    SUBSCRIBED and 0 at UNSUBSCRIBED (commands and disconnects); the send must be ENOENT."""
    h = hook_host(mode, "--probe-disconnect", 1)
    for i in range(5):
        sse = SSEStream(h.addr, events_path(f"solo/sse{i}"))
        assert sse.status == 200
        ws = pl.RawWS(h.addr, f"/ws?topic=solo/ws{i}")
        ws.handshake_done([f"solo/ws{i}"])
        ws.send_cmd("subscribe", f"solo/cmd{i}")
        assert ws.recv_json() == pl.subscribed(f"solo/cmd{i}")
        # A queue host reads its events later: let it see these SUBSCRIBED events before the
        # state moves on, or it would rightly find the newer state.
        mine = {f"solo/sse{i}", f"solo/ws{i}", f"solo/cmd{i}"}
        h.wait(lambda: mine <= {e["topic"] for e in h.of("subscribed")}, 10)
        ws.send_cmd("unsubscribe", f"solo/cmd{i}")
        assert ws.recv_json() == {"event": "unsubscribed", "topic": f"solo/cmd{i}"}
        ws.close()
        sse.close()
    h.wait(lambda: h.kinds["disconnected"] == 10 and h.kinds["unsubscribed"] == 15, 10)
    wait_idle(h)
    wrong = [(e["ev"], e["topic"], e["text"], e["topic_count"]) for e in h.events
             if e["ev"] in ("subscribed", "unsubscribed") and
             e["topic_count"] != (1 if e["ev"] == "subscribed" else 0)]
    sendable = [(e["conn"], e["send_rc"]) for e in h.of("disconnected") if e["send_rc"] != -11]
    assert not wrong and not sendable, (
        "the broker's state disagrees with the event just received:\n"
        f"pushlet_topic_subscribers (event, topic, text, count): {wrong!r}\n"
        f"pushlet_send to a DISCONNECTED connection (conn, rc): {sendable!r}")
