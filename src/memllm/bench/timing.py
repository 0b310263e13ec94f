"""The benchmarks' one timer: cases measured in turn, round after round, so that a change in the
machine's load hits every case alike and the ratios between them stay meaningful."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping

import torch

Case = tuple[Callable[[], object] | None, Callable[[], object]]  # (untimed setup, timed call)


def device_sync(device: "str | torch.device") -> Callable[[], object] | None:
    """What waits for a device's queued work before a clock is read: a GPU runs kernels
    asynchronously, a CPU call has finished when it returns (None)."""
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else None


def timed(fn: Callable[[], object], sync: Callable[[], object] | None = None) -> float:
    """Wall seconds of one call of fn, waiting for the device (`sync`) before and after."""
    if sync is not None:
        sync()
    t0 = time.perf_counter()
    fn()
    if sync is not None:
        sync()
    return time.perf_counter() - t0


def median(times: list[float]) -> float:
    times = sorted(times)
    n = len(times)
    return times[n // 2] if n % 2 else (times[n // 2 - 1] + times[n // 2]) / 2


def interleaved_medians(cases: Mapping[str, Case], repeats: int,
                        sync: Callable[[], object] | None = None) -> dict[str, float]:
    """Median wall time (s) of every case over `repeats` rounds, after one warm-up round.

    The cases run in turn within each round, in reverse order every other round (a, b, c, c, b, a,
    ...), so that neither the load nor the caches favour the case that always runs first. A case's
    setup runs before each of its calls, untimed. `sync`: waits for work queued on a device (a GPU's
    kernels run asynchronously), before the clock starts and before it stops.
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    times: dict[str, list[float]] = {name: [] for name in cases}
    order = list(cases.items())
    for i in range(repeats + 1):
        for name, (setup, fn) in order if i % 2 == 0 else order[::-1]:
            if setup is not None:
                setup()
            elapsed = timed(fn, sync)
            if i:  # round 0 is the warm-up
                times[name].append(elapsed)
    return {name: median(t) for name, t in times.items()}


def load_average() -> float | None:
    """The 1-minute load average (compare with the CPU count): other processes slow every number down."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on this platform
        return None
