"""A memory: the state a memory model reads and writes, kept apart from the weights.

One model, many memories: a `Memory` holds the memory pool (and, for M+, the long-term memory), how many
updates it has seen, and the fingerprint of the model whose latent space it lives in. Updates replace
tensors instead of writing into them, so `fork()` is a shallow copy and two forks never affect each other.

On disk a memory is one safetensors file (plus long-term memory shards when large), written atomically
(temporary file, fsync, rename) under a cross-process lock, with a SHA-256 checksum of every tensor and
metadata field, so that a crash mid-write leaves the previous version intact, concurrent writers do not
lose each other's updates, and a damaged or edited file is refused instead of silently loaded.

Provenance: every short-term row (`sources` [L, N]) and every long-term row carries the id of the update
that wrote it: 0 for the memory a model starts from, u = 1, 2, ... for the u-th update (`num_updates`
counts them; ids are never reused). `forget` removes an update's rows; `diff` compares two memories (forks
share the tags of the updates they had in common). Files may store the pool and the long-term memory in
bfloat16 or int8 with a scale per row (`save(..., dtype=)`); they load back in the dtype they were held
in. See docs/memory.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from memllm.core import ops
from memllm.core.ltm import INITIAL_SOURCE, UNKNOWN_SOURCE, LongTermMemory, LTMConfig

FORMAT = "memllm-memory"
# 2: the checksum covers the metadata too; 3: provenance (sources, update_log, forgotten) and compact
# storage. Older files still load (their rows' sources: see `Memory.load`).
FORMAT_VERSION = 3

# How a file may store its rows (`Memory.save(dtype=)`); the row tensors are the pool and the long-term
# memory's vectors and keys (ages, frequencies and ids are always stored exactly).
STORAGE_DTYPES = ("float32", "bfloat16", "float16", "int8")
_ROW_TENSORS = ("pool", "ltm", "ltm_keys", "ltm_cache", "ltm_cache_keys")


class MemoryFileError(ValueError):
    """A memory file that cannot be used: missing, corrupt, or not a memllm memory."""


class MemoryLockedError(MemoryFileError):
    """Another process (or thread) holds a memory's lock longer than the caller was willing to wait."""


@contextmanager
def lock(path: str | os.PathLike, timeout: float | None = None) -> Iterator[None]:
    """Hold the exclusive cross-process lock of the memory file `path` (load -> update -> save under it).

    The lock is an flock on `<name>.lock` beside the memory (beside the symlink's target for a link), so
    the kernel drops it when its holder dies: a killed process never blocks the memory forever. It is
    reentrant in the same thread (`Memory.save` takes it too) and excludes other threads and processes.
    filelock's singleton registry gives one lock object per path per process; it is weak, so no state
    outlives the holders. `timeout` None waits forever; on timeout raises MemoryLockedError.
    """
    target = _resolve(Path(path))
    if not target.parent.is_dir():
        why = "is not a directory" if target.parent.exists() else "does not exist"
        raise MemoryFileError(f"cannot lock memory {path}: {target.parent} {why}")
    file_lock = filelock.FileLock(target.parent / f"{target.name}.lock", is_singleton=True)
    try:
        file_lock.acquire(timeout=-1 if timeout is None else timeout)
    except filelock.Timeout:
        raise MemoryLockedError(f"memory {path} is locked by another writer (still after {timeout} s)") from None
    except OSError as e:
        raise MemoryFileError(f"cannot lock memory {path}: {_reason(e)}") from None
    try:
        yield
    finally:
        file_lock.release()


def _resolve(path: Path) -> Path:
    """The file a memory path names: symlinks followed, so every link to one memory shares its lock."""
    return path.expanduser().resolve()


class MemoryMismatchError(ValueError):
    """A memory that belongs to another model (fingerprint, shape or dtype differ)."""


class UnknownUpdateError(ValueError):
    """An update id a memory does not have (or whose rows it cannot find)."""


@dataclass
class Memory:
    """The state of one memory.

    pool: [L, N, d] short-term memory pool, one row per memory vector, oldest first.
    stm_ages: [L, N] int64, M+ only: age of each short-term vector.
    ltm: M+ long-term memory, or None.
    sources: [L, N] int64, the update that wrote each short-term row (0: the initial pool, -1: unknown).
        Left None it is filled: 0 for a memory that has seen no update, -1 (unknown) otherwise.
    update_log: [U, 2] int64, row u-1 for update u: a random 63-bit tag (so two forks' updates that got
        the same id are told apart) and the rows it wrote over all layers; 0 where not recorded.
    forgotten: the update ids removed with `forget`.
    storage: how `save` stores the rows by default (one of STORAGE_DTYPES; None: as held); a memory
        loaded from a compact file keeps its file's storage.
    """

    pool: torch.Tensor
    fingerprint: str
    initialized: bool = True
    num_updates: int = 0
    stm_ages: torch.Tensor | None = None
    ltm: LongTermMemory | None = None
    sources: torch.Tensor | None = None
    update_log: torch.Tensor | None = None
    forgotten: tuple[int, ...] = ()
    storage: str | None = None

    def __post_init__(self) -> None:
        if self.sources is None and self.pool.dim() == 3:
            fill = INITIAL_SOURCE if self.num_updates == 0 else UNKNOWN_SOURCE
            self.sources = torch.full(self.pool.shape[:2], fill, dtype=torch.long, device=self.pool.device)
        if self.update_log is None:
            self.update_log = torch.zeros(0, 2, dtype=torch.long)

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
        """A copy on another device / in another dtype (the LTM stays in host memory; its vectors
        take the dtype too, e.g. bfloat16 to hold a long-term memory in half the RAM).

        `torch.int8` holds the long-term memory's rows as int8 with a scale per row (about a quarter
        of float32; retrieval dequantises only the rows it returns) and leaves the short-term pool as
        it is: every layer reads all N pool rows at every step, so the pool is held in a float dtype
        (bfloat16 for half the bytes)."""
        if dtype == torch.int8:
            if self.ltm is None:
                raise ValueError("int8 holds a long-term memory; this memory has none (save(dtype='int8') "
                                 "stores a short-term pool compactly)")
            return dataclasses.replace(self.to(device), ltm=self.ltm.to(torch.int8))
        ages = self.stm_ages.to(device) if self.stm_ages is not None and device is not None else self.stm_ages
        sources = self.sources.to(device) if self.sources is not None and device is not None else self.sources
        ltm = self.ltm.to(dtype) if self.ltm is not None and dtype is not None else self.ltm
        return dataclasses.replace(self, pool=self.pool.to(device=device, dtype=dtype), stm_ages=ages,
                                   sources=sources, ltm=ltm)

    # ---- provenance --------------------------------------------------------------------------

    def record_update(self, kept: torch.Tensor | None, rows: int, carried: torch.Tensor | None = None) -> int:
        """Label the rows an update just appended (after `ops.write_pool` with `kept` [L, N - k]; None:
        the update filled the whole pool) and log it. Returns its id. Called by the update itself.
        `carried` [L, n]: the sources of the rows the first n new rows were computed from alone
        (`inject.update`); those rows keep them and count as rows of those updates in the log."""
        update = self.num_updates + 1
        log = self._log()
        if kept is None:
            self.sources = torch.full_like(self.sources, update)
        else:
            self.sources = ops.write_ids(self.sources, torch.tensor(update), kept)
        if carried is not None and carried.numel():
            start = kept.shape[-1]  # the first new row
            self.sources[:, start:start + carried.shape[-1]] = carried.to(self.sources)
            ids, counts = torch.unique(carried.cpu(), return_counts=True)
            log = log.clone()  # the carried rows count as rows of the updates they came from
            for u, c in zip(ids.tolist(), counts.tolist()):
                if 1 <= u <= log.shape[0]:
                    log[u - 1, 1] += c
            rows -= carried.numel()
        entry = torch.tensor([[secrets.randbits(63), rows]], dtype=torch.long)
        self.update_log = torch.cat([log, entry])
        self.num_updates = update
        return update

    def _log(self) -> torch.Tensor:
        """update_log with exactly num_updates rows: updates made without recording (pools changed by
        hand, files from before provenance) get zeros, i.e. unknown."""
        log = self.update_log[: self.num_updates]
        missing = self.num_updates - log.shape[0]
        return torch.cat([log, log.new_zeros(missing, 2)]) if missing else log

    def source_counts(self) -> dict[int, tuple[int, int]]:
        """Per source update id: (short-term rows, long-term rows incl. the cache), over all layers."""
        values, counts = torch.unique(self.sources.cpu(), return_counts=True)
        stm = dict(zip(values.tolist(), counts.tolist()))
        ltm = self.ltm.source_counts() if self.ltm is not None else {}
        return {u: (stm.get(u, 0), ltm.get(u, 0)) for u in sorted(stm.keys() | ltm.keys())}

    def provenance(self) -> list[dict[str, Any]]:
        """One entry per update that still has rows or was forgotten (and the initial memory, id 0):
        rows in short-term and long-term memory, and their share of the rows the update wrote."""
        counts = self.source_counts()
        written = self._log()[:, 1].tolist()
        out = []
        for u in sorted(counts.keys() | set(self.forgotten)):
            stm, ltm = counts.get(u, (0, 0))
            wrote = written[u - 1] if 1 <= u <= len(written) and written[u - 1] > 0 else None
            out.append({"update": u, "stm_rows": stm, "ltm_rows": ltm, "written": wrote,
                        "stm_share": stm / wrote if wrote else None, "ltm_share": ltm / wrote if wrote else None,
                        "forgotten": u in self.forgotten})
        return out

    def forget(self, update_ids: "int | list[int] | tuple[int, ...]", initial_pool: torch.Tensor) -> dict[str, int]:
        """Remove the rows the given updates wrote, from short-term memory and from long-term memory
        (rows, cache and index), and mark the updates forgotten.

        Refill rule: a layer's f freed short-term slots move to its front (the oldest end) and take the
        rows `initial_pool` [L, N, d] (the model's) has at positions 0..f-1, as a fresh memory holds them,
        source 0, with the layer's largest short-term age (they count as its oldest rows); the survivors
        follow in their order. Rows that later updates wrote while attending to the forgotten rows keep
        what they took from them: forgetting is exact for the rows, not for their influence.
        Refuses ids the memory never had (or whose rows it cannot tell apart) before changing anything.
        Returns {"stm_rows": ..., "ltm_rows": ...} removed.
        """
        ids = sorted({update_ids} if isinstance(update_ids, int) else set(update_ids))
        if not ids:
            raise UnknownUpdateError("no update id to forget")
        for u in ids:
            if isinstance(u, bool) or not isinstance(u, int) or not 1 <= u <= self.num_updates:
                have = f"updates 1..{self.num_updates}" if self.num_updates else "no updates"
                raise UnknownUpdateError(f"unknown update {u!r}: this memory has {have}")
        if tuple(initial_pool.shape) != tuple(self.pool.shape):
            raise MemoryMismatchError(f"initial pool of shape {tuple(initial_pool.shape)} for a memory of shape "
                                      f"{tuple(self.pool.shape)}: it belongs to another model")
        counts = self.source_counts()
        if UNKNOWN_SOURCE in counts:
            lost = [u for u in ids if u not in counts and u not in self.forgotten]
            if lost:
                raise UnknownUpdateError(f"cannot forget update {lost[0]}: its rows, if any remain, are among "
                                         f"rows written before memllm recorded provenance")
        doomed = torch.tensor(ids, dtype=torch.long)
        order, refill = ops.forget_order(self.sources, doomed)  # [L, N] each
        rows = ops.gather_rows(self.pool, order)
        self.pool = torch.where(refill.unsqueeze(-1), initial_pool.to(self.pool), rows)
        self.sources = torch.where(refill, INITIAL_SOURCE, self.sources.gather(1, order))
        if self.stm_ages is not None:
            oldest = self.stm_ages.amax(dim=1, keepdim=True).expand_as(self.stm_ages)
            self.stm_ages = torch.where(refill, oldest, self.stm_ages.gather(1, order))
        if self.ltm is not None:
            self.ltm.forget(doomed)
        self.forgotten = tuple(sorted(set(self.forgotten) | set(ids)))
        return {"stm_rows": sum(counts.get(u, (0, 0))[0] for u in ids),
                "ltm_rows": sum(counts.get(u, (0, 0))[1] for u in ids)}

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
            "forgotten": list(self.forgotten),
        }
        if self.ltm is not None:
            out.update(self.ltm.info())
        return out

    # ---- persistence -------------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"pool": self.pool, "sources": self.sources, "update_log": self._log()}
        if self.stm_ages is not None:
            out["stm_ages"] = self.stm_ages
        if self.ltm is not None:
            out.update(self.ltm.state_dict())
        return out

    def save(self, path: str | os.PathLike, shard_bytes: int = 2 << 30, dtype: str | None = None) -> Path:
        """Write atomically, under the memory's lock: `path` is either the old version or the complete new one.

        `dtype`: how the file stores the pool and the long-term vectors and keys, one of STORAGE_DTYPES
        ("int8": a float32 scale per row, |error| <= scale / 2 = max|row| / 254); None: `self.storage`
        (as held, unless the memory was loaded from a compact file). The file loads back in the dtype
        the memory was held in.

        A symlink is written through (its target is replaced, the link stays) and an existing file keeps its
        mode; a read-only file is refused. A long-term memory larger than `shard_bytes` goes to sibling shard
        files named after the memory and a fresh generation id; the main file, written last by an atomic
        rename, lists them with their checksums, and the shards the previous main file listed are removed
        only after it. Temporary files and orphan shards that a killed save left are swept here.
        """
        dtype = dtype if dtype is not None else self.storage
        if dtype is not None and dtype not in STORAGE_DTYPES:
            raise ValueError(f"unknown storage dtype {dtype!r}: use one of {', '.join(STORAGE_DTYPES)}")
        path = Path(path)
        target = _resolve(path)
        if target.is_dir():
            raise MemoryFileError(f"cannot save memory {path}: it is a directory")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise MemoryFileError(f"cannot save memory {path}: {target.parent} is not a directory") from None
        except OSError as e:
            raise MemoryFileError(f"cannot save memory {path}: {_reason(e)} (creating its directory)") from None
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors().items()}
        tensors, held = _compact(tensors, dtype)
        main = {k: v for k, v in tensors.items() if not _is_ltm_layer_tensor(k)}
        ltm_tensors = {k: v for k, v in tensors.items() if _is_ltm_layer_tensor(k)}
        generation = secrets.token_hex(4)
        meta = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "generation": generation,
            "fingerprint": self.fingerprint,
            "initialized": json.dumps(self.initialized),
            "num_updates": str(self.num_updates),
            "forgotten": json.dumps(list(self.forgotten)),
        }
        if dtype is not None:
            meta["storage"] = json.dumps({"dtype": dtype, "held": held})
        if self.ltm is not None:
            meta["ltm"] = json.dumps(dataclasses.asdict(self.ltm.config))
        shards: list[dict] = []
        with lock(target):
            started = time.time()
            mode = _existing_mode(target, path)
            old_shards = _listed_shards(target)
            try:
                if sum(t.numel() * t.element_size() for t in ltm_tensors.values()) > shard_bytes:
                    for i, group in enumerate(_group_by_layer(ltm_tensors, shard_bytes)):
                        name = f"{target.name}.{generation}.ltm-{i:05d}.safetensors"
                        shard_meta = {"format": FORMAT + "-shard", "generation": generation}
                        _atomic_write(group, target.parent / name, shard_meta, mode, owner=target.name)
                        shards.append({"file": name, "checksum": _checksum(group), "tensors": sorted(group)})
                    meta["shards"] = json.dumps(shards)
                else:
                    main.update(ltm_tensors)
                meta["checksum"] = _checksum(main, meta)
                _atomic_write(main, target, meta, mode, owner=target.name)
            except (OSError, SafetensorError) as e:
                for shard in shards:
                    (target.parent / shard["file"]).unlink(missing_ok=True)
                reason = f"{_reason(e)} (the previous version is intact)"
                raise MemoryFileError(f"cannot save memory {path}: {reason}") from None
            _fsync_dir(target.parent, path)
            _remove_leftovers(target, old_shards, {s["file"] for s in shards}, started)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu", verify: bool = True) -> "Memory":
        """Read a memory file (and its shards). Raises MemoryFileError naming what is wrong.

        Files from before provenance (no `sources`): every row gets source 0 (the initial memory) if
        the memory had seen no update, else -1 (unknown); their updates' tags are unknown (0).
        Compactly stored rows are dequantised here, to the dtype the memory was held in.

        Tensors are memory-mapped, not read: a long-term memory of millions of vectors loads without
        entering RAM. `verify` checks every checksum, which streams through the files once. Loading takes
        no lock: a read that a concurrent save overlapped (the file replaced while safetensors opened it,
        or the shards it listed removed) is seen by the file's identity changing and done again.
        """
        path = Path(path)
        if path.is_dir():
            raise MemoryFileError(f"{path} is a directory, not a memory file")
        if not path.is_file():
            raise MemoryFileError(f"memory file not found: {path}")
        for _ in range(10):
            identity = _identity(path)
            try:
                meta, main = _read(path, expect=FORMAT)
                header = _parse_header(path, meta)
                shards = [(shard, _read_shard(path, shard)) for shard in header.shards]
            except MemoryFileError:
                if _identity(path) != identity:
                    continue
                raise
            if _identity(path) == identity:
                break
        else:
            raise MemoryFileError(f"{path} kept changing while being read; try again")
        if verify and _checksum(main, meta if header.version >= 2 else None) != header.checksum:
            raise MemoryFileError(f"{path} is corrupt: checksum mismatch")
        tensors = dict(main)
        for shard, part in shards:
            if verify and _checksum(part) != shard["checksum"]:
                raise MemoryFileError(f"{_resolve(path).parent / shard['file']} is corrupt: checksum mismatch")
            tensors.update(part)
        if header.storage is not None:
            tensors = _expand(path, tensors, header.storage)
        return cls._from_tensors(path, header, tensors, device)

    @classmethod
    def _from_tensors(
        cls, path: Path, header: "_Header", tensors: dict[str, torch.Tensor], device: torch.device | str
    ) -> "Memory":
        pool, ages = tensors.get("pool"), tensors.get("stm_ages")
        if pool is None or pool.dim() != 3 or not pool.is_floating_point():
            raise MemoryFileError(f"{path} has no valid memory pool (a float tensor [layers, N, d])")
        if ages is not None and tuple(ages.shape) != tuple(pool.shape[:2]):
            raise MemoryFileError(f"{path} has stm_ages of shape {tuple(ages.shape)}, not {tuple(pool.shape[:2])}")
        sources, log = tensors.get("sources"), tensors.get("update_log")
        if sources is not None and (tuple(sources.shape) != tuple(pool.shape[:2]) or sources.is_floating_point()):
            raise MemoryFileError(f"{path} has sources of shape {tuple(sources.shape)} ({sources.dtype}), not "
                                  f"integers of shape {tuple(pool.shape[:2])}")
        if log is not None and (log.dim() != 2 or log.shape[1] != 2 or log.is_floating_point()):
            raise MemoryFileError(f"{path} has an update_log of shape {tuple(log.shape)}, not [updates, 2] integers")
        missing = INITIAL_SOURCE if header.num_updates == 0 else UNKNOWN_SOURCE
        ltm = None
        if header.ltm is not None:
            try:
                ltm = LongTermMemory.from_tensors(tensors, header.ltm, missing_source=missing)
            except KeyError as e:
                raise MemoryFileError(f"{path} is incomplete: its long-term memory lacks tensor {e}") from None
            except ValueError as e:
                raise MemoryFileError(f"{path} is corrupt: {e}") from None
        return cls(
            pool=pool.to(device),
            stm_ages=ages.to(device) if ages is not None else None,
            fingerprint=header.fingerprint,
            initialized=header.initialized,
            num_updates=header.num_updates,
            ltm=ltm,
            sources=(sources.to(device, torch.long) if sources is not None
                     else torch.full(tuple(pool.shape[:2]), missing, dtype=torch.long, device=device)),
            update_log=log.to(torch.long) if log is not None else None,
            forgotten=header.forgotten,
            storage=header.storage["dtype"] if header.storage is not None else None,
        )


@dataclass(frozen=True)
class _Header:
    """The validated metadata of a memory file."""

    version: int
    checksum: str
    fingerprint: str
    initialized: bool
    num_updates: int
    ltm: LTMConfig | None
    shards: list[dict]
    forgotten: tuple[int, ...] = ()
    storage: dict | None = None  # {"dtype": how rows are stored, "held": {row tensor kind: dtype on load}}


def _parse_header(path: Path, meta: dict[str, str]) -> _Header:
    """Every metadata field checked, so a damaged or hand-edited header gives one clear error."""

    def bad(field: str, why: str) -> MemoryFileError:
        value = meta.get(field)
        shown = "missing" if value is None else f"got {value[:60]!r}"
        return MemoryFileError(f"{path} has a bad header field {field!r}: {why} ({shown})")

    def json_field(field: str) -> Any:
        try:
            return json.loads(meta[field])
        except (KeyError, ValueError):
            raise bad(field, "expected JSON") from None

    if not _DIGITS.fullmatch(meta.get("format_version", "")) or int(meta["format_version"]) < 1:
        raise bad("format_version", "expected a positive integer")
    version = int(meta["format_version"])
    if version > FORMAT_VERSION:
        raise MemoryFileError(f"{path} was written by a newer memllm (format {version})")
    checksum = meta.get("checksum", "")
    if not _SHA256.fullmatch(checksum):
        raise bad("checksum", "expected a SHA-256 hex digest")
    if not meta.get("fingerprint"):
        raise bad("fingerprint", "expected the model's fingerprint")
    if "generation" in meta and not _GENERATION.fullmatch(meta["generation"]):
        raise bad("generation", "expected 8 hex digits")
    initialized = json_field("initialized")
    if not isinstance(initialized, bool):
        raise bad("initialized", "expected true or false")
    if not _DIGITS.fullmatch(meta.get("num_updates", "")):
        raise bad("num_updates", "expected a non-negative integer")
    ltm = None
    if "ltm" in meta:
        config = json_field("ltm")
        if not isinstance(config, dict):
            raise bad("ltm", "expected an object of the long-term memory's settings")
        try:
            ltm = LTMConfig.from_dict(config, strict=True)
        except ValueError as e:
            raise bad("ltm", str(e)) from None
    shards = json_field("shards") if "shards" in meta else []
    if not isinstance(shards, list) or not all(
        isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("checksum"), str) for s in shards
    ):
        raise bad("shards", "expected a list of {file, checksum, tensors}")
    for s in shards:
        if not _is_plain_name(s["file"]):
            raise bad("shards", f"shard {s['file'][:60]!r} is not a file name in the memory's own directory")
    forgotten = json_field("forgotten") if "forgotten" in meta else []
    if not isinstance(forgotten, list) or not all(isinstance(u, int) and not isinstance(u, bool) for u in forgotten):
        raise bad("forgotten", "expected a list of update ids")
    storage = json_field("storage") if "storage" in meta else None
    if storage is not None and not (
        isinstance(storage, dict) and storage.get("dtype") in STORAGE_DTYPES and isinstance(storage.get("held"), dict)
        and all(k in _ROW_TENSORS and (v in STORAGE_DTYPES[:3] or (k == "ltm" and v == "int8"))
                for k, v in storage["held"].items())
    ):
        raise bad("storage", "expected {dtype, held} naming how the rows are stored")
    return _Header(version, checksum, meta["fingerprint"], initialized, int(meta["num_updates"]), ltm, shards,
                   tuple(forgotten), storage)


def _read_shard(path: Path, shard: dict) -> dict[str, torch.Tensor]:
    shard_path = _resolve(path).parent / shard["file"]
    if not shard_path.is_file():
        raise MemoryFileError(f"{path} is incomplete: its shard {shard['file']} is missing")
    return _read(shard_path, expect=FORMAT + "-shard")[1]


_GENERATION = re.compile(r"[0-9a-f]{8}")
_SHARD = re.compile(r".+\.[0-9a-f]{8}\.ltm-[0-9]{5}\.safetensors")  # `<memory>.<generation>.ltm-<i>.safetensors`
_DIGITS = re.compile(r"[0-9]{1,18}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _is_plain_name(name: str) -> bool:
    """A bare file name: no directory part, not `.`/`..`, so it can only name a file beside the memory."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _existing_mode(target: Path, path: Path) -> int | None:
    """The mode a save must keep (None for a new file); refuses what must not be replaced."""
    try:
        st = target.stat()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise MemoryFileError(f"cannot save memory {path}: {_reason(e)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise MemoryFileError(f"cannot save memory {path}: it is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise MemoryFileError(f"cannot save memory {path}: it is not a regular file")
    # Root may write anything: a file without any write bit is read-only by intent.
    if not st.st_mode & 0o222 or not os.access(target, os.W_OK):
        raise MemoryFileError(f"cannot save memory {path}: the file is read-only (mode {stat.S_IMODE(st.st_mode):04o})")
    return stat.S_IMODE(st.st_mode)


def _listed_shards(target: Path) -> set[str]:
    """The shard files a memory file lists (nothing if it is absent, unreadable or not a memory)."""
    try:
        with safe_open(str(target), framework="pt") as f:
            meta = f.metadata() or {}
        shards = json.loads(meta.get("shards", "[]")) if meta.get("format") == FORMAT else []
        return {s["file"] for s in shards if _is_plain_name(s["file"])}
    except (OSError, SafetensorError, ValueError, TypeError, KeyError):
        return set()


def _remove_leftovers(target: Path, old_shards: set[str], keep: set[str], started: float) -> None:
    """Remove the previous version's shards and what killed saves of this memory left behind.

    Called with the lock held, after the new main file is in place. Temporary files and orphan shards are
    found by the memory's exact name followed by a fixed-length suffix, so no other memory's files match
    (saving `notes.mem` never touches `notes.mem.bak`'s). A shard that another memory file in the
    directory lists (a copied or renamed main file) is kept.
    """
    name = re.escape(target.name)
    temp = re.compile(rf"\.{name}\.[0-9a-f]{{8}}\.tmp")
    orphan = re.compile(rf"{name}\.[0-9a-f]{{8}}\.ltm-[0-9]{{5}}\.safetensors")
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return
    doomed = {n for n in old_shards if _SHARD.fullmatch(n)}
    for entry in entries:
        try:
            stale = entry.stat(follow_symlinks=False).st_mtime < started
        except OSError:
            continue
        if stale and temp.fullmatch(entry.name):
            _remove(Path(entry.path))
        elif stale and orphan.fullmatch(entry.name):
            doomed.add(entry.name)
    doomed -= keep
    if doomed:
        for entry in entries:
            maybe_memory = not _SHARD.fullmatch(entry.name) and not entry.name.endswith((".tmp", ".lock"))
            if entry.name != target.name and maybe_memory and entry.is_file():
                doomed -= _listed_shards(Path(entry.path))
    for shard in doomed:
        _remove(target.parent / shard)


def _remove(path: Path) -> None:
    """Best-effort removal of a leftover: the save itself already succeeded."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def _reason(e: BaseException) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e)


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


def _atomic_write(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str], mode: int | None,
                  owner: str) -> None:
    """Write `path` by rename from a temporary directory `.<owner>.<random>.tmp` beside it.

    safetensors writes through its own `.tmpXXXX` file; inside our directory, every leftover of a killed
    save carries the memory's name and is swept by its next save. `mode` None: the umask's default.
    """
    tmp = path.parent / f".{owner}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir(mode=0o777)
    try:
        if mode is None:
            mode = stat.S_IMODE(tmp.stat().st_mode) & 0o666  # 0o777 less the umask, without changing it
        data = tmp / "data"
        save_file(tensors, str(data), metadata=metadata)
        with open(data, "rb") as f:
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(data, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync_dir(directory: Path, path: Path) -> None:
    """Make the renames durable; the new version is already in place if this fails."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise MemoryFileError(f"saved memory {path}, but could not flush its directory: {_reason(e)}") from None


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
    except (OSError, RuntimeError) as e:  # torch maps the file again by name: it may be gone by then
        raise MemoryFileError(f"cannot read {path}: {_reason(e)}") from None


def _checksum(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> str:
    """SHA-256 of every tensor and (format 2) every metadata field but the checksum itself."""
    h = hashlib.sha256()
    if meta is not None:
        h.update(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(-1).view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


# ---- compact storage ----------------------------------------------------------------------------


def _row_kind(name: str) -> str:
    """`ltm_keys.3` -> `ltm_keys`, `pool` -> `pool`: which row tensor a stored tensor is."""
    return name.split(".", 1)[0]


def _scale_name(name: str) -> str:
    """Where an int8 tensor's per-row scales are stored: `ltm.3` -> `ltm_scale.3` (sharded with its layer)."""
    kind, dot, layer = name.partition(".")
    return f"{kind}_scale{dot}{layer}"


def _is_scale(name: str) -> bool:
    kind = _row_kind(name)
    return kind.endswith("_scale") and kind.removesuffix("_scale") in _ROW_TENSORS


def _compact(tensors: dict[str, torch.Tensor], dtype: str | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors as a file stores them with storage `dtype`, and the dtype each row kind is held in.
    Rows held as int8 (a long-term memory held compactly, with its `ltm_scale` tensors) are stored as
    they are for int8 storage, dequantised for the others."""
    if dtype is None:
        return tensors, {}
    out: dict[str, torch.Tensor] = {}
    held: dict[str, str] = {}
    for name, t in tensors.items():
        kind = _row_kind(name)
        if _is_scale(name):
            continue
        if kind not in _ROW_TENSORS:
            out[name] = t
            continue
        held[kind] = str(t.dtype).removeprefix("torch.")
        if t.dtype == torch.int8:
            scale = tensors[_scale_name(name)]
            if dtype == "int8":
                out[name], out[_scale_name(name)] = t, scale
            else:
                out[name] = ops.dequantize_rows(t, scale, getattr(torch, dtype))
        elif dtype == "int8":
            out[name], out[_scale_name(name)] = ops.quantize_rows(t)
        else:
            out[name] = t.to(getattr(torch, dtype))
    return out, held


def _expand(path: Path, tensors: dict[str, torch.Tensor], storage: dict) -> dict[str, torch.Tensor]:
    """Compactly stored rows back in the dtype they were held in: int8 rows dequantised, or kept as int8
    with their scales where the memory held them so."""
    held = storage["held"]
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        kind = _row_kind(name)
        if _is_scale(name):
            continue
        if kind not in _ROW_TENSORS or kind not in held:
            out[name] = t
            continue
        scale = tensors.get(_scale_name(name))
        if t.dtype == torch.int8 and (scale is None or tuple(scale.shape) != tuple(t.shape[:-1])):
            raise MemoryFileError(f"{path} is incomplete: int8 tensor {name} has no matching scales")
        if held[kind] == "int8":
            out[name], out[_scale_name(name)] = (t, scale) if t.dtype == torch.int8 else ops.quantize_rows(t)
            continue
        dtype = getattr(torch, held[kind])
        out[name] = ops.dequantize_rows(t, scale, dtype) if t.dtype == torch.int8 else t.to(dtype)
    return out


# ---- comparing memories -------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryDiff:
    """What two memories (typically forks of one) do not share.

    only_a / only_b: update ids one memory has that the other lacks (same id, different tag: each
    fork made its own update u). unknown: ids whose tags neither memory recorded (files from before
    provenance). forgotten_*: updates one forgot and the other did not. stm_rows_changed: short-term
    positions (layer, row) holding different vectors. ltm_rows_only_*: long-term rows (incl. cache)
    one holds and the other does not, compared by content per layer.
    """

    only_a: tuple[int, ...]
    only_b: tuple[int, ...]
    shared: tuple[int, ...]
    unknown: tuple[int, ...]
    forgotten_only_a: tuple[int, ...]
    forgotten_only_b: tuple[int, ...]
    stm_rows_changed: int
    ltm_rows_only_a: int
    ltm_rows_only_b: int

    @property
    def identical(self) -> bool:
        return not (self.only_a or self.only_b or self.forgotten_only_a or self.forgotten_only_b
                    or self.stm_rows_changed or self.ltm_rows_only_a or self.ltm_rows_only_b)


def diff(a: Memory, b: Memory) -> MemoryDiff:
    """Compare two memories of one model: which updates each has that the other lacks, and how many
    short-term and long-term rows differ. Raises MemoryMismatchError for memories of different models."""
    if a.fingerprint != b.fingerprint or a.pool.shape != b.pool.shape:
        raise MemoryMismatchError("cannot compare memories of different models (fingerprint or shape differ)")
    tags_a, tags_b = a._log()[:, 0].tolist(), b._log()[:, 0].tolist()
    only_a, only_b, shared, unknown = [], [], [], []
    for u in range(1, max(len(tags_a), len(tags_b)) + 1):
        ta = tags_a[u - 1] if u <= len(tags_a) else None
        tb = tags_b[u - 1] if u <= len(tags_b) else None
        if ta == tb == 0:
            unknown.append(u)
        elif ta == tb:
            shared.append(u)
        else:
            if ta is not None:
                only_a.append(u)
            if tb is not None:
                only_b.append(u)
    changed = int((a.pool.cpu() != b.pool.cpu().to(a.pool.dtype)).any(dim=-1).sum())
    rows_a, rows_b = _ltm_rows(a), _ltm_rows(b)
    fa, fb = set(a.forgotten), set(b.forgotten)
    return MemoryDiff(tuple(only_a), tuple(only_b), tuple(shared), tuple(unknown), tuple(sorted(fa - fb)),
                      tuple(sorted(fb - fa)), changed, sum((rows_a - rows_b).values()),
                      sum((rows_b - rows_a).values()))


def _ltm_rows(memory: Memory) -> Counter[tuple[int, bytes]]:
    """Every long-term row and cached row of a memory as (layer, its bytes), with multiplicity."""
    rows: Counter[tuple[int, bytes]] = Counter()
    if memory.ltm is None:
        return rows
    for l, st in enumerate(memory.ltm.layers):
        for part in (st.dense_vectors(), st.cache_vectors):
            rows.update((l, r.tobytes()) for r in part.detach().float().cpu().numpy())
    return rows
