"""Field metadata and its checks, shared by `gain_jax.GainConfig` and the sections of `gain_jax.config.Config`.

A setting is a dataclass field made by `option(default, help, **metadata)`. `metadata["help"]` documents it
(train.py's flags and `--help` are generated from it); optional metadata:
  "choices": a tuple, or a registry dict (`gain_jax.variants`) whose keys are the names;
  "range": (low, high), either None for no bound; the value must also be finite;
  "metavar": the flag's placeholder in `--help`;
  "resume": MUST_MATCH for the settings a resumed run must share with the checkpoint it continues.

`field_problem` and `type_problem` say what is wrong with a value, without the name, so that GainConfig
words its errors "GainConfig.sigma must be ..." and the command line "--sigma must be ...".
Standard library only: gain.py and config.py both import it.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from collections.abc import Mapping
from typing import Any

MUST_MATCH = "must_match"  # metadata["resume"] of the fields a resumed run must keep


def option(default, help: str, **metadata) -> Any:
    """A dataclass field with its `help` text and optional metadata (see the module docstring)."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def choice_names(choices) -> tuple:
    """The names of a "choices" entry: a registry's keys sorted, a tuple as written (the `--help` order)."""
    return tuple(sorted(choices)) if isinstance(choices, Mapping) else tuple(choices)


def field_problem(field: dataclasses.Field, value) -> str | None:
    """What is wrong with `value` for `field`'s "choices" and "range" ("must be one of a, b, got 'c'"),
    or None when nothing is."""
    choices = field.metadata.get("choices")
    if choices is not None and value not in choice_names(choices):
        return f"must be one of {', '.join(sorted(map(str, choice_names(choices))))}, got {value!r}"
    bounds = field.metadata.get("range")
    if bounds is None or value is None:
        return None
    if isinstance(value, numbers.Real) and not math.isfinite(value):
        return f"must be finite, got {value}"
    low, high = bounds
    if low is not None and high is not None and not low <= value <= high:
        return f"must be in [{low:g}, {high:g}], got {value}"
    if low is not None and value < low:
        return f"must be >= {low:g}, got {value}"
    if high is not None and value > high:
        return f"must be <= {high:g}, got {value}"
    return None


def first_field_problem(instance) -> tuple[str, str] | None:
    """(field name, problem) of the first field of a dataclass instance whose value `field_problem` rejects."""
    for field in dataclasses.fields(instance):
        problem = field_problem(field, getattr(instance, field.name))
        if problem is not None:
            return field.name, problem
    return None


def field_types(cls) -> dict[str, Any]:
    """{field name: annotation} of a dataclass, the string annotations of `from __future__ import annotations`
    resolved."""
    return typing.get_type_hints(cls)


def type_parts(annotation, keep_none: bool = False) -> set:
    """The plain types of an annotation such as `int | None` or `float | tuple[float, ...]` ({int},
    {float, tuple}), NoneType included only with `keep_none`."""
    origin = typing.get_origin(annotation)
    parts = typing.get_args(annotation) if origin in (typing.Union, types.UnionType) else (annotation,)
    plain = {typing.get_origin(part) or part for part in parts}
    return plain if keep_none else plain - {type(None)}


def tuple_element(annotation) -> type:
    """The element type of the `tuple[X, ...]` part of an annotation (`float | tuple[float, ...]` -> float,
    `tuple[int, ...] | None` -> int); float when there is none."""
    origin = typing.get_origin(annotation)
    parts = typing.get_args(annotation) if origin in (typing.Union, types.UnionType) else (annotation,)
    for part in parts:
        if typing.get_origin(part) is tuple and typing.get_args(part):
            return typing.get_args(part)[0]
    return float


def type_problem(annotation, value) -> str | None:
    """What is wrong with the type of `value` ("must be int, got '8'"), or None: a value of the annotated
    type, an int where a float is expected, None only where the annotation allows it, no bool for a number."""
    if value is None and type(None) in type_parts(annotation, keep_none=True):
        return None
    plain = type_parts(annotation)
    allowed = tuple(plain | ({int} if float in plain else set()))
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in plain):
        return f"must be {' or '.join(sorted(kind.__name__ for kind in plain))}, got {value!r}"
    if isinstance(value, tuple) and tuple_element(annotation) is int and not all(
            isinstance(item, int) and not isinstance(item, bool) for item in value):
        return f"must be integers, got {value!r}"
    return None
