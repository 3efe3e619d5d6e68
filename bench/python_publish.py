#!/usr/bin/env python3
"""What publishing costs from Python, against the same publish made from C, in one run.

Both sides publish to the same running broker in the same process: the C side is a tight loop
of pushlet_publish() inside the extension (pushlet._pushlet.pushlet_py_publish_loop, timed in C
with CLOCK_MONOTONIC, the GIL released); the Python side is `p.publish(topic, event, data)`
in a Python for-loop (timed with perf_counter_ns, loop overhead included). Batches alternate,
and the broker drains its queue between batches so neither side meets a fuller queue. Reported:
the median ns per publish of each side over the rounds, and their ratio (target: <= 2).

Run it with the binding installed, e.g. in the venv of bindings/python/run_tests.sh:
    build/python-venv/bin/python bench/python_publish.py [--rounds 15] [--batch 100000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import pushlet
from pushlet import _pushlet as _c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch", type=int, default=100_000)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    p = pushlet.Pushlet(listen="127.0.0.1:0", max_queued_messages=4 * args.batch,
                        max_queued_bytes=1 << 30)
    p.start()
    handle = p._native.p  # the C handle, for the C loop only
    published = 0

    def drained() -> None:
        while p.stats["messages_in"] < published:
            time.sleep(0.005)

    results = {}
    for label, data in (("16 B str", "x" * 16), ("1 KiB bytes", b"x" * 1024)):
        c_ns, py_ns = [], []
        for _ in range(args.rounds):
            ns = _c.pushlet_py_publish_loop(handle, "bench", "message", data, args.batch)
            if ns < 0:
                raise pushlet.PushletError(_c.pushlet_strerror(ns), ns)
            c_ns.append(ns / args.batch)
            published += args.batch
            drained()
            publish = p.publish
            t0 = time.perf_counter_ns()
            for _ in range(args.batch):
                publish("bench", "message", data)
            py_ns.append((time.perf_counter_ns() - t0) / args.batch)
            published += args.batch
            drained()
        c_med, py_med = statistics.median(c_ns), statistics.median(py_ns)
        results[label] = {"c_ns": round(c_med, 1), "python_ns": round(py_med, 1),
                          "ratio": round(py_med / c_med, 2)}
    p.close()

    if args.json:
        print(json.dumps(results))
        return
    print(f"publish cost per message, median of {args.rounds} rounds x {args.batch} "
          f"(pushlet {pushlet.version()}):")
    for label, r in results.items():
        print(f"  {label:12}  C {r['c_ns']:7.1f} ns   Python {r['python_ns']:7.1f} ns   "
              f"ratio {r['ratio']:.2f}x")


if __name__ == "__main__":
    main()
