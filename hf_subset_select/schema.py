"""Small validators for the JSON files the library reads back (cache, selection and meta-init manifests).

A validator is a callable ``check(value, key)`` that returns None or raises :class:`SchemaError` naming the key
(a dotted path such as ``projection.dim`` or ``sources[2]``), what it must be and what it holds. It never raises
anything else, whatever JSON it is given. Each loader turns a :class:`SchemaError` into its own documented error
with the fix (see docs/errors.md).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "SchemaError",
    "Validator",
    "integer",
    "number",
    "string",
    "boolean",
    "hexdigest",
    "optional",
    "list_of",
    "dict_of",
    "obj",
    "anything",
    "file_records",
]

Validator = Callable[[Any, str], None]
_MAX_INT = 2**63 - 1  # int64: what the cache's tensors and JSON consumers can hold


class SchemaError(ValueError):
    """A JSON value of the wrong type or range: ``key`` is its path, ``expected`` says what it must be."""

    def __init__(self, key: str, expected: str, value: Any) -> None:
        self.key, self.expected = key, expected
        super().__init__(f"{key!r} must be {expected}, got {_short(value)}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(lo: int = 0, hi: int = _MAX_INT) -> Validator:
    """An integer (not a bool) in ``[lo, hi]``."""

    def check(value: Any, key: str) -> None:
        if not _is_int(value) or not lo <= value <= hi:
            bound = f">= {lo}" if hi == _MAX_INT else f"in [{lo}, {hi}]"
            raise SchemaError(key, f"an integer {bound}", value)

    return check


def number(lo: float = -math.inf, hi: float = math.inf, *, open_lo: bool = False) -> Validator:
    """A finite number (int or float, not a bool) in ``[lo, hi]`` (``(lo, hi]`` with ``open_lo``)."""

    def check(value: Any, key: str) -> None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value > hi or value < lo or (open_lo and value == lo):
            raise SchemaError(key, f"a finite number in {'(' if open_lo else '['}{lo}, {hi}]", value)

    return check


def string(*, choices: tuple[str, ...] | None = None, nonempty: bool = False) -> Validator:
    """A string (one of ``choices`` when given; not empty with ``nonempty``)."""

    def check(value: Any, key: str) -> None:
        if not isinstance(value, str) or (nonempty and not value):
            raise SchemaError(key, "a non-empty string" if nonempty else "a string", value)
        if choices is not None and value not in choices:
            raise SchemaError(key, f"one of {list(choices)}", value)

    return check


def boolean() -> Validator:
    """``true`` or ``false``."""

    def check(value: Any, key: str) -> None:
        if not isinstance(value, bool):
            raise SchemaError(key, "true or false", value)

    return check


def hexdigest(length: int | None = None) -> Validator:
    """A lowercase hex string (of ``length`` characters when given), e.g. a SHA-256."""
    pattern = re.compile(r"[0-9a-f]+" if length is None else rf"[0-9a-f]{{{length}}}")

    def check(value: Any, key: str) -> None:
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise SchemaError(
                key, f"a hex digest{'' if length is None else f' of {length} characters'}", value
            )

    return check


def anything() -> Validator:
    """Any JSON value (a key whose content the loader does not read)."""
    return lambda value, key: None


def optional(inner: Validator) -> Validator:
    """``null`` or what ``inner`` accepts."""

    def check(value: Any, key: str) -> None:
        if value is not None:
            inner(value, key)

    return check


def list_of(item: Validator, *, unique: bool = False) -> Validator:
    """A list whose every item passes ``item`` (all different with ``unique``)."""

    def check(value: Any, key: str) -> None:
        if not isinstance(value, list):
            raise SchemaError(key, "a list", value)
        for i, v in enumerate(value):
            item(v, f"{key}[{i}]")
        if unique:
            try:
                distinct = len(set(value)) == len(value)
            except TypeError:  # unhashable items: the item validator let them through
                distinct = True
            if not distinct:
                raise SchemaError(key, "a list without duplicates", value)

    return check


def dict_of(item: Validator) -> Validator:
    """An object whose every value passes ``item``."""

    def check(value: Any, key: str) -> None:
        if not isinstance(value, dict):
            raise SchemaError(key, "an object", value)
        for k, v in value.items():
            item(v, f"{key}.{k}")

    return check


def obj(
    required: Mapping[str, Validator],
    optional_keys: Mapping[str, Validator] | None = None,
    *,
    closed: bool = False,
) -> Validator:
    """An object with the ``required`` keys and, when present, the ``optional_keys``; ``closed``: no other keys."""
    optional_keys = optional_keys or {}

    def check(value: Any, key: str) -> None:
        if not isinstance(value, dict):
            raise SchemaError(key, "an object", value)
        for name, validator in required.items():
            path = f"{key}.{name}" if key else name
            if name not in value:
                raise SchemaError(path, "present", "nothing (the key is missing)")
            validator(value[name], path)
        for name, validator in optional_keys.items():
            if name in value:
                validator(value[name], f"{key}.{name}" if key else name)
        if closed:
            extra = sorted(set(value) - set(required) - set(optional_keys))
            if extra:
                raise SchemaError(
                    f"{key}.{extra[0]}" if key else extra[0], "absent (an unknown key)", value[extra[0]]
                )

    return check


def file_records(required: tuple[str, ...], allowed: tuple[str, ...] = ()) -> Validator:
    """A manifest's ``files`` entry: ``{name: {"bytes": int, "sha256": hex}}`` for the ``required`` names and,
    when present, the ``allowed`` ones; no other name (a manifest never points outside its directory)."""
    record = obj({"bytes": integer(), "sha256": hexdigest(64)}, closed=True)
    return obj({name: record for name in required}, {name: record for name in allowed}, closed=True)
