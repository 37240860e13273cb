"""Typed reads of config values: a wrong type or an impossible value raises the caller's error class
with the dotted key, e.g. `optimizer.lr: expected a number, got 'abc'` or
`data.samples_per_gpu: expected an integer, got 1.5`.

Numbers may be given as ints, floats or numeric strings ("2e-4"); integers as ints, integral floats
(2.0) or integer strings. Booleans are never numbers.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

__all__ = ["as_number", "as_int", "as_bool", "as_section", "lookup"]


def _bad(error: type[Exception], key: str, what: str, value: Any) -> Exception:
    return error(f"{key}: expected {what}, got {value!r}")


def as_number(value: Any, key: str, error: type[Exception] = ValueError, *, low: float | None = None,
              high: float | None = None, low_open: bool = False, high_open: bool = False,
              finite: bool = True) -> float:
    """`value` as a float within the bounds (`low_open` / `high_open`: the bound itself is excluded)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise _bad(error, key, "a number", value)
    try:
        number = float(value)
    except ValueError:
        raise _bad(error, key, "a number", value) from None
    if math.isnan(number) or (finite and math.isinf(number)):
        raise _bad(error, key, "a finite number", value)
    if low is not None and (number < low or (low_open and number == low)):
        raise error(f"{key}: must be {'>' if low_open else '>='} {low:g}, got {value!r}")
    if high is not None and (number > high or (high_open and number == high)):
        raise error(f"{key}: must be {'<' if high_open else '<='} {high:g}, got {value!r}")
    return number


def as_int(value: Any, key: str, error: type[Exception] = ValueError, *, low: int | None = None) -> int:
    """`value` as an int >= `low` (1.5 and 'abc' are refused, 2.0 and '2' accepted)."""
    if isinstance(value, bool):
        raise _bad(error, key, "an integer", value)
    if isinstance(value, numbers.Integral):
        number = int(value)
    elif isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
        number = int(value)
    elif isinstance(value, str):
        try:
            number = int(value.strip(), 10)
        except ValueError:
            raise _bad(error, key, "an integer", value) from None
    else:
        raise _bad(error, key, "an integer", value)
    if low is not None and number < low:
        raise error(f"{key}: must be >= {low}, got {value!r}")
    return number


def as_bool(value: Any, key: str, error: type[Exception] = ValueError) -> bool:
    """`value` as a bool (true/false, or None / 0 / 1); the string 'false' is refused, not taken as true."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise _bad(error, key, "true or false", value)


def as_section(value: Any, key: str, error: type[Exception] = ValueError) -> dict[str, Any]:
    """A config section as a dict (None: empty)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _bad(error, key, "a mapping", value)
    return dict(value)


def lookup(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """`cfg[a][b]...` for the dotted `key`, or `default` where a part is absent."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node
