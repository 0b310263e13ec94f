"""M+ on tiny random models: LTM filling through updates, batched per-row retrieval, persistence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from memllm.core.tiny import random_model


@pytest.fixture(scope="module")
def model():
    # K 8, STM 4 blocks (N 32), R = 2 blocks (16), merge every 2 updates.
    return random_model(kind="mplus", num_blocks=6, num_ltm_blocks=2, seed=4)


def filled_memory(model, updates: int = 6):
    memory = model.new_memory()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i in range(updates):
            model.inject(memory, torch.randint(0, 200, (20,), generator=g))
    return memory


def test_fresh_memory_reads_without_ltm_and_updates_fill_it(model) -> None:
    memory = model.new_memory()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        model(ids, memory)  # empty LTM: the retrieved block is masked out
    memory = filled_memory(model)
    sizes = [st.num_ltm for st in memory.ltm.layers]
    assert all(s >= model.config.num_retrieved for s in sizes), sizes
    assert memory.stm_ages.shape == memory.pool.shape[:2]
    trace: list = []
    with torch.no_grad():
        model(ids, memory, retrievals=trace)
    assert [l for l, _ in trace] == list(range(model.num_layers))
    assert all(len(r.order) == model.config.num_retrieved for _, (r,) in trace)


def test_batched_padded_retrieval_equals_rows_alone(model) -> None:
    memory = filled_memory(model)
    ids = torch.tensor([[0, 0, 11, 12, 13], [21, 22, 23, 24, 25]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        batch = model(ids, memory, attention_mask=mask).logits
        first = model(ids[:1, 2:], memory).logits
        second = model(ids[1:], memory).logits
    torch.testing.assert_close(batch[0, 2:], first[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch[1], second[0], atol=1e-5, rtol=1e-5)


def test_index_mode_matches_exact_on_a_small_ltm(model) -> None:
    memory = filled_memory(model)
    ids = torch.tensor([[9, 8, 7, 6, 5, 4]])
    with torch.no_grad():
        exact = model(ids, memory).logits
        model.retrieval_mode = "index"
        try:
            indexed = model(ids, memory).logits
        finally:
            model.retrieval_mode = "exact"
    torch.testing.assert_close(indexed, exact)


def test_memory_with_ltm_saves_loads_and_forks(model, tmp_path: Path) -> None:
    memory = filled_memory(model, updates=5)  # odd: the cache is non-empty
    assert memory.ltm.layers[0].num_cached > 0
    path = memory.save(tmp_path / "m.mem")
    loaded = model.load_memory(path)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(ids, memory).logits, model(ids, loaded).logits)
    fork = loaded.fork()
    with torch.no_grad():
        model.inject(fork, list(range(30, 50)))
    assert fork.ltm.update_step != loaded.ltm.update_step or fork.ltm.layers[0].num_ltm != loaded.ltm.layers[0].num_ltm
    assert loaded.ltm.layers[0].num_cached == memory.ltm.layers[0].num_cached
    info = loaded.info()
    assert info["ltm_vectors_per_layer"] == [st.num_ltm for st in memory.ltm.layers]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_ltm_of_1_5m_vectors_per_layer_saves_sharded_loads_mapped_and_answers(tmp_path: Path) -> None:
    from memllm.core.ltm import LongTermMemory, LTMLayer

    model = random_model(kind="mplus", hidden_size=16, num_heads=2, num_kv_heads=1, intermediate_size=32,
                         num_blocks=6, num_ltm_blocks=2, seed=6)
    M, s = 1_500_000, model.config.selector_hidden_dim
    g = torch.Generator().manual_seed(0)
    layers = [LTMLayer(torch.randn(M, 16, generator=g), torch.randn(M, s, generator=g),
                       torch.arange(M, dtype=torch.long), torch.ones(M)) for _ in range(model.num_layers)]
    memory = model.new_memory()
    memory.ltm = LongTermMemory(memory.ltm.config, layers)
    ltm_mb = sum(t.numel() * t.element_size() for st in layers for t in (st.vectors, st.keys, st.ages,
                                                                          st.recall_frequencies)) / 2**20
    path = memory.save(tmp_path / "big.mem", shard_bytes=128 << 20)
    shards = sorted(p.name for p in tmp_path.glob("big.mem.*.ltm-*.safetensors"))
    assert len(shards) == model.num_layers  # one layer (~210 MB) per shard
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    with torch.no_grad():
        expected = model(ids, memory).logits
    del memory, layers
    before = _rss_mb()
    loaded = model.load_memory(path, verify=False)
    assert _rss_mb() - before < ltm_mb / 4  # memory-mapped: the LTM did not enter RAM
    assert [st.num_ltm for st in loaded.ltm.layers] == [M] * model.num_layers
    with torch.no_grad():
        assert torch.equal(model(ids, loaded).logits, expected)
    assert torch.equal(model.load_memory(path).pool, loaded.pool)  # verified load agrees
    loaded.save(path, shard_bytes=128 << 20)  # a new generation replaces the old shards
    assert sorted(p.name for p in tmp_path.glob("big.mem.*.ltm-*.safetensors")) != shards
    assert len(list(tmp_path.glob("big.mem.*.ltm-*.safetensors"))) == model.num_layers


def test_stm_ages_switch_published_vs_growing() -> None:
    """Published: short-term ages never grow. `stm_ages_grow`: kept vectors age by K per update."""
    published = random_model(kind="mplus", num_blocks=6, num_ltm_blocks=2, seed=4)
    growing = random_model(kind="mplus", num_blocks=6, num_ltm_blocks=2, seed=4)
    growing.config.stm_ages_grow = True
    K = published.config.num_tokens
    ages = {}
    for name, m in (("published", published), ("growing", growing)):
        memory = m.new_memory()
        with torch.no_grad():
            for i in range(3):
                m.inject(memory, list(range(40 + i, 60 + i)))
        ages[name] = memory.stm_ages
    assert int(ages["published"].max()) == K - 1
    assert int(ages["growing"].max()) >= 2 * K  # a row kept through two later updates
    assert torch.equal(ages["growing"][:, -K:], ages["published"][:, -K:])  # the newest rows agree
    assert growing.config.to_hf_dict()["stm_ages_grow"] is True


def test_training_ltm_reads_like_inference() -> None:
    """forward_pools with a RowLTM (training) gives the logits of model(..., memory) (inference) after the
    same injections and drops: the long-term memory is read the same way in training and at inference
    (merge every update, no decay)."""
    from memllm.core.inject import RecordedDrop, delta_memory
    from memllm.core.mplus import RowLTM, drop_to_ltm, ltm_config
    from memllm.core.ops import write_pool

    model = random_model(kind="mplus", num_blocks=6, num_ltm_blocks=2, seed=5).eval()
    model.config.update_ltm_frequency, model.config.decay_frequency = 1, 0.0
    L, N, K = model.num_layers, model.config.num_memory_tokens, model.config.num_tokens
    g = torch.Generator().manual_seed(1)
    contexts = [torch.randint(3, 200, (16 + 3 * i,), generator=g) for i in range(6)]
    kept = [torch.rand(L, N, generator=g).argsort(-1)[:, : N - K].sort(-1).values for _ in contexts]
    question = torch.randint(3, 200, (1, 9), generator=g)

    memory = model.new_memory()
    memory.ltm.config = ltm_config(model)
    pools = memory.pool.unsqueeze(0).clone()
    ltm, ages = RowLTM.empty(pools), torch.zeros(1, L, N, dtype=torch.long)
    with torch.no_grad():
        for i, ids in enumerate(contexts):
            model.inject(memory, ids, drop=RecordedDrop([kept[i]]))
            delta = delta_memory(model, pools, ids.unsqueeze(0))
            ltm, ages = drop_to_ltm(ltm, pools, ages, kept[i].unsqueeze(0))
            pools = write_pool(pools, delta, kept[i].unsqueeze(0))
            if i in (0, 2, 5):  # fewer than R rows (cyclic repeat), exactly R, more than R (top R)
                trace: list = []
                want = model(question, memory, retrievals=trace).logits
                got = model.forward_pools(question, pools, ltm=ltm).logits
                assert ltm.size == memory.ltm.layers[0].num_ltm == K * (i + 1)
                torch.testing.assert_close(ltm.vectors[0], torch.stack([st.vectors for st in memory.ltm.layers]))
                torch.testing.assert_close(ltm.ages[0], torch.stack([st.ages for st in memory.ltm.layers]))
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # and retrieval matters: the same pools with the long-term slots masked read differently
    masked = model.forward_pools(question, pools).logits
    assert (masked - want).abs().max() > 1e-3
