"""posttroll messages built, encoded and decoded by posttroll, each check made once.

``Message(subject, type, data).encode()`` serialises the data to JSON three times (two checks
and the encoding) and looks the user up in the password database; ``Message(rawstr=raw)``
serialises the data it has just parsed once more, to check it. On the hot paths of the server
and the client (several messages per file) that is most of the cost of a message. These
functions make the same messages with posttroll's own encoder and parser, checking each
message once::

    text = encode(message("/1b/hrit", "file", {"uid": "a.h5"}))   # what .encode() gives
    received = decode(raw)                                          # as Message(rawstr=raw)

Errors are posttroll's: :class:`~posttroll.message.MessageError` for an invalid subject, type,
sender or data, and whatever ``Message(rawstr=...)`` raises for garbage.
"""

from __future__ import annotations

import datetime as dt
import functools
import socket
from typing import Any

from posttroll import message as _posttroll
from posttroll.message import (
    MESSAGE_VERSION,
    Message,
    MessageError,
    is_valid_sender,
    is_valid_subject,
    is_valid_type,
)

# posttroll's own encoder and parser; without them (a posttroll that renamed them) the public
# and slower ways are used
_ENCODE = getattr(_posttroll, "_encode", None)
_DECODE = getattr(_posttroll, "_decode", None)
_GETSENDER = getattr(_posttroll, "_getsender", None)


@functools.lru_cache(maxsize=4)
def _sender_on(host: str) -> str:
    assert _GETSENDER is not None
    return _GETSENDER()


def sender() -> str:
    """``user@host`` as posttroll names the sender (looked up again when the host name
    changes)."""
    return _sender_on(socket.gethostname())


def message(subject: str, atype: str, data: Any = "") -> Message:
    """The message ``Message(subject, atype, data)`` makes, checked only when encoded
    (:func:`encode`)."""
    if _GETSENDER is None:
        return Message(subject, atype, data)
    msg = Message.__new__(Message)
    msg.subject, msg.type, msg.sender = subject, atype, sender()
    msg.time = dt.datetime.now(dt.UTC)
    msg.data, msg.binary, msg.version = data, False, MESSAGE_VERSION
    return msg


def encode(msg: Message) -> str:
    """``msg.encode()``: the same text, the data serialised once."""
    if _ENCODE is None:
        return msg.encode()
    _check_head(msg)
    try:
        return _ENCODE(msg, binary=msg.binary)
    except (TypeError, UnicodeDecodeError):
        raise MessageError(f"Invalid data: data is not JSON serializable: {msg.data}") from None


def decode(raw: bytes | str) -> Message:
    """``Message(rawstr=raw)``, without serialising the parsed data again to check it (data
    parsed from JSON always serialises)."""
    if _DECODE is None:
        return Message(rawstr=raw)
    if not raw:  # as posttroll: an empty raw string makes an empty, invalid message
        return Message(rawstr=raw)
    msg = Message.__new__(Message)
    msg.__dict__ = _DECODE(raw)
    _check_head(msg)
    return msg


def _check_head(msg: Message) -> None:
    if not is_valid_subject(msg.subject):
        raise MessageError(f"Invalid subject: '{msg.subject}'")
    if not is_valid_type(msg.type):
        raise MessageError(f"Invalid type: '{msg.type}'")
    if not is_valid_sender(msg.sender):
        raise MessageError(f"Invalid sender: '{msg.sender}'")
