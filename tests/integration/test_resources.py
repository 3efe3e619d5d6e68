"""Connections that end in every way (clean close, reset with queued output, half-sent head,
bad request, request abandoned before its answer) release their resources."""

import asyncio
import json
import os
import socket
import struct

import pushlet_testlib as pl
from pushlet_testlib import AsyncSSE, events_path, run_async


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def rst_close(sock):
    """Close with an RST (SO_LINGER 0), as a crashed client or a middlebox would."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_connection_churn_leaks_nothing(pushletd):
    srv = pushletd("--header-timeout", "2")
    pl.wait_until(lambda: srv.stats()["connections"] <= 1, 5, what="quiet server")
    base_fds = fd_count(srv.pid)

    async def churn():
        for _ in range(3):
            # clean SSE subscribers
            subs = await asyncio.gather(*(AsyncSSE(srv.addr, events_path("c", f"u{i}")).connect()
                                          for i in range(100)))
            await asyncio.gather(*(s.close() for s in subs))

            # subscribers with output queued for them, then reset
            socks = []
            for i in range(50):
                s = socket.create_connection(srv.addr, timeout=10)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.sendall(pl.build_request("GET", events_path("big"), b"", {}, srv.addr))
                socks.append(s)
            await asyncio.to_thread(pl.wait_until,
                                    lambda: srv.stats()["sse_connections"] >= 50, 10, 0.02,
                                    "50 subscribers")
            for _ in range(20):
                await asyncio.to_thread(srv.publish, "big", b"B" * 60000)
            for s in socks:
                rst_close(s)

            # half-sent heads, closed or reset
            for i in range(50):
                s = socket.create_connection(srv.addr, timeout=10)
                s.sendall(b"POST /publish?topic=c HTTP/1.1\r\nHost: x\r\nContent-Le")
                rst_close(s) if i % 2 else s.close()

            # complete publishes abandoned before the answer; bodies cut short
            for i in range(50):
                s = socket.create_connection(srv.addr, timeout=10)
                s.sendall(pl.build_request("POST", "/publish?topic=c", b"x" * 1000, {},
                                           srv.addr)[: -500 if i % 2 else None])
                rst_close(s) if i % 3 else s.close()

            # bad requests
            for i in range(30):
                s = socket.create_connection(srv.addr, timeout=10)
                s.sendall(b"\x00\xffBAD\r\n\r\n")
                s.close()

    run_async(churn(), 120 * pl.time_scale())

    def settled():
        st = srv.stats()
        ok = (st["sse_connections"] == 0 and st["subscriptions"] == 0
              and st["connections"] <= 1 and fd_count(srv.pid) <= base_fds)
        return ok or None

    try:
        pl.wait_until(settled, 10 * pl.time_scale(), 0.1, "connections to be released")
    except pl.Timeout:
        raise AssertionError(f"not released: stats {srv.stats()}, fds {fd_count(srv.pid)} "
                             f"(baseline {base_fds})") from None
    # and it still works
    assert srv.get("/healthz").status == 200


def test_malformed_resume_ids(pushletd):
    """A Last-Event-ID that is no cursor (browsers send it by themselves) degrades to a gap and
    live messages; a malformed ?last_event_id= is refused."""
    srv = pushletd()

    async def main():
        a = await AsyncSSE(srv.addr, events_path("r"), headers={"Last-Event-ID": "3"}).connect()
        assert a.response.status == 200
        b = AsyncSSE(srv.addr, events_path("r", last_event_id="7"))
        await b.connect(wait_connected=False)
        assert b.response.status == 400
        mid = await asyncio.to_thread(srv.publish, "r", "after")
        await a.wait_for(lambda s: any(e.id == mid for e in s.events), 10, "message")
        gap, msg = a.messages()
        assert (gap.event, json.loads(gap.data)) == (
            "gap", {"topic": "r", "reason": "cursor_mismatch"})
        assert msg.data == "after"
        for s in (a, b):
            await s.close()

    run_async(main(), 20)
