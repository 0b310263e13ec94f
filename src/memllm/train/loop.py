"""The one training loop: `memllm train` (`memllm.train.trainer`) and every stage of the tiny recipe
(`memllm.recipes.tiny`) run `fit`.

A run is a number of optimizer steps. The learning rate follows the steps (`lr_factor`: linear
warm-up, then cosine decay to 10% at the last step, or constant); `max_minutes` is only a cap, and a run
that hits it says so (`FitResult.capped_by_minutes`); `stop`, asked after every step, ends a run
early (a held-out gate). Each micro-step asks `next_batch(step, micro)` for a
batch, hashes it into the run's data hash (`DataHash`, over the tensors `batch.tensors()` names) and
asks `loss(batch)` for the loss to backpropagate. After every optimizer step an optional EMA of the
weights is updated and `on_step(step, loss)` runs (logging, evaluation, curricula, saving state).

The loop talks to an accelerate `Accelerator` (`memllm train`: DDP, FSDP, mixed precision, gradient
accumulation) or, for one process without accelerate (the tiny recipe), to `SingleProcess`, which
has the same few methods. Same seed, steps and software: same batches, same data hash, same weights.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from torch import nn


def lr_factor(step: int, steps: int, warmup_steps: int, schedule: str = "cosine") -> float:
    """The learning rate of `step` over the peak: linear warm-up over `warmup_steps`, then cosine decay
    to 10% at `steps` (schedule "cosine") or the peak until the end ("constant": for a run whose length
    a gate decides)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(params: Sequence[nn.Parameter], lr: float, steps: int, warmup_steps: int = 0,
                   weight_decay: float = 0.0, schedule: str = "cosine"
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its `lr_factor` schedule (stepped once per optimizer step)."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                        lambda s: lr_factor(s, steps, warmup_steps, schedule))


class DataHash:
    """A chained sha256 of every batch a run trains on: two runs that saw the same data agree. The
    state is a hex string, so a resumed run continues the same chain."""

    def __init__(self, state: str = "") -> None:
        self.state = state

    def add(self, *tensors: torch.Tensor) -> None:
        h = hashlib.sha256(self.state.encode())
        for t in tensors:
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        self.state = h.hexdigest()

    def hexdigest(self) -> str:
        return self.state[:16]


class EMA:
    """An exponential moving average of a model's weights (parameters; buffers are copied once):
    `model` is the averaged copy, in eval mode and without gradients."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - self.decay)


class SingleProcess:
    """The part of accelerate's `Accelerator` the loop uses, for one process without accelerate (the
    tiny recipe): plain backward, gradient accumulation over `grad_accum` micro-steps, clipping."""

    is_main_process = True

    def __init__(self, grad_accum: int = 1) -> None:
        self.grad_accum = grad_accum
        self.sync_gradients = True
        self._micro = 0

    @contextmanager
    def accumulate(self, module: nn.Module) -> Iterator[None]:
        self._micro += 1
        self.sync_gradients = self._micro % self.grad_accum == 0
        yield

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum if self.grad_accum > 1 else loss).backward()

    def clip_grad_norm_(self, params: Sequence[nn.Parameter], max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def reduce(self, tensor: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return tensor


class Batch(Protocol):
    def tensors(self) -> Sequence[torch.Tensor]:
        """What identifies the batch's data (hashed into the run's data hash)."""


B = TypeVar("B", bound=Batch)


@dataclass
class FitResult:
    """Where a run stopped: the step reached, whether `max_minutes` stopped it first, whether `stop` did,
    wall seconds, the data hash, and the loss of every optimizer step of this call (mean over its
    micro-steps)."""

    step: int
    capped_by_minutes: bool
    seconds: float
    data_sha256: str
    losses: list[float] = field(default_factory=list)
    stopped: bool = False

    def summary(self) -> dict[str, Any]:
        return {"steps": self.step, "seconds": round(self.seconds), "capped_by_minutes": self.capped_by_minutes,
                **({"stopped_by_gate": True} if self.stopped else {}), "data_sha256": self.data_sha256}


def fit(
    acc: Any,  # an accelerate Accelerator, or SingleProcess
    module: nn.Module,  # what computes the loss (accelerate: the prepared module; for DDP's no_sync)
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    params: Sequence[nn.Parameter],  # clipped to max_grad_norm
    next_batch: Callable[[int, int], B],  # (step, micro-step) -> batch
    loss: Callable[[B], torch.Tensor],  # batch -> loss to backpropagate
    end: int,  # stop at this step
    start: int = 0,  # resume from this step
    grad_accum: int = 1,
    max_grad_norm: float = 1.0,  # 0: no clipping
    max_minutes: float = 0.0,  # a cap (0: none), checked before every step
    data: DataHash | None = None,  # continued (resume) or a new chain
    ema: EMA | None = None,  # updated from `ema_source` after every optimizer step
    ema_source: nn.Module | None = None,  # the unwrapped model (default: module)
    on_step: Callable[[int, float], None] | None = None,  # after every optimizer step: (step reached, its loss)
    stop: Callable[[int], bool] | None = None,  # after on_step: end the run at this step?
) -> FitResult:
    """Train from `start` to `end` optimizer steps (see the module docstring)."""
    data = data if data is not None else DataHash()
    t0 = time.perf_counter()
    step, capped, stopped, losses = start, False, False, []
    while step < end and not stopped:
        if max_minutes:
            late = torch.tensor([float(time.perf_counter() - t0 > max_minutes * 60)])
            if acc.reduce(late, "max").item() > 0:  # every process stops at the same step
                capped = True
                break
        total = 0.0
        for micro in range(grad_accum):
            batch = next_batch(step, micro)
            data.add(*batch.tensors())
            with acc.accumulate(module):
                value = loss(batch)
                acc.backward(value)
                if acc.sync_gradients:
                    if max_grad_norm:
                        acc.clip_grad_norm_(params, max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            total += value.item()
        scheduler.step()
        step += 1
        losses.append(total / grad_accum)
        if ema is not None:
            ema.update(ema_source if ema_source is not None else module)
        if on_step is not None:
            on_step(step, losses[-1])
        stopped = stop is not None and step < end and stop(step)
    return FitResult(step, capped, time.perf_counter() - t0, data.hexdigest(), losses, stopped)


def loss_trend(losses: Sequence[float], share: float = 0.25) -> dict[str, float]:
    """Mean loss of the first and the last `share` of the steps (at least one step each): did it fall?"""
    if not losses:
        return {}
    k = max(1, round(len(losses) * share))
    return {"first": sum(losses[:k]) / k, "last": sum(losses[-k:]) / k}
