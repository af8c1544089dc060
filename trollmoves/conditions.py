"""Match message metadata against dispatch conditions.

``conditions`` is a list of condition sets; a file is selected when any set matches (OR). A set
maps field names to tests that must all hold (AND):

- a plain value: the field equals it;
- a list: any of its items holds for the field;
- a string starting with ``==``, ``!=``, ``<``, ``<=``, ``>`` or ``>=``: the field compared
  with the rest of the string, numerically when both sides are numbers (``'<30'``); ``==`` and
  ``!=`` compare as text otherwise (``'!=NOAA-15'``), the ordering operators then fail;
- the key ``except``: a nested set that must *not* match.

A field that the metadata lacks makes its whole set fail, also inside ``except``.
"""

from __future__ import annotations

import logging
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

LOG = logging.getLogger(__name__)

EXCEPT = "except"
_COMPARISON = re.compile(r"^\s*(==|!=|<=|>=|<|>)\s*(.*?)\s*$", re.DOTALL)
_OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
    ">": operator.gt, ">=": operator.ge,
}


class MissingField(KeyError):
    """A condition names a field that the metadata does not have."""


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def parse_comparison(text: str) -> tuple[str, str] | None:
    """Split ``'>=50'`` into ``('>=', '50')``; None when ``text`` is not a comparison."""
    match = _COMPARISON.match(text)
    return (match[1], match[2]) if match else None


def compare(actual: Any, op: str, operand: str) -> bool:
    """Apply one comparison; numeric when both sides are numbers."""
    left, right = _number(actual), _number(operand)
    if left is not None and right is not None:
        return _OPERATORS[op](left, right)
    if op in {"==", "!="}:
        return _OPERATORS[op](str(actual), operand)
    return False


def value_matches(expected: Any, actual: Any) -> bool:
    """Whether one field value satisfies one test (plain value, list or comparison string)."""
    if isinstance(expected, list):
        return any(value_matches(item, actual) for item in expected)
    if isinstance(expected, str):
        comparison = parse_comparison(expected)
        if comparison is not None:
            return compare(actual, *comparison)
    return bool(actual == expected)


def _set_matches(condition_set: Mapping[str, Any], metadata: Mapping[str, Any]) -> bool:
    """AND of the set's tests, then NOT its ``except`` set; raises MissingField."""
    for key, expected in condition_set.items():
        if key == EXCEPT:
            continue
        if key not in metadata:
            raise MissingField(key)
        if not value_matches(expected, metadata[key]):
            return False
    excluded = condition_set.get(EXCEPT)
    return not (isinstance(excluded, Mapping) and _set_matches(excluded, metadata))


def set_matches(condition_set: Mapping[str, Any], metadata: Mapping[str, Any]) -> bool:
    """Whether one condition set (AND of its tests, minus ``except``) matches the metadata."""
    try:
        return _set_matches(condition_set, metadata)
    except MissingField as err:
        LOG.debug("Condition on %s not met: the metadata has no such field", err)
        return False


def conditions_match(conditions: Iterable[Mapping[str, Any]] | None,
                     metadata: Mapping[str, Any]) -> bool:
    """Whether any condition set matches; no conditions at all (None) match everything."""
    if conditions is None:
        return True
    return any(set_matches(condition_set, metadata) for condition_set in conditions)
