"""M+ on top of MemoryLLM: dropped short-term vectors go to long-term memory, and a retriever brings
the ones a question needs back in front of the short-term memory, layer by layer (SPEC §4).

Reading: the prefix of layer l is [bos_l ; R retrieved LTM rows ; STM_l (N rows)] at positions
0, 1..R, R+1..R+N. Only the STM part is known before the forward pass, so the cached prefix holds R
placeholder rows; a pre-hook on each decoder layer scores the LTM with that layer's own input hidden
states (mean over the prompt's real tokens of sigmoid(query_proj(ln(h)) · key)), orders the top R
oldest first and writes their keys/values over the placeholders. Retrieval happens once per prompt
(in `generate`, in the prefill step), as in the authors' code; batches retrieve per row.

Writing: injection is MemoryLLM's over the STM. At the update, the K dropped rows per layer go with
their STM ages and keys `key_proj(ln(row))` to the LTM's cache (`LongTermMemory.add_dropped`), and the
merge schedule runs (`finish_update`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch

from memllm.ltm import LongTermMemory, LTMConfig, Retrieval
from memllm.memory import Memory

if TYPE_CHECKING:
    from memllm.model import MemoryModel


def ltm_config(model: "MemoryModel") -> LTMConfig:
    c = model.config
    return LTMConfig(
        num_tokens=c.num_tokens, num_ltm_blocks=c.num_ltm_blocks, update_ltm_frequency=c.update_ltm_frequency,
        decay_frequency=c.decay_frequency, initial_rf_when_moving_stm_to_ltm=c.initial_rf_when_moving_stm_to_ltm,
    )


def move_dropped_to_ltm(model: "MemoryModel", memory: Memory, kept: torch.Tensor, k: int) -> list | None:
    """Before the pool drops rows: send them (with ages and retrieval keys) to the LTM cache, age the
    STM, and run the merge schedule. kept [L, N - k] ascending. Returns the merge's source positions."""
    L, N, _ = memory.pool.shape
    if memory.stm_ages is None:
        memory.stm_ages = torch.zeros(L, N, dtype=torch.long, device=memory.pool.device)
    new_ages = []
    with torch.no_grad():  # long-term memory is state, like the pool's old rows
        for l in range(L):
            dropped_mask = torch.ones(N, dtype=torch.bool, device=kept.device)
            dropped_mask[kept[l]] = False
            dropped = dropped_mask.nonzero().squeeze(1)
            rows = memory.pool[l, dropped].detach()  # [k, d]
            layer = model.layers[l]
            keys = layer.self_attn.key_proj(layer.input_layernorm(rows.to(layer.input_layernorm.weight.device)))
            memory.ltm.add_dropped(l, rows.cpu(), keys.float().cpu(), memory.stm_ages[l, dropped].cpu())
            # Published behaviour: STM ages never grow (a kept row keeps its age); new rows get K-1 .. 0.
            kept_ages = memory.stm_ages[l, kept[l]] + (k if model.config.stm_ages_grow else 0)
            new_ages.append(torch.cat([kept_ages, torch.arange(k - 1, -1, -1, device=memory.stm_ages.device)]))
    memory.stm_ages = torch.stack(new_ages)
    return memory.ltm.finish_update(k)


def retrieval_queries(model: "MemoryModel", layer_idx: int, hidden: torch.Tensor) -> torch.Tensor:
    """query_proj(input_layernorm(h)): [B, T, s] retrieval queries from a layer's input rows."""
    layer = model.layers[layer_idx]
    return layer.self_attn.query_proj(layer.input_layernorm(hidden))


@contextmanager
def retrieving(
    model: "MemoryModel",
    memory: Memory,
    cache,
    text_mask: torch.Tensor,
    trace: list | None = None,
    mode: str = "exact",
) -> Iterator[None]:
    """Install the per-layer retrieval pre-hooks for one prompt (see module docstring).

    text_mask [B, T]: which prompt positions are real (queries average over those only).
    trace: if a list, receives (layer, [Retrieval per row]) for inspection and tests.
    """
    R = model.config.num_retrieved
    ltm: LongTermMemory = memory.ltm
    done: set[int] = set()

    def hook_for(l: int):
        def hook(module, args, kwargs):
            if l in done:
                return None
            done.add(l)
            if ltm.layers[l].num_ltm == 0:
                return None  # nothing to retrieve: the placeholder rows stay masked
            hidden = args[0] if args else kwargs["hidden_states"]  # [B, T, d]
            with torch.no_grad():
                q = retrieval_queries(model, l, hidden).float().cpu()
            mask = text_mask.bool().cpu()
            if mode == "index" and (ltm.indexes[l] is None or ltm.indexes[l].size != ltm.layers[l].num_ltm):
                ltm.build_index(l)  # first indexed read of this layer, or the LTM changed since
            results: list[Retrieval] = [ltm.retrieve(l, q[b][mask[b]], mode) for b in range(q.shape[0])]
            if trace is not None:
                trace.append((l, results))
            rows = torch.stack([ltm.layers[l].rows(r.order) for r in results])  # [B, R, d]
            dev = model.layers[l].input_layernorm.weight.device
            k, v = model.prefix_kv(l, rows.to(dev, model.dtype), start=1)
            layer_cache = cache.layers[l]
            B = hidden.shape[0]
            keys, values = layer_cache.keys.expand(B, -1, -1, -1), layer_cache.values.expand(B, -1, -1, -1)
            layer_cache.keys = torch.cat([keys[:, :, :1], k, keys[:, :, 1 + R:]], dim=2)
            layer_cache.values = torch.cat([values[:, :, :1], v, values[:, :, 1 + R:]], dim=2)
            return None
        return hook

    with model.layer_hooks(pre=hook_for):
        yield


def ltm_is_empty(memory: Memory) -> bool:
    return memory.ltm is None or all(layer.num_ltm == 0 for layer in memory.ltm.layers)
