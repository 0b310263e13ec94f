"""Memories as their own objects: many per model, saved atomically, loaded with checks, forked cheaply."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memllm import Memory, MemoryFileError, MemoryMismatchError
from memllm.core.inject import RandomDrop
from memllm.core.tiny import random_model

TEXT = "The lighthouse keeper on Velmora island paints every door of his house a different shade of green."


@pytest.fixture(scope="module")
def model():
    return random_model(seed=1, num_tokens=64)  # chunks of 128 bytes: TEXT is one injection


def test_one_model_many_memories(model) -> None:
    a, b = model.new_memory(), model.new_memory()
    ids = model.tokenizer("What colour are the doors?", return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        before = model(ids, b).logits
        model.inject(a, TEXT)
        assert a.num_updates == 1 and b.num_updates == 0
        assert not torch.equal(model(ids, a).logits, before)  # memory A changed what the model reads
        assert torch.equal(model(ids, b).logits, before)  # memory B untouched


def test_fork_is_independent(model) -> None:
    a = model.new_memory()
    with torch.no_grad():
        model.inject(a, TEXT)
        b = a.fork()
        pool_b = b.pool.clone()
        model.inject(a, TEXT + " Twice.")
    assert torch.equal(b.pool, pool_b) and b.num_updates == 1 and a.num_updates == 2


def test_save_load_round_trip_gives_identical_logits_in_a_new_process(model, tmp_path: Path) -> None:
    memory = model.new_memory()
    with torch.no_grad():
        model.inject(memory, TEXT, drop=RandomDrop(generator=torch.Generator().manual_seed(0)))
    path = memory.save(tmp_path / "a.mem")
    loaded = model.load_memory(path)
    assert torch.equal(loaded.pool, memory.pool) and loaded.num_updates == 1
    model_dir = tmp_path / "model"
    import memllm

    memllm.save(model, model_dir)
    ids = [[5, 17, 99, 3, 42]]
    with torch.no_grad():
        expected = model(torch.tensor(ids), memory).logits
    script = (  # same thread count: a float sum split over other threads may differ in its last bit
        "import sys, torch, memllm\n"
        f"torch.set_num_threads({torch.get_num_threads()})\n"
        f"m = memllm.load({str(model_dir)!r})\n"
        f"mem = m.load_memory({str(path)!r})\n"
        f"torch.save(m(torch.tensor({ids}), mem).logits.detach(), {str(tmp_path / 'out.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


def test_corrupt_file_is_refused(model, tmp_path: Path) -> None:
    path = model.new_memory().save(tmp_path / "a.mem")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # flip bits in the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(MemoryFileError, match="checksum"):
        Memory.load(path)
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(MemoryFileError, match="corrupt"):
        Memory.load(path)
    with pytest.raises(MemoryFileError, match="not found"):
        Memory.load(tmp_path / "missing.mem")


def test_memory_of_another_model_is_refused(model, tmp_path: Path) -> None:
    other = random_model(seed=2, num_tokens=64)
    path = other.new_memory().save(tmp_path / "other.mem")
    with pytest.raises(MemoryMismatchError, match="fingerprint"):
        model.load_memory(path)
    bigger = random_model(num_tokens=64, num_blocks=8)
    with pytest.raises(MemoryMismatchError, match="shape"):
        model.load_memory(bigger.new_memory().save(tmp_path / "bigger.mem"))
    with pytest.raises(MemoryMismatchError, match="dtype"):
        model.check_memory(model.new_memory().to(dtype=torch.float64))


def test_failed_write_leaves_previous_version_intact(model, tmp_path: Path, monkeypatch) -> None:
    memory = model.new_memory()
    path = memory.save(tmp_path / "a.mem")
    before = path.read_bytes()
    changed = memory.fork()
    with torch.no_grad():
        model.inject(changed, TEXT)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("memllm.core.memory.save_file", crash)
    with pytest.raises(MemoryFileError, match="disk full"):
        changed.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mem", "a.mem.lock"]  # no temporary file left behind
    assert torch.equal(Memory.load(path).pool, memory.pool)
