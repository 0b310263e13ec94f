"""Answer attribution: the recomputed attention equals the model's own (eager) attention weights, shares
sum to 1 over source updates, and an update whose rows get the attention gets the share."""

from __future__ import annotations

from contextlib import ExitStack
from functools import lru_cache

import pytest
import torch

from memllm.core import attribution, hf_compat
from memllm.core.generate import encode_prompt
from memllm.core.inject import RandomDrop
from memllm.core.mplus import ltm_is_empty, retrieving
from memllm.core.tiny import random_model

TEXTS = [f"Entry {i}: the ferry to island {i} leaves at {i % 12} o'clock from pier {i * 7}." for i in range(12)]
QUESTION = "When does the ferry to island 3 leave?"
ANSWER = torch.tensor([65, 66, 67, 68])


def filled(kind: str):
    """A model and a fork of its memory of TEXTS (built once per kind; each test may change its fork)."""
    model, memory = _filled(kind)
    return model, memory.fork()


@lru_cache(maxsize=None)
def _filled(kind: str):
    model = random_model(kind=kind, num_ltm_blocks=1 if kind == "mplus" else 0, num_tokens=8, num_blocks=4, seed=4,
                         lora_rank=4)
    memory = model.new_memory()
    drop = RandomDrop(generator=torch.Generator().manual_seed(0))
    for text in TEXTS:
        model.inject(memory, text, chunk_size=32, drop=drop)
    return model, memory


def eager_prefix_attention(model, memory) -> tuple[list[torch.Tensor], int]:
    """The model's own attention weights (eager attention, output_attentions) of the answer-predicting
    queries on the prefix rows, per layer, averaged over heads and queries."""
    prompt = encode_prompt(model, QUESTION)["input_ids"]
    ids = torch.cat([prompt[0], ANSWER[:-1]]).unsqueeze(0)
    question_only = torch.zeros_like(ids)
    question_only[:, :prompt.shape[1]] = 1
    model.lm.config._attn_implementation = "eager"
    with torch.no_grad(), model.adapter("decoder"), ExitStack() as stack:
        inputs = model.prepare(memory, ids)
        if model.config.kind == "mplus" and not ltm_is_empty(memory):
            stack.enter_context(retrieving(model, memory, inputs[hf_compat.CACHE_ARG], question_only))
        out = model.lm(**inputs, use_cache=True, output_attentions=True)
    P = inputs["attention_mask"].shape[1] - ids.shape[1]
    return [a[0, :, -len(ANSWER):, :P].mean(dim=(0, 1)) for a in out.attentions], P


@pytest.mark.parametrize("kind", ["memoryllm", "mplus"])
def test_recomputed_attention_is_the_models_own(kind: str) -> None:
    model, memory = filled(kind)
    prompt = encode_prompt(model, QUESTION)["input_ids"]
    mass, retrieved = attribution._prefix_attention(model, memory, prompt, ANSWER)
    reference, P = eager_prefix_attention(model, memory)
    assert len(mass) == model.num_layers and mass[0].shape == (P,)
    for ours, theirs in zip(mass, reference):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    if kind == "mplus":  # the retrieved long-term rows are in the prefix, with their sources
        assert all(r is not None and r.shape == (model.config.num_retrieved,) for r in retrieved)


@pytest.mark.parametrize("kind", ["memoryllm", "mplus"])
def test_shares_sum_to_one_over_the_sources_that_hold_rows(kind: str) -> None:
    model, memory = filled(kind)
    result = attribution.explain(model, memory, QUESTION, answer_ids=ANSWER)
    assert abs(sum(result.shares.values()) - 1) < 1e-9 and 0 < result.memory_mass <= 1
    assert list(result.shares.values()) == sorted(result.shares.values(), reverse=True)
    assert set(result.shares) <= set(memory.source_counts())
    if kind == "mplus":
        assert result.retrieved_share > 0
        only_ltm = {u for u, (stm, ltm) in memory.source_counts().items() if ltm and not stm}
        assert only_ltm & set(result.shares)  # updates reached only through retrieval are attributed


def test_the_update_whose_rows_get_the_attention_gets_the_share() -> None:
    model, memory = filled("memoryllm")
    reference, _ = eager_prefix_attention(model, memory)
    # relabel: at every layer the quarter of short-term rows the answer attends to most become update 99's,
    # the rest are spread over updates 1..8
    N = memory.pool.shape[1]
    sources = torch.arange(N).remainder(8).add(1).expand(model.num_layers, N).clone()
    expected = 0.0
    for l, weights in enumerate(reference):
        stm = weights[1:]
        top = stm.topk(N // 4).indices
        sources[l, top] = 99
        expected += float(stm[top].sum())
    memory.sources = sources
    memory.num_updates = 99
    result = attribution.explain(model, memory, QUESTION, answer_ids=ANSWER)
    assert result.top(1)[0][0] == 99 and result.top(1)[0][1] > 0.25
    total = sum(float(w[1:].sum()) for w in reference)
    assert abs(result.shares[99] - expected / total) < 1e-6


def test_explain_generates_the_greedy_answer_when_none_is_given() -> None:
    model, memory = filled("memoryllm")
    result = attribution.explain(model, memory, QUESTION, max_new_tokens=4)
    assert result.answer == model.ask(memory, QUESTION, max_new_tokens=4)
    with pytest.raises(ValueError, match="no tokens"):
        attribution.explain(model, memory, QUESTION, answer_ids=[])


def test_ask_explain_and_the_ranking_of_injected_updates() -> None:
    model, memory = filled("memoryllm")
    result = model.ask(memory, QUESTION, max_new_tokens=4, explain=True)
    assert isinstance(result, attribution.Attribution)
    assert result.shares == attribution.explain(model, memory, QUESTION, max_new_tokens=4).shares
    updates = result.top(len(result.shares), updates_only=True)
    assert updates and all(u > 0 for u, _ in updates)
    assert [u for u, _ in updates] == [u for u, _ in result.top(len(result.shares)) if u > 0]  # same order
    with pytest.raises(ValueError, match="one question"):
        model.ask(memory, [QUESTION, QUESTION], explain=True)
