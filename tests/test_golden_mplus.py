"""memllm against the authors' M+ (main branch, modeling_mplus.py), recorded in golden vectors.

Driven by the files: every family under MEMLLM_GOLDEN_DIR (default tests/golden) whose golden.json says
kind "mplus" runs every check, and every recorded tensor must be reproduced: retrieval scores, the
selected and ordered rows, logits and hidden states before and after each of the update steps, the
cache and the long-term memory after each step, and greedy generations.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    Golden,
    assert_checkpoint_round_trip,
    check_recorded,
    golden_families,
    load_golden,
)

import memllm
from memllm.core.inject import RecordedDrop, delta_memory, update

FAMILIES = golden_families("mplus")
pytestmark = pytest.mark.skipif(not FAMILIES, reason="no M+ golden vectors found")


def replay(g: Golden) -> tuple[dict[str, torch.Tensor], dict]:
    """Redo the recorded M+ session; returns tensors named as recorded, plus the integer facts."""
    model = memllm.load(g.checkpoint)
    model.lm.generation_config.eos_token_id = None
    memory = model.new_memory()
    out: dict[str, torch.Tensor] = {}
    facts: dict = {"retrieval": {}, "steps": []}

    def read(state: str) -> None:
        trace: list = []
        res = model(g.ids("prompt_b1"), memory, output_hidden_states=True, retrievals=trace)
        out[f"{state}/prompt_b1/logits"] = res.logits
        out[f"{state}/prompt_b1/hidden_states"] = torch.stack(res.hidden_states)
        layers = []
        for l, (retrieval,) in trace:
            n_ltm = memory.ltm.layers[l].num_ltm
            out[f"{state}/retrieval/layer{l}/scores_ltm"] = retrieval.scores[:n_ltm]
            if retrieval.scores.shape[0] > n_ltm:
                out[f"{state}/retrieval/layer{l}/scores_cached"] = retrieval.scores[n_ltm:]
            order = [["ltm", p] if p < n_ltm else ["cached", p - n_ltm] for p in retrieval.order.tolist()]
            layers.append({"selected_sorted": retrieval.selected_sorted.tolist(), "order": order})
        facts["retrieval"][state] = layers

    with torch.no_grad():
        read("s0")
        for name in ("ctx_long", "ctx_short"):
            out[f"s0/inject/{name}/delta"] = delta_memory(model, memory.pool, g.ids(name))
        gen = model.generate(memory, g.ids("prompt_b1"), max_new_tokens=8, do_sample=False,
                             return_dict_in_generate=True, output_scores=True)
        out["s0/generate_b1/sequences"], out["s0/generate_b1/scores"] = gen.sequences, torch.stack(gen.scores)
        for i, step in enumerate(g.meta["steps"], start=1):
            delta = delta_memory(model, memory.pool, g.ids(step["context"]))[0]
            out[f"step{i}/delta"] = delta
            kept = update(model, memory, delta, RecordedDrop([g.tensors[f"step{i}/kept_indices"]]))
            out[f"step{i}/kept_indices"] = kept
            out[f"step{i}/dropped_indices"] = g.tensors[f"step{i}/dropped_indices"]  # fed, as kept's complement
            layers = memory.ltm.layers
            if layers[0].num_cached:
                out[f"step{i}/cached_memories_after"] = torch.stack([st.cache_vectors for st in layers])
                out[f"step{i}/cached_keys_after"] = torch.stack([st.cache_keys for st in layers])
            else:
                for l, st in enumerate(layers):
                    out[f"step{i}/ltm_after/layer{l}"] = st.vectors
                    out[f"step{i}/ltm_keys_after/layer{l}"] = st.keys
            facts["steps"].append({
                "stm_ages_after": memory.stm_ages.tolist(),
                "update_step_after": memory.ltm.update_step,
                "cached_after": {"size": layers[0].num_cached, "ages": [st.cache_ages.tolist() for st in layers]},
                "ltm_after": {"sizes": [st.num_ltm for st in layers], "ages": [st.ages.tolist() for st in layers],
                              "recall_frequencies": [st.recall_frequencies.tolist() for st in layers]},
            })
            read(f"step{i}")
        out["final/stm"] = memory.pool
        gen = model.generate(memory, g.ids("prompt_b1"), max_new_tokens=8, do_sample=False,
                             return_dict_in_generate=True, output_scores=True)
        out["final/generate_b1/sequences"], out["final/generate_b1/scores"] = gen.sequences, torch.stack(gen.scores)
    return out, facts


_replays: dict[str, tuple] = {}


def replayed(name: str):
    g = load_golden(name)
    if name not in _replays:
        _replays[name] = replay(g)
    return g, *_replays[name]


def category(name: str) -> str:
    for part, cat in [("/logits", "logits"), ("/hidden_states", "hidden_states"), ("/scores_", "retrieval_scores"),
                      ("/scores", "scores"), ("/delta", "delta_memory"), ("_keys_after", "ltm_keys"),
                      ("cached_memories_after", "memory"), ("ltm_after", "memory"), ("final/stm", "memory")]:
        if part in name:
            return cat
    raise KeyError(name)


def check(g: Golden, ours: dict[str, torch.Tensor], prefix: str) -> int:
    return check_recorded(g, ours, prefix, category)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prefix", ["s0/", "step1/", "step2/", "step3/", "step4/", "step5/", "final/"])
def test_golden_mplus_tensors(family: str, prefix: str) -> None:
    g, ours, _ = replayed(family)
    assert check(g, ours, prefix) > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_golden_mplus_every_recorded_tensor_is_reproduced(family: str) -> None:
    g, ours, _ = replayed(family)
    assert check(g, ours, "") == len(g.tensors)
    for state, gen in g.meta["generation"].items():
        assert ours[f"{state}/generate_b1/sequences"].tolist() == gen["generate_b1"]["sequences"]


@pytest.mark.parametrize("family", FAMILIES)
def test_golden_mplus_retrieval_selection_and_order(family: str) -> None:
    g, _, facts = replayed(family)
    recorded = {"s0": g.meta["retrieval"]["s0"]}
    recorded.update({f"step{i}": s["retrieval_after"] for i, s in enumerate(g.meta["steps"], start=1)})
    for state, layers in recorded.items():
        for rec, ours in zip(layers, facts["retrieval"][state], strict=True):
            assert ours["selected_sorted"] == rec["selected_sorted"], (state, rec["layer"])
            assert ours["order"] == rec["order"], (state, rec["layer"])


@pytest.mark.parametrize("family", FAMILIES)
def test_golden_mplus_ages_cache_and_ltm_bookkeeping(family: str) -> None:
    g, _, facts = replayed(family)
    for rec, ours in zip(g.meta["steps"], facts["steps"], strict=True):
        assert ours["stm_ages_after"] == rec["stm_ages_after"]
        assert ours["update_step_after"] == rec["update_step_after"]
        if rec["cached_after"] is None:  # a merging step empties the cache
            assert ours["cached_after"]["size"] == 0
        else:
            assert ours["cached_after"]["size"] == rec["cached_after"]["size"]
            assert ours["cached_after"]["ages"] == rec["cached_after"]["ages"]
        assert ours["ltm_after"]["sizes"] == rec["ltm_after"]["sizes"]
        assert ours["ltm_after"]["ages"] == rec["ltm_after"]["ages"]
        for got, want in zip(ours["ltm_after"]["recall_frequencies"], rec["ltm_after"]["recall_frequencies"], strict=True):
            assert got == pytest.approx(want)


@pytest.mark.parametrize("family", FAMILIES)
def test_golden_mplus_checkpoint_keys_round_trip(family: str, tmp_path) -> None:
    assert_checkpoint_round_trip(load_golden(family), tmp_path / "ckpt")
