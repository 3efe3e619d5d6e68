"""Real EventSource clients that reconnect by themselves (issue #4: resume).

A small TCP proxy in this test sits between the client and pushletd and cuts the SSE
connection at random byte offsets (often in the middle of an event, with a FIN or a RST). The
EventSource notices, waits for the server's `retry:` time and reconnects on its own, sending the
last ID it saw as `Last-Event-ID`; pushletd must replay exactly what it missed. Publishing goes
straight to pushletd, continuously, so publishes race every reconnect.

Clients: Node's `eventsource` package (node/eventsource_resume.mjs) and headless Chromium's
own EventSource (driven over the DevTools protocol, skipped if Chromium is not installed).

One Node run honours pushletd's real `retry: 3000` (few cuts); the others have the proxy rewrite
the hint to 100 ms (the client still obeys a server-sent `retry:`), so that dozens of reconnects
fit in a few seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

import pushlet_testlib as pl
from pushlet_chromium import chromium_page
from pushlet_testlib import RawHTTP
from test_resume_sse import check_consecutive, publish_on, run_seed, scaled, seeded, set_rst

NODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "node")
RETRY_RE = re.compile(rb"(?m)^retry: ?(\d+)\n")


class CuttingProxy:
    """127.0.0.1:<port> -> pushletd. Each /events connection (up to max_cuts of them) is cut
    after a random number of body bytes (cut_bytes after the protected prefix); other requests
    are passed through with `Connection: close`, so a browser never reuses them for a stream.

    protect_first: the first stream is never cut before its `connected` event is through (the
    client then always has an ID to resume from). retry_ms: rewrite the `retry:` hint.
    """

    def __init__(self, upstream, seed, max_cuts, cut_bytes=(0, 1000), retry_ms=None,
                 protect_first=True):
        self.upstream = upstream
        self.rng = random.Random(seed)
        self.max_cuts = max_cuts
        self.cut_bytes = cut_bytes
        self.retry_ms = retry_ms
        self.protect_first = protect_first
        self.lock = threading.Lock()
        self.requests = []     # (time, path, Last-Event-ID or None) of every /events request
        self.cuts = []         # (time, body bytes forwarded before the cut, rst)
        self.retry_seen = []   # retry: values pushletd sent
        self.claimed = 0
        self.errors = []
        self.stop_ev = threading.Event()
        self.threads = []
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((pl.HOST, 0))
        self.lsock.listen(64)
        self.lsock.settimeout(0.1)
        self.port = self.lsock.getsockname()[1]
        self.base = f"http://{pl.HOST}:{self.port}"
        t = threading.Thread(target=self._accept_loop, daemon=True)
        t.start()
        self.threads.append(t)

    def n_cuts(self):
        with self.lock:
            return len(self.cuts)

    def close(self):
        self.stop_ev.set()
        for t in list(self.threads):
            t.join(5)
        self.lsock.close()
        assert not self.errors, f"proxy errors: {self.errors}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop_ev.set()
        for t in list(self.threads):
            t.join(5)
        self.lsock.close()

    def _accept_loop(self):
        while not self.stop_ev.is_set():
            try:
                cs, _ = self.lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(cs,), daemon=True)
            t.start()
            self.threads.append(t)

    def _serve(self, cs):
        try:
            self._serve_inner(cs)
        except OSError:
            pass  # a peer went away: normal for a proxy
        except Exception as e:  # noqa: BLE001 - reported by close()
            self.errors.append(repr(e))
        finally:
            cs.close()

    def _read_head(self, cs):
        cs.settimeout(10)
        buf = b""
        while b"\r\n\r\n" not in buf:
            d = cs.recv(65536)
            if not d:
                return None, None
            buf += d
        i = buf.index(b"\r\n\r\n") + 4
        return buf[:i], buf[i:]

    def _serve_inner(self, cs):
        head, rest = self._read_head(cs)
        if head is None:
            return
        lines = head[:-4].split(b"\r\n")
        path = lines[0].split(b" ")[1].decode("latin-1")
        hdrs = {}
        for ln in lines[1:]:
            k, _, v = ln.decode("latin-1").partition(":")
            hdrs[k.strip().lower()] = v.strip()
        is_sse = path.startswith("/events")
        cut, first = False, False
        if is_sse:
            with self.lock:
                self.requests.append((time.monotonic(), path, hdrs.get("last-event-id")))
                first = len(self.requests) == 1
                if self.claimed < self.max_cuts:
                    self.claimed += 1
                    cut = True
        else:
            kept = [ln for ln in lines if not ln.lower().startswith(b"connection:")]
            head = b"\r\n".join(kept + [b"Connection: close", b"", b""])
        up = socket.create_connection(self.upstream, timeout=10)
        try:
            up.sendall(head + rest)
            self._pump(cs, up, is_sse, cut, first)
        finally:
            up.close()

    def _pump(self, cs, up, is_sse, cut, first):
        started = not is_sse
        pre = b""
        sent = 0
        threshold = None
        while not self.stop_ev.is_set():
            r, _, _ = select.select([cs, up], [], [], 0.1)
            if cs in r:
                d = cs.recv(65536)
                if not d:
                    return
                up.sendall(d)
            if up not in r:
                continue
            d = up.recv(65536)
            if not d:
                if pre:
                    cs.sendall(pre)
                return
            if not started:
                pre += d
                if not pre.startswith(b"HTTP/1.1 200"):
                    started, d, pre = True, pre, b""
                    cut = False
                else:
                    h = pre.find(b"\r\n\r\n")
                    if h < 0:
                        continue
                    body = pre[h + 4:]
                    # wait for the block holding the connected event (or 4 KiB)
                    c = body.find(b"event: connected")
                    if (c < 0 or body.find(b"\n\n", c) < 0) and len(body) < 4096:
                        continue
                    lo = 0
                    m = RETRY_RE.search(body)
                    if m:
                        with self.lock:
                            self.retry_seen.append(int(m.group(1)))
                        if self.retry_ms is not None:
                            new = b"retry: %d\n" % self.retry_ms
                            body = body[:m.start()] + new + body[m.end():]
                            lo = m.start() + len(new)  # the new hint always gets through
                    if first and self.protect_first:
                        c = body.find(b"event: connected")
                        end = body.find(b"\n\n", c) if c >= 0 else -1
                        if end >= 0:
                            lo = max(lo, end + 2)
                    cs.sendall(pre[:h + 4])
                    d, pre, started = body, b"", True
                    if cut:
                        threshold = lo + self.rng.randint(*self.cut_bytes)
            if threshold is not None and sent + len(d) >= threshold:
                k = threshold - sent
                if k:
                    cs.sendall(d[:k])
                rst = self.rng.random() < 0.5
                with self.lock:
                    self.cuts.append((time.monotonic(), threshold, rst))
                if rst:
                    set_rst(cs)
                    set_rst(up)
                return
            cs.sendall(d)
            sent += len(d)


# --------------------------------------------------------------------------------------------


def publish_while_cutting(srv, proxy, topic, min_msgs, pace, limit):
    """Publish "es:<n>" every `pace` s until the proxy made all its cuts and min_msgs were
    sent (bounded by `limit` s), then "END". Returns the IDs (END's last)."""
    ids = []
    deadline = time.monotonic() + limit
    with RawHTTP(srv.addr, timeout=scaled(10)) as c:
        while (proxy.n_cuts() < proxy.max_cuts or len(ids) < min_msgs) \
                and time.monotonic() < deadline:
            ids.append(publish_on(c, topic, f"es:{len(ids)}"))
            time.sleep(pace)
        assert proxy.n_cuts() == proxy.max_cuts, \
            f"only {proxy.n_cuts()} of {proxy.max_cuts} cuts within {limit:.0f}s"
        ids.append(publish_on(c, topic, "END"))
    return ids


def check_client_log(log, ids, proxy, who):
    """The client's view: every published message exactly once, in order, with its ID; no gap;
    and it reconnected by itself with Last-Event-ID after every cut."""
    msgs = [e for e in log if e["type"] == "message"]
    datas = [e["data"] for e in msgs]
    expected = [f"es:{i}" for i in range(len(ids) - 1)] + ["END"]
    if datas != expected:
        seen = set()
        dups = [d for d in datas if d in seen or seen.add(d)]
        missing = sorted(set(expected) - set(datas), key=lambda d: (len(d), d))
        first_bad = next((i for i, (a, b) in enumerate(zip(datas, expected)) if a != b), None)
        raise AssertionError(f"{who}: {len(datas)} messages for {len(expected)} published; "
                             f"missing {missing[:10]}, duplicates {dups[:10]}, first "
                             f"difference at #{first_bad}: {datas[first_bad:first_bad + 5] if first_bad is not None else None}")
    assert [e["id"] for e in msgs] == ids, f"{who}: lastEventId differs from the message IDs"
    gaps = [e for e in log if e["type"] == "gap"]
    assert not gaps, f"{who}: unexpected gaps {gaps[:5]}"
    reqs = proxy.requests
    assert len(reqs) >= proxy.max_cuts + 1, \
        f"{who}: {len(reqs)} stream requests for {proxy.max_cuts} cuts: it did not reconnect"
    seen_ids = {e["id"] for e in log if e["type"] in ("connected", "message", "gap")}
    for _, path, lei in reqs[1:]:
        assert lei, f"{who}: reconnect {path} without Last-Event-ID"
        assert lei in seen_ids, f"{who}: Last-Event-ID {lei!r} is no ID it was sent"


# --------------------------------------------------------------------------------------------
# Node's eventsource package


def ensure_node_modules():
    pl.npm_ci(NODE_DIR, ("eventsource",))


class NodeEventSource:
    def __init__(self, url, timeout_s):
        node = shutil.which("node")
        if node is None:
            pytest.skip("node is not installed")
        ensure_node_modules()
        env = dict(os.environ, ES_URL=url, ES_END="END", ES_TIMEOUT_MS=str(int(timeout_s * 1000)))
        self.proc = subprocess.Popen([node, "eventsource_resume.mjs"], cwd=NODE_DIR, env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.log = []
        self.stderr = ""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            line = line.strip()
            if line:
                self.log.append(json.loads(line))

    def wait(self, timeout):
        """Exit code, or None if it was still running after `timeout` s (then killed)."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = None
        self.reader.join(5)
        self.stderr = self.proc.stderr.read()
        return rc

    def kill(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def run_node(srv, proxy, min_msgs, pace, limit):
    es = NodeEventSource(proxy.base + "/events?topic=es", limit + scaled(30))
    try:
        pl.wait_until(lambda: any(e["type"] == "connected" for e in es.log) or
                      es.proc.poll() is not None, scaled(15), 0.02,
                      "the EventSource's connected event")
        assert es.proc.poll() is None, f"node exited early: {es.log} {es.proc.stderr.read()}"
        ids = publish_while_cutting(srv, proxy, "es", min_msgs, pace, limit)
        rc = es.wait(scaled(20))
    finally:
        es.kill()
    check_consecutive(ids, "published IDs")
    # what it received first (the most telling failure), then how it ended
    check_client_log(es.log, ids, proxy, "node eventsource")
    assert rc == 0, f"node client exit {rc} (None: did not end): {es.log[-5:]}\n{es.stderr}"
    errors = [e for e in es.log if e["type"] == "error"]
    assert len(errors) >= proxy.max_cuts, f"{len(errors)} error events for {proxy.max_cuts} cuts"
    return es.log


@pytest.mark.timeout(120)
def test_node_eventsource_reconnects_with_fast_retry(pushletd):
    """30 cuts with the retry hint rewritten to 100 ms by the proxy."""
    srv = pushletd()
    seed = run_seed(5)
    with seeded(seed), CuttingProxy(srv.addr, seed=seed, max_cuts=30, cut_bytes=(0, 1200),
                                    retry_ms=100) as proxy:
        run_node(srv, proxy, min_msgs=200, pace=0.004, limit=scaled(60))
        proxy.close()
    assert all(r > 0 for r in proxy.retry_seen), proxy.retry_seen
    mid = sum(1 for _, k, _ in proxy.cuts if k > 0)
    assert mid >= 10, f"only {mid} cuts after the first byte of a stream"


@pytest.mark.timeout(120)
def test_node_eventsource_reconnects_with_server_retry(pushletd):
    """4 cuts with pushletd's own retry hint: the client waits that long, then resumes
    (with ~3 s of messages to replay, so cuts also land in the middle of a replay)."""
    srv = pushletd()
    seed = run_seed(6)
    with seeded(seed), CuttingProxy(srv.addr, seed=seed, max_cuts=4, cut_bytes=(0, 3000)) as proxy:
        log = run_node(srv, proxy, min_msgs=50, pace=0.01, limit=scaled(60))
        proxy.close()
    assert proxy.retry_seen and len(set(proxy.retry_seen)) == 1, proxy.retry_seen
    retry = proxy.retry_seen[0] / 1000
    reqs = proxy.requests
    for (t_cut, _, _), (t_req, _, _) in zip(proxy.cuts, reqs[1:]):
        assert t_req - t_cut >= 0.8 * retry, \
            f"reconnected {t_req - t_cut:.2f}s after a cut; the retry hint is {retry}s"
    assert len(log) > 0


# --------------------------------------------------------------------------------------------
# headless Chromium's EventSource

PAGE_SCRIPT = """
(() => {
  window.__log = [];
  const es = new EventSource('/events?topic=es');
  window.__es = es;
  const push = (type) => (e) => window.__log.push({type, id: e.lastEventId, data: e.data});
  es.addEventListener('connected', push('connected'));
  es.addEventListener('gap', push('gap'));
  es.onmessage = (e) => {
    window.__log.push({type: 'message', id: e.lastEventId, data: e.data});
    if (e.data === 'END') es.close();
  };
  es.onerror = () => window.__log.push({type: 'error', readyState: es.readyState});
  return true;
})()
"""


async def _cdp_call(ws, state, method, params=None, timeout=10.0):
    state["id"] += 1
    mid = state["id"]
    await ws.send(json.dumps({"id": mid, "method": method, "params": params or {}}))
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise pl.Timeout(f"CDP {method} got no answer within {timeout}s")
        msg = json.loads(await asyncio.wait_for(ws.recv(), left))
        if msg.get("id") == mid:
            if "error" in msg:
                raise AssertionError(f"CDP {method} failed: {msg['error']}")
            return msg.get("result", {})


async def _cdp_eval(ws, state, expr):
    r = await _cdp_call(ws, state, "Runtime.evaluate", {"expression": expr,
                                                        "returnByValue": True})
    if "exceptionDetails" in r:
        raise AssertionError(f"page exception: {r['exceptionDetails']}")
    return r["result"].get("value")


@pytest.mark.timeout(150)
def test_chromium_eventsource_reconnects(pushletd):
    """3 cuts under headless Chromium's own EventSource, with pushletd's real retry hint."""
    import websockets

    srv = pushletd()
    seed = run_seed(7)
    proxy = CuttingProxy(srv.addr, seed=seed, max_cuts=3, cut_bytes=(0, 3000))
    try:
        with chromium_page() as target:
            result = {}

            async def drive():
                async with websockets.connect(target["webSocketDebuggerUrl"], max_size=None,
                                              open_timeout=10, close_timeout=5) as ws:
                    st = {"id": 0}
                    await _cdp_call(ws, st, "Page.enable")
                    nav = await _cdp_call(ws, st, "Page.navigate",
                                          {"url": proxy.base + "/healthz"}, timeout=20)
                    assert not nav.get("errorText"), f"navigation failed: {nav}"
                    deadline = time.monotonic() + 15
                    while await _cdp_eval(ws, st, "document.readyState") != "complete":
                        assert time.monotonic() < deadline, "page did not load"
                        await asyncio.sleep(0.1)
                    await _cdp_eval(ws, st, PAGE_SCRIPT)
                    deadline = time.monotonic() + scaled(15)
                    while not any(e["type"] == "connected"
                                  for e in await _cdp_eval(ws, st, "window.__log")):
                        assert time.monotonic() < deadline, "the EventSource did not connect"
                        await asyncio.sleep(0.05)
                    result["ids"] = await asyncio.to_thread(
                        publish_while_cutting, srv, proxy, "es", 50, 0.01, scaled(60))
                    deadline = time.monotonic() + scaled(30)
                    while True:
                        got = await _cdp_eval(ws, st, "window.__log")
                        if any(e["type"] == "message" and e["data"] == "END" for e in got):
                            break
                        assert time.monotonic() < deadline, f"no END in the page: {got[-5:]}"
                        await asyncio.sleep(0.1)
                    result["log"] = got

            pl.run_async(drive(), scaled(120))
            proxy.close()
            with seeded(seed):
                check_client_log(result["log"], result["ids"], proxy, "chromium EventSource")
    finally:
        proxy.__exit__(None, None, None)
