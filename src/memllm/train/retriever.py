"""M+ retriever training (SPEC §5): the loss that teaches the query and key projectors which memory
vectors a prediction needs, its statistics, and the key refresh a trained retriever requires.

Positives are the memory vectors written by the related context, every other vector a negative; the
score is the mean over query tokens of sigmoid(query · key); the loss is BCE with the positive and
negative terms averaged separately. The `encoder_query_proj` is trained the same way on the vectors
about to be written (see `memllm.train.objectives.MemoryTraining`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from memllm.core import hf_compat
from memllm.core.model import MemoryModel
from memllm.core.mplus import retrieval_keys


@contextmanager
def layer_inputs(model: MemoryModel, captured: dict[int, torch.Tensor], last: int) -> Iterator[None]:
    """Capture (detached) the last `last` rows of the hidden states entering every decoder layer, as
    they arrive (before any other pre-hook of the forward changes them)."""

    def hook_for(l: int):
        def hook(module, args, kwargs):
            captured[l] = hf_compat.layer_hidden(args, kwargs)[:, -last:].detach()
        return hook

    with model.layer_hooks(pre=hook_for):
        yield


def retriever_loss(
    model: MemoryModel,
    hidden: dict[int, torch.Tensor],  # layer -> [B, T, d] hidden states entering the layer (queries)
    candidates: torch.Tensor,  # [B, L, C, d] memory rows
    positive: torch.Tensor,  # [B, L, C] bool: related rows
    projector: str = "query_proj",  # or "encoder_query_proj"
) -> tuple[torch.Tensor, torch.Tensor]:
    """M+ retriever loss (SPEC §5) and its statistics.

    score = mean over query tokens of sigmoid(projector(ln(h)) . key_proj(ln(row))); per (row, layer)
    the BCE is averaged over the positives and over the negatives, and the two means averaged.
    Returns (mean loss over the (row, layer) pairs with positives and negatives, differentiable in the
    projectors; stats [6] = [loss sum, pairs, precision@k sum, recall@k sum, recall@R sum, chance sum]
    with k = positives of the pair, R = the model's retrieval size).
    """
    R = model.config.num_retrieved
    losses, stats = [], torch.zeros(6, dtype=torch.float64)
    for l, layer in enumerate(model.layers):
        attn, norm, dev = hf_compat.attention(layer), hf_compat.input_norm(layer), hf_compat.layer_device(layer)
        with torch.no_grad():  # the published retriever reads detached hidden states
            hq = norm(hidden[l].to(dev))
            hk = norm(candidates[:, l].detach().to(dev, hq.dtype))
        q = getattr(attn, projector)(hq).float()  # [B, T, s]
        k = attn.key_proj(hk).float()  # [B, C, s]
        pos = positive[:, l].to(dev)
        npos, nneg = pos.sum(-1), (~pos).sum(-1)
        valid = (npos > 0) & (nneg > 0)
        if not bool(valid.any()):
            continue
        # Clamped at +-30, where sigmoid is saturated to 1e-13 anyway: beyond, CPUs crawl through denormals.
        logits = (q @ k.transpose(1, 2)).clamp(-30, 30)  # [B, T, C]
        # BCE of score = mean_t sigmoid(logit), in log space: log score = logsumexp_t logsigmoid(x) - log T and
        # log(1 - score) = logsumexp_t logsigmoid(-x) - log T (exact; no log(0), no NaN gradients, no denormals)
        log_t = math.log(logits.shape[1])
        log_score = torch.logsumexp(nn.functional.logsigmoid(logits), dim=1) - log_t  # [B, C]
        log_miss = torch.logsumexp(nn.functional.logsigmoid(-logits), dim=1) - log_t
        scores = log_score.detach()  # ranking
        bce = torch.where(pos, -log_score, -log_miss)
        zero = torch.zeros_like(bce)
        pos_mean = torch.where(pos, bce, zero).sum(-1) / npos.clamp(min=1)
        neg_mean = torch.where(pos, zero, bce).sum(-1) / nneg.clamp(min=1)
        pair = 0.5 * (pos_mean + neg_mean)[valid]
        losses.append(pair)
        with torch.no_grad():
            rank = scores.argsort(dim=-1, descending=True).argsort(dim=-1)  # 0 = best
            hits_k = (pos & (rank < npos.unsqueeze(-1))).sum(-1).double()
            hits_r = (pos & (rank < R)).sum(-1).double() if R else torch.zeros_like(hits_k)
            n = npos.double()
            stats += torch.stack([
                pair.detach().double().sum().cpu(), valid.sum().double().cpu(),
                (hits_k / n)[valid].sum().cpu(), (hits_k / n)[valid].sum().cpu(), (hits_r / n)[valid].sum().cpu(),
                (n / pos.shape[-1])[valid].sum().cpu(),
            ])
    if not losses:
        return candidates.new_zeros((), dtype=torch.float32), stats
    return torch.cat(losses).mean(), stats


def retriever_record(window: dict[str, torch.Tensor]) -> dict[str, float]:
    """Metrics of summed `retriever_loss` statistics: decoder side `retriever/...`, encoder side
    `retriever/encoder_...`; absent where no (row, layer) pair was scored."""
    out = {}
    for key, prefix in (("retriever", "retriever/"), ("encoder", "retriever/encoder_")):
        total, pairs, prec, rec, rec_r, chance = window[key].tolist()
        if pairs:
            out.update({f"{prefix}loss": total / pairs, f"{prefix}precision@k": prec / pairs,
                        f"{prefix}recall@k": rec / pairs, f"{prefix}recall@R": rec_r / pairs,
                        f"{prefix}chance@k": chance / pairs, f"{prefix}pairs": int(pairs)})
    return out


@torch.no_grad()
def refresh_ltm_keys(model: MemoryModel, chunk: int = 8192) -> None:
    """Recompute the retrieval keys of the model's initial long-term memory (and its cache of dropped
    rows) with the current key_proj: after training the retriever the stored keys are stale."""
    ltm = model.initial_ltm
    if ltm is None:
        return

    def keys(l: int, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        dev = hf_compat.layer_device(model.layers[l])
        out = [retrieval_keys(model, l, part.to(dev, model.dtype)).to("cpu", like.dtype) for part in rows.split(chunk)]
        return torch.cat(out) if out else like.new_empty(0, like.shape[-1])

    for l, st in enumerate(ltm.layers):
        if st.num_ltm:
            st.keys = keys(l, st.dense_vectors(), st.keys)
        if st.num_cached:
            st.cache_key_chunks[:] = [keys(l, st.cache_vectors, st.keys)]
    ltm.indexes = [None] * len(ltm.layers)
