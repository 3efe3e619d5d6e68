"""Lifetime: start/stop/start, close, `with`, many brokers collected (RSS, fds and threads
bounded), interpreter exit with a running broker, stop() releasing the GIL, fork detection."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import subprocess
import sys
import threading
import time

import aiohttp
import pytest

import pushlet
from conftest import run, sse_open, wait_until


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_start_stop_start(make_broker):
    p = make_broker()
    for round_ in range(3):
        assert p.running

        async def main():
            async with aiohttp.ClientSession() as s:
                sse = await sse_open(s, p, "topic=t")
                await asyncio.to_thread(wait_until, lambda: p.topic_subscribers("t") == 1)
                p.publish("t", None, f"round {round_}")
                assert (await sse.until("message"))["data"] == f"round {round_}"

        run(main())
        p.stop()
        assert not p.running and p.port == -1
        p.stop()  # stopping a stopped broker is harmless
        with pytest.raises(pushlet.NotRunning):
            p.publish("t", None, "while stopped")
        p.start()


def test_with_and_close(make_broker):
    with pushlet.Pushlet(listen="127.0.0.1:0") as p:
        assert p.running and p.port > 0
        p.publish("t", None, "x")
    assert p.closed and "closed" in repr(p)
    p.close()  # idempotent
    for call in (lambda: p.publish("t", None, "x"), p.start, lambda: p.stats,
                 lambda: p.send(1, None, "x")):
        with pytest.raises(pushlet.BrokerClosed, match="closed"):
            call()


def test_many_brokers_collected_without_leaks():
    """Brokers whose hooks refer back to them (a reference cycle), started or not, dropped
    without close(): memory, fds and threads come back; nothing hangs."""

    def one(i: int) -> None:
        p = pushlet.Pushlet(listen="127.0.0.1:0")
        p.on_connected = lambda c: p.send(c, "hi", "there")  # cycle: p -> hook -> p
        if i % 2 == 0:
            p.start()
            p.publish("t", None, b"x" * 1000)

    def cycle(n: int) -> None:
        for i in range(n):
            one(i)
        gc.collect()

    threads0 = threading.active_count()
    cycle(50)  # warm up allocator and caches
    wait_until(lambda: threading.active_count() <= threads0, what="dispatcher threads to end")
    rss0, fds0 = rss_kb(), open_fds()
    t0 = time.monotonic()
    cycle(300)
    elapsed = time.monotonic() - t0
    wait_until(lambda: threading.active_count() <= threads0, what="dispatcher threads to end")
    grown = rss_kb() - rss0
    assert open_fds() <= fds0, "every eventfd, pipe and socket closed"
    assert grown < 8 * 1024, f"RSS grew {grown} kB over 300 brokers"
    assert elapsed < 60, f"300 brokers took {elapsed:.1f}s"


def test_dropping_the_last_reference_stops_the_broker():
    p = pushlet.Pushlet(listen="127.0.0.1:0").start()
    port = p.port
    del p
    gc.collect()
    with pytest.raises(OSError):  # the listening socket is gone
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


EXIT_SCRIPT = """
import asyncio, threading, time, sys, logging
import pushlet
logging.basicConfig(level=logging.INFO)
p = pushlet.Pushlet(listen="127.0.0.1:0", on_connect=lambda r: True,
                    on_connected=lambda c: print("connected", flush=True))
p.start()
def spam():
    while True:
        try:
            p.publish("t", None, "spam")
        except pushlet.PushletError:
            time.sleep(0.001)
threading.Thread(target=spam, daemon=True).start()
async def client():
    r, w = await asyncio.open_connection("127.0.0.1", p.port)
    w.write(b"GET /events?topic=t HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
    await r.readuntil(b"spam")
    return r, w
conn = asyncio.run(client())
print("exiting with a running broker", flush=True)
"""


@pytest.mark.parametrize("ending", ["return", "sys.exit(0)"])
def test_interpreter_exit_with_running_broker(tmp_path, ending):
    script = tmp_path / "exit.py"
    script.write_text(EXIT_SCRIPT + ("sys.exit(0)\n" if ending != "return" else ""))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "exiting with a running broker" in proc.stdout
    assert "Traceback" not in proc.stderr and "Fatal" not in proc.stderr, proc.stderr
    assert "stopped" in proc.stderr, "the finalizer stopped it (the core logged it)"
    assert time.monotonic() - t0 < 20


def test_stop_releases_the_gil(make_broker):
    """stop() waits for a slow client's output to flush (up to the stop deadline); other
    Python threads keep running meanwhile."""
    p = make_broker(stop_timeout_ms=1500, max_output_bytes=64 << 20, history_size=0)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", p.port))
    sock.sendall(b"GET /events?topic=t HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_until(lambda: p.topic_subscribers("t") == 1)
    for _ in range(64):
        p.publish("t", None, b"x" * 60000)  # ~4 MB the client never reads
    ticks = 0
    stopping = threading.Event()

    def ticker() -> None:
        nonlocal ticks
        while not stopping.is_set():
            ticks += 1
            time.sleep(0.001)

    t = threading.Thread(target=ticker)
    t.start()
    time.sleep(0.05)
    before = ticks
    t0 = time.monotonic()
    p.stop()
    took = time.monotonic() - t0
    during = ticks - before
    stopping.set()
    t.join()
    sock.close()
    assert took > 0.5, f"stop returned in {took:.2f}s: the client's output was not pending"
    assert during > 100, f"only {during} ticks in {took:.2f}s: stop() held the GIL"


FORK_CHILD_OK = 0


def test_fork_detection(broker):
    broker.publish("t", None, "before fork")
    pid = os.fork()
    if pid == 0:  # the child: every call says what happened, nothing hangs or crashes
        code = 1
        try:
            broker.publish("t", None, "in child")
        except pushlet.ForkedError as e:
            code = 0 if "fork" in str(e) else 2
        except BaseException:
            code = 3
        try:
            broker.close()  # a no-op in the child
            _ = broker.stats
            code = 4
        except pushlet.ForkedError:
            pass
        except BaseException:
            code = 5
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == FORK_CHILD_OK
    broker.publish("t", None, "parent still works")
    assert broker.running


def test_new_broker_in_forked_child_works():
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            with pushlet.Pushlet(listen="127.0.0.1:0") as p:
                p.publish("t", None, "child's own broker")
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_close_from_a_hook_does_not_hang():
    done = threading.Event()

    def on_connected(conn):
        p.close()
        done.set()

    p = pushlet.Pushlet(listen="127.0.0.1:0", on_connected=on_connected).start()
    s = socket.create_connection(("127.0.0.1", p.port), timeout=5)
    s.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
    assert done.wait(10)
    assert p.closed
    s.close()



def test_close_gives_hooks_the_last_disconnections():
    gone: list[str] = []
    p = pushlet.Pushlet(listen="127.0.0.1:0",
                        on_disconnected=lambda c, why: gone.append(c.transport))
    p.start()
    s = socket.create_connection(("127.0.0.1", p.port), timeout=5)
    s.sendall(b"GET /events?topic=t HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_until(lambda: p.stats["connections"] == 1)
    p.close()
    assert gone == ["sse"]
    s.close()


def test_loop_attached_broker_collected_and_closed_on_the_loop():
    def make(i: int) -> None:
        p = pushlet.Pushlet(listen="127.0.0.1:0", loop=asyncio.get_running_loop())
        p.on_connected = lambda c: p.publish("t", None, "x")  # a cycle
        p.start()
        if i % 2:
            p.close()

    async def main():
        fds0 = open_fds()
        for i in range(20):
            make(i)
            gc.collect()
            await asyncio.sleep(0)
        assert open_fds() <= fds0, "readers removed and their fds closed"

    run(main())


STUCK_HOOK_SCRIPT = """
import socket, threading, sys
import pushlet, pushlet._broker
pushlet._broker._CLOSE_JOIN_TIMEOUT = 0.5
entered = threading.Event()
def on_connected(conn):
    entered.set()
    threading.Event().wait()  # a hook that never returns
p = pushlet.Pushlet(listen="127.0.0.1:0", on_connected=on_connected).start()
s = socket.create_connection(("127.0.0.1", p.port))
s.sendall(b"GET /events HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
assert entered.wait(10)
print("exiting while a hook is stuck", flush=True)
"""


def test_interpreter_exit_with_a_stuck_hook(tmp_path):
    script = tmp_path / "stuck.py"
    script.write_text(STUCK_HOOK_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "exiting while a hook is stuck" in proc.stdout
    assert "left unreleased" in proc.stderr and "Traceback" not in proc.stderr
