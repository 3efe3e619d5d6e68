#!/usr/bin/env python3
"""The least you need: embed a Pushlet broker in a plain Python script and publish to it.

    python examples/python/publish_script.py            # http://127.0.0.1:8080/
    curl -N 'http://127.0.0.1:8080/events?topic=ticks'  # or open the page in a browser

Publishes the time on topic "ticks" every second; Ctrl-C (or SIGTERM) stops the broker
gracefully. The broker serves a small page at / that subscribes over SSE and WebSocket.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time

import pushlet

PAGE = """<!doctype html><meta charset="utf-8"><title>Pushlet ticks</title>
<h1>ticks</h1><ul id="sse"></ul><ul id="ws"></ul>
<script>
const add = (id, text) => { const li = document.createElement("li");
  li.textContent = text; document.getElementById(id).prepend(li); };
new EventSource("/events?topic=ticks").addEventListener("tick", e => add("sse", "SSE " + e.data));
const ws = new WebSocket(`ws://${location.host}/ws?topic=ticks`);
ws.onmessage = async e => { const m = JSON.parse(await e.data.text());
  if (m.event === "tick") add("ws", "WebSocket " + m.data); };
</script>
"""


def main() -> None:
    ap = argparse.ArgumentParser(description="Publish the time every second.")
    ap.add_argument("--listen", default="127.0.0.1:8080", help="host:port (port 0: any free)")
    ap.add_argument("--interval", type=float, default=1.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())

    with pushlet.Pushlet(listen=args.listen, heartbeat=15, index_html=PAGE) as p:
        print(f"listening on http://127.0.0.1:{p.port}/", flush=True)
        while not done.wait(args.interval):
            p.publish("ticks", "tick", time.strftime("%H:%M:%S"))
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
