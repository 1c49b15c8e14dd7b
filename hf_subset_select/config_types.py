"""Type checks of config values read from JSON / YAML: does a value fit its dataclass field's annotation.

:func:`check_types` raises :class:`~hf_subset_select.config.ConfigError` naming the first field whose value has the
wrong type (no bool for a number, an int is a valid float, a Literal's type only: ``__post_init__`` checks its value).
"""

from __future__ import annotations

import math
import numbers
import types
import typing
from typing import Any, Literal

__all__ = ["check_types"]


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return f"one of {list(typing.get_args(tp))}"
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) in (list, tuple):
        item = typing.get_args(tp)[0]
        return "a list of " + {bool: "booleans", int: "integers", float: "numbers", str: "strings"}.get(
            item, "items"
        )
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(
        tp, str(tp)
    )


def _matches(value: Any, tp: Any) -> bool:
    """Whether a JSON value fits a field annotation (no bool for a number; an int is a valid float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is Literal:  # the type only: __post_init__ checks the value (registered extensions included)
        return any(isinstance(value, type(c)) and not isinstance(value, bool) for c in typing.get_args(tp))
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_matches(v, typing.get_args(tp)[0]) for v in value)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    return True  # Any or an annotation this checker does not know


def check_types(cls: type, values: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` for the first value that does not fit its field's annotation."""
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        tp = hints.get(name, Any)
        if not _matches(value, tp):
            from .config import ConfigError

            raise ConfigError(
                f"{cls.__name__}.{name} must be {_type_name(tp)}, got {value!r:.60}. Fix the value in the config "
                "file (or dict) and load it again."
            )
