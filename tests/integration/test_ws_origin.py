"""The WebSocket Origin allow-list (--ws-origins): listed origins upgrade, others get 403."""
import pushlet_testlib as pl

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def upgrade(srv, origin):
    headers = f"Origin: {origin}\r\n" if origin else ""
    req = (f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n").encode()
    conn = pl.RawHTTP(srv.addr)
    try:
        conn.sock.sendall(req)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.sock.recv(4096)
            if not chunk:
                break
            head += chunk
        return int(head.split(b" ", 2)[1])
    finally:
        conn.close()


def test_listed_origins_upgrade_and_others_are_refused(pushletd):
    srv = pushletd("--ws-origins", "https://a.example, https://b.example")
    assert upgrade(srv, "https://a.example") == 101
    assert upgrade(srv, "https://b.example") == 101
    assert upgrade(srv, "https://evil.example") == 403
    assert upgrade(srv, None) == 403
    assert srv.stats()["http_errors"] == 2


def test_any_origin_by_default(pushletd):
    srv = pushletd()
    assert upgrade(srv, "https://anything.example") == 101
    assert upgrade(srv, None) == 101
