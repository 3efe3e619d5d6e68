"""The demo page in a real headless Chromium, driven over the Chrome DevTools Protocol:
its EventSource connects to pushletd and a message published with curl shows up in the page."""

import asyncio
import json
import re
import secrets
import subprocess
import time

import pytest
import websockets

import pushlet_testlib as pl
from pushlet_chromium import chromium_page


# Installed before any page script runs: records every EventSource the page creates, so the
# test can wait until the page's own stream is OPEN (readyState 1) as the browser sees it.
TRACK_EVENTSOURCE = """
(() => {
  const Orig = window.EventSource;
  if (!Orig) return;
  window.__pushletTestES = [];
  window.EventSource = new Proxy(Orig, {
    construct(target, args) {
      const es = Reflect.construct(target, args);
      window.__pushletTestES.push(es);
      return es;
    }
  });
})();
"""


class CDP:
    """Minimal Chrome DevTools Protocol client over one page target's WebSocket."""

    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0
        self.events = []

    async def call(self, method, params=None, timeout=10.0):
        self.next_id += 1
        mid = self.next_id
        await self.ws.send(json.dumps({"id": mid, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise pl.Timeout(f"CDP {method} got no answer within {timeout}s")
            msg = json.loads(await asyncio.wait_for(self.ws.recv(), left))
            if msg.get("id") == mid:
                if "error" in msg:
                    raise AssertionError(f"CDP {method} failed: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    async def evaluate(self, expression, timeout=10.0):
        r = await self.call("Runtime.evaluate", {"expression": expression,
                                                 "returnByValue": True}, timeout)
        if "exceptionDetails" in r:
            raise AssertionError(f"page exception evaluating {expression!r}: "
                                 f"{r['exceptionDetails']}")
        return r["result"].get("value")

    async def poll(self, expression, pred, timeout, what):
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = await self.evaluate(expression)
            if pred(value):
                return value
            await asyncio.sleep(0.1)
        raise pl.Timeout(f"timed out after {timeout}s waiting for {what}; last value: "
                         f"{value!r}; page console/exceptions: {self.console()}")

    def console(self):
        out = []
        for e in self.events:
            if e.get("method") == "Runtime.consoleAPICalled":
                out.append(" ".join(str(a.get("value", a.get("description", "")))
                                    for a in e["params"].get("args", [])))
            elif e.get("method") == "Runtime.exceptionThrown":
                out.append("EXCEPTION " + json.dumps(e["params"].get("exceptionDetails", {}))[:500])
        return out


def publish(srv, topic, message):
    r = subprocess.run(["curl", "-sS", "--max-time", "10", "-X", "POST",
                        f"{srv.base}/publish?topic={topic}", "-d", message],
                       capture_output=True, timeout=20)
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"[0-9a-z]+-[0-9]+", json.loads(r.stdout)["id"]), r.stdout


def run_on_demo_page(srv, scenario):
    """Opens the demo page in headless Chromium and runs `scenario(cdp)` against it."""
    with chromium_page() as target:

        async def drive():
            async with websockets.connect(target["webSocketDebuggerUrl"], max_size=None,
                                          open_timeout=10, close_timeout=5) as ws:
                cdp = CDP(ws)
                await cdp.call("Runtime.enable")
                await cdp.call("Page.enable")
                await cdp.call("Page.addScriptToEvaluateOnNewDocument",
                               {"source": TRACK_EVENTSOURCE})
                nav = await cdp.call("Page.navigate", {"url": srv.base + "/"}, timeout=20)
                assert not nav.get("errorText"), f"navigation failed: {nav}"
                await cdp.poll("document.readyState", lambda v: v == "complete", 15,
                               "the demo page to load")
                await scenario(cdp)

        pl.run_async(drive(), 90)


@pytest.mark.timeout(120)
def test_demo_page_shows_published_message(pushletd):
    srv = pushletd()
    message = "hi-" + secrets.token_hex(8)

    async def scenario(cdp):
        await cdp.poll("(window.__pushletTestES || []).map(e => e.readyState)",
                       lambda v: v and 1 in v, 15, "the page's EventSource to be OPEN")
        # and the server agrees a stream is attached
        await asyncio.to_thread(
            pl.wait_until, lambda: srv.stats()["sse_connections"] >= 1, 10, 0.05,
            "sse_connections >= 1")
        await asyncio.to_thread(publish, srv, "default", message)
        await cdp.poll("document.body ? document.body.innerText : ''",
                       lambda v: v and message in v, 15, f"{message!r} in the page body")

    run_on_demo_page(srv, scenario)


@pytest.mark.timeout(120)
def test_demo_page_websocket_subscribes_and_unsubscribes(pushletd):
    srv = pushletd()
    topic = "wsdemo-" + secrets.token_hex(4)
    first, second = "ws-" + secrets.token_hex(8), "ws-" + secrets.token_hex(8)
    ws_log = "document.getElementById('ws-log').innerText"

    async def scenario(cdp):
        await cdp.poll("document.getElementById('ws-status').textContent",
                       lambda v: v == "connected", 15, "the page's WebSocket to connect")
        await cdp.evaluate(f"document.getElementById('ws-topic').value = '{topic}';"
                           "document.getElementById('ws-sub').click(); true")
        await cdp.poll("document.getElementById('ws-topics').textContent",
                       lambda v: v and topic in v, 15, f"the page to be subscribed to {topic}")
        await asyncio.to_thread(publish, srv, topic, first)
        await cdp.poll(ws_log, lambda v: v and first in v, 15, f"{first!r} in the WebSocket log")
        await cdp.evaluate("document.getElementById('ws-unsub').click(); true")
        await cdp.poll("document.getElementById('ws-topics').textContent",
                       lambda v: v is not None and topic not in v, 15,
                       f"the page to be unsubscribed from {topic}")
        await asyncio.to_thread(
            pl.wait_until, lambda: srv.stats()["subscriptions"] == 1, 10, 0.05,
            "only the SSE panel's subscription left")
        await asyncio.to_thread(publish, srv, topic, second)
        # A message published after it would have arrived by now; make sure it did not.
        await asyncio.sleep(1.0)
        text = await cdp.evaluate(ws_log)
        assert second not in text, f"{second!r} arrived after unsubscribing: {text!r}"
        assert first in text

    run_on_demo_page(srv, scenario)
