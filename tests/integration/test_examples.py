"""Smoke test of the embedding examples (examples/embed_callbacks.c, examples/embed_poll.c): each
is started on a free port, then a real SSE client and a `websockets` client check its auth
(user by query or cookie, private/ topics refused), the echo of client messages, the ticks from
the main thread, the lifecycle log, and a clean exit 0 on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time

import pytest

import pushlet_testlib as pl

websockets = pytest.importorskip("websockets")
from websockets.exceptions import InvalidStatusCode  # noqa: E402

S = pl.time_scale()
LISTEN_RE = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")


class Example:
    def __init__(self, name, workdir):
        self.binary = os.path.join(os.path.dirname(os.path.abspath(pl.pushletd_path())), name)
        self.out_path = os.path.join(workdir, name + ".out")
        self.proc = None
        self.port = None

    def start(self):
        if not os.path.exists(self.binary):
            pytest.fail(f"{self.binary} not built (target {os.path.basename(self.binary)})")
        self._out = open(self.out_path, "wb")
        self.proc = subprocess.Popen([self.binary, "--port", "0"], stdin=subprocess.DEVNULL,
                                     stdout=self._out, stderr=subprocess.STDOUT)
        m = pl.wait_until(lambda: LISTEN_RE.search(self.output()) or self.proc.poll() is not None,
                          10 * S, what="the example's listening line")
        assert m is not True and self.proc.poll() is None, self.output()
        self.port = int(m.group(1))
        self.addr = (pl.HOST, self.port)
        return self

    def output(self) -> str:
        with open(self.out_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def kill(self):
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        if hasattr(self, "_out"):
            self._out.close()


@pytest.fixture
def example(tmp_path):
    made = []

    def start(name):
        e = Example(name, str(tmp_path)).start()
        made.append(e)
        return e

    yield start
    for e in made:
        e.kill()


def sse_open(addr, path, headers=None):
    c = pl.RawHTTP(addr, timeout=10 * S)
    c.send(pl.build_request("GET", path, b"", {"Accept": "text/event-stream", **(headers or {})},
                            addr))
    r = c.read_response(head_only=True)
    if r.status != 200:
        cl = r.header("content-length")
        r.body = c.read_exact(int(cl), time.monotonic() + 10 * S) if cl else b""
    return r, c


def sse_events(c, until, timeout):
    p, evs = pl.SSEParser(), []
    deadline = time.monotonic() + timeout
    while not until(evs):
        c._fill(deadline)
        evs += p.feed(c.buf)
        c.buf = b""
    return evs


async def ws_checks(port):
    base = f"ws://{pl.HOST}:{port}/ws"
    with pytest.raises(InvalidStatusCode) as denied:
        async with websockets.connect(base, open_timeout=10 * S):
            pass
    assert denied.value.status_code == 401
    async with websockets.connect(base + "?user=zed", open_timeout=10 * S) as w:
        async def recv():
            return json.loads(await asyncio.wait_for(w.recv(), 10 * S))
        assert await recv() == {"event": "connected", "data": "Connection established"}
        await w.send("hello, echo")
        m = await recv()
        assert (m["event"], m["data"]) == ("echo", "hello, echo"), m
        await w.send(json.dumps({"action": "subscribe", "topic": "private/plans"}))
        m = await recv()
        assert (m["event"], m["reason"]) == ("error", "forbidden"), m
        await w.send(json.dumps({"action": "subscribe", "topic": "ticks"}))
        assert await recv() == pl.subscribed("ticks")
        while True:  # the main thread's ticks (history may replay none: live within ~1 s)
            m = await recv()
            if m.get("event") == "tick":
                assert m["topic"] == "ticks" and m["data"].isdigit()
                break


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["example_embed_callbacks", "example_embed_poll"])
def test_example(example, name):
    e = example(name)
    r, c = sse_open(e.addr, "/events?topic=ticks")
    c.close()
    assert (r.status, r.body.decode().rstrip("\n")) == (401, "add ?user=NAME or a user cookie")
    r, c = sse_open(e.addr, "/events?topic=private/x", {"Cookie": "theme=dark; user=bob"})
    c.close()
    assert r.status == 403, "private/ topics are refused"

    r, c = sse_open(e.addr, "/events?topic=ticks", {"Cookie": "theme=dark; user=bob"})
    try:
        assert r.status == 200
        evs = sse_events(c, lambda evs: any(x.event == "tick" for x in evs), 5 * S)
        assert [x for x in evs if x.event == "tick"][0].data.isdigit()
    finally:
        c.close()

    pl.run_async(ws_checks(e.port), 30 * S)

    out = pl.wait_until(lambda: (o := e.output()).count("disconnected") >= 2 and o,
                        10 * S, what="lifecycle lines")
    assert re.search(r"connected +#\d+ sse user=bob", out), out
    assert re.search(r"subscribed +#\d+ ticks", out), out
    assert re.search(r"connected +#\d+ websocket user=zed", out), out
    assert re.search(r"message +#\d+ 11 bytes", out), out

    e.proc.send_signal(signal.SIGTERM)
    assert e.proc.wait(15 * S) == 0, e.output()
    assert "stopping" in e.output()
