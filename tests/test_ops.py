"""memllm.core.ops: the memory update as pure tensor functions (which rows survive, the pool write, the
rows it drops, the labels and ages that follow the rows), checked by their properties."""

from __future__ import annotations

import pytest
import torch

from memllm.core import ops
from memllm.core.inject import RandomDrop

L, N, K, B, D = 3, 12, 4, 2, 5


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("batch", [None, B])
@pytest.mark.parametrize("per_layer", [True, False])
def test_kept_rows_are_ascending_unique_and_in_range(batch: int | None, per_layer: bool) -> None:
    kept = ops.kept_rows(L, N, K, seeded(0), per_layer=per_layer, batch=batch)
    assert tuple(kept.shape) == ((batch,) if batch else ()) + (L, N - K)
    assert kept.dtype == torch.long
    assert bool((kept[..., 1:] > kept[..., :-1]).all())  # strictly ascending, so unique
    assert int(kept.min()) >= 0 and int(kept.max()) < N
    same_for_all_layers = bool((kept == kept[..., :1, :]).all())
    assert same_for_all_layers != per_layer  # per layer: (almost surely) different draws


def test_kept_rows_are_a_function_of_the_seed_and_uniform() -> None:
    a, b = ops.kept_rows(L, N, K, seeded(7)), ops.kept_rows(L, N, K, seeded(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, ops.kept_rows(L, N, K, seeded(8)))
    g = seeded(0)  # every row survives a draw with probability (N - K) / N
    counts = torch.zeros(N)
    draws = 4000
    for _ in range(draws // L):
        counts += torch.bincount(ops.kept_rows(L, N, K, g).flatten(), minlength=N)
    rate = counts / (draws // L * L)
    assert float((rate - (N - K) / N).abs().max()) < 0.05


def test_random_drop_draws_with_kept_rows() -> None:
    """Inference's default drop policy is the same draw as training's, for a generator in the same state."""
    for per_layer in (True, False):
        drop = RandomDrop(per_layer=per_layer, generator=seeded(3))
        got = [drop(L, N, K, torch.device("cpu")) for _ in range(2)]
        g = seeded(3)
        want = [ops.kept_rows(L, N, K, g, per_layer=per_layer) for _ in range(2)]
        assert all(torch.equal(x, y) for x, y in zip(got, want))


def test_write_pool_keeps_order_then_appends_and_leaves_the_old_pool() -> None:
    d = 2
    pool = torch.arange(L * N, dtype=torch.float32).view(L, N, 1).expand(L, N, d).clone()  # row r of layer l: l*N + r
    delta = -torch.arange(1, L * K + 1, dtype=torch.float32).view(L, K, 1).expand(L, K, d)
    before = pool.clone()
    kept = ops.kept_rows(L, N, K, seeded(1))
    out = ops.write_pool(pool, delta, kept)
    assert tuple(out.shape) == (L, N, d)
    layer_offset = (torch.arange(L) * N).unsqueeze(-1)
    assert torch.equal(out[:, : N - K, 0], (kept + layer_offset).float())  # survivors, in their order
    assert torch.equal(out[:, N - K:], delta)  # then the new rows
    assert torch.equal(pool, before)


def test_write_pool_carries_gradients_to_kept_rows_and_delta() -> None:
    pool = torch.randn(L, N, 3, requires_grad=True)
    delta = torch.randn(L, K, 3, requires_grad=True)
    kept = ops.kept_rows(L, N, K, seeded(2))
    weights = torch.randn(L, N, 3)
    (ops.write_pool(pool, delta, kept) * weights).sum().backward()
    assert torch.equal(delta.grad, weights[:, N - K:])
    for l in range(L):
        assert torch.equal(pool.grad[l, kept[l]], weights[l, : N - K])
        gone = ops.dropped_rows(kept[l], N)
        assert torch.equal(pool.grad[l, gone], torch.zeros(K, 3))  # dropped rows get no gradient


def test_write_ids_and_dropped_rows_agree_with_kept() -> None:
    kept = ops.kept_rows(L, N, K, seeded(4), batch=B)  # [B, L, N - K]
    ids = torch.arange(N).expand(B, L, N)
    new = torch.tensor([100, 200])  # this update's label, per batch row
    written = ops.write_ids(ids, new, kept)
    assert torch.equal(written[..., : N - K], kept)
    assert torch.equal(written[..., N - K:], new.view(B, 1, 1).expand(B, L, K))
    gone = ops.dropped_rows(kept, N)
    assert tuple(gone.shape) == (B, L, K)
    assert bool((gone[..., 1:] > gone[..., :-1]).all())
    both = torch.cat([kept, gone], dim=-1).sort(dim=-1).values
    assert torch.equal(both, torch.arange(N).expand(B, L, N))  # kept and dropped partition the rows
    # the pool write and the ids follow the same rows
    pool = ids.unsqueeze(-1).float()
    delta = new.view(B, 1, 1, 1).expand(B, L, K, 1).float()
    assert torch.equal(ops.write_pool(pool, delta, kept)[..., 0].long(), written)


@pytest.mark.parametrize("grow", [False, True])
def test_stm_ages_after(grow: bool) -> None:
    ages = torch.randint(0, 50, (L, N), generator=seeded(5))
    kept = ops.kept_rows(L, N, K, seeded(6))
    after = ops.stm_ages_after(ages, kept, grow)
    assert torch.equal(after[:, : N - K], ages.gather(-1, kept) + (K if grow else 0))
    assert torch.equal(after[:, N - K:], torch.arange(K - 1, -1, -1).expand(L, K))  # oldest new row first


def test_a_batch_is_its_rows_applied_one_by_one() -> None:
    """Training's [B, L, ...] tensors give, row by row, what inference's [L, ...] ones give."""
    d = 3
    pools, deltas = torch.randn(B, L, N, d), torch.randn(B, L, K, d)
    ids, ages = torch.randint(0, 9, (B, L, N)), torch.randint(0, 9, (B, L, N))
    new = torch.tensor([7, 8])
    kept = ops.kept_rows(L, N, K, seeded(9), batch=B)
    for grow in (False, True):
        batched = (ops.write_pool(pools, deltas, kept), ops.write_ids(ids, new, kept),
                   ops.dropped_rows(kept, N), ops.stm_ages_after(ages, kept, grow))
        for b in range(B):
            row = (ops.write_pool(pools[b], deltas[b], kept[b]), ops.write_ids(ids[b], new[b], kept[b]),
                   ops.dropped_rows(kept[b], N), ops.stm_ages_after(ages[b], kept[b], grow))
            for x, y in zip(batched, row):
                assert torch.equal(x[b], y)



def test_gather_rows_is_gather_for_any_leading_dims_and_keeps_the_gradient():
    """The index_select path equals torch.gather with the index expanded over d (the old pool write),
    for [N, d], [L, N, d] and [B, L, N, d], and for a pool expanded over a batch (the gather path)."""
    from memllm.core.ops import gather_rows

    g = torch.Generator().manual_seed(0)
    for lead in ((), (3,), (2, 3)):
        x = torch.randn(*lead, 10, 4, generator=g, requires_grad=True)
        index = torch.randint(0, 10, (*lead, 6), generator=g)
        expected = x.gather(-2, index.unsqueeze(-1).expand(*index.shape, 4))
        got = gather_rows(x, index)
        assert torch.equal(got, expected)
        (grad,) = torch.autograd.grad((got * torch.arange(4.0)).sum(), x)
        (want,) = torch.autograd.grad((expected * torch.arange(4.0)).sum(), x)
        assert torch.equal(grad, want)
    shared = torch.randn(3, 10, 4, generator=g).expand(2, 3, 10, 4)
    index = torch.randint(0, 10, (2, 3, 6), generator=g)
    assert torch.equal(gather_rows(shared, index), shared.gather(-2, index.unsqueeze(-1).expand(2, 3, 6, 4)))
