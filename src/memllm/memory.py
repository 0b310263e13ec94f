"""A memory: the state a memory model reads and writes, kept apart from the weights.

One model, many memories: a `Memory` holds the memory pool (and, for M+, the long-term memory), how many
updates it has seen, and the fingerprint of the model whose latent space it lives in. Updates replace
tensors instead of writing into them, so `fork()` is a shallow copy and two forks never affect each other.

On disk a memory is one safetensors file, written atomically (temporary file, fsync, rename) with a
SHA-256 checksum of every tensor in its metadata, so that a crash mid-write leaves the previous version
intact and a damaged file is refused instead of silently loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT = "memllm-memory"
FORMAT_VERSION = 1


class MemoryFileError(ValueError):
    """A memory file that cannot be used: missing, corrupt, or not a memllm memory."""


class MemoryMismatchError(ValueError):
    """A memory that belongs to another model (fingerprint, shape or dtype differ)."""


@dataclass
class Memory:
    """The state of one memory.

    pool: [L, N, d] short-term memory pool, one row per memory vector, oldest first.
    stm_ages: [L, N] int64, M+ only: age of each short-term vector.
    ltm: M+ long-term memory (`memllm.ltm.LongTermMemory`), or None.
    """

    pool: torch.Tensor
    fingerprint: str
    initialized: bool = True
    num_updates: int = 0
    stm_ages: torch.Tensor | None = None
    ltm: Any = None

    @property
    def num_layers(self) -> int:
        return self.pool.shape[0]

    @property
    def size(self) -> int:
        """N, memory vectors per layer."""
        return self.pool.shape[1]

    def fork(self) -> "Memory":
        """An independent copy. Cheap: updates replace tensors, they never write into shared ones."""
        ltm = self.ltm.fork() if self.ltm is not None else None
        return dataclasses.replace(self, ltm=ltm)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Memory":
        """A copy on another device / in another dtype (the LTM stays in host memory)."""
        ages = self.stm_ages.to(device) if self.stm_ages is not None and device is not None else self.stm_ages
        return dataclasses.replace(self, pool=self.pool.to(device=device, dtype=dtype), stm_ages=ages)

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "layers": self.num_layers,
            "memory_vectors_per_layer": self.size,
            "hidden_size": self.pool.shape[2],
            "dtype": str(self.pool.dtype).removeprefix("torch."),
            "device": str(self.pool.device),
            "initialized": self.initialized,
            "updates": self.num_updates,
            "fingerprint": self.fingerprint,
            "bytes": self.pool.numel() * self.pool.element_size(),
        }
        if self.ltm is not None:
            out.update(self.ltm.info())
        return out

    # ---- persistence -------------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"pool": self.pool}
        if self.stm_ages is not None:
            out["stm_ages"] = self.stm_ages
        if self.ltm is not None:
            out.update(self.ltm.state_dict())
        return out

    def save(self, path: str | os.PathLike, shard_bytes: int = 2 << 30) -> Path:
        """Write atomically: `path` is either the old version or the complete new one.

        A long-term memory larger than `shard_bytes` goes to sibling shard files (one or more layers
        each, named with a fresh generation id); the main file, written last by an atomic rename, lists
        them with their checksums, and the previous generation's shards are removed only after it.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors().items()}
        main = {k: v for k, v in tensors.items() if not _is_ltm_layer_tensor(k)}
        ltm_tensors = {k: v for k, v in tensors.items() if _is_ltm_layer_tensor(k)}
        meta = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "fingerprint": self.fingerprint,
            "initialized": json.dumps(self.initialized),
            "num_updates": str(self.num_updates),
        }
        if self.ltm is not None:
            meta["ltm"] = json.dumps(dataclasses.asdict(self.ltm.config))
        shards: list[dict] = []
        if sum(t.numel() * t.element_size() for t in ltm_tensors.values()) > shard_bytes:
            generation = secrets.token_hex(4)
            for i, group in enumerate(_group_by_layer(ltm_tensors, shard_bytes)):
                name = f"{path.name}.{generation}.ltm-{i:05d}.safetensors"
                _atomic_write(group, path.parent / name, {"format": FORMAT + "-shard"})
                shards.append({"file": name, "checksum": _checksum(group), "tensors": sorted(group)})
            meta["shards"] = json.dumps(shards)
        else:
            main.update(ltm_tensors)
        meta["checksum"] = _checksum(main)
        _atomic_write(main, path, meta)
        keep = {s["file"] for s in shards}
        for old in path.parent.glob(f"{path.name}.*.ltm-*.safetensors"):
            if old.name not in keep:
                old.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu", verify: bool = True) -> "Memory":
        """Read a memory file (and its shards). Raises MemoryFileError naming what is wrong.

        Tensors are memory-mapped, not read: a long-term memory of millions of vectors loads without
        entering RAM. `verify` checks every checksum, which streams through the files once.
        """
        path = Path(path)
        if not path.is_file():
            raise MemoryFileError(f"memory file not found: {path}")
        meta, tensors = _read(path, expect=FORMAT)
        if int(meta.get("format_version", "0")) > FORMAT_VERSION:
            raise MemoryFileError(f"{path} was written by a newer memllm (format {meta['format_version']})")
        if verify and _checksum(tensors) != meta.get("checksum"):
            raise MemoryFileError(f"{path} is corrupt: checksum mismatch")
        for shard in json.loads(meta.get("shards", "[]")):
            shard_path = path.parent / shard["file"]
            if not shard_path.is_file():
                raise MemoryFileError(f"{path} is incomplete: its shard {shard['file']} is missing")
            _, part = _read(shard_path, expect=FORMAT + "-shard")
            if verify and _checksum(part) != shard["checksum"]:
                raise MemoryFileError(f"{shard_path} is corrupt: checksum mismatch")
            tensors.update(part)
        ltm = None
        if "ltm" in meta:
            from memllm.ltm import LongTermMemory, LTMConfig

            ltm = LongTermMemory.from_tensors(tensors, LTMConfig(**json.loads(meta["ltm"])))
        return cls(
            pool=tensors["pool"].to(device),
            stm_ages=tensors["stm_ages"].to(device) if "stm_ages" in tensors else None,
            fingerprint=meta["fingerprint"],
            initialized=json.loads(meta["initialized"]),
            num_updates=int(meta["num_updates"]),
            ltm=ltm,
        )


def _is_ltm_layer_tensor(name: str) -> bool:
    return name.startswith("ltm") and name.rsplit(".", 1)[-1].isdigit()


def _group_by_layer(tensors: dict[str, torch.Tensor], shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Whole layers per shard, as many as fit in shard_bytes (at least one)."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        layers.setdefault(name.rsplit(".", 1)[-1], {})[name] = t
    groups: list[dict[str, torch.Tensor]] = []
    size = 0
    for layer in sorted(layers, key=int):
        part = layers[layer]
        nbytes = sum(t.numel() * t.element_size() for t in part.values())
        if not groups or size + nbytes > shard_bytes:
            groups.append({})
            size = 0
        groups[-1].update(part)
        size += nbytes
    return groups


def _atomic_write(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read(path: Path, expect: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and memory-mapped tensors of a safetensors file of the expected kind."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != expect:
                raise MemoryFileError(f"{path} is a safetensors file but not a memllm memory")
            return meta, {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise MemoryFileError(f"{path} is corrupt or not a memory file ({e})") from e


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(-1).view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()
