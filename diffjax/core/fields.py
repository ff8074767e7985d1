"""Typed settings from plain dicts: every config section and stored description goes through here,
so that an unknown or misspelled key is an error naming it and the closest valid one, never a
silent fall-back to a default."""
from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Iterable, Mapping


def closest(name: str, valid: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest valid name, or ''."""
    match = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def check_keys(where: str, given: Iterable[str], valid: Iterable[str], what: str = "key") -> None:
    """Raise ValueError naming every key of `given` not in `valid`, each with its closest match."""
    valid = list(valid)
    unknown = [k for k in given if k not in valid]
    if unknown:
        named = "; ".join(f"{k!r}{closest(k, valid)}" for k in unknown)
        raise ValueError(f"unknown {what}(s) in {where}: {named}. Valid: {', '.join(sorted(valid))}")


def check_choice(where: str, value, choices: Iterable[str]) -> None:
    """Raise ValueError when `value` is not one of `choices`, naming the closest."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{where}={value!r} is not one of {', '.join(map(repr, choices))}"
                         f"{closest(value, choices)}")


def check_finite(where: str, value, *, low=None, high=None, low_open=False, high_open=False):
    """Raise ValueError unless `value` is a finite number in the given (closed unless *_open) range."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}={value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{where}={value!r} must be a finite number")
    below = low is not None and (number <= low if low_open else number < low)
    above = high is not None and (number >= high if high_open else number > high)
    if below or above:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ValueError(f"{where}={value!r} must lie in {interval}")


def names(cls, exclude: Iterable[str] = ()) -> list[str]:
    """The init field names of the dataclass `cls` (a settings class, a flax module), without
    `exclude`."""
    return [f.name for f in dataclasses.fields(cls) if f.init and f.name not in exclude]


def from_dict(cls, values: Mapping[str, Any] | None, where: str | None = None, **overrides):
    """`cls(**values, **overrides)` for a dataclass `cls`, after refusing unknown keys (named, with
    the closest valid one). Lists become tuples, so frozen settings stay hashable."""
    values = dict(values.to_dict() if hasattr(values, "to_dict") else values or {})
    check_keys(where or cls.__name__, values, names(cls), what=f"{cls.__name__} setting")
    values.update(overrides)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def to_dict(settings) -> dict:
    """The init fields of a frozen settings dataclass as a JSON-ready dict (tuples as lists)."""
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    return {f.name: plain(getattr(settings, f.name)) for f in dataclasses.fields(settings)
            if f.init}
