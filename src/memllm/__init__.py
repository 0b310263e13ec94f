"""memllm: self-updatable language models (MemoryLLM and M+).

    import memllm
    model = memllm.load("path/or/hub-id")
    memory = model.new_memory()
    model.inject(memory, "Zorvan Kettle was born in Velmora.")
    model.ask(memory, "Where was Zorvan Kettle born?")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from memllm.core.checkpoint import CheckpointError, init_from_base, load, save
    from memllm.core.config import MemoryConfig
    from memllm.core.memory import Memory, MemoryFileError, MemoryMismatchError
    from memllm.core.model import MemoryModel

# Imported on first use (module __getattr__, PEP 562): torch and transformers take seconds to import,
# and the command line's --help or a memory file's info need neither.
_EXPORTS = {
    "CheckpointError": "memllm.core.checkpoint", "init_from_base": "memllm.core.checkpoint", "load": "memllm.core.checkpoint",
    "save": "memllm.core.checkpoint", "MemoryConfig": "memllm.core.config", "Memory": "memllm.core.memory",
    "MemoryFileError": "memllm.core.memory", "MemoryMismatchError": "memllm.core.memory", "MemoryModel": "memllm.core.model",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'memllm' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
