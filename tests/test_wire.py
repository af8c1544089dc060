"""posttroll messages through trollmoves.wire: the same text and the same errors as posttroll's
Message, each check made once."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from posttroll.message import Message, MessageError

from trollmoves import wire

DATA = {"sensor": "seviri", "nominal_time": dt.datetime(2026, 11, 21, 10), "uid": "a.h5",
        "uri": "/src/a.h5", "channels": ["VIS006", 1, 2.5, None, True],
        "dataset": [{"uid": "b", "start": dt.datetime(2026, 1, 1, tzinfo=dt.UTC)}]}


@pytest.mark.parametrize(("atype", "data"), [("file", DATA), ("err", "text"), ("unknown", ""),
                                             ("ping", {})])
def test_encoded_as_posttroll_encodes(atype: str, data: Any) -> None:
    built = wire.message("/1b/hrit", atype, data)
    reference = Message("/1b/hrit", atype, data)
    reference.time = built.time
    assert (built.sender, built.version, built.binary) == (
        reference.sender, reference.version, reference.binary)
    assert wire.encode(built) == reference.encode()
    assert wire.encode(reference) == reference.encode()  # any Message


def test_decoded_as_posttroll_decodes() -> None:
    raw = Message("/1b/hrit", "file", DATA).encode()
    for form in (raw, raw.encode()):
        decoded = wire.decode(form)
        assert decoded.__dict__ == Message(rawstr=form).__dict__
        assert decoded.data["nominal_time"] == DATA["nominal_time"]


@pytest.mark.parametrize("raw", [b"", b"garbage", b"pytroll://x", b"\xff\xfe",
                                 b"pytroll:/ file a@b 2026-01-01T00:00:00 v1.2",
                                 b"pytroll://a file a@b 2026-01-01T00:00:00 v1.2 "
                                 b"application/json {"])
def test_garbage_fails_as_with_posttroll(raw: bytes) -> None:
    with pytest.raises(Exception) as expected:  # whatever posttroll raises
        Message(rawstr=raw)
    with pytest.raises(type(expected.value)):
        wire.decode(raw)


def test_invalid_messages_are_refused_when_encoded() -> None:
    with pytest.raises(MessageError, match="not JSON serializable"):
        wire.encode(wire.message("/x", "file", {"a": object()}))
    with pytest.raises(MessageError, match="Invalid subject"):
        wire.encode(wire.message("", "file", {}))
    with pytest.raises(MessageError, match="Invalid type"):
        wire.encode(wire.message("/x", "", {}))
