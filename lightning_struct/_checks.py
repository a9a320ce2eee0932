"""Argument checks shared by every layer of the package (no torch, no Lightning).

Each check raises with a message that names who is asking (``where``), the key, the value and
what is allowed, e.g. ``"ForceRegularization: every_n_steps=0 must be an int >= 1"``, and
returns the value normalised (``float`` for numbers, ``list[str]`` for globs).
Booleans are never accepted as numbers (``True`` is an ``int`` in Python).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

__all__ = [
    "check_bool",
    "check_choice",
    "check_globs",
    "check_int",
    "check_number",
    "check_unknown",
    "is_int",
    "is_number",
]

T = TypeVar("T")


def is_number(x: object) -> bool:
    """A real number that is not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def is_int(x: object) -> bool:
    """An int that is not a bool."""
    return isinstance(x, int) and not isinstance(x, bool)


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


def _bounds(minimum: float | None, maximum: float | None, open_min: bool, open_max: bool) -> str:
    parts = []
    if minimum is not None:
        parts.append(f"{'>' if open_min else '>='} {minimum:g}")
    if maximum is not None:
        parts.append(f"{'<' if open_max else '<='} {maximum:g}")
    return " and ".join(parts)


def check_int(
    value: Any,
    name: str,
    where: str = "",
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    optional: bool = False,
) -> int | None:
    """``value`` as an int in ``[minimum, maximum]`` (``None`` allowed when ``optional``)."""
    if value is None and optional:
        return None
    ok = is_int(value) and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        rule = _bounds(minimum, maximum, False, False)
        kind = "None or an int" if optional else "an int"
        raise ValueError(f"{_prefix(where)}{name}={value!r} must be {kind}{' ' + rule if rule else ''}")
    return int(value)


def check_number(
    value: Any,
    name: str,
    where: str = "",
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    open_min: bool = False,
    open_max: bool = False,
    optional: bool = False,
) -> float | None:
    """``value`` as a float within the bounds (``open_*``: the bound itself is excluded)."""
    if value is None and optional:
        return None
    ok = is_number(value) and value == value  # not NaN
    if ok and minimum is not None:
        ok = value > minimum if open_min else value >= minimum
    if ok and maximum is not None:
        ok = value < maximum if open_max else value <= maximum
    if not ok:
        rule = _bounds(minimum, maximum, open_min, open_max)
        kind = "None or a number" if optional else "a number"
        raise ValueError(f"{_prefix(where)}{name}={value!r} must be {kind}{' ' + rule if rule else ''}")
    return float(value)


def check_bool(value: Any, name: str, where: str = "") -> bool:
    """``value`` must be a real bool (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise TypeError(f"{_prefix(where)}{name}={value!r} must be a bool (True or False)")
    return value


def check_choice(value: T, name: str, allowed: Iterable[Any], where: str = "") -> T:
    """``value`` must be one of ``allowed``."""
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"{_prefix(where)}{name}={value!r}; allowed: {', '.join(repr(a) for a in allowed)}")
    return value


def check_globs(value: Any, name: str, where: str = "") -> list[str] | None:
    """``None``, one name glob or a sequence of globs; returned as a list (or ``None``)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return [str(v) for v in value]
    raise TypeError(f"{_prefix(where)}{name} must be None, a name glob or a list of globs; got {value!r}")


def check_unknown(given: Iterable[str], allowed: Iterable[str], what: str, where: str = "") -> None:
    """Raise naming the keys of ``given`` that are not in ``allowed`` (with a close match if any)."""
    import difflib

    allowed = sorted(set(allowed))
    unknown = sorted(set(given) - set(allowed))
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, allowed, n=1)
        if close:
            hints.append(f"{key!r}: did you mean {close[0]!r}?")
    hint = f" ({'; '.join(hints)})" if hints else ""
    raise ValueError(f"{_prefix(where)}unknown {what} {unknown}{hint}; allowed: {allowed}")
