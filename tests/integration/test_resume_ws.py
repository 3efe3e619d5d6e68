"""Resume over WebSocket (issue #4): `since` on subscribe and ?last_event_id= in the URL.

The same scenario as test_resume_sse.py with raw WebSocket clients (RawWS): a publisher thread
publishes continuously, the client drops its connection at random points (RST, FIN, or a
close frame it does not wait to see answered) and resubscribes with the last ID it saw, while
publishes race the reconnect. Then gaps, invalid `since`, a drop before the first message, and
the MessagePack encoding.
"""

from __future__ import annotations

import json
import random
import time
import urllib.parse
from collections import Counter

import msgpack
import pytest

import pushlet_testlib as pl
from test_resume_sse import (Publisher, check_consecutive, parse_data, parse_id, publish_id,
                             run_seed, scaled, seeded, set_rst)


class WSClient:
    """A RawWS that decodes every server frame (JSON or MessagePack) into a dict."""

    def __init__(self, addr, url_topics=(), cursor=None, fmt="json", timeout=10.0):
        q = [("topic", t) for t in url_topics]
        if cursor is not None:
            q.append(("last_event_id", cursor))
        if fmt != "json":
            q.append(("format", fmt))
        self.fmt = fmt
        self.path = "/ws" + ("?" + urllib.parse.urlencode(q) if q else "")
        self.ws = pl.RawWS(addr, self.path, timeout=scaled(timeout))
        self.timeout = scaled(timeout)

    def recv(self, timeout=None) -> dict:
        f = self.ws.recv_data(scaled(timeout) if timeout is not None else self.timeout)
        assert f.opcode == pl.OP_BINARY, f"server messages are binary frames, got {f!r}"
        if self.fmt == "msgpack":
            obj = msgpack.unpackb(f.payload, raw=False)
        else:
            obj = json.loads(f.payload.decode("utf-8"))
        assert isinstance(obj, dict), obj
        return obj

    def expect_connected(self):
        j = self.recv()
        assert j.get("event") == "connected", f"first frame of {self.path}: {j}"
        return j

    def subscribe(self, topic, since=None):
        fields = {} if since is None else {"since": since}
        self.ws.send_cmd("subscribe", topic, **fields)

    def expect_subscribed(self, topic) -> str:
        j = self.recv()
        assert j.get("event") == "subscribed" and j.get("topic") == topic, \
            f"expected subscribed {topic}, got {j}"
        parse_id(j.get("id"))
        return j["id"]

    def no_frame_within(self, seconds):
        try:
            j = self.recv(seconds / pl.time_scale())
        except pl.Timeout:
            return
        raise AssertionError(f"unexpected frame on {self.path}: {j}")

    def cut(self, how):
        if how == "rst":
            try:
                set_rst(self.ws.sock)
            except OSError:
                pass
        elif how == "close":
            try:
                self.ws.send_close(1000)
            except OSError:
                pass
        self.ws.close()

    def close(self):
        self.ws.close()


def check_message(j, topic=None):
    assert j.get("event") == "message", f"expected a message, got {j}"
    assert isinstance(j.get("topic"), str), j
    if topic is not None:
        assert j["topic"] == topic, j
    parse_id(j.get("id"))
    assert pl.TIMESTAMP_RE.match(j.get("timestamp", "")), j
    return j["data"]


def check_gap(j, topic, reason):
    assert j.get("event") == "gap" and j.get("topic") == topic, f"expected a gap on {topic}: {j}"
    parse_id(j.get("id"))
    d = json.loads(j["data"])
    assert (d.get("topic"), d.get("reason")) == (topic, reason), j


def messages(c, n, topic=None, timeout=5.0):
    return [check_message(c.recv(timeout), topic) for _ in range(n)]


# --------------------------------------------------------------------------------------------
# random disconnects


def ws_resume_loop(srv, topics, iterations, seed, fmt="json", url_mode_p=0.3, budget=60.0,
                   pad=0):
    rng = random.Random(seed)
    expect = {t: 0 for t in topics}
    pos = {}                 # per topic: last position seen (subscribed / gap / message id)
    got = []                 # (topic, n, id)
    replay_iters = 0
    budget = scaled(budget)
    t_end = time.monotonic() + budget

    for t in topics:  # topics with history (a fresh topic is test_ws_drop_before_first_message)
        publish_id(srv, t, f"{t}:prime")
    c = WSClient(srv.addr, fmt=fmt)
    c.expect_connected()
    for t in topics:
        c.subscribe(t)
        pos[t] = c.expect_subscribed(t)
    with Publisher(srv, topics, seed, pad=pad) as pub:
        for it in range(iterations + 1):
            final = it == iterations
            assert time.monotonic() < t_end, \
                f"only {it} of {iterations} iterations within {budget:.0f}s"
            if final:
                pub.stop()
            target = rng.choice([0, 1, 2, rng.randint(0, 10), rng.randint(0, 40)])
            before = pub.counts()
            mode = "first"
            if it > 0:
                resumed = dict(pos)
                if len(topics) == 1 and rng.random() < url_mode_p:
                    mode = "url"
                    c = WSClient(srv.addr, topics, pos[topics[0]], fmt=fmt)
                    c.expect_connected()
                    unsubscribed = set(topics)
                else:
                    mode = "since"
                    c = WSClient(srv.addr, fmt=fmt)
                    c.expect_connected()
                    for t in topics:
                        c.subscribe(t, pos[t])
                    unsubscribed = set(topics)
            else:
                resumed = dict(pos)
                unsubscribed = set()
            n_read = 0
            it_replayed = 0
            while True:
                if final:
                    if not unsubscribed and all(expect[t] == len(pub.published[t])
                                                for t in topics):
                        break
                elif n_read >= target and not unsubscribed:
                    break
                j = c.recv(5.0)
                ev = j.get("event")
                where = f"iteration {it} ({mode}, resumed from {resumed})"
                if ev == "subscribed":
                    t = j.get("topic")
                    assert t in unsubscribed, f"{where}: unexpected {j}"
                    unsubscribed.discard(t)
                    parse_id(j.get("id"))
                    pos[t] = j["id"]
                    continue
                assert ev == "message", f"{where}: unexpected frame {j}"
                t = j.get("topic")
                assert t in expect and t not in unsubscribed, \
                    f"{where}: message before its subscribed reply: {j}"
                tt, n = parse_data(check_message(j, t))
                assert tt == t, f"{where}: message {n} of {tt} on topic {t}"
                assert n == expect[t], (f"{where}: topic {t} got message {n}, expected "
                                        f"{expect[t]}" + (" (duplicate)" if n < expect[t]
                                                          else " (messages lost)"))
                expect[t] += 1
                it_replayed += n < before[t]
                pos[t] = j["id"]
                got.append((t, n, j["id"]))
                n_read += 1
            replay_iters += it_replayed > 0
            if final:
                c.close()
                break
            c.cut(rng.choice(["rst", "fin", "close"]))
            away = rng.random()
            if away < 0.1:  # a longer absence: a replay of ~100 messages
                time.sleep(rng.uniform(0.05, 0.15))
            elif away < 0.4:
                time.sleep(rng.uniform(0, 0.02))

    sent = Counter((t, k) for t in topics for k in range(len(pub.published[t])))
    received = Counter((t, n) for t, n, _ in got)
    assert received == sent, (f"lost: {sorted(sent - received)[:10]}, "
                              f"twice: {sorted(received - sent)[:10]}")
    for t in topics:
        check_consecutive(pub.published[t], f"IDs of topic {t}")
        assert [i for tt, _, i in got if tt == t] == pub.published[t], \
            f"message ids of {t} differ from the /publish answers"
    return {"replay_iters": replay_iters, "published": pub.published}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("small", [False, True], ids=["default", "small-output"])
def test_ws_resume_random_disconnects(pushletd, small):
    """100 random drops, resumed with `since` (or ?last_event_id= in the URL, 30%).
    small: 16 KiB output bound and 200-byte messages (a replay takes many loop turns)."""
    flags = ["--history-size", "100000"]
    if small:
        flags += ["--max-output-bytes", "16384"]
    srv = pushletd(*flags)
    seed = run_seed(2)
    with seeded(seed):
        r = ws_resume_loop(srv, ["w"], 100, seed=seed, pad=200 if small else 0)
    assert r["replay_iters"] >= 10, f"only {r['replay_iters']} reconnects had missed messages"
    st = srv.stats()
    assert st["gaps"] == 0, st


@pytest.mark.timeout(90)
def test_ws_resume_three_topics(pushletd):
    srv = pushletd("--history-size", "100000")
    seed = run_seed(3)
    with seeded(seed):
        r = ws_resume_loop(srv, ["wa", "wb", "wc"], 40, seed=seed)
    assert r["replay_iters"] >= 4, f"only {r['replay_iters']} reconnects had missed messages"


@pytest.mark.timeout(60)
def test_ws_resume_msgpack(pushletd):
    srv = pushletd("--history-size", "100000")
    seed = run_seed(4)
    with seeded(seed):
        r = ws_resume_loop(srv, ["wm"], 20, seed=seed, fmt="msgpack")
    assert r["replay_iters"] >= 2, f"only {r['replay_iters']} reconnects had missed messages"


# --------------------------------------------------------------------------------------------
# edge cases


def _drop_after(srv, topic, n_msgs):
    """Subscribe, get n_msgs messages, drop: the last message ID seen."""
    c = WSClient(srv.addr)
    c.expect_connected()
    c.subscribe(topic)
    last = c.expect_subscribed(topic)
    for i in range(n_msgs):
        publish_id(srv, topic, f"{topic}:seen{i}")
    for j in [c.recv() for _ in range(n_msgs)]:
        check_message(j, topic)
        last = j["id"]
    c.cut("rst")
    return last


def test_ws_subscribed_id_and_message_ids(pushletd):
    srv = pushletd()
    c = WSClient(srv.addr)
    c.expect_connected()
    c.subscribe("wi")
    start = c.expect_subscribed("wi")
    ids = [publish_id(srv, "wi", f"m{i}") for i in range(4)]
    got = [c.recv() for _ in range(4)]
    assert [j["id"] for j in got] == ids and [j["data"] for j in got] == [f"m{i}" for i in
                                                                          range(4)]
    check_consecutive([start] + ids, "subscribed id followed by the message ids")
    c.close()


def test_ws_quiet_topic_resubscribe_without_gap(pushletd):
    """since = the subscribed id of a topic that never had a message, after traffic on other
    topics: nothing was missed, so no gap."""
    srv = pushletd()
    c = WSClient(srv.addr)
    c.expect_connected()
    c.subscribe("wquiet")
    start = c.expect_subscribed("wquiet")
    c.cut("rst")
    pl.wait_until(lambda: srv.stats()["ws_connections"] == 0, scaled(5), what="the drop")
    for i in range(3):
        publish_id(srv, "wbusy", f"wbusy:{i}")
    c = WSClient(srv.addr)
    c.expect_connected()
    c.subscribe("wquiet", start)
    c.expect_subscribed("wquiet")
    publish_id(srv, "wquiet", "q0")
    assert messages(c, 1) == ["q0"], "spurious gap for a topic that missed nothing"
    c.close()


def test_ws_drop_before_first_message(pushletd):
    """The id of the subscribed reply is a position: resubscribing with it as since gets
    what was published meanwhile (fresh topic, topic with history; since and URL)."""
    srv = pushletd()
    publish_id(srv, "wold", "before")
    for topic in ("wfresh", "wold"):
        for mode in ("since", "url"):
            c = WSClient(srv.addr)
            c.expect_connected()
            c.subscribe(topic)
            start = c.expect_subscribed(topic)
            c.cut("rst")
            data = [f"{topic}:{mode}{i}" for i in range(3)]
            for d in data:
                publish_id(srv, topic, d)
            if mode == "since":
                c = WSClient(srv.addr)
                c.expect_connected()
                c.subscribe(topic, start)
            else:
                c = WSClient(srv.addr, [topic], start)
                c.expect_connected()
            c.expect_subscribed(topic)
            assert messages(c, 3, topic) == data, (topic, mode)
            publish_id(srv, topic, "live")
            assert messages(c, 1, topic) == ["live"]
            c.close()


@pytest.mark.parametrize("mode", ["since", "url"])
def test_ws_gap_history_expired(pushletd, mode):
    srv = pushletd("--history-size", "5")
    last = _drop_after(srv, "wx", 1)
    for i in range(20):
        publish_id(srv, "wx", f"wx:{i}")
    if mode == "since":
        c = WSClient(srv.addr)
        c.expect_connected()
        c.subscribe("wx", last)
    else:
        c = WSClient(srv.addr, ["wx"], last)
        c.expect_connected()
    c.expect_subscribed("wx")
    check_gap(c.recv(), "wx", "history_expired")
    assert messages(c, 5, "wx") == [f"wx:{i}" for i in range(15, 20)]
    publish_id(srv, "wx", "live")
    assert messages(c, 1, "wx") == ["live"]
    c.close()


def test_ws_gap_history_age(pushletd):
    srv = pushletd("--history-age", "1")
    last = _drop_after(srv, "wg", 1)
    publish_id(srv, "wg", "old")
    time.sleep(1.6)
    publish_id(srv, "wg", "new")
    c = WSClient(srv.addr)
    c.expect_connected()
    c.subscribe("wg", last)
    c.expect_subscribed("wg")
    check_gap(c.recv(), "wg", "history_expired")
    assert messages(c, 1, "wg") == ["new"]
    publish_id(srv, "wg", "live")
    assert messages(c, 1, "wg") == ["live"]
    c.close()


def test_ws_gap_epoch_changed(pushletd):
    a = pushletd()
    last = _drop_after(a, "we", 2)
    assert a.stop() == 0
    b = pushletd()
    new = [publish_id(b, "we", f"new{i}") for i in range(2)]
    assert parse_id(new[0])[0] != parse_id(last)[0], "a restart must draw a new epoch"
    c = WSClient(b.addr)
    c.expect_connected()
    c.subscribe("we", last)
    c.expect_subscribed("we")
    check_gap(c.recv(), "we", "epoch_changed")
    assert messages(c, 2, "we") == ["new0", "new1"]
    publish_id(b, "we", "live")
    assert messages(c, 1, "we") == ["live"]
    c.close()


def test_ws_gap_unknown_position(pushletd):
    srv = pushletd()
    last = _drop_after(srv, "wu", 2)
    epoch, seq = parse_id(last)
    c = WSClient(srv.addr)
    c.expect_connected()
    c.subscribe("wu", f"{epoch}-{seq + 500}")
    c.expect_subscribed("wu")
    check_gap(c.recv(), "wu", "unknown_position")
    assert messages(c, 2, "wu") == ["wu:seen0", "wu:seen1"]
    c.close()


def test_ws_invalid_since(pushletd):
    """A malformed since gets an error reply invalid_since (no subscription); the connection
    stays usable."""
    srv = pushletd()
    last = _drop_after(srv, "wv", 1)
    c = WSClient(srv.addr)
    c.expect_connected()
    for bad in ("!!!", "abc-xyz", "-", "abc-1-2", "", "abcdefghijklmn-1", "abc-1."):
        c.ws.send_cmd("subscribe", "wv", since=bad)
        j = c.recv()
        assert j.get("event") == "error" and j.get("reason") == "invalid_since", \
            f"since={bad!r}: {j}"
        assert j.get("topic") == "wv", f"since={bad!r}: the error names no topic: {j}"
    publish_id(srv, "wv", "not-subscribed")
    c.no_frame_within(0.3)
    c.subscribe("wv", last)
    c.expect_subscribed("wv")
    assert messages(c, 1, "wv") == ["not-subscribed"], "a valid since after the errors"
    c.close()


def test_ws_already_subscribed_since_ignored(pushletd):
    srv = pushletd()
    c = WSClient(srv.addr)
    c.expect_connected()
    c.subscribe("wa2")
    start = c.expect_subscribed("wa2")
    publish_id(srv, "wa2", "m0")
    assert messages(c, 1, "wa2") == ["m0"]
    c.subscribe("wa2", start)
    c.expect_subscribed("wa2")
    publish_id(srv, "wa2", "m1")
    assert messages(c, 1, "wa2") == ["m1"], "since on an existing subscription replayed"
    c.no_frame_within(0.2)
    c.close()


def test_ws_since_msgpack_gap(pushletd):
    srv = pushletd("--history-size", "3")
    last = _drop_after(srv, "wmp", 1)
    for i in range(6):
        publish_id(srv, "wmp", f"wmp:{i}")
    c = WSClient(srv.addr, fmt="msgpack")
    c.expect_connected()
    c.subscribe("wmp", last)
    c.expect_subscribed("wmp")
    check_gap(c.recv(), "wmp", "history_expired")
    assert messages(c, 3, "wmp") == ["wmp:3", "wmp:4", "wmp:5"]
    c.close()
