"""Run settings as dataclasses whose fields document themselves: each field's meaning is its
`metadata["help"]`, so the command line (`memllm train`, `memllm recipe tiny`: options built from the
fields) and the docs read the same text, and a field added to a config appears everywhere at once.

Field types stay simple (int, float, str, bool, list[str], or an Optional of one of them) so that
any command-line library can build an option from (name, type, default, help); `choices` in the
metadata limits a str field.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def option(default: Any = dataclasses.MISSING, help: str = "", choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field carrying its help text (and allowed values) in its metadata."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    if isinstance(default, list):  # each instance gets its own copy
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def config_help(cls: type) -> dict[str, str]:
    """Each field's help text with its default, e.g. {"steps": "optimizer steps (default 1000)"}."""
    out = {}
    for f in dataclasses.fields(cls):
        text = f.metadata.get("help", "")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if default is not dataclasses.MISSING and default is not None and default != "" and default != []:
            shown = " ".join(map(str, default)) if isinstance(default, list) else default
            text = f"{text} (default {shown})".strip()
        out[f.name] = text
    return out
