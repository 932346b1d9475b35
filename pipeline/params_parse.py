"""How a plain mapping (read from params.yaml) becomes a frozen params dataclass: each field's
type and rule checked, unknown keys refused, and every problem reported at once, one line each
naming its key path (`ParamsError`). The schema itself is in pipeline/params.py."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Callable

from pipeline.errors import UserError


class ParamsError(UserError):
    """Bad values in params.yaml: one line per problem, each naming its key path."""

    def __init__(self, problems: str | list[str], path: str | Path | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:  # every problem at once, so a small data set is not fixed one run at a time
            where = f"{path}: " if path else ""
            message = (f"{where}{len(self.problems)} problems in the params; fix them all, then "
                       "rerun:\n"
                       + "\n".join(f"  {problem.removeprefix(where)}"
                                    for problem in self.problems))
        super().__init__(message)


# ---------------------------------------------------------------------------------------------
# Field helpers: a rule pairs the description of a good value with a test for it.

Rule = tuple[str, Callable[[Any], bool]]  # (what a good value is, test for it)


def param(default: Any, rule: Rule | None = None) -> Any:
    """A dataclass field with its default and the rule `parse` checks a value against."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: typing.cast(Any, default).copy(),
                     metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


def at_least(low: float) -> Rule:
    return f">= {low:g}", lambda value: value >= low


def above(low: float) -> Rule:
    return f"> {low:g}", lambda value: value > low


def between(low: float, high: float) -> Rule:
    return f"in [{low:g}, {high:g}]", lambda value: low <= value <= high


def one_of(*choices: str) -> Rule:
    return "one of " + ", ".join(choices), lambda value: value in choices


# ---------------------------------------------------------------------------------------------
# Parsing

def parse(cls: type, raw: Any, key_path: str) -> Any:
    """Build dataclass `cls` from a plain mapping, checking keys, types and ranges; raises
    ParamsError listing every bad key."""
    problems: list[str] = []
    parsed = parse_into(cls, raw, key_path, problems)
    if problems:
        raise ParamsError(problems)
    return parsed


def parse_into(cls: type, raw: Any, key_path: str, problems: list[str]) -> Any:
    """`parse`, appending each bad key's line to `problems`; a bad value keeps its default."""
    if not isinstance(raw, dict):
        problems.append(f"{key_path or 'params'}: expected a mapping, got {raw!r}")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in sorted(set(raw) - set(fields), key=str):
        where = f"{key_path}.{name}" if key_path else name
        problems.append(f"{where}: unknown key (known: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        if name not in fields:
            continue
        child_path = f"{key_path}.{name}" if key_path else name
        hint, rule = hints[name], fields[name].metadata.get("rule")
        optional = _optional_of(hint)
        if optional is not None:  # `int | None`: null keeps None, anything else is an int
            if value is None:
                values[name] = None
                continue
            hint = optional
        if hint in (bool, int, float, str):
            converted = _scalar(hint, value)
            if converted is None or (rule and not rule[1](converted)):
                # a string's rule names its choices; a number's qualifies it (">= 0")
                wanted = (rule[0] if hint is str else f"{_describe(hint)} {rule[0]}"
                          ) if rule else _describe(hint)
                if isinstance(value, float) and not math.isfinite(value):
                    wanted = "a finite number" + (f" {rule[0]}" if rule else "")
                problems.append(f"{child_path}: expected {wanted}, got {value!r}")
                continue
            values[name] = converted
        else:
            before = len(problems)
            converted = _convert(hint, value, child_path, problems)
            if len(problems) == before and rule and not rule[1](converted):
                # a list's rule is a whole-value check (a range's order); its own words
                problems.append(f"{child_path}: expected {rule[0]}, got {list(converted)}")
                continue
            if len(problems) == before or dataclasses.is_dataclass(hint) or (
                    typing.get_origin(hint) is dict and converted):
                values[name] = converted  # a section keeps its good keys
    return cls(**values)


def _convert(hint: Any, value: Any, key_path: str, problems: list[str]) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return parse_into(hint, value, key_path, problems)
    if origin is dict:
        _, value_hint = typing.get_args(hint)
        if not isinstance(value, dict) or not value:
            problems.append(f"{key_path}: expected a non-empty mapping, got {value!r}")
            return None
        return {str(k): _convert(value_hint, v, f"{key_path}.{k}", problems)
                for k, v in value.items()}
    if origin is tuple:
        item_hints = typing.get_args(hint)
        if item_hints[-1] is Ellipsis:  # tuple[float, ...]: any length but empty
            item_hints = item_hints[:1] * len(value) if isinstance(value, (list, tuple)) else ()
        items = [_scalar(h, v) for h, v in zip(item_hints, value)] if item_hints else []
        if (not isinstance(value, (list, tuple)) or not value or len(value) != len(item_hints)
                or None in items):
            count = len(item_hints) or "some"
            problems.append(f"{key_path}: expected a list of {count} numbers (finite), got "
                            f"{value!r}")
            return None
        return tuple(items)
    raise TypeError(f"{key_path}: unsupported params type {hint}")  # a schema bug, not user's


def _optional_of(hint: Any) -> Any:
    """X for a hint `X | None`, else None."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) and len(args) == 2 and type(None) in args:
        return next(arg for arg in args if arg is not type(None))
    return None


def _scalar(hint: type, value: Any) -> Any:
    """`value` as type `hint`, or None when it is not one (ints are accepted as floats;
    .inf and .nan are not numbers a run can use)."""
    if hint is bool:
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):
        return None
    if hint is float and isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    return value if isinstance(value, hint) else None


def _describe(hint: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number",
            str: "a string"}[hint]
