"""The package as users install it: a wheel carries the schemas every front end needs."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_every_schema(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("trollmoves-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    schemas = {f"trollmoves/schemas/{p.name}" for p in (ROOT / "schemas").glob("*.schema.json")}
    assert schemas and schemas <= names
    assert "trollmoves/transfer.py" in names
