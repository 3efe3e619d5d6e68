"""Pushlet: a real-time push broker (Server-Sent Events and WebSocket) embedded in Python.

    import pushlet

    p = pushlet.Pushlet(listen="127.0.0.1:8080", heartbeat=30)
    p.start()
    p.publish("news", "message", "hello")   # from any thread
    p.close()

The broker is the Pushlet C core, running its own event loop on its own thread; Python only
publishes and answers hooks. See README.md for hooks, asyncio and lifetime rules.
"""

from __future__ import annotations

from . import _pushlet
from ._broker import Data, Pushlet
from ._errors import (AddressInUse, BrokerClosed, Busy, ForkedError, InvalidArgument,
                      ListenError, MessageTooBig, NotFound, NotRunning, PushletError, QueueFull,
                      RedisAuthError, RedisUnavailable, WrongThread)
from ._hooks import Allow, ConnectRequest, Connection, Deny

__version__ = _pushlet.pushlet_version_string()

__all__ = [
    "Pushlet", "Data", "Allow", "Deny", "Connection", "ConnectRequest",
    "PushletError", "InvalidArgument", "QueueFull", "NotRunning", "Busy", "WrongThread",
    "MessageTooBig", "AddressInUse", "ListenError", "NotFound", "RedisUnavailable",
    "RedisAuthError", "BrokerClosed", "ForkedError", "version",
]


def version() -> str:
    """The C core's version, "major.minor.patch"."""
    return _pushlet.pushlet_version_string()
