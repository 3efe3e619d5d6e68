"""HTTP edge cases found in review: HEAD answers never carry a body, each pipelined request gets
its own head deadline, a half-closed client still gets every queued answer, and rejected
connections cannot pile up beyond a bound."""
import os
import socket
import time

import pushlet_testlib as pl


def test_head_answers_carry_no_body_so_keep_alive_stays_in_step(pushletd):
    srv = pushletd()
    with pl.RawHTTP(srv.addr) as c:
        for path in ("/publish", "/send", "/publish_all", "/nope", "/healthz", "/stats"):
            c.send(pl.build_request("HEAD", path, addr=srv.addr))
            head = c.read_response(head_only=True)
            assert head.status in (200, 404, 405), (path, head.status)
            # The next response on the connection must start right here.
            r = c.request("GET", "/healthz")
            assert (r.status, r.body) == (200, b"ok\n"), path


def test_each_pipelined_request_gets_its_own_head_deadline(pushletd):
    srv = pushletd("--header-timeout", "1")
    req = pl.build_request("GET", "/healthz", addr=srv.addr)
    with pl.RawHTTP(srv.addr) as c:
        # Every write ends mid-request, yet the client keeps making progress for 2.5 s.
        c.send(req[:10])
        for _ in range(25):
            time.sleep(0.1)
            c.send(req[10:] + req[:10])
            r = c.read_response()
            assert r.status == 200, r.status


def test_half_closed_client_gets_every_queued_answer(pushletd):
    srv = pushletd("--max-output-bytes", str(64 << 20))
    n = 3000
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(srv.addr)
    s.sendall(pl.build_request("GET", "/healthz", addr=srv.addr) * n)
    s.shutdown(socket.SHUT_WR)
    time.sleep(0.3)  # let the answers back up behind the small receive buffer
    s.settimeout(10)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    assert data.count(b"HTTP/1.1 200 OK") == n


def test_rejected_connections_are_bounded(pushletd):
    srv = pushletd("--max-connections", "10")
    held = []
    try:
        for _ in range(1500):
            s = socket.socket()
            s.connect(srv.addr)
            held.append(s)
        time.sleep(0.3)
        fds = len(os.listdir(f"/proc/{srv.pid}/fd"))
        # 10 allowed + at most 256 lingering rejections + the server's own descriptors
        assert fds < 10 + 256 + 64, fds
    finally:
        for s in held:
            s.close()
    # /stats itself is refused while the server is full: read it once the clients left.
    def drained():
        try:
            return srv.stats()["connections"] <= 1
        except AssertionError:  # still full: answered 503
            return False

    pl.wait_until(drained, 10, 0.1, "the clients to go")
    assert srv.stats()["connections_rejected"] >= 1000
