"""Fixtures and small clients shared by the binding's tests.

Every broker listens on 127.0.0.1 with a free port. Every test is bounded in time: a watchdog
dumps all threads and exits the run if one takes longer than PUSHLET_TEST_TIMEOUT seconds
(default 120), so a hang fails instead of blocking `make test`.
"""

from __future__ import annotations

import asyncio
import faulthandler
import json
import os
import threading
import time
from typing import Any, Callable

import aiohttp
import pytest
import websockets

import pushlet

HOST = "127.0.0.1"
TEST_TIMEOUT = float(os.environ.get("PUSHLET_TEST_TIMEOUT", "120"))


@pytest.fixture(autouse=True)
def watchdog():
    faulthandler.dump_traceback_later(TEST_TIMEOUT, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def make_broker():
    """make_broker(**kw) -> a started Pushlet on 127.0.0.1:<free port>; closed after the test."""
    made: list[pushlet.Pushlet] = []

    def make(start: bool = True, **kw: Any) -> pushlet.Pushlet:
        kw.setdefault("listen", f"{HOST}:0")
        p = pushlet.Pushlet(**kw)
        made.append(p)
        if start:
            p.start()
        return p

    yield make
    for p in made:
        p.close()


@pytest.fixture
def broker(make_broker):
    return make_broker()


def wait_until(pred: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def base(p: pushlet.Pushlet) -> str:
    return f"http://{HOST}:{p.port}"


def run(coro, timeout: float = 30.0):
    """Run a coroutine on a fresh event loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


class SSE:
    """An SSE stream read with aiohttp: events as dicts {"event", "data", "id"}."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp

    async def next(self, timeout: float = 10.0) -> dict[str, str]:
        return await asyncio.wait_for(self._next(), timeout)

    async def _next(self) -> dict[str, str]:
        ev: dict[str, Any] = {}
        data: list[str] = []
        while True:
            raw = await self.resp.content.readline()
            if not raw:
                raise EOFError("SSE stream ended")
            line = raw.decode("utf-8").rstrip("\r\n")
            if line == "":
                if data or ev:
                    ev.setdefault("event", "message")
                    ev["data"] = "\n".join(data)
                    return ev
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data.append(value)
            elif name in ("event", "id", "retry"):
                ev[name] = value

    async def until(self, event: str, timeout: float = 10.0) -> dict[str, str]:
        """The next event named `event` (skipping others, e.g. `connected`)."""
        deadline = time.monotonic() + timeout
        while True:
            ev = await self.next(max(0.01, deadline - time.monotonic()))
            if ev["event"] == event:
                return ev


async def sse_open(session: aiohttp.ClientSession, p: pushlet.Pushlet, query: str = "topic=t",
                   headers: dict[str, str] | None = None) -> SSE:
    resp = await session.get(f"{base(p)}/events?{query}", headers=headers or {},
                             timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
    assert resp.status == 200, f"{resp.status}: {await resp.text()}"
    s = SSE(resp)
    assert (await s.next())["event"] == "connected"
    return s


def ws_connect(p: pushlet.Pushlet, path: str = "/ws?topic=t", **kw: Any):
    return websockets.connect(f"ws://{HOST}:{p.port}{path}", ping_interval=None,
                              open_timeout=10, close_timeout=5, **kw)


async def ws_next(ws, timeout: float = 10.0, skip: tuple[str, ...] = ("connected", "subscribed")) -> dict:
    """The next message from the server (binary JSON frames), skipping command replies."""
    while True:
        raw = await asyncio.wait_for(ws.recv(), timeout)
        assert isinstance(raw, bytes), f"server messages are binary frames, got {raw!r}"
        obj = json.loads(raw)
        if obj.get("event") not in skip:
            return obj


class Recorder:
    """Collects hook calls from any thread: rec.calls is a list of (name, *args)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.cond = threading.Condition()

    def add(self, *call: Any) -> None:
        with self.cond:
            self.calls.append(call)
            self.cond.notify_all()

    def named(self, name: str) -> list[tuple]:
        with self.cond:
            return [c for c in self.calls if c[0] == name]

    def wait(self, name: str, count: int = 1, timeout: float = 10.0) -> list[tuple]:
        return wait_until(lambda: len(self.named(name)) >= count and self.named(name), timeout,
                          f"{count} {name} call(s); have {self.calls}")
