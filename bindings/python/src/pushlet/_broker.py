"""The Pushlet class: an embedded broker, its hooks and its lifetime.

Threads. The broker runs its own libuv loop on a C thread that never calls Python. Hooks and
log records come through the core's pull queue: a readable file descriptor plus "next event"
calls. A dispatcher thread waits on that fd with select.poll(), which releases the GIL while it
waits, and runs the hooks; or, after attach(loop), the asyncio loop watches the fd
(loop.add_reader) and runs them, awaiting `async def` hooks as tasks. Answers to auth requests
go back with pushlet_allow()/pushlet_deny(), which may be called from any thread.

Lifetime. _Native owns the C handle and holds no user object, so a Pushlet whose hooks refer
back to it can still be collected: the dispatcher thread keeps only a weak reference to the
Pushlet while it waits. Dropping the last reference, close(), or interpreter exit stops the
broker (pushlet_stop, the GIL released) and frees it. A broker belongs to the process that
created it: in a forked child every call raises ForkedError and nothing is freed.
"""

from __future__ import annotations

import asyncio
import datetime
import inspect
import logging
import os
import select
import threading
import weakref
from typing import Any, Generic, Optional, TypeVar, Union, overload

from . import _pushlet as _c
from ._errors import BrokerClosed, ForkedError, PushletError, error_for
from ._hooks import (Allow, ConnectHook, Connection, ConnectionHook, Deny, DisconnectHook,
                     MessageHook, SubscribeHook, TopicHook, UnsubscribeHook, connect_request_of,
                     connection_of, text)

log = logging.getLogger("pushlet")

Data = Union[str, bytes, bytearray, memoryview]
Event = tuple[Any, ...]  # what pushlet_py_event_next() returns (see pushlet.i)
ConnectionRef = Union[int, Connection]

_OPTIONS = {k[len("PUSHLET_OPT_"):].lower(): v for k, v in vars(_c).items()
            if k.startswith("PUSHLET_OPT_")}
_STATS = sorted(((v, k[len("PUSHLET_STAT_"):].lower()) for k, v in vars(_c).items()
                 if k.startswith("PUSHLET_STAT_") and k != "PUSHLET_STAT_COUNT"))

_LOG = _c.PUSHLET_EVENT_LOG
_AUTH_CONNECT = _c.PUSHLET_EVENT_AUTH_CONNECT
_AUTH_SUBSCRIBE = _c.PUSHLET_EVENT_AUTH_SUBSCRIBE
_HOOK_EVENTS = {
    "on_connect": _AUTH_CONNECT,
    "on_subscribe": _AUTH_SUBSCRIBE,
    "on_connected": _c.PUSHLET_EVENT_CONNECTED,
    "on_disconnected": _c.PUSHLET_EVENT_DISCONNECTED,
    "on_subscribed": _c.PUSHLET_EVENT_SUBSCRIBED,
    "on_unsubscribed": _c.PUSHLET_EVENT_UNSUBSCRIBED,
    "on_message": _c.PUSHLET_EVENT_MESSAGE,
}
_DRAIN_BATCH = 256  # events per wake-up before other work gets a turn
_CLOSE_JOIN_TIMEOUT = 10.0  # seconds close() waits for a running hook

_publish = _c.pushlet_publish
_publish_all = _c.pushlet_publish_all
_send = _c.pushlet_send
_send_user = _c.pushlet_send_user


def _log_record(ev: Event) -> None:
    """A LOG event to the standard logging module: logger pushlet.<component>."""
    level = ev[4]
    logger = log.getChild(ev[5].decode("ascii", "replace") or "core")
    if logger.isEnabledFor(level):
        extra = {"pushlet_component": ev[5].decode("ascii", "replace"),
                 "pushlet_connection": ev[1]}
        logger.log(level, "%s", text(ev[6]), extra=extra)


class _Native:
    """The C handle and what the dispatcher needs. Holds no user objects (see the module
    docstring). `p` is None once freed, or in a forked child."""

    def __init__(self) -> None:
        rc, p = _c.pushlet_new()
        if rc:
            raise error_for(rc, "pushlet_new")
        self.p = p
        self.pid = os.getpid()
        self.forked = False
        self.fd = _c.pushlet_event_fd(p)
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.stopping = False
        self.closing = False
        self.thread: Optional[threading.Thread] = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None  # after Pushlet.attach()
        self.reader_fd: Optional[int] = None  # a dup of fd, watched by that loop
        self.lock = threading.Lock()  # serializes start/stop/close
        _live.add(self)

    def wake(self) -> None:
        try:
            os.write(self.wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # full pipe: a wake-up is pending anyway

    def stop_dispatcher(self, timeout: Optional[float] = None) -> bool:
        """End the dispatcher thread (it finishes the hook it is running first). False when
        it is still running after `timeout` seconds."""
        self.stopping = True
        self.wake()
        t = self.thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
            if t.is_alive():
                return False
        self.thread = None
        return True

    def detach_loop(self) -> None:
        loop, fd = self.loop, self.reader_fd
        if loop is None or fd is None:
            return
        self.loop = self.reader_fd = None

        def detach() -> None:
            assert loop is not None and fd is not None
            loop.remove_reader(fd)
            os.close(fd)

        if loop.is_closed():
            os.close(fd)
        elif _running_loop() is loop or not loop.is_running():
            detach()
        else:
            loop.call_soon_threadsafe(detach)

    def close(self) -> None:
        """Stop and free. Pending events: log records are logged, the rest dropped. The lock is
        not held while the dispatcher is joined: a hook may still call start() or stop()."""
        if self.forked or self.pid != os.getpid():
            return
        with self.lock:
            if self.p is None or self.closing or self.pid != os.getpid():
                return
            self.closing = True
            _c.pushlet_stop(self.p)  # the GIL is released while the loop thread is joined
        if not self.stop_dispatcher(_CLOSE_JOIN_TIMEOUT):
            # A hook that never returns: keep the broker rather than free it under that hook.
            log.warning("pushlet: a hook is still running after %ss; the broker is left "
                        "unreleased", _CLOSE_JOIN_TIMEOUT)
            self.p = None
            return
        self.detach_loop()
        with self.lock:
            p, self.p = self.p, None  # from here on, calls see a closed broker
            while (ev := _c.pushlet_py_event_next(p)) is not None:
                if ev[0] == _LOG:
                    _log_record(ev)
            _c.pushlet_free(p)
            for fd in (self.wake_r, self.wake_w):
                os.close(fd)
            _live.discard(self)

    def after_fork_in_child(self) -> None:
        # The loop thread does not exist here: never stop or free; every call raises.
        self.p = None
        self.forked = True
        self.thread = None
        self.lock = threading.Lock()  # another thread may have held it at fork time


_live: "weakref.WeakSet[_Native]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for native in list(_live):
        native.after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _dispatcher(native: _Native, ref: "weakref.ref[Pushlet]") -> None:
    """The dispatcher thread: wait (GIL released) for events, run the hooks."""
    poller = select.poll()
    poller.register(native.fd, select.POLLIN)
    poller.register(native.wake_r, select.POLLIN)
    while not native.stopping:
        for fd, _ in poller.poll():
            if fd == native.wake_r:
                try:
                    os.read(native.wake_r, 512)
                except BlockingIOError:
                    pass
        if native.stopping:
            break
        broker = ref()
        if broker is None:
            break  # collected: its finalizer closes the broker
        try:
            broker._drain()
        except Exception:  # never let the thread die: hooks stop with it
            log.exception("pushlet: event dispatch failed")
        del broker  # hold no strong reference while waiting


F = TypeVar("F")


class _Hook(Generic[F]):
    """A hook attribute: setting it (or None) updates which events the core queues."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.slot = "_" + name

    @overload
    def __get__(self, obj: None, owner: type) -> "_Hook[F]": ...
    @overload
    def __get__(self, obj: "Pushlet", owner: type) -> Optional[F]: ...

    def __get__(self, obj: Optional["Pushlet"], owner: type) -> Any:
        return self if obj is None else obj.__dict__.get(self.slot)

    def __set__(self, obj: "Pushlet", fn: Optional[F]) -> None:
        if fn is not None and not callable(fn):
            raise TypeError(f"{self.name} must be callable or None")
        obj.__dict__[self.slot] = fn
        obj._update_events()


class Pushlet:
    """An embedded Pushlet broker: SSE and WebSocket push served from this process.

    >>> with Pushlet(listen="127.0.0.1:8080", heartbeat=30) as p:
    ...     p.publish("news", "message", "hello")

    listen: "host:port" (IPv4 or IPv6 literal, "[::1]:8080"); port 0 picks a free port (read
        it from .port once started).
    heartbeat: SSE heartbeat interval in seconds; 0 for none; None keeps the core's default.
    loop: an asyncio loop to run hooks on (same as calling attach(loop)); without one, hooks run
        on a dispatcher thread of this object.
    log_level: least level of the core's log records (a logging level); by default the effective
        level of the "pushlet" logger now.
    on_*: hooks, also settable as attributes later (see the README).
    **options: any core option by its name in lower case (pushlet.h, PUSHLET_OPT_*), e.g.
        max_connections=50000, sse_path="/stream", jwt_secret="...", history_size=0.
    """

    on_connect: _Hook[ConnectHook] = _Hook()
    on_subscribe: _Hook[SubscribeHook] = _Hook()
    on_connected: _Hook[ConnectionHook] = _Hook()
    on_disconnected: _Hook[DisconnectHook] = _Hook()
    on_subscribed: _Hook[TopicHook] = _Hook()
    on_unsubscribed: _Hook[UnsubscribeHook] = _Hook()
    on_message: _Hook[MessageHook] = _Hook()

    def __init__(self, listen: str = "127.0.0.1:8080", heartbeat: Optional[float] = 30, *,
                 loop: Optional[asyncio.AbstractEventLoop] = None,
                 log_level: Optional[int] = None,
                 on_connect: Optional[ConnectHook] = None,
                 on_subscribe: Optional[SubscribeHook] = None,
                 on_connected: Optional[ConnectionHook] = None,
                 on_disconnected: Optional[DisconnectHook] = None,
                 on_subscribed: Optional[TopicHook] = None,
                 on_unsubscribed: Optional[UnsubscribeHook] = None,
                 on_message: Optional[MessageHook] = None,
                 **options: Union[int, str, bool, None]) -> None:
        self._native = native = _Native()
        self._finalizer = weakref.finalize(self, native.close)
        self._tasks: set[Any] = set()  # pending async hooks
        self._listen = listen
        host, port = _parse_listen(listen)
        self._call(_c.pushlet_listen(native.p, host, port), f"listen {listen!r}")
        if log_level is None:
            log_level = log.getEffectiveLevel() or logging.WARNING
        self._set_option("log_level", max(logging.DEBUG, min(int(log_level), 100)))
        if heartbeat is not None:
            self.set_heartbeat_interval(heartbeat)
        for name, value in options.items():
            self._set_option(name, value)
        hooks = dict(on_connect=on_connect, on_subscribe=on_subscribe,
                     on_connected=on_connected, on_disconnected=on_disconnected,
                     on_subscribed=on_subscribed, on_unsubscribed=on_unsubscribed,
                     on_message=on_message)
        for name, fn in hooks.items():
            setattr(self, name, fn)  # also enables the pull queue for them
        if loop is not None:
            self.attach(loop)
        else:
            native.thread = threading.Thread(target=_dispatcher, args=(native, weakref.ref(self)),
                                             name="pushlet-dispatch", daemon=True)
            native.thread.start()

    # ---- lifetime ------------------------------------------------------------------------------

    def start(self) -> "Pushlet":
        """Bind and start serving (the broker's own thread). Returns self."""
        with self._native.lock:
            self._call(_c.pushlet_start(self._handle()), f"start on {self._listen}")
        return self

    def stop(self) -> None:
        """Stop gracefully: stop accepting, deliver what was published before, end SSE streams,
        close WebSockets, join the loop thread (the GIL is released meanwhile). The broker can
        be started again. A broker that is not running is left as it is."""
        with self._native.lock:
            rc = _c.pushlet_stop(self._handle())
        if rc and rc != _c.PUSHLET_ESTOPPED:
            self._call(rc, "stop")

    def close(self) -> None:
        """Stop (if running) and release everything; the object cannot be used afterwards.
        The hooks see the last events (disconnections). Called by `with`; dropping the last
        reference or interpreter exit does the same without running hooks."""
        native = self._native
        if native.forked or native.p is None:
            return
        with native.lock:
            if native.p is None or native.closing:
                return
            _c.pushlet_stop(native.p)
        drain_here = native.loop is None or _running_loop() is native.loop
        drain_here &= native.stop_dispatcher(_CLOSE_JOIN_TIMEOUT)
        native.detach_loop()
        if drain_here:
            while self._native.p is not None and self._drain():
                pass
        self._finalizer()

    @property
    def closed(self) -> bool:
        return self._native.p is None

    def __enter__(self) -> "Pushlet":
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "running" if self.running else "stopped"
        return f"<Pushlet {self._listen} {state}>"

    @property
    def running(self) -> bool:
        p = self._native.p
        return p is not None and _c.pushlet_port(p) >= 0

    @property
    def port(self) -> int:
        """The port bound while running (useful with port 0), else -1."""
        return _c.pushlet_port(self._handle())

    # ---- publishing ----------------------------------------------------------------------------

    def publish(self, topic: str, event: Optional[str], data: Data) -> None:
        """Publish `data` under `event` (None = "message") to every subscriber of `topic`.
        str data is sent as UTF-8; bytes as they are. Thread-safe; never blocks on I/O.
        Raises QueueFull, MessageTooBig, InvalidArgument, NotRunning."""
        rc = _publish(self._native.p, topic, event, data)
        if rc:
            self._call(rc, "publish")

    def publish_to_all(self, event: Optional[str], data: Data) -> None:
        """Publish to every connection once, whatever its topics."""
        rc = _publish_all(self._native.p, event, data)
        if rc:
            self._call(rc, "publish_to_all")

    def send(self, connection: ConnectionRef, event: Optional[str], data: Data) -> None:
        """Send to one open connection (no history; SSE without `id:`). NotFound if gone."""
        rc = _send(self._native.p, int(connection), event, data)
        if rc:
            self._call(rc, "send")

    def send_user(self, user: str, event: Optional[str], data: Data) -> None:
        """Send to every open connection of a user id. NotFound if it has none."""
        rc = _send_user(self._native.p, user, event, data)
        if rc:
            self._call(rc, "send_user")

    def close_connection(self, connection: ConnectionRef, code: int = 1000,
                         reason: str = "") -> None:
        """Close a connection: a WebSocket with `code` (1000 or 3000-4999) and `reason`; an SSE
        stream gets a final `close` event carrying `reason`. NotFound if gone."""
        self._call(_c.pushlet_close(self._handle(), int(connection), code, reason),
                   "close_connection")

    # ---- configuration -------------------------------------------------------------------------

    def set_heartbeat_interval(self, seconds: Union[float, datetime.timedelta, None]) -> None:
        """SSE heartbeat interval (seconds or a timedelta; 0 or None = none). Before start()."""
        if isinstance(seconds, datetime.timedelta):
            seconds = seconds.total_seconds()
        ms = round((seconds or 0) * 1000)
        if ms < 0:
            raise ValueError("heartbeat interval must not be negative")
        self._call(_c.pushlet_set_heartbeat_interval(self._handle(), ms), "heartbeat")

    def set_option(self, name: str, value: Union[int, str, bool, None]) -> None:
        """Set a core option by name (see the constructor), before start()."""
        self._set_option(name, value)

    def enable_distributed_mode(self, addr: str, password: str = "", db: int = 0) -> None:
        """Share topics with every broker using the same Redis ("host:port", "redis://...",
        "unix:/path"); call it once per shard, before start(). Contacts the server at once (up
        to 5 s, the GIL released). Raises RedisUnavailable, RedisAuthError, InvalidArgument."""
        self._call(_c.pushlet_enable_distributed_mode(self._handle(), addr, password or None, db),
                   f"enable_distributed_mode({addr!r})")

    # ---- observing -----------------------------------------------------------------------------

    @property
    def stats(self) -> dict[str, int]:
        """Every counter and gauge by name (connections, messages_in, ...)."""
        p = self._handle()
        return {name: _c.pushlet_stat(p, which) for which, name in _STATS}

    def metrics(self) -> str:
        """Every counter and gauge in the Prometheus text format."""
        text_or_rc = _c.pushlet_py_metrics(self._handle())
        if isinstance(text_or_rc, int):
            raise error_for(text_or_rc, "metrics")
        return text_or_rc

    def topic_subscribers(self, topic: str) -> int:
        """How many connections are subscribed to `topic` right now."""
        return _c.pushlet_topic_subscribers(self._handle(), topic)

    # ---- asyncio -------------------------------------------------------------------------------

    def attach(self, loop: Optional[asyncio.AbstractEventLoop] = None) -> None:
        """Run hooks on an asyncio loop (default: the running one) instead of a thread: the loop
        watches the event fd (add_reader); `async def` hooks run as tasks there, plain ones are
        called inline and must not block. Call it from the loop's thread, or before the loop
        runs."""
        loop = loop or asyncio.get_running_loop()
        native = self._native
        self._handle()
        if native.loop is not None:
            raise PushletError("already attached to an asyncio loop")
        if native.thread is threading.current_thread():
            raise PushletError("attach() cannot be called from a hook on the dispatcher thread")
        native.stop_dispatcher()
        native.stopping = False
        # A duplicate of the fd, so the loop never watches a number that close() released.
        native.reader_fd = os.dup(native.fd)
        native.loop = loop
        loop.add_reader(native.reader_fd, _on_readable, weakref.ref(self))

    # ---- internals -----------------------------------------------------------------------------

    def _handle(self) -> Any:
        p = self._native.p
        if p is None:
            self._raise_closed()
        return p

    def _raise_closed(self) -> None:
        if self._native.forked:
            raise ForkedError(f"this broker was created in process {self._native.pid}; "
                              "brokers do not survive fork(): create it in the child, after fork")
        raise BrokerClosed("the broker is closed")

    def _call(self, rc: int, what: str) -> None:
        if rc == 0:
            return
        if self._native.p is None:
            self._raise_closed()
        raise error_for(rc, what)

    def _set_option(self, name: str, value: Union[int, str, bool, None]) -> None:
        opt = _OPTIONS.get(name)
        if opt is None:
            raise TypeError(f"unknown Pushlet option {name!r}")
        p = self._handle()
        if opt >= _c.PUSHLET_OPT_SSE_PATH:
            if value is not None and not isinstance(value, str):
                raise TypeError(f"option {name} takes a str")
            rc = _c.pushlet_set_str(p, opt, value)
        else:
            if not isinstance(value, (int, bool)):
                raise TypeError(f"option {name} takes an int")
            rc = _c.pushlet_set_int(p, opt, int(value))
        self._call(rc, f"option {name}={value!r}")

    def _update_events(self) -> None:
        mask = _LOG
        for name, kind in _HOOK_EVENTS.items():
            if self.__dict__.get("_" + name) is not None:
                mask |= kind
        p = self._native.p
        if p is not None:
            _c.pushlet_events_enable(p, mask)

    def _drain(self) -> bool:
        """Handle up to a batch of pending events (dispatcher thread or asyncio loop); True
        when more may be pending."""
        for _ in range(_DRAIN_BATCH):
            p = self._native.p
            if p is None:
                return False
            ev = _c.pushlet_py_event_next(p)
            if ev is None:
                return False
            self._handle_event(ev)
        return True

    def _handle_event(self, ev: Event) -> None:
        kind = ev[0]
        if kind == _LOG:
            _log_record(ev)
        elif kind == _AUTH_CONNECT:
            self._ask(ev[2], "on_connect", self.on_connect, (connect_request_of(ev),))
        elif kind == _AUTH_SUBSCRIBE:
            self._ask(ev[2], "on_subscribe", self.on_subscribe, (connection_of(ev), text(ev[9])))
        elif kind == _c.PUSHLET_EVENT_CONNECTED:
            self._notify("on_connected", self.on_connected, (connection_of(ev),))
        elif kind == _c.PUSHLET_EVENT_DISCONNECTED:
            self._notify("on_disconnected", self.on_disconnected,
                         (connection_of(ev), text(ev[6])))
        elif kind == _c.PUSHLET_EVENT_SUBSCRIBED:
            self._notify("on_subscribed", self.on_subscribed, (connection_of(ev), text(ev[9])))
        elif kind == _c.PUSHLET_EVENT_UNSUBSCRIBED:
            self._notify("on_unsubscribed", self.on_unsubscribed,
                         (connection_of(ev), text(ev[9]), text(ev[6])))
        elif kind == _c.PUSHLET_EVENT_MESSAGE:
            data: Union[str, bytes] = ev[6] if ev[10] else ev[6].decode("utf-8", "replace")
            self._notify("on_message", self.on_message, (connection_of(ev), data))

    def _ask(self, request: int, name: str, fn: Any, args: tuple[Any, ...]) -> None:
        """Run an auth hook and answer the request with what it returns (or awaits)."""
        if fn is None:  # the hook was removed after the event was queued
            self._answer(request, name, True)
            return
        try:
            result = fn(*args)
        except Exception:
            log.exception("pushlet: %s hook raised: request denied", name)
            self._answer(request, name, Deny(403, "forbidden"))
            return
        if inspect.isawaitable(result):
            self._await(result, name, lambda answer: self._answer(request, name, answer),
                        lambda: self._answer(request, name, Deny(403, "forbidden")))
        else:
            self._answer(request, name, result)

    def _answer(self, request: int, name: str, answer: Any) -> None:
        p = self._native.p
        if p is None:
            return
        if answer is True or isinstance(answer, Allow):
            user = answer.user if isinstance(answer, Allow) else None
            meta = answer.metadata if isinstance(answer, Allow) else None
            rc = _c.pushlet_allow(p, request, user, meta)
        else:
            if isinstance(answer, Deny):
                status, reason = answer.status, answer.reason or None
            else:
                if answer is not False:
                    log.error("pushlet: %s hook returned %r (want Allow, Deny or a bool): "
                              "request denied", name, answer)
                status, reason = 403, None
            rc = _c.pushlet_deny(p, request, status, reason)
        if rc == _c.PUSHLET_ENOENT:
            log.debug("pushlet: %s answered after the request ended (client left or timeout)",
                      name)
        elif rc:
            log.error("pushlet: %s answer refused: %s", name, _c.pushlet_strerror(rc))

    def _notify(self, name: str, fn: Any, args: tuple[Any, ...]) -> None:
        if fn is None:
            return
        try:
            result = fn(*args)
        except Exception:
            log.exception("pushlet: %s hook raised", name)
            return
        if inspect.isawaitable(result):
            self._await(result, name, lambda _: None, lambda: None)

    def _await(self, awaitable: Any, name: str, done: Any, failed: Any) -> None:
        """Run an awaitable hook result on the attached loop; then done(result) or failed()."""
        loop = self._native.loop
        if loop is None or loop.is_closed():
            log.error("pushlet: %s is async but no asyncio loop is attached "
                      "(Pushlet(loop=...) or attach(loop))", name)
            if inspect.iscoroutine(awaitable):
                awaitable.close()
            failed()
            return

        def finished(fut: Any) -> None:  # an asyncio or a concurrent.futures Future
            self._tasks.discard(fut)
            if fut.cancelled():
                failed()
            elif fut.exception() is not None:
                exc = fut.exception()
                log.error("pushlet: %s hook raised%s", name,
                          ": request denied" if name in ("on_connect", "on_subscribe") else "",
                          exc_info=(type(exc), exc, exc.__traceback__))
                failed()
            else:
                done(fut.result())

        fut: Any
        if _running_loop() is loop:
            fut = asyncio.ensure_future(awaitable, loop=loop)
        else:  # the final drain of close() on another thread: hand it over
            fut = asyncio.run_coroutine_threadsafe(_as_coroutine(awaitable), loop)
        self._tasks.add(fut)
        fut.add_done_callback(finished)


def _on_readable(ref: "weakref.ref[Pushlet]") -> None:
    broker = ref()
    if broker is None or broker.closed:
        return  # close() or the finalizer removes the reader
    broker._drain()


async def _as_coroutine(awaitable: Any) -> Any:
    return await awaitable


def _running_loop() -> Optional[asyncio.AbstractEventLoop]:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listen must be 'host:port', got {listen!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port)
