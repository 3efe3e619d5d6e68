"""Distributed mode (issue #5): several pushletd nodes sharing real redis-servers.

Real sockets only: pushletd nodes started with `--redis ...`, redis-server processes started by
redis_fixtures.py (killed with SIGKILL and restarted on the same port mid-stream), raw SSE and
WebSocket subscribers (the clients of test_resume_sse.py / test_resume_ws.py), and a raw RESP
client to look at what the nodes stored in Redis.

1. three nodes, publishes on all three at once: every subscriber (SSE and WebSocket, on every
   node) gets every message of its topic once, with the same IDs in the same order; one
   publish_all reaches every connection once;
2. resume on another node with an ID got from the first one (SSE Last-Event-ID, WebSocket
   `since`);
3. Redis killed with SIGKILL and restarted under a steady publish stream, persistent (AOF,
   fsync always) and not (a new epoch): nothing answered 200 is lost, nothing arrives twice;
4. --redis-password / --redis-db and the redis:// URL form (keys land in db 3 only); a wrong
   password, a missing one and an unreachable Redis stop pushletd at startup with a message;
5. two shards: topics spread over both; one shard down does not stop the other's topics, and
   its own topics catch up once it is back;
6. /stats and /metrics follow Redis going down and coming back; while it is down new
   subscriptions are refused with 503 / an error reply after the connect timeout;
7. a node killed with SIGKILL: its clients resume on another node with no loss;
8. one node cut off from Redis (through a TCP proxy) while another keeps publishing: once back,
   it catches up from the history, its subscribers see no gap and no duplicate; the same when
   only its pub/sub connection is reset, again and again; Redis losing its data (FLUSHALL)
   with every node connected, then while one is cut off;
9. joining a topic on one node while another publishes to it (no gap at the seam); the history
   window across nodes (history_expired gap); `--redis A,B` and `unix:/path` give the same
   shards, publish_all once with two shards; Redis refusing a publish (OOM); the bound on
   publishes waiting for Redis (503).

Each test prints a one-line summary (pytest -s). Run time: about 45 s on 2 cores (70-80 s
under ASan).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.parse
from collections import Counter

import pytest

import pushlet_testlib as pl
from pushlet_testlib import RawHTTP
from redis_fixtures import (HAVE_REDIS, REDIS_SERVER, cluster, free_port,  # noqa: F401
                            redis_server, run_pushletd_expect_exit, tcp_proxy)
from test_resume_sse import SSEClient, parse_id, publish_on, scaled
from test_resume_ws import WSClient

pytestmark = pytest.mark.skipif(not HAVE_REDIS, reason=f"no redis-server at {REDIS_SERVER}")


# --------------------------------------------------------------------------------------------
# helpers


def http_publish(node, topic, data, timeout=10.0, event=None):
    """One publish on a fresh connection; asserts 200 and returns the ID."""
    with RawHTTP(node.addr, timeout=scaled(timeout)) as c:
        return publish_on(c, topic, data, event)


def seqs(ids):
    return [parse_id(i)[1] for i in ids]


def check_ordered(ids, what, one_epoch=True):
    """IDs of one topic as a subscriber saw them: SEQ strictly increasing within an epoch, an
    epoch never comes back once another one started (one_epoch: only one epoch at all)."""
    parsed = [parse_id(i) for i in ids]
    epochs = []
    for e, _ in parsed:
        if not epochs or epochs[-1] != e:
            assert e not in epochs, f"{what}: epoch {e} comes back after {epochs}: {ids}"
            epochs.append(e)
    if one_epoch:
        assert len(epochs) <= 1, f"{what}: several epochs {epochs}"
    for (e0, s0), (e1, s1), i0, i1 in zip(parsed, parsed[1:], ids, ids[1:]):
        if e0 == e1:
            assert s1 > s0, f"{what}: {i1} after {i0} (not in the order of the IDs)"


class Collector(threading.Thread):
    """A subscriber that reads in its own thread until stop(): an SSE stream of one topic
    (the id: line is then the message ID) or a WebSocket subscribed to several topics.

    msgs[topic] = [(id, data), ...] for "message" events in the order received; others =
    [(event, topic, id, data)] for everything else (gap, publish_all events...)."""

    def __init__(self, name, kind, node, topics):
        super().__init__(daemon=True, name=name)
        assert kind in ("sse", "ws")
        assert kind == "ws" or len(topics) == 1
        self.kind = kind
        self.node = node
        self.topics = list(topics)
        self.msgs = {t: [] for t in self.topics}
        self.others = []
        self.lock = threading.Lock()
        self.stop_ev = threading.Event()
        self.error = None
        self.start_ids = {}
        self.c = None

    def open(self, since=None):
        """Connect and subscribe (in the caller's thread); since: {topic: id} to resume."""
        since = since or {}
        if self.kind == "sse":
            t = self.topics[0]
            self.c = SSEClient(self.node.addr, [t], since.get(t), timeout=20.0)
            self.start_ids[t] = self.c.expect_connected(1).id
        else:
            self.c = WSClient(self.node.addr, timeout=20.0)
            self.c.expect_connected()
            for t in self.topics:
                self.c.subscribe(t, since.get(t))
            for _ in self.topics:
                j = self.c.recv()
                if j.get("event") != "subscribed":
                    raise AssertionError(f"{self.name}: expected a subscribed reply, got {j}")
                parse_id(j.get("id"))
                self.start_ids[j["topic"]] = j["id"]
            assert set(self.start_ids) == set(self.topics), self.start_ids
        return self

    def _read_one(self):
        if self.kind == "sse":
            e = self.c.next_event(0.3)
            return e.event, self.topics[0], e.id, e.data
        j = self.c.recv(0.3)
        return j.get("event"), j.get("topic"), j.get("id"), j.get("data")

    def run(self):
        try:
            while not self.stop_ev.is_set():
                try:
                    ev, topic, mid, data = self._read_one()
                except pl.Timeout:
                    continue
                with self.lock:
                    if ev == "message" and topic in self.msgs:
                        self.msgs[topic].append((mid, data))
                    else:
                        self.others.append((ev, topic, mid, data))
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e

    def snapshot(self):
        with self.lock:
            return {t: list(v) for t, v in self.msgs.items()}, list(self.others)

    def has_data(self, topic, data) -> bool:
        with self.lock:
            return any(d == data for _, d in self.msgs[topic])

    def last_id(self, topic):
        with self.lock:
            return self.msgs[topic][-1][0] if self.msgs[topic] else self.start_ids.get(topic)

    def stop(self):
        self.stop_ev.set()
        self.join(scaled(10))
        assert not self.is_alive(), f"{self.name}: reader thread did not stop"
        if self.c is not None:
            self.c.close()

    def check_alive(self):
        if self.error is not None:
            raise AssertionError(f"subscriber {self.name} on port {self.node.port} failed: "
                                 f"{self.error!r}") from self.error


def start_collectors(nodes, topics, ws=True, sse=True):
    cols = []
    for i, n in enumerate(nodes):
        if sse:
            for t in topics:
                cols.append(Collector(f"sse{i}-{t}", "sse", n, [t]).open())
        if ws:
            cols.append(Collector(f"ws{i}", "ws", n, topics).open())
    for c in cols:
        c.start()
    return cols


def wait_all_seen(cols, markers, timeout, what="the end markers"):
    """Wait until every collector has each (topic, data) of markers for its topics."""
    def done():
        for c in cols:
            c.check_alive()
            for t, d in markers:
                if t in c.msgs and not c.has_data(t, d):
                    return False
        return True
    try:
        pl.wait_until(done, scaled(timeout), interval=0.05, what=what)
    except pl.Timeout:
        missing = [(c.name, t, d, len(c.msgs[t])) for c in cols for t, d in markers
                   if t in c.msgs and not c.has_data(t, d)]
        raise pl.Timeout(f"timed out after {timeout}s waiting for {what}; missing "
                         f"(subscriber, topic, data, messages got): {missing[:12]}") from None


def stop_all(cols):
    for c in cols:
        c.stop()
    for c in cols:
        c.check_alive()


class Outcomes:
    """What each publish was answered: ok (200 + id), rejected (503, or the request never
    reached the node), maybe (sent but no answer: timeout or connection lost)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.ok = {}         # (topic, data) -> id
        self.rejected = {}   # (topic, data) -> reason
        self.maybe = {}      # (topic, data) -> reason
        self.t_ok = {}       # (topic, data) -> (t_sent, t_answered) monotonic
        self.max_latency = 0.0

    def record(self, topic, data, kind, value, t0, t1):
        with self.lock:
            getattr(self, kind)[(topic, data)] = value
            if kind == "ok":
                self.t_ok[(topic, data)] = (t0, t1)
            self.max_latency = max(self.max_latency, t1 - t0)

    def ok_since(self, t, topics=None) -> int:
        """Publishes sent at or after monotonic time t (to one of topics) answered 200."""
        with self.lock:
            return sum(1 for (tp, _), (t0, _) in self.t_ok.items()
                       if t0 >= t and (topics is None or tp in topics))

    def summary(self):
        return (f"{len(self.ok)} ok, {len(self.rejected)} rejected, {len(self.maybe)} maybe, "
                f"slowest answer {self.max_latency:.2f}s; rejected reasons: "
                f"{Counter(self.rejected.values()).most_common(3)}; maybe: "
                f"{Counter(self.maybe.values()).most_common(3)}")


def try_publish(conns, node, topic, data, outcomes, timeout):
    """POST /publish on node over a cached keep-alive connection; records the outcome."""
    q = urllib.parse.urlencode({"topic": topic})
    t0 = time.monotonic()
    c = conns.get(node.port)
    try:
        if c is None:
            c = conns[node.port] = RawHTTP(node.addr, timeout=timeout)
    except OSError as e:
        outcomes.record(topic, data, "rejected", f"connect: {e.__class__.__name__}", t0,
                        time.monotonic())
        return
    try:
        c.send(pl.build_request("POST", "/publish?" + q, data.encode(), None, node.addr))
        r = c.read_response()
    except (OSError, pl.ConnectionClosed, pl.Timeout) as e:
        c.close()
        conns.pop(node.port, None)
        outcomes.record(topic, data, "maybe", e.__class__.__name__, t0, time.monotonic())
        return
    t1 = time.monotonic()
    if r.status == 200:
        outcomes.record(topic, data, "ok", r.json_id(), t0, t1)
    elif r.status == 503:
        outcomes.record(topic, data, "rejected", "503", t0, t1)
    else:
        raise AssertionError(f"publish {topic}/{data} on port {node.port} answered {r.status} "
                             f"{r.body[:200]!r}")
    if r.wants_close():
        c.close()
        conns.pop(node.port, None)


class SteadyPublisher(threading.Thread):
    """Publishes "<name>-<n>" to the topics in turn, on the nodes in turn, at about `rate` per
    second (None: as fast as the answers come), until stop(); each answer goes to `outcomes`."""

    def __init__(self, name, nodes, topics, outcomes, rate, timeout=20.0, offset=0):
        super().__init__(daemon=True, name=name)
        self.nodes = nodes
        self.topics = topics
        self.outcomes = outcomes
        self.period = 1.0 / rate if rate else 0.0
        self.timeout = scaled(timeout)
        self.offset = offset
        self.stop_ev = threading.Event()
        self.error = None
        self.sent = 0

    def run(self):
        conns = {}
        try:
            i = 0
            next_t = time.monotonic()
            while not self.stop_ev.is_set():
                node = self.nodes[(i + self.offset) % len(self.nodes)]
                topic = self.topics[i % len(self.topics)]
                try_publish(conns, node, topic, f"{self.name}-{i}", self.outcomes, self.timeout)
                self.sent += 1
                i += 1
                next_t += self.period
                delay = next_t - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                else:
                    next_t = time.monotonic()
        except BaseException as e:  # noqa: BLE001
            self.error = e
        finally:
            for c in conns.values():
                c.close()

    def stop(self):
        self.stop_ev.set()
        self.join(self.timeout + scaled(10))
        assert not self.is_alive(), f"publisher {self.name} did not stop"
        if self.error is not None:
            raise AssertionError(f"publisher {self.name} failed: {self.error!r}") from self.error


def check_against_outcomes(cols, outcomes, topics, persistent, t_restarted=None):
    """After an outage: per topic, every subscriber saw the same list; no ID and no data twice;
    in the order of the IDs; nothing outside ok + maybe; and every ok (persistent), or every ok
    sent after the restart (not persistent), is there with the ID it was answered with."""
    ok, maybe, rejected = outcomes.ok, outcomes.maybe, outcomes.rejected
    per_topic = {}
    info = {"lost_before_restart": 0, "cross_epoch_copies": 0}
    for c in cols:
        msgs, others = c.snapshot()
        for t in c.topics:
            got = msgs[t]
            what = f"{c.name} (port {c.node.port}) topic {t}"
            ids = [i for i, _ in got]
            datas = [d for _, d in got]
            dup_ids = [i for i, n in Counter(ids).items() if n > 1]
            dup_data = [d for d, n in Counter(datas).items() if n > 1]
            if not persistent:
                # a publish applied just before Redis lost everything and sent again (its reply
                # was lost) is applied again in the new epoch: unavoidable, and the two copies
                # have different IDs. Within one epoch it would be a real duplicate.
                n_dup = len(dup_data)
                dup_data = [d for d in dup_data if len({parse_id(i)[0] for i, dd in got
                                                        if dd == d}) < 2]
                info["cross_epoch_copies"] += n_dup - len(dup_data)
            assert not dup_ids, f"{what}: IDs seen twice: {dup_ids[:10]}"
            assert not dup_data, f"{what}: messages seen twice: {dup_data[:10]}"
            check_ordered(ids, what, one_epoch=persistent)
            for mid, d in got:
                key = (t, d)
                if key in ok:
                    # not persistent: a copy applied in the lost epoch (answer lost, sent again)
                    # may precede the one the answer names; the latter must be there too
                    assert ok[key] == mid or (not persistent and (ok[key], d) in got
                                              and parse_id(mid)[0] != parse_id(ok[key])[0]), \
                        f"{what}: {d} arrived as {mid}, /publish said {ok[key]}"
                elif key in rejected:
                    raise AssertionError(f"{what}: {d} arrived as {mid} although its publish was "
                                         f"rejected ({rejected[key]})")
                else:
                    assert key in maybe, f"{what}: unknown message {d!r} ({mid})"
            have = set(datas)
            must = [(d, mid) for (tt, d), mid in ok.items() if tt == t and (
                persistent or outcomes.t_ok[(tt, d)][0] >= t_restarted)]
            info["lost_before_restart"] += sum(1 for (tt, d) in ok if tt == t and d not in have)
            lost = sorted((mid, d) for d, mid in must if d not in have)
            if lost:
                # where the stream was when they went missing: the neighbours of the first one
                first_seq = parse_id(lost[0][0])[1]
                near = [x for x in got if parse_id(x[0])[0] == parse_id(lost[0][0])[0]
                        and parse_id(x[0])[1] <= first_seq + 3][-6:]
                k = next((i for i, x in enumerate(got) if x in near), len(got))
                raise AssertionError(
                    f"{what}: {len(lost)} messages answered 200 were not delivered (first: "
                    f"{lost[:8]}); received around them: {got[max(0, k - 3):k + 6]}; other "
                    f"events: {others[:6]}; {outcomes.summary()}")
            if persistent:
                gaps = [o for o in others if o[0] == "gap"]
                assert not gaps, f"{what}: gap events with a persistent Redis: {gaps}"
            per_topic.setdefault(t, []).append((c.name, got))
    for t, lists in per_topic.items():
        if not persistent:
            # Redis lost the old epoch's tail: subscribers may differ there, not after it
            last = parse_id(ok[(t, f"end-{t}-0")])[0] if (t, f"end-{t}-0") in ok else None
            lists = [(name, [x for x in got if parse_id(x[0])[0] == last])
                     for name, got in lists]
        ref_name, ref = lists[0]
        for name, got in lists[1:]:
            if got != ref:
                i = next((k for k, (a, b) in enumerate(zip(got, ref)) if a != b),
                         min(len(got), len(ref)))
                raise AssertionError(
                    f"topic {t}: {name} and {ref_name} differ at #{i}: {got[i:i + 3]} vs "
                    f"{ref[i:i + 3]} ({len(got)} vs {len(ref)} messages)")
    return info


def pending_count(obj) -> int:
    """The largest integer under a key containing "pending" anywhere in obj."""
    best = 0
    if isinstance(obj, dict):
        for k, v in obj.items():
            if "pending" in k and isinstance(v, int) and not isinstance(v, bool):
                best = max(best, v)
            else:
                best = max(best, pending_count(v))
    elif isinstance(obj, list):
        for v in obj:
            best = max(best, pending_count(v))
    return best


def redis_state(node) -> tuple:
    """(state, /stats JSON): "ready" / "connecting" / "down" from the "redis" object of /stats,
    or, without one, from the flat redis_shards_down counter ("ready" when 0, else "down")."""
    st = node.stats()
    red = st.get("redis")
    if isinstance(red, dict) and "state" in red:
        return red["state"], st
    assert "redis_shards_down" in st, f"/stats says nothing about Redis: {st}"
    return ("ready" if st["redis_shards_down"] == 0 else "down"), st


# --------------------------------------------------------------------------------------------
# 1. three nodes, concurrent publishes


@pytest.mark.timeout(60)
def test_three_nodes_same_messages_same_ids_everywhere(redis_server, cluster):
    r = redis_server()
    nodes = cluster(3, [r])
    topics = ["d-a", "d-b", "d-c"]
    cols = start_collectors(nodes, topics)
    per_thread = 200
    published = {t: {} for t in topics}   # data -> id
    errors = []

    def publish_from(k, node):
        try:
            with RawHTTP(node.addr, timeout=scaled(20)) as c:
                for i in range(per_thread):
                    t = topics[(i + k) % len(topics)]
                    d = f"n{k}-{i}"
                    published[t][d] = publish_on(c, t, d)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    try:
        t0 = time.monotonic()
        threads = [threading.Thread(target=publish_from, args=(k, n), daemon=True)
                   for k, n in enumerate(nodes)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(scaled(40))
        assert not errors, f"publishing failed: {errors[0]!r}"
        assert not any(th.is_alive() for th in threads), "publishers did not finish"
        pub_s = time.monotonic() - t0
        markers = [(t, f"end-{t}") for t in topics]
        for k, (t, d) in enumerate(markers):
            published[t][d] = http_publish(nodes[k % 3], t, d)
        wait_all_seen(cols, markers, 20)

        # publish_all from one node: every connection of every node gets it once
        with RawHTTP(nodes[1].addr, timeout=scaled(10)) as c:
            resp = c.request("POST", "/publish_all?event=announce", body=b"to everyone")
        assert resp.status == 200, resp
        pl.wait_until(lambda: all(any(o[0] == "announce" for o in c.snapshot()[1])
                                  for c in cols), scaled(10), what="publish_all everywhere")
        markers2 = [(t, f"end2-{t}") for t in topics]
        for t, d in markers2:
            published[t][d] = http_publish(nodes[2], t, d)
        wait_all_seen(cols, markers2, 10)
    finally:
        stop_all(cols)

    for t in topics:
        ids = list(published[t].values())
        assert len(set(ids)) == len(ids), f"topic {t}: /publish answered the same ID twice"
        epochs = {parse_id(i)[0] for i in ids}
        assert len(epochs) == 1, f"topic {t}: several epochs {epochs}"
        expect = sorted(published[t].items(), key=lambda kv: parse_id(kv[1])[1])
        expect = [(i, d) for d, i in expect]
        s = seqs([i for i, _ in expect])
        assert s == sorted(set(s)), f"topic {t}: seqs not strictly increasing"
    for c in cols:
        msgs, others = c.snapshot()
        for t in c.topics:
            expect = sorted(((i, d) for d, i in published[t].items()),
                            key=lambda x: parse_id(x[0])[1])
            got = msgs[t]
            if got != expect:
                lost = set(expect) - set(got)
                dup = [x for x, n in Counter(got).items() if n > 1]
                raise AssertionError(
                    f"{c.name} (port {c.node.port}) topic {t}: {len(got)} messages, expected "
                    f"{len(expect)}; lost {sorted(lost)[:5]}, twice {dup[:5]}; first "
                    f"difference at #{next((k for k, (a, b) in enumerate(zip(got, expect)) if a != b), None)}")
        ann = [o for o in others if o[0] == "announce"]
        assert len(ann) == 1 and ann[0][3] == "to everyone", \
            f"{c.name}: publish_all arrived {len(ann)} times: {ann}"
        assert not [o for o in others if o[0] != "announce"], f"{c.name}: {others}"
    print(f"\n3 nodes: {3 * per_thread} publishes in {pub_s:.2f}s, "
          f"{len(cols)} subscribers agree")


# --------------------------------------------------------------------------------------------
# 2. resume on another node


@pytest.mark.timeout(60)
def test_sse_resume_on_another_node(redis_server, cluster):
    r = redis_server()
    a, b, c = cluster(3, [r])
    t = "x-sse"
    s = SSEClient(a.addr, [t])
    s.expect_connected()
    first = [http_publish(a if i % 2 else c, t, f"m{i}") for i in range(6)]
    got = [s.next_event(5) for _ in range(6)]
    assert [(e.id, e.data) for e in got] == [(first[i], f"m{i}") for i in range(6)]
    last = s.last_id
    assert last == first[-1]
    s.close()
    missed = [http_publish(c, t, f"m{i}") for i in range(6, 16)]
    s = SSEClient(b.addr, [t], last)
    s.expect_connected()
    got = [s.next_event(5) for _ in range(10)]
    assert [(e.event, e.id, e.data) for e in got] == \
        [("message", missed[i - 6], f"m{i}") for i in range(6, 16)], "replay on node B"
    live = http_publish(a, t, "live")
    e = s.next_event(5)
    assert (e.id, e.data) == (live, "live"), f"live message after the replay: {e}"
    s.no_event_within(0.3)
    s.close()
    # the query form (last_event_id=) and the connected event's position, on node C
    s = SSEClient(c.addr, [t], first[2], via="query")
    s.expect_connected()
    got = [s.next_event(5) for _ in range(14)]
    assert [e.data for e in got] == [f"m{i}" for i in range(3, 16)] + ["live"]
    s.close()


@pytest.mark.timeout(60)
def test_ws_resume_on_another_node(redis_server, cluster):
    r = redis_server()
    a, b, c = cluster(3, [r])
    t1, t2 = "x-ws1", "x-ws2"
    w = WSClient(a.addr)
    w.expect_connected()
    w.subscribe(t1)
    start1 = w.expect_subscribed(t1)
    w.subscribe(t2)
    start2 = w.expect_subscribed(t2)
    ids1 = [http_publish(b, t1, f"a{i}") for i in range(5)]
    got = [w.recv(5) for _ in range(5)]
    assert [(j["event"], j["topic"], j["id"], j["data"]) for j in got] == \
        [("message", t1, ids1[i], f"a{i}") for i in range(5)]
    w.cut("rst")
    missed1 = [http_publish(c, t1, f"a{i}") for i in range(5, 12)]
    missed2 = [http_publish(a, t2, f"b{i}") for i in range(4)]
    w = WSClient(b.addr)
    w.expect_connected()
    w.subscribe(t1, since=ids1[-1])
    w.subscribe(t2, since=start2)   # the subscribed reply's position, from node A
    seen = {t1: [], t2: []}
    subscribed = set()
    deadline = time.monotonic() + scaled(10)
    while len(seen[t1]) < 7 or len(seen[t2]) < 4:
        assert time.monotonic() < deadline, f"replay incomplete: {seen}"
        j = w.recv(5)
        if j.get("event") == "subscribed":
            subscribed.add(j["topic"])
            continue
        assert j.get("event") == "message", j
        assert j["topic"] in subscribed, f"message before its subscribed reply: {j}"
        seen[j["topic"]].append((j["id"], j["data"]))
    assert seen[t1] == [(missed1[i - 5], f"a{i}") for i in range(5, 12)]
    assert seen[t2] == [(missed2[i], f"b{i}") for i in range(4)]
    live = http_publish(c, t2, "live")
    j = w.recv(5)
    assert (j["topic"], j["id"], j["data"]) == (t2, live, "live"), j
    w.no_frame_within(0.3)
    w.close()
    # since = the first subscribed position: everything of t1 from node C
    w = WSClient(c.addr)
    w.expect_connected()
    w.subscribe(t1, since=start1)
    w.expect_subscribed(t1)
    got = [w.recv(5) for _ in range(12)]
    assert [j["data"] for j in got] == [f"a{i}" for i in range(12)]
    assert [j["id"] for j in got] == ids1 + missed1
    w.close()


# --------------------------------------------------------------------------------------------
# 3. Redis killed and restarted under a steady publish stream


def redis_outage_scenario(redis_server, cluster, persistent):
    r = redis_server(persistent=persistent)
    nodes = cluster(3, [r], "--history-size", "100000")
    topics = ["o-a", "o-b"]
    cols = start_collectors(nodes, topics)
    outcomes = Outcomes()
    # ~200/s in all: three threads, each on the nodes in turn, so that every node has publishes
    # waiting during the outage
    pubs = [SteadyPublisher(f"p{k}", nodes, topics, outcomes, rate=67, offset=k)
            for k in range(3)]
    # and, around the kill, six more publishing as fast as they are answered: publishes in
    # flight when Redis dies (stored or not, answered or not) are sent again after the restart
    burst = [SteadyPublisher(f"b{k}", nodes, topics, outcomes, rate=None, offset=k)
             for k in range(6)]
    try:
        for p in pubs:
            p.start()
        time.sleep(1.2)
        for p in burst:
            p.start()
        pubs += burst
        time.sleep(0.3)
        before = len(outcomes.ok)
        assert before > 50, f"only {before} publishes before the kill: {outcomes.summary()}"
        r.kill9()
        t_killed = time.monotonic()
        time.sleep(1.0)
        r.restart()
        t_restarted = time.monotonic()
        # the nodes reconnect (backoff at most 5 s); then the stream runs a while longer
        pl.wait_until(lambda: outcomes.ok_since(t_restarted) >= 150, scaled(15), interval=0.05,
                      what=f"150 publishes answered after the restart ({outcomes.summary()})")
        for p in pubs:
            p.stop()
        markers = [(t, f"end-{t}-{k}") for t in topics for k in range(3)]
        for t, d in markers:
            node = nodes[int(d[-1])]
            mid = http_publish(node, t, d, timeout=20)
            outcomes.record(t, d, "ok", mid, time.monotonic(), time.monotonic())
        wait_all_seen(cols, markers, 20)
    finally:
        for p in pubs:
            p.stop_ev.set()
        stop_all(cols)
    during = sum(1 for (t0, t1) in outcomes.t_ok.values() if t0 < t_restarted and t1 > t_killed)
    info = check_against_outcomes(cols, outcomes, topics, persistent, t_restarted)
    return outcomes, during, info


@pytest.mark.timeout(90)
def test_redis_kill9_restart_persistent_no_loss(redis_server, cluster):
    outcomes, during, _ = redis_outage_scenario(redis_server, cluster, persistent=True)
    # fsync always + AOF: nothing answered 200 may be gone, and the epoch stays
    epochs = {parse_id(i)[0] for i in outcomes.ok.values()}
    assert len(epochs) == 1, f"epoch changed with a persistent Redis: {epochs}"
    print(f"\npersistent outage: {outcomes.summary()}; {during} answered 200 across the outage")


@pytest.mark.timeout(90)
def test_redis_kill9_restart_empty_new_epoch(redis_server, cluster):
    outcomes, during, info = redis_outage_scenario(redis_server, cluster, persistent=False)
    epochs = Counter(parse_id(i)[0] for i in outcomes.ok.values())
    assert len(epochs) >= 2, (f"Redis restarted empty but the IDs kept their epoch {epochs}: "
                              f"the same ID could name two messages")
    print(f"\nnon-persistent outage: {outcomes.summary()}; epochs {dict(epochs)}; over all "
          f"subscribers: {info['lost_before_restart']} deliveries of messages answered 200 "
          f"before the restart missing (allowed: Redis lost them), "
          f"{info['cross_epoch_copies']} sent again in the new epoch")


# --------------------------------------------------------------------------------------------
# 4. password, db, URL form; startup failures


@pytest.mark.timeout(60)
def test_password_and_db(redis_server, cluster, pushletd):
    r = redis_server(password="s3cret")
    n1 = cluster(1, [r], password="s3cret", db=3)[0]
    n2 = pushletd("--redis", r.url(password="s3cret", db=3))
    s1 = SSEClient(n1.addr, ["pw-t"])
    s1.expect_connected()
    s2 = SSEClient(n2.addr, ["pw-t"])
    s2.expect_connected()
    ids = [http_publish(n, "pw-t", f"m{i}") for i, n in enumerate([n1, n2, n1, n2])]
    for s in (s1, s2):
        got = [s.next_event(5) for _ in range(4)]
        assert [(e.id, e.data) for e in got] == [(ids[i], f"m{i}") for i in range(4)]
    s1.close()
    s2.close()
    with r.client(db=3) as c:
        keys3 = c.keys("*")
    with r.client(db=0) as c:
        keys0 = c.keys("*")
    assert keys3, "nothing stored in db 3"
    assert all(k.startswith("pushlet:") for k in keys3), f"keys outside pushlet:* {keys3}"
    assert any("pw-t" in k for k in keys3), f"no key for the topic in db 3: {keys3}"
    assert keys0 == [], f"keys written to db 0 although --redis-db 3: {keys0}"


@pytest.mark.timeout(60)
def test_url_db_without_flags(redis_server, pushletd):
    """The URL alone selects the db (no --redis-db)."""
    r = redis_server(password="plainpw")
    n = pushletd("--redis", r.url(password="plainpw", db=5))
    http_publish(n, "url-t", "x")
    with r.client(db=5) as c:
        assert any("url-t" in k for k in c.keys("pushlet:*")), "nothing in db 5"
    with r.client(db=0) as c:
        assert c.keys("*") == []


@pytest.mark.timeout(60)
def test_startup_fails_on_bad_auth_or_unreachable_redis(redis_server):
    r = redis_server(password="right")
    cases = [
        ("wrong --redis-password", ["--redis", r.hostport, "--redis-password", "wrong"], True),
        ("wrong password in URL", ["--redis", r.url(password="wrong")], True),
        ("no password for a protected Redis", ["--redis", r.hostport], True),
        ("unreachable Redis", ["--redis", f"127.0.0.1:{free_port()}"], False),
    ]
    problems = []
    for what, args, auth in cases:
        rc, err, took = run_pushletd_expect_exit(args, timeout=10)
        if rc == 0:
            problems.append(f"{what}: exit code 0")
        if "unknown flag" in err or "usage" in err.lower():
            problems.append(f"{what}: flags rejected: {err[-300:]!r}")
        if "listening on" in err:
            problems.append(f"{what}: it started listening before failing")
        if auth and "auth" not in err.lower():
            problems.append(f"{what}: stderr does not mention authentication: {err[-500:]!r}")
        if not auth and "redis" not in err.lower():
            problems.append(f"{what}: stderr does not mention Redis: {err[-500:]!r}")
        if took > 10 * pl.time_scale():
            problems.append(f"{what}: took {took:.1f}s")
        if "Sanitizer" in err or "runtime error:" in err:
            problems.append(f"{what}: sanitizer report:\n{err[-3000:]}")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------------
# 5. two shards


def topic_shards(shards, topics) -> dict:
    """topic -> index of the shard holding its keys (via the raw RESP client)."""
    where = {t: [] for t in topics}
    for k, r in enumerate(shards):
        with r.client() as c:
            keys = c.keys("pushlet:*")
        for t in topics:
            if any(t in key for key in keys):
                where[t].append(k)
    bad = {t: w for t, w in where.items() if len(w) != 1}
    assert not bad, f"topics with keys on no shard or on several: {bad}"
    return {t: w[0] for t, w in where.items()}


@pytest.mark.timeout(90)
def test_two_shards(redis_server, cluster):
    ra = redis_server(persistent=True)
    rb = redis_server(persistent=True)
    n1, n2 = cluster(2, [ra, rb])
    topics = [f"sh-{i:02d}" for i in range(20)]
    for i, t in enumerate(topics):
        http_publish(n1 if i % 2 else n2, t, f"{t}:first")
    shard = topic_shards([ra, rb], topics)
    on_a = [t for t in topics if shard[t] == 0]
    on_b = [t for t in topics if shard[t] == 1]
    assert on_a and on_b, f"all 20 topics on one shard: {shard}"
    cols = [Collector("ws1", "ws", n1, topics).open(), Collector("ws2", "ws", n2, topics).open()]
    for c in cols:
        c.start()
    outcomes = Outcomes()
    pubs = []
    try:
        for i, t in enumerate(topics):
            d = f"{t}:before"
            outcomes.record(t, d, "ok", http_publish([n1, n2][i % 2], t, d), 0, 0)
        wait_all_seen(cols, [(t, f"{t}:before") for t in topics], 10)

        rb.kill9()
        t_killed = time.monotonic()
        # topics of shard B: publishes wait (or are refused) while it is down
        pubs = [SteadyPublisher(f"pb{k}", [n1, n2], on_b, outcomes, rate=40, offset=k)
                for k in range(2)]
        for p in pubs:
            p.start()
        # topics of shard A keep working on both nodes, promptly
        for i, t in enumerate(on_a):
            for k, n in enumerate((n1, n2)):
                d = f"{t}:during{k}"
                t0 = time.monotonic()
                mid = http_publish(n, t, d, timeout=10)
                took = time.monotonic() - t0
                assert took < scaled(2), f"publish to {t} (shard A) took {took:.1f}s with B down"
                outcomes.record(t, d, "ok", mid, t0, t0 + took)
        wait_all_seen(cols, [(t, f"{t}:during{k}") for t in on_a for k in range(2)], 5,
                      what="shard A topics while shard B is down")
        # a new subscription to a shard A topic works too
        s = SSEClient(n2.addr, [on_a[0]], timeout=5)
        s.expect_connected()
        s.close()
        time.sleep(max(0.0, 1.0 - (time.monotonic() - t_killed)))
        rb.restart()
        t_restarted = time.monotonic()
        pl.wait_until(lambda: outcomes.ok_since(t_restarted, on_b) >= 40, scaled(15),
                      interval=0.05, what=f"shard B publishes after its restart "
                                          f"({outcomes.summary()})")
        for p in pubs:
            p.stop()
        markers = [(t, f"{t}:end") for t in topics]
        for i, (t, d) in enumerate(markers):
            outcomes.record(t, d, "ok", http_publish([n1, n2][i % 2], t, d, timeout=20),
                            time.monotonic(), time.monotonic())
        wait_all_seen(cols, markers, 20)
    finally:
        for p in pubs:
            p.stop_ev.set()
        stop_all(cols)
    b_ok = sum(1 for (t, _) in outcomes.ok if t in on_b)
    assert b_ok > len(on_b) * 2, f"few publishes to shard B topics succeeded: {outcomes.summary()}"
    # "first" messages were published before the collectors subscribed: not in their lists
    check_against_outcomes(cols, outcomes, topics, persistent=True, t_restarted=t_restarted)
    print(f"\ntwo shards: {len(on_a)} topics on A, {len(on_b)} on B; {outcomes.summary()}")


# --------------------------------------------------------------------------------------------
# 6. /stats and /metrics through an outage; new subscriptions while Redis is down


@pytest.mark.timeout(60)
def test_stats_follow_redis_state(redis_server, cluster):
    r = redis_server()
    (n,) = cluster(1, [r])
    state, st = redis_state(n)
    assert state == "ready", f"/stats with Redis up: {st}"
    if isinstance(st.get("redis"), dict):
        assert str(r.port) in json.dumps(st["redis"]), \
            f"/stats redis does not name the shard {r.hostport}: {st['redis']}"
    m = n.get("/metrics")
    assert m.status == 200 and b"pushlet_redis_" in m.body, "no pushlet_redis_* in /metrics"
    s_old = SSEClient(n.addr, ["st-old"])   # a topic followed before the outage
    s_old.expect_connected()

    r.kill9()
    t_killed = time.monotonic()
    states = []

    def down():
        state = redis_state(n)[0]
        states.append(state)
        return state in ("down", "connecting")
    pl.wait_until(down, scaled(5), interval=0.05, what="/stats redis state down/connecting")
    # /stats answers at once while Redis is down
    t0 = time.monotonic()
    n.stats()
    assert time.monotonic() - t0 < scaled(1), "/stats slow while Redis is down"

    # a publish made now waits for Redis (counted as pending) and is answered once it is back
    waiting = {}

    def publish_waiting():
        t0 = time.monotonic()
        try:
            waiting["id"] = http_publish(n, "st-old", "during", timeout=25)
        except BaseException as e:  # noqa: BLE001
            waiting["error"] = e
        waiting["took"] = time.monotonic() - t0
    pub_th = threading.Thread(target=publish_waiting, daemon=True)
    pub_th.start()

    def pending():
        st = redis_state(n)[1]
        return max(st.get("redis_pending", 0), pending_count(st.get("redis"))) > 0
    pl.wait_until(pending, scaled(5), interval=0.05, what="a pending publish in /stats")

    # new subscriptions to topics the node does not follow: refused after the 5 s timeout
    results = {}

    def new_sse():
        t0 = time.monotonic()
        try:
            s = SSEClient(n.addr, ["st-new-sse"], timeout=15)
            results["sse"] = (s.status, time.monotonic() - t0)
            s.close()
        except Exception as e:  # noqa: BLE001
            results["sse"] = (repr(e), time.monotonic() - t0)

    def new_ws():
        t0 = time.monotonic()
        try:
            w = WSClient(n.addr, timeout=15)
            w.expect_connected()
            w.subscribe("st-new-ws")
            j = w.recv(15)
            results["ws"] = (j, time.monotonic() - t0)
            w.close()
        except Exception as e:  # noqa: BLE001
            results["ws"] = (repr(e), time.monotonic() - t0)

    ths = [threading.Thread(target=f, daemon=True) for f in (new_sse, new_ws)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(scaled(20))
    sse_status, sse_took = results.get("sse", ("no answer", None))
    ws_reply, ws_took = results.get("ws", ("no answer", None))
    problems = []
    if sse_status != 503:
        problems.append(f"new SSE subscription with Redis down: {sse_status} after {sse_took}")
    if not (isinstance(ws_reply, dict) and ws_reply.get("event") == "error"):
        problems.append(f"new WebSocket subscribe with Redis down: {ws_reply} after {ws_took}")
    for what, took in (("SSE", sse_took), ("WebSocket", ws_took)):
        if took is not None and took > scaled(10):
            problems.append(f"{what} refusal after {took:.1f}s (expected within about 5 s)")
    state, st = redis_state(n)
    if state not in ("down", "connecting"):
        problems.append(f"/stats redis state {state} while Redis is still down: {st}")

    r.restart()
    t_restarted = time.monotonic()
    pl.wait_until(lambda: redis_state(n)[0] == "ready", scaled(10), interval=0.05,
                  what="/stats redis state ready after the restart")
    took_ready = time.monotonic() - t_restarted
    pub_th.join(scaled(25))
    if "id" not in waiting:
        problems.append(f"the publish made while Redis was down: {waiting}")
    mid = http_publish(n, "st-old", "after")
    got = [s_old.next_event(10) for _ in range(2 if "id" in waiting else 1)]
    expect = ([(waiting["id"], "during")] if "id" in waiting else []) + [(mid, "after")]
    if [(e.id, e.data) for e in got] != expect:
        problems.append(f"old subscription after the outage got {got}, expected {expect}")
    s_old.close()
    s = SSEClient(n.addr, ["st-new-sse2"], timeout=10)
    s.expect_connected()
    s.close()
    m = n.get("/metrics").body.decode()
    if not any(ln.startswith("pushlet_redis_") for ln in m.splitlines()):
        problems.append("no pushlet_redis_* series after the outage")
    assert not problems, "\n".join(problems) + f"\nstates seen: {states[-5:]}; " \
        f"killed {t_restarted - t_killed:.1f}s"
    print(f"\nstats: down seen in {len(states)} polls, ready {took_ready:.1f}s after restart; "
          f"refusals after {sse_took}/{ws_took} s; waiting publish answered after "
          f"{waiting.get('took')}")


# --------------------------------------------------------------------------------------------
# 7. a node killed with SIGKILL


@pytest.mark.timeout(60)
def test_node_killed_clients_resume_elsewhere(redis_server, cluster):
    r = redis_server()
    a, b, c = cluster(3, [r])
    t = "nk"
    published = []       # ids in order (one publisher, serial)
    stop = threading.Event()
    errors = []

    def publisher():
        try:
            with RawHTTP(c.addr, timeout=scaled(20)) as conn:
                k = 0
                while not stop.is_set():
                    published.append(publish_on(conn, t, f"nk:{k}"))
                    k += 1
                    time.sleep(0.005)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    s = SSEClient(a.addr, [t])
    s.expect_connected()
    w = WSClient(a.addr)
    w.expect_connected()
    w.subscribe(t)
    w.expect_subscribed(t)
    got_sse, got_ws = [], []
    th = threading.Thread(target=publisher, daemon=True)
    th.start()
    try:
        while len(got_sse) < 40:
            e = s.next_event(5)
            got_sse.append((e.id, e.data))
        while len(got_ws) < 40:
            j = w.recv(5)
            got_ws.append((j["id"], j["data"]))
        os.kill(a.pid, signal.SIGKILL)
        a.wait(10)
        # both clients see their connection end (after what was already in flight)
        for read, got in ((lambda: s.next_event(5), got_sse), (lambda: w.recv(5), got_ws)):
            while True:
                try:
                    x = read()
                except (pl.ConnectionClosed, ConnectionResetError, AssertionError):
                    break
                if isinstance(x, dict):
                    got.append((x["id"], x["data"]))
                else:
                    got.append((x.id, x.data))
        s.close()
        w.close()
        time.sleep(0.3)  # more is published while they are away
        s = SSEClient(b.addr, [t], got_sse[-1][0])
        s.expect_connected()
        w = WSClient(c.addr)
        w.expect_connected()
        w.subscribe(t, since=got_ws[-1][0])
        w.expect_subscribed(t)
        time.sleep(0.3)
        stop.set()
        th.join(scaled(20))
        assert not errors, f"publisher failed: {errors[0]!r}"
        n = len(published)
        while len(got_sse) < n:
            e = s.next_event(5)
            got_sse.append((e.id, e.data))
        while len(got_ws) < n:
            j = w.recv(5)
            assert j.get("event") == "message", j
            got_ws.append((j["id"], j["data"]))
        s.no_event_within(0.3)
        w.no_frame_within(0.1)
    finally:
        stop.set()
        s.close()
        w.close()
    expect = [(published[k], f"nk:{k}") for k in range(len(published))]
    for name, got in (("SSE (A then B)", got_sse), ("WebSocket (A then C)", got_ws)):
        if got != expect:
            dup = [x for x, k in Counter(got).items() if k > 1]
            lost = sorted(set(expect) - set(got))
            raise AssertionError(f"{name}: {len(got)} messages, expected {len(expect)}; "
                                 f"twice {dup[:5]}, lost {lost[:5]}")
    assert len(published) > 80, f"only {len(published)} published"



# --------------------------------------------------------------------------------------------
# 8. one node cut off from Redis while the others go on


def catch_ups(node):
    st = node.stats()
    red = st.get("redis") if isinstance(st.get("redis"), dict) else {}
    return st.get("redis_catch_ups", red.get("catch_ups"))


def cut_off_scenario(redis_server, tcp_proxy, cluster, disrupt):
    r = redis_server()
    proxy = tcp_proxy(r.addr)
    (a,) = cluster(1, [r], "--history-size", "100000")
    (b,) = cluster(1, [proxy.hostport], "--history-size", "100000")  # same Redis, via the proxy
    topics = ["cut-a", "cut-b"]
    cols = start_collectors([a, b], topics)
    outcomes = Outcomes()
    pubs = [SteadyPublisher("pa", [a], topics, outcomes, rate=120),
            SteadyPublisher("pb", [b], topics, outcomes, rate=30)]
    try:
        for p in pubs:
            p.start()
        time.sleep(0.5)
        t_healed = disrupt(proxy, outcomes)
        pl.wait_until(lambda: outcomes.ok_since(t_healed) >= 80, scaled(15), interval=0.05,
                      what=f"publishes after the disruption ({outcomes.summary()})")
        for p in pubs:
            p.stop()
        markers = [(t, f"end-{t}-{k}") for t in topics for k in range(2)]
        for t, d in markers:
            mid = http_publish([a, b][int(d[-1])], t, d, timeout=20)
            outcomes.record(t, d, "ok", mid, time.monotonic(), time.monotonic())
        wait_all_seen(cols, markers, 20)
    finally:
        for p in pubs:
            p.stop_ev.set()
        stop_all(cols)
    check_against_outcomes(cols, outcomes, topics, persistent=True)
    return a, b, proxy, outcomes


@pytest.mark.timeout(60)
def test_node_cut_off_from_redis_catches_up(redis_server, tcp_proxy, cluster):
    during = {}

    def disrupt(proxy, outcomes):
        proxy.block()
        t0 = time.monotonic()
        time.sleep(1.5)
        during["a_ok"] = outcomes.ok_since(t0, None)
        proxy.heal()
        return time.monotonic()

    a, b, proxy, outcomes = cut_off_scenario(redis_server, tcp_proxy, cluster, disrupt)
    # node A kept publishing while B was cut off: B had something to catch up
    assert during["a_ok"] > 60, f"node A published only {during['a_ok']} during B's cut"
    n = catch_ups(b)
    assert n is None or n > 0, f"node B reports {n} catch-ups after being cut off"
    print(f"\ncut off: {outcomes.summary()}; {during['a_ok']} published meanwhile; "
          f"B catch-ups {n}; proxy saw {proxy.accepted} connections")


@pytest.mark.timeout(60)
def test_node_pubsub_connection_reset_repeatedly(redis_server, tcp_proxy, cluster):
    cuts = []

    def disrupt(proxy, outcomes):
        for _ in range(5):
            cuts.append(proxy.cut(b"SUBSCRIBE"))   # B's pub/sub connection only
            time.sleep(0.4)
        cuts.append(proxy.cut())                   # both of B's connections
        time.sleep(0.4)
        return time.monotonic()

    a, b, proxy, outcomes = cut_off_scenario(redis_server, tcp_proxy, cluster, disrupt)
    assert sum(cuts[:5]) >= 3, f"the pub/sub connection was found only {cuts} times"
    print(f"\npub/sub resets: {cuts}; {outcomes.summary()}; B catch-ups {catch_ups(b)}")


# --------------------------------------------------------------------------------------------
# 9. joining a topic while another node publishes to it; history window; shards' edge cases


@pytest.mark.timeout(60)
def test_join_while_publishing_no_gap(redis_server, cluster):
    """Subscribers join topics on node B while node A publishes to them without pause: the
    position of the connected event / subscribed reply is followed by every later message,
    consecutive, with no gap and no duplicate, whatever the race with the catch-up."""
    r = redis_server()
    a, b = cluster(2, [r])
    stop = threading.Event()
    errors = []
    topics = [f"join-{i}" for i in range(12)]
    last = {t: None for t in topics}

    def publisher():
        try:
            with RawHTTP(a.addr, timeout=scaled(20)) as c:
                k = 0
                while not stop.is_set():
                    t = topics[k % len(topics)]
                    last[t] = publish_on(c, t, f"{t}:{k}")
                    k += 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    th = threading.Thread(target=publisher, daemon=True)
    th.start()
    try:
        for i, t in enumerate(topics):
            time.sleep(0.02 * (i % 4))
            if i % 2 == 0:
                s = SSEClient(b.addr, [t])
                start = s.expect_connected().id
                got = [s.next_event(5) for _ in range(15)]
                got = [(e.event, e.id) for e in got]
                s.close()
            else:
                w = WSClient(b.addr)
                w.expect_connected()
                w.subscribe(t)
                start = w.expect_subscribed(t)
                got = [w.recv(5) for _ in range(15)]
                got = [(j.get("event"), j.get("id")) for j in got]
                w.close()
            ep, sq = parse_id(start)
            expect = [("message", f"{ep}-{sq + k}") for k in range(1, 16)]
            assert got == expect, (f"{t} ({'SSE' if i % 2 == 0 else 'WebSocket'}) joined at "
                                   f"{start}: got {got}")
            assert not errors, f"publisher failed: {errors[0]!r}"
    finally:
        stop.set()
        th.join(scaled(20))
    assert not errors, f"publisher failed: {errors[0]!r}"


@pytest.mark.timeout(60)
def test_history_window_gap_across_nodes(redis_server, cluster):
    """--history-size 5 on every node: a client resuming on another node from a position Redis
    no longer holds gets a history_expired gap first, then what is kept, consecutive, up to the
    last message (Redis trims approximately: more than 5 may be kept, never all 400)."""
    r = redis_server()
    a, b = cluster(2, [r], "--history-size", "5")
    t = "win"
    s = SSEClient(a.addr, [t])
    s.expect_connected()
    first = http_publish(a, t, "w0")
    assert s.next_event(5).id == first
    s.close()
    with RawHTTP(a.addr, timeout=scaled(10)) as c:
        ids = [publish_on(c, t, f"w{i}") for i in range(1, 400)]
    s = SSEClient(b.addr, [t], first)
    s.expect_connected()
    g = s.next_event(5)
    assert g.event == "gap" and json.loads(g.data) == {"topic": t, "reason": "history_expired"}, g
    got = []
    while not got or got[-1].id != ids[-1]:
        e = s.next_event(5)
        assert e.event == "message", f"after the gap: {e}"
        got.append(e)
    assert 5 <= len(got) < 399, f"{len(got)} messages kept with --history-size 5"
    k0 = int(got[0].data[1:])
    assert [e.data for e in got] == [f"w{i}" for i in range(k0, 400)]
    assert [e.id for e in got] == ids[k0 - 1:]
    s.close()


@pytest.mark.timeout(60)
def test_shards_comma_form_unix_socket_and_publish_all(redis_server, cluster, pushletd):
    """Node 1: --redis A --redis B; node 2: --redis A,B; node 3: A by its unix socket, then B.
    Same shard for every topic on every node (messages flow between all three), and one
    publish_all reaches each connection once (not once per shard)."""
    ra = redis_server(extra_args=())
    sock = os.path.join(ra.workdir, "redis.sock")
    ra.stop()
    ra.extra_args = ["--unixsocket", sock, "--unixsocketperm", "700"]
    ra.start()
    rb = redis_server()
    n1 = cluster(1, [ra, rb])[0]
    n2 = pushletd("--redis", f"{ra.hostport},{rb.hostport}")
    n3 = pushletd("--redis", f"unix:{sock}", "--redis", rb.hostport)
    nodes = [n1, n2, n3]
    topics = [f"cf-{i:02d}" for i in range(8)]
    cols = [Collector(f"ws{k}", "ws", n, topics).open() for k, n in enumerate(nodes)]
    for c in cols:
        c.start()
    published = {t: [] for t in topics}
    try:
        for i, t in enumerate(topics):
            for k, n in enumerate(nodes):
                published[t].append((http_publish(n, t, f"{t}:{k}"), f"{t}:{k}"))
        with RawHTTP(n2.addr, timeout=scaled(10)) as c:
            resp = c.request("POST", "/publish_all?event=announce", body=b"all")
        assert resp.status == 200, resp
        markers = [(t, f"{t}:end") for t in topics]
        for t, d in markers:
            published[t].append((http_publish(n3, t, d), d))
        wait_all_seen(cols, markers, 10)
        pl.wait_until(lambda: all(any(o[0] == "announce" for o in c.snapshot()[1])
                                  for c in cols), scaled(5), what="publish_all everywhere")
        time.sleep(0.3)   # a second copy (one per shard) would be here by now
    finally:
        stop_all(cols)
    shard = topic_shards([ra, rb], topics)
    assert set(shard.values()) == {0, 1}, f"8 topics all on one shard: {shard}"
    for c in cols:
        msgs, others = c.snapshot()
        for t in topics:
            assert msgs[t] == published[t], f"{c.name} topic {t}: {msgs[t]} != {published[t]}"
        ann = [o for o in others if o[0] == "announce"]
        assert len(ann) == 1, f"{c.name}: publish_all arrived {len(ann)} times"


@pytest.mark.timeout(60)
def test_redis_refuses_publish(redis_server, cluster):
    """Redis out of memory (maxmemory, noeviction): the publish is answered with an error
    status at once, not delivered, not retried later; once Redis accepts writes again,
    publishing works and subscribers see no trace of the refused one."""
    r = redis_server()
    a, b = cluster(2, [r])
    s = SSEClient(b.addr, ["oom"])
    s.expect_connected()
    ok1 = http_publish(a, "oom", "before")
    with r.client() as c:
        c.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
        c.command("CONFIG", "SET", "maxmemory", "1")
    t0 = time.monotonic()
    with RawHTTP(a.addr, timeout=scaled(10)) as c:
        resp = c.request("POST", "/publish?topic=oom", body=b"refused")
    took = time.monotonic() - t0
    with r.client() as c:
        c.command("CONFIG", "SET", "maxmemory", "0")
    assert resp.status >= 500, f"publish with Redis out of memory answered {resp.status}"
    assert took < scaled(3), f"the refusal took {took:.1f}s"
    ok2 = http_publish(a, "oom", "after")
    got = [s.next_event(5) for _ in range(2)]
    assert [(e.id, e.data) for e in got] == [(ok1, "before"), (ok2, "after")], got
    s.no_event_within(0.3)
    assert parse_id(ok2)[1] == parse_id(ok1)[1] + 1, f"{ok1} then {ok2}: a refused publish " \
        f"took a sequence number"
    s.close()
    m = a.get("/metrics").body.decode()
    errs = [ln for ln in m.splitlines() if ln.startswith("pushlet_redis_publish_errors_total")]
    assert errs and float(errs[0].split()[-1]) >= 1, f"publish errors not counted: {errs}"


@pytest.mark.timeout(90)
def test_publish_queue_bound_503(redis_server, cluster):
    """While Redis is down, publishes wait in a bounded queue (64 MiB by default): 80 of
    1 MiB each at once, some answered 503 at once, none lost, the others 200 once Redis is
    back; the subscriber on the other node gets exactly the ones answered 200, in ID order."""
    r = redis_server()
    big = ["--max-message-size", "1100000", "--max-body-size", "1200000",
           "--max-output-bytes", "200000000"]
    a, b = cluster(2, [r], *big)
    t = "qb"
    sub = Collector("sse-b", "sse", b, [t]).open()
    sub.start()
    outcomes = Outcomes()
    pad = "x" * (1 << 20)
    try:
        r.kill9()
        pl.wait_until(lambda: redis_state(a)[0] != "ready", scaled(5), what="node A sees Redis down")
        ths = [threading.Thread(target=try_publish, daemon=True,
                                args=({}, a, t, f"q{k}|{pad}", outcomes, scaled(30)))
               for k in range(80)]
        for th in ths:
            th.start()
        pl.wait_until(lambda: len(outcomes.rejected) + len(outcomes.ok) > 0
                      and pending_count(a.stats()) + a.stats().get("redis_pending", 0) > 0,
                      scaled(10), what="publishes queued and some refused")
        time.sleep(0.5)
        r.restart()
        for th in ths:
            th.join(scaled(30))
        assert not any(th.is_alive() for th in ths), "publishes still waiting"
        d = f"end|{pad[:10]}"
        outcomes.record(t, d, "ok", http_publish(a, t, d, timeout=20), 0, 0)
        wait_all_seen([sub], [(t, d)], 30)
    finally:
        stop_all([sub])
    n_rej = sum(1 for v in outcomes.rejected.values() if v == "503")
    assert n_rej >= 1, f"no 503 with 80 MiB waiting: {outcomes.summary()[:300]}"
    assert len(outcomes.ok) >= 40, f"too few accepted: {outcomes.summary()[:300]}"
    assert not outcomes.maybe, outcomes.summary()[:300]
    msgs, _ = sub.snapshot()
    got = [(i, dd.split("|")[0]) for i, dd in msgs[t]]
    expect = sorted(((i, dd.split("|")[0]) for (_, dd), i in outcomes.ok.items()),
                    key=lambda x: parse_id(x[0])[1])
    diff = next((x for x in zip(got, expect) if x[0] != x[1]), None)
    assert got == expect, (f"subscriber got {len(got)} messages, {len(expect)} answered 200; "
                           f"first difference: {diff}")
    print(f"\nqueue bound: {len(outcomes.ok) - 1} accepted, {n_rej} refused with 503, "
          f"slowest answer {outcomes.max_latency:.1f}s")


@pytest.mark.timeout(60)
def test_redis_flushall_new_epoch_with_a_node_cut_off(redis_server, tcp_proxy, cluster):
    """Redis loses its data without a restart (FLUSHALL) while node A publishes steadily: once
    with every node connected, once while node B is cut off (proxy). Every subscriber must get
    every message of the final epoch, and A's subscribers (never cut off) every message at all;
    nobody sees an ID twice; epochs only move forward."""
    r = redis_server()
    proxy = tcp_proxy(r.addr)
    (a,) = cluster(1, [r], "--history-size", "100000")
    (b,) = cluster(1, [proxy.hostport], "--history-size", "100000")
    topics = ["fl-a", "fl-b"]
    cols = start_collectors([a, b], topics)
    outcomes = Outcomes()
    pub = SteadyPublisher("pa", [a], topics, outcomes, rate=150)
    # as fast as answered, on A and on B, while B is away and comes back: B has publishes
    # waiting when it reconnects, and records reach it while it catches up
    burst = [SteadyPublisher(f"ba{k}", [a], topics, outcomes, rate=None) for k in range(2)]
    burst += [SteadyPublisher(f"bb{k}", [b], topics, outcomes, rate=None) for k in range(3)]
    try:
        pub.start()
        time.sleep(0.5)
        with r.client() as c:
            c.command("FLUSHALL")
        time.sleep(0.5)
        proxy.block()
        time.sleep(0.3)
        with r.client() as c:
            c.command("FLUSHALL")
            c.command("SCRIPT", "FLUSH")   # as after a restart: scripts must be loaded again
        for p in burst:
            p.start()
        time.sleep(0.5)
        proxy.heal()
        t_healed = time.monotonic()
        pl.wait_until(lambda: outcomes.ok_since(t_healed) >= 300, scaled(15), interval=0.05,
                      what=f"publishes after B is back ({outcomes.summary()})")
        for p in burst:
            p.stop()
        pub.stop()
        markers = [(t, f"end-{t}") for t in topics]
        for t, d in markers:
            outcomes.record(t, d, "ok", http_publish(a, t, d), time.monotonic(), time.monotonic())
        wait_all_seen(cols, markers, 20)
    finally:
        for p in [pub] + burst:
            p.stop_ev.set()
        stop_all(cols)
    assert not outcomes.rejected and not outcomes.maybe, outcomes.summary()
    epochs = []
    for (t, d), mid in sorted(((k, v) for k, v in outcomes.ok.items() if k[1].startswith("pa-")),
                              key=lambda kv: int(kv[0][1].split("-")[-1])):
        e = parse_id(mid)[0]
        if not epochs or epochs[-1] != e:
            epochs.append(e)
    assert len(epochs) == 3, f"two FLUSHALLs should give three epochs, IDs show {epochs}"
    final = epochs[-1]
    problems = []
    for c in cols:
        msgs, others = c.snapshot()
        for t in c.topics:
            got = msgs[t]
            ids = [i for i, _ in got]
            what = f"{c.name} ({'A' if c.node is a else 'B'}) topic {t}"
            dup = [i for i, n in Counter(ids).items() if n > 1]
            if dup:
                problems.append(f"{what}: IDs seen twice {dup[:5]}")
            try:
                check_ordered(ids, what, one_epoch=False)
            except AssertionError as e:
                problems.append(str(e))
            have = {d for _, d in got}
            must = {d: mid for (tt, d), mid in outcomes.ok.items() if tt == t and (
                c.node is a or parse_id(mid)[0] == final)}
            lost = sorted((parse_id(mid)[0] == final, mid, d) for d, mid in must.items()
                          if d not in have)
            if lost:
                problems.append(f"{what}: {len(lost)} messages answered 200 not delivered, "
                                f"first {lost[:6]}; gaps: "
                                f"{[o for o in others if o[0] == 'gap'][:4]}")
            for mid, d in got:
                if outcomes.ok.get((t, d)) != mid:
                    problems.append(f"{what}: {d} arrived as {mid}, /publish said "
                                    f"{outcomes.ok.get((t, d))}")
                    break
    assert not problems, "\n".join(problems) + f"\nepochs {epochs}; {outcomes.summary()}"
