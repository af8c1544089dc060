"""The INI reader: trollmoves 0.19 files read unchanged, typed by schema, errors that point."""

from __future__ import annotations

from pathlib import Path

import pytest

from trollmoves.config import ConfigError, read_ini


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conf.ini"
    path.write_text(text)
    return path


def test_defaults_types_and_nested_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, """
[DEFAULT]
delete = False
remove_delay = 15

[eumetcast-hrit-0deg]
origin = /data/H-000-{series:_<6s}-{platform_name:_<12s}-{nominal_time:%Y%m%d%H%M}-__
request_port = 9094
topic = /1b/hrit-segment/0deg
info = sensor=seviri;variant=0DEG
connection_parameters__client_kwargs__endpoint_url = https://minio:9000
connection_parameters__client_kwargs__verify = false
connection_parameters__connection_uptime = 20
""")
    section = read_ini(path, "server")["eumetcast-hrit-0deg"]
    assert section["request_port"] == 9094 and section["remove_delay"] == 15.0
    assert section["delete"] is False
    assert section["origin"].startswith("/data/H-000-{series:_<6s}")  # no interpolation
    assert section["connection_parameters"] == {
        "client_kwargs": {"endpoint_url": "https://minio:9000", "verify": False},
        "connection_uptime": "20"}


def test_client_lists_and_false_nameservers(tmp_path: Path) -> None:
    path = _write(tmp_path, """
[c]
providers = 10.0.0.1:9010 10.0.0.2:9010/1b/hrit
destination = ftp://host/in/{platform_name}/
topic = /1b/hrit
nameservers = false
publish_port = 0
""")
    section = read_ini(path, "client")["c"]
    assert section["providers"] == ["10.0.0.1:9010", "10.0.0.2:9010/1b/hrit"]
    assert section["nameservers"] is False and section["publish_port"] == 0


@pytest.mark.parametrize(("text", "kind", "expected"), [
    ("[s]\norigin = /a\ntopic = /t\nrequest_port = 90z\n", "server",
     "[s] request_port: expected integer, got '90z'"),
    ("[s]\norigin = /a\ntopic = /t\ndelete = perhaps\n", "server",
     "[s] delete: expected a boolean"),
    ("[s]\ntopic = /t\n", "server", "[s]: needs origin and topic or listen and topic"),
    ("[c]\ndestination = /x\ntopic = /t\n", "client", "[c]: 'providers' is a required"),
    ("[c]\nproviders = nohostport\ndestination = /x\ntopic = /t\n", "client",
     "[c] providers.0:"),
    ("no section header\n", "server", "not a valid INI file"),
])
def test_errors_name_file_section_and_key(tmp_path: Path, text: str, kind: str,
                                          expected: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        read_ini(path, kind)
    assert str(info.value).startswith(str(path))
    assert expected in str(info.value)


def test_enum_values_mixing_words_and_false(tmp_path: Path) -> None:
    path = _write(tmp_path, "[m]\nproviders = h:1\ndestination = /x\ncompression = bzip\n"
                            "[n]\nproviders = h:1\ndestination = /x\ncompression = false\n")
    sections = read_ini(path, "mirror")
    assert sections["m"]["compression"] == "bzip"
    assert sections["n"]["compression"] is False


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        read_ini(tmp_path / "absent.ini", "server")
