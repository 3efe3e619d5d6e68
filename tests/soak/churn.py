#!/usr/bin/env python3
"""Soak / churn test for pushletd: open and drop many connections in every way while
publishing, then check that the server gives everything back.

Starts pushletd on 127.0.0.1:0, warms it up, records its RSS (/proc/PID/status VmRSS), open
fds (/proc/PID/fd) and /stats, then opens --connections connections in waves from several
client processes (SSE subscribers with one or several topics, SSE resumes, WebSocket clients
that subscribe and unsubscribe continuously, connections dropped mid-request-head, mid-
WebSocket-handshake, mid-frame and mid-body, abrupt resets with output queued) while a
keep-alive publisher publishes throughout. After the last wave it waits for the server to
settle and checks: fds back to the baseline, RSS within --rss-slack-mib of the baseline, /stats
connections/subscriptions back to zero and topics/history back to the baseline, the server
still serves a subscriber, SIGTERM exits 0, and (ASan builds) no sanitizer report on stderr.

Only the standard library; every loop is bounded in count and time. Exit status: 0 pass,
1 a check failed, 2 could not run (usage, server did not start). See tests/soak/README.md.
"""

import argparse
import asyncio
import base64
import collections
import json
import multiprocessing
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

HOST = "127.0.0.1"
FD_LIMIT = 20000            # per process on the target machine (hard limit)
CLIENT_FD_BUDGET = 15000    # never hold more client sockets than this, all workers together
SANITIZER_RE = re.compile(r"Sanitizer|runtime error:")
VALGRIND = ("valgrind", "--leak-check=full", "--errors-for-leak-kinds=definite,indirect",
            "--show-leak-kinds=definite,indirect", "--error-exitcode=99", "--num-callers=30")

# Connection kinds and their share of each wave (percent).
KINDS = {
    "sse": 14,                # one topic, reads until the wave ends, clean close (FIN)
    "sse_multi": 10,          # 2-4 topics
    "sse_resume": 10,         # Last-Event-ID / ?last_event_id= with a seen id, or a junk header
    "ws": 18,                 # WebSocket, subscribe/unsubscribe loop, close handshake or FIN
    "ws_resume": 6,           # WebSocket subscribe with "since" (a seen id)
    "drop_head": 8,           # request head cut anywhere, then FIN or RST
    "drop_ws_handshake": 8,   # upgrade head cut, or complete but closed before the 101 is read
    "drop_mid_frame": 8,      # upgraded, then a partial masked client frame, FIN or RST
    "drop_publish": 6,        # publish body cut short, or complete and reset before the answer
    "reset": 12,              # subscriber that stops reading (tiny rcvbuf), then RST or FIN
}
# Besides the mix, each worker's wave has SLOW_PER_WAVE "slow" subscribers on FLOOD_TOPIC that
# never read (4 KiB receive buffer). Once they are connected the worker floods the topic: first
# FLOOD_1 messages, enough to fill the kernel buffers (~3 MB here) and queue output inside the
# server, then half of them (SSE and WebSocket alike) reset with that output queued; then FLOOD_2
# more, which takes the rest past --max-output-bytes (1 MiB): the server must drop them as slow
# consumers (the WebSocket ones may go first for not answering pings).
SLOW_PER_WAVE = 4
FLOOD_TOPIC = "soak.flood"
FLOOD_SIZE = 60000        # under the default --max-message-size (65536)
FLOOD_1, FLOOD_2 = 55, 40
MAX_OUTPUT_BYTES = 1 << 20

N_TOPICS = 32
TOPICS = [f"soak.{i}" for i in range(N_TOPICS)]
BIG_TOPIC = "soak.big"
BIG_SIZE = 16384


def topic_payload_size(topic):
    """Fixed payload size per topic, so history bytes are comparable before and after."""
    if topic == BIG_TOPIC:
        return BIG_SIZE
    if topic == FLOOD_TOPIC:
        return FLOOD_SIZE
    return 40 + 37 * (int(topic.rsplit(".", 1)[1]) % 8)


# ---- small blocking HTTP client (main process) ---------------------------------------------

def http_request(addr, method, path, body=b"", headers=None, timeout=10.0):
    """One request on a fresh connection; returns (status, body bytes)."""
    with socket.create_connection(addr, timeout=timeout) as s:
        h = {"Host": f"{addr[0]}:{addr[1]}", "Connection": "close",
             "Content-Length": str(len(body))}
        h.update(headers or {})
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items())
        s.sendall(head.encode() + b"\r\n" + body)
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 "):
        raise RuntimeError(f"bad response to {method} {path}: {data[:200]!r}")
    return int(head.split()[1]), rest


def get_stats(addr):
    status, body = http_request(addr, "GET", "/stats")
    if status != 200:
        raise RuntimeError(f"/stats answered {status}")
    # Keys may repeat while the server is being extended; the last one wins, which is harmless.
    return json.loads(body)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
              6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN",
              11: "CLOSING"}


def fd_table(pid):
    """fd -> what it is; sockets with their TCP addresses and state (for a leak report)."""
    tcp = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                for line in list(f)[1:]:
                    col = line.split()
                    def addr(a):
                        h, port = a.split(":")
                        ip = ".".join(str(b) for b in reversed(bytes.fromhex(h))) \
                            if len(h) == 8 else h
                        return f"{ip}:{int(port, 16)}"
                    tcp[col[9]] = (f"{addr(col[1])} -> {addr(col[2])} "
                                   f"{TCP_STATES.get(int(col[3], 16), col[3])}")
        except OSError:
            pass
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        m = re.match(r"socket:\[(\d+)\]", target)
        if m and m.group(1) in tcp:
            target += " " + tcp[m.group(1)]
        out[int(fd)] = target
    return out


# ---- the server ----------------------------------------------------------------------------

class Server:
    def __init__(self, binary, args, scale, wrapper=()):
        self.binary = binary
        self.scale = scale
        self.errf = tempfile.NamedTemporaryFile(prefix="pushletd-soak-", suffix=".log",
                                                delete=False)
        env = dict(os.environ)
        env.setdefault("ASAN_OPTIONS", "detect_leaks=1")
        self.argv = list(wrapper) + [binary, "--listen", f"{HOST}:0"] + args
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self.errf, env=env)
        self.addr = None
        deadline = time.monotonic() + 15 * scale
        while time.monotonic() < deadline and self.proc.poll() is None:
            m = re.search(r"pushletd: listening on http://([0-9.]+):(\d+)", self.stderr())
            if m:
                self.addr = (m.group(1), int(m.group(2)))
                break
            time.sleep(0.05)
        if self.addr is None:
            self.kill()
            raise RuntimeError("pushletd did not start:\n" + self.stderr()[-4000:])

    @property
    def pid(self):
        return self.proc.pid

    def stderr(self):
        with open(self.errf.name, "r", errors="replace") as f:
            return f.read()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


# ---- WebSocket helpers ---------------------------------------------------------------------

def ws_key():
    return base64.b64encode(os.urandom(16)).decode()


def ws_upgrade_request(addr, path):
    return (f"GET {path} HTTP/1.1\r\nHost: {addr[0]}:{addr[1]}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {ws_key()}\r\n"
            f"Sec-WebSocket-Version: 13\r\n\r\n").encode()


def mask_bytes(data, mask):
    n = len(data)
    if n == 0:
        return b""
    m = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(m, "big")).to_bytes(n, "big")


def ws_frame(opcode, payload, fin=True):
    """A masked client frame."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        head = struct.pack("!BB", b0, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", b0, 0x80 | 127, n)
    mask = os.urandom(4)
    return head + mask + mask_bytes(payload, mask)


def events_path(topics, **query):
    q = [("topic", t) for t in topics] + list(query.items())
    return "/events?" + "&".join(f"{k}={v}" for k, v in q)


# ---- client worker process ----------------------------------------------------------------

class ClientError(Exception):
    """The server answered something it should not have."""


class ServerClosed(Exception):
    """The server ended a connection (EOF or reset, no close frame) before the client did."""


class Wave:
    """One wave of connections in one worker process."""

    def __init__(self, addr, n, seed, opts, known):
        self.addr = addr
        self.n = n
        self.rng = random.Random(seed)
        self.opts = opts
        self.known = known            # resume positions seen so far, kept across waves
        self.count = collections.Counter()
        self.errors = []
        self.early = []
        self.end = asyncio.Event()
        self.all_opened = asyncio.Event()
        self.opened = 0
        self.open_socks = 0
        self.peak_socks = 0
        self.setup_sem = asyncio.Semaphore(opts["inflight"])
        self.fd_sem = asyncio.Semaphore(opts["fd_cap"])
        self.t = opts["scale"]
        self.slow = []            # state of the "slow" subscribers, for the flood

    def error(self, kind, what):
        self.count["errors"] += 1
        if len(self.errors) < 20:
            self.errors.append(f"{kind}: {what}")

    # -- sockets --
    async def connect(self, rcvbuf=None):
        await self.fd_sem.acquire()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.open_socks += 1
        self.peak_socks = max(self.peak_socks, self.open_socks)
        try:
            if rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, self.addr),
                                   10 * self.t)
            reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
        except BaseException:
            sock.close()
            self.release()
            raise
        return reader, writer

    def release(self):
        self.open_socks -= 1
        self.fd_sem.release()

    async def close(self, writer, rst=False):
        try:
            if rst:
                if not writer.transport.is_closing():
                    writer.get_extra_info("socket").setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            else:
                writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 5 * self.t)
            except (OSError, asyncio.TimeoutError):
                pass
        finally:
            self.release()

    async def read_head(self, reader, kind):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10 * self.t)
        try:
            status = int(head.split(b" ", 2)[1])
        except (IndexError, ValueError):
            raise ClientError(f"bad response head {head[:80]!r}")
        return status, head

    # -- the wave --
    def plan(self):
        kinds = []
        for k, w in KINDS.items():
            kinds += [k] * (self.n * w // 100)
        while len(kinds) < self.n:
            kinds.append(self.rng.choice(list(KINDS)))
        self.rng.shuffle(kinds)
        nslow = min(SLOW_PER_WAVE, self.n // 50)
        return kinds[: self.n - nslow] + ["slow"] * nslow

    async def run(self):
        start = time.monotonic()
        kinds = self.plan()
        tasks = [asyncio.create_task(self.guarded(k, i)) for i, k in enumerate(kinds)]
        try:
            await asyncio.wait_for(self.all_opened.wait(), self.opts["open_timeout"])
        except asyncio.TimeoutError:
            self.error("wave", f"only {self.opened}/{self.n} connections set up in time")
        t_opened = time.monotonic()
        hold = asyncio.create_task(asyncio.sleep(self.opts["hold"]))
        if self.slow:
            try:
                await asyncio.wait_for(self.flood(), 30 * self.t)
            except (asyncio.TimeoutError, OSError, ClientError) as e:
                self.error("flood", f"{type(e).__name__}: {e}")
        await hold
        self.end.set()
        done, pending = await asyncio.wait(tasks, timeout=30 * self.t)
        for t in pending:
            t.cancel()
        if pending:
            self.error("wave", f"{len(pending)} connections did not finish after the wave end")
            await asyncio.wait(pending, timeout=5)
        return {"count": dict(self.count), "errors": self.errors, "early": self.early,
                "open_s": t_opened - start, "total_s": time.monotonic() - start,
                "peak_socks": self.peak_socks, "leftover_socks": self.open_socks}

    async def guarded(self, kind, i):
        await self.setup_sem.acquire()
        state = {"released": False}

        def opened():
            if not state["released"]:
                state["released"] = True
                self.setup_sem.release()
                self.opened += 1
                if self.opened == self.n:
                    self.all_opened.set()

        self.count["conn:" + kind] += 1
        try:
            await getattr(self, "k_" + kind)(opened, i)
        except ClientError as e:
            self.error(kind, str(e))
        except ServerClosed as e:
            # Accounted for in main(): WebSocket clients may miss a ping deadline when the
            # client processes starve; SSE has no such deadline.
            self.count["closed_early:" + kind] += 1
            if len(self.errors) < 20:
                self.early.append(f"{kind}: {e}")
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, OSError) as e:
            self.error(kind, f"{type(e).__name__}: {e}")
        finally:
            opened()

    # -- SSE --
    async def sse_subscribe(self, kind, topics, headers=None, query=None, rcvbuf=None):
        reader, writer = await self.connect(rcvbuf)
        try:
            h = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
            writer.write(f"GET {events_path(topics, **(query or {}))} HTTP/1.1\r\n"
                         f"Host: {self.addr[0]}\r\nAccept: text/event-stream\r\n{h}\r\n"
                         .encode())
            status, _ = await self.read_head(reader, kind)
            if status != 200:
                raise ClientError(f"GET /events answered {status}")
            # The first event is "connected" (the new format puts its start cursor in id:).
            for _ in range(4):
                block = await asyncio.wait_for(reader.readuntil(b"\n\n"), 10 * self.t)
                if b"event: connected" in block:
                    self.note_id(tuple(topics), block)
                    return reader, writer
            raise ClientError("no connected event")
        except BaseException:
            await self.close(writer, rst=True)
            raise

    def note_id(self, key, chunk):
        i = chunk.rfind(b"id: ")
        if i >= 0 and (i == 0 or chunk[i - 1:i] == b"\n"):
            j = chunk.find(b"\n", i)
            if j > 0:
                self.known[key] = chunk[i + 4:j].decode()

    async def sse_hold(self, kind, topics, reader, writer):
        """Read until the wave ends; the server closing first is an error."""
        key = tuple(topics)

        async def read_loop():
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return "eof"
                self.count["sse_bytes"] += len(chunk)
                self.count["sse_events"] += chunk.count(b"\n\n")
                self.note_id(key, chunk)

        rt = asyncio.create_task(read_loop())
        end = asyncio.create_task(self.end.wait())
        await asyncio.wait([rt, end], return_when=asyncio.FIRST_COMPLETED)
        end.cancel()
        if rt.done():
            exc = rt.exception()
            await self.close(writer, rst=True)
            raise ServerClosed(f"stream ended early ({exc or 'eof'})")
        rt.cancel()
        try:
            await rt
        except (asyncio.CancelledError, OSError):
            pass
        await self.close(writer, rst=self.rng.random() < 0.2)

    def some_topics(self, lo, hi):
        return self.rng.sample(TOPICS, self.rng.randint(lo, hi))

    async def k_sse(self, opened, i):
        topics = self.some_topics(1, 1)
        reader, writer = await self.sse_subscribe("sse", topics)
        opened()
        await self.sse_hold("sse", topics, reader, writer)

    async def k_sse_multi(self, opened, i):
        # A few fixed topic lists, so their cursors get reused by sse_resume.
        topics = [TOPICS[(i + j * 5) % N_TOPICS] for j in range(2 + i % 3)][: 2 + i % 3]
        topics = sorted(set(topics), key=topics.index)
        if i % 7 == 0:
            topics.append(f"u.{os.getpid()}.{i}")   # a topic nobody publishes to: must be freed
        reader, writer = await self.sse_subscribe("sse_multi", topics)
        opened()
        await self.sse_hold("sse_multi", topics, reader, writer)

    async def k_sse_resume(self, opened, i):
        keys = [k for k in self.known if all(t in TOPICS for t in k)]
        variant = i % 4
        if not keys or variant == 3:
            # Junk Last-Event-ID header: must degrade to a gap, never to an error answer.
            topics, headers, query = self.some_topics(1, 3), {"Last-Event-ID": "zz!junk"}, None
            self.count["resume:junk_header"] += 1
        else:
            key = self.rng.choice(keys)
            topics, cursor = list(key), self.known[key]
            if variant == 2:
                headers, query = None, {"last_event_id": cursor}
                self.count["resume:query"] += 1
            else:
                headers, query = {"Last-Event-ID": cursor}, None
                self.count["resume:header"] += 1
        reader, writer = await self.sse_subscribe("sse_resume", topics, headers, query)
        opened()
        await self.sse_hold("sse_resume", topics, reader, writer)

    # -- WebSocket --
    async def ws_open(self, kind, path="/ws", rcvbuf=None):
        reader, writer = await self.connect(rcvbuf)
        try:
            writer.write(ws_upgrade_request(self.addr, path))
            status, _ = await self.read_head(reader, kind)
            if status != 101:
                raise ClientError(f"GET {path} answered {status}")
            return reader, writer
        except BaseException:
            await self.close(writer, rst=True)
            raise

    async def ws_reader(self, reader, writer, replies, kind):
        """Parse server frames; answer pings; queue command replies; count the rest."""
        frag = b""
        for _ in range(10 ** 7):
            h = await reader.readexactly(2)
            op, n = h[0] & 0x0F, h[1] & 0x7F
            if h[1] & 0x80:
                raise ClientError("masked server frame")
            if n == 126:
                n = struct.unpack("!H", await reader.readexactly(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", await reader.readexactly(8))[0]
            payload = await reader.readexactly(n)
            if op == 0x9:
                writer.write(ws_frame(0xA, payload))
                self.count["ws_pings"] += 1
                continue
            if op == 0x8:
                replies.put_nowait({"event": "_close", "payload": payload})
                return
            if op == 0xA:
                continue
            frag += payload
            if not h[0] & 0x80:
                continue
            msg, frag = frag, b""
            if b'"event":"message"' in msg[:200] or b'"event":"message"' in msg:
                self.count["ws_messages"] += 1
                m = re.search(rb'"topic":"([^"]+)".*?"id":"([^"]+)"', msg)
                if m:
                    self.known[("ws", m.group(1).decode())] = m.group(2).decode()
                continue
            try:
                obj = json.loads(msg)
            except ValueError:
                raise ClientError(f"undecodable frame {msg[:80]!r}")
            ev = obj.get("event")
            if ev == "gap":
                self.count["ws_gaps"] += 1
            elif ev in ("subscribed", "unsubscribed", "error", "pong"):
                if ev == "subscribed" and obj.get("id"):
                    self.known[("ws", obj.get("topic"))] = obj["id"]
                replies.put_nowait(obj)
            elif ev != "connected":
                self.count["ws_other"] += 1
        raise ClientError("too many frames")

    def ws_ended(self, rt):
        """The exception for a reader task that ended before the client closed."""
        exc = rt.exception()
        if isinstance(exc, ClientError):
            return exc
        return ServerClosed(f"WebSocket ended early ({exc!r})")

    async def ws_reply(self, replies, rt):
        """The next command reply; raises if the server closed or sent a close frame."""
        if replies.empty():
            get = asyncio.create_task(replies.get())
            await asyncio.wait([get, rt], timeout=10 * self.t,
                               return_when=asyncio.FIRST_COMPLETED)
            if get.done():
                r = get.result()
            else:
                get.cancel()
                if replies.empty():
                    if rt.done():
                        raise self.ws_ended(rt)
                    raise asyncio.TimeoutError("no reply in time")
                r = replies.get_nowait()
        else:
            r = replies.get_nowait()
        if r.get("event") == "_close":
            raise ClientError(f"unexpected close frame {r['payload'][:60]!r}")
        return r

    async def ws_command(self, writer, replies, rt, cmd, want):
        writer.write(ws_frame(0x1 if self.rng.random() < 0.5 else 0x2,
                              json.dumps(cmd).encode()))
        r = await self.ws_reply(replies, rt)
        if r.get("event") != want or ("topic" in cmd and r.get("topic") != cmd["topic"]):
            raise ClientError(f"{cmd} answered {r}")
        self.count["ws_commands"] += 1

    async def ws_session(self, kind, opened, i, since):
        initial = self.rng.sample(TOPICS, self.rng.randint(0, 2))
        path = "/ws" + ("?" + "&".join(f"topic={t}" for t in initial) if initial else "")
        reader, writer = await self.ws_open(kind, path)
        opened()
        replies = asyncio.Queue()
        rt = asyncio.create_task(self.ws_reader(reader, writer, replies, kind))
        closed_by_us = False
        try:
            # Topics in the URL are answered with "subscribed" replies first.
            pending = set(initial)
            for _ in range(len(initial)):
                r = await self.ws_reply(replies, rt)
                if r.get("event") != "subscribed" or r.get("topic") not in pending:
                    raise ClientError(f"{path}: unexpected {r} (waiting for {pending})")
                pending.discard(r["topic"])
            subscribed = set(initial)
            for n in range(self.opts["ws_cycles"]):
                if self.end.is_set() or rt.done():
                    break
                if n % 5 == 4:
                    topic = f"u.{os.getpid()}.{i}.{n}"   # unique: its record must be freed
                else:
                    topic = self.rng.choice([t for t in TOPICS if t not in subscribed])
                cmd = {"action": "subscribe", "topic": topic}
                if since and ("ws", topic) in self.known:
                    cmd["since"] = self.known[("ws", topic)]
                    self.count["resume:ws_since"] += 1
                await self.ws_command(writer, replies, rt, cmd, "subscribed")
                subscribed.add(topic)
                await asyncio.sleep(self.rng.uniform(0.02, 0.08))
                if self.rng.random() < 0.7 or topic.startswith("u."):
                    await self.ws_command(writer, replies, rt, {"action": "unsubscribe",
                                                                "topic": topic}, "unsubscribed")
                    subscribed.discard(topic)
                await asyncio.sleep(self.rng.uniform(0.02, 0.08))
            if not rt.done():
                end = asyncio.create_task(self.end.wait())
                await asyncio.wait([end, rt], return_when=asyncio.FIRST_COMPLETED)
                end.cancel()
            if rt.done():
                while not replies.empty():
                    if replies.get_nowait().get("event") == "_close":
                        raise ClientError("close frame from the server before the client closed")
                raise self.ws_ended(rt)
            how = self.rng.random()
            if how < 0.6:
                # Close handshake: our close, then the server's close frame, then EOF.
                writer.write(ws_frame(0x8, struct.pack("!H", 1000)))
                try:
                    await asyncio.wait_for(rt, 10 * self.t)
                except (asyncio.IncompleteReadError, OSError):
                    pass
                r = None
                while not replies.empty():
                    r = replies.get_nowait()
                if not r or r.get("event") != "_close":
                    raise ClientError("no close frame in answer to ours")
                self.count["ws_close_handshakes"] += 1
            closed_by_us = True
            await self.close(writer, rst=how > 0.9)
        finally:
            if not rt.done():
                rt.cancel()
            try:
                await rt
            except BaseException:
                pass
            if not closed_by_us:
                await self.close(writer, rst=True)

    async def k_ws(self, opened, i):
        await self.ws_session("ws", opened, i, since=False)

    async def k_ws_resume(self, opened, i):
        await self.ws_session("ws_resume", opened, i, since=True)

    # -- drops --
    async def pause(self):
        if self.rng.random() < 0.5:
            await asyncio.sleep(self.rng.uniform(0, 0.3))

    async def k_drop_head(self, opened, i):
        reader, writer = await self.connect()
        opened()
        reqs = [
            f"GET {events_path(self.some_topics(1, 3))} HTTP/1.1\r\nHost: x\r\n"
            "Accept: text/event-stream\r\n\r\n",
            f"POST /publish?topic={TOPICS[0]} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n",
            "GET /stats HTTP/1.1\r\nHost: x\r\nUser-Agent: soak\r\n\r\n",
        ]
        req = reqs[i % len(reqs)].encode()
        cut = self.rng.randint(1, len(req) - 1)
        writer.write(req[:cut])
        self.count["drop:head"] += 1
        await self.pause()
        await self.close(writer, rst=self.rng.random() < 0.5)

    async def k_drop_ws_handshake(self, opened, i):
        reader, writer = await self.connect()
        opened()
        req = ws_upgrade_request(self.addr, "/ws?topic=" + self.rng.choice(TOPICS))
        if i % 2 == 0:
            writer.write(req[: self.rng.randint(1, len(req) - 1)])
            self.count["drop:ws_head_cut"] += 1
        else:
            writer.write(req)   # complete, but gone before the 101 is read
            self.count["drop:ws_before_101"] += 1
        await self.pause()
        await self.close(writer, rst=self.rng.random() < 0.5)

    async def k_drop_mid_frame(self, opened, i):
        reader, writer = await self.ws_open("drop_mid_frame",
                                            "/ws?topic=" + self.rng.choice(TOPICS))
        opened()
        try:
            if i % 3 == 0:
                # A complete subscribe first, so the connection has a subscription to drop.
                cmd = json.dumps({"action": "subscribe", "topic": self.rng.choice(TOPICS)})
                writer.write(ws_frame(0x1, cmd.encode()))
            size = self.rng.choice([60, 300, 5000])
            frame = ws_frame(0x1, json.dumps({"action": "subscribe",
                                              "topic": "x" * (size - 40)}).encode())
            cut = self.rng.randint(1, len(frame) - 1)
            writer.write(frame[:cut])
            self.count["drop:mid_frame"] += 1
            await self.pause()
        finally:
            await self.close(writer, rst=self.rng.random() < 0.5)

    async def k_drop_publish(self, opened, i):
        reader, writer = await self.connect()
        opened()
        topic = self.rng.choice(TOPICS)
        body = b"p" * topic_payload_size(topic)
        req = (f"POST /publish?topic={topic} HTTP/1.1\r\nHost: x\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        if i % 2 == 0:
            writer.write(req[: len(req) - self.rng.randint(1, len(body))])
            self.count["drop:publish_body_cut"] += 1
        else:
            writer.write(req)
            self.count["drop:publish_unanswered"] += 1
        await self.pause()
        await self.close(writer, rst=True)

    async def k_reset(self, opened, i):
        """Subscribes to the big topic and stops reading, so output queues up at the server;
        then resets (SO_LINGER 0) or, sometimes, closes with unread data."""
        topics = [BIG_TOPIC, self.rng.choice(TOPICS)]
        if i % 3 == 0:
            reader, writer = await self.ws_open("reset", "/ws?" + "&".join(
                f"topic={t}" for t in topics), rcvbuf=4096)
        else:
            reader, writer = await self.sse_subscribe("reset", topics, rcvbuf=4096)
        opened()
        try:
            wait = asyncio.create_task(self.end.wait())
            await asyncio.wait([wait], timeout=self.rng.uniform(0.1, self.opts["hold"]))
            wait.cancel()
        finally:
            rst = self.rng.random() < 0.8
            self.count["reset:rst" if rst else "reset:fin_unread"] += 1
            await self.close(writer, rst=rst)


    async def k_slow(self, opened, i):
        if i % 2:
            reader, writer = await self.ws_open("slow", "/ws?topic=" + FLOOD_TOPIC, rcvbuf=4096)
        else:
            reader, writer = await self.sse_subscribe("slow", [FLOOD_TOPIC], rcvbuf=4096)
        st = {"writer": writer, "closed": False, "ws": bool(i % 2)}
        self.slow.append(st)
        opened()
        await self.end.wait()
        if not st["closed"]:
            st["closed"] = True
            await self.close(writer, rst=False)

    async def flood(self):
        reader, writer = await self.connect()
        try:
            body = b"f" * FLOOD_SIZE
            req = (f"POST /publish?topic={FLOOD_TOPIC} HTTP/1.1\r\nHost: x\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
            sse = [st for st in self.slow if not st["ws"]]
            ws = [st for st in self.slow if st["ws"]]
            for k in range(FLOOD_1 + FLOOD_2):
                if k == FLOOD_1:
                    for st in sse[::2] + ws[::2]:
                        st["closed"] = True
                        await self.close(st["writer"], rst=True)
                        self.count["slow:reset_with_output_queued"] += 1
                writer.write(req)
                status, head = await self.read_head(reader, "flood")
                n = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
                await asyncio.wait_for(reader.readexactly(n), 10 * self.t)
                if status != 200:
                    raise ClientError(f"flood publish answered {status}")
                self.count["flood_published"] += 1
            # The WebSocket ones do not answer pings either: the heartbeat may close them
            # first (counted in "timeouts"), so only the SSE ones are sure to count as slow.
            self.count["slow:sse_left_to_be_dropped"] += len(sse) - len(sse[::2])
            self.count["slow:ws_left_to_be_dropped"] += len(ws) - len(ws[::2])
        finally:
            await self.close(writer)


def worker_main(conn, addr, opts):
    known = {}
    for _ in range(10 ** 4):
        msg = conn.recv()
        if msg[0] != "wave":
            break
        _, n, seed = msg
        try:
            res = asyncio.run(Wave(addr, n, seed, opts, known).run())
        except Exception as e:  # report instead of hanging the parent
            res = {"count": {"errors": 1}, "errors": [f"worker crashed: {e!r}"], "early": [],
                   "open_s": 0, "total_s": 0, "peak_socks": 0, "leftover_socks": 0}
        conn.send(res)
    conn.close()


# ---- publisher and sampler threads (main process) ------------------------------------------

class Publisher(threading.Thread):
    """Publishes at a steady rate over one keep-alive connection until stopped."""

    def __init__(self, addr, rate, deadline):
        super().__init__(daemon=True)
        self.addr, self.rate, self.deadline = addr, rate, deadline
        self.stop_ev = threading.Event()
        self.published = 0
        self.published_all = 0
        self.failures = []
        self.reconnects = 0
        self.sock = None
        self.buf = b""
        self.n = 0

    def connect(self):
        if self.sock:
            self.sock.close()
        self.sock = socket.create_connection(self.addr, timeout=10)
        self.buf = b""

    def request(self, path, body):
        self.sock.sendall((f"POST {path} HTTP/1.1\r\nHost: {self.addr[0]}\r\n"
                           f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("publisher connection closed")
            self.buf += chunk
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        m = re.search(rb"(?i)content-length:\s*(\d+)", head)
        n = int(m.group(1)) if m else 0
        while len(rest) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("publisher connection closed")
            rest += chunk
        self.buf = rest[n:]
        status = int(head.split()[1])
        if re.search(rb"(?i)connection:\s*close", head):
            self.connect()
        return status, rest[:n]

    def publish_one(self):
        self.n += 1
        if self.n % 200 == 0:
            path, body, is_all = "/publish_all?event=soak", b"to everyone", True
        else:
            topic = BIG_TOPIC if self.n % 25 == 0 else TOPICS[self.n % N_TOPICS]
            size = topic_payload_size(topic)
            body = (b"%08d " % self.n + b"m" * size)[:size]
            path, is_all = f"/publish?topic={topic}", False
        status, resp = self.request(path, body)
        if status != 200:
            raise RuntimeError(f"POST {path} answered {status} {resp[:100]!r}")
        if is_all:
            self.published_all += 1
        else:
            self.published += 1

    def run(self):
        try:
            self.connect()
            t0 = time.monotonic()
            for k in range(10 ** 8):
                if self.stop_ev.is_set() or time.monotonic() > self.deadline:
                    break
                try:
                    self.publish_one()
                except (OSError, ConnectionError) as e:
                    self.reconnects += 1
                    if self.reconnects > 5:
                        raise
                    self.failures.append(f"reconnect after {e!r}")
                    self.connect()
                delay = t0 + (k + 1) / self.rate - time.monotonic()
                if delay > 0:
                    self.stop_ev.wait(delay)
        except Exception as e:
            self.failures.append(f"publisher stopped: {e!r}")
        finally:
            if self.sock:
                self.sock.close()
                self.sock = None


def refill_history(addr, history_size, scale):
    """Replace every topic's history with the same messages: `history_size` (+2) per topic, with
    one SSE and one WebSocket subscriber on all topics, so each message carries the same
    encodings. Done before the baseline and again before the final measurement, so history
    holds the same bytes both times (which encodings a message gets depends on who was
    subscribed when it was published). Returns an error string or None."""
    topics = TOPICS + [BIG_TOPIC, FLOOD_TOPIC]
    rounds = history_size + 2

    async def run():
        sse_r, sse_w = await asyncio.open_connection(*addr, limit=1 << 22)
        ws_r, ws_w = await asyncio.open_connection(*addr, limit=1 << 22)
        got = {"sse": 0, "ws": 0}
        try:
            sse_w.write(f"GET {events_path(topics)} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            q = "&".join(f"topic={t}" for t in topics)
            ws_w.write(ws_upgrade_request(addr, "/ws?" + q))
            for r, want in ((sse_r, b" 200 "), (ws_r, b" 101 ")):
                head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10 * scale)
                if want not in head.split(b"\r\n", 1)[0]:
                    return f"refill subscriber answered {head[:40]!r}"

            async def drain_sse(marker):
                tail = b""
                for _ in range(10 ** 7):
                    chunk = await sse_r.read(1 << 20)
                    if not chunk:
                        return
                    got["sse"] += (tail + chunk).count(marker)
                    tail = chunk[-len(marker) + 1:]

            async def drain_ws(marker):
                for _ in range(10 ** 7):
                    h = await ws_r.readexactly(2)
                    n = h[1] & 0x7F
                    if n == 126:
                        n = struct.unpack("!H", await ws_r.readexactly(2))[0]
                    elif n == 127:
                        n = struct.unpack("!Q", await ws_r.readexactly(8))[0]
                    payload = await ws_r.readexactly(n)
                    if h[0] & 0x0F == 0x9:       # the heartbeat: unanswered, it closes us
                        ws_w.write(ws_frame(0xA, payload))
                    elif marker in payload:
                        got["ws"] += 1

            # Each message carries "refill-<n> " once in its data: count those.
            tasks = [asyncio.create_task(drain_sse(b"refill-")),
                     asyncio.create_task(drain_ws(b"refill-"))]
            await asyncio.sleep(0.2 * scale)   # both subscribed before the first publish

            def publish_all_rounds():
                pub = Publisher(addr, 1, time.monotonic() + 60 * scale)
                pub.connect()
                try:
                    for k in range(rounds):
                        for t in topics:
                            size = topic_payload_size(t)
                            body = (b"refill-%d " % k + b"r" * size)[:size]
                            status, resp = pub.request(f"/publish?topic={t}", body)
                            if status != 200:
                                return f"publish to {t} answered {status}"
                finally:
                    pub.sock.close()
                return None

            err = await asyncio.to_thread(publish_all_rounds)
            if err:
                return err
            want = rounds * len(topics)
            deadline = time.monotonic() + 30 * scale
            while min(got.values()) < want and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if min(got.values()) < want:
                return f"refill subscribers got {got} of {want} messages"
            return None
        finally:
            for w in (sse_w, ws_w):
                w.close()

    return asyncio.run(asyncio.wait_for(run(), 90 * scale))


class Sampler(threading.Thread):
    """Peak RSS and fd count of the server, and peak /stats connections."""

    def __init__(self, srv, deadline):
        super().__init__(daemon=True)
        self.srv, self.deadline = srv, deadline
        self.stop_ev = threading.Event()
        self.peak_rss = 0
        self.peak_fds = 0
        self.peak_conns = 0
        self.samples = 0

    def run(self):
        k = 0
        while not self.stop_ev.is_set() and time.monotonic() < self.deadline:
            try:
                self.peak_rss = max(self.peak_rss, rss_kib(self.srv.pid))
                self.peak_fds = max(self.peak_fds, fd_count(self.srv.pid))
                if k % 5 == 0:
                    st = get_stats(self.srv.addr)
                    self.peak_conns = max(self.peak_conns, st["connections"] - 1)
            except (OSError, RuntimeError, ValueError):
                pass
            self.samples += 1
            k += 1
            self.stop_ev.wait(0.1)


# ---- orchestration -------------------------------------------------------------------------

def binary_is_sanitized(path):
    with open(path, "rb") as f:
        blob = f.read()
    return b"__asan_init" in blob or b"__lsan" in blob


def server_flags(args, history):
    flags = ["--max-connections", str(args.max_connections),
             "--heartbeat", "2",                 # SSE comments + WS pings during the churn
             "--header-timeout", "5",
             "--max-output-bytes", str(MAX_OUTPUT_BYTES),
             "--log-level", "warn"]
    if history:
        flags += ["--history-size", str(args.history_size)]
    return flags


def settle(srv, base_fds, base_topics, timeout):
    """Wait until the server holds nothing but what it held at the baseline."""
    deadline = time.monotonic() + timeout
    st, fds = None, None
    while time.monotonic() < deadline:
        # fds first: the server closes the /stats connection's socket a little after the
        # client sees the end of the answer (a slow server, e.g. under valgrind, could
        # otherwise be caught holding it every time).
        fds = fd_count(srv.pid)
        st = get_stats(srv.addr)
        # /stats counts the connection that asks for it.
        if (st["connections"] == 1 and st.get("sse_connections", 0) == 0
                and st.get("ws_connections", 0) == 0 and st["subscriptions"] == 0
                and (base_topics is None or st["topics"] <= base_topics)
                and (base_fds is None or fds <= base_fds)):
            return True, st, fds
        time.sleep(0.1)
    return False, st, fds


def run_waves(workers, total, wave, seed0, deadline, tally, label):
    """Open `total` connections in waves of `wave`, split over the workers."""
    opened = 0
    waves = []
    k = 0
    while opened < total and time.monotonic() < deadline:
        n = min(wave, total - opened)
        parts = [n // len(workers) + (1 if j < n % len(workers) else 0)
                 for j in range(len(workers))]
        for j, (conn, _) in enumerate(workers):
            conn.send(("wave", parts[j], seed0 + 1000 * k + j))
        wall = time.monotonic()
        res = [conn.recv() for conn, _ in workers]
        opened += n
        info = {"n": n, "wall_s": time.monotonic() - wall,
                "open_s": max(r["open_s"] for r in res),
                "peak_client_socks": sum(r["peak_socks"] for r in res)}
        for r in res:
            tally["count"].update(r["count"])
            tally["errors"] += r["errors"]
            tally["early"] += r.get("early", [])
            if r["leftover_socks"]:
                tally["errors"].append(f"{label}: worker left {r['leftover_socks']} sockets open")
        tally["peak_client_socks"] = max(tally["peak_client_socks"], info["peak_client_socks"])
        waves.append(info)
        print(f"  {label} wave {k + 1}: {n} connections, set up in {info['open_s']:.1f} s, "
              f"wave {info['wall_s']:.1f} s, peak client sockets {info['peak_client_socks']}",
              flush=True)
        k += 1
    return opened, waves


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pushletd", default=os.environ.get("PUSHLETD"),
                    help="pushletd binary (default: $PUSHLETD)")
    ap.add_argument("--connections", type=int, default=None,
                    help="connections to open in total (default 20000, --short: 2000)")
    ap.add_argument("--short", action="store_true",
                    help="2,000 connections in waves of 1,000 (for ASan/LeakSanitizer builds)")
    ap.add_argument("--wave", type=int, default=None,
                    help="connections per wave, i.e. at most open at once (default 5000, "
                         "--short: 1000; at most 15000)")
    ap.add_argument("--workers", type=int, default=2, help="client processes (default 2)")
    ap.add_argument("--hold", type=float, default=2.0,
                    help="seconds a wave stays open after its last connection is set up")
    ap.add_argument("--ws-cycles", type=int, default=12,
                    help="subscribe/unsubscribe cycles per WebSocket client at most")
    ap.add_argument("--publish-rate", type=float, default=50.0, help="messages per second")
    ap.add_argument("--duration", type=float, default=None,
                    help="cap in seconds on the churn phase (default 150, --short 45)")
    ap.add_argument("--history-size", type=int, default=32,
                    help="--history-size for pushletd when it has the flag (default 32)")
    ap.add_argument("--rss-slack-mib", type=float, default=4.0,
                    help="allowed RSS growth over the warmed-up baseline (default 4 MiB)")
    ap.add_argument("--max-connections", type=int, default=19000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--valgrind", action="store_true",
                    help="run pushletd under valgrind --leak-check=full (use with --short); "
                         "a definite or indirect leak or a memory error fails the run")
    ap.add_argument("--keep-log", action="store_true", help="keep pushletd's stderr file")
    args = ap.parse_args()

    if not args.pushletd or not os.access(args.pushletd, os.X_OK):
        ap.error("give the pushletd binary with --pushletd or PUSHLETD")
    total = args.connections or (2000 if args.short else 20000)
    wave = min(args.wave or (1000 if args.short else 5000), total)
    duration = args.duration or (45.0 if args.short else 150.0)
    if wave > CLIENT_FD_BUDGET or wave + 1000 > args.max_connections:
        ap.error(f"--wave must be at most {CLIENT_FD_BUDGET} and 1000 under --max-connections")
    if args.max_connections > FD_LIMIT - 500:
        ap.error(f"--max-connections must leave the server fds under {FD_LIMIT}")
    if not 1 <= args.workers <= 8:
        ap.error("--workers: 1..8")

    sanitized = binary_is_sanitized(args.pushletd)
    scale = float(os.environ.get("PUSHLET_TEST_TIME_SCALE",
                                 10.0 if args.valgrind else 3.0 if sanitized else 1.0))
    wrapper = VALGRIND if args.valgrind else ()
    if args.valgrind and sanitized:
        ap.error("--valgrind needs a build without ASan")
    if args.valgrind and total > 5000:
        print("note: valgrind is slow; --short is the intended use", flush=True)
    t_start = time.monotonic()
    hard_deadline = t_start + duration + 120 * scale

    help_text = subprocess.run([args.pushletd, "--help"], capture_output=True, text=True,
                               timeout=10).stdout
    history = "--history-size" in help_text
    flags = server_flags(args, history)
    try:
        srv = Server(args.pushletd, flags, scale, wrapper)
    except RuntimeError as e:
        print(f"FAIL: {e}", file=sys.stderr)
        return 2

    failures = []
    workers = []
    figures = {}
    try:
        # Workers fork before any thread starts in this process.
        ctx = multiprocessing.get_context("fork")
        per_worker = -(-wave // args.workers)
        wopts = {"inflight": 256, "fd_cap": min(per_worker + 64, CLIENT_FD_BUDGET // args.workers),
                 "hold": args.hold, "ws_cycles": args.ws_cycles, "scale": scale,
                 "open_timeout": 60 * scale}
        for j in range(args.workers):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(child, srv.addr, wopts), daemon=True)
            p.start()
            child.close()
            workers.append((parent, p))

        print(f"pushletd {srv.addr[0]}:{srv.addr[1]} pid {srv.pid}"
              + (" (ASan build)" if sanitized else "") + (" (valgrind)" if args.valgrind else "")
              + f"; flags: {' '.join(flags)}", flush=True)
        print(f"plan: {total} connections in waves of {wave} from {args.workers} client "
              f"processes; publishing {args.publish_rate:g} msg/s", flush=True)

        # -- warm-up: one wave of the same size and mix, and full histories --
        fresh_rss = rss_kib(srv.pid)
        t0 = time.monotonic()
        warm_tally = {"count": collections.Counter(), "errors": [], "early": [],
                      "peak_client_socks": 0}
        pub = Publisher(srv.addr, args.publish_rate, hard_deadline)
        pub.start()
        run_waves(workers, wave, wave, args.seed + 10 ** 6, hard_deadline, warm_tally, "warm-up")
        pub.stop_ev.set()
        pub.join(15)
        fill_error = refill_history(srv.addr, args.history_size, scale)
        if fill_error:
            failures.append(f"warm-up history refill: {fill_error}")
        ok, st0, _ = settle(srv, None, None, 20 * scale)
        if not ok:
            failures.append(f"warm-up did not settle: {st0}")
        time.sleep(0.5 * scale)
        base_rss, base_fds, base = rss_kib(srv.pid), fd_count(srv.pid), get_stats(srv.addr)
        base_table = fd_table(srv.pid)
        warm_s = time.monotonic() - t0
        failures += [f"warm-up: {e}" for e in warm_tally["errors"][:10]]
        wc = warm_tally["count"]
        if (sum(v for k, v in wc.items() if k.startswith("closed_early:sse"))
                or sum(v for k, v in wc.items() if k.startswith("closed_early:ws"))
                > base.get("timeouts", 0)):
            failures.append("warm-up: connections ended early by the server: "
                            + "; ".join(warm_tally["early"])[:1000])
        print(f"warm-up {warm_s:.1f} s; baseline RSS {base_rss} KiB, fds {base_fds}, "
              f"topics {base['topics']}, history_messages {base.get('history_messages', '-')}",
              flush=True)

        # -- the churn --
        t1 = time.monotonic()
        sampler = Sampler(srv, hard_deadline)
        sampler.start()
        pub = Publisher(srv.addr, args.publish_rate, hard_deadline)
        pub.start()
        tally = {"count": collections.Counter(), "errors": [], "early": [],
                      "peak_client_socks": 0}
        opened, waves = run_waves(workers, total, wave, args.seed, t1 + duration, tally, "churn")
        pub.stop_ev.set()
        pub.join(15)
        churn_s = time.monotonic() - t1
        if opened < total:
            failures.append(f"only {opened} of {total} connections opened within "
                            f"--duration {duration:g} s")
        failures += tally["errors"][:20]
        failures += pub.failures
        if tally["count"]["errors"] > len(tally["errors"][:20]):
            failures.append(f"{tally['count']['errors']} client errors in all")

        # -- settle, refill the histories as at the baseline, measure --
        t2 = time.monotonic()
        ok, st1, fds_settled = settle(srv, base_fds, base["topics"], 30 * scale)
        fill_error = refill_history(srv.addr, args.history_size, scale)
        if fill_error:
            failures.append(f"final history refill: {fill_error}")
        ok, st1, fds_settled = settle(srv, base_fds, base["topics"], (30 if ok else 5) * scale)
        settle_s = time.monotonic() - t2
        time.sleep(1.0)   # let the allocator give back what it will
        sampler.stop_ev.set()
        sampler.join(5)
        time.sleep(0.2 * scale)   # and the server close the sampler's last /stats connection
        after_rss, after_fds, after = rss_kib(srv.pid), fd_count(srv.pid), get_stats(srv.addr)
        if not ok:
            failures.append(f"not settled after {settle_s:.1f} s: connections "
                            f"{st1['connections'] - 1}, sse {st1.get('sse_connections')}, "
                            f"ws {st1.get('ws_connections')}, subscriptions "
                            f"{st1['subscriptions']}, topics {st1['topics']} (baseline "
                            f"{base['topics']}), fds {fds_settled} (baseline {base_fds})")
        if after_fds != base_fds:
            table = fd_table(srv.pid)
            extra = {fd: t for fd, t in table.items() if base_table.get(fd) != t}
            gone = {fd: t for fd, t in base_table.items() if table.get(fd) != t}
            failures.append(f"fd count {after_fds} != baseline {base_fds}; new or changed: "
                            f"{extra}; gone: {gone}")
        slack = int(args.rss_slack_mib * 1024)
        # Under ASan freed memory sits in the quarantine and RSS says nothing; LeakSanitizer
        # at exit is the check there.
        if not (sanitized or args.valgrind) and after_rss > base_rss + slack:
            failures.append(f"RSS {after_rss} KiB > baseline {base_rss} KiB + {slack} KiB")
        if after["connections"] != 1 or after["subscriptions"] != 0:
            failures.append(f"/stats after: connections {after['connections'] - 1}, "
                            f"subscriptions {after['subscriptions']}")
        if after["topics"] != base["topics"]:
            failures.append(f"/stats topics {after['topics']} != baseline {base['topics']}")
        if "history_messages" in base and after.get("history_messages") != base["history_messages"]:
            failures.append(f"history_messages {after.get('history_messages')} != baseline "
                            f"{base['history_messages']}")
        # Same messages, same encodings; only the IDs may have grown by a digit.
        if "history_bytes" in base and (abs(after["history_bytes"] - base["history_bytes"])
                                        > base["history_bytes"] // 100):
            failures.append(f"history_bytes {after['history_bytes']} not within 1 % of the "
                            f"baseline {base['history_bytes']}")
        accepted = after["connections_total"] - base["connections_total"]
        if accepted < total:
            failures.append(f"server accepted {accepted} connections, fewer than {total}")
        # Connections the server ended before the client did. SSE has no deadline of its own:
        # any is a failure. A WebSocket client that misses a ping deadline (the client
        # processes starved of CPU) is closed by the heartbeat, which counts in "timeouts";
        # more early WebSocket closes than that are a failure.
        c = tally["count"]
        sse_early = sum(c["closed_early:" + k] for k in ("sse", "sse_multi", "sse_resume"))
        ws_early = sum(c["closed_early:" + k] for k in ("ws", "ws_resume"))
        timeouts = after.get("timeouts", 0) - base.get("timeouts", 0)
        if sse_early:
            failures.append(f"{sse_early} SSE streams ended by the server before the client "
                            f"closed them: " + "; ".join(e for e in tally["early"]
                                                         if e.startswith("sse"))[:1000])
        if ws_early > timeouts:
            failures.append(f"{ws_early} WebSocket connections ended by the server early, more "
                            f"than its timeouts ({timeouts}): "
                            + "; ".join(e for e in tally["early"] if e.startswith("ws"))[:1000])
        drops = after["slow_consumer_drops"] - base["slow_consumer_drops"]
        if drops < tally["count"]["slow:sse_left_to_be_dropped"]:
            failures.append(f"slow_consumer_drops grew by {drops}, expected at least "
                            f"{tally['count']['slow:sse_left_to_be_dropped']} (flooded SSE "
                            f"subscribers)")
        if after.get("connections_rejected", 0) != base.get("connections_rejected", 0):
            failures.append("connections were rejected (503): raise --max-connections")

        # -- still serving? --
        alive = check_alive(srv, scale)
        if alive:
            failures.append(alive)

        # -- SIGTERM --
        srv.proc.send_signal(signal.SIGTERM)
        try:
            rc = srv.proc.wait(15 * scale)
        except subprocess.TimeoutExpired:
            rc = None
            failures.append("pushletd did not exit after SIGTERM")
            srv.kill()
        if rc not in (0, None):
            failures.append(f"pushletd exited {rc} after SIGTERM")
        err = srv.stderr()
        m = SANITIZER_RE.search(err)
        if m:
            failures.append("sanitizer report on stderr:\n" + err[max(0, m.start() - 300):][:6000])
        if args.valgrind:
            m = re.search(r"==\d+== (ERROR SUMMARY: (\d+) errors)", err)
            lost = re.findall(r"(definitely|indirectly) lost: ([\d,]+) bytes", err)
            if not m:
                failures.append("no valgrind summary on stderr")
            elif m.group(2) != "0" or any(b != "0" for _, b in lost):
                i = err.find("HEAP SUMMARY")
                failures.append(f"valgrind: {m.group(1)}, {lost}\n" + err[max(0, i):][:6000])

        wall = time.monotonic() - t_start
        c = tally["count"]
        figures = {
            "pushletd": args.pushletd, "asan": sanitized, "valgrind": args.valgrind,
            "history_flag": history,
            "connections": opened, "waves": len(waves), "wave": wave,
            "by_kind": {k: c["conn:" + k] for k in list(KINDS) + ["slow"]},
            "published": pub.published, "published_all": pub.published_all,
            "rss_kib": [base_rss, sampler.peak_rss, after_rss], "rss_fresh_kib": fresh_rss,
            "fds": [base_fds, sampler.peak_fds, after_fds],
            "peak_server_connections": sampler.peak_conns,
            "peak_client_sockets": tally["peak_client_socks"],
            "wall_s": round(wall, 1), "warmup_s": round(warm_s, 1),
            "churn_s": round(churn_s, 1), "settle_s": round(settle_s, 1),
            "sse_events": c["sse_events"], "ws_messages": c["ws_messages"],
            "ws_commands": c["ws_commands"], "ws_close_handshakes": c["ws_close_handshakes"],
            "ws_pings": c["ws_pings"], "resumes_sent": {k[7:]: v for k, v in c.items()
                                                        if k.startswith("resume:")},
            "drops": {k[5:]: v for k, v in c.items() if k.startswith("drop:")},
            "resets": {k[6:]: v for k, v in c.items() if k.startswith("reset:")},
            "slow": {k[5:]: v for k, v in c.items() if k.startswith("slow:")},
            "flood_published": c["flood_published"],
            "closed_early": {k[13:]: v for k, v in c.items() if k.startswith("closed_early:")},
            "server_stats_delta": {k: after[k] - base.get(k, 0) for k in after
                                   if isinstance(after[k], int) and k != "(null)"},
        }
        print_figures(figures, base, after)
    finally:
        for conn, p in workers:
            try:
                conn.send(("quit",))
            except OSError:
                pass
        for conn, p in workers:
            p.join(5)
            if p.is_alive():
                p.kill()
        srv.kill()
        if args.keep_log or failures:
            print(f"pushletd stderr: {srv.errf.name}")
        else:
            os.unlink(srv.errf.name)

    if failures:
        print("\nFAIL:")
        for f in failures:
            print("  - " + f)
        return 1
    print("\nPASS")
    return 0


def check_alive(srv, scale):
    """A fresh subscriber receives a fresh publish; /healthz answers. Returns an error or None."""
    try:
        s = socket.create_connection(srv.addr, timeout=10 * scale)
        try:
            s.sendall(f"GET {events_path(['soak.final'])} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            buf = b""
            deadline = time.monotonic() + 10 * scale
            while b"event: connected" not in buf and time.monotonic() < deadline:
                chunk = s.recv(65536)
                if not chunk:
                    return "final subscriber: stream closed"
                buf += chunk
            status, _ = http_request(srv.addr, "POST", "/publish?topic=soak.final", b"still-here")
            if status != 200:
                return f"final publish answered {status}"
            while b"still-here" not in buf and time.monotonic() < deadline:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
            if b"still-here" not in buf:
                return "final subscriber did not receive the final publish"
        finally:
            s.close()
        status, _ = http_request(srv.addr, "GET", "/healthz")
        if status != 200:
            return f"/healthz answered {status}"
    except OSError as e:
        return f"server no longer answers: {e!r}"
    return None


def print_figures(f, base, after):
    mib = lambda k: f"{k / 1024:.1f}"
    r, d = f["rss_kib"], f["fds"]
    print("\nfigures")
    print(f"  connections     {f['connections']} in {f['waves']} waves of <= {f['wave']}, "
          f"peak {f['peak_server_connections']} at the server, {f['peak_client_sockets']} "
          f"client sockets")
    print("  by kind         " + ", ".join(f"{k} {v}" for k, v in f["by_kind"].items()))
    print(f"  published       {f['published']} to topics + {f['published_all']} to all "
          f"(+ {f['flood_published']} x {FLOOD_SIZE} B floods to {FLOOD_TOPIC})")
    print(f"  delivered       {f['sse_events']} SSE events, {f['ws_messages']} WS messages, "
          f"{f['ws_commands']} WS commands answered, {f['ws_close_handshakes']} close handshakes, "
          f"{f['ws_pings']} pings answered")
    print(f"  resumes sent    {f['resumes_sent']}")
    print(f"  ended early     {f['closed_early'] or 'none'} (by the server, before the client)")
    print(f"  drops           {f['drops']}, resets {f['resets']}, slow {f['slow']}")
    print(f"  RSS MiB         before {mib(r[0])}, peak {mib(r[1])}, after {mib(r[2])} "
          f"(after - before {r[2] - r[0]:+d} KiB; {mib(f['rss_fresh_kib'])} at start)"
          + ("; not checked under ASan (quarantine), LeakSanitizer is" if f["asan"] else "")
          + ("; not checked under valgrind" if f["valgrind"] else ""))
    print(f"  fds             before {d[0]}, peak {d[1]}, after {d[2]}")
    print(f"  wall time       {f['wall_s']} s (warm-up {f['warmup_s']} s, churn {f['churn_s']} s, "
          f"settle {f['settle_s']} s)")
    keys = ["connections_total", "messages_in", "messages_out", "slow_consumer_drops",
            "http_errors", "resumes", "replayed", "gaps", "timeouts", "rate_limited"]
    print("  /stats delta    " + ", ".join(f"{k} {f['server_stats_delta'][k]}" for k in keys
                                           if k in f["server_stats_delta"]))
    print(f"  /stats after    connections {after['connections'] - 1} (+ the probe), "
          f"subscriptions {after['subscriptions']}, topics {after['topics']} (baseline "
          f"{base['topics']}), history_messages {after.get('history_messages', '-')}, "
          f"history_bytes {after.get('history_bytes', '-')}")
    print("  json " + json.dumps(f, sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
