"""memllm: self-updatable language models (MemoryLLM and M+).

    import memllm
    model = memllm.load("path/or/hub-id")
    memory = model.new_memory()
    model.inject(memory, "Zorvan Kettle was born in Velmora.")
    model.ask(memory, "Where was Zorvan Kettle born?")
"""

from memllm.checkpoint import CheckpointError, init_from_base, load, save
from memllm.config import MemoryConfig
from memllm.memory import Memory, MemoryFileError, MemoryMismatchError
from memllm.model import MemoryModel

__all__ = [
    "CheckpointError", "Memory", "MemoryConfig", "MemoryFileError", "MemoryMismatchError", "MemoryModel",
    "init_from_base", "load", "save",
]
__version__ = "0.1.0"
