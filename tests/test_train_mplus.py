"""memllm.train.trainer on M+: the retriever loss, its metrics, document tracking, the checkpoint round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import distinct_documents

import memllm
from memllm.core import checkpoint
from memllm.core.inject import RandomDrop
from memllm.core.ops import dropped_rows, kept_rows, write_ids, write_pool
from memllm.core.tiny import random_model
from memllm.train.retriever import retriever_loss
from memllm.train.trainer import (
    RETRIEVER_PROJECTORS,
    TrainConfig,
    retriever_metrics,
    train,
    trainable_parameters,
)

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def mplus_model(**kw):
    return random_model(kind="mplus", num_blocks=6, num_ltm_blocks=2, lora_rank=4, **kw)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """One short M+ training run on the forgetting objective (inject A's x1, two distractors, predict A's x2)."""
    tmp = tmp_path_factory.mktemp("train_mplus")
    checkpoint.save(mplus_model(), tmp / "ckpt")
    with open(tmp / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"text": doc}) + "\n" for doc in distinct_documents(64, 16, seed=1))
    before = memllm.load(tmp / "ckpt").eval()
    ids = [before.tokenizer(d, add_special_tokens=False)["input_ids"] for d in distinct_documents(16, 16, seed=99)]
    held = torch.tensor(ids).view(16, 2, 16)  # held-out documents [D, 2, T]
    cfg = TrainConfig(model=str(tmp / "ckpt"), data=[str(tmp / "docs.jsonl")], out=str(tmp / "out"), steps=30,
                      batch_size=4, context_len=16, num_distractors=2, log_every=1, save_every=100, progress=False,
                      dropout=0.0, lr=1e-2, memory_reset_prob=0.1, new_knowledge=0.0, continuous=0.0,
                      forgetting=1.0, plain_lm=0.0)
    result = train(cfg)
    return {"tmp": tmp, "cfg": cfg, "result": result, "held": held, "before": retriever_metrics(before, held)}


def test_train_mplus_retriever_loss_drops_and_metrics_are_logged(run):
    records = [json.loads(line) for line in (Path(run["cfg"].out) / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 30
    for r in records:
        for key in ("retriever/loss", "retriever/precision@k", "retriever/recall@k", "retriever/recall@R",
                    "retriever/chance@k", "loss/forgetting"):
            assert key in r and torch.isfinite(torch.tensor(r[key])), (key, r)
        assert 0 <= r["retriever/precision@k"] <= 1 and r["retriever/precision@k"] == r["retriever/recall@k"]
    assert "retriever/loss" in run["result"]["losses"]
    # measured on held-out documents, from the checkpoint before and after training
    before = run["before"]
    after = retriever_metrics(memllm.load(run["result"]["model"]).eval(), run["held"])
    chance = before["retriever/chance@k"]
    assert after["retriever/loss"] < before["retriever/loss"] - 0.01, (before, after)
    assert after["retriever/precision@k"] > before["retriever/precision@k"] + 0.1, (before, after)
    assert after["retriever/precision@k"] > chance + 0.05, (before, after)


def test_train_mplus_checkpoint_reloads_and_reads_a_memory(run):
    path = run["result"]["model"]
    model, again = memllm.load(path).eval(), memllm.load(path).eval()
    start = mplus_model()
    for name in RETRIEVER_PROJECTORS:  # the retriever was trained and saved
        assert not torch.equal(getattr(model.layers[0].self_attn, name)[0].weight,
                               getattr(start.layers[0].self_attn, name)[0].weight), name
    assert model.initial_ltm is not None and model.initialized
    memories = []
    for m in (model, again):
        memory = m.new_memory()
        g, drop = torch.Generator().manual_seed(0), RandomDrop(generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            for _ in range(6):  # enough updates for a long-term memory to retrieve from
                m.inject(memory, torch.randint(0, 200, (20,), generator=g), drop=drop)
        memories.append(memory)
    assert all(st.num_ltm > 0 for st in memories[0].ltm.layers)
    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(2))
    trace: list = []
    with torch.no_grad():
        a = model(ids, memories[0], retrievals=trace).logits
        b = again(ids, memories[1]).logits
    assert len(trace) == model.num_layers  # the read retrieved from the long-term memory
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_train_mplus_trains_projectors_and_tracks_documents():
    model = mplus_model()
    params = {id(p) for p in trainable_parameters(model, "lora")}
    for layer in model.layers:
        for name in RETRIEVER_PROJECTORS:
            assert all(id(p) in params for p in getattr(layer.self_attn, name).parameters())
    B, L, N, K, d = 2, model.num_layers, model.config.num_memory_tokens, model.config.num_tokens, model.hidden_size
    pool = torch.randn(B, L, N, d)
    docs = torch.arange(B * L * N).view(B, L, N)  # a unique id per row: follow every row
    kept = torch.stack([kept_rows(L, N, K, torch.Generator().manual_seed(b)) for b in range(B)])
    new = write_pool(pool, torch.zeros(B, L, K, d), kept)
    new_docs = write_ids(docs, torch.tensor([-5, -6]), kept)
    assert torch.equal(new_docs[..., -K:], torch.tensor([-5, -6]).view(B, 1, 1).expand(B, L, K))
    assert torch.equal(pool.gather(2, new_docs[..., : N - K].unsqueeze(-1).remainder(N).expand(-1, -1, -1, d)),
                       new[:, :, : N - K])
    gone = dropped_rows(kept, N)
    assert gone.shape == (B, L, K)
    assert torch.equal(torch.cat([kept, gone], 2).sort(-1).values, torch.arange(N).expand(B, L, N))


def test_train_mplus_retriever_loss_is_the_published_bce():
    """Log-space loss = BCE on mean_t sigmoid(q . k), positives and negatives averaged separately."""
    model = mplus_model()
    B, L, C, T, d = 2, model.num_layers, 10, 5, model.hidden_size
    g = torch.Generator().manual_seed(0)
    hidden = {l: torch.randn(B, T, d, generator=g) for l in range(L)}
    cand = torch.randn(B, L, C, d, generator=g)
    positive = torch.zeros(B, L, C, dtype=torch.bool)
    positive[..., :3] = True
    loss, stats = retriever_loss(model, hidden, cand, positive)
    expected = []
    for l, layer in enumerate(model.layers):
        q = layer.self_attn.query_proj(layer.input_layernorm(hidden[l]))
        k = layer.self_attn.key_proj(layer.input_layernorm(cand[:, l]))
        score = torch.sigmoid(q @ k.transpose(1, 2)).mean(1)  # [B, C]
        bce = torch.nn.functional.binary_cross_entropy(score, positive[:, l].float(), reduction="none")
        expected.append(0.5 * (bce[:, :3].mean(-1) + bce[:, 3:].mean(-1)))
    torch.testing.assert_close(loss, torch.cat(expected).mean(), atol=1e-6, rtol=1e-5)
    assert stats[1] == B * L
    loss.backward()
    assert model.layers[0].self_attn.key_proj[0].weight.grad is not None
    assert model.layers[0].input_layernorm.weight.grad is None  # only the projectors learn from it


def test_train_mplus_prediction_reads_the_long_term_memory():
    """MemoryTraining with a RowLTM: every dropped row joins it (capped at ltm_rows, newest kept), the
    prediction retrieves from it (its loss differs from the masked read) and the retriever's candidates
    include it."""
    from memllm.core.mplus import RowLTM
    from memllm.train.objectives import MemoryTraining

    model = mplus_model(seed=3)
    B, L, N, K = 2, model.num_layers, model.config.num_memory_tokens, model.config.num_tokens
    g = torch.Generator().manual_seed(0)
    contexts = torch.randint(3, 200, (B, 5, 16), generator=g)  # 4 injections (32 dropped rows), 1 prediction
    pool = model.initial_pool.detach().unsqueeze(0).repeat(B, 1, 1, 1)
    kept = torch.stack([torch.stack([kept_rows(L, N, K, torch.Generator().manual_seed(10 * s + b)) for b in range(B)])
                        for s in range(4)])
    docs = torch.tensor([[0, 1, 2, 3, 0], [4, 5, 6, 7, 4]])
    pool_docs = torch.full((B, L, N), -1)
    ages = torch.zeros(B, L, N, dtype=torch.long)
    with torch.no_grad():
        masked, _, plain = MemoryTraining(model)(contexts, pool, [False] * 4, kept, docs=docs, pool_docs=pool_docs)
        read, _, info = MemoryTraining(model, ltm_rows=24)(contexts, pool, [False] * 4, kept, docs=docs,
                                                           pool_docs=pool_docs, ltm=RowLTM.empty(pool), stm_ages=ages)
    ltm = info["ltm"]
    assert ltm.size == 24 and ltm.vectors.shape == (B, L, 24, model.hidden_size)
    assert set(ltm.docs.unique().tolist()) <= {-1, 0, 1, 2, 4, 5, 6}  # written before the last injection
    assert abs(info["lm_loss"].item() - plain["lm_loss"].item()) > 1e-4
    assert info["retriever"][1] > 0 and plain["retriever"][1] > 0
