"""Read trollmoves 0.19 INI configuration files into typed, validated sections.

``[DEFAULT]`` applies to every section; ``a__b__c = v`` keys nest into ``{"a": {"b": {"c": v}}}``
(with "true"/"false"/"0"/"1" becoming booleans inside them, as trollmoves 0.19 does). Each value
is converted to the type its JSON Schema in ``schemas/`` gives, and each section is validated;
every error names the file, the section and the key.
"""

from __future__ import annotations

import configparser
import json
import os
from collections.abc import Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class ConfigError(ValueError):
    """A configuration file that cannot be used; the text names file, section and key."""

    def __init__(self, path: str, section: str | None, key: str | None, problem: str) -> None:
        self.path, self.section, self.key, self.problem = str(path), section, key, problem
        where = str(path)
        if section is not None:
            where += f": [{section}]"
        if key is not None:
            where += f" {key}"
        super().__init__(f"{where}: {problem}")


@cache
def load_schema(kind: str) -> dict[str, Any]:
    """The JSON Schema of one kind of config section (server, client, mirror, ...).

    The schemas are the repository's ``schemas/`` folder, installed as ``trollmoves.schemas``.
    """
    resource = resources.files("trollmoves.schemas").joinpath(f"{kind}.schema.json")
    return json.loads(resource.read_text())


def parse_bool(text: str) -> bool:
    """Parse an INI boolean; raise ValueError for anything else."""
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")


def _nested_value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in {"true", "1"}:
        return True
    if lowered in {"false", "0"}:
        return False
    return text


def _types_of(prop: Mapping[str, Any]) -> list[str]:
    if "type" in prop:
        return [prop["type"]] if isinstance(prop["type"], str) else list(prop["type"])
    types = []
    for option in prop.get("oneOf", []) + prop.get("anyOf", []):
        if "const" in option and isinstance(option["const"], bool):
            types.append("boolean")
        types.extend(_types_of(option))
    if "enum" in prop and any(isinstance(v, bool) for v in prop["enum"]):
        types.append("boolean")
    if "enum" in prop and any(isinstance(v, str) for v in prop["enum"]):
        types.append("string")
    return types or ["string"]


def convert(value: str, prop: Mapping[str, Any]) -> Any:
    """Convert one INI string to the type(s) a schema property allows, first match wins."""
    errors = []
    for kind in _types_of(prop):
        try:
            if kind == "integer":
                return int(value)
            if kind == "number":
                return float(value)
            if kind == "boolean":
                return parse_bool(value)
            if kind == "array":
                return value.split()
            if kind == "string":
                return value
        except ValueError as err:
            errors.append(str(err) if kind == "boolean" else f"expected {kind}, got {value!r}")
    raise ValueError("; ".join(errors) or f"cannot use {value!r}")


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if "__" not in key:
            out[key] = value
            continue
        *parents, leaf = key.split("__")
        node = out
        for parent in parents:
            node = node.setdefault(parent, {})
            if not isinstance(node, dict):
                raise ValueError(f"{parent} is both a value and a group of keys")
        node[leaf] = _nested_value(value)
    return out


def typed_section(path: str, name: str, raw: Mapping[str, str], kind: str) -> dict[str, Any]:
    """Convert and validate one section's raw strings."""
    schema = load_schema(kind)
    props = schema.get("properties", {})
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in props and "__" not in key:
            try:
                flat[key] = convert(value, props[key])
            except ValueError as err:
                raise ConfigError(path, name, key, str(err)) from None
        else:
            flat[key] = value
    try:
        section = _nest(flat)
    except ValueError as err:
        raise ConfigError(path, name, None, str(err)) from None
    validate(path, name, section, kind)
    return section


def validate(path: str, section: str | None, data: Any, kind: str) -> None:
    """Validate ``data`` against the ``kind`` schema; raise :class:`ConfigError` naming the key."""
    validator = jsonschema.Draft202012Validator(load_schema(kind))
    error = next(iter(sorted(validator.iter_errors(data), key=lambda e: e.path)), None)
    if error is not None:
        key = ".".join(str(p) for p in error.path) or None
        problem = error.message
        if error.validator in {"anyOf", "required"}:
            problem = _missing_keys(error)
        raise ConfigError(path, section, key, problem)


def _missing_keys(error: jsonschema.ValidationError) -> str:
    if error.validator == "required":
        return error.message
    options = [" and ".join(s.get("required", [])) for s in error.validator_value]
    return "needs " + " or ".join(o for o in options if o)


def read_ini(path: str | Path, kind: str) -> dict[str, dict[str, Any]]:
    """Read an INI file of ``kind`` ("server", "client" or "mirror") into typed sections."""
    sections, errors = read_ini_sections(path, kind)
    if errors:
        raise errors[0]
    return sections


def read_ini_sections(path: str | Path, kind: str
                      ) -> tuple[dict[str, dict[str, Any]], list[ConfigError]]:
    """Read an INI file of ``kind`` section by section: the typed valid sections, and the
    error of each invalid one. A file that cannot be read or parsed raises :class:`ConfigError`.
    """
    parser = configparser.RawConfigParser()
    parser.optionxform = str  # keys keep their case, as in trollmoves 0.19
    try:
        with open(path) as handle:
            parser.read_file(handle)
    except OSError as err:
        raise ConfigError(path, None, None, f"cannot read: {err.strerror or err}") from None
    except configparser.Error as err:
        raise ConfigError(path, None, None, f"not a valid INI file: {err.message}") from None
    sections: dict[str, dict[str, Any]] = {}
    errors: list[ConfigError] = []
    for name in parser.sections():
        try:
            sections[name] = typed_section(str(path), name, dict(parser.items(name)), kind)
        except ConfigError as err:
            errors.append(err)
    return sections, errors


def load_yaml(path: str | os.PathLike[str]) -> Any:
    """Parse a YAML file; unreadable or malformed files raise :class:`ConfigError`."""
    try:
        with open(path) as handle:
            return yaml.safe_load(handle)
    except OSError as err:
        raise ConfigError(path, None, None, f"cannot read: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(path, None, None, f"not a valid YAML file: {err}") from None


def read_yaml(path: str | Path, kind: str) -> dict[str, Any]:
    """Read a YAML file of ``kind`` (e.g. "s3downloader") and validate it against its schema."""
    data = load_yaml(path)
    validate(str(path), None, data, kind)
    return data


def file_signature(path: str | os.PathLike[str]) -> tuple[int, int, int] | None:
    """Identify a file's current content cheaply (inode, size, mtime); None when absent."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns
