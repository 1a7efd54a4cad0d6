"""One way to validate an experiment config, with one error format.

Every experiment's `validate_config(config)` is built from these checks and runs before any work.
Each failure raises `ConfigError` (a `ValueError`) whose message names the field as the user types
it on the command line, the value given and what is allowed, e.g.

    config.train.num_stepz is not a field (did you mean 'num_steps'?); allowed fields: [...]
    config.sketch_dim=1000: afjl needs m to be a power of two

The runner prints the message alone (no traceback) and exits with code 2.
"""
from __future__ import annotations

import difflib
from typing import Any, Iterable, Mapping, Sequence

__all__ = [
    "ConfigError", "check_fields", "require_sections", "integer", "number", "one_of", "names_from", "sketch_fits",
]


class ConfigError(ValueError):
    """A config field the run would reject; the message names the field and the allowed values."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate most similar to `name` (difflib ratio ≥ 0.6), or None."""
    matches = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1)
    return matches[0] if matches else None


def unknown_field_message(where: str, name: str, allowed: Iterable[str], context: str = "") -> str:
    allowed = sorted(str(a) for a in allowed)
    suggestion = closest(name, allowed)
    hint = f" (did you mean {suggestion!r}?)" if suggestion else ""
    return f"{where}.{name} is not a field{context}{hint}; allowed fields: {allowed}"


def check_fields(where: str, section: Mapping, allowed: Iterable[str], context: str = "") -> None:
    """Every key of `section` (the config section at `where`, e.g. "config.train") is in `allowed`;
    `context` is appended to the message (e.g. " of model 'mlp'")."""
    allowed = set(allowed)
    for name in sorted(set(section) - allowed):
        raise ConfigError(unknown_field_message(where, name, allowed, context))


def require_sections(config: Mapping, names: Sequence[str], where: str = "config") -> None:
    for name in names:
        if name not in config:
            raise ConfigError(f"{where}.{name} is missing")


def integer(where: str, value: Any, low: int | None = 1, high: int | None = None) -> int:
    """An int (not a bool) in [low, high] (None: unbounded on that side); returns it."""
    if not _is_int(value) or (low is not None and value < low) or (high is not None and value > high):
        if low is None and high is None:
            allowed = "an int"
        elif high is None:
            allowed = f"an int >= {low}"
        elif low is None:
            allowed = f"an int <= {high}"
        else:
            allowed = f"an int in [{low}, {high}]"
        raise ConfigError(f"{where}={value!r}; allowed values: {allowed}")
    return value


def number(where: str, value: Any, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number in the interval given by low/high (closed unless *_open); returns it."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value \
        and value not in (float("inf"), float("-inf"))
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        interval = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ConfigError(f"{where}={value!r}; allowed values: a finite number in {interval}")
    return float(value)


def one_of(where: str, value: Any, allowed: Sequence, context: str = "") -> Any:
    """`value` is one of `allowed`; `context` is added to the message (e.g. " with config.data.name='digits'")."""
    if value not in allowed:
        suggestion = closest(value, allowed) if isinstance(value, str) else None
        hint = f" (did you mean {suggestion!r}?)" if suggestion else ""
        raise ConfigError(f"{where}={value!r}{context}{hint}; allowed values: {list(allowed)}")
    return value


def names_from(where: str, values: Any, allowed: Sequence, *, nonempty: bool = True) -> tuple:
    """A list/tuple of distinct names, each in `allowed`; returns it as a tuple."""
    if not isinstance(values, (list, tuple)):
        raise ConfigError(f"{where}={values!r}; allowed values: a list from {list(allowed)}")
    values = tuple(values)
    if nonempty and not values:
        raise ConfigError(f"{where} is empty; allowed values: a list from {list(allowed)}")
    for value in values:
        one_of(f"{where} entry", value, allowed)
    if len(set(values)) != len(values):
        raise ConfigError(f"{where}={list(values)} has duplicates")
    return values


def sketch_fits(where: str, name: str, m: int, template: Any, **options) -> None:
    """The sketch `name` with target dimension m (and options) can be built for `template` (a
    parameter PyTree or ShapeDtypeStructs): runs the sketch's own init checks abstractly (no arrays
    are allocated), so a constraint such as "m must be a power of two" fails before any training."""
    import jax

    import sketching

    one_of(f"{where} sketch", name, sketching.NAMES)
    try:
        sketch = sketching.get(name, m, **options)
        jax.eval_shape(lambda key: sketch.init(key, template), jax.random.key(0))
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{where}={m!r} with sketch {name!r}: {error}") from None
