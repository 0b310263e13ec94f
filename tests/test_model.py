"""Reading and writing memory on tiny random models: padding, caching, gradients, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import memllm
from memllm import CheckpointError
from memllm.core.inject import delta_memory
from memllm.core.tiny import random_model


@pytest.fixture(scope="module")
def model():
    return random_model(seed=3, lora_rank=4, num_layers=2)


def _ids(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows)


def test_padded_batch_rows_equal_unpadded_rows(model) -> None:
    memory = model.new_memory()
    short, long = [11, 12, 13], [21, 22, 23, 24, 25, 26]
    pad = 0
    for side in ("left", "right"):
        if side == "left":
            ids, mask = _ids([pad] * 3 + short, long), _ids([0] * 3 + [1] * 3, [1] * 6)
        else:
            ids, mask = _ids(short + [pad] * 3, long), _ids([1] * 3 + [0] * 3, [1] * 6)
        with torch.no_grad():
            batch = model(ids, memory, attention_mask=mask).logits
            alone = model(_ids(short), memory).logits
            real = batch[0][mask[0].bool()]
            torch.testing.assert_close(real, alone[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batch[1], model(_ids(long), memory).logits[0], atol=1e-5, rtol=1e-5)


def test_padded_generation_equals_unpadded(model) -> None:
    memory = model.new_memory()
    model.lm.generation_config.eos_token_id = None
    ids, mask = _ids([0, 0, 0, 11, 12, 13], [21, 22, 23, 24, 25, 26]), _ids([0, 0, 0, 1, 1, 1], [1] * 6)
    with torch.no_grad():
        batch = model.generate(memory, ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        alone = model.generate(memory, _ids([11, 12, 13]), max_new_tokens=6, do_sample=False)
    assert batch[0, -6:].tolist() == alone[0, -6:].tolist()


def test_padded_injection_rows_equal_unpadded(model) -> None:
    memory = model.new_memory()
    a = list(range(30, 50))  # 20 tokens >= K
    b = list(range(60, 72))  # 12 tokens >= K = 8
    c = list(range(80, 85))  # 5 tokens < K: the T < K path
    for rows in ([a, b], [a, c]):
        T = max(map(len, rows))
        ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
        with torch.no_grad():
            batch = delta_memory(model, memory.pool, ids, mask)
            for i, r in enumerate(rows):
                alone = delta_memory(model, memory.pool, torch.tensor([r]))
                torch.testing.assert_close(batch[i], alone[0], atol=1e-5, rtol=1e-5)


def test_reused_prefix_equals_recomputed(model) -> None:
    memory = model.new_memory()
    ids = _ids([5, 6, 7, 8])
    with torch.no_grad():
        model.clear_prefix_cache()
        first = model(ids, memory).logits
        cached = model(ids, memory).logits
        model.inject(memory, list(range(100, 120)))  # an update must invalidate the cached prefix
        after = model(ids, memory).logits
        model.clear_prefix_cache()
        recomputed = model(ids, memory).logits
    assert torch.equal(first, cached)
    assert not torch.allclose(first, after)
    assert torch.equal(after, recomputed)


def test_prefix_cache_is_bounded_by_bytes_least_recently_used_out(model) -> None:
    memories = [model.new_memory() for _ in range(5)]
    for i, m in enumerate(memories):
        model.inject(m, list(range(100 + i, 130 + i)))
    ids = _ids([5, 6, 7, 8])
    with torch.no_grad():
        model.clear_prefix_cache()
        model(ids, memories[0])
        one = model.prefix_cache_info()["bytes"]
        assert one > 0
        old = model.prefix_cache_bytes
        try:
            model.prefix_cache_bytes = 3 * one  # room for three prefixes
            for m in memories[:4]:
                model(ids, m)
            assert model.prefix_cache_info() == {"entries": 3, "bytes": 3 * one}
            model(ids, memories[1])  # used again: now the most recent, so 2 goes out next
            model(ids, memories[4])
            held = {id(e.pool) for e in model._prefix_cache.values()}
            assert held == {id(memories[i].pool) for i in (1, 3, 4)}
            model.prefix_cache_bytes = 1  # below one prefix: the newest is still kept
            model(ids, memories[0])
            assert model.prefix_cache_info() == {"entries": 1, "bytes": one}
        finally:
            model.prefix_cache_bytes = old
            model.clear_prefix_cache()


def test_injection_is_differentiable_into_the_prediction(model) -> None:
    """Training backpropagates from a prediction through the memory it reads into the injection."""
    memory = model.new_memory()
    ctx, question = _ids(list(range(40, 60))), _ids([7, 8, 9, 10])
    delta = delta_memory(model, memory.pool, ctx)[0]
    memory.pool = torch.cat([memory.pool[:, delta.shape[1]:], delta], dim=1)
    loss = model(question, memory, labels=question).loss
    loss.backward()
    assert model.new_memory_positional_emb.grad is not None and model.new_memory_positional_emb.grad.abs().sum() > 0
    encoder_grads = [p.grad for n, p in model.named_parameters() if "lora_A.default" in n]
    assert all(g is not None and g.abs().sum() > 0 for g in encoder_grads)
    model.zero_grad()


def test_bad_input_is_refused_clearly(model) -> None:
    memory = model.new_memory()
    before = memory.pool
    with pytest.raises(ValueError, match="empty"):
        model.inject(memory, "   ")
    with pytest.raises(ValueError, match="invalid token ids"):
        model.inject(memory, [1, 2, 10_000])
    with pytest.raises(ValueError, match="no tokens"):
        model.inject(memory, [])
    with pytest.warns(UserWarning, match="at least 16 tokens"):
        model.inject(memory, "short text")
    assert memory.num_updates == 1 and before is not memory.pool
    with pytest.raises(ValueError, match="empty"):
        model.ask(memory, "")


def test_long_text_is_injected_in_chunks(model) -> None:
    memory = model.new_memory()
    calls = []
    n = model.inject(memory, "x" * 100, chunk_size=16, progress=lambda done, total: calls.append((done, total)))
    assert n == 6 and memory.num_updates == 6  # 100 = 6 * 16 + 4: the 4-token tail joins the last chunk
    assert calls[-1] == (6, 6)


def test_ask_and_stream_return_text(model) -> None:
    memory = model.new_memory()
    model.inject(memory, "The red door opens at noon every day.")
    answer = model.ask(memory, "When does the door open?", max_new_tokens=5)
    assert isinstance(answer, str)
    assert "".join(model.stream(memory, "When does the door open?", max_new_tokens=5)) == answer
    assert len(model.ask(memory, ["a?", "longer question?"], max_new_tokens=3)) == 2


def test_unsupported_and_broken_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        memllm.load(tmp_path / "nowhere")
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="unsupported architecture"):
        memllm.load(tmp_path / "gpt")
    good = memllm.save(random_model(), tmp_path / "good")
    (good / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt"):
        memllm.load(good)


def test_checkpoint_with_a_dropped_adapter_fails_loudly(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    out = memllm.save(random_model(lora_rank=4), tmp_path / "m")
    state = load_file(out / "model.safetensors")
    save_file({k: v for k, v in state.items() if "decoder_adapter" not in k}, out / "model.safetensors")
    with pytest.raises(CheckpointError, match="does not set"):
        memllm.load(out)
    config = json.loads((out / "config.json").read_text())
    config["lora_config"] = None
    config["add_decoder_lora"] = False
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="LoRA keys"):
        memllm.load(out)


def test_init_turns_a_base_model_into_a_memory_model(tmp_path: Path) -> None:
    base = random_model()
    base.lm.save_pretrained(tmp_path / "base")
    base.tokenizer.save_pretrained(tmp_path / "base")
    model = memllm.init_from_base(tmp_path / "base", num_tokens=8, num_blocks=4)
    memory = model.new_memory()
    assert not memory.initialized
    model.inject(memory, "A first context of more than sixteen bytes.")
    assert memory.initialized and memory.pool.shape == (2, 32, 64)
    again = memllm.load(memllm.save(model, tmp_path / "mem"))
    assert not again.new_memory().initialized


def test_sharded_bfloat16_checkpoint_round_trip(tmp_path: Path) -> None:
    """Released checkpoints are sharded with an index file and stored in bf16: both load, every key."""
    model = random_model(lora_rank=4)
    out = memllm.save(model, tmp_path / "sharded", max_shard_size="100KB")
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    again = memllm.load(out)
    ids = _ids([4, 5, 6, 7])
    with torch.no_grad():
        assert torch.equal(model(ids, model.new_memory()).logits, again(ids, again.new_memory()).logits)
    half = memllm.load(out, dtype="bfloat16")
    memory = half.new_memory()
    assert memory.pool.dtype == torch.bfloat16 and half.fingerprint == model.fingerprint
    with torch.no_grad():
        logits = half(ids, memory).logits
        half.inject(memory, list(range(20, 40)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
