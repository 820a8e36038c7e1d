"""Validation of configuration values, shared by every core class.

Every constructor in ``core`` checks its arguments here, so that a bad value is
reported the same way wherever it comes from (a CLI flag, a scenario file, a
test): the message names the parameter, the allowed range and the value given.
"""

from __future__ import annotations

import math

from core.errors import DataError

__all__ = ["ConfigError", "number", "integer"]


class ConfigError(DataError, ValueError):
    """A configuration value is outside its allowed range.

    ``field`` names the parameter, ``value`` is what was given.
    """

    def __init__(self, field: str, allowed: str, value: object) -> None:
        super().__init__(f"{field} must be {allowed}, got {value!r}")
        self.field = field
        self.allowed = allowed
        self.value = value


def _describe(kind: str, lo: float | None, hi: float | None, lo_open: bool) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"<= {hi:g}")
    return f"{kind} {' and '.join(parts)}" if parts else kind


def number(field: str, value: object, *, gt: float | None = None, ge: float | None = None,
           le: float | None = None) -> float:
    """Return ``value`` as a finite float within the bounds, or raise ConfigError."""
    lo, lo_open = (gt, True) if gt is not None else (ge, False)
    allowed = _describe("a finite number", lo, le, lo_open)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(field, allowed, value)
    v = float(value)
    if (not math.isfinite(v) or (gt is not None and v <= gt) or (ge is not None and v < ge)
            or (le is not None and v > le)):
        raise ConfigError(field, allowed, value)
    return v


def integer(field: str, value: object, *, ge: int | None = None, le: int | None = None) -> int:
    """Return ``value`` as an int within the bounds, or raise ConfigError."""
    allowed = _describe("an integer", ge, le, False)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(field, allowed, value)
    if (ge is not None and value < ge) or (le is not None and value > le):
        raise ConfigError(field, allowed, value)
    return value
