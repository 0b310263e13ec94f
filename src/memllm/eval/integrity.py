"""`memllm eval integrity`: many updates into one memory (random distractors and biographies); at
checkpoints the pool's non-finite values, row-norm statistics per layer, and the recall of freshly
written held-out people (each into a fork of the memory, asked at once), start vs end. An M+ memory
keeps every dropped row in long-term memory (K rows per layer per update).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress

from memllm.core.inject import RandomDrop
from memllm.eval.common import (
    Tally,
    answer_words,
    errorbar,
    evaluating,
    progress_bar,
    progress_task,
    seeded_drop,
    world_for,
)


def integrity_checkpoints(updates: int, points: int = 20) -> list[int]:
    """0, powers of ten and `points` evenly spaced update counts up to `updates`."""
    marks = {0, updates} | {round(updates * i / points) for i in range(1, points + 1)}
    marks |= {10 ** i for i in range(int(math.log10(updates)) + 1)} if updates > 0 else set()
    return sorted(m for m in marks if m <= updates)


def integrity(
    model,
    world,
    updates: int = 100_000,
    points: int = 20,
    recall_people: int = 50,
    seed: int = 0,
    texts: int = 2048,
    max_new_tokens: int = 3,
    progress: Progress | None = None,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """`updates` memory updates (injections of random distractors and training people's biographies,
    one update each unless a text is longer than the chunk size) into one memory. Every update:
    non-finite values among the rows it wrote. At each checkpoint: row-norm
    mean and max per layer of the pool, and the recall of `recall_people` held-out people (the same
    ones each time), each written into a fork of the memory and asked every attribute at once.
    `on_checkpoint` receives each checkpoint as it is measured (a run of hours shows its numbers as
    it goes, and keeps them if stopped).

    Returns {"updates", "updates_per_s", "nan_count", "checkpoints": [{"update", "norm_mean": [per
    layer], "norm_max": [...], "recall", "recall_ci"}]} and the summary keys of `integrity_summary`.
    """
    rng = random.Random(f"integrity:{seed}")
    people = world.people_stream("train", seed=seed)
    pool = [world.distractor(rng) if i % 2 else world.biography(next(people), rng) for i in range(texts)]
    with evaluating(model):  # tokenized once: the updates are what is timed
        ids = [model.encode_context(t) for t in pool]
    probes = world.heldout_people(recall_people, seed=seed)
    probe_bios = [world.biography(p, rng) for p in probes]
    probe_questions = [[world.question(p, a, rng) for a in world.attributes] for p in probes]
    drop = seeded_drop(model, seed, "integrity")
    K = model.config.num_tokens
    checkpoints: list[dict[str, Any]] = []
    nan_count = done = 0
    seconds = 0.0

    def check(chunk: int, chunks: int) -> None:  # after every update: the K rows it wrote
        nonlocal nan_count
        nan_count += int((~torch.isfinite(memory.pool[:, -K:])).sum())

    with evaluating(model), progress_task(progress, f"{model.config.kind}: {updates} updates", updates) as tick:
        memory = model.new_memory()
        for mark in integrity_checkpoints(updates, points):
            start = time.perf_counter()
            while done < mark:
                made = model.inject(memory, ids[rng.randrange(len(ids))], drop=drop, progress=check)
                done += made
                tick(made)
            seconds += time.perf_counter() - start
            checkpoints.append(_integrity_checkpoint(model, memory, done, probe_bios, probe_questions,
                                                     seeded_drop(model, seed, "probe"), max_new_tokens))
            if on_checkpoint is not None:
                on_checkpoint(checkpoints[-1])
    out = {"updates": done, "updates_per_s": done / seconds if seconds else None, "nan_count": nan_count,
           "checkpoints": checkpoints}
    out.update(integrity_summary(out))
    return out


def _integrity_checkpoint(model, memory, done: int, bios: list[str], questions: list[list[tuple[str, str]]],
                          drop: RandomDrop, max_new_tokens: int) -> dict[str, Any]:
    norms = memory.pool.detach().float().norm(dim=-1)  # [L, N]
    tally = Tally()
    for bio, asked in zip(bios, questions):
        fork = memory.fork()
        model.inject(fork, bio, drop=drop)
        for answer, (_, truth) in zip(answer_words(model, fork, [q for q, _ in asked], max_new_tokens), asked):
            tally.add(answer, truth.strip())
    cell = tally.as_dict()
    return {"update": done, "norm_mean": norms.mean(1).tolist(), "norm_max": norms.amax(1).tolist(),
            "nonfinite_in_pool": int((~torch.isfinite(memory.pool)).sum()), "recall": cell["acc"],
            "recall_ci": cell["ci"], "recall_n": cell["n"]}


def integrity_summary(r: dict[str, Any]) -> dict[str, Any]:
    """Last-line keys: recall at the start (a fresh memory) and the end, the drop, pool row norms."""
    first, last = r["checkpoints"][0], r["checkpoints"][-1]
    return {
        "recall_start": first["recall"], "recall_end": last["recall"],
        "recall_drop": (first["recall"] - last["recall"]) if first["recall"] is not None else None,
        "recall_min": min(c["recall"] for c in r["checkpoints"]),
        "recall_curve": {c["update"]: c["recall"] for c in r["checkpoints"]},
        "norm_mean_start": sum(first["norm_mean"]) / len(first["norm_mean"]),
        "norm_mean_end": sum(last["norm_mean"]) / len(last["norm_mean"]),
        "norm_max": max(max(c["norm_max"]) for c in r["checkpoints"]),
        "norm_max_end": max(last["norm_max"]),
    }


def plot_integrity(r: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [max(c["update"], 0.5) for c in r["checkpoints"]]  # update 0 drawn at 0.5 on the log axis
    fig, (ax_norm, ax_recall) = plt.subplots(1, 2, figsize=(11, 4))
    for l in range(len(r["checkpoints"][0]["norm_mean"])):
        line = ax_norm.plot(xs, [c["norm_mean"][l] for c in r["checkpoints"]], marker=".", label=f"layer {l} mean")
        ax_norm.plot(xs, [c["norm_max"][l] for c in r["checkpoints"]], ":", color=line[0].get_color(),
                     label=f"layer {l} max")
    ax_norm.set(xscale="log", xlabel="updates (0 at 0.5)", ylabel="memory row norm", title="pool row norms")
    ax_norm.legend(fontsize=7)
    errorbar(ax_recall, xs, [{"acc": c["recall"], "ci": c["recall_ci"]} for c in r["checkpoints"]])
    ax_recall.set(xscale="log", xlabel="updates (0 at 0.5)", ylabel="accuracy", ylim=(0, 1.02),
                  title="recall of a person written after that many updates")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def checkpoint_line(c: dict[str, Any]) -> str:
    """One checkpoint: recall with its 95% interval, pool row norms, non-finite values."""
    lo, hi = c["recall_ci"]
    return (f"update {c['update']:>8}: recall {c['recall']:.3f} [{lo:.2f}, {hi:.2f}]"
            f"  row norm mean {sum(c['norm_mean']) / len(c['norm_mean']):.3f}  max {max(c['norm_max']):.3f}"
            f"  non-finite {c['nonfinite_in_pool']}")


def evaluate_integrity(checkpoint: str, updates: int = 100_000, points: int = 20, recall_people: int = 50,
                       seed: int = 0, world_seed: int = 0, plot: str | None = "integrity.png",
                       threads: int = 2) -> dict[str, Any]:
    """`memllm eval integrity`: `integrity` of a checkpoint on the world it was trained on (with
    `world_seed` when recipe.json does not name it), a progress bar, a line per checkpoint as it is measured, the plot
    (none for an empty `plot`). Raises CheckpointError or OSError for a checkpoint that cannot be loaded."""
    from memllm.core.checkpoint import load

    torch.set_num_threads(threads)
    model = load(checkpoint)
    console = Console(width=120)  # stdout, where the tables go; the bar is on stderr
    with progress_bar() as bar:
        out = integrity(model, world_for(checkpoint, world_seed), updates=updates, points=points,
                        recall_people=recall_people, seed=seed, progress=bar,
                        on_checkpoint=lambda c: console.print(checkpoint_line(c), highlight=False))
    if plot:
        plot_integrity(out, plot)
    return out
