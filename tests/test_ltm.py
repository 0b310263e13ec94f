"""M+ long-term memory: merge schedule, retrieval order/scores, index recall, golden vectors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import GOLDEN_DIR, golden_families
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from memllm.bench.ltm import SyntheticSpec, synthetic_keys_queries
from memllm.core.ltm import (
    LongTermMemory,
    LTMConfig,
    LTMIndex,
    LTMLayer,
    order_by_age,
    retrieval_scores,
)

MPLUS_FAMILIES = golden_families("mplus")
needs_golden = pytest.mark.parametrize("family", MPLUS_FAMILIES)


def _layer(ages: list[int], rf: list[float], d: int = 2, s: int = 3) -> LTMLayer:
    m = len(ages)
    tags = torch.arange(m, dtype=torch.float32)
    return LTMLayer(
        vectors=tags[:, None].expand(m, d).clone(),
        keys=torch.zeros(m, s),
        ages=torch.tensor(ages, dtype=torch.int64),
        recall_frequencies=torch.tensor(rf, dtype=torch.float32),
    )


def _dropped(first_tag: int, k: int, d: int = 2, s: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    tags = torch.arange(first_tag, first_tag + k, dtype=torch.float32)
    return tags[:, None].expand(k, d).clone(), torch.zeros(k, s)


# --------------------------------------------------------------------------- merge schedule
def test_merge_schedule_aging_cache_and_eviction() -> None:
    cfg = LTMConfig(num_tokens=2, num_ltm_blocks=1, update_ltm_frequency=2,
                    decay_frequency=1, initial_rf_when_moving_stm_to_ltm=2)
    # layer 0: rf all 1 -> after decay only the 4 new rows survive (4 > R=2): evict old rows.
    # layer 1: rf 1 and R raised by a tiny LTM: see next test for the keep-everything branch.
    ltm = LongTermMemory(cfg, [_layer([10, 20, 30], [1, 3, 1])])
    v, k = _dropped(100, 2)
    ltm.add_dropped(0, v, k, torch.tensor([0, 1]))
    assert ltm.finish_update(2) is None
    assert ltm.update_step == 2
    assert ltm.layers[0].ages.tolist() == [12, 22, 32]
    assert ltm.layers[0].cache_ages.tolist() == [0, 1]

    v, k = _dropped(200, 2)
    ltm.add_dropped(0, v, k, torch.tensor([5, 0]))
    st = ltm.layers[0]
    assert st.ages.tolist() == [14, 24, 34]
    assert st.cache_ages.tolist() == [2, 3, 5, 0]  # old cache aged before the append
    sources = ltm.finish_update(2)
    assert sources is not None and ltm.update_step == 0
    # rf after decay: [0, 2, 0, 1, 1, 1, 1] -> alive = {1, 3, 4, 5, 6} (5 > R = 2)
    assert sources[0].tolist() == [1, 3, 4, 5, 6]
    assert st.ages.tolist() == [24, 2, 3, 5, 0]
    assert st.recall_frequencies.tolist() == [2, 1, 1, 1, 1]
    assert st.vectors[:, 0].tolist() == [1, 100, 101, 200, 201]
    assert st.num_cached == 0


def test_merge_keeps_everything_when_too_few_survive() -> None:
    cfg = LTMConfig(num_tokens=2, num_ltm_blocks=4, update_ltm_frequency=1,
                    decay_frequency=1, initial_rf_when_moving_stm_to_ltm=1)
    ltm = LongTermMemory(cfg, [_layer([1, 2, 3], [1, 2, 1]), _layer([5], [1])])
    for layer in range(2):
        v, k = _dropped(10, 2)
        ltm.add_dropped(layer, v, k, torch.tensor([0, 0]))
    sources = ltm.finish_update(2)
    assert sources is not None
    # all rf after decay are ≤ 1 except one: |S| = 1 ≤ R = 8 -> keep everything, add decay back
    assert sources[0].tolist() == [0, 1, 2, 3, 4]
    assert ltm.layers[0].recall_frequencies.tolist() == [1, 2, 1, 1, 1]
    assert ltm.layers[0].ages.tolist() == [3, 4, 5, 0, 0]
    assert ltm.layers[1].ages.tolist() == [7, 0, 0]


# --------------------------------------------------------------------------- retrieval
def test_exact_scores_match_reference() -> None:
    g = torch.Generator().manual_seed(0)
    keys, q = torch.randn(1000, 8, generator=g), torch.randn(5, 8, generator=g)
    ref = torch.stack([torch.sigmoid(q @ k).mean() for k in keys])
    torch.testing.assert_close(retrieval_scores(q, keys, chunk=128), ref, atol=1e-6, rtol=0)
    qb = torch.randn(3, 5, 8, generator=g)
    batched = retrieval_scores(qb, keys, chunk=300)
    for b in range(3):
        torch.testing.assert_close(batched[b], retrieval_scores(qb[b], keys), atol=1e-6, rtol=0)


def test_order_by_age_tie_rule() -> None:
    selected = torch.tensor([2, 5, 7, 9, 11])
    ages = torch.tensor([3, 8, 3, 8, 1])
    # oldest first; equal ages: later position first
    assert order_by_age(selected, ages).tolist() == [9, 5, 7, 2, 11]


def test_retrieve_selects_top_r_over_ltm_and_cache() -> None:
    cfg = LTMConfig(num_tokens=2, num_ltm_blocks=2, update_ltm_frequency=100)
    g = torch.Generator().manual_seed(1)
    m, s = 12, 4
    layer = LTMLayer(torch.randn(m, 6, generator=g), torch.randn(m, s, generator=g),
                     torch.randint(0, 5, (m,), generator=g), torch.ones(m))
    ltm = LongTermMemory(cfg, [layer])
    ltm.add_dropped(0, torch.randn(3, 6, generator=g), torch.randn(3, s, generator=g) * 3,
                    torch.tensor([0, 0, 2]))
    q = torch.randn(7, s, generator=g)
    res = ltm.retrieve(0, q)
    all_keys = torch.cat([layer.keys, layer.cache_keys])
    ref = torch.sigmoid(q @ all_keys.T).mean(0)
    torch.testing.assert_close(res.scores, ref)
    expect = torch.sort(torch.topk(ref, 4).indices).values
    assert res.selected_sorted.tolist() == expect.tolist()
    all_ages = torch.cat([layer.ages, layer.cache_ages])
    # reference rule: sort by (-age, -position)
    ref_order = sorted(expect.tolist(), key=lambda p: (-int(all_ages[p]), -p))
    assert res.order.tolist() == ref_order
    torch.testing.assert_close(res.order_scores, ref[res.order])
    rows = layer.rows(res.order)
    torch.testing.assert_close(rows, torch.cat([layer.vectors, layer.cache_vectors])[res.order])
    batch = ltm.retrieve_batch(0, torch.stack([q, q.flip(0) * 2]))
    assert batch[0].order.tolist() == res.order.tolist()
    assert batch[1].order.tolist() == ltm.retrieve(0, q.flip(0) * 2).order.tolist()


def test_retrieve_repeats_cyclically_when_ltm_smaller_than_r() -> None:
    cfg = LTMConfig(num_tokens=4, num_ltm_blocks=2)  # R = 8
    layer = _layer([5, 9, 1], [1, 1, 1])
    ltm = LongTermMemory(cfg, [layer])
    ltm.add_dropped(0, *_dropped(50, 2), torch.tensor([0, 0]))  # cache is ignored
    res = ltm.retrieve(0, torch.randn(2, 3))
    assert res.repeated
    assert res.order.tolist() == [0, 1, 2, 0, 1, 2, 0, 1]


# --------------------------------------------------------------------------- index
def test_index_recall_and_updates() -> None:
    torch.manual_seed(0)
    m, s, r = 50_000, 64, 256
    keys, q = synthetic_keys_queries(m, s, 32, seed=3, spec=SyntheticSpec(keys_per_cluster=128, query_topics=4))
    cfg = LTMConfig(num_tokens=r, num_ltm_blocks=1, update_ltm_frequency=1,
                    initial_rf_when_moving_stm_to_ltm=2, decay_frequency=1)
    ltm = LongTermMemory(cfg, [LTMLayer(torch.zeros(m, 1), keys, torch.arange(m), torch.ones(m) * 2)])
    ltm.build_index(0, min_candidates=16 * r)
    exact, approx = ltm.retrieve(0, q, "exact"), ltm.retrieve(0, q, "index")
    recall = torch.isin(approx.selected_sorted, exact.selected_sorted).float().mean().item()
    assert recall >= 0.95
    # scores of the index path are exact for the rows it returns
    torch.testing.assert_close(approx.order_scores, exact.scores[approx.order])

    # merge with eviction: the index follows the LTM (positions renumbered)
    new_keys, _ = synthetic_keys_queries(r, s, 1, seed=4, spec=SyntheticSpec(keys_per_cluster=128))
    ltm.add_dropped(0, torch.zeros(r, 1), new_keys, torch.zeros(r, dtype=torch.int64))
    ltm.layers[0].recall_frequencies[: m // 2] = 1  # first half dies at this merge
    sources = ltm.finish_update(r)
    assert sources is not None and ltm.layers[0].num_ltm == m // 2 + r
    index = ltm.indexes[0]
    assert index is not None and index.size == ltm.layers[0].num_ltm
    exact, approx = ltm.retrieve(0, q, "exact"), ltm.retrieve(0, q, "index")
    recall = torch.isin(approx.selected_sorted, exact.selected_sorted).float().mean().item()
    assert recall >= 0.95
    # every candidate position is a valid LTM row, each exactly once
    cand = index.candidates(q)
    assert cand.unique().numel() == cand.numel() and int(cand.max()) < ltm.layers[0].num_ltm


def test_index_members_cover_all_rows() -> None:
    keys = torch.randn(2000, 8)
    idx = LTMIndex(nlist=16).build(keys)
    idx.add(torch.randn(100, 8))
    idx.keep(torch.arange(0, 2100, 3))
    idx.min_candidates = 10**9  # visit everything
    assert sorted(idx.candidates(torch.randn(2, 8)).tolist()) == list(range(700))


def test_index_two_level_assignment_is_nearest_when_all_cells_probed() -> None:
    keys, _ = synthetic_keys_queries(6000, 16, 1, seed=5, spec=SyntheticSpec(keys_per_cluster=64))
    idx = LTMIndex(nlist=100, coarse_lists=5, coarse_probe=5).build(keys)
    assert idx.centroids.shape[0] == 100 and idx.size == 6000
    d2 = torch.cdist(keys, idx.centroids) ** 2
    nearest = d2.argmin(dim=1).numpy()
    assert (idx._assign == nearest).mean() > 0.999  # ties / float rounding aside
    # per-key squared distances feed the per-list spread used to rank lists
    torch.testing.assert_close(torch.from_numpy(idx._sq_dist), d2.min(dim=1).values, atol=1e-3, rtol=1e-3)
    # bf16 keys (no float32 copy of the whole matrix) build too
    assert LTMIndex(nlist=100, coarse_lists=5).build(keys.to(torch.bfloat16)).size == 6000


# --------------------------------------------------------------------------- save / load
def test_state_dict_roundtrip_without_copy(tmp_path: Path) -> None:
    cfg = LTMConfig(num_tokens=2, num_ltm_blocks=1, update_ltm_frequency=3)
    ltm = LongTermMemory(cfg, [_layer([1, 2, 3], [1, 2, 3]), _layer([4], [1])])
    ltm.add_dropped(0, *_dropped(9, 2), torch.tensor([0, 1]))
    ltm.add_dropped(1, *_dropped(9, 2), torch.tensor([1, 0]))
    assert ltm.finish_update(2) is None
    path = tmp_path / "ltm.safetensors"
    save_file({k: v.contiguous() for k, v in ltm.state_dict().items()}, str(path))
    tensors = load_file(str(path))
    back = LongTermMemory.from_tensors(tensors, cfg)
    assert back.update_step == 2
    assert back.layers[0].vectors.data_ptr() == tensors["ltm.0"].data_ptr()  # not copied
    for a, b in zip(ltm.layers, back.layers):
        assert torch.equal(a.ages, b.ages) and torch.equal(a.cache_ages, b.cache_ages)
        assert torch.equal(a.cache_vectors, b.cache_vectors)
    assert back.layers[0].ages.dtype == torch.int64


def test_config_from_every_source_is_the_same() -> None:
    """One constructor for the three places LTM settings come from: a MemoryConfig, a checkpoint's
    config.json (with other keys and nulls) and a memory file's header (exactly its fields)."""
    import dataclasses

    from memllm.core.config import MemoryConfig

    memory_config = MemoryConfig(kind="mplus", num_tokens=4, num_blocks=6, num_ltm_blocks=2,
                                 update_ltm_frequency=3, decay_frequency=0.5, initial_rf_when_moving_stm_to_ltm=2)
    want = LTMConfig(num_tokens=4, num_ltm_blocks=2, update_ltm_frequency=3, decay_frequency=0.5,
                     initial_rf_when_moving_stm_to_ltm=2.0)
    hf = {**memory_config.to_hf_dict(), "model_type": "llama", "hidden_size": 64, "rope_scaling": None}
    header = json.loads(json.dumps(dataclasses.asdict(want)))
    assert LTMConfig.from_dict(dataclasses.asdict(memory_config)) == want
    assert LTMConfig.from_dict(hf) == want
    assert LTMConfig.from_dict(header, strict=True) == want
    assert LTMConfig.from_dict({"num_tokens": 4.0, "num_ltm_blocks": 2}) == LTMConfig(4, 2)  # defaults, ints
    assert isinstance(LTMConfig.from_dict({"num_tokens": 4.0, "num_ltm_blocks": 2}).num_tokens, int)


@pytest.mark.parametrize(("values", "strict", "message"), [
    ({"num_tokens": 4, "num_ltm_blocks": 2, "bogus": 1}, True, "unknown LTM settings"),
    ({"num_tokens": 4, "num_ltm_blocks": None}, True, "num_ltm_blocks=None"),
    ({"num_tokens": 4}, False, "lack"),
    ({"num_tokens": "four", "num_ltm_blocks": 2}, False, "num_tokens='four'"),
    ({"num_tokens": 4.5, "num_ltm_blocks": 2}, False, "integer"),
    ({"num_tokens": True, "num_ltm_blocks": 2}, False, "num_tokens=True"),
    ({"num_tokens": 4, "num_ltm_blocks": 2, "decay_frequency": -1}, False, "non-negative"),
    ({"num_tokens": 4, "num_ltm_blocks": 2, "decay_frequency": float("nan")}, False, "decay_frequency"),
])
def test_config_refuses_bad_settings(values: dict, strict: bool, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LTMConfig.from_dict(values, strict=strict)


# --------------------------------------------------------------------------- golden
def _golden(family: str) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    MPLUS = GOLDEN_DIR / family
    meta = json.loads((MPLUS / "golden.json").read_text())
    rec = load_file(str(MPLUS / "tensors.safetensors"))
    with safe_open(str(MPLUS / "checkpoint" / "model.safetensors"), "pt") as f:
        ckpt = {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads((MPLUS / "checkpoint" / "config.json").read_text())
    return meta, rec, ckpt, config


def _queries(ckpt: dict[str, torch.Tensor], config: dict, h: torch.Tensor, layer: int) -> torch.Tensor:
    """q = query_proj_l(input_layernorm_l(h)): h [T, d] → [T, s]."""
    w = ckpt[f"model.layers.{layer}.input_layernorm.weight"]
    x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + config["rms_norm_eps"]) * w
    p = f"model.layers.{layer}.self_attn.query_proj."
    return torch.nn.functional.silu(x @ ckpt[p + "0.weight"].T) @ ckpt[p + "2.weight"].T


def _check_retrieval(ltm: LongTermMemory, rec: dict, ckpt: dict, config: dict, state: str,
                     expected: list[dict]) -> None:
    hs = rec[f"{state}/prompt_b1/hidden_states"]  # [L+1, 1, T, d]
    for e in expected:
        l = e["layer"]
        res = ltm.retrieve(l, _queries(ckpt, config, hs[l, 0], l))
        st = ltm.layers[l]
        assert (st.num_ltm, st.num_cached) == (e["n_ltm"], e["n_cached"])
        assert res.scores is not None
        torch.testing.assert_close(res.scores[: st.num_ltm], rec[f"{state}/retrieval/layer{l}/scores_ltm"],
                                   atol=1e-5, rtol=0)
        if st.num_cached:
            torch.testing.assert_close(res.scores[st.num_ltm:], rec[f"{state}/retrieval/layer{l}/scores_cached"],
                                       atol=1e-5, rtol=0)
        assert res.selected_sorted.tolist() == e["selected_sorted"]
        order = [p if kind == "ltm" else st.num_ltm + p for kind, p in e["order"]]
        assert res.order.tolist() == order
        assert st.row_ages(res.order).tolist() == e["ages_in_order"]


@needs_golden
def test_golden_retrieval_s0(family: str) -> None:
    meta, rec, ckpt, config = _golden(family)
    ltm = LongTermMemory.from_tensors(ckpt, LTMConfig.from_dict(config))
    _check_retrieval(ltm, rec, ckpt, config, "s0", meta["retrieval"]["s0"])


@needs_golden
def test_golden_merge_schedule_and_retrieval_after_steps(family: str) -> None:
    """Replay the 5 recorded updates (ages, frequencies, sources), then retrieve at each state.

    Keys/rows of dropped STM rows are not recomputed here (that needs the model); the LTM and
    cache keys for retrieval are taken from the recorded `ltm_keys_after` / `cached_keys_after`.
    """
    meta, rec, ckpt, config = _golden(family)
    cfg = LTMConfig.from_dict(config)
    k = cfg.num_tokens
    ltm = LongTermMemory.from_tensors(ckpt, cfg)
    num_layers = len(ltm.layers)
    for step in meta["steps"]:
        i = step["step"]
        known = [st.num_ltm + st.num_cached for st in ltm.layers]  # rows whose keys we have
        for l in range(num_layers):
            keys = (rec[f"step{i}/cached_keys_after"][l, -k:] if f"step{i}/cached_keys_after" in rec
                    else torch.zeros(k, ltm.layers[l].keys.shape[1]))
            vec = torch.zeros(k, ltm.layers[l].vectors.shape[1])
            ltm.add_dropped(l, vec, keys, torch.tensor(step["dropped_ages_at_drop_time"][l]))
        assert ltm.update_step == step["update_step_before"]
        sources = ltm.finish_update(k)
        assert ltm.update_step == step["update_step_after"]
        assert (sources is not None) == step["merged_into_ltm"]
        after = step["ltm_after"]
        for l, st in enumerate(ltm.layers):
            assert st.num_ltm == after["sizes"][l]
            assert st.ages.tolist() == after["ages"][l]
            assert st.recall_frequencies.tolist() == after["recall_frequencies"][l]
        if sources is not None:
            assert [s.tolist() for s in sources] == step["ltm_after_source_positions"]
            for l, st in enumerate(ltm.layers):  # rows from before this step keep their keys
                keys_after = rec[f"step{i}/ltm_keys_after/layer{l}"]
                from_old = sources[l] < known[l]
                torch.testing.assert_close(st.keys[from_old], keys_after[from_old], atol=1e-5, rtol=1e-5)
                st.keys = keys_after  # take the recorded keys of the newly merged rows
            assert all(st.num_cached == 0 for st in ltm.layers)
        else:
            for l, st in enumerate(ltm.layers):
                assert st.cache_ages.tolist() == step["cached_after"]["ages"][l]
                torch.testing.assert_close(st.cache_keys, rec[f"step{i}/cached_keys_after"][l])
        _check_retrieval(ltm, rec, ckpt, config, f"step{i}", step["retrieval_after"])
