"""A memory: the state a memory model reads and writes, kept apart from the weights.

One model, many memories: a `Memory` holds the memory pool (and, for M+, the long-term memory), how many
updates it has seen, and the fingerprint of the model whose latent space it lives in. Updates replace
tensors instead of writing into them, so `fork()` is a shallow copy and two forks never affect each other.

On disk a memory is one safetensors file (plus long-term memory shards when large), written atomically
(temporary file, fsync, rename) under a cross-process lock, with a SHA-256 checksum of every tensor and
metadata field, so that a crash mid-write leaves the previous version intact, concurrent writers do not
lose each other's updates, and a damaged or edited file is refused instead of silently loaded.
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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from memllm.core.ltm import LongTermMemory, LTMConfig

FORMAT = "memllm-memory"
FORMAT_VERSION = 2  # 2: the checksum covers the metadata too; version-1 files (tensors only) still load


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


@dataclass
class Memory:
    """The state of one memory.

    pool: [L, N, d] short-term memory pool, one row per memory vector, oldest first.
    stm_ages: [L, N] int64, M+ only: age of each short-term vector.
    ltm: M+ long-term memory, or None.
    """

    pool: torch.Tensor
    fingerprint: str
    initialized: bool = True
    num_updates: int = 0
    stm_ages: torch.Tensor | None = None
    ltm: LongTermMemory | None = None

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
        """Write atomically, under the memory's lock: `path` is either the old version or the complete new one.

        A symlink is written through (its target is replaced, the link stays) and an existing file keeps its
        mode; a read-only file is refused. A long-term memory larger than `shard_bytes` goes to sibling shard
        files named after the memory and a fresh generation id; the main file, written last by an atomic
        rename, lists them with their checksums, and the shards the previous main file listed are removed
        only after it. Temporary files and orphan shards that a killed save left are swept here.
        """
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
        }
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
        ltm = None
        if header.ltm is not None:
            try:
                ltm = LongTermMemory.from_tensors(tensors, header.ltm)
            except KeyError as e:
                raise MemoryFileError(f"{path} is incomplete: its long-term memory lacks tensor {e}") from None
        return cls(
            pool=pool.to(device),
            stm_ages=ages.to(device) if ages is not None else None,
            fingerprint=header.fingerprint,
            initialized=header.initialized,
            num_updates=header.num_updates,
            ltm=ltm,
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
    return _Header(version, checksum, meta["fingerprint"], initialized, int(meta["num_updates"]), ltm, shards)


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
