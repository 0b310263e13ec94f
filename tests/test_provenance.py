"""Provenance: every short-term and long-term row carries the id of the update that wrote it, through
random drops, long-term merges and evictions, forks and files; `diff` tells forks apart."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from memllm.core.inject import RandomDrop, chunks
from memllm.core.memory import Memory, MemoryFileError, UnknownUpdateError, _checksum, diff
from memllm.core.tiny import random_model

TEXTS = [f"Entry {i}: the ferry to island {i} leaves at {i % 12} o'clock from pier {i * 7}." for i in range(40)]


def tiny(kind: str):
    # K = 8, N = 32; M+: R = 8, a merge every 2 updates, rows evicted after two merges (decay 1, rf 2)
    return random_model(kind=kind, num_ltm_blocks=1 if kind == "mplus" else 0, num_tokens=8, num_blocks=4, seed=3)


class Ledger:
    """Independent bookkeeping: the bytes of every row an update appended, mapped to that update's number
    (1, 2, ... in the order the updates happen), and the initial pool's rows to 0; except that a chunk of
    T < K tokens computes its first K - T rows from the pool's last K - T rows alone, which keep their
    owners."""

    def __init__(self, memory: Memory) -> None:
        self.owner: dict[tuple[int, bytes], int] = {}
        self.count = 0
        for l in range(memory.pool.shape[0]):
            for row in memory.pool[l]:
                self.owner[(l, row.numpy().tobytes())] = 0

    def inject(self, model, memory: Memory, text: str, drop: RandomDrop, chunk_size: int = 16) -> int:
        """Returns how many rows were carried from older rows."""
        K = model.config.num_tokens
        lengths = [len(p) for p in chunks(model.encode_context(text), chunk_size)]
        owners_of = lambda l, rows: [self.owner[(l, row.numpy().tobytes())] for row in rows]  # noqa: E731
        tails = [owners_of(l, memory.pool[l, -K:]) for l in range(memory.pool.shape[0])]
        carried = 0

        def record(done: int, total: int) -> None:
            self.count += 1
            n = max(0, K - lengths[done - 1])
            for l in range(memory.pool.shape[0]):
                for i, row in enumerate(memory.pool[l, -K:]):
                    self.owner[(l, row.numpy().tobytes())] = tails[l][K - n + i] if i < n else self.count
                tails[l] = owners_of(l, memory.pool[l, -K:])
            nonlocal carried
            carried += n * memory.pool.shape[0]

        model.inject(memory, text, chunk_size=chunk_size, drop=drop, progress=record)
        return carried

    def check(self, memory: Memory) -> int:
        """Assert every row's recorded source; returns how many long-term rows were checked."""
        for l in range(memory.pool.shape[0]):
            expected = [self.owner[(l, row.numpy().tobytes())] for row in memory.pool[l]]
            assert memory.sources[l].tolist() == expected, f"layer {l}: short-term sources differ"
        checked = 0
        if memory.ltm is not None:
            for l, st in enumerate(memory.ltm.layers):
                for rows, sources in ((st.vectors, st.sources), (st.cache_vectors, st.cache_sources)):
                    expected = [self.owner[(l, row.numpy().tobytes())] for row in rows]
                    assert sources.tolist() == expected, f"layer {l}: long-term sources differ"
                    checked += len(expected)
        return checked

    def fork(self) -> "Ledger":
        copy = object.__new__(Ledger)
        copy.owner, copy.count = dict(self.owner), self.count
        return copy


@pytest.mark.parametrize("kind", ["memoryllm", "mplus"])
def test_sources_follow_rows_through_updates_merges_forks_and_files(kind: str, tmp_path: Path) -> None:
    model = tiny(kind)
    drop = RandomDrop(generator=torch.Generator().manual_seed(1))
    memory = model.new_memory()
    ledger = Ledger(memory)
    for text in TEXTS[:12]:
        ledger.inject(model, memory, text, drop)
    assert memory.num_updates == ledger.count > 12  # texts of 60+ bytes make several updates each
    ledger.check(memory)
    # chunks shorter than K = 8: their first rows are computed from older rows only and keep their owners
    carried = sum(ledger.inject(model, memory, text, drop, chunk_size=5) for text in TEXTS[30:33])
    assert carried > 0
    ledger.check(memory)
    fork, fork_ledger = memory.fork(), ledger.fork()
    for text in TEXTS[12:20]:
        ledger.inject(model, memory, text, drop)
    for text in TEXTS[20:30]:
        fork_ledger.inject(model, fork, text, drop)
    long_term = ledger.check(memory) + fork_ledger.check(fork)
    if kind == "mplus":
        assert long_term > 0 and memory.ltm.update_step < 2 * 8  # merges happened (and rows were evicted)
        assert {u for u, (stm, ltm) in memory.source_counts().items() if ltm and not stm}  # some only in LTM
    for m, book, name in ((memory, ledger, "a"), (fork, fork_ledger, "b")):
        loaded = Memory.load(m.save(tmp_path / f"{name}.mem", shard_bytes=4096))  # LTM in shards
        book.check(loaded)
        assert torch.equal(loaded.update_log, m.update_log)


def test_provenance_lists_updates_with_their_shares() -> None:
    model = tiny("mplus")
    memory = model.new_memory()
    drop = RandomDrop(generator=torch.Generator().manual_seed(2))
    for text in TEXTS[:10]:
        model.inject(memory, text, chunk_size=16, drop=drop)
    rows = {r["update"]: r for r in memory.provenance()}
    last = rows[memory.num_updates]
    assert last["stm_rows"] == last["written"] == 8 * model.num_layers and last["stm_share"] == 1.0
    counts = memory.source_counts()
    for u, r in rows.items():
        assert (r["stm_rows"], r["ltm_rows"]) == counts[u]
        if u:
            assert r["stm_share"] == r["stm_rows"] / r["written"] and r["ltm_share"] == r["ltm_rows"] / r["written"]


def _rewrite_without(path: Path, dropped: set[str], version: str = "2") -> None:
    """The file as a memllm from before provenance wrote it: no such tensors, format 2, its own checksum."""
    tensors = {k: v for k, v in load_file(str(path)).items() if k not in dropped and "sources" not in k}
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8:8 + n])["__metadata__"]
    meta = {k: v for k, v in meta.items() if k not in ("forgotten", "checksum")} | {"format_version": version}
    meta["checksum"] = _checksum(tensors, meta)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("kind", ["memoryllm", "mplus"])
def test_files_from_before_provenance_load_with_documented_sources(kind: str, tmp_path: Path) -> None:
    model = tiny(kind)
    fresh, used = model.new_memory(), model.new_memory()
    drop = RandomDrop(generator=torch.Generator().manual_seed(3))
    for text in TEXTS[:6]:
        model.inject(used, text, chunk_size=16, drop=drop)
    for name, memory in (("fresh", fresh), ("used", used)):
        path = memory.save(tmp_path / f"{name}.mem")
        _rewrite_without(path, {"sources", "update_log"})
        old = Memory.load(path)
        assert torch.equal(old.pool, memory.pool)
        expected = 0 if memory.num_updates == 0 else -1  # the initial pool, or unknown
        assert set(old.source_counts()) <= {expected}
        assert old.update_log.shape == (0, 2) and old.tensors()["update_log"].shape == (memory.num_updates, 2)
    old = Memory.load(tmp_path / "used.mem")
    with pytest.raises(UnknownUpdateError, match="written before memllm recorded provenance"):
        old.forget(2, model.initial_pool)
    model.inject(old, TEXTS[10], chunk_size=16, drop=drop)  # new updates are tracked again
    assert old.source_counts()[used.num_updates + 1][0] > 0


def test_checksum_covers_the_provenance_tensors(tmp_path: Path) -> None:
    model = tiny("memoryllm")
    memory = model.new_memory()
    model.inject(memory, TEXTS[0], chunk_size=16)
    path = memory.save(tmp_path / "a.mem")
    tensors = load_file(str(path))
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8:8 + n])["__metadata__"]
    tensors["sources"] = torch.zeros_like(tensors["sources"])  # relabel every row, keep the old checksum
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(MemoryFileError, match="checksum mismatch"):
        Memory.load(path)


def test_diff_tells_forks_apart() -> None:
    model = tiny("mplus")
    drop = RandomDrop(generator=torch.Generator().manual_seed(4))
    a = model.new_memory()
    for text in TEXTS[:4]:
        model.inject(a, text, chunk_size=16, drop=drop)
    b = a.fork()
    assert diff(a, b).identical and diff(a, b).shared == tuple(range(1, a.num_updates + 1))
    shared = a.num_updates
    model.inject(a, TEXTS[5], chunk_size=16, drop=drop)
    model.inject(b, TEXTS[5], chunk_size=16, drop=drop)  # same text, same id, a different update
    model.inject(b, TEXTS[6], chunk_size=16, drop=drop)
    d = diff(a, b)
    assert d.shared == tuple(range(1, shared + 1))
    assert d.only_a == tuple(range(shared + 1, a.num_updates + 1))
    assert d.only_b == tuple(range(shared + 1, b.num_updates + 1))
    assert d.stm_rows_changed > 0 and not d.identical
    counts = a.source_counts()
    u = max((u for u in d.shared if u in counts), key=lambda u: min(counts[u]))  # rows in STM and LTM
    assert min(counts[u]) > 0
    c = a.fork()
    c.forget([u], model.initial_pool)
    d = diff(a, c)
    assert d.forgotten_only_b == (u,) and d.only_a == d.only_b == ()
    assert d.ltm_rows_only_a == counts[u][1] and d.ltm_rows_only_b == 0
    assert d.stm_rows_changed >= counts[u][0]  # the freed slots, and the survivors that moved back
