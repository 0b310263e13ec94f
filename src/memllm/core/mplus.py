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

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch

from memllm.core import hf_compat, ops
from memllm.core.ltm import LongTermMemory, LTMConfig, Retrieval, order_by_age
from memllm.core.memory import Memory

if TYPE_CHECKING:
    from transformers import DynamicCache

    from memllm.core.model import MemoryModel


def ltm_config(model: "MemoryModel") -> LTMConfig:
    """The long-term memory's settings (K, R, merge schedule, decay), from the model's memory config."""
    return LTMConfig.from_dict(dataclasses.asdict(model.config))


def empty_ltm(model: "MemoryModel") -> LongTermMemory:
    """An M+ model's long-term memory before any injection: no rows, at every layer."""
    return LongTermMemory.empty(ltm_config(model), model.num_layers, model.hidden_size, model.config.selector_hidden_dim)


def move_dropped_to_ltm(model: "MemoryModel", memory: Memory, ltm: LongTermMemory, kept: torch.Tensor,
                        k: int) -> list | None:
    """Before the pool drops rows: send them (with ages, retrieval keys and source update ids) to the
    memory's long-term memory `ltm` (its cache), age the STM, and run the merge schedule.
    kept [L, N - k] ascending.
    Returns the merge's source positions."""
    L, N, _ = memory.pool.shape
    if memory.stm_ages is None:
        memory.stm_ages = torch.zeros(L, N, dtype=torch.long, device=memory.pool.device)
    gone = ops.dropped_rows(kept, N)  # [L, k]
    with torch.no_grad():  # long-term memory is state, like the pool's old rows
        for l in range(L):
            rows = memory.pool[l, gone[l]].detach()  # [k, d]
            keys = retrieval_keys(model, l, rows.to(hf_compat.layer_device(model.layers[l])))
            ltm.add_dropped(l, rows.cpu(), keys.float().cpu(), memory.stm_ages[l, gone[l]].cpu(),
                            memory.sources[l, gone[l]].cpu())
    memory.stm_ages = ops.stm_ages_after(memory.stm_ages, kept, model.config.stm_ages_grow)
    return ltm.finish_update(k)


def retrieval_queries(model: "MemoryModel", layer_idx: int, hidden: torch.Tensor) -> torch.Tensor:
    """query_proj(input_layernorm(h)): [B, T, s] retrieval queries from a layer's input rows."""
    layer = model.layers[layer_idx]
    return hf_compat.attention(layer).query_proj(hf_compat.input_norm(layer)(hidden))


def retrieval_keys(model: "MemoryModel", layer_idx: int, rows: torch.Tensor) -> torch.Tensor:
    """key_proj(input_layernorm(row)): [..., M, s] retrieval keys of memory rows [..., M, d] at a layer."""
    layer = model.layers[layer_idx]
    return hf_compat.attention(layer).key_proj(hf_compat.input_norm(layer)(rows))


@contextmanager
def retrieving(
    model: "MemoryModel",
    memory: Memory,
    cache: "DynamicCache",
    text_mask: torch.Tensor,
    trace: list | None = None,
    mode: str = "exact",
) -> Iterator[None]:
    """Install the per-layer retrieval pre-hooks for one prompt (see module docstring).

    text_mask [B, T]: which prompt positions are real (queries average over those only).
    trace: if a list, receives (layer, [Retrieval per row]) for inspection and tests.
    """
    ltm = memory.ltm
    if ltm is None:
        raise ValueError("this memory has no long-term memory to retrieve from")
    done: set[int] = set()

    def hook_for(l: int):
        def hook(module, args, kwargs):
            if l in done:
                return None
            done.add(l)
            if ltm.layers[l].num_ltm == 0:
                return None  # nothing to retrieve: the placeholder rows stay masked
            hidden = hf_compat.layer_hidden(args, kwargs)  # [B, T, d]
            with torch.no_grad():
                q = retrieval_queries(model, l, hidden).float().cpu()
            mask = text_mask.bool().cpu()
            if mode == "index" and (ltm.indexes[l] is None or ltm.indexes[l].size != ltm.layers[l].num_ltm):
                ltm.build_index(l)  # first indexed read of this layer, or the LTM changed since
            results: list[Retrieval] = [ltm.retrieve(l, q[b][mask[b]], mode) for b in range(q.shape[0])]
            if trace is not None:
                trace.append((l, results))
            rows = torch.stack([ltm.layers[l].rows(r.order) for r in results])  # [B, R, d]
            place_retrieved(model, cache, l, rows)
            return None
        return hook

    with model.layer_hooks(pre=hook_for):
        yield


def place_retrieved(model: "MemoryModel", cache: "DynamicCache", l: int, rows: torch.Tensor) -> None:
    """Write the keys/values of retrieved rows [B, R, d] (positions 1..R) over layer l's placeholders."""
    dev = hf_compat.layer_device(model.layers[l])
    k, v = model.prefix_kv(l, rows.to(dev, model.dtype), start=1)  # [B, kv_heads, R, head_dim]
    hf_compat.write_layer_rows(cache, l, 1, k, v)


# ---- long-term memory during training --------------------------------------------------------------


@dataclass
class RowLTM:
    """Long-term memories for training, one per batch row, as dense tensors: every row holds the same
    number M of vectors per layer. Born empty (`empty`), grown by `drop_to_ltm` at every write, read by
    `MemoryModel.forward_pools(..., ltm=)` through `retrieving_rows`.

    It follows inference with update_ltm_frequency 1 and no decay (`LongTermMemory` with those
    settings holds the same rows, in the same order, with the same ages: tests/test_mplus.py): every
    dropped row is kept (or the newest `max_rows`). Vectors are state, detached, as at inference; keys are
    recomputed with the current key_proj at every read, so they never go stale while training.
    """

    vectors: torch.Tensor  # [B, L, M, d]
    ages: torch.Tensor  # [B, L, M] int64
    docs: torch.Tensor  # [B, L, M] int64, source document of each row (retriever positives), -1 unknown

    @classmethod
    def empty(cls, pools: torch.Tensor) -> "RowLTM":
        B, L, _, d = pools.shape
        return cls(pools.new_zeros(B, L, 0, d), torch.zeros(B, L, 0, dtype=torch.long, device=pools.device),
                   torch.zeros(B, L, 0, dtype=torch.long, device=pools.device))

    @property
    def size(self) -> int:
        return self.vectors.shape[2]


def drop_to_ltm(
    ltm: RowLTM,
    pools: torch.Tensor,  # [B, L, N, d] before the write
    stm_ages: torch.Tensor,  # [B, L, N] int64
    kept: torch.Tensor,  # [B, L, N - K] ascending
    pool_docs: torch.Tensor | None = None,  # [B, L, N]
    stm_ages_grow: bool = False,
    max_rows: int | None = None,
) -> tuple[RowLTM, torch.Tensor]:
    """The rows a write drops go to the long-term memory (as `move_dropped_to_ltm` does at inference):
    returns (the grown RowLTM, the STM ages after the write)."""
    N = pools.shape[2]  # pools [B, L, N, d]
    K = N - kept.shape[-1]
    gone = ops.dropped_rows(kept, N)  # [B, L, K] ascending
    rows = ops.gather_rows(pools.detach(), gone)  # [B, L, K, d]
    docs = pool_docs.gather(2, gone) if pool_docs is not None else torch.full_like(gone, -1)
    grown = RowLTM(torch.cat([ltm.vectors, rows.to(ltm.vectors.dtype)], dim=2),
                   torch.cat([ltm.ages + K, stm_ages.gather(2, gone)], dim=2),
                   torch.cat([ltm.docs, docs], dim=2))
    if max_rows is not None and grown.size > max_rows:
        grown = RowLTM(grown.vectors[:, :, -max_rows:], grown.ages[:, :, -max_rows:], grown.docs[:, :, -max_rows:])
    return grown, ops.stm_ages_after(stm_ages, kept, stm_ages_grow)


@contextmanager
def retrieving_rows(model: "MemoryModel", ltm: RowLTM, cache: "DynamicCache", text_mask: torch.Tensor) -> Iterator[None]:
    """`retrieving` for training: row b retrieves from its own long-term memory (RowLTM row b), with the
    same score (mean over real tokens of sigmoid(query . key)), top R, oldest first, and the same
    cyclic repeat when it holds fewer than R rows. The selection is not differentiable; the retriever
    learns from `retriever_loss`."""
    R, M = model.config.num_retrieved, ltm.size
    done: set[int] = set()

    def hook_for(l: int):
        def hook(module, args, kwargs):
            if l in done or M == 0:
                return None
            done.add(l)
            hidden = hf_compat.layer_hidden(args, kwargs)  # [B, T, d]
            vectors = ltm.vectors[:, l]  # [B, M, d]
            B = vectors.shape[0]
            if M < R:
                order = (torch.arange(R, device=vectors.device) % M).expand(B, R)
            else:
                with torch.no_grad():
                    q = retrieval_queries(model, l, hidden).float()  # [B, T, s]
                    keys = retrieval_keys(model, l, vectors.to(hidden.dtype)).float()  # [B, M, s]
                    m = text_mask.to(q.dtype).unsqueeze(-1)  # [B, T, 1]
                    scores = (torch.sigmoid(q @ keys.transpose(1, 2)) * m).sum(1) / m.sum(1)  # [B, M]
                    selected = torch.topk(scores, R, dim=-1, sorted=False).indices.sort(-1).values
                    order = order_by_age(selected, ltm.ages[:, l].gather(1, selected))
            rows = ops.gather_rows(vectors, order)  # [B, R, d]
            place_retrieved(model, cache, l, rows)
            return None
        return hook

    with model.layer_hooks(pre=hook_for):
        yield


def ltm_is_empty(memory: Memory) -> bool:
    """True when a read has nothing to retrieve (no long-term memory, or no row in it yet)."""
    return memory.ltm is None or all(layer.num_ltm == 0 for layer in memory.ltm.layers)
