"""Slow-consumer policies, over SSE and WebSocket: a subscriber that stops reading (tiny
SO_RCVBUF, never reads after the handshake) next to three fast readers of the same topic.

- disconnect (default): the slow one is dropped (counted once), the fast ones get everything in
  order; the dropped one reconnects with its last ID and recovers everything the history holds.
- drop_oldest: the slow one stays connected while server memory stays bounded and the fast
  ones are unaffected; when it finally reads, it gets its queued prefix, a `gap` event
  (slow_consumer) for what the small history no longer holds, then exactly the retained
  messages and live ones: in order, no duplicates. Also: no gap when the history still holds
  everything, a reader that is merely sluggish (falls behind and catches up again and again,
  on two topics) never sees disorder, a duplicate, or a hole without a gap, and a lagging
  client misses publish-to-all messages (counted) while the others get them.

test_slow_consumer.py covers the disconnect bound itself (volume, RSS, per-connection bound);
this file covers the policies and what follows them (IDs, resume, gaps, counters).
"""

import asyncio
import json
import os
import re
import time
import urllib.parse

import pytest

import pushlet_testlib as pl
from pushlet_testlib import (OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, AsyncHTTP, AsyncSSE, AsyncWS,
                             RawHTTP, RawWS, events_path, run_async)

S = pl.time_scale()
ID_RE = re.compile(r"^([0-9a-z]{1,13})-(\d+)$")

TOPIC = "flood"
MAX_OUT = 65536          # --max-output-bytes
MSG_SIZE = 8192
N_FAST = 3
WINDOW = 4               # fast readers are never more than 4 messages (32 KiB) behind
TRANSPORTS = ["sse", "ws"]


def check_id(mid) -> str:
    assert isinstance(mid, str) and ID_RE.match(mid), f"not an EPOCH-SEQ message ID: {mid!r}"
    return mid


def seq(mid: str) -> int:
    return int(check_id(mid).rsplit("-", 1)[1])


def payload(topic: str, n: int) -> bytes:
    head = f"{topic}/{n}:".encode()
    return head + b"p" * (MSG_SIZE - len(head))


def parse_payload(data: str):
    """(topic, index) of a payload() message."""
    head, sep, _ = data.partition(":")
    topic, _, n = head.rpartition("/")
    assert sep and topic and n.isdigit() and len(data) == MSG_SIZE, \
        f"unexpected data {data[:40]!r} ({len(data)} B)"
    return topic, int(n)


def server_env():
    """ASan keeps freed memory in a quarantine (256 MB by default): shrink it so RSS reflects
    what the server holds."""
    if not pl.binary_is_sanitized():
        return None
    opts = os.environ.get("ASAN_OPTIONS", "")
    return {"ASAN_OPTIONS": (opts + ":" if opts else "") + "quarantine_size_mb=8"}


async def apublish(conn: AsyncHTTP, topic, data, path="/publish") -> str:
    q = "?" + urllib.parse.urlencode({"topic": topic}) if topic else ""
    r = await conn.request("POST", path + q, data, timeout=20 * S)
    assert r.status == 200, f"publish failed: {r.status} {r.body[:200]!r}"
    return check_id(r.json().get("id"))


def publish(srv, topic, data, path="/publish") -> str:
    q = "?" + urllib.parse.urlencode({"topic": topic}) if topic else ""
    r = srv.request("POST", path + q, body=data)
    assert r.status == 200, f"publish failed: {r.status} {r.body[:200]!r}"
    return check_id(r.json().get("id"))


def publish_on(conn: RawHTTP, topic, data) -> str:
    r = conn.request("POST", "/publish?" + urllib.parse.urlencode({"topic": topic}), body=data)
    assert r.status == 200, f"publish failed: {r.status} {r.body[:200]!r}"
    return check_id(r.json().get("id"))


# --------------------------------------------------------------------------------------------
# What a subscriber received, as items (kind, topic, index or reason or data, id):
#   ("msg", topic, index, id)  ("gap", topic, reason, id)  ("all", "", data, id)


def sse_item(e):
    if e.event == "connected":
        return None
    if e.event == "gap":
        d = json.loads(e.data)
        return ("gap", d.get("topic"), d.get("reason"), e.id)
    if e.event == "everyone":
        return ("all", "", e.data, e.id)
    assert e.event == "message", e
    return ("msg", *parse_payload(e.data), e.id)


def ws_item(obj):
    ev = obj.get("event")
    if ev in ("connected", "subscribed"):
        return None
    if ev == "gap":
        d = json.loads(obj["data"])
        assert d.get("topic") == obj.get("topic"), obj
        return ("gap", d.get("topic"), d.get("reason"), obj.get("id"))
    if ev == "everyone":
        return ("all", "", obj["data"], obj.get("id"))
    assert ev == "message", obj
    topic, n = parse_payload(obj["data"])
    assert obj.get("topic") == topic, obj
    return ("msg", topic, n, obj.get("id"))


class FastChecker:
    """Validates a fast reader's stream on the fly: every message of every topic in order
    (consecutive IDs where the ID is a message ID), nothing else but `allowed` kinds."""

    def __init__(self, progress, topics, allowed=()):
        self.progress = progress
        self.next = {t: 0 for t in topics}
        self.last_seq = {}
        self.n = 0
        self.allowed = allowed
        self.others = []
        self.errors = []

    def item(self, it):
        if it is None:
            return
        kind, topic, what, mid = it
        if kind in self.allowed:
            self.others.append(it)
        elif kind != "msg":
            self.errors.append(f"fast reader got {it!r}")
        elif topic not in self.next or what != self.next[topic]:
            self.errors.append(f"{topic}: expected {self.next.get(topic)}, got {what}")
        else:
            if len(self.next) == 1 or ID_RE.match(mid or ""):   # not a multi-topic cursor
                s = seq(mid)
                if topic in self.last_seq and s != self.last_seq[topic] + 1:
                    self.errors.append(f"{topic}/{what}: id {mid} after {self.last_seq[topic]}")
                self.last_seq[topic] = s
            self.next[topic] += 1
            self.n += 1
        self.progress.set()


async def open_fast(srv, transport, checker, topics):
    if transport == "sse":
        return await AsyncSSE(srv.addr, events_path(*topics),
                              on_event=lambda e: checker.item(sse_item(e))).connect()
    replies = []

    def on_message(p):
        obj = json.loads(p)
        if obj.get("event") in ("connected", "subscribed"):
            replies.append(obj)
        checker.item(ws_item(obj))

    q = urllib.parse.urlencode([("topic", t) for t in topics])
    w = await AsyncWS(srv.addr, f"/ws?{q}", on_message=on_message).connect()
    await w.wait_for(lambda s: len(replies) >= 1 + len(topics), 10 * S, "the handshake replies")
    assert [r.get("event") for r in replies] == ["connected"] + ["subscribed"] * len(topics), \
        replies
    return w


class Slow:
    """A subscriber with a tiny receive buffer that reads its handshake, then nothing until
    drain() is called. .items: what it received; .start_id: the position its subscription(s)
    started at (SSE connected event, first WebSocket subscribed reply); .last_id: the last ID
    it saw (what a reconnecting client sends)."""

    def __init__(self, srv, transport, topics=(TOPIC,)):
        self.transport = transport
        self.items = []
        self.eof = False
        if transport == "sse":
            self.c = RawHTTP(srv.addr, timeout=10 * S, rcvbuf=4096)
            self.c.send(pl.build_request("GET", events_path(*topics), b"",
                                         {"Accept": "text/event-stream"}, srv.addr))
            head = self.c.read_until(b"\r\n\r\n", time.monotonic() + 10 * S)
            assert b" 200 " in head.split(b"\r\n")[0], head
            self.parser = pl.SSEParser()
            events = []
            deadline = time.monotonic() + 10 * S
            while not any(e.event == "connected" for e in events):
                if not self.c.buf:
                    assert self.c._fill(deadline), "stream ended before the connected event"
                events += self.parser.feed(self.c.buf)
                self.c.buf = b""
            connected = [e for e in events if e.event == "connected"][0]
            assert connected.id, connected
            self.start_id = self.last_id = connected.id
            self._take_sse(events)
        else:
            q = urllib.parse.urlencode([("topic", t) for t in topics])
            self.c = RawWS(srv.addr, f"/ws?{q}", timeout=10 * S, rcvbuf=4096)
            assert self.c.recv_json(10 * S).get("event") == "connected"
            for i, t in enumerate(topics):
                sub = self.c.recv_json(10 * S)
                assert (sub.get("event"), sub.get("topic")) == ("subscribed", t), sub
                if i == 0:
                    self.start_id = self.last_id = check_id(sub.get("id"))

    def _take_sse(self, events):
        for e in events:
            it = sse_item(e)
            if it is not None:
                self.items.append(it)
            if e.id is not None:
                self.last_id = e.id

    def _take_frames(self):
        while True:
            f, used = pl.parse_server_frame(self.c.buf)
            if f is None:
                return
            self.c.buf = self.c.buf[used:]
            if f.opcode == OP_PING:
                self.c.send_frame(OP_PONG, f.payload)
            elif f.opcode == OP_CLOSE:
                self.items.append(("close", "", f.close_code, None))
            elif f.opcode == OP_BINARY:
                it = ws_item(f.json())
                if it is not None:
                    self.items.append(it)
                    if it[3] is not None:
                        self.last_id = it[3]

    def _take(self, data):
        if not data:
            self.eof = True
        if self.transport == "sse":
            self._take_sse(self.parser.feed(data))
        else:
            self.c.buf += data
            self._take_frames()

    def _recv(self, chunk, timeout):
        self.c.sock.settimeout(timeout)
        try:
            return self.c.sock.recv(chunk)
        except (ConnectionResetError, BrokenPipeError):
            return b""

    def drain(self, pred, timeout, what):
        """Read until pred(self.items) holds; raise ConnectionClosed at the end of the
        connection (.eof is then set)."""
        deadline = time.monotonic() + timeout * S
        while not pred(self.items):
            if self.eof:
                raise pl.ConnectionClosed(f"{self.transport} slow subscriber ended while "
                                          f"waiting for {what}: {self.items[-3:]!r}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise pl.Timeout(f"timed out waiting for {what}: {len(self.items)} items, "
                                 f"last {self.items[-3:]!r}")
            try:
                self._take(self._recv(65536, remaining))
            except TimeoutError:
                pass

    def read_some(self, chunk, timeout=0.05):
        """One read of at most `chunk` bytes, if any arrive within `timeout` seconds."""
        assert not self.eof, f"{self.transport} slow subscriber ended: {self.items[-3:]!r}"
        try:
            self._take(self._recv(chunk, timeout))
        except TimeoutError:
            pass

    def drain_to_eof(self, timeout):
        try:
            self.drain(lambda items: False, timeout, "EOF")
        except pl.ConnectionClosed:
            return
        raise AssertionError("unreachable")

    def close(self):
        self.c.close()


def check_prefix(items):
    """The items are messages 0..k-1 of one topic in order with consecutive IDs; returns k."""
    assert all(it[0] == "msg" for it in items), [it for it in items if it[0] != "msg"][:3]
    idx = [it[2] for it in items]
    assert idx == list(range(len(idx))), f"not a consecutive prefix: {idx[:10]}...{idx[-10:]}"
    seqs = [seq(it[3]) for it in items]
    if seqs:
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs[:10]
    return len(idx)


# --------------------------------------------------------------------------------------------
# The flood: messages to the topics in turn, paced by the slowest fast reader


async def flood(srv, n_msg, fast_transport, topics=(TOPIC,), rss_samples=None, between=None):
    """Publish n_msg messages (topic i % len(topics), index i // len(topics)) with 3 fast
    readers of all the topics; returns the published IDs once every fast reader has all of
    them (asserting they got them in order and nothing else). between(n, conn): awaited
    before message n is published."""
    progress = asyncio.Event()
    allowed = ("all",) if between else ()
    checkers = [FastChecker(progress, topics, allowed) for _ in range(N_FAST)]
    subs = [await open_fast(srv, fast_transport, c, topics) for c in checkers]
    readers = [asyncio.create_task(s.wait_for(lambda s, c=c: c.n >= n_msg or c.errors,
                                              timeout=180 * S, what=f"{n_msg} messages"))
               for s, c in zip(subs, checkers)]
    conn = await AsyncHTTP(srv.addr).connect()
    ids = []
    for n in range(n_msg):
        while min(c.n for c in checkers) < n - WINDOW and not any(r.done() for r in readers):
            progress.clear()
            try:
                await asyncio.wait_for(progress.wait(), 20 * S)
            except asyncio.TimeoutError:
                raise AssertionError(f"fast readers stalled at {[c.n for c in checkers]} while "
                                     f"publishing message {n}") from None
        if any(r.done() for r in readers):
            break
        if between:
            await between(n, conn)
        t = topics[n % len(topics)]
        ids.append(await apublish(conn, t, payload(t, n // len(topics))))
        if rss_samples is not None and n % 200 == 0:
            rss_samples.append((n, srv.rss_kb()))
    await asyncio.gather(*readers)
    if rss_samples is not None:
        rss_samples.append((n_msg, srv.rss_kb()))
    for c in checkers:
        assert not c.errors, c.errors[:5]
        assert c.n == n_msg, c.n
    for i, t in enumerate(topics):
        mine = ids[i::len(topics)]
        assert [seq(m) for m in mine] == list(range(seq(mine[0]), seq(mine[0]) + len(mine))), \
            f"published IDs of topic {t} are not consecutive"
    await conn.close()
    for s in subs:
        await s.close()
    return ids, checkers


def fast_readers_gone(srv, n_left):
    return pl.wait_until(lambda: (lambda s: s if s["connections"] <= n_left + 1 else None)(
        srv.stats()), 10 * S, 0.05, "the fast readers to be gone")


# --------------------------------------------------------------------------------------------
# disconnect (default)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_disconnect_policy_drops_slow_one_only(pushletd, transport):
    n_msg = 1500                     # 12 MiB: far beyond the kernel buffers and 64 KiB
    srv = pushletd("--max-output-bytes", str(MAX_OUT))
    slow = Slow(srv, transport)
    ids, _ = run_async(flood(srv, n_msg, transport), 150 * S)
    st = fast_readers_gone(srv, 0)
    assert st["slow_consumer_drops"] == 1, st
    assert st["slow_consumer_lags"] == 0, st
    # the slow one reads a consistent prefix, then the end of the connection
    slow.drain_to_eof(20)
    items = [it for it in slow.items if it[0] != "close"]
    k = check_prefix(items)
    assert k < n_msg, "the slow subscriber got every message: it was not dropped"
    assert [it[3] for it in items] == ids[:k]
    slow.close()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["sse", "ws", "ws-query"])
def test_dropped_client_resumes_from_its_last_id(pushletd, how):
    """Dropped under the disconnect policy, the client reconnects with the last ID it saw and
    gets exactly what it missed (the history holds all of it), then live messages."""
    n_msg = 1500
    srv = pushletd("--max-output-bytes", str(MAX_OUT), "--history-size", "2000")
    transport = "sse" if how == "sse" else "ws"
    slow = Slow(srv, transport)

    async def publish_them():
        conn = await AsyncHTTP(srv.addr).connect()
        out = [await apublish(conn, TOPIC, payload(TOPIC, n)) for n in range(n_msg)]
        await conn.close()
        return out

    ids = run_async(publish_them(), 120 * S)
    pl.wait_until(lambda: srv.stats()["slow_consumer_drops"] == 1, 10 * S, 0.05, "the drop")
    slow.drain_to_eof(20)
    items = [it for it in slow.items if it[0] != "close"]
    k = check_prefix(items)
    assert k < n_msg, "the slow subscriber got every message: it was not dropped"
    last = slow.last_id        # the subscription's start position if no message arrived whole
    assert last == (ids[k - 1] if k else slow.start_id), (last, k)
    slow.close()
    st0 = srv.stats()

    if how == "sse":
        c = RawHTTP(srv.addr, timeout=10 * S)
        c.send(pl.build_request("GET", events_path(TOPIC), b"",
                                {"Accept": "text/event-stream", "Last-Event-ID": last}, srv.addr))
        head = c.read_until(b"\r\n\r\n", time.monotonic() + 10 * S)
        assert b" 200 " in head.split(b"\r\n")[0], head
        parser = pl.SSEParser()
        events = parser.feed(c.buf)
        c.buf = b""

        def fill(pred, what):
            deadline = time.monotonic() + 20 * S
            while not pred():
                assert c._fill(deadline), f"stream ended waiting for {what}"
                events.extend(parser.feed(c.buf))
                c.buf = b""

        fill(lambda: any(e.id == ids[-1] for e in events), "the replay")
        live = publish(srv, TOPIC, payload(TOPIC, n_msg))
        fill(lambda: any(e.id == live for e in events), "the live message")
        assert events[0].event == "connected", events[:2]
        got = [sse_item(e) for e in events[1:]]
    else:
        path = f"/ws?topic={TOPIC}&last_event_id={urllib.parse.quote(last)}" \
            if how == "ws-query" else "/ws"
        c = RawWS(srv.addr, path, timeout=10 * S)
        assert c.recv_json(10 * S).get("event") == "connected"
        if how == "ws":
            c.send_cmd("subscribe", TOPIC, since=last)
        sub = c.recv_json(10 * S)
        assert (sub.get("event"), sub.get("topic")) == ("subscribed", TOPIC), sub
        objs = []
        deadline = time.monotonic() + 20 * S
        while not objs or objs[-1].get("id") != ids[-1]:
            objs.append(c.recv_json(max(0.0, deadline - time.monotonic())))
        live = publish(srv, TOPIC, payload(TOPIC, n_msg))
        objs.append(c.recv_json(10 * S))
        got = [ws_item(o) for o in objs]
    c.close()
    # exactly what was missed, in order, no gap, no duplicate, then live
    assert [it[0] for it in got] == ["msg"] * (n_msg - k + 1), \
        [it for it in got if it[0] != "msg"][:3]
    assert [it[2] for it in got] == list(range(k, n_msg + 1))
    assert [it[3] for it in got] == ids[k:] + [live]
    st = srv.stats()
    assert st["resumes"] == st0["resumes"] + 1, (st0, st)
    assert st["replayed"] == st0["replayed"] + n_msg - k, (st0, st)
    assert st["gaps"] == st0["gaps"], (st0, st)


# --------------------------------------------------------------------------------------------
# drop_oldest


HISTORY = 50
RSS_LIMIT_KB = 16 * 1024


@pytest.mark.timeout(240)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_drop_oldest_keeps_slow_one_bounded_then_gap_and_retained(pushletd, transport):
    n_msg = 5000                     # 40 MiB published; the history keeps the last 50 (400 KiB)
    srv = pushletd("--slow-consumer", "drop_oldest", "--max-output-bytes", str(MAX_OUT),
                   "--history-size", str(HISTORY), env=server_env())
    slow = Slow(srv, transport)
    samples = []
    rss0 = srv.rss_kb()
    ids, _ = run_async(flood(srv, n_msg, transport, rss_samples=samples), 200 * S)

    growth = max(kb for _, kb in samples) - rss0
    assert growth < RSS_LIMIT_KB, f"RSS grew by {growth} kB (samples: {samples})"
    # the slow one is still connected (the fast ones left), it fell behind once, nobody was
    # dropped
    st = fast_readers_gone(srv, 1)
    assert st["sse_connections" if transport == "sse" else "ws_connections"] == 1, st
    assert st["slow_consumer_drops"] == 0, st
    assert st["slow_consumer_lags"] == 1, st
    assert st["history_messages"] == HISTORY, st

    # now it reads everything: the prefix that was queued, a gap, then the retained messages
    slow.drain(lambda items: any(it[0] == "msg" and it[2] == n_msg - 1 for it in items), 60,
               "the last published message")
    live = publish(srv, TOPIC, payload(TOPIC, n_msg))
    slow.drain(lambda items: any(it[3] == live for it in items), 10, "a live message")
    items = slow.items
    gaps = [i for i, it in enumerate(items) if it[0] == "gap"]
    assert len(gaps) == 1, [items[i] for i in gaps]
    g = gaps[0]
    k = check_prefix(items[:g])
    assert items[g][1:3] == (TOPIC, "slow_consumer"), items[g]
    assert [it[3] for it in items[:g]] == ids[:k]
    rest = items[g + 1:]
    assert all(it[0] == "msg" for it in rest), rest[:3]
    # exactly what the history held when it caught up (the last HISTORY), then live
    assert [it[2] for it in rest] == list(range(n_msg - HISTORY, n_msg + 1)), \
        f"after the gap: {[it[2] for it in rest][:5]}... (prefix ended at {k})"
    assert [it[3] for it in rest] == ids[n_msg - HISTORY:] + [live]
    assert k < n_msg - HISTORY, "nothing was missed: the slow subscriber was not behind"
    # the gap's ID is a position between what it had and what follows
    gap_seq = seq(items[g][3])
    assert (seq(ids[k - 1]) if k else seq(slow.start_id)) <= gap_seq < seq(rest[0][3]), \
        (items[g], ids[k - 1] if k else slow.start_id, rest[0])
    st = srv.stats()
    assert st["slow_consumer_lags"] == 1 and st["slow_consumer_drops"] == 0, st
    assert st["gaps"] == 1 and st["replayed"] == HISTORY, st
    slow.close()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_drop_oldest_history_holds_everything_no_gap(pushletd, transport):
    """The slow one fell behind, but the history still holds all it missed: it catches up
    with every message, in order, no gap, no duplicate."""
    n_msg = 1000
    srv = pushletd("--slow-consumer", "drop_oldest", "--max-output-bytes", str(MAX_OUT),
                   "--history-size", "2000")
    slow = Slow(srv, transport)
    ids, _ = run_async(flood(srv, n_msg, transport), 150 * S)
    st = fast_readers_gone(srv, 1)
    assert st["slow_consumer_lags"] == 1 and st["slow_consumer_drops"] == 0, st
    slow.drain(lambda items: any(it[0] == "msg" and it[2] == n_msg - 1 for it in items), 60,
               "the last published message")
    live = publish(srv, TOPIC, payload(TOPIC, n_msg))
    slow.drain(lambda items: any(it[3] == live for it in items), 10, "a live message")
    k = check_prefix(slow.items)
    assert k == n_msg + 1
    assert [it[3] for it in slow.items] == ids + [live]
    st = srv.stats()
    assert st["gaps"] == 0 and st["slow_consumer_lags"] == 1, st
    assert 0 < st["replayed"] < n_msg, st
    slow.close()


def check_interrupted_stream(items, topics, last_index):
    """Per topic: messages in order, no duplicate; a hole only right after a slow_consumer gap
    of that topic (and a gap only before a hole); the stream reaches last_index."""
    problems = []
    for t in topics:
        prev, gap_pending, ngaps = -1, False, 0
        for it in items:
            if it[1] != t:
                continue
            if it[0] == "gap":
                if it[2] != "slow_consumer":
                    problems.append(f"{t}: gap {it!r}")
                gap_pending = True
                ngaps += 1
                continue
            assert it[0] == "msg", it
            if it[2] <= prev:
                problems.append(f"{t}: {it[2]} after {prev} (disorder or duplicate)")
            elif it[2] > prev + 1 and not gap_pending:
                problems.append(f"{t}: hole {prev + 1}..{it[2] - 1} without a gap")
            elif it[2] == prev + 1 and gap_pending:
                problems.append(f"{t}: gap before {it[2]}, but nothing was missed")
            prev, gap_pending = it[2], False
        if last_index is not None and prev != last_index:
            problems.append(f"{t}: ended at {prev}, expected {last_index}")
    assert not problems, problems[:10]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_drop_oldest_repeated_lag_and_catch_up_two_topics(pushletd, transport):
    """Three rounds, on two topics: the client stops reading while a burst goes by (it falls
    behind on both), then reads while messages keep trickling in (it catches up from history
    and turns live again under traffic). Per topic it sees messages in order, no duplicate,
    and a hole only behind a slow_consumer gap."""
    topics = ("sa", "sb")
    rounds, burst, trickle = 3, 600, 60    # a burst: 4.8 MiB, 300 per topic; history 100
    srv = pushletd("--slow-consumer", "drop_oldest", "--max-output-bytes", str(MAX_OUT),
                   "--history-size", "100")
    slow = Slow(srv, transport, topics)
    sent = {t: [] for t in topics}
    n_pub = 0

    with RawHTTP(srv.addr, timeout=10 * S) as conn:
        def pub():
            nonlocal n_pub
            t = topics[n_pub % 2]
            sent[t].append(publish_on(conn, t, payload(t, len(sent[t]))))
            n_pub += 1

        def seen_latest(items):
            return all(max((it[2] for it in items if it[0] == "msg" and it[1] == t),
                           default=-1) == len(sent[t]) - 1 for t in topics)

        for r in range(rounds):
            lags0 = srv.stats()["slow_consumer_lags"]
            for _ in range(burst):
                pub()
            assert srv.stats()["slow_consumer_lags"] >= lags0 + 2, \
                f"round {r}: the client did not fall behind on both topics"
            # read, while a message is published every few reads (the reader is faster)
            deadline = time.monotonic() + 60 * S
            reads = 0
            while not (reads >= 4 * trickle and seen_latest(slow.items)):
                assert time.monotonic() < deadline, \
                    f"round {r}: never caught up ({len(slow.items)} items)"
                slow.read_some(16384)
                reads += 1
                if reads % 4 == 0 and reads <= 4 * trickle:
                    pub()
    items = slow.items
    check_interrupted_stream(items, topics, None)
    for t in topics:
        got = [it for it in items if it[0] == "msg" and it[1] == t]
        assert got[-1][2] == len(sent[t]) - 1, (t, got[-1])
        if transport == "ws":      # message IDs (an SSE stream of two topics has cursors)
            assert [it[3] for it in got] == [sent[t][it[2]] for it in got], t
    gaps = sum(1 for it in items if it[0] == "gap")
    st = srv.stats()
    assert gaps >= 2 * rounds, f"{gaps} gaps in {rounds} rounds"
    assert st["slow_consumer_lags"] >= 2 * rounds and st["slow_consumer_drops"] == 0, st
    assert st["gaps"] == gaps, st
    slow.close()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_drop_oldest_lagging_client_misses_publish_to_all(pushletd, transport):
    """Publish-to-all messages are in no history: a connection behind under drop_oldest misses
    them (counted as a lag); connections that keep up get them; once caught up it gets the
    next one."""
    n_msg = 1000
    srv = pushletd("--slow-consumer", "drop_oldest", "--max-output-bytes", str(MAX_OUT),
                   "--history-size", "2000")
    slow = Slow(srv, transport)
    sent = {}
    # as big as the topic messages: it cannot fit in the output of a connection that is behind
    # (a small one still would: a lagging connection only stops taking what does not fit)
    behind = b"behind:" + b"e" * (MSG_SIZE - 7)

    async def between(n, conn):
        # once the slow one is behind (and well before the end)
        if "missed" not in sent and n % 20 == 0 and n <= n_msg - 100 and \
                (await asyncio.to_thread(srv.stats))["slow_consumer_lags"] == 1:
            sent["missed"] = await apublish(conn, None, behind, "/publish_all?event=everyone")

    ids, checkers = run_async(flood(srv, n_msg, transport, between=between), 150 * S)
    assert "missed" in sent, "the slow subscriber never fell behind"
    for c in checkers:
        assert [it[2] for it in c.others] == [behind.decode()], [it[:2] for it in c.others]
    st = fast_readers_gone(srv, 1)
    assert st["slow_consumer_lags"] == 2, st     # fell behind once, then missed one message
    slow.drain(lambda items: any(it[0] == "msg" and it[2] == n_msg - 1 for it in items), 60,
               "the last published message")
    later = publish(srv, None, b"to everyone, caught up", "/publish_all?event=everyone")
    slow.drain(lambda items: any(it[0] == "all" for it in items), 10, "the publish-to-all")
    msgs = [it for it in slow.items if it[0] == "msg"]
    assert check_prefix(msgs) == n_msg and [it[3] for it in msgs] == ids
    alls = [it for it in slow.items if it[0] == "all"]
    assert [it[2] for it in alls] == ["to everyone, caught up"], alls
    assert slow.items[-1] == alls[-1], slow.items[-3:]
    if transport == "ws":
        assert alls[0][3] == later, alls    # SSE events of publish-to-all carry no id line
    else:
        assert alls[0][3] is None, alls
    st = srv.stats()
    assert st["slow_consumer_lags"] == 2 and st["slow_consumer_drops"] == 0, st
    slow.close()
