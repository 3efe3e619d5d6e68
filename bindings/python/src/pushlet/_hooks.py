"""What hooks receive (ConnectRequest, Connection) and what they answer (Allow, Deny)."""

from __future__ import annotations

import http.cookies
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional, Tuple, Union

from . import _pushlet as _c

TRANSPORTS = {_c.PUSHLET_TRANSPORT_SSE: "sse", _c.PUSHLET_TRANSPORT_WS: "ws"}


def text(b: bytes) -> str:
    """Event strings are bytes from the wire: UTF-8, undecodable bytes kept as surrogates."""
    return b.decode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class Allow:
    """Answer to an auth hook: let the connection (or subscription) in.

    For a connection, `user` becomes its user id (None keeps a JWT's `sub`, if any; at most 256
    bytes) and `metadata` (any text, at most 4096 bytes) stays with it: both appear on every
    later event about it (Connection.user, Connection.metadata) and `user` is what
    Pushlet.send_user() addresses. Both are ignored for subscriptions."""

    user: Optional[str] = None
    metadata: Optional[str] = None


@dataclass(frozen=True)
class Deny:
    """Answer to an auth hook: refuse. A connection gets HTTP `status` (401, 403, 429, any
    4xx/5xx) with `reason` (one line, at most 120 bytes) as its body; a WebSocket subscribe
    command gets an `error` reply with reason "forbidden" and `reason` as its data."""

    status: int = 403
    reason: str = ""


@dataclass(frozen=True)
class Connection:
    """An open SSE stream or WebSocket, as lifecycle, subscribe and message hooks see it.
    `id` is unique per broker and never reused: pass it (or the Connection) to send() and
    close_connection()."""

    id: int
    transport: str  # "sse" or "ws"
    user: str = ""
    metadata: str = ""

    def __int__(self) -> int:
        return self.id


@dataclass(frozen=True)
class ConnectRequest:
    """A client asking to open an SSE stream or a WebSocket: what on_connect decides on."""

    request_id: int
    connection: int
    transport: str  # "sse" or "ws"
    method: str
    path: str
    query: str  # raw (percent-encoded), without "?"
    remote: str  # "127.0.0.1:50312", "[::1]:50312"
    headers: Tuple[Tuple[str, str], ...] = field(repr=False)
    user: str = ""  # a valid JWT's `sub` when the jwt_secret option is set

    def header(self, name: str, default: Optional[str] = None) -> Optional[str]:
        """The first header field called `name` (case-insensitive), else `default`."""
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return default

    @property
    def params(self) -> dict[str, list[str]]:
        """The query string parsed: name -> every value given."""
        return urllib.parse.parse_qs(self.query, keep_blank_values=True)

    @property
    def cookies(self) -> dict[str, str]:
        """The Cookie header parsed: name -> value."""
        jar: http.cookies.SimpleCookie[str] = http.cookies.SimpleCookie()
        for k, v in self.headers:
            if k.lower() == "cookie":
                try:
                    jar.load(v)
                except http.cookies.CookieError:
                    pass
        return {k: m.value for k, m in jar.items()}


AuthAnswer = Union[Allow, Deny, bool]
ConnectHook = Callable[[ConnectRequest], Union[AuthAnswer, Awaitable[AuthAnswer]]]
SubscribeHook = Callable[[Connection, str], Union[AuthAnswer, Awaitable[AuthAnswer]]]
ConnectionHook = Callable[[Connection], object]
DisconnectHook = Callable[[Connection, str], object]
TopicHook = Callable[[Connection, str], object]
UnsubscribeHook = Callable[[Connection, str, str], object]
MessageHook = Callable[[Connection, Union[str, bytes]], object]


def connection_of(ev: tuple[Any, ...]) -> Connection:
    return Connection(ev[1], TRANSPORTS.get(ev[3], "?"), text(ev[7]), text(ev[8]))


def connect_request_of(ev: tuple[Any, ...]) -> ConnectRequest:
    headers = tuple((k.decode("latin-1"), text(v)) for k, v in ev[15])
    return ConnectRequest(request_id=ev[2], connection=ev[1],
                          transport=TRANSPORTS.get(ev[3], "?"), method=text(ev[11]),
                          path=text(ev[12]), query=text(ev[13]), remote=text(ev[14]),
                          headers=headers, user=text(ev[7]))
