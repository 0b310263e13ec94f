"""Compact memory files: bfloat16 or int8 with a scale per row, loaded back in the dtype they were held in."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from memllm.core.ltm import LongTermMemory, LTMConfig, LTMLayer
from memllm.core.memory import Memory
from memllm.core.ops import dequantize_rows, quantize_rows
from memllm.core.tiny import random_model


def mplus_memory(d: int = 256, s: int = 64, rows: int = 400) -> Memory:
    g = torch.Generator().manual_seed(0)
    layers = [LTMLayer(torch.randn(rows, d, generator=g) * 3, torch.randn(rows, s, generator=g),
                       torch.arange(rows), torch.ones(rows), sources=torch.randint(0, 9, (rows,), generator=g))
              for _ in range(2)]
    ltm = LongTermMemory(LTMConfig(num_tokens=4, num_ltm_blocks=2), layers)
    ltm.add_dropped(0, torch.randn(4, d, generator=g), torch.randn(4, s, generator=g), torch.zeros(4), torch.ones(4))
    return Memory(pool=torch.randn(2, 64, d, generator=g), fingerprint="test",
                  stm_ages=torch.zeros(2, 64, dtype=torch.long), ltm=ltm, num_updates=8,
                  sources=torch.randint(0, 9, (2, 64), generator=g))


def test_quantize_rows_error_is_within_half_a_step() -> None:
    x = torch.randn(50, 128) * torch.logspace(-3, 3, 50).unsqueeze(1)
    x[3] = 0  # an all-zero row stays zero
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and scale.shape == (50,)
    err = (dequantize_rows(q, scale, torch.float32) - x).abs()
    assert bool((err <= scale.unsqueeze(1) / 2 * (1 + 1e-5)).all())
    assert not dequantize_rows(q, scale, torch.float32)[3].any()


def test_int8_file_is_under_a_third_and_round_trips(tmp_path: Path) -> None:
    memory = mplus_memory()
    full = memory.save(tmp_path / "full.mem")
    small = memory.save(tmp_path / "small.mem", dtype="int8")
    assert small.stat().st_size <= 0.3 * full.stat().st_size
    back = Memory.load(small)
    assert back.pool.dtype == torch.float32 and back.storage == "int8"
    bound = memory.pool.abs().amax(-1, keepdim=True) / 254 * (1 + 1e-5)
    assert bool(((back.pool - memory.pool).abs() <= bound).all())
    for st, was in zip(back.ltm.layers, memory.ltm.layers):
        for name in ("vectors", "keys", "cache_vectors", "cache_keys"):
            a, b = getattr(st, name), getattr(was, name)
            assert a.dtype == b.dtype and bool(((a - b).abs() <= b.abs().amax(-1, keepdim=True) / 254 * 1.00001).all())
        for name in ("ages", "recall_frequencies", "sources", "cache_ages", "cache_sources"):
            assert torch.equal(getattr(st, name), getattr(was, name)), name  # stored exactly
    assert torch.equal(back.sources, memory.sources)
    again = back.save(tmp_path / "again.mem")  # a memory loaded from an int8 file is saved as int8 again
    assert abs(again.stat().st_size - small.stat().st_size) < 512
    assert back.save(tmp_path / "wide.mem", dtype="float32").stat().st_size > 3 * small.stat().st_size


def test_bfloat16_file_halves_and_round_trips(tmp_path: Path) -> None:
    memory = mplus_memory()
    full = memory.save(tmp_path / "full.mem")
    half = memory.save(tmp_path / "half.mem", dtype="bfloat16")
    assert half.stat().st_size <= 0.55 * full.stat().st_size
    back = Memory.load(half)
    assert back.pool.dtype == torch.float32
    assert torch.equal(back.pool, memory.pool.to(torch.bfloat16).float())


def test_bad_dtype_is_refused_and_leaves_the_file(tmp_path: Path) -> None:
    memory = mplus_memory()
    path = memory.save(tmp_path / "m.mem")
    data = path.read_bytes()
    with pytest.raises(ValueError, match="unknown storage dtype 'int4'"):
        memory.save(path, dtype="int4")
    assert path.read_bytes() == data


def test_a_model_reads_an_int8_memory_almost_as_the_original(tmp_path: Path) -> None:
    model = random_model(seed=2, num_tokens=8, num_blocks=4)
    memory = model.new_memory()
    model.inject(memory, "The lighthouse keeper paints every door of his house a different shade of green.")
    back = model.load_memory(memory.save(tmp_path / "m.mem", dtype="int8"))
    ids = torch.tensor([[5, 17, 99, 3, 42]])
    with torch.no_grad():
        exact, approx = model(ids, memory).logits, model(ids, back).logits
    assert (exact - approx).abs().max() < 1e-2 * exact.abs().max()


def test_memory_to_bfloat16_holds_the_long_term_memory_in_bfloat16() -> None:
    half = mplus_memory().to(dtype=torch.bfloat16)
    layer = half.ltm.layers[0]
    assert half.pool.dtype == layer.vectors.dtype == layer.cache_vectors.dtype == torch.bfloat16


def within_a_step(approx: torch.Tensor, exact: torch.Tensor) -> bool:
    step = exact.float().abs().amax(-1, keepdim=True) / 254 * 1.00001
    return bool(((approx.float() - exact.float()).abs() <= step).all())


def test_memory_to_int8_holds_the_long_term_rows_in_a_quarter_and_reads_them_back() -> None:
    memory = mplus_memory()
    small = memory.to(dtype=torch.int8)
    assert small.pool.dtype == torch.float32  # the short-term pool is read whole at every step: not quantised
    assert small.ltm.dtype == torch.int8 and memory.ltm.dtype == torch.float32  # a copy: the original is untouched
    assert small.info()["ltm_dtype"] == "int8"
    vector_bytes = sum(st.vectors.numel() * 4 for st in memory.ltm.layers)
    scale_bytes = sum(st.num_ltm * 4 for st in memory.ltm.layers)
    saved = memory.ltm.info()["ltm_bytes"] - small.ltm.info()["ltm_bytes"]
    assert saved == vector_bytes * 3 // 4 - scale_bytes  # the rows in a quarter; the retrieval keys stay float
    for st, was in zip(small.ltm.layers, memory.ltm.layers):
        assert st.vectors.element_size() * st.vectors.numel() == was.vectors.numel()
        order = torch.tensor([399, 0, 400, 7, 403, 123][: 6 if st.num_cached else 2])  # LTM and cache rows
        rows = st.rows(order)
        assert rows.dtype == torch.float32 and within_a_step(rows, was.rows(order))
        if st.num_cached:
            assert torch.equal(rows[[2, 4]], was.rows(order)[[2, 4]])  # cached rows are held as they came
    queries = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(small.ltm.retrieve(0, queries).order, memory.ltm.retrieve(0, queries).order)  # keys exact


def test_an_int8_long_term_memory_stays_aligned_through_merges_and_forgetting() -> None:
    memory = mplus_memory()
    small = memory.to(dtype=torch.int8)
    g = torch.Generator().manual_seed(3)
    for step in range(3):
        for m in (memory, small):
            g.manual_seed(10 + step)
            for l in range(2):
                m.ltm.add_dropped(l, torch.randn(4, 256, generator=g), torch.randn(4, 64, generator=g),
                                  torch.zeros(4), torch.full((4,), 20 + step))
    for m in (memory, small):
        m.ltm.config = LTMConfig(num_tokens=4, num_ltm_blocks=2, update_ltm_frequency=1)
        assert m.ltm.finish_update(4) is not None  # the cache merges: it joins the int8 rows quantised
    for st, was in zip(small.ltm.layers, memory.ltm.layers):
        assert st.vectors.dtype == torch.int8 and st.scales.shape == (st.num_ltm,) and st.num_ltm == was.num_ltm
        assert torch.equal(st.sources, was.sources) and within_a_step(st.dense_vectors(), was.vectors)
    for m in (memory, small):
        m.ltm.forget(torch.tensor([21, 3]))
    for st, was in zip(small.ltm.layers, memory.ltm.layers):
        assert st.scales.shape == (st.num_ltm,) and torch.equal(st.sources, was.sources)
        assert within_a_step(st.dense_vectors(), was.vectors)


@pytest.mark.parametrize("dtype", [None, "int8", "float32"])
def test_an_int8_held_memory_saves_and_loads_held_as_int8(tmp_path: Path, dtype: str | None) -> None:
    small = mplus_memory().to(dtype=torch.int8)
    back = Memory.load(small.save(tmp_path / "m.mem", dtype=dtype))
    assert back.ltm.dtype == torch.int8
    for st, was in zip(back.ltm.layers, small.ltm.layers):
        assert torch.equal(st.vectors, was.vectors) and torch.allclose(st.scales, was.scales)
        if dtype == "int8":  # int8 storage quantises the float cache too; it loads back as float
            assert st.cache_vectors.dtype == torch.float32 and within_a_step(st.cache_vectors, was.cache_vectors)
        else:
            assert torch.equal(st.cache_vectors, was.cache_vectors)


def test_int8_needs_a_long_term_memory() -> None:
    with pytest.raises(ValueError, match="int8 holds a long-term memory"):
        random_model(seed=0, num_tokens=4, num_blocks=2).new_memory().to(dtype=torch.int8)


def test_an_mplus_model_reads_an_int8_held_long_term_memory_almost_as_the_original() -> None:
    model = random_model(seed=2, num_tokens=4, num_blocks=3, kind="mplus", num_ltm_blocks=1,
                         update_ltm_frequency=1, decay_frequency=0.0, selector_hidden_dim=16)
    memory = model.new_memory()
    for i in range(6):
        model.inject(memory, f"Entry {i}: the keeper paints door {i} a shade of green number {i * 7}.")
    assert memory.ltm.layers[0].num_ltm > 0
    small = memory.to(dtype=torch.int8)
    ids = torch.tensor([[5, 17, 99, 3, 42]])
    with torch.no_grad():
        exact, approx = model(ids, memory).logits, model(ids, small).logits
    assert (exact - approx).abs().max() < 1e-2 * exact.abs().max()
    model.inject(small, "One more entry after quantising.")  # the held-int8 memory keeps working
    assert small.ltm.dtype == torch.int8 and small.num_updates > memory.num_updates
