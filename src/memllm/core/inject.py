"""Writing into memory: injection (text -> delta memory) and the update that applies it to the pool.

Injection (SPEC §3, encoder adapter): at layer l the sequence is S = [bos_l ; last K rows of memory_l ;
x_l], `new_memory_positional_emb` is added to the last K rows of S, the first P = 1 + min(K, T) rows
are a key/value prefix and the rest are queries. The layer's outputs at the last K positions are the
layer's delta memory; the last T outputs are the next layer's x. When T < K the queries therefore begin
with old memory rows `memory_l[N-K+T:]`, fresh from each layer's own memory.

We run transformers' own model forward (masks, RoPE, gradient checkpointing, device placement) with the
prefix as a key/value cache, and do the per-layer work with two hooks on each decoder layer: a pre-hook
that builds the layer's query rows and adds the positional vector, and a hook that captures the delta.

Everything stays differentiable: training backpropagates through an injection into the prediction
that reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Protocol

import torch

from memllm.core import hf_compat, ops
from memllm.core.memory import Memory
from memllm.core.mplus import move_dropped_to_ltm

if TYPE_CHECKING:
    from memllm.core.model import MemoryModel

MIN_CONTEXT_TOKENS = 16  # the published models were trained on contexts of at least this many tokens


def carried_rows(num_tokens: int, context_tokens: int, initialized: bool = True) -> int:
    """How many of an injection's K new rows per layer are computed from the pool's last rows alone:
    a context of T < K tokens reads the pool's last K - T rows as its first queries, and the causal
    mask keeps the text out of their outputs (`delta_memory`). `update` keeps those rows' sources."""
    return max(0, num_tokens - context_tokens) if initialized else 0


def delta_memory(
    model: "MemoryModel",
    pool: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    initialized: bool = True,
) -> torch.Tensor:
    """Delta memory [B, L, K, d] of contexts input_ids [B, T] written against pool [L, N, d] (shared by
    the batch) or [B, L, N, d] (one memory per row).

    Padded batches are handled: each row gives what it would give alone. Uninitialised memories
    (no prefix) give min(K, T) rows per layer.
    """
    B, T = input_ids.shape
    K = model.config.num_tokens
    if attention_mask is not None and not bool(attention_mask.all()):
        lengths = attention_mask.sum(dim=1)
        if int(lengths.min()) == 0:
            raise ValueError("a context in the batch is empty (all padding)")
        if int(lengths.min()) < K or not initialized:
            # Rows shorter than K take the T < K path, whose prefix length depends on T: rows of equal
            # length run together, unpadded, and go back to their places.
            out: list[torch.Tensor | None] = [None] * B
            for length in lengths.unique().tolist():
                idx = (lengths == length).nonzero().squeeze(1)
                ids = torch.stack([input_ids[b][attention_mask[b].bool()] for b in idx.tolist()])
                group_pool = pool[idx] if pool.dim() == 4 else pool
                for b, delta in zip(idx.tolist(), delta_memory(model, group_pool, ids, None, initialized)):
                    out[b] = delta
            return torch.stack(out)
        input_ids, attention_mask = _left_align(input_ids, attention_mask)
    elif attention_mask is not None:
        attention_mask = None

    shared = pool.dim() == 3
    pos_emb = model.new_memory_positional_emb  # [1, 1, d]
    if initialized:
        P = 1 + min(K, T)
        num_queries = max(T, K)
        num_new = K
    else:
        P, num_queries, num_new = 0, T, min(K, T)
    old_queries = carried_rows(K, T, initialized)  # K - T old memory rows used as queries when T < K

    def layer_pool(l: int, dev: torch.device) -> torch.Tensor:  # [B, N, d]
        rows = pool[l] if shared else pool[:, l]
        rows = rows.to(dev)
        return rows.unsqueeze(0).expand(B, -1, -1) if shared else rows

    captured: dict[int, torch.Tensor] = {}

    def pre_hook(l: int):
        def hook(module, args, kwargs):
            hidden = hf_compat.layer_hidden(args, kwargs)  # [B, num_queries, d]
            x = hidden[:, old_queries:]
            if old_queries:
                mem = layer_pool(l, hidden.device)[:, -K + T:]
                x = torch.cat([mem, x], dim=1)
            x = torch.cat([x[:, :-num_new], x[:, -num_new:] + pos_emb.to(x.device)], dim=1)
            return hf_compat.with_layer_hidden(args, kwargs, x)
        return hook

    def post_hook(l: int):
        def hook(module, args, kwargs, output):
            captured[l] = hf_compat.layer_output(output)[:, -num_new:]
        return hook

    with model.adapter("encoder"):
        cache = None
        if P:
            kv = []
            for l in range(model.num_layers):
                dev = hf_compat.layer_device(model.layers[l])
                bos = model.bos_embedding[l].unsqueeze(0).expand(B, -1, -1)
                prefix = torch.cat([bos, layer_pool(l, dev)[:, -K:][:, : P - 1]], dim=1)  # [B, P, d]
                kv.append(model.prefix_kv(l, prefix))
            cache = hf_compat.prefilled_cache(model.lm.config, kv, B)
        embeds = model.lm.get_input_embeddings()(input_ids)  # [B, T, d]
        if old_queries:  # placeholders, replaced by each layer's own memory rows in the pre-hook
            embeds = torch.cat([embeds.new_zeros(B, old_queries, embeds.shape[-1]), embeds], dim=1)
        if attention_mask is None:
            text_mask = torch.ones(B, num_queries, dtype=torch.long, device=input_ids.device)
        else:
            text_mask = attention_mask.long()
        position_ids = (text_mask.cumsum(-1) - 1).clamp(min=0) + P
        full_mask = torch.cat([text_mask.new_ones(B, P), text_mask], dim=1)
        with model.layer_hooks(pre=pre_hook, post=post_hook):
            hf_compat.decoder(model.lm)(
                inputs_embeds=embeds, attention_mask=full_mask, position_ids=position_ids,
                use_cache=cache is not None, **{hf_compat.CACHE_ARG: cache},
            )
    first = hf_compat.layer_device(model.layers[0])
    return torch.stack([captured[l].to(first) for l in range(model.num_layers)], dim=1)


def _left_align(input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move every row's real tokens to the right end (left padding), whatever side it was padded on."""
    order = torch.argsort(mask.long(), dim=1, stable=True)  # zeros (padding) first, token order kept
    return input_ids.gather(1, order), mask.gather(1, order)


# ---- choosing which memory vectors to drop -------------------------------------------------------


class DropPolicy(Protocol):
    """Which rows of the pool survive an update: kept indices [L, N - k], ascending, per layer."""

    def __call__(self, num_layers: int, pool_size: int, num_new: int, device: torch.device) -> torch.Tensor: ...


@dataclass
class RandomDrop:
    """The published policy: keep a uniformly random N - k rows in their order, per layer
    (`per_layer`, every published training config) or one choice shared by all layers
    (`memllm.core.ops.kept_rows`, as in training)."""

    per_layer: bool = True
    generator: torch.Generator | None = None

    def __call__(self, num_layers: int, pool_size: int, num_new: int, device: torch.device) -> torch.Tensor:
        return ops.kept_rows(num_layers, pool_size, num_new, self.generator, self.per_layer).to(device)


class RecordedDrop:
    """Replays given kept indices, one [L, N - k] tensor per update (tests feed the authors' choices)."""

    def __init__(self, kept: list[torch.Tensor]) -> None:
        self._kept: Iterator[torch.Tensor] = iter(kept)

    def __call__(self, num_layers: int, pool_size: int, num_new: int, device: torch.device) -> torch.Tensor:
        kept = next(self._kept)
        if tuple(kept.shape) != (num_layers, pool_size - num_new):
            raise ValueError(f"recorded kept indices have shape {tuple(kept.shape)}, "
                             f"expected {(num_layers, pool_size - num_new)}")
        return kept.to(device)


def update(model: "MemoryModel", memory: Memory, delta: torch.Tensor, drop: DropPolicy | None = None,
           carried: int = 0) -> torch.Tensor:
    """Apply delta memory [L, k, d] to the memory: drop k old rows per layer, append the new ones.

    Returns the kept indices [L, N - k]. The pool tensor is replaced, never written into, so forks
    of this memory are unaffected. An uninitialised pool is filled by repeating the delta. The new
    rows are labelled with the update's id (`Memory.record_update`); provenance changes no numbers.
    `carried`: how many of the new rows (the first ones) were computed from the pool's last rows
    alone, not from the text: an injection of T < K tokens reads its K - T last rows as queries
    (`delta_memory`), and the causal mask keeps the text out of their outputs. They keep those rows'
    sources, so that forgetting an update also removes what a later injection carried of it.
    """
    if delta.dim() != 3:
        raise ValueError(f"delta memory must be [layers, k, hidden], got {tuple(delta.shape)}")
    L, N, _ = memory.pool.shape
    delta = delta.to(memory.pool.device, memory.pool.dtype)
    if not memory.initialized:
        n = delta.shape[1]
        repeats = [delta] * (N // n) + ([delta[:, n - N % n:]] if N % n else [])
        memory.pool = torch.cat(repeats, dim=1)
        memory.initialized = True
        memory.record_update(None, L * N)
        return torch.empty(L, 0, dtype=torch.long, device=memory.pool.device)
    k = delta.shape[1]
    sources = memory.sources[:, N - carried:].clone() if carried else None  # [L, carried], before the drop
    drop = drop or RandomDrop(per_layer=model.config.drop_memory_per_layer)
    kept = drop(L, N, k, memory.pool.device)
    if memory.ltm is not None:
        move_dropped_to_ltm(model, memory, memory.ltm, kept, k)
    memory.pool = ops.write_pool(memory.pool, delta, kept)
    memory.record_update(kept, L * k, sources)
    return kept


def chunks(input_ids: torch.Tensor, chunk_size: int) -> list[torch.Tensor]:
    """Split a long context [T] into consecutive chunks of at most chunk_size tokens, the way the
    papers inject long documents. A short tail is merged into the previous chunk when it would be
    under MIN_CONTEXT_TOKENS, so that no injection is shorter than what the models were trained on."""
    pieces = list(torch.split(input_ids, chunk_size))
    if len(pieces) > 1 and pieces[-1].numel() < MIN_CONTEXT_TOKENS:
        tail = pieces.pop()
        pieces[-1] = torch.cat([pieces[-1], tail])
    return pieces
