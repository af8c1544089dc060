"""Unit tests of the dispatcher: conditions, aliases, name composition, config, delivery."""

from __future__ import annotations

import logging
import os
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.moveit import wait_for
from trollmoves.conditions import compare, conditions_match, set_matches, value_matches
from trollmoves.config import ConfigError
from trollmoves.dispatcher import (
    Dispatcher,
    Job,
    Rule,
    apply_aliases,
    build_config,
    compose_destination,
    plan,
    read_config,
)
from trollmoves.messages import UnsafePathError
from trollmoves.receiver import SubscriberSettings

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "dispatcher-config.yaml"

# ------------------------------------------------------------------------------ conditions

# The reference's documented example: green_snow/true_color from VIIRS, green_snow/overview
# from AVHRR except from NOAA-15.
DOC_CONDITIONS = [
    {"product": ["green_snow", "true_color"], "sensor": "viirs"},
    {"product": ["green_snow", "overview"], "sensor": "avhrr",
     "except": {"platform_name": "NOAA-15"}},
]


@pytest.mark.parametrize(("metadata", "expected"), [
    ({"product": "green_snow", "sensor": "viirs", "platform_name": "NOAA-20"}, True),
    ({"product": "true_color", "sensor": "viirs", "platform_name": "NOAA-20"}, True),
    ({"product": "overview", "sensor": "viirs", "platform_name": "NOAA-20"}, False),
    ({"product": "overview", "sensor": "avhrr", "platform_name": "NOAA-19"}, True),
    ({"product": "green_snow", "sensor": "avhrr", "platform_name": "NOAA-19"}, True),
    ({"product": "overview", "sensor": "avhrr", "platform_name": "NOAA-15"}, False),
    ({"product": "true_color", "sensor": "avhrr", "platform_name": "NOAA-19"}, False),
    ({"product": "true_color", "sensor": "modis", "platform_name": "EOS-Terra"}, False),
])
def test_documented_condition_example(metadata: dict[str, Any], expected: bool) -> None:
    """Sets are OR-ed, tests inside a set AND-ed, a list is any of, except negates."""
    assert conditions_match(DOC_CONDITIONS, metadata) is expected


def test_except_excludes_only_when_all_its_tests_hold() -> None:
    """``except`` with several fields excludes a file only when all of them match."""
    condition = {"sensor": "avhrr",
                 "except": {"platform_name": "NOAA-15", "product": "green_snow"}}
    base = {"sensor": "avhrr", "platform_name": "NOAA-15"}
    assert not set_matches(condition, {**base, "product": "green_snow"})
    assert set_matches(condition, {**base, "product": "overview"})
    assert set_matches(condition, {**base, "platform_name": "NOAA-19", "product": "green_snow"})


def test_nested_except() -> None:
    """An ``except`` inside an ``except`` re-admits what it matches."""
    condition = {"sensor": "avhrr",
                 "except": {"platform_name": "NOAA-15", "except": {"product": "overview"}}}
    assert not set_matches(condition, {"sensor": "avhrr", "platform_name": "NOAA-15",
                                       "product": "green_snow"})
    assert set_matches(condition, {"sensor": "avhrr", "platform_name": "NOAA-15",
                                   "product": "overview"})


@pytest.mark.parametrize(("test", "actual", "expected"), [
    ("<30", 29.9, True), ("<30", 30, False), ("<=30", 30, True), (">50", 50.5, True),
    (">50", 50, False), (">=50", 50, True), ("==3", 3.0, True), ("!=3", 4, True),
    ("<30", "12.5", True),  # a number sent as text still compares numerically
    ("> 50", 70, True),  # spaces after the operator are allowed
    ("!=NOAA-15", "NOAA-19", True), ("!=NOAA-15", "NOAA-15", False),
    ("==viirs", "viirs", True), ("<30", "n/a", False), (">x", "y", False),
])
def test_comparison_strings(test: str, actual: Any, expected: bool) -> None:
    """'<30', '>=50', '!=x': numeric where both sides are numbers, text equality otherwise."""
    assert value_matches(test, actual) is expected


def test_comparison_in_a_condition_set() -> None:
    """The reference's numeric example: area, daylight '<30' and coverage '>50' together."""
    condition = {"area": "omerc_bb", "daylight": "<30", "coverage": ">50"}
    assert set_matches(condition, {"area": "omerc_bb", "daylight": 10, "coverage": 80})
    assert not set_matches(condition, {"area": "omerc_bb", "daylight": 40, "coverage": 80})
    assert not set_matches(condition, {"area": "omerc_bb", "daylight": 10, "coverage": 50})


def test_plain_values_compare_by_equality() -> None:
    """Numbers, booleans and strings without an operator must be equal."""
    assert value_matches(5, 5)
    assert not value_matches(5, "5")
    assert value_matches(True, True)
    assert value_matches("viirs", "viirs")
    assert value_matches(["a", "<3"], 2)  # a list item may itself be a comparison
    assert not value_matches([], "a")
    assert compare(3, "<", "4") and not compare("a", "<", "b")


def test_missing_field_fails_its_set_even_in_except() -> None:
    """A field the metadata lacks fails the set, also when it appears under ``except``."""
    assert not set_matches({"sensor": "viirs"}, {"platform_name": "NOAA-20"})
    assert not set_matches({"sensor": "viirs", "except": {"platform_name": "NOAA-15"}},
                           {"sensor": "viirs"})
    assert conditions_match([{"sensor": "viirs"}, {"platform_name": "NOAA-20"}],
                            {"platform_name": "NOAA-20"})


def test_no_conditions_match_everything_empty_list_nothing() -> None:
    """Absent conditions select every file; an empty list of sets selects none."""
    assert conditions_match(None, {})
    assert not conditions_match([], {"a": 1})


# ------------------------------------------------------------------- aliases and composition


def test_aliases_dict_form_renames_in_place() -> None:
    """``{field: {value: alias}}`` replaces the value; unknown values are kept."""
    aliases = {"product": {"natural_color": "dnc", "overview": "ovw"}}
    assert apply_aliases({"product": "natural_color"}, aliases)["product"] == "dnc"
    assert apply_aliases({"product": "cloudtype"}, aliases)["product"] == "cloudtype"
    assert apply_aliases({"sensor": "viirs"}, aliases) == {"sensor": "viirs"}


def test_aliases_list_form_adds_fields_and_keeps_original() -> None:
    """Each map of the list form with ``_alias_name`` writes a new field from the original."""
    aliases = {"platform_name": [
        {"_alias_name": "short", "NOAA-19": "n19"},
        {"_alias_name": "family", "NOAA-19": "noaa"},
        {"NOAA-19": "N19"},  # no _alias_name: in place
    ]}
    metadata = {"platform_name": "NOAA-19"}
    result = apply_aliases(metadata, aliases)
    assert result == {"platform_name": "N19", "short": "n19", "family": "noaa"}
    assert metadata == {"platform_name": "NOAA-19"}  # the input is not modified
    again = apply_aliases(metadata, aliases)  # and neither is the config
    assert again == result


def test_aliases_leave_unhashable_values() -> None:
    """A list value has no alias and stays as it is."""
    assert apply_aliases({"sensor": ["a", "b"]}, {"sensor": {"a": "x"}}) == {"sensor": ["a", "b"]}


def _rule(**kwargs: Any) -> Rule:
    settings = {"target": "t", "topics": ("/x",), "directory": "/out"}
    settings.update(kwargs)
    return Rule(**settings)


META = {"platform_name": "NOAA-19", "product": "natural_color", "sensor": "avhrr",
        "start_time": datetime(2026, 11, 21, 10, 5), "format": "tif",
        "file_creation_time": datetime(2026, 11, 21, 10, 7, 30)}


@pytest.mark.parametrize(("host", "url"), [
    ("", "/out/avhrr/NOAA-19_20261121_1005_dnc.tif"),
    (None, "/out/avhrr/NOAA-19_20261121_1005_dnc.tif"),
    ("file://", "file:///out/avhrr/NOAA-19_20261121_1005_dnc.tif"),
    ("ftp://user:pw@ftp.example.com:2121",
     "ftp://user:pw@ftp.example.com:2121/out/avhrr/NOAA-19_20261121_1005_dnc.tif"),
    ("sftp://user@host", "sftp://user@host/out/avhrr/NOAA-19_20261121_1005_dnc.tif"),
    ("scp://host/ignored/path", "scp://host/out/avhrr/NOAA-19_20261121_1005_dnc.tif"),
    ("s3://bucket/", "s3://bucket/out/avhrr/NOAA-19_20261121_1005_dnc.tif"),
])
def test_compose_destination_hosts(host: str | None, url: str) -> None:
    """host + compose(directory/filepattern, metadata after aliases); host's path ignored."""
    rule = _rule(host=host or "", directory="/out/{sensor}",
                 filepattern="{platform_name}_{start_time:%Y%m%d_%H%M}_{product}.{format}",
                 aliases={"product": {"natural_color": "dnc"}})
    got_url, path = compose_destination(rule, META, "/src/x.tif")
    assert got_url == url
    assert path == "/out/avhrr/NOAA-19_20261121_1005_dnc.tif"


def test_compose_destination_defaults_and_creation_time() -> None:
    """No filepattern: the source file name; file_creation_time is usable in patterns."""
    rule = _rule(directory="/out/{file_creation_time:%Y%m%d%H%M%S}")
    assert compose_destination(rule, META, "/src/a b.h5") == (
        "/out/20261121100730/a b.h5", "/out/20261121100730/a b.h5")
    remote = _rule(host="sftp://h", directory="/out/{platform_name}")
    assert compose_destination(remote, META, "/src/a b#1.h5") == (
        "sftp://h/out/NOAA-19/a%20b%231.h5", "/out/NOAA-19/a b#1.h5")


def test_compose_destination_missing_field() -> None:
    """A pattern field the metadata lacks raises KeyError."""
    with pytest.raises(KeyError):
        compose_destination(_rule(directory="/out/{orbit_number}"), META, "/src/a")


@pytest.mark.parametrize(("directory", "filepattern", "field", "value"), [
    ("/out/{platform_name}", None, "platform_name", "../.."),
    ("/out/{platform_name}/x", "{uid}", "uid", "../../../etc/cron.d/x"),
    ("/out/pre{platform_name}", None, "platform_name", "/../../x"),
    ("{platform_name}/rel", None, "platform_name", ".."),
])
def test_compose_destination_refuses_fields_leading_out_of_the_directory(
        directory: str, filepattern: str | None, field: str, value: str) -> None:
    """A message field must not move the target out of the template's fixed directory."""
    rule = _rule(directory=directory, filepattern=filepattern)
    with pytest.raises(UnsafePathError, match=rf"field {field}="):
        compose_destination(rule, {**META, "uid": "a.h5", field: value}, "/src/a.h5")


def test_compose_destination_allows_fields_that_stay_inside() -> None:
    """Sub-directories from fields, and ``..`` that stays under the base, are fine."""
    rule = _rule(directory="/out/{platform_name}", filepattern="{uid}")
    assert compose_destination(rule, {"platform_name": "n19", "uid": "sub/a.h5"}, "/s")[1] == (
        "/out/n19/sub/a.h5")
    assert compose_destination(rule, {"platform_name": "a/../b", "uid": "x"}, "/s")[1] == (
        "/out/b/x")
    assert compose_destination(_rule(directory="/out"), META, "/src/{odd} name")[1] == (
        "/out/{odd} name")
    absolute = _rule(directory="/out", filepattern="{uid}")  # joined as text, not as paths
    assert compose_destination(absolute, {"uid": "/etc/passwd"}, "/s")[1] == "/out/etc/passwd"


# -------------------------------------------------------------------------------- planning


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A small local file to dispatch."""
    path = tmp_path / "src" / "avhrr_noaa19.tif"
    path.parent.mkdir()
    path.write_bytes(b"data")
    return path


def test_plan_conditions_use_original_values_names_use_aliases(source: Path) -> None:
    """Aliases apply to the target name, not to the conditions."""
    rule = _rule(topics=("/level2",), conditions=({"product": "natural_color"},),
                 filepattern="{product}.tif", aliases={"product": {"natural_color": "dnc"}})
    info = {"uri": str(source), "uid": source.name, "product": "natural_color"}
    [job] = plan([rule], "/level2/avhrr", info)
    assert job.path == "/out/dnc.tif"
    assert job.source == str(source)
    assert plan([_rule(topics=("/level2",), conditions=({"product": "dnc"},))],
                "/level2/avhrr", {**info}) == []


def test_plan_topics_are_subject_prefixes(source: Path) -> None:
    """A dispatch config applies to subjects starting with one of its topics."""
    rule = _rule(topics=("/level2/viirs", "/level2/avhrr"))
    info = {"uri": str(source)}
    assert plan([rule], "/level2/avhrr/NOAA-19", info)
    assert plan([rule], "/level2/avhrr", info)
    assert not plan([rule], "/level2/modis", info)
    assert not plan([rule], "/level1/avhrr", info)


def test_plan_file_creation_time(source: Path) -> None:
    """``file_creation_time`` is the local ctime of the source."""
    os.utime(source, (0, 0))
    [job] = plan([_rule(filepattern="{file_creation_time:%Y}_{uid}")], "/x",
                 {"uri": f"file://{source}", "uid": "u"})
    expected = datetime.fromtimestamp(os.path.getctime(source)).strftime("%Y")
    assert job.path == f"/out/{expected}_u"


def test_plan_skips_non_local_files(source: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A file on another host is skipped with a warning; unmatched files are not warned about."""
    info = {"uri": "ssh://otherhost/data/a.h5", "uid": "a.h5"}
    with caplog.at_level(logging.WARNING, logger="trollmoves.dispatcher"):
        assert plan([_rule()], "/x", info) == []
        assert plan([_rule(topics=("/y",))], "/x", info) == []
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ["Skipping ssh://otherhost/data/a.h5: the file is not on this host"]


def test_plan_missing_source_and_bad_pattern(source: Path, caplog: pytest.LogCaptureFixture
                                             ) -> None:
    """A missing source skips the file; a pattern that fails skips only its target."""
    assert plan([_rule()], "/x", {"uri": str(source) + ".gone"}) == []
    good, bad = _rule(target="good"), _rule(target="bad", directory="/out/{orbit}")
    jobs = plan([bad, good], "/x", {"uri": str(source)})
    assert [job.target for job in jobs] == ["good"]
    assert "target bad" in caplog.text and "orbit" in caplog.text


def test_plan_refuses_an_escaping_field_with_an_error_naming_it(
        source: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The file goes to the targets it stays inside of; the other is an ERROR naming the field."""
    inside, outside = _rule(target="inside"), _rule(target="outside",
                                                    directory="/out/{platform_name}")
    jobs = plan([outside, inside], "/x", {"uri": str(source), "platform_name": "../../etc"})
    assert [job.target for job in jobs] == ["inside"]
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "for target outside: UnsafePathError field platform_name='../../etc'" in (
        record.getMessage())


def test_plan_invalid_uri_is_not_local(source: Path) -> None:
    """An invalid URI (an unclosed IPv6 host) is skipped, not an exception."""
    assert plan([_rule()], "/x", {"uri": "file://[x/a.h5"}) == []


def test_plan_same_destination_once(source: Path) -> None:
    """Two dispatch configs of one target resolving to the same URL make one job."""
    rules = [_rule(topics=("/x",)), _rule(topics=("/x/y",)), _rule(topics=("/x",), directory="/b")]
    assert [job.path for job in plan(rules, "/x/y", {"uri": str(source)})] == [
        f"/out/{source.name}", f"/b/{source.name}"]


# ---------------------------------------------------------------------------- configuration


def _write(tmp_path: Path, data: Any, name: str = "dispatch.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_example_config_reads() -> None:
    """The shipped example is valid."""
    config = read_config(EXAMPLE)
    assert {rule.target for rule in config.rules} == {"ftp_target", "sftp_target", "s3_target",
                                                       "local_copy"}
    assert config.subscription.nameserver is None


def test_overrides_and_subscriber_block(tmp_path: Path) -> None:
    """Dispatch configs override host, filepattern and directory; the subscriber block reads."""
    path = _write(tmp_path, {
        "posttroll_subscriber": {"subscribe_addresses": ["tcp://127.0.0.1:40000"],
                                 "subscribe_services": ["svc"]},
        "target1": {"host": "ftp://h", "directory": "/d", "filepattern": "{uid}",
                    "connection_parameters": {"connection_uptime": 60},
                    "publish_topic": "/new/{platform_name}",
                    "dispatch_configs": [
                        {"topics": ["/a"]},
                        {"topics": "/b", "host": "sftp://other", "directory": "/e",
                         "filepattern": "x_{uid}", "conditions": [{"sensor": "viirs"}]}]}})
    config = read_config(path)
    first, second = config.rules
    assert (first.host, first.directory, first.filepattern) == ("ftp://h", "/d", "{uid}")
    assert (second.host, second.directory, second.filepattern) == ("sftp://other", "/e", "x_{uid}")
    assert second.topics == ("/b",) and second.conditions == ({"sensor": "viirs"},)
    assert second.connection_parameters == {"connection_uptime": 60}
    assert config.subscription == SubscriberSettings(
        topics=("/a", "/b"), addresses=("tcp://127.0.0.1:40000",), nameserver="localhost",
        services=("svc",), addr_listener=True)


@pytest.mark.parametrize(("document", "where"), [
    ("t1: {directory: /x, dispatch_configs: [{topics: 5}]}",
     "[t1] dispatch_configs[0].topics: 5 is not of type"),
    ("t1: {directory: /x}", "[t1]: 'dispatch_configs' is a required property"),
    ("t1: {dispatch_configs: [{topics: [/a]}]}",
     "[t1] dispatch_configs[0]: 'directory' is missing"),
    ("t1: {directory: /x, dispatch_configs: [{topics: [/a], conditions: [{except: 3}]}]}",
     "[t1] dispatch_configs[0].conditions[0].except: 3 is not of type 'object'"),
    ("t1: {directory: /x, host: 'ftp://h:99999', dispatch_configs: [{topics: [/a]}]}",
     "[t1] host: invalid port"),
    ("t1: {directory: /x, dispatch_configs: [{topics: [/a], host: 'nope://h'}]}",
     "[t1] dispatch_configs[0].host: unsupported protocol 'nope'"),
    ("t1: {directory: '/x/{a', dispatch_configs: [{topics: [/a]}]}",
     "[t1] directory: invalid pattern"),
    ("t1: {directory: /x, aliases: {product: 3}, dispatch_configs: [{topics: [/a]}]}",
     "[t1] aliases.product: 3 is not of type 'object', 'array'"),
    ("posttroll_subscriber: {nameserver: false}\nt1: {directory: /x, dispatch_configs: "
     "[{topics: [/a]}]}", "[posttroll_subscriber] nameserver: false needs subscribe_addresses"),
    ("nameserver: localhost", "[nameserver]: 'localhost' is not of type 'object'"),
    ("t1: [unclosed", "not a valid YAML file"),
    ("", "the file is empty"),
])
def test_config_errors_name_file_and_key(tmp_path: Path, document: str, where: str) -> None:
    """Every error names the file, the target (section) and the key at fault."""
    path = _write(tmp_path, document)
    with pytest.raises(ConfigError) as info:
        read_config(path)
    assert str(info.value).startswith(f"{path}: ")
    assert where in str(info.value)


def test_unknown_keys_are_warnings(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A reference config with keys we do not know still loads; each key is named."""
    path = _write(tmp_path, "t1: {directory: /x, filepatern: y, dispatch_configs: "
                            "[{topics: [/a], colour: red}]}")
    read_config(path)
    assert f"{path}: [t1] filepatern: unknown key, ignored" in caplog.text
    assert f"{path}: [t1] dispatch_configs[0].colour: unknown key, ignored" in caplog.text


def test_build_config_needs_a_target() -> None:
    """A config with only the subscriber block is refused."""
    with pytest.raises(ConfigError, match="no target"):
        build_config({"posttroll_subscriber": {"nameserver": "localhost"}}, "c.yaml")


# ------------------------------------------------------------------------ queues and delivery


class RecordingPublisher:
    """Stands in for a posttroll publisher: keeps what is sent."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def send(self, text: str) -> None:
        """Record one encoded message."""
        self.sent.append(text)

    def stop(self) -> None:
        """Nothing to stop."""


def test_deliver_publishes_only_with_publish_topic(tmp_path: Path, source: Path) -> None:
    """A delivered file is announced on the composed topic; no topic, no message."""
    from posttroll.message import Message

    config = _write(tmp_path, {"t": {"directory": str(tmp_path), "dispatch_configs": [
        {"topics": ["/x"]}]}})
    publisher = RecordingPublisher()
    dispatcher = Dispatcher(config, publisher=publisher)
    try:
        info = {"uri": str(source), "uid": source.name, "platform_name": "NOAA-19"}
        target = str(tmp_path / "out" / "a.tif")
        job = Job("t", str(source), target, target, info, {}, "/new/{platform_name}")
        assert dispatcher.deliver(job)
        assert Path(target).read_bytes() == b"data"
        [text] = publisher.sent
        msg = Message(rawstr=text)
        assert (msg.subject, msg.type) == ("/new/NOAA-19", "file")
        assert msg.data == {**info, "uri": target}
        assert dispatcher.deliver(Job("t", str(source), target + "2", target + "2", info, {}))
        assert len(publisher.sent) == 1
    finally:
        dispatcher.close()


def test_failed_delivery_is_logged_redacted(tmp_path: Path, source: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """A failed transfer names the target without the password and returns False."""
    config = _write(tmp_path, {"t": {"directory": str(tmp_path), "dispatch_configs": [
        {"topics": ["/x"]}]}})
    dispatcher = Dispatcher(config)
    try:
        url = "ftp://user:hunter2-secret@127.0.0.1:1/out/a.tif"
        job = Job("remote", str(source) + ".gone", url, "/out/a.tif", {}, {})
        assert not dispatcher.deliver(job)
    finally:
        dispatcher.close()
    assert "Could not dispatch" in caplog.text and "target remote" in caplog.text
    assert "ftp://user:***@127.0.0.1:1/out/a.tif" in caplog.text
    assert "hunter2-secret" not in caplog.text


def test_stop_finishes_queued_deliveries_in_time_and_logs_each_one_not_done(
        tmp_path: Path, source: Path, caplog: pytest.LogCaptureFixture) -> None:
    """At a stop the queued deliveries get stop_timeout seconds; those that did not start are
    logged one by one with file and target, the running one finishes."""
    from posttroll.message import Message

    config = _write(tmp_path, {"t": {"directory": str(tmp_path / "out"), "dispatch_configs": [
        {"topics": ["/x"]}]}})
    dispatcher = Dispatcher(config, workers=1, stop_timeout=0)
    started, release = threading.Event(), threading.Event()
    delivered: list[str] = []

    def deliver(job: Job) -> bool:
        started.set()
        assert release.wait(10)
        delivered.append(job.info["uid"])
        return True

    dispatcher.deliver = deliver  # type: ignore[method-assign]
    files = []
    for index in range(3):
        path = source.with_name(f"f{index}.h5")
        path.write_bytes(b"x")
        files.append({"uri": str(path), "uid": path.name})
    dispatcher.handle(Message("/x", "dataset", {"dataset": files}))
    assert started.wait(10)

    def release_once_dropped() -> None:  # f0 ends only after the stop dropped f1 and f2
        wait_for(lambda: len(dispatcher.queues) == 0, what="the queued deliveries dropped")
        release.set()

    threading.Thread(target=release_once_dropped).start()
    dispatcher.close()
    assert delivered == ["f0.h5"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["Not dispatched, stopped before its turn: f1.h5 to target t",
                      "Not dispatched, stopped before its turn: f2.h5 to target t"]
    assert not dispatcher.queues.submit("t", "late", lambda: None)


def test_stop_lets_queued_deliveries_finish(tmp_path: Path, source: Path) -> None:
    """With time enough, every queued delivery is done before the stop completes."""
    from posttroll.message import Message

    out = tmp_path / "out"
    config = _write(tmp_path, {"t": {"directory": str(out), "dispatch_configs": [
        {"topics": ["/x"]}]}})
    dispatcher = Dispatcher(config, workers=1)
    files = []
    for index in range(20):
        path = source.with_name(f"f{index}.h5")
        path.write_bytes(b"x")
        files.append({"uri": str(path), "uid": path.name})
    dispatcher.handle(Message("/x", "dataset", {"dataset": files}))
    dispatcher.close()
    assert sorted(p.name for p in out.iterdir()) == sorted(f["uid"] for f in files)
