"""Message IDs, per-topic history and resume over SSE (issue #4), with real sockets.

A publisher thread publishes "<topic>:<n>" continuously while a subscriber drops its stream at
random points (after a random number of events, sometimes in the middle of an event, with a FIN
or a RST) and reconnects with the last event ID it saw, as an EventSource would, while publishes
race the reconnect. Every resumed stream must carry exactly the missed messages, in order, with
no duplicate at the seam, then the live ones; across all reconnects the subscriber must get
everything published exactly once. Then the edge cases: gaps (history expired by count or age,
epoch changed after a restart, unknown position, cursor mismatch), malformed cursors, a drop
before the first message, publish_all events without an id: line.

The helpers here (Publisher, SSEClient, publish_id, ...) are also used by test_resume_ws.py and
test_resume_eventsource.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import socket
import struct
import threading
import time
import urllib.parse
from collections import Counter

import pytest

import pushlet_testlib as pl
from pushlet_testlib import RawHTTP, SSEParser, build_request, events_path

# "EPOCH-SEQ": EPOCH 1..13 chars [0-9a-z], SEQ decimal
ID_RE = re.compile(r"^([0-9a-z]{1,13})-(\d+)$")
# cursor = position *("." position) ["~" check]; position = [epoch "-"] seq
CURSOR_RE = re.compile(r"^[0-9a-z]{1,13}-\d+(?:\.(?:[0-9a-z]{1,13}-)?\d+)*(?:~[0-9a-z]{4})?$")
MULTI_CURSOR_RE = re.compile(
    r"^[0-9a-z]{1,13}-\d+((?:\.(?:[0-9a-z]{1,13}-)?\d+)*)~[0-9a-z]{4}$")


def parse_id(mid) -> tuple[str, int]:
    """(epoch, seq) of a message ID; fails the test if it does not follow the grammar."""
    m = ID_RE.match(mid) if isinstance(mid, str) else None
    assert m, f"message ID {mid!r} is not EPOCH-SEQ (EPOCH 1..13 of [0-9a-z], SEQ decimal)"
    return m.group(1), int(m.group(2))


def check_cursor(cursor, n_topics):
    """A stream cursor: a message ID for one topic, else n positions and a ~check."""
    assert isinstance(cursor, str), f"missing cursor: {cursor!r}"
    if n_topics == 1:
        parse_id(cursor)
        return
    m = MULTI_CURSOR_RE.match(cursor)
    assert m, f"cursor {cursor!r} of a {n_topics}-topic stream does not follow the grammar"
    assert m.group(1).count(".") == n_topics - 1, \
        f"cursor {cursor!r} should hold {n_topics} positions"


def check_consecutive(ids, what):
    """IDs of one topic published in a row: one epoch, SEQ +1 each."""
    parsed = [parse_id(i) for i in ids]
    for (e0, s0), (e1, s1), i1 in zip(parsed, parsed[1:], ids[1:]):
        assert e1 == e0, f"{what}: epoch changed within one run ({ids[0]!r} ... {i1!r})"
        assert s1 == s0 + 1, f"{what}: {i1!r} follows seq {s0} (SEQ must be consecutive)"


def scaled(seconds):
    return seconds * pl.time_scale()


def run_seed(offset: int) -> int:
    """Seed of a randomized scenario: PUSHLET_TEST_SEED (to replay a failure) or a fresh one;
    every failure message of the scenario names it (see seeded())."""
    env = os.environ.get("PUSHLET_TEST_SEED")
    return int(env) + offset if env else random.randrange(1 << 30)


@contextlib.contextmanager
def seeded(seed):
    try:
        yield
    except AssertionError as e:
        raise AssertionError(f"[seed {seed}: rerun with PUSHLET_TEST_SEED] {e}") from e


# --------------------------------------------------------------------------------------------
# publishing


def publish_on(conn: RawHTTP, topic, data, event=None) -> str:
    """POST /publish on a keep-alive connection; returns the message ID of the answer."""
    q = {"topic": topic}
    if event is not None:
        q["event"] = event
    r = conn.request("POST", "/publish?" + urllib.parse.urlencode(q),
                     body=data.encode() if isinstance(data, str) else data)
    assert r.status == 200, f"publish to {topic} answered {r.status} {r.body[:200]!r}"
    mid = r.json().get("id")
    parse_id(mid)
    return mid


def publish_id(srv, topic, data, event=None) -> str:
    """One publish on a fresh connection; returns its message ID (EPOCH-SEQ)."""
    with RawHTTP(srv.addr, timeout=scaled(10)) as c:
        return publish_on(c, topic, data, event)


def publish_all_id(srv, data) -> str:
    with RawHTTP(srv.addr, timeout=scaled(10)) as c:
        r = c.request("POST", "/publish_all", body=data.encode())
        assert r.status == 200, f"publish_all answered {r.status} {r.body[:200]!r}"
        return r.json()["id"]


class Publisher(threading.Thread):
    """Publishes "<topic>:<n>[|<pad>]" (n counted per topic) from a thread over one keep-alive
    connection, with random pauses and bursts, until stop(). published[topic][n] is the ID the
    server answered for message n; a message is counted only once its answer came back, so
    count() taken before a reconnect is a lower bound of what was published before it."""

    def __init__(self, srv, topics, seed, pause=(0.0, 0.003), burst=(10, 40), burst_p=0.02,
                 pad=0):
        super().__init__(daemon=True)
        self.pad = "|" + "x" * pad if pad else ""
        self.srv = srv
        self.topics = list(topics)
        self.rng = random.Random(seed)
        self.pause = pause
        self.burst = burst
        self.burst_p = burst_p
        self.published = {t: [] for t in self.topics}
        self.lock = threading.Lock()
        self.stop_ev = threading.Event()
        self.error = None

    def run(self):
        try:
            with RawHTTP(self.srv.addr, timeout=scaled(10)) as c:
                while not self.stop_ev.is_set():
                    n = self.rng.randint(*self.burst) if self.rng.random() < self.burst_p else 1
                    for _ in range(n):
                        t = self.rng.choice(self.topics)
                        k = len(self.published[t])
                        mid = publish_on(c, t, f"{t}:{k}{self.pad}")
                        with self.lock:
                            self.published[t].append(mid)
                    lo, hi = self.pause
                    if hi > 0:
                        time.sleep(self.rng.uniform(lo, hi))
        except BaseException as e:  # reported by stop()
            self.error = e

    def counts(self) -> dict:
        with self.lock:
            return {t: len(v) for t, v in self.published.items()}

    def total(self) -> int:
        return sum(self.counts().values())

    def stop(self):
        self.stop_ev.set()
        self.join(scaled(15))
        assert not self.is_alive(), "publisher thread did not stop"
        if self.error is not None:
            raise AssertionError(f"publisher failed: {self.error!r}") from self.error

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop_ev.set()
        self.join(scaled(15))


# --------------------------------------------------------------------------------------------
# an SSE subscriber that can drop its stream anywhere


def set_rst(sock):
    """close() will then send a RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class SSEClient:
    """One SSE stream on a blocking socket, read block by block.

    last_id follows EventSource: the "last event ID string" changes only when an event is
    dispatched (an id: line of an event cut off before its blank line does not count). Pass it
    back as `cursor` to resume, via the Last-Event-ID header (via="header") or
    ?last_event_id= (via="query").
    """

    def __init__(self, addr, topics, cursor=None, via="header", timeout=10.0, headers=None,
                 query_cursor=None):
        q = {}
        if via == "query" and cursor is not None:
            q["last_event_id"] = cursor
        if query_cursor is not None:
            q["last_event_id"] = query_cursor
        self.path = events_path(*topics, **q)
        hdrs = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if via == "header" and cursor is not None:
            hdrs["Last-Event-ID"] = cursor
        hdrs.update(headers or {})
        self.timeout = scaled(timeout)
        self.c = RawHTTP(addr, timeout=self.timeout)
        self.c.send(build_request("GET", self.path, b"", hdrs, addr))
        self.response = self.c.read_response(head_only=True)
        self.parser = SSEParser()
        self.last_id = cursor if via in ("header", "query") else None
        self.pending = []
        self.blocks = []  # raw bytes of every complete block read

    @property
    def status(self):
        return self.response.status

    def body(self, timeout=5.0) -> bytes:
        """The body of an error answer (Content-Length)."""
        n = int(self.response.header("content-length") or 0)
        return self.c.read_exact(n, time.monotonic() + scaled(timeout))

    def next_event(self, timeout=None) -> pl.Event:
        """The next dispatched event (comments skipped); bounded."""
        deadline = time.monotonic() + (scaled(timeout) if timeout is not None else self.timeout)
        while not self.pending:
            i = self.c.buf.find(b"\n\n")
            if i >= 0:
                block, self.c.buf = self.c.buf[:i + 2], self.c.buf[i + 2:]
                self.blocks.append(block)
                for e in self.parser.feed(block):
                    self.last_id = e.last_id
                    self.pending.append(e)
                continue
            try:
                more = self.c._fill(deadline)
            except (ConnectionResetError, BrokenPipeError):
                more = False
            if not more:
                raise pl.ConnectionClosed(f"SSE stream {self.path} ended (last id "
                                          f"{self.last_id!r}, unparsed {self.c.buf[:200]!r})")
        return self.pending.pop(0)

    def events(self, n, timeout=None) -> list:
        return [self.next_event(timeout) for _ in range(n)]

    def expect_connected(self, n_topics=1, require_id=True) -> pl.Event:
        """The connected event, with its start position (require_id=False: a stream whose
        cursor did not fit may leave the id: line out, so a reconnect reports it again)."""
        assert self.status == 200, f"GET {self.path} answered {self.status}"
        e = self.next_event()
        assert e.event == "connected" and e.data == "Connection established", \
            f"first event of {self.path} is {e!r}"
        if require_id or e.id is not None:
            assert e.id is not None, f"the connected event carries no id: line: {e!r}"
            check_cursor(e.id, n_topics)
        return e

    def no_event_within(self, seconds) -> None:
        """Nothing is dispatched for `seconds` (heartbeat comments are fine)."""
        try:
            e = self.next_event(seconds / pl.time_scale())
        except pl.Timeout:
            return
        raise AssertionError(f"unexpected event on {self.path}: {e!r}")

    def cut(self, mid_event=False, rst=False, wait=0.05, rng=random):
        """Drop the stream. mid_event: first take part of the next block (never its closing
        blank line) into the parser, as a client whose connection broke mid-event would."""
        if mid_event:
            deadline = time.monotonic() + scaled(wait)
            try:
                while not self.c.buf and time.monotonic() < deadline:
                    if not self.c._fill(deadline):
                        break
            except (pl.Timeout, OSError):
                pass
            i = self.c.buf.find(b"\n\n")
            end = i + 1 if i >= 0 else len(self.c.buf)
            if end > 0:
                cut_at = rng.randint(1, end)
                evs = self.parser.feed(self.c.buf[:cut_at])
                assert not evs, f"a block prefix dispatched an event: {evs!r}"
        if rst:
            try:
                set_rst(self.c.sock)
            except OSError:
                pass
        self.c.close()

    def close(self):
        self.c.close()


def gap_of(e) -> dict:
    assert e.event == "gap", f"expected a gap event, got {e!r}"
    d = json.loads(e.data)
    assert isinstance(d, dict) and "topic" in d and "reason" in d, f"gap data {e.data!r}"
    return d


def parse_data(data) -> tuple[str, int]:
    """(topic, n) of a Publisher message's data."""
    t, _, n = data.split("|", 1)[0].rpartition(":")
    assert t and n.isdigit(), f"unexpected data {data[:100]!r}"
    return t, int(n)


def message_of(e) -> tuple[str, int]:
    assert e.event == "message", f"expected a message, got {e!r}"
    return parse_data(e.data)


# --------------------------------------------------------------------------------------------
# 1-3: random disconnects with racing publishes


def resume_loop(srv, topics, iterations, via, seed, budget, pad=0):
    """The random-disconnect scenario; returns a small summary dict for extra checks."""
    rng = random.Random(seed)
    n_topics = len(topics)
    expect = {t: 0 for t in topics}    # next n per topic
    got = []                           # (topic, n, id line) in order received
    replay_iters = replayed = 0
    resume_from = None
    t_end = time.monotonic() + budget

    for t in topics:  # topics with history (a fresh topic is test_sse_drop_before_first_message)
        publish_id(srv, t, f"{t}:prime")
    s = SSEClient(srv.addr, topics)
    cursor = s.expect_connected(n_topics).id
    with Publisher(srv, topics, seed, pad=pad) as pub:
        for it in range(iterations + 1):
            final = it == iterations
            if final:
                pub.stop()
                target = None
            else:
                target = rng.choice([0, 1, 2, rng.randint(0, 10), rng.randint(0, 40)])
            assert time.monotonic() < t_end, \
                f"only {it} of {iterations} iterations within {budget:.0f}s"
            before = pub.counts()
            if it > 0:
                s = SSEClient(srv.addr, topics, cursor, via)
                e = s.expect_connected(n_topics)
                cursor = s.last_id
            n_read = 0
            it_replayed = 0
            while True:
                if final:
                    if all(expect[t] == len(pub.published[t]) for t in topics):
                        break
                elif n_read >= target:
                    break
                e = s.next_event(5.0)
                if e.event == "gap":
                    raise AssertionError(f"iteration {it}: unexpected gap {e.data} resuming from "
                                         f"{resume_from!r} via {via}")
                t, n = message_of(e)
                assert n == expect[t], (
                    f"iteration {it} ({via}, resumed from {resume_from!r}): topic {t} got "
                    f"message {n}, expected {expect[t]}"
                    + (" (duplicate)" if n < expect[t] else " (messages lost)"))
                expect[t] += 1
                check_cursor(e.id, n_topics)
                if n < before[t]:
                    it_replayed += 1
                got.append((t, n, e.id))
                cursor = s.last_id
                n_read += 1
            replayed += it_replayed
            replay_iters += it_replayed > 0
            resume_from = cursor
            if final:
                s.close()
                break
            s.cut(mid_event=rng.random() < 0.5, rst=rng.random() < 0.5, rng=rng)
            away = rng.random()
            if away < 0.1:  # a longer absence: a replay of ~100 messages
                time.sleep(rng.uniform(0.05, 0.15))
            elif away < 0.4:
                time.sleep(rng.uniform(0, 0.02))

    # everything published arrived exactly once
    sent = Counter(f"{t}:{k}" for t in topics for k in range(len(pub.published[t])))
    received = Counter(f"{t}:{n}" for t, n, _ in got)
    assert received == sent, (f"lost: {sorted(sent - received)[:10]}, "
                              f"twice: {sorted(received - sent)[:10]}")
    for t in topics:
        check_consecutive(pub.published[t], f"IDs of topic {t}")
        if n_topics == 1:  # single-topic stream: the id: line is the message ID itself
            assert [i for _, _, i in got] == pub.published[t], "id: lines differ from /publish"
    return {"replayed": replayed, "replay_iters": replay_iters, "total": sum(sent.values()),
            "published": pub.published}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("via,small", [("header", False), ("query", False), ("header", True)],
                         ids=["header", "query", "header-small-output"])
def test_sse_resume_random_disconnects(pushletd, via, small):
    """100 random drops of a single-topic stream, resumed by Last-Event-ID or ?last_event_id=.
    small: 16 KiB output bound and 200-byte messages, so that a replay takes many loop turns
    (the catch-up pass never fills more than half the bound) while live messages arrive."""
    flags = ["--history-size", "100000"]
    if small:
        flags += ["--max-output-bytes", "16384"]
    srv = pushletd(*flags)
    seed = run_seed(0)
    with seeded(seed):
        r = resume_loop(srv, ["r"], 100, via, seed=seed, budget=scaled(60),
                        pad=200 if small else 0)
    # the scenario really exercised replay and the replay/live seam
    assert r["replay_iters"] >= 10, f"only {r['replay_iters']} reconnects had missed messages"
    st = srv.stats()
    assert st["resumes"] >= r["replay_iters"], \
        f"/stats resumes = {st['resumes']} after {r['replay_iters']} resumes with a replay"
    assert st["replayed"] >= r["replayed"], \
        f"/stats replayed = {st['replayed']}, but {r['replayed']} messages were caught up"
    assert st["gaps"] == 0, st


@pytest.mark.timeout(90)
def test_sse_resume_three_topics(pushletd):
    """A stream of 3 topics dropped at random and resumed with its cursor: per topic, exactly
    the missed messages in order, then live."""
    srv = pushletd("--history-size", "100000")
    seed = run_seed(1)
    with seeded(seed):
        r = resume_loop(srv, ["ta", "tb", "tc"], 60, "header", seed=seed, budget=scaled(60))
    assert r["replay_iters"] >= 6, f"only {r['replay_iters']} reconnects had missed messages"
    for t, ids in r["published"].items():
        assert len(ids) > 20, f"topic {t}: only {len(ids)} messages published"


# --------------------------------------------------------------------------------------------
# deterministic edge cases


def read_messages(s, n, timeout=5.0) -> list:
    """n events that must all be messages; returns their data."""
    out = []
    for _ in range(n):
        e = s.next_event(timeout)
        assert e.event == "message", f"expected a message, got {e!r} (after {out})"
        out.append(e.data)
    return out


def test_sse_header_wins_over_query(pushletd):
    srv = pushletd()
    s = SSEClient(srv.addr, ["hq"])
    s.expect_connected()
    ids = [publish_id(srv, "hq", f"m{i}") for i in range(5)]
    assert read_messages(s, 5) == [f"m{i}" for i in range(5)]
    s.close()
    s = SSEClient(srv.addr, ["hq"], ids[1], "header", query_cursor=ids[3])
    s.expect_connected()
    assert read_messages(s, 3) == ["m2", "m3", "m4"], "Last-Event-ID must win over the query"
    publish_id(srv, "hq", "live")
    assert read_messages(s, 1) == ["live"]
    s.close()


def test_sse_drop_before_first_message(pushletd):
    """The id of the connected event is a position: a subscriber that drops before its first
    message and reconnects with it gets what was published meanwhile (fresh topic, topic with
    history, several topics)."""
    srv = pushletd()
    publish_id(srv, "old", "before-0")
    publish_id(srv, "old", "before-1")
    for topics in (["fresh"], ["old"], ["fresh2", "old", "fresh3"]):
        s = SSEClient(srv.addr, topics)
        cursor = s.expect_connected(len(topics)).id
        s.cut(rst=True)
        sent = []
        for i in range(3):
            for t in topics:
                publish_id(srv, t, f"{t}:{i}")
                sent.append(f"{t}:{i}")
        s = SSEClient(srv.addr, topics, cursor)
        s.expect_connected(len(topics))
        got = read_messages(s, len(sent))
        for t in topics:
            assert [d for d in got if d.startswith(t + ":")] == [f"{t}:{i}" for i in range(3)], \
                f"{topics}: got {got}"
        publish_id(srv, topics[-1], "live")
        assert read_messages(s, 1) == ["live"], f"{topics}: no live message after the replay"
        s.close()


def test_sse_quiet_topic_reconnect_without_gap(pushletd):
    """A subscriber of a topic that never had a message drops; other topics get traffic; it
    reconnects with the connected event's id: nothing was missed, so no gap, and the next
    message of its topic arrives."""
    srv = pushletd()
    s = SSEClient(srv.addr, ["quiet"])
    cursor = s.expect_connected().id
    s.cut(rst=True)
    pl.wait_until(lambda: srv.stats()["sse_connections"] == 0, scaled(5), what="the drop")
    for i in range(3):
        publish_id(srv, "busy", f"busy:{i}")
    s = SSEClient(srv.addr, ["quiet"], cursor)
    s.expect_connected()
    publish_id(srv, "quiet", "quiet:0")
    assert read_messages(s, 1) == ["quiet:0"], "spurious gap for a topic that missed nothing"
    s.close()


def test_sse_single_topic_ids_are_the_message_ids(pushletd):
    srv = pushletd()
    s = SSEClient(srv.addr, ["ids"])
    c = s.expect_connected()
    ids = [publish_id(srv, "ids", f"m{i}") for i in range(5)]
    check_consecutive(ids, "topic ids")
    evs = s.events(5)
    assert [e.id for e in evs] == ids
    # the connected event's position is the one just before the first message
    ce, cs = parse_id(c.id)
    e0, s0 = parse_id(ids[0])
    assert (ce, cs + 1) == (e0, s0), f"connected id {c.id!r}, first message {ids[0]!r}"
    s.close()


def test_sse_publish_all_has_no_id_line_and_keeps_position(pushletd):
    srv = pushletd()
    s = SSEClient(srv.addr, ["pa"])
    s.expect_connected()
    publish_id(srv, "pa", "m0")
    assert read_messages(s, 1) == ["m0"]
    publish_all_id(srv, "to-everyone")
    e = s.next_event()
    assert e.data == "to-everyone", e
    assert e.id is None, f"publish_all event carries an id: line: {e.lines}"
    assert not any(ln.startswith("id") for ln in e.lines), e.lines
    last = s.last_id
    s.close()
    publish_id(srv, "pa", "m1")
    s = SSEClient(srv.addr, ["pa"], last)
    s.expect_connected()
    assert read_messages(s, 1) == ["m1"]
    s.close()


def _drop_after(srv, topics, n_msgs):
    """Connect, read the connected event and n_msgs published messages, drop: the cursor."""
    s = SSEClient(srv.addr, topics)
    s.expect_connected(len(topics))
    for i in range(n_msgs):
        for t in topics:
            publish_id(srv, t, f"{t}:seen{i}")
    read_messages(s, n_msgs * len(topics))
    cursor = s.last_id
    s.cut(rst=True)
    return cursor


def test_sse_gap_history_expired(pushletd):
    """--history-size 5, 20 published while away: gap history_expired naming the topic, then
    the 5 retained messages, then live; the gap's id is itself a resumable position."""
    srv = pushletd("--history-size", "5")
    cursor = _drop_after(srv, ["hx"], 1)
    ids = [publish_id(srv, "hx", f"hx:{i}") for i in range(20)]
    s = SSEClient(srv.addr, ["hx"], cursor)
    s.expect_connected()
    g = s.next_event()
    d = gap_of(g)
    assert (d["topic"], d["reason"]) == ("hx", "history_expired"), d
    assert g.id is not None, f"gap without id: line: {g.lines}"
    assert read_messages(s, 2) == ["hx:15", "hx:16"]
    assert s.last_id == ids[16]
    s.cut()
    # resuming inside the retained window: no gap any more
    s = SSEClient(srv.addr, ["hx"], ids[16])
    s.expect_connected()
    assert read_messages(s, 3) == ["hx:17", "hx:18", "hx:19"]
    publish_id(srv, "hx", "live")
    assert read_messages(s, 1) == ["live"]
    s.close()
    st = srv.stats()
    assert st["gaps"] >= 1, st
    assert st["history_messages"] == 5, f"history of one topic capped at 5: {st}"



def test_sse_gap_history_expired_several_topics(pushletd):
    """Only the topic that lost messages gets a gap; the other resumes exactly."""
    srv = pushletd("--history-size", "5")
    cursor = _drop_after(srv, ["ga", "gb"], 1)
    for i in range(20):
        publish_id(srv, "ga", f"ga:{i}")
    for i in range(3):
        publish_id(srv, "gb", f"gb:{i}")
    s = SSEClient(srv.addr, ["ga", "gb"], cursor)
    s.expect_connected(2)
    evs = s.events(1 + 5 + 3)
    gaps = [gap_of(e) for e in evs if e.event == "gap"]
    assert [(g["topic"], g["reason"]) for g in gaps] == [("ga", "history_expired")], evs
    gi = next(i for i, e in enumerate(evs) if e.event == "gap")
    ga = [e.data for e in evs if e.data.startswith("ga:")]
    gb = [e.data for e in evs if e.data.startswith("gb:")]
    assert ga == [f"ga:{i}" for i in range(15, 20)], evs
    assert gb == ["gb:0", "gb:1", "gb:2"], evs
    assert all(i > gi for i, e in enumerate(evs) if e.data.startswith("ga:")), \
        "the gap must come before the topic's replayed messages"
    publish_id(srv, "ga", "ga:live")
    assert read_messages(s, 1) == ["ga:live"]
    s.close()


def test_sse_gap_history_age(pushletd):
    """--history-age 1: messages older than a second are not replayed (gap history_expired);
    younger ones are."""
    srv = pushletd("--history-age", "1")
    cursor = _drop_after(srv, ["ag"], 1)
    publish_id(srv, "ag", "ag:old1")
    publish_id(srv, "ag", "ag:old2")
    time.sleep(1.6)
    publish_id(srv, "ag", "ag:new")
    s = SSEClient(srv.addr, ["ag"], cursor)
    s.expect_connected()
    g = gap_of(s.next_event())
    assert (g["topic"], g["reason"]) == ("ag", "history_expired"), g
    assert read_messages(s, 1) == ["ag:new"]
    publish_id(srv, "ag", "ag:live")
    assert read_messages(s, 1) == ["ag:live"]
    s.close()
    # control: within the age, a resume replays without a gap
    c2 = _drop_after(srv, ["ag2"], 1)
    publish_id(srv, "ag2", "ag2:a")
    publish_id(srv, "ag2", "ag2:b")
    s = SSEClient(srv.addr, ["ag2"], c2)
    s.expect_connected()
    assert read_messages(s, 2) == ["ag2:a", "ag2:b"]
    s.close()


def test_sse_gap_epoch_changed(pushletd):
    """A position from a previous run (pushletd restarted): gap epoch_changed, then what the
    new run's history holds, then live."""
    a = pushletd()
    cursor = _drop_after(a, ["ep", "ep2"], 2)
    old_id = publish_id(a, "ep", "x")
    assert a.stop() == 0
    b = pushletd()
    new_ids = [publish_id(b, "ep", f"ep:new{i}") for i in range(2)]
    assert parse_id(new_ids[0])[0] != parse_id(old_id)[0], "a restart must draw a new epoch"
    ep_history = ["ep:new0", "ep:new1"]  # what the new run's history of "ep" holds
    for topics, cur in ((["ep"], old_id), (["ep", "ep2"], cursor)):
        s = SSEClient(b.addr, topics, cur)
        s.expect_connected(len(topics))
        evs = s.events(len(topics) + len(ep_history))
        gaps = sorted((gap_of(e)["topic"], gap_of(e)["reason"]) for e in evs if e.event == "gap")
        assert gaps == sorted((t, "epoch_changed") for t in topics), evs
        msgs = [e.data for e in evs if e.event == "message"]
        assert msgs == ep_history, evs
        first_ep = next(i for i, e in enumerate(evs) if e.event == "message")
        gap_ep = next(i for i, e in enumerate(evs) if e.event == "gap" and
                      gap_of(e)["topic"] == "ep")
        assert gap_ep < first_ep, evs
        publish_id(b, "ep", "ep:live")
        assert read_messages(s, 1) == ["ep:live"]
        ep_history.append("ep:live")
        s.close()


def test_sse_gap_unknown_position(pushletd):
    """A position ahead of the topic (never issued): gap unknown_position, then history."""
    srv = pushletd()
    s = SSEClient(srv.addr, ["un"])
    s.expect_connected()
    ids = [publish_id(srv, "un", f"un:{i}") for i in range(3)]
    read_messages(s, 3)
    s.close()
    epoch, seq = parse_id(ids[-1])
    s = SSEClient(srv.addr, ["un"], f"{epoch}-{seq + 1000}")
    s.expect_connected()
    g = gap_of(s.next_event())
    assert (g["topic"], g["reason"]) == ("un", "unknown_position"), g
    assert read_messages(s, 3) == ["un:0", "un:1", "un:2"]
    publish_id(srv, "un", "live")
    assert read_messages(s, 1) == ["live"]
    s.close()


MALFORMED = ["!!!", "abc-xyz", "-", "abc-1-2", "abc-", "a b-1", "abcdefghijklmn-1", "abc-1.",
             "abc-1~", "abc-1~abcde"]


def test_sse_malformed_query_cursor_is_400(pushletd):
    srv = pushletd()
    for bad in MALFORMED:
        s = SSEClient(srv.addr, ["mq"], bad, "query")
        assert s.status == 400, f"?last_event_id={bad!r} answered {s.status}"
        s.close()
    # the server is fine afterwards
    s = SSEClient(srv.addr, ["mq"])
    s.expect_connected()
    publish_id(srv, "mq", "ok")
    assert read_messages(s, 1) == ["ok"]
    s.close()


@pytest.mark.parametrize("topics", [["mh"], ["mh1", "mh2", "mh3"]])
def test_sse_malformed_header_cursor_mismatch_then_live(pushletd, topics):
    """A malformed Last-Event-ID header degrades to a gap cursor_mismatch for every topic and
    then live messages only (history not replayed), so an EventSource is never locked out."""
    srv = pushletd()
    for t in topics:
        publish_id(srv, t, f"{t}:history")
    for bad in ("!!!", "abc-xyz", "abc-1.2.3.4.5~zzzz"):
        s = SSEClient(srv.addr, topics, bad, "header")
        s.expect_connected(len(topics), require_id=False)
        evs = s.events(len(topics))
        assert sorted(gap_of(e)["topic"] for e in evs) == sorted(topics), evs
        assert {gap_of(e)["reason"] for e in evs} == {"cursor_mismatch"}, evs
        publish_id(srv, topics[0], f"{topics[0]}:live")
        assert read_messages(s, 1) == [f"{topics[0]}:live"], "history replayed after mismatch"
        resume_ok(srv, topics, s)


def resume_ok(srv, topics, s):
    """After a mismatch the stream's ids are good again: drop it, publish one message per
    topic, resume from the last id seen: exactly those, no gap."""
    last = s.last_id
    check_cursor(last, len(topics))
    s.cut(rst=True)
    for t in topics:
        publish_id(srv, t, f"{t}:after")
    s = SSEClient(srv.addr, topics, last)
    s.expect_connected(len(topics))
    got = read_messages(s, len(topics))
    assert sorted(got) == sorted(f"{t}:after" for t in topics), got
    s.close()


def test_sse_cursor_of_another_topic_list_mismatch(pushletd):
    """A well-formed cursor of another topic list (header or query): gap cursor_mismatch for
    every topic (not a 400), then live only."""
    srv = pushletd()
    cursor = _drop_after(srv, ["ca", "cb", "cc"], 1)
    for via in ("header", "query"):
        for topics in (["ca", "cb", "cx"], ["ca", "cb"], ["ca"]):
            s = SSEClient(srv.addr, topics, cursor, via)
            assert s.status == 200, f"{via} {topics}: {s.status}"
            s.expect_connected(len(topics), require_id=False)
            evs = s.events(len(topics))
            assert sorted((gap_of(e)["topic"], gap_of(e)["reason"]) for e in evs) == \
                sorted((t, "cursor_mismatch") for t in topics), (via, topics, evs)
            publish_id(srv, topics[-1], f"{topics[-1]}:live")
            assert read_messages(s, 1) == [f"{topics[-1]}:live"], (via, topics)
            resume_ok(srv, topics, s)
