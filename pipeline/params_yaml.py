"""params.yaml as plain data, read the way `dvc exp run -S` writes it: numbers as YAML 1.2 reads
them, every duplicated key and alias reported (`read_yaml`), and a file that is not YAML refused
in one line naming where. pipeline/params.py turns the data into the params dataclasses."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from pipeline.params_parse import ParamsError


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 core-schema numbers: `1e-05` and `1e-3` are floats
    (YAML 1.1 needs a dot; DVC writes `-S lr=0.00001` as `1e-05`) and `010` is 10, not octal 8.
    Duplicate keys and aliases are collected in `problems` instead of passing silently."""

    def __init__(self, stream):
        super().__init__(stream)
        self.problems: list[str] = []

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            # dvc#10984: `dvc exp run -S` sets one key and silently de-links the others
            self.problems.append(
                f"{_where(event.start_mark)}alias *{event.anchor}: `dvc exp run -S` changes "
                "only the key it names and silently de-links the others (dvc#10984); write "
                "the value out at each key")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        first: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in first:
                    self.problems.append(
                        f"{_where(key_node.start_mark)}key {key!r} appears twice (first on line "
                        f"{first[key].line + 1}); YAML readers keep one silently: delete one")
                first.setdefault(key, key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    sign, digits = (-1, text[1:]) if text[0] == "-" else (1, text.lstrip("+"))
    base = {"0o": 8, "0x": 16}.get(digits[:2].lower(), 10)
    return sign * int(digits[2:] if base != 10 else digits, base)


_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_ParamsLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _NUMBER_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_ParamsLoader.add_implicit_resolver(  # before float: `10` is an int
    _NUMBER_TAGS[0], re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
_ParamsLoader.add_implicit_resolver(
    _NUMBER_TAGS[1], re.compile(r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))
_ParamsLoader.add_constructor(_NUMBER_TAGS[0], _construct_int)


def _where(mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""


def read_yaml(path: Path) -> tuple[Any, list[str]]:
    """The plain data of a params file and the problems met reading it (duplicate keys,
    aliases); a file that is not YAML raises ParamsError."""
    try:
        with path.open(encoding="utf-8") as stream:
            loader = _ParamsLoader(stream)
            try:
                return loader.get_single_data(), loader.problems
            finally:
                loader.dispose()
    except yaml.YAMLError as error:  # a syntax error, or a tag the safe loader refuses
        raise ParamsError(f"{path}: {_yaml_problem(error)}") from None
    except UnicodeDecodeError as error:
        raise ParamsError(f"{path}: not UTF-8 text (byte {error.start})") from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line: where and what, from PyYAML's multi-line message."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if isinstance(error, yaml.constructor.ConstructorError):
        return (f"{_where(mark)}{problem}; params.yaml holds plain values only (no YAML tags "
                "such as !!python/...)")
    return f"{_where(mark)}not valid YAML ({problem})"
