"""Run settings as dataclasses whose fields document themselves: each field's meaning is its
`metadata["help"]`, so a command line (argparse here, the `memllm` CLI) and the docs read the same
text, and a field added to a config appears everywhere at once.

Field types stay simple (int, float, str, bool, list[str], or an Optional of one of them) so that
any command-line library can build an option from (name, type, default, help); `choices` in the
metadata limits a str field.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any


def option(default: Any = dataclasses.MISSING, help: str = "", choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field carrying its help text (and allowed values) in its metadata."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    return dataclasses.field(default=default, metadata=metadata)


def config_help(cls: type) -> dict[str, str]:
    """Each field's help text with its default, e.g. {"steps": "optimizer steps (default 1000)"}."""
    out = {}
    for f in dataclasses.fields(cls):
        text = f.metadata.get("help", "")
        if f.default is not dataclasses.MISSING and f.default is not None and f.default != "":
            text = f"{text} (default {f.default})".strip()
        out[f.name] = text
    return out


def field_types(cls: type) -> dict[str, tuple[type, bool, bool]]:
    """name -> (base type, optional, list): `float | None` -> (float, True, False)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        hint, optional, many = hints[f.name], False, False
        args = typing.get_args(hint)
        if type(None) in args:
            optional, hint = True, next(a for a in args if a is not type(None))
        if typing.get_origin(hint) is list:
            many, hint = True, typing.get_args(hint)[0]
        out[f.name] = (hint, optional, many)
    return out


def add_arguments(parser: argparse.ArgumentParser, cls: type, required: bool = True) -> None:
    """One `--field-name` option per field of `cls` (`--no-flag` for booleans); an option given
    nowhere keeps the dataclass default (it parses to None)."""
    helps = config_help(cls)
    types = field_types(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        base, _, many = types[f.name]
        kw: dict[str, Any] = {"help": helps[f.name].replace("%", "%%"), "default": None}  # argparse formats help with %
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if many:
            kw["nargs"] = "+"
        parser.add_argument(flag, type=base, required=required and f.default is dataclasses.MISSING, **kw)


def from_namespace(cls: type, ns: argparse.Namespace) -> Any:
    """An instance of `cls` from parsed options; options not given keep the dataclass defaults."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(ns).items() if k in names and v is not None})
