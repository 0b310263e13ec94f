"""The tiny-model recipe: its stages run, its data is a function of the seed, grouping is exact."""

from __future__ import annotations

import math
import random
from functools import cache

import pytest
import torch

from memllm import tinymodel as tm
from memllm.inject import delta_memory
from memllm.train import write

SMALL = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64, "num_tokens": 32,
         "stm_blocks": 3, "ltm_blocks": 1, "stage1_people": 50, "stage1_batch": 4, "batch": 4,
         "max_distractors": 2, "tokenizer_docs": 300}


@cache
def world_and_tokenizer():
    recipe = tm.Recipe(**SMALL)
    world = tm.build_world(recipe)
    return world, tm.build_tokenizer(world, recipe)


def small_model(kind: str = "memoryllm", seed: int = 0):
    world, tok = world_and_tokenizer()
    recipe = tm.Recipe(kind=kind, seed=seed, **SMALL)
    return recipe, world, tok, tm.build_model(recipe, tok)


def test_build_model_sizes_and_seed():
    _, _, tok, model = small_model()
    assert model.config.num_tokens == 32 and model.config.num_memory_tokens == 96
    assert model.lm.config.vocab_size == len(tok) and model.tokenizer is tok
    _, _, _, again = small_model()
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    _, _, _, mplus = small_model("mplus")
    assert mplus.config.num_retrieved == 32 and mplus.config.num_memory_tokens == 96


def test_data_is_a_function_of_the_seed():
    _, world, tok, _ = small_model()
    people = world.people(10, "train", seed=0)

    def draw(seed):
        rng = random.Random(seed)
        ids, labels = tm.lm_batch(world, tok, people, rng, 3)
        mb = tm.memory_batch(world, tok, world.people_stream("train", seed), rng, 3, 2, 2, 96, 32)
        return ids, labels, mb

    a, b, c = draw(1), draw(1), draw(2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[2].bios == b[2].bios and a[2].distractors == b[2].distractors
    assert torch.equal(a[2].questions, b[2].questions) and all(torch.equal(x, y) for x, y in zip(a[2].kept, b[2].kept))
    assert a[2].bios != c[2].bios
    mb = a[2]
    assert all(len(bio) <= 32 for bio in mb.bios)
    assert len(mb.kept) == 3 and mb.kept[0].shape == (3, 2, 64)
    # exactly one labelled token per row: the answer, right after the prompt
    assert ((mb.labels != -100).sum(1) == 1).all()


def test_inject_rows_matches_row_by_row():
    _, world, tok, model = small_model()
    rng = random.Random(0)
    rows = tm.encode(tok, [world.distractor(rng) for _ in range(4)], bos=False)
    assert len({len(r) for r in rows}) > 1  # several lengths: the grouping is exercised
    pools = tm.start_pools(model, 4) + 0.01 * torch.randn(4, 2, 96, 32)
    kept = torch.rand(4, 2, 96).argsort(-1)[..., :64].sort(-1).values
    with torch.no_grad():
        got = tm.inject_rows(model, pools, rows, kept)
        for b, r in enumerate(rows):
            delta = delta_memory(model, pools[b : b + 1], torch.tensor([r]))
            want = write(pools[b : b + 1], delta, kept[b : b + 1])
            torch.testing.assert_close(got[b : b + 1], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["memoryllm", "mplus"])
def test_stage_steps_run_and_learn(kind):
    recipe, world, tok, model = small_model(kind)
    model.train()
    rng = random.Random(0)
    people = world.people(20, "train", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = tm.lm_step(model, opt, world, tok, people, rng, 4)
    assert math.isfinite(loss) and loss > 0
    stream = world.people_stream("train", 1)
    loss, acc, stats = tm.memory_step(model, opt, world, tok, stream, rng, recipe)
    assert math.isfinite(loss) and 0 <= acc <= 1
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "bos_embedding" in changed and "new_memory_positional_emb" in changed
    assert any("layers.0.self_attn.q_proj" in n for n in changed)
    if kind == "mplus":  # the retriever learns (when the step had a related vector in long-term memory)
        assert stats is None or any("query_proj" in n for n in changed)
    heldout = world.heldout_people(4, seed=0)
    assert 0 <= tm.in_context_accuracy(model, world, tok, heldout, seed=0) <= 1
    assert 0 <= tm.recall_accuracy(model, world, tok, heldout, 1, seed=0) <= 1


def test_memory_gradient_reaches_the_injection():
    _, world, tok, model = small_model()
    rng = random.Random(3)
    mb = tm.memory_batch(world, tok, world.people_stream("train", 3), rng, 2, 1, 2, 96, 32)
    loss, _, _ = tm.memory_loss(model, mb)
    loss.backward()
    assert model.new_memory_positional_emb.grad is not None  # only used by injections
    assert model.new_memory_positional_emb.grad.abs().sum() > 0


def test_run_end_to_end_saves_a_loadable_checkpoint(tmp_path):
    from memllm.checkpoint import load

    recipe = tm.Recipe(minutes=0.02, mplus_minutes=0.02, eval_every=1, eval_people=2, **SMALL)
    summary = tm.run(recipe, tmp_path / "ckpt")  # kind "both": MemoryLLM, then M+ from it
    for kind in ("memoryllm", "mplus"):
        assert (tmp_path / "ckpt" / kind / "recipe.json").exists()
        model = load(tmp_path / "ckpt" / kind)
        assert model.tokenizer is not None and model.config.num_memory_tokens == 96
        assert model.config.kind == kind and summary[kind]["params"] > 0


def test_mplus_starts_from_memoryllm_and_its_retriever_learns_from_long_term_memory():
    recipe, world, tok, base = small_model()
    model = tm.mplus_from(base, recipe)
    for name, p in base.state_dict().items():
        assert torch.equal(model.state_dict()[name], p)
    # 6 distractors: the biography's vectors are in long-term memory (N = 3 blocks), with others
    mb = tm.memory_batch(world, tok, world.people_stream("train", 5), random.Random(5), 3, 6, 2, 96, 32, 0.5)
    loss, _, stats = tm.memory_loss(model, mb, grad_distractors=False, retriever_weight=1.0)
    assert stats is not None and stats[1] > 0  # (row, layer) pairs scored
    loss.backward()
    for layer in model.layers:
        assert layer.self_attn.query_proj[0].weight.grad.abs().sum() > 0
        assert layer.self_attn.key_proj[0].weight.grad.abs().sum() > 0


def test_qa_batch_labels_only_the_answer_which_is_in_context():
    _, world, tok, _ = small_model()
    people = world.people(5, "train", seed=0)
    ids, labels = tm.qa_batch(world, tok, people, random.Random(0), 6)
    assert ids.shape == labels.shape and ((labels != -100).sum(1) == 1).all()
    for row, lab in zip(ids, labels):
        pos = int((lab != -100).nonzero()[0, 0])
        assert row[pos] == lab[pos] and int(lab[pos]) in row[:pos].tolist()  # copied from a biography
