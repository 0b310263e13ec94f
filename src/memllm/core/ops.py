"""The memory update as pure tensor functions, shared by inference (`inject`), M+ (`mplus`), training
(`memllm.train`) and the tiny recipe: which rows survive, the pool write, the rows it drops, and the
ages and per-row ids that follow the rows.

Shapes: any leading dims `...` ([L] at inference, [B, L] in training), then N pool rows; K new rows
per update; kept indices are ascending, so surviving rows keep their order (SPEC §2).
"""

from __future__ import annotations

import torch


def kept_rows(num_layers: int, pool_size: int, num_new: int, generator: torch.Generator | None = None,
              per_layer: bool = True, batch: int | None = None) -> torch.Tensor:
    """A uniformly random `pool_size - num_new` surviving rows, ascending: [L, N - K] (or [B, L, N - K]
    with `batch`); one draw shared by all layers when not `per_layer`. A function of the generator's
    state alone, so a seeded generator gives the same rows on every machine."""
    lead = ((batch,) if batch is not None else ()) + (num_layers if per_layer else 1,)
    draws = torch.rand(*lead, pool_size, generator=generator)
    kept = draws.argsort(dim=-1)[..., : pool_size - num_new].sort(dim=-1).values
    return kept.expand(*lead[:-1], num_layers, -1)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [..., N, d], index [..., M] (the same leading dims) -> [..., M, d]: rows `index` of each
    leading position, differentiable. One `index_select` over the flattened rows: `gather` with the
    index expanded over d was 2.6x (float32) to 10x (bfloat16) slower on a pool write here."""
    lead, n, d = x.shape[:-2], x.shape[-2], x.shape[-1]
    if index.shape[:-1] != lead or not x.is_contiguous():  # e.g. a pool expanded over a batch: no copy
        return x.gather(-2, index.unsqueeze(-1).expand(*index.shape, d))
    offsets = torch.arange(lead.numel(), device=x.device).view(*lead, 1) * n
    return x.reshape(-1, d).index_select(0, (index + offsets).reshape(-1)).view(*index.shape, d)


def write_pool(pool: torch.Tensor, delta: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The memory update: pool [..., N, d], delta [..., K, d], kept [..., N - K] -> [..., N, d]: the
    surviving rows in order, then the new ones. A new tensor (forks of the old pool are unaffected);
    the autograd graph flows through both parts."""
    return torch.cat([gather_rows(pool, kept), delta.to(pool.dtype)], dim=-2)


def write_ids(ids: torch.Tensor, new: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Per-row integer labels after `write_pool` (which document or update wrote each row): ids [..., N],
    new [...] (the label of this update's rows, one per leading index), kept [..., N - K] -> [..., N]."""
    K = ids.shape[-1] - kept.shape[-1]
    fresh = new.to(ids).reshape(*new.shape, *([1] * (kept.dim() - new.dim()))).expand(*kept.shape[:-1], K)
    return torch.cat([ids.gather(-1, kept), fresh], dim=-1)


def dropped_rows(kept: torch.Tensor, pool_size: int) -> torch.Tensor:
    """The indices [..., K] (ascending) of the rows an update with kept [..., N - K] drops."""
    mask = torch.ones(*kept.shape[:-1], pool_size, dtype=torch.bool, device=kept.device)
    mask.scatter_(-1, kept, False)
    return mask.nonzero()[:, -1].view(*kept.shape[:-1], -1)


def stm_ages_after(stm_ages: torch.Tensor, kept: torch.Tensor, grow: bool = False) -> torch.Tensor:
    """Short-term ages after an update: stm_ages [..., N], kept [..., N - K] -> [..., N]. Published
    behaviour (grow False): a kept row keeps its age; the K new rows get K-1 .. 0."""
    K = stm_ages.shape[-1] - kept.shape[-1]
    survivors = stm_ages.gather(-1, kept) + (K if grow else 0)
    new = torch.arange(K - 1, -1, -1, device=stm_ages.device).expand(*kept.shape[:-1], K)
    return torch.cat([survivors, new], dim=-1)


def forget_order(ids: torch.Tensor, doomed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where every row goes when the rows labelled `doomed` [u] leave: ids [..., N] -> (order [..., N],
    refill [..., N] bool). Row j of the result is old row order[j]; the f removed rows of a layer are
    moved to its front (the oldest end) and marked `refill` there, for the caller to overwrite; the
    survivors follow in their order."""
    gone = torch.isin(ids, doomed.to(ids.device))
    order = torch.argsort((~gone).to(torch.int8), dim=-1, stable=True)  # removed first, survivors in order
    refill = torch.arange(ids.shape[-1], device=ids.device) < gone.sum(-1, keepdim=True)
    return order, refill


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one float32 scale per row: x [..., d] -> (q [..., d] int8, scale [...]), where
    x ~ q * scale and |x - q * scale| <= scale / 2, scale = max|row| / 127."""
    x = x.float()
    scale = x.abs().amax(dim=-1) / 127 if x.shape[-1] else x.new_zeros(x.shape[:-1])
    q = torch.round(x / scale.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(-1)).clamp_(-127, 127)
    return q.to(torch.int8), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of `quantize_rows`, in `dtype`."""
    return (q.float() * scale.float().unsqueeze(-1)).to(dtype)
