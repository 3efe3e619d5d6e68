"""Exceptions: one class per core error code worth catching, all under PushletError."""

from __future__ import annotations

from . import _pushlet as _c


class PushletError(Exception):
    """A Pushlet call failed. `code` is the core's PUSHLET_E* code (negative), or 0 for errors
    the Python layer raises itself; the message is the core's pushlet_strerror() text."""

    code: int = 0

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidArgument(PushletError, ValueError):
    """PUSHLET_EINVAL: bad topic or event name, unknown option, value out of range."""


class QueueFull(PushletError):
    """PUSHLET_EFULL: the publish queue is at its limit; retry later."""


class NotRunning(PushletError):
    """PUSHLET_ESTOPPED: the broker is not running (start() it first)."""


class Busy(PushletError):
    """PUSHLET_EBUSY: the broker is running; stop() it first."""


class WrongThread(PushletError):
    """PUSHLET_EWRONGTHREAD: called from the broker's own loop thread."""


class MessageTooBig(PushletError, ValueError):
    """PUSHLET_ETOOBIG: data larger than the max_message_size option."""


class AddressInUse(PushletError):
    """PUSHLET_EADDRINUSE: the listen address is already in use."""


class ListenError(PushletError):
    """PUSHLET_ELISTEN: the listen address is invalid or cannot be bound."""


class NotFound(PushletError, LookupError):
    """PUSHLET_ENOENT: no such open connection (or user), or the request was answered already."""


class RedisUnavailable(PushletError):
    """PUSHLET_EUNAVAILABLE: distributed mode could not reach Redis (the log says why)."""


class RedisAuthError(PushletError):
    """PUSHLET_EAUTH: Redis refused the password or the database."""


class BrokerClosed(PushletError):
    """The broker was closed (close(), or its `with` block ended)."""


class ForkedError(PushletError):
    """The broker was created in another process: brokers do not survive fork()."""


_BY_CODE: dict[int, type[PushletError]] = {
    _c.PUSHLET_EINVAL: InvalidArgument,
    _c.PUSHLET_ENOMEM: PushletError,
    _c.PUSHLET_EFULL: QueueFull,
    _c.PUSHLET_ESTOPPED: NotRunning,
    _c.PUSHLET_EBUSY: Busy,
    _c.PUSHLET_EWRONGTHREAD: WrongThread,
    _c.PUSHLET_ETOOBIG: MessageTooBig,
    _c.PUSHLET_EADDRINUSE: AddressInUse,
    _c.PUSHLET_ELISTEN: ListenError,
    _c.PUSHLET_ENOENT: NotFound,
    _c.PUSHLET_EUNAVAILABLE: RedisUnavailable,
    _c.PUSHLET_EAUTH: RedisAuthError,
}


def error_for(code: int, context: str = "") -> PushletError:
    """The exception for a core error code, its message pushlet_strerror(code)."""
    message = _c.pushlet_strerror(code)
    if context:
        message = f"{context}: {message}"
    return _BY_CODE.get(code, PushletError)(message, code)
