"""Generation reads a memory through a preallocated (static) key/value cache: the same tokens and
logits as through the dynamic cache it replaced, for MemoryLLM and M+ (whose retrieval writes into
the cache), on padded batches and on batches whose rows read different memories."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, StaticCache

from memllm.core import hf_compat
from memllm.core.generate import ask_many
from memllm.core.tiny import random_model

NEW = 6


def model_and_memory(kind: str, seed: int = 1):
    model = random_model(kind=kind, num_blocks=6, num_ltm_blocks=2 if kind == "mplus" else 0, lora_rank=4,
                         seed=seed)
    model.lm.generation_config.eos_token_id = None  # always the requested number of tokens
    memory = model.new_memory()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(3):
            model.inject(memory, torch.randint(3, 200, (20,), generator=g))
    return model, memory


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # left padding
    return ids, mask


def run_generate(model, memory, ids, mask, new_tokens: int | None):
    """transformers' generate on `prepare`d inputs: a static cache when `new_tokens` is given."""
    with torch.no_grad(), model.adapter("decoder"):
        inputs = model.prepare(memory, ids, mask, new_tokens)
        inputs.pop("position_ids")
        cache = inputs[hf_compat.CACHE_ARG]
        with model.reading(memory, inputs):
            out = model.lm.generate(**inputs, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                                    output_logits=True, return_dict_in_generate=True, disable_compile=True)
    return cache, out


@pytest.mark.parametrize("kind", ["memoryllm", "mplus"])
def test_static_cache_generates_what_the_dynamic_one_did(kind: str) -> None:
    model, memory = model_and_memory(kind)
    ids, mask = padded_batch()
    dynamic, want = run_generate(model, memory, ids, mask, None)
    static, got = run_generate(model, memory, ids, mask, NEW)
    assert type(dynamic) is DynamicCache and isinstance(static, StaticCache)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), rtol=0, atol=1e-5)
    # the public call takes the static path and gives the same tokens
    assert torch.equal(model.generate(memory, ids, mask, max_new_tokens=NEW, do_sample=False), want.sequences)


def test_one_forward_keeps_a_dynamic_cache() -> None:
    """A single forward (time to first token, training) has no decoding steps to save."""
    model, memory = model_and_memory("memoryllm")
    ids, mask = padded_batch()
    with torch.no_grad():
        assert type(model.prepare(memory, ids, mask, 1)[hf_compat.CACHE_ARG]) is DynamicCache
        assert type(model.prepare(memory, ids, mask)[hf_compat.CACHE_ARG]) is DynamicCache
    assert type(model.prepare(memory, ids, mask, NEW)[hf_compat.CACHE_ARG]) is DynamicCache  # gradients on


def test_rows_reading_different_memories_answer_as_alone() -> None:
    model, first = model_and_memory("memoryllm", seed=1)
    second = model.new_memory()
    with torch.no_grad():
        model.inject(second, torch.arange(3, 40))
    questions = ["who is it", "where", "what did they do"]
    memories = [first, second, first]
    together = ask_many(model, memories, questions, max_new_tokens=NEW)
    alone = [model.ask(m, q, max_new_tokens=NEW) for m, q in zip(memories, questions)]
    assert together == alone
