"""`memllm bench train-step`: what training through the memory costs, against a plain LM step."""

from __future__ import annotations

import torch

from memllm.bench.timing import interleaved_medians, load_average
from memllm.core.model import MemoryModel
from memllm.core.tiny import random_model
from memllm.train.objectives import MemoryTraining
from memllm.train.trainer import seeded_kept, trainable_parameters


def bench_train_step(model: MemoryModel | None = None, batch_size: int = 4, context_len: int = 256,
                     repeats: int = 5) -> dict[str, float | int | None]:
    """Seconds of one new-knowledge training step (inject x1 with gradient, predict x2 from memory,
    backward) against one plain LM step (forward + backward, no memory) on the same 2T tokens; the
    two take turns (`interleaved_medians`), so a change in the machine's load hits both alike."""
    if model is None:
        model = random_model(num_layers=4, hidden_size=256, num_heads=8, num_kv_heads=4, intermediate_size=688,
                             num_tokens=64, num_blocks=4, lora_rank=8)
    trainable_parameters(model, "lora" if model.config.lora_config is not None else "full")
    module = MemoryTraining(model).train()
    g = torch.Generator().manual_seed(0)
    contexts = torch.randint(0, model.lm.config.vocab_size, (batch_size, 2, context_len), generator=g)  # [B, 2, T]
    pool = model.initial_pool.detach().unsqueeze(0).repeat(batch_size, 1, 1, 1)  # [B, L, N, d]
    kept = torch.stack([seeded_kept(model, b) for b in range(batch_size)]).unsqueeze(0)  # [1, B, L, N-K]

    def memory_step() -> None:
        loss, _, _ = module(contexts, pool, [True], kept)
        loss.backward()

    def lm_step() -> None:
        with model.adapter("decoder"):
            ids = contexts.reshape(batch_size, -1)
            model.lm(input_ids=ids, labels=ids).loss.backward()

    def zero_grad() -> None:
        model.zero_grad(set_to_none=True)

    t = interleaved_medians({"lm_step": (zero_grad, lm_step), "memory_step": (zero_grad, memory_step)}, repeats)
    return {"batch_size": batch_size, "context_len": context_len, "memory_vectors": model.config.num_memory_tokens,
            "written_per_injection": model.config.num_tokens, "lm_step_s": t["lm_step"],
            "memory_step_s": t["memory_step"], "memory_step_over_lm_step": t["memory_step"] / t["lm_step"],
            "load_average": load_average()}
