"""RFC 6455 conformance and bad input, with raw sockets, modelled on the Autobahn TestSuite case
groups (pushletd does not echo, so each case sends *commands* and checks the replies, or the
close code):

  1.x framing sizes          2.x ping/pong           3.x reserved bits     4.x reserved opcodes
  5.x fragmentation          6.x UTF-8               7.x close handshake   9.x big messages
  + unmasked frames, the opening handshake's errors, permessage-deflate (RFC 7692) and the
  subscription protocol's bad input.

For every failing case: the close frame's code, EOF within a bound (the server ends TCP), no
frame after the server's close, and two bystanders (a WebSocket and an SSE client connected
all along) still receive a message published afterwards.
"""

import json
import struct
import time
import zlib

import pytest

import pushlet_testlib as pl
from pushlet_testlib import (OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, RawHTTP,
                             RawWS, ws_close_payload, ws_frame)

S = pl.time_scale()
PING = json.dumps({"action": "ping"}).encode()
PONG = {"event": "pong"}


def pad_ping(size: int) -> bytes:
    """A ping command of exactly `size` bytes (size >= 26)."""
    base = b'{"action":"ping","pad":""}'
    assert size >= len(base), size
    return base[:-2] + b"x" * (size - len(base)) + b'"}'


# --------------------------------------------------------------------------------------------
# Bystanders: other clients connected during each case must keep receiving


class Bystanders:
    def __init__(self, srv):
        self.srv = srv
        self.n = 0
        self.ws = RawWS(srv.addr, "/ws?topic=bystander")
        self.ws.handshake_done(["bystander"])
        self.sse = RawHTTP(srv.addr, timeout=10)
        self.sse.send(pl.build_request("GET", pl.events_path("bystander"), b"", {}, srv.addr))
        head = self.sse.read_until(b"\r\n\r\n", time.monotonic() + 10 * S)
        assert b" 200 " in head.split(b"\r\n")[0], head
        self.parser = pl.SSEParser()
        self.events = self.parser.feed(self.sse.buf)
        self.sse.buf = b""

    def check(self):
        """Publish one message: both bystanders must get it (and nothing unexpected)."""
        self.n += 1
        data = f"still-here-{self.n}"
        mid = self.srv.publish("bystander", data)
        obj = self.ws.recv_json(timeout=5 * S)   # pings are answered along the way
        assert (obj.get("id"), obj.get("data")) == (mid, data), obj
        deadline = time.monotonic() + 5 * S
        while not any(e.id == mid for e in self.events):
            if not self.sse._fill(deadline):
                raise AssertionError("SSE bystander's stream ended")
            self.events += self.parser.feed(self.sse.buf)
            self.sse.buf = b""
        ev = [e for e in self.events if e.id == mid][0]
        assert ev.data == data, ev

    def close(self):
        self.ws.close()
        self.sse.close()


_open_clients = []


@pytest.fixture
def server(pushletd):
    """factory(*flags) -> (srv, bystanders). Every RawWS made during the test is closed before
    the server is stopped (a lingering peer would only delay the stop)."""
    made = []
    _open_clients.clear()
    orig_init = RawWS.__init__

    def tracking_init(self, *a, **kw):
        _open_clients.append(self)
        orig_init(self, *a, **kw)

    RawWS.__init__ = tracking_init

    def make(*flags):
        srv = pushletd(*flags)
        b = Bystanders(srv)
        made.append(b)
        return srv, b

    try:
        yield make
    finally:
        RawWS.__init__ = orig_init
        for c in _open_clients:
            c.close()
        for b in made:
            b.close()


def victim(srv, path="/ws?topic=victim", **kw):
    c = RawWS(srv.addr, path, **kw)
    c.handshake_done(["victim"] if "topic=victim" in path else [])
    return c


def fails(c, code, srv=None, by=None, timeout=5.0):
    """The server closes with `code`, then ends TCP, then sends nothing more; bystanders live."""
    f = c.expect_close(code, timeout=timeout * S)
    if by is not None:
        by.check()
    return f


def still_alive(c, by=None):
    """The connection is open and in sync: a ping command's pong is the next reply."""
    c.send_frame(OP_TEXT, PING)
    obj = c.recv_json(timeout=5 * S)
    assert obj == PONG, f"expected pong, got {obj}"
    if by is not None:
        by.check()


# --------------------------------------------------------------------------------------------
# 1.x Framing: text and binary messages of the boundary sizes of the length encodings


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY], ids=["text", "binary"])
@pytest.mark.parametrize("size", [0, 125, 126, 127, 65535, 65536])
@pytest.mark.parametrize("chopped", [False, True], ids=["whole", "chopped"])
def test_1_framing_sizes(server, opcode, size, chopped):
    srv, by = server()          # --max-message-size defaults to 65536: 65536 is still fine
    c = victim(srv)
    payload = pad_ping(size) if size else b""
    frame = ws_frame(opcode, payload)
    if chopped:
        c.send_chopped(frame, 1 if size <= 127 else 4093)
    else:
        c.send(frame)
    obj = c.recv_json()
    if size == 0:
        assert obj["event"] == "error" and obj["reason"] == "bad_json", obj
    else:
        assert obj == PONG, obj
    still_alive(c, by)


def test_1_many_messages_in_one_write_answered_in_order(server):
    srv, by = server("--max-subscribes-per-sec", "1000")  # 200 (un)subscribes in one burst
    c = victim(srv)
    cmds = []
    for i in range(300):
        if i % 3 == 0:
            cmds.append(json.dumps({"action": "subscribe", "topic": f"t{i}"}))
        elif i % 3 == 1:
            cmds.append(json.dumps({"action": "unsubscribe", "topic": f"t{i - 1}"}))
        else:
            cmds.append(json.dumps({"action": "ping", "n": i}))
    c.send(b"".join(ws_frame(OP_TEXT if i % 2 else OP_BINARY, s.encode())
                    for i, s in enumerate(cmds)))
    for i in range(300):
        obj = c.recv_json()
        want = (pl.subscribed(f"t{i}") if i % 3 == 0 else
                {"event": "unsubscribed", "topic": f"t{i - 1}"} if i % 3 == 1 else PONG)
        assert obj == want, (i, obj)
    still_alive(c, by)


def test_1_command_in_same_write_as_handshake(server):
    srv, by = server()
    extra = ws_frame(OP_TEXT, json.dumps({"action": "subscribe", "topic": "early"}).encode())
    c = RawWS(srv.addr, "/ws", extra=extra + ws_frame(OP_PING, b"early ping"))
    c.handshake_done()
    assert c.recv_json() == pl.subscribed("early")
    f = c.recv_frame()
    assert (f.opcode, f.payload) == (OP_PONG, b"early ping"), f
    still_alive(c, by)


def test_1_zero_mask_key_and_server_frames_unmasked(server):
    srv, by = server()
    c = victim(srv)
    c.send_frame(OP_TEXT, PING, mask_key=b"\x00\x00\x00\x00")
    assert c.recv_json() == PONG
    assert all(not f.masked for f in c.frames), "a server must not mask its frames"
    still_alive(c, by)


# --------------------------------------------------------------------------------------------
# 2.x Ping / pong


@pytest.mark.parametrize("payload", [b"", b"Hello, world!", bytes(range(256))[:125],
                                     b"\xff\xfe\xfd\xfc" * 31], ids=["empty", "text", "binary125",
                                                                     "nonutf8-124"])
@pytest.mark.parametrize("chopped", [False, True], ids=["whole", "chopped"])
def test_2_ping_echoed_exactly(server, payload, chopped):
    srv, by = server()
    c = victim(srv)
    frame = ws_frame(OP_PING, payload)
    if chopped:
        c.send_chopped(frame, 1, pause=0.001)
    else:
        c.send(frame)
    f = c.recv_frame()
    assert f.opcode == OP_PONG and f.fin and f.rsv == 0, f
    assert f.payload == payload
    still_alive(c, by)


def test_2_ping_126_bytes_is_1002(server):
    srv, by = server()
    c = victim(srv)
    c.send_frame(OP_PING, b"x" * 126)
    fails(c, 1002, srv, by)
    assert not any(f.opcode == OP_PONG for f in c.frames)


@pytest.mark.parametrize("payload", [b"", b"unsolicited pong payload"])
def test_2_unsolicited_pong_ignored(server, payload):
    srv, by = server()
    c = victim(srv)
    c.send_frame(OP_PONG, payload)
    still_alive(c, by)
    assert [f.opcode for f in c.frames].count(OP_PONG) == 0


def test_2_unsolicited_pong_then_ping(server):
    srv, by = server()
    c = victim(srv)
    c.send(ws_frame(OP_PONG, b"unsolicited") + ws_frame(OP_PING, b"solicited"))
    f = c.recv_frame()
    assert (f.opcode, f.payload) == (OP_PONG, b"solicited"), f
    still_alive(c, by)


@pytest.mark.parametrize("chopped", [False, True], ids=["one-write", "chopped"])
def test_2_ten_pings_ten_pongs_in_order(server, chopped):
    srv, by = server()
    c = victim(srv)
    blob = b"".join(ws_frame(OP_PING, f"payload-{i}".encode()) for i in range(10))
    if chopped:
        c.send_chopped(blob, 1)
    else:
        c.send(blob)
    got = [c.recv_frame() for _ in range(10)]
    assert [(f.opcode, f.payload) for f in got] == \
        [(OP_PONG, f"payload-{i}".encode()) for i in range(10)]
    still_alive(c, by)


# --------------------------------------------------------------------------------------------
# 3.x Reserved bits (no extension negotiated: every RSV bit is an error)


@pytest.mark.parametrize("rsv", [1, 2, 3, 4, 5, 6, 7])
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY, OP_PING, OP_PONG, OP_CLOSE],
                         ids=["text", "binary", "ping", "pong", "close"])
def test_3_reserved_bits_are_1002(server, rsv, opcode):
    srv, by = server()
    c = victim(srv)
    payload = ws_close_payload(1000) if opcode == OP_CLOSE else PING
    c.send_frame(opcode, payload, rsv=rsv)
    fails(c, 1002, srv, by)


@pytest.mark.parametrize("mode", ["separate", "one-write", "chopped"])
def test_3_valid_message_then_rsv_then_ping(server, mode):
    """Autobahn 3.2-3.4: the valid message is answered, the bad one closes, the ping after it
    gets no pong."""
    srv, by = server()
    c = victim(srv)
    frames = [ws_frame(OP_TEXT, PING), ws_frame(OP_TEXT, PING, rsv=2), ws_frame(OP_PING, b"x")]
    if mode == "separate":
        c.send(frames[0])
        assert c.recv_json() == PONG
        c.send(frames[1] + frames[2])
    elif mode == "one-write":
        c.send(b"".join(frames))
        assert c.recv_json() == PONG
    else:
        c.send_chopped(b"".join(frames), 1)
        assert c.recv_json() == PONG
    fails(c, 1002, srv, by)
    assert not any(f.opcode == OP_PONG for f in c.frames)


def test_3_rsv_on_continuation_is_1002(server):
    srv, by = server()
    c = victim(srv)
    c.send_frame(OP_TEXT, PING[:5], fin=False)
    c.send_frame(OP_CONT, PING[5:], rsv=4)
    fails(c, 1002, srv, by)


# --------------------------------------------------------------------------------------------
# 4.x Reserved opcodes


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 11, 12, 13, 14, 15])
@pytest.mark.parametrize("payload", [b"", b"reserved opcode payload"], ids=["empty", "payload"])
def test_4_reserved_opcodes_are_1002(server, opcode, payload):
    srv, by = server()
    c = victim(srv)
    c.send_frame(opcode, payload)
    fails(c, 1002, srv, by)


@pytest.mark.parametrize("opcode", [3, 11])
def test_4_valid_message_then_reserved_opcode_then_ping(server, opcode):
    srv, by = server()
    c = victim(srv)
    c.send(ws_frame(OP_TEXT, PING) + ws_frame(opcode, b"zz") + ws_frame(OP_PING, b"p"))
    assert c.recv_json() == PONG
    fails(c, 1002, srv, by)
    assert not any(f.opcode == OP_PONG for f in c.frames)


def test_4_reserved_opcode_fails_before_its_length_arrives(server):
    """Two header bytes are enough to know: the server does not wait for the rest."""
    srv, by = server()
    c = victim(srv)
    c.send(bytes([0x80 | 5, 0x80 | 127]))     # opcode 5, 64-bit length that never comes
    fails(c, 1002, srv, by)


# --------------------------------------------------------------------------------------------
# 5.x Fragmentation


def frag(opcode, payload, sizes):
    """Split payload into fragments of the given sizes (the last takes the rest)."""
    out, off = [], 0
    pieces = []
    for n in sizes:
        pieces.append(payload[off:off + n])
        off += n
    pieces.append(payload[off:])
    for i, p in enumerate(pieces):
        out.append(ws_frame(opcode if i == 0 else OP_CONT, p, fin=i == len(pieces) - 1))
    return out


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG], ids=["ping", "pong"])
def test_5_fragmented_control_is_1002(server, opcode):
    srv, by = server()
    c = victim(srv)
    c.send(ws_frame(opcode, b"frag", fin=False) + ws_frame(OP_CONT, b"mented", fin=True))
    fails(c, 1002, srv, by)


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY], ids=["text", "binary"])
@pytest.mark.parametrize("mode", ["two", "bytewise", "bytewise-slow", "with-empty-fragments"])
def test_5_fragmented_message(server, opcode, mode):
    srv, by = server()
    c = victim(srv)
    if mode == "two":
        c.send(b"".join(frag(opcode, PING, [8])))
    elif mode.startswith("bytewise"):
        for fr in frag(opcode, PING, [1] * (len(PING) - 1)):
            c.send(fr)
            if mode == "bytewise-slow":
                time.sleep(0.002)
    else:
        c.send(ws_frame(opcode, b"", fin=False) + ws_frame(OP_CONT, PING[:4], fin=False)
               + ws_frame(OP_CONT, b"", fin=False) + ws_frame(OP_CONT, PING[4:], fin=False)
               + ws_frame(OP_CONT, b"", fin=True))
    assert c.recv_json() == PONG
    still_alive(c, by)


@pytest.mark.parametrize("mode", ["separate", "one-write", "chopped"])
def test_5_pings_between_fragments(server, mode):
    srv, by = server()
    c = victim(srv)
    parts = frag(OP_TEXT, json.dumps({"action": "subscribe", "topic": "f5"}).encode(), [3, 10])
    frames = [parts[0], ws_frame(OP_PING, b"p1"), parts[1], ws_frame(OP_PONG, b"u"),
              ws_frame(OP_PING, b"p2"), parts[2]]
    if mode == "separate":
        for fr in frames:
            c.send(fr)
            time.sleep(0.005)
    elif mode == "one-write":
        c.send(b"".join(frames))
    else:
        c.send_chopped(b"".join(frames), 1)
    got = [c.recv_frame() for _ in range(3)]
    assert [(f.opcode, f.payload) for f in got[:2]] == [(OP_PONG, b"p1"), (OP_PONG, b"p2")], got
    assert got[2].json() == pl.subscribed("f5"), got
    still_alive(c, by)


@pytest.mark.parametrize("fin", [True, False], ids=["fin", "nofin"])
@pytest.mark.parametrize("after_valid", [False, True], ids=["first", "after-message"])
def test_5_continuation_without_start_is_1002(server, fin, after_valid):
    srv, by = server()
    c = victim(srv)
    if after_valid:
        c.send(b"".join(frag(OP_TEXT, PING, [5])))
        assert c.recv_json() == PONG
    c.send_frame(OP_CONT, PING, fin=fin)
    fails(c, 1002, srv, by)


@pytest.mark.parametrize("second", [OP_TEXT, OP_BINARY], ids=["text", "binary"])
def test_5_new_message_inside_fragmented_one_is_1002(server, second):
    srv, by = server()
    c = victim(srv)
    c.send(ws_frame(OP_TEXT, PING[:5], fin=False) + ws_frame(second, PING))
    fails(c, 1002, srv, by)


def test_5_fragment_after_final_is_1002(server):
    """Autobahn 5.15: text(fin=0) cont(fin=1) cont(fin=0) ... : the third frame is a protocol
    error (the first message is answered)."""
    srv, by = server()
    c = victim(srv)
    c.send(b"".join(frag(OP_TEXT, PING, [5])) + ws_frame(OP_CONT, b"more", fin=False))
    assert c.recv_json() == PONG
    fails(c, 1002, srv, by)


def test_5_close_between_fragments(server):
    srv, by = server()
    c = victim(srv)
    c.send(ws_frame(OP_TEXT, PING[:5], fin=False) + ws_frame(OP_CLOSE, ws_close_payload(1000))
           + ws_frame(OP_CONT, PING[5:], fin=True))
    fails(c, 1000, srv, by)
    assert not any(f.opcode == OP_BINARY for f in c.frames[-1:]), c.frames


# --------------------------------------------------------------------------------------------
# 6.x UTF-8 in text messages (binary messages are not checked)

VALID_UTF8 = ["", "\u03ba\u1f79\u03c3\u03bc\u03b5", "\u0080", "\u07ff", "\u0800", "\uffff",
              "\ud7ff", "\ue000", "\U00010000", "\U0010ffff", "\ufeff",
              "mixed ascii \u00e9\u20ac\U0001F600 end"]
INVALID_UTF8 = [
    b"\x80", b"\xbf", b"\xc0\xaf", b"\xc1\xbf", b"\xe0\x80\xaf", b"\xe0\x9f\xbf",
    b"\xf0\x80\x80\xaf", b"\xf0\x8f\xbf\xbf", b"\xed\xa0\x80", b"\xed\xbf\xbf",
    b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80", b"\xf8\x88\x80\x80\x80", b"\xfe", b"\xff",
    b"\xce", b"\xe2\x82", b"\xf0\x9f\x98", b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80",
    b"\xc2\x41", b"\xe2\x28\xa1", b"\xf0\x28\x8c\xbc", b"\xed\xa0\x80\xed\xb0\x80",
]


def with_text(s: bytes) -> bytes:
    """A ping command carrying `s` inside a JSON string."""
    return b'{"action":"ping","x":"' + s + b'"}'


@pytest.mark.parametrize("text", VALID_UTF8, ids=[f"v{i}" for i in range(len(VALID_UTF8))])
def test_6_valid_utf8_accepted_whole_and_split_everywhere(server, text):
    srv, by = server()
    c = victim(srv)
    payload = with_text(text.encode("utf-8"))
    c.send_frame(OP_TEXT, payload)
    assert c.recv_json() == PONG
    # split into two fragments at every byte position inside the text (mid-character too)
    start = payload.index(b'"x":"') + 5
    blob = b""
    positions = range(start, start + len(text.encode()) + 1)
    for k in positions:
        blob += b"".join(frag(OP_TEXT, payload, [k]))
    c.send(blob)
    for _ in positions:
        assert c.recv_json() == PONG
    # one byte per fragment
    c.send(b"".join(frag(OP_TEXT, payload, [1] * (len(payload) - 1))))
    assert c.recv_json() == PONG
    still_alive(c, by)


@pytest.mark.parametrize("bad", INVALID_UTF8, ids=[f"i{i}" for i in range(len(INVALID_UTF8))])
@pytest.mark.parametrize("how", ["whole", "fragmented", "bytewise"])
def test_6_invalid_utf8_is_1007(server, bad, how):
    srv, by = server()
    c = victim(srv)
    payload = with_text(bad)
    if how == "whole":
        c.send_frame(OP_TEXT, payload)
    elif how == "fragmented":
        cut = payload.index(bad) + max(1, len(bad) // 2)
        c.send(b"".join(frag(OP_TEXT, payload, [cut])))
    else:
        for fr in frag(OP_TEXT, payload, [1] * (len(payload) - 1)):
            try:
                c.send(fr)
            except (BrokenPipeError, ConnectionResetError):
                break       # the server failed fast and is gone already
    fails(c, 1007, srv, by)


def test_6_invalid_utf8_in_binary_message_is_not_a_close(server):
    srv, by = server()
    c = victim(srv)
    c.send_frame(OP_BINARY, with_text(b"\xff\xfe"))
    obj = c.recv_json()
    assert obj == PONG or (obj["event"] == "error" and obj["reason"] == "bad_json"), obj
    still_alive(c, by)


@pytest.mark.parametrize("where", ["first-fragment", "single-frame"])
def test_6_utf8_fail_fast(server, where):
    """The server closes 1007 on the first invalid byte, before the message (or even the
    frame) is complete (Autobahn 6.4.x)."""
    srv, by = server()
    c = victim(srv)
    head = b'{"action":"ping","x":"ok \xf4\x90'
    if where == "first-fragment":
        c.send_frame(OP_TEXT, head, fin=False)       # the rest of the message never comes
    else:
        key = b"\x11\x22\x33\x44"
        # a frame announcing 1000 bytes, of which only the first 30 are sent
        full = ws_frame(OP_TEXT, head + b"x" * (1000 - len(head)), mask_key=key)
        c.send(full[:4 + 4 + len(head)])
    fails(c, 1007, srv, by, timeout=3.0)


# --------------------------------------------------------------------------------------------
# 7.x Close handshake


VALID_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999]
INVALID_CODES = [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]


@pytest.mark.parametrize("code", VALID_CODES)
def test_7_close_code_echoed(server, code):
    srv, by = server()
    c = victim(srv)
    c.send_close(code, b"bye")
    f = fails(c, code, srv, by)
    assert f.close_code == code


@pytest.mark.parametrize("code", INVALID_CODES)
def test_7_invalid_close_code_is_1002(server, code):
    srv, by = server()
    c = victim(srv)
    c.send_frame(OP_CLOSE, struct.pack("!H", code))
    fails(c, 1002, srv, by)


def test_7_empty_close_answered(server):
    srv, by = server()
    c = victim(srv)
    c.send_frame(OP_CLOSE, b"")
    f = c.expect_close((None, 1000))   # an empty close, or 1000
    by.check()


def test_7_close_one_byte_payload_is_1002(server):
    srv, by = server()
    c = victim(srv)
    c.send_frame(OP_CLOSE, b"\x03")
    fails(c, 1002, srv, by)


@pytest.mark.parametrize("reason_len,code", [(0, 1000), (123, 1000)])
def test_7_close_reason_lengths(server, reason_len, code):
    srv, by = server()
    c = victim(srv)
    c.send_close(1000, b"r" * reason_len)
    fails(c, code, srv, by)


def test_7_close_payload_126_is_1002(server):
    srv, by = server()
    c = victim(srv)
    c.send_frame(OP_CLOSE, ws_close_payload(1000, b"r" * 124))
    fails(c, 1002, srv, by)


@pytest.mark.parametrize("reason", [b"\xff", b"abc\xed\xa0\x80", b"\xce"])
def test_7_close_reason_invalid_utf8_is_1007(server, reason):
    srv, by = server()
    c = victim(srv)
    c.send_close(1000, reason)
    fails(c, 1007, srv, by)


def test_7_close_reason_valid_utf8(server):
    srv, by = server()
    c = victim(srv)
    c.send_close(1000, "\u03ba\u1f79\u03c3\u03bc\u03b5 \U0001F600".encode())
    fails(c, 1000, srv, by)


@pytest.mark.parametrize("after", ["close", "ping", "text", "subscribe"])
def test_7_nothing_after_close(server, after):
    """Autobahn 7.1.2-7.1.4: what follows the client's close is ignored; the server sends its
    close and nothing else."""
    srv, by = server()
    c = victim(srv)
    follow = {"close": ws_frame(OP_CLOSE, ws_close_payload(1001)),
              "ping": ws_frame(OP_PING, b"after close"),
              "text": ws_frame(OP_TEXT, PING),
              "subscribe": ws_frame(OP_TEXT, b'{"action":"subscribe","topic":"x"}')}[after]
    c.send(ws_frame(OP_CLOSE, ws_close_payload(1000)) + follow)
    fails(c, 1000, srv, by)
    srv.publish("victim", "after the close")
    assert [f.opcode for f in c.frames] == [OP_BINARY, OP_BINARY, OP_CLOSE], c.frames


def test_7_no_data_frame_after_server_close_even_with_backlog(server):
    """A subscriber with queued output that gets closed (here: a protocol error) must get no
    data frame after the close frame, even if messages keep being published to its topic while
    the close is still being written."""
    srv, by = server("--max-output-bytes", str(64 << 20))
    c = RawWS(srv.addr, "/ws?topic=flood", rcvbuf=65536)
    c.handshake_done(["flood"])
    pub = RawHTTP(srv.addr)
    chunk = b"f" * 60000
    for i in range(200):           # ~12 MB: far more than the socket buffers hold
        r = pub.request("POST", "/publish?topic=flood", chunk)
        assert r.status == 200, r
    c.send_frame(OP_TEXT, PING, rsv=2)       # protocol error -> close 1002 queued behind them
    time.sleep(0.3)
    for i in range(20):                      # published after the close was queued
        r = pub.request("POST", "/publish?topic=flood", f"late-{i}".encode())
        assert r.status == 200, r
    pub.close()
    frames = c.frames_until_eof(timeout=30 * S)
    ops = [f.opcode for f in frames]
    assert OP_CLOSE in ops, f"no close frame; got {len(frames)} frames"
    after = frames[ops.index(OP_CLOSE) + 1:]
    assert after == [], (f"{len(after)} frame(s) after the close frame, first: {after[:2]!r}")
    assert frames[ops.index(OP_CLOSE)].close_code == 1002
    assert not any(f.payload.find(b"late-") >= 0 for f in frames if f.opcode == OP_BINARY)
    by.check()


def test_7_client_close_with_backlog_no_data_after_echo(server):
    srv, by = server("--max-output-bytes", str(64 << 20))
    c = RawWS(srv.addr, "/ws?topic=flood", rcvbuf=65536)
    c.handshake_done(["flood"])
    pub = RawHTTP(srv.addr)
    for i in range(200):
        assert pub.request("POST", "/publish?topic=flood", b"g" * 60000).status == 200
    c.send_close(1000, b"done")
    time.sleep(0.3)
    for i in range(20):
        assert pub.request("POST", "/publish?topic=flood", f"late-{i}".encode()).status == 200
    pub.close()
    frames = c.frames_until_eof(timeout=30 * S)
    ops = [f.opcode for f in frames]
    assert OP_CLOSE in ops, f"no close frame; got {len(frames)} frames"
    after = frames[ops.index(OP_CLOSE) + 1:]
    assert after == [], (f"{len(after)} frame(s) after the close frame, first: {after[:2]!r}")
    by.check()


# --------------------------------------------------------------------------------------------
# 9.x Big messages and the message size limit


@pytest.mark.timeout(180)
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY], ids=["text", "binary"])
@pytest.mark.parametrize("mode", ["one-frame", "frag-64k", "frag-4k", "chopped-1k"])
def test_9_big_messages_up_to_limit(server, opcode, mode):
    limit = 1 << 20
    srv, by = server("--max-message-size", str(limit))
    c = victim(srv)
    for size in (65536, 262144, limit):
        payload = pad_ping(size)
        if mode == "one-frame":
            c.send_frame(opcode, payload)
        elif mode == "chopped-1k":
            c.send_chopped(ws_frame(opcode, payload), 1024)
        else:
            step = 65536 if mode == "frag-64k" else 4096
            c.send(b"".join(frag(opcode, payload, [step] * ((size - 1) // step))))
        assert c.recv_json(timeout=30 * S) == PONG, (mode, size)
    still_alive(c, by)


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY], ids=["text", "binary"])
@pytest.mark.parametrize("mode", ["one-frame", "fragmented", "header-only", "huge-length",
                                  "fragmented-header-only"])
def test_9_over_limit_is_1009(server, opcode, mode):
    limit = 65536
    srv, by = server("--max-message-size", str(limit))
    c = victim(srv)
    payload = pad_ping(limit + 1)
    try:
        if mode == "one-frame":
            c.send_watching(ws_frame(opcode, payload))
        elif mode == "fragmented":
            c.send_watching(b"".join(frag(opcode, payload, [30000, 30000])))
        elif mode == "header-only":      # announce 1 MiB, send nothing of it: fail at once
            c.send(ws_frame(opcode, b"", length=1 << 20)[:2 + 8 + 4])
        elif mode == "huge-length":      # 2^62 bytes announced
            c.send(ws_frame(opcode, b"", length=1 << 62)[:2 + 8 + 4])
        else:                            # fragments within the limit, the sum over it
            c.send(ws_frame(opcode, payload[:limit], fin=False))
            c.send(ws_frame(OP_CONT, b"", length=10)[:2 + 4])
    except (BrokenPipeError, ConnectionResetError):
        pass
    fails(c, 1009, srv, by)


def test_9_length_with_msb_set_is_an_error(server):
    srv, by = server()
    c = victim(srv)
    c.send(bytes([0x81, 0x80 | 127]) + struct.pack("!Q", 1 << 63) + b"\x00\x00\x00\x00")
    fails(c, (1002, 1009), srv, by)


def test_9_publish_many_big_messages_to_ws(server):
    srv, by = server("--max-message-size", str(1 << 20), "--max-output-bytes", str(64 << 20))
    c = victim(srv)
    datas = [bytes([65 + i]) * (1 << 20) for i in range(8)]
    pub = RawHTTP(srv.addr)
    ids = []
    for d in datas:
        r = pub.request("POST", "/publish?topic=victim", d)
        assert r.status == 200
        ids.append(r.json_id())
    for d, mid in zip(datas, ids):
        obj = c.recv_json(timeout=30 * S)
        assert obj["id"] == mid and obj["data"] == d.decode(), obj["id"]
    pub.close()
    by.check()


# --------------------------------------------------------------------------------------------
# Masking


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY, OP_PING, OP_CLOSE],
                         ids=["text", "binary", "ping", "close"])
def test_unmasked_client_frame_is_1002(server, opcode):
    srv, by = server()
    c = victim(srv)
    payload = ws_close_payload(1000) if opcode == OP_CLOSE else PING
    c.send_frame(opcode, payload, mask=False)
    fails(c, 1002, srv, by)


def test_unmasked_continuation_is_1002(server):
    srv, by = server()
    c = victim(srv)
    c.send(ws_frame(OP_TEXT, PING[:4], fin=False) + ws_frame(OP_CONT, PING[4:], mask=False))
    fails(c, 1002, srv, by)


# --------------------------------------------------------------------------------------------
# The opening handshake


KEY = "dGhlIHNhbXBsZSBub25jZQ=="
UP = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": KEY,
      "Sec-WebSocket-Version": "13"}

HANDSHAKE_ERRORS = [
    # id, method, path, header changes (None = remove), version, status, extra header checks
    ("post", "POST", "/ws", {}, "HTTP/1.1", 405, {"allow": "GET"}),
    ("put", "PUT", "/ws", {}, "HTTP/1.1", 405, {"allow": "GET"}),
    ("no-upgrade", "GET", "/ws", {"Upgrade": None}, "HTTP/1.1", 426, {"upgrade": "websocket"}),
    ("no-connection", "GET", "/ws", {"Connection": None}, "HTTP/1.1", 426, {}),
    ("connection-keepalive-only", "GET", "/ws", {"Connection": "keep-alive"}, "HTTP/1.1", 426, {}),
    ("upgrade-h2c", "GET", "/ws", {"Upgrade": "h2c"}, "HTTP/1.1", 426, {}),
    ("plain-get", "GET", "/ws", {"Upgrade": None, "Connection": None,
                                 "Sec-WebSocket-Key": None, "Sec-WebSocket-Version": None},
     "HTTP/1.1", 426, {}),
    ("version-8", "GET", "/ws", {"Sec-WebSocket-Version": "8"}, "HTTP/1.1", 426,
     {"sec-websocket-version": "13"}),
    ("version-14", "GET", "/ws", {"Sec-WebSocket-Version": "14"}, "HTTP/1.1", 426,
     {"sec-websocket-version": "13"}),
    ("version-missing", "GET", "/ws", {"Sec-WebSocket-Version": None}, "HTTP/1.1", 426,
     {"sec-websocket-version": "13"}),
    ("version-13-junk", "GET", "/ws", {"Sec-WebSocket-Version": "13x"}, "HTTP/1.1", 426,
     {"sec-websocket-version": "13"}),
    ("key-missing", "GET", "/ws", {"Sec-WebSocket-Key": None}, "HTTP/1.1", 400, {}),
    ("key-short", "GET", "/ws", {"Sec-WebSocket-Key": "dGhlIHNhbXBsZQ=="}, "HTTP/1.1", 400, {}),
    ("key-long", "GET", "/ws", {"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZSBub25jZQ=="},
     "HTTP/1.1", 400, {}),
    ("key-not-base64", "GET", "/ws", {"Sec-WebSocket-Key": "!!!!!!!!!!!!!!!!!!!!!!=="},
     "HTTP/1.1", 400, {}),
    ("key-no-padding", "GET", "/ws", {"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQAA"},
     "HTTP/1.1", 400, {}),
    ("key-inner-padding", "GET", "/ws", {"Sec-WebSocket-Key": "dGhlIHNh=XBsZSBub25jZQ=="},
     "HTTP/1.1", 400, {}),
    ("key-empty", "GET", "/ws", {"Sec-WebSocket-Key": ""}, "HTTP/1.1", 400, {}),
    ("http-1.0", "GET", "/ws", {}, "HTTP/1.0", 400, {}),
    ("format-xml", "GET", "/ws?format=xml", {}, "HTTP/1.1", 400, {}),
    ("format-empty", "GET", "/ws?format=", {}, "HTTP/1.1", 400, {}),
    ("topic-empty", "GET", "/ws?topic=", {}, "HTTP/1.1", 400, {}),
    ("topic-space", "GET", "/ws?topic=a%20b", {}, "HTTP/1.1", 400, {}),
    ("topic-129", "GET", "/ws?topic=" + "t" * 129, {}, "HTTP/1.1", 400, {}),
    ("topic-nonascii", "GET", "/ws?topic=%C3%A9", {}, "HTTP/1.1", 400, {}),
    ("topic-nul", "GET", "/ws?topic=a%00b", {}, "HTTP/1.1", 400, {}),
    ("topic-quote", "GET", "/ws?topic=a%22b", {}, "HTTP/1.1", 400, {}),
    ("too-many-topics", "GET", "/ws?topic=a&topic=b&topic=c&topic=d", {}, "HTTP/1.1", 400, {}),
]


@pytest.mark.parametrize("case", HANDSHAKE_ERRORS, ids=[c[0] for c in HANDSHAKE_ERRORS])
def test_handshake_errors(pushletd, case):
    _, method, path, changes, version, status, checks = case
    srv = pushletd("--max-topics", "3")
    by = Bystanders(srv)
    hdrs = dict(UP)
    hdrs.update(changes)
    with RawHTTP(srv.addr) as c:
        c.send(pl.build_request(method, path, b"", {k: v for k, v in hdrs.items()
                                                    if v is not None}, srv.addr, version=version))
        r = c.read_response(timeout=5 * S)
        assert r.status == status, (r.status, r.headers, r.body)
        for k, v in checks.items():
            assert (r.header(k) or "").strip() == v, (k, r.headers)
        assert r.header("sec-websocket-accept") is None
        # the connection speaks no more HTTP after a failed upgrade: EOF
        assert c.wait_closed(5 * S) == b""
    st = srv.stats()
    assert st["ws_connections"] == 1, st     # the bystander only
    by.check()
    by.close()


@pytest.mark.parametrize("headers", [
    {"Upgrade": "WebSocket", "Connection": "keep-alive, Upgrade"},
    {"Upgrade": "websocket", "Connection": "upgrade"},
    {"Upgrade": "websocket", "Connection": "Upgrade,keep-alive"},
    {"Upgrade": "foo, websocket", "Connection": "UPGRADE"},
], ids=["mixed-case", "lower", "list", "upgrade-list"])
def test_handshake_header_variants_accepted(pushletd, headers):
    srv = pushletd()
    c = RawWS(srv.addr, "/ws?topic=a&topic=b&topic=c", headers=headers)
    assert c.response.header("upgrade").lower() == "websocket"
    assert "upgrade" in c.response.header("connection").lower()
    c.handshake_done(["a", "b", "c"])
    c.close()


def test_handshake_rfc_sample_key_and_max_topics(pushletd):
    srv = pushletd("--max-topics", "3")
    c = RawWS(srv.addr, "/ws?topic=a&topic=b&topic=c", key=KEY)
    # RFC 6455 section 1.3's worked example
    assert c.response.header("sec-websocket-accept") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert c.response.header("sec-websocket-protocol") is None
    c.handshake_done(["a", "b", "c"])
    c.send_cmd("subscribe", "d")
    obj = c.recv_json()
    assert obj["event"] == "error" and obj["reason"] == "too_many_topics" \
        and obj["topic"] == "d", obj
    c.close()


def test_handshake_64_topics_ok_65_rejected(pushletd):
    srv = pushletd()       # --max-topics defaults to 64
    q = "&".join(f"topic=t{i}" for i in range(64))
    c = RawWS(srv.addr, "/ws?" + q)
    c.handshake_done([f"t{i}" for i in range(64)])
    c.send_cmd("subscribe", "one-more")
    obj = c.recv_json()
    assert (obj["event"], obj["reason"]) == ("error", "too_many_topics"), obj
    c.close()
    c = RawWS(srv.addr, "/ws?" + q + "&topic=t64", expect=400)
    assert c.wait_eof(5 * S) == b""
    c.close()


def test_upgrade_after_keepalive_request_on_same_connection(pushletd):
    srv = pushletd()
    with RawHTTP(srv.addr) as h:
        r = h.request("GET", "/healthz")
        assert r.status == 200 and not r.wants_close()
        key = pl.ws_key()
        h.send(pl.build_request("GET", "/ws?topic=ka", b"", dict(UP, **{
            "Sec-WebSocket-Key": key}), srv.addr) + ws_frame(OP_TEXT, PING))
        r = h.read_response(head_only=True, allow_interim=True)
        assert r.status == 101 and r.header("sec-websocket-accept") == pl.ws_accept(key), r
        got = []
        deadline = time.monotonic() + 5 * S
        while len(got) < 3:
            f, used = pl.parse_server_frame(h.buf)
            if f is None:
                assert h._fill(deadline), "EOF"
                continue
            h.buf = h.buf[used:]
            got.append(f.json())
        assert got == [{"event": "connected", "data": "Connection established"},
                       pl.subscribed("ka"), PONG], got


def test_handshake_unknown_subprotocol_not_selected(pushletd):
    srv = pushletd()
    c = RawWS(srv.addr, "/ws", protocols=["chat", "superchat"])
    assert c.response.header("sec-websocket-protocol") is None
    c.handshake_done()
    c.close()


# --------------------------------------------------------------------------------------------
# permessage-deflate (RFC 7692)


def deflate(data: bytes) -> bytes:
    z = zlib.compressobj(6, zlib.DEFLATED, -15)
    out = z.compress(data) + z.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def inflate(data: bytes) -> bytes:
    return zlib.decompressobj(-15).decompress(data + b"\x00\x00\xff\xff")


def deflate_victim(srv, offer="permessage-deflate"):
    c = RawWS(srv.addr, "/ws?topic=victim", headers={"Sec-WebSocket-Extensions": offer})
    ext = c.response.header("sec-websocket-extensions")
    assert ext is not None and ext.split(";")[0].strip().lower() == "permessage-deflate", \
        (offer, c.response.headers)
    c.handshake_done(["victim"])
    return c


@pytest.mark.parametrize("offer,accepted", [
    ("permessage-deflate", True),
    ("permessage-deflate; client_max_window_bits", True),
    ("permessage-deflate; server_no_context_takeover; client_no_context_takeover", True),
    ("permessage-deflate; server_max_window_bits=15", True),
    ("permessage-deflate; server_max_window_bits=10", False),
    ("permessage-deflate; unknown_param", False),
    ("permessage-deflate; server_max_window_bits=10, permessage-deflate", True),
    ("x-webkit-deflate-frame", False),
    ("foo, bar; baz=1", False),
], ids=["plain", "client-bits", "no-takeover", "server-bits-15", "server-bits-10",
        "unknown-param", "second-offer", "webkit", "unknown-ext"])
def test_deflate_negotiation(server, offer, accepted):
    srv, by = server()
    c = RawWS(srv.addr, "/ws?topic=victim", headers={"Sec-WebSocket-Extensions": offer})
    ext = c.response.header("sec-websocket-extensions")
    if accepted:
        assert ext is not None, c.response.headers
        parts = [p.strip() for p in ext.split(";")]
        assert parts[0] == "permessage-deflate" and "," not in ext, ext
        for p in parts[1:]:
            assert p in ("server_no_context_takeover", "client_no_context_takeover") or \
                p.startswith("server_max_window_bits=15") or \
                (p.startswith("client_max_window_bits") and "client_max_window_bits" in offer), p
    else:
        assert ext is None, c.response.headers
    c.handshake_done(["victim"])
    if not accepted:     # then RSV1 stays an error
        c.send_frame(OP_TEXT, deflate(PING), rsv=4)
        fails(c, 1002, srv, by)
    else:
        still_alive(c, by)


def test_deflate_not_negotiated_without_offer(server):
    srv, by = server()
    c = victim(srv)
    assert c.response.header("sec-websocket-extensions") is None
    c.send_frame(OP_TEXT, deflate(PING), rsv=4)
    fails(c, 1002, srv, by)


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY], ids=["text", "binary"])
@pytest.mark.parametrize("mode", ["one-frame", "fragmented", "chopped", "with-ping",
                                  "big"])
def test_deflate_compressed_commands(server, opcode, mode):
    srv, by = server()
    c = deflate_victim(srv)
    cmd = json.dumps({"action": "subscribe", "topic": "dz"}).encode()
    if mode == "big":
        cmd = json.dumps({"action": "subscribe", "topic": "dz", "p": "q" * 60000}).encode()
    z = deflate(cmd)
    if mode in ("one-frame", "big"):
        c.send_frame(opcode, z, rsv=4)
    elif mode == "chopped":
        c.send_chopped(ws_frame(opcode, z, rsv=4), 1)
    else:
        # RSV1 on the first fragment only
        frames = [ws_frame(opcode, z[:3], fin=False, rsv=4), ws_frame(OP_CONT, z[3:6], fin=False),
                  ws_frame(OP_CONT, z[6:], fin=True)]
        if mode == "with-ping":
            frames.insert(1, ws_frame(OP_PING, b"mid"))
        c.send(b"".join(frames))
        if mode == "with-ping":
            f = c.recv_frame()
            assert (f.opcode, f.payload) == (OP_PONG, b"mid"), f
    assert c.recv_json() == pl.subscribed("dz")
    # uncompressed messages stay allowed on the same connection
    c.send_frame(OP_TEXT, PING)
    assert c.recv_json() == PONG
    # server messages: large ones compressed (RSV1), every one intact
    big = ("deflate me " * 1000).encode()
    mid = srv.publish("dz", big)
    f = c.recv_frame()
    assert f.opcode == OP_BINARY and f.rsv == 4, f
    obj = json.loads(inflate(f.payload))
    assert (obj["id"], obj["data"]) == (mid, big.decode()), obj["id"]
    still_alive(c, by)


def test_deflate_message_with_bfinal_block(server):
    """A client may end the compressed data with a final block (then no 00 00 ff ff tail)."""
    srv, by = server()
    c = deflate_victim(srv)
    z = zlib.compressobj(6, zlib.DEFLATED, -15)
    data = z.compress(PING) + z.flush(zlib.Z_FINISH)
    c.send_frame(OP_TEXT, data, rsv=4)
    assert c.recv_json() == PONG
    still_alive(c, by)


@pytest.mark.parametrize("case", ["garbage", "bad-block-type", "truncated-stored"])
def test_deflate_corrupt_data_is_1007(server, case):
    srv, by = server()
    c = deflate_victim(srv)
    payload = {"garbage": b"\xff\xff\xff\xff\xff\xff",
               "bad-block-type": b"\x07\x00",                   # BTYPE=11 (reserved)
               "truncated-stored": b"\x00\x05\x00\xfa\xffab"}[case]   # LEN/NLEN fine, data short
    c.send_frame(OP_TEXT, payload, rsv=4)
    if case == "truncated-stored":
        # an incomplete stored block is not an error in itself: either 1007 or nothing decoded
        # into an incomplete command (then a bad_json error reply)
        f = c.recv_frame()
        if f.opcode == OP_CLOSE:
            assert f.close_code in (1007, 1002), f
            assert c.wait_eof(5 * S) == b""
        else:
            obj = f.json()
            assert obj["event"] == "error" and obj["reason"] == "bad_json", obj
        by.check()
        return
    fails(c, 1007, srv, by)


def test_deflate_compressed_invalid_utf8_text_is_1007(server):
    srv, by = server()
    c = deflate_victim(srv)
    c.send_frame(OP_TEXT, deflate(with_text(b"\xed\xa0\x80")), rsv=4)
    fails(c, 1007, srv, by)


@pytest.mark.parametrize("size", [65537, 10 << 20])
def test_deflate_bomb_is_1009(server, size):
    """A small compressed message that inflates past --max-message-size: 1009, fast."""
    srv, by = server("--max-message-size", "65536")
    c = deflate_victim(srv)
    z = deflate(pad_ping(size))
    assert len(z) < 65536
    c.send_frame(OP_TEXT, z, rsv=4)
    fails(c, 1009, srv, by)


def test_deflate_exactly_at_limit_accepted(server):
    srv, by = server("--max-message-size", "65536")
    c = deflate_victim(srv)
    c.send_frame(OP_BINARY, deflate(pad_ping(65536)), rsv=4)
    assert c.recv_json() == PONG
    still_alive(c, by)


@pytest.mark.parametrize("opcode", [OP_PING, OP_CLOSE], ids=["ping", "close"])
def test_deflate_rsv1_on_control_is_1002(server, opcode):
    srv, by = server()
    c = deflate_victim(srv)
    c.send_frame(opcode, ws_close_payload(1000) if opcode == OP_CLOSE else b"p", rsv=4)
    fails(c, 1002, srv, by)


def test_deflate_rsv1_on_continuation_is_1002(server):
    srv, by = server()
    c = deflate_victim(srv)
    z = deflate(PING)
    c.send(ws_frame(OP_TEXT, z[:3], fin=False, rsv=4) + ws_frame(OP_CONT, z[3:], rsv=4))
    fails(c, 1002, srv, by)


@pytest.mark.parametrize("rsv", [2, 1, 6])
def test_deflate_other_rsv_bits_still_1002(server, rsv):
    srv, by = server()
    c = deflate_victim(srv)
    c.send_frame(OP_TEXT, PING, rsv=rsv)
    fails(c, 1002, srv, by)


def test_deflate_msgpack_replies_are_msgpack(server):
    """With permessage-deflate and MessagePack, every frame (replies included) is MessagePack."""
    msgpack = pytest.importorskip("msgpack")
    srv, by = server()
    c = RawWS(srv.addr, "/ws?topic=victim&format=msgpack",
              headers={"Sec-WebSocket-Extensions": "permessage-deflate"})
    assert c.response.header("sec-websocket-extensions") is not None
    frames = [c.recv_frame(), c.recv_frame()]
    objs = []
    for f in frames:
        payload = inflate(f.payload) if f.rsv == 4 else f.payload
        try:
            objs.append(msgpack.unpackb(payload, raw=False))
        except Exception as e:  # noqa: BLE001
            raise AssertionError(f"reply is not MessagePack: {payload[:80]!r} ({e})") from None
    assert objs == [{"event": "connected", "data": "Connection established"},
                    pl.subscribed("victim")], objs
    big = b"m" * 5000
    mid = srv.publish("victim", big)
    f = c.recv_frame()
    obj = msgpack.unpackb(inflate(f.payload) if f.rsv == 4 else f.payload, raw=False)
    assert (obj["id"], obj["data"]) == (mid, big.decode())
    by.check()


# --------------------------------------------------------------------------------------------
# The subscription protocol: bad input gets an error reply, and the connection lives on


T129 = "t" * 129
BAD_COMMANDS = [
    # id, payload, reason, topic expected in the reply (or None)
    ("not-json", b"not json", "bad_json", None),
    ("truncated", b'{"action":"subscribe","topic":"a"', "bad_json", None),
    ("empty", b"", "bad_json", None),
    ("whitespace", b"   \n\t ", "bad_json", None),
    ("array", b'["subscribe","a"]', "bad_json", None),
    ("string", b'"subscribe"', "bad_json", None),
    ("number", b"42", "bad_json", None),
    ("null", b"null", "bad_json", None),
    ("true", b"true", "bad_json", None),
    ("deep-array", b"[" * 5000 + b"]" * 5000, "bad_json", None),
    ("deep-object", b'{"a":' * 3000 + b"1" + b"}" * 3000, None, None),
    # cJSON takes any byte <= 0x20 (NUL included) as whitespace: lenient, harmless
    ("nul-byte", b'{"action":"ping"\x00}', "lenient", None),
    ("empty-object", b"{}", "missing_action", None),
    ("topic-only", b'{"topic":"a"}', "missing_action", None),
    ("action-number", b'{"action":1,"topic":"a"}', "missing_action", None),
    ("action-null", b'{"action":null}', "missing_action", None),
    ("action-object", b'{"action":{"x":"subscribe"}}', "missing_action", None),
    ("unknown", b'{"action":"publish","topic":"a"}', "unknown_action", None),
    ("uppercase", b'{"action":"SUBSCRIBE","topic":"a"}', "unknown_action", None),
    ("empty-action", b'{"action":""}', "unknown_action", None),
    ("sub-no-topic", b'{"action":"subscribe"}', "missing_topic", None),
    ("unsub-no-topic", b'{"action":"unsubscribe"}', "missing_topic", None),
    ("topic-number", b'{"action":"subscribe","topic":123}', "missing_topic", None),
    ("topic-float", b'{"action":"subscribe","topic":1.5e300}', "missing_topic", None),
    ("topic-null", b'{"action":"subscribe","topic":null}', "missing_topic", None),
    ("topic-array", b'{"action":"subscribe","topic":["a"]}', "missing_topic", None),
    ("topic-bool", b'{"action":"unsubscribe","topic":true}', "missing_topic", None),
    ("topic-empty", b'{"action":"subscribe","topic":""}', "invalid_topic", None),
    ("topic-space", b'{"action":"subscribe","topic":"a b"}', "invalid_topic", None),
    ("topic-129", b'{"action":"subscribe","topic":"' + T129.encode() + b'"}', "invalid_topic",
     None),
    ("topic-unicode", '{"action":"subscribe","topic":"t\u00e9"}'.encode(), "invalid_topic", None),
    ("topic-quote", b'{"action":"subscribe","topic":"a\\"b"}', "invalid_topic", None),
    ("topic-newline", b'{"action":"subscribe","topic":"a\\nb"}', "invalid_topic", None),
    ("topic-escaped-nul", b'{"action":"subscribe","topic":"a\\u0000b"}', "invalid_topic", None),
    ("unsub-invalid", b'{"action":"unsubscribe","topic":"<script>"}', "invalid_topic", None),
]


@pytest.mark.parametrize("case", BAD_COMMANDS, ids=[c[0] for c in BAD_COMMANDS])
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY], ids=["text", "binary"])
def test_bad_commands(server, case, opcode):
    _, payload, reason, topic = case
    srv, by = server()
    c = victim(srv)
    c.send_frame(opcode, payload)
    obj = c.recv_json()
    if reason is None:    # too deep to parse, or parsed and no action: either error is fine
        assert obj["event"] == "error" and obj["reason"] in ("bad_json", "missing_action"), obj
    elif reason == "lenient":
        assert obj == PONG or (obj["event"] == "error" and obj["reason"] == "bad_json"), obj
    else:
        assert obj["event"] == "error" and obj["reason"] == reason, obj
        assert isinstance(obj.get("data"), str) and obj["data"], obj
        if topic is None:
            assert "topic" not in obj or obj["topic"] in ("",), obj
    # the error subscribed to nothing: stats unchanged, and the connection is fine
    st = srv.stats()
    # victim + the bystanders (WS and SSE, one topic)
    assert st["subscriptions"] == 3 and st["topics"] == 2, st
    still_alive(c, by)


def test_topic_128_chars_accepted(server):
    srv, by = server()
    c = victim(srv)
    t = "T" * 128
    c.send_cmd("subscribe", t)
    assert c.recv_json() == pl.subscribed(t)
    mid = srv.publish(t, "long topic")
    obj = c.recv_json()
    assert (obj["topic"], obj["id"], obj["data"]) == (t, mid, "long topic")
    every = "AZaz09-_.:/@~!+="
    c.send_cmd("subscribe", every)
    assert c.recv_json() == pl.subscribed(every)
    still_alive(c, by)


def test_huge_command_with_padding(server):
    srv, by = server()
    c = victim(srv)
    # 60 KB of whitespace around a valid command, and a big ignored field
    c.send_frame(OP_TEXT, b" " * 30000 + b'{"action":"subscribe","topic":"h"}' + b"\n" * 30000)
    assert c.recv_json() == pl.subscribed("h")
    c.send_cmd("unsubscribe", "h", extra=["x" * 100] * 500)
    assert c.recv_json() == {"event": "unsubscribed", "topic": "h"}
    c.send_frame(OP_TEXT, b'{"action":"ping","nested":' + b"[" * 200 + b"]" * 200 + b"}")
    assert c.recv_json() == PONG
    still_alive(c, by)


def test_too_many_topics(server):
    srv, by = server("--max-topics", "3")
    c = RawWS(srv.addr, "/ws?topic=a&topic=b")
    c.handshake_done(["a", "b"])
    c.send_cmd("subscribe", "c")
    assert c.recv_json() == pl.subscribed("c")
    for t in ("d", "e"):
        c.send_cmd("subscribe", t)
        obj = c.recv_json()
        assert obj["event"] == "error" and obj["reason"] == "too_many_topics" \
            and obj["topic"] == t and obj["data"], obj
    # resubscribing to a topic already held is not a new topic
    c.send_cmd("subscribe", "a")
    assert c.recv_json() == pl.subscribed("a")
    # nothing from the refused topic
    srv.publish("d", "refused")
    still_alive(c)
    # room again after an unsubscribe
    c.send_cmd("unsubscribe", "b")
    assert c.recv_json() == {"event": "unsubscribed", "topic": "b"}
    c.send_cmd("subscribe", "d")
    assert c.recv_json() == pl.subscribed("d")
    mid = srv.publish("d", "now allowed")
    obj = c.recv_json()
    assert (obj["topic"], obj["id"]) == ("d", mid)
    st = srv.stats()
    assert st["subscriptions"] == 5, st      # a c d + the 2 bystanders
    still_alive(c, by)


def test_subscribe_twice_delivers_once(server):
    srv, by = server()
    c = victim(srv)
    for _ in range(2):
        c.send_cmd("subscribe", "dup")
        assert c.recv_json() == pl.subscribed("dup")
    c.send_cmd("subscribe", "victim")
    assert c.recv_json() == pl.subscribed("victim")
    m1 = srv.publish("dup", "once")
    m2 = srv.publish("victim", "once too")
    assert [c.recv_json()["id"] for _ in range(2)] == [m1, m2]
    still_alive(c)   # no duplicate pending
    # one unsubscribe is enough, the second is an error
    c.send_cmd("unsubscribe", "dup")
    assert c.recv_json() == {"event": "unsubscribed", "topic": "dup"}
    c.send_cmd("unsubscribe", "dup")
    obj = c.recv_json()
    assert (obj["event"], obj["reason"], obj["topic"]) == ("error", "not_subscribed", "dup")
    srv.publish("dup", "gone")
    still_alive(c, by)


def test_unsubscribe_unknown_topics(server):
    srv, by = server()
    c = victim(srv)
    for t in ("never", "bystander"):   # "bystander" exists, but not on this connection
        c.send_cmd("unsubscribe", t)
        obj = c.recv_json()
        assert (obj["event"], obj["reason"], obj["topic"]) == ("error", "not_subscribed", t), obj
    by.check()       # the bystander's own subscription is untouched
    still_alive(c, by)


def test_extra_fields_and_key_order_ignored(server):
    srv, by = server()
    c = victim(srv)
    c.send_frame(OP_TEXT, b'{"topic":"k","x":{"y":[1,2,3]},"action":"subscribe","z":null}')
    assert c.recv_json() == pl.subscribed("k")
    c.send_frame(OP_TEXT, b'{ "action" : "ping" , "topic" : 5 }')
    assert c.recv_json() == PONG
    still_alive(c, by)
