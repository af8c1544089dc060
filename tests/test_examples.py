"""Every shipped example configuration is valid, as ``trollmoves check`` reads it."""

from __future__ import annotations

from pathlib import Path

import pytest

from trollmoves.check import check

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").iterdir())


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_is_valid(path: Path) -> None:
    kind, content = check(str(path))
    assert kind == path.name.split("-")[0].split(".")[0]  # server-standalone.ini is a server's
    assert content
