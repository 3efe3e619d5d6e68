"""SSE with a real curl client: topics, headers, preamble, ids, multi-line data."""

import os
import select
import signal
import subprocess
import time

import pytest

import pushlet_testlib as pl


def norm(lines):
    """An empty data line may be written "data:" or "data: " (same meaning)."""
    return ["data: " if ln == "data:" else ln for ln in lines]


class CurlStream:
    """`curl -N -i URL` as a subprocess; its stdout (head + body) is parsed incrementally."""

    def __init__(self, url, extra=()):
        self.proc = subprocess.Popen(["curl", "-N", "-sS", "-i", "--max-time", "120",
                                      *extra, url],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.raw = b""
        self.head = None
        self.parser = pl.SSEParser(keep_lines=True)
        self.events = []
        self.eof = False

    def _pump(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        r, _, _ = select.select([self.proc.stdout], [], [], min(remaining, 0.5))
        if not r:
            return True
        chunk = os.read(self.proc.stdout.fileno(), 65536)
        if not chunk:
            self.eof = True
            return False
        if self.head is None:
            self.raw += chunk
            i = self.raw.find(b"\r\n\r\n")
            if i < 0:
                return True
            self.head, chunk = self.raw[:i], self.raw[i + 4:]
        self.events.extend(self.parser.feed(chunk))
        return True

    def wait(self, pred, timeout=10.0, what="condition"):
        deadline = time.monotonic() + timeout
        while not pred(self):
            if self.eof:
                raise AssertionError(f"curl stream ended before {what}; curl stderr: "
                                     f"{self.proc.stderr.read()!r}; events: {self.events!r}")
            if time.monotonic() >= deadline:
                raise pl.Timeout(f"timed out after {timeout}s waiting for {what}; "
                                 f"events so far: {self.events!r}")
            self._pump(deadline)

    def response(self):
        version, status, reason, headers = pl.parse_head(self.head)
        return pl.Response(status, reason, headers, b"", version)

    def messages(self):
        return [e for e in self.events if e.event != "connected"]

    def close(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def curl_stream():
    streams = []

    def make(url, extra=()):
        s = CurlStream(url, extra)
        streams.append(s)
        return s

    yield make
    for s in streams:
        s.close()


def test_curl_two_topics_headers_preamble_ids_and_multiline(pushletd, curl_stream):
    srv = pushletd()
    c = curl_stream(f"{srv.base}/events?topic=a&topic=b")
    c.wait(lambda c: any(e.event == "connected" for e in c.events), what="connected event")

    # response head
    r = c.response()
    assert r.status == 200
    assert (r.header("content-type") or "").split(";")[0].strip() == "text/event-stream"
    assert "no-cache" in (r.header("cache-control") or "")
    assert (r.header("x-accel-buffering") or "").lower() == "no"
    assert r.header("access-control-allow-origin") == "*"
    assert "keep-alive" in (r.header("connection") or "").lower()
    assert r.header("content-length") is None, "SSE body must be close-delimited"
    assert "chunked" not in (r.header("transfer-encoding") or "").lower(), \
        "SSE body must be close-delimited (no chunked encoding)"

    # preamble, exactly as documented: the id is the stream's start cursor (a and b)
    start = c.parser.all_lines[1]
    assert start.startswith("id: "), c.parser.all_lines[:6]
    start_pos, check = pl.parse_cursor(start[4:])
    assert len(start_pos) == 2 and check, start
    assert c.parser.all_lines[:5] == ["retry: 3000", start, "event: connected",
                                      "data: Connection established", ""], c.parser.all_lines[:6]
    assert c.parser.retries[:1] == [3000]
    assert c.events[0].event == "connected" and c.events[0].data == "Connection established"

    published = []  # (id, topic, data)

    def pub(topic, data, event=None):
        mid = srv.publish(topic, data, event=event)
        published.append((mid, topic, data))
        return mid

    pub("a", "hello-a")
    pub("b", "hello-b")
    pub("c", "hello-c (not subscribed)")
    pub("a", "l1\nl2\r\nl3\rl4")
    pub("b", "x\nid: 999\nevent: evil")
    pub("a", "\n\nid: 5\ndata: forged\n\nretry: 1")
    pub("b", "custom", event="my.event-1:x")
    pub("b", "the-end")
    expected = [p for p in published if p[1] in ("a", "b")]

    c.wait(lambda c: any(e.data == "the-end" for e in c.events), what="the-end message")
    msgs = c.messages()
    assert [m.data for m in msgs] == [
        "hello-a", "hello-b", "l1\nl2\nl3\nl4", "x\nid: 999\nevent: evil",
        "\n\nid: 5\ndata: forged\n\nretry: 1", "custom", "the-end"]
    # Two topics: each id: is the stream's cursor, the position of a and of b after this event.
    last = {"a": start_pos[0], "b": start_pos[1]}
    for m, (mid, topic, _) in zip(msgs, expected):
        last[topic] = pl.id_parts(mid)
        positions, ck = pl.parse_cursor(m.id)
        assert positions == [last["a"], last["b"]] and ck == check, (m.id, mid, topic)
    assert [m.event for m in msgs] == ["message"] * 5 + ["my.event-1:x", "message"]

    # the exact field lines: no forged id:/event:/retry: lines, one data: line per line
    by_data = {m.data: m for m in msgs}
    mid = by_data["l1\nl2\nl3\nl4"].id
    assert norm(by_data["l1\nl2\nl3\nl4"].lines) == [
        f"id: {mid}", "event: message", "data: l1", "data: l2", "data: l3", "data: l4"]
    m = by_data["x\nid: 999\nevent: evil"]
    assert norm(m.lines) == [f"id: {m.id}", "event: message", "data: x", "data: id: 999",
                       "data: event: evil"]
    assert m.last_id == m.id != "999"
    m = by_data["\n\nid: 5\ndata: forged\n\nretry: 1"]
    assert norm(m.lines) == [f"id: {m.id}", "event: message", "data: ", "data: ", "data: id: 5",
                       "data: data: forged", "data: ", "data: retry: 1"]
    assert c.parser.retries == [3000], "a forged retry: field reached the client"
    assert not c.parser.empty_blocks, f"field blocks without data: {c.parser.empty_blocks}"
    assert not any("hello-c" in e.data for e in c.events)


def test_curl_default_topic_and_cors_origin_flag(pushletd, curl_stream):
    srv = pushletd("--cors-origin", "https://app.example.org")
    c = curl_stream(f"{srv.base}/events")
    c.wait(lambda c: any(e.event == "connected" for e in c.events), what="connected event")
    assert c.response().header("access-control-allow-origin") == "https://app.example.org"
    mid = srv.publish("default", "to-default")
    srv.publish("other", "to-other")
    mid2 = srv.publish("default", "end")
    c.wait(lambda c: any(e.data == "end" for e in c.events), what="end message")
    assert [(m.id, m.data) for m in c.messages()] == [(mid, "to-default"), (mid2, "end")]
