"""Which files a section serves: announced ones (bounded), origin matches, links resolved."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trollmoves.served import RequestRefused, ServedFiles, real_path
from trollmoves.watch import OriginPattern


def test_announced_files_origin_matches_and_links(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    served = ServedFiles("s", OriginPattern(str(tmp_path / "link" / "{name}.h5")), capacity=2)
    assert served.check(f"file://{tmp_path}/real/a.h5") == str(tmp_path / "real" / "a.h5")
    for outside in ["/etc/passwd", f"{tmp_path}/link/../x.h5", f"ssh://h{tmp_path}/link/a.h5",
                    None]:
        with pytest.raises(RequestRefused):
            served.check(outside)
    served.add(str(tmp_path / "work" / "old"), created=True)
    served.add(str(tmp_path / "work" / "unpacked"), created=True)
    served.add(str(tmp_path / "other"))
    assert served.created(str(tmp_path / "work" / "unpacked"))
    assert not served.created(str(tmp_path / "other"))
    with pytest.raises(RequestRefused, match="is not served by section s"):
        served.check(str(tmp_path / "work" / "old"))  # forgotten: capacity 2


def test_real_path_is_the_kernel_s_answer_and_realpath_s_for_missing_files(tmp_path: Path
                                                                          ) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.h5").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "alias.h5").symlink_to("a.h5")
    for path in [tmp_path / "link" / "a.h5", tmp_path / "link" / ".." / "real" / "alias.h5",
                 tmp_path / "link" / "missing.h5", tmp_path / "nowhere" / "x", Path("/")]:
        assert real_path(str(path)) == os.path.realpath(path)
