"""SIGTERM / SIGINT: streams end after the queued messages, exit code 0, within the deadline."""

import select
import signal
import time

import pytest

import pushlet_testlib as pl
from pushlet_testlib import RawHTTP, events_path


def open_subscriber(srv, topic, rcvbuf=None):
    c = RawHTTP(srv.addr, timeout=10, rcvbuf=rcvbuf)
    c.send(pl.build_request("GET", events_path(topic), b"", {}, srv.addr))
    deadline = time.monotonic() + 10
    head = c.read_until(b"\r\n\r\n", deadline)
    assert b" 200 " in head.split(b"\r\n")[0], head
    c.parser = pl.SSEParser()
    c.events = c.parser.feed(c.buf)
    c.buf = b""
    c.closed_how = None
    while not any(e.event == "connected" for e in c.events):
        assert c._fill(deadline), "stream closed before the connected event"
        c.events += c.parser.feed(c.buf)
        c.buf = b""
    return c


def drain_all(conns, timeout):
    """Read every connection until EOF/reset (select loop); bounded."""
    deadline = time.monotonic() + timeout
    open_ = {c.sock.fileno(): c for c in conns}
    for c in conns:
        c.sock.setblocking(False)
    while open_:
        left = deadline - time.monotonic()
        if left <= 0:
            raise pl.Timeout(f"{len(open_)} streams still open {timeout:.1f}s after the signal")
        r, _, _ = select.select(list(open_), [], [], min(left, 0.5))
        for fd in r:
            c = open_[fd]
            try:
                data = c.sock.recv(262144)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                c.closed_how = "reset"
                del open_[fd]
                continue
            if not data:
                c.closed_how = "eof"
                c.events += c.parser.finish_pending_cr()
                del open_[fd]
                continue
            c.events += c.parser.feed(data)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_flushes_queued_messages_then_ends_streams(pushletd, sig):
    stop_timeout = 5.0
    srv = pushletd("--stop-timeout", str(stop_timeout), "--max-output-bytes", str(64 << 20))
    subs = [open_subscriber(srv, "news") for _ in range(5)]
    other = open_subscriber(srv, "idle-topic")
    pub = RawHTTP(srv.addr)
    ids = []
    # ~6 MB per subscriber: more than the kernel buffers hold while nobody reads, so part
    # of it is still queued inside pushletd when the signal arrives
    n_msg, size = 1500, 4096
    for i in range(n_msg):
        r = pub.request("POST", "/publish?topic=news", f"{i}:".encode() + b"n" * size)
        assert r.status == 200, r
        ids.append(r.json_id())
    pub.close()
    in_kernel = pl.kernel_queued_bytes(srv.port)
    assert in_kernel < len(subs) * n_msg * size, \
        f"test precondition: everything ({in_kernel} B) already left pushletd; publish more"
    t0 = time.monotonic()
    srv.send_signal(sig)
    drain_all(subs + [other], timeout=(stop_timeout + 5) * pl.time_scale())
    rc = srv.wait(timeout=(stop_timeout + 5) * pl.time_scale())
    elapsed = time.monotonic() - t0
    assert rc == 0, f"exit code {rc}"
    assert elapsed <= stop_timeout + 2 * pl.time_scale(), f"stop took {elapsed:.1f}s"
    for c in subs:
        msgs = [e for e in c.events if e.event != "connected"]
        assert [e.id for e in msgs] == ids, \
            f"got {len(msgs)} of {len(ids)} queued messages before the stream ended"
        assert all(e.data.startswith(f"{i}:") for i, e in enumerate(msgs))
        assert c.closed_how == "eof", f"stream ended by {c.closed_how}, expected a clean EOF"
        assert c.parser.pending == b"", f"stream ended mid-line: {c.parser.pending[:80]!r}"
    assert other.closed_how == "eof"
    for c in subs + [other]:
        c.close()


def test_stop_with_stuck_client_respects_stop_timeout(pushletd):
    """A subscriber that never reads cannot hold the process past --stop-timeout."""
    srv = pushletd("--stop-timeout", "1", "--max-output-bytes", str(64 << 20))
    stuck = open_subscriber(srv, "t", rcvbuf=4096)
    reader = open_subscriber(srv, "t")
    pub = RawHTTP(srv.addr)
    n_msg = 1000  # ~8 MB: below the output bound, above what the kernel buffers hold
    for i in range(n_msg):
        assert pub.request("POST", "/publish?topic=t", b"s" * 8192).status == 200
    pub.close()
    # the reader takes its share, so what remains in the kernel belongs to the stuck client
    drain_some = time.monotonic() + 10
    while len([e for e in reader.events if e.event != "connected"]) < n_msg:
        assert time.monotonic() < drain_some, "reader did not get its messages"
        assert reader._fill(drain_some)
        reader.events += reader.parser.feed(reader.buf)
        reader.buf = b""
    assert pl.kernel_queued_bytes(srv.port) < n_msg * 8192, \
        "test precondition: the stuck client's data all fits in kernel buffers"
    t0 = time.monotonic()
    srv.send_signal(signal.SIGTERM)
    drain_all([reader], timeout=10 * pl.time_scale())
    rc = srv.wait(timeout=10 * pl.time_scale())
    elapsed = time.monotonic() - t0
    assert rc == 0
    assert elapsed <= 1 + 2.5 * pl.time_scale(), f"stop took {elapsed:.1f}s with --stop-timeout 1"
    assert len([e for e in reader.events if e.event != "connected"]) == n_msg
    stuck.wait_closed(timeout=5)
    stuck.close()
    reader.close()


def test_stop_does_not_wait_for_the_deadline_when_everything_is_flushed(pushletd):
    srv = pushletd("--stop-timeout", "20")
    subs = [open_subscriber(srv, "x") for _ in range(3)]
    assert srv.request("POST", "/publish?topic=x", b"bye").status == 200
    idle = RawHTTP(srv.addr)  # an idle keep-alive connection must not delay the stop either
    assert idle.request("GET", "/healthz").status == 200
    t0 = time.monotonic()
    srv.send_signal(signal.SIGTERM)
    drain_all(subs, timeout=10 * pl.time_scale())
    rc = srv.wait(timeout=25 * pl.time_scale())
    elapsed = time.monotonic() - t0
    assert rc == 0
    assert elapsed < 3 * pl.time_scale(), f"stop took {elapsed:.1f}s although nothing was queued"
    for c in subs:
        assert [e.data for e in c.events if e.event != "connected"] == ["bye"]
        c.close()
    idle.wait_closed(timeout=5)
    idle.close()


def test_idle_server_stops_fast_with_exit_0(pushletd):
    srv = pushletd()
    t0 = time.monotonic()
    rc = srv.stop(signal.SIGTERM)
    assert rc == 0
    assert time.monotonic() - t0 < 2 * pl.time_scale()
