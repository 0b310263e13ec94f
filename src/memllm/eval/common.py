"""What every evaluation shares: exact-match scoring with Wilson intervals, the world a checkpoint was
trained on, batched greedy answers, seeded memory drops, progress bars and the error-bar plot."""

from __future__ import annotations

import json
import math
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from memllm.core.inject import RandomDrop
from memllm.synthetic.world import ABSTAIN, World, WorldConfig

ASK_BATCH = 256


def wilson(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (0, 1 when total is 0)."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    # min/max with p: at p = 0 or 1 the bound equals p only up to rounding (it came out 0.9999999999)
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def first_word(text: str) -> str:
    """The word an answer is scored by (exact match): its first run of letters and digits."""
    words = re.findall(r"[A-Za-z0-9]+", text)
    return words[0] if words else ""


def stm_capacity(model) -> tuple[int, int]:
    """(K, N): vectors written per injection and short-term memory vectors per layer."""
    return model.config.num_tokens, model.config.num_memory_tokens


def world_for(checkpoint: str | Path, world_seed: int = 0) -> World:
    """The world a checkpoint was trained on: recipe.json's "world" (the tiny-model recipe writes
    it), else ``WorldConfig(seed=world_seed)`` (checkpoints from before it did)."""
    from memllm.core.checkpoint import resolve

    recipe = resolve(checkpoint) / "recipe.json"
    fields = json.loads(recipe.read_text()).get("world") if recipe.is_file() else None
    if not fields:
        return World(WorldConfig(seed=world_seed))
    return World(WorldConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}))


def answer_words(model, memory, prompts: list[str], max_new_tokens: int = 3) -> list[str]:
    """First answer word of every prompt (greedy, asked in batches of ASK_BATCH; `ask` builds no graph)."""
    out: list[str] = []
    for i in range(0, len(prompts), ASK_BATCH):
        answers = model.ask(memory, prompts[i:i + ASK_BATCH], max_new_tokens=max_new_tokens, chat=False)
        out += [first_word(a) for a in answers]
    return out


@contextmanager
def evaluating(model) -> Iterator[None]:
    """Eval mode for a block (restored after), with the short-context warning silenced: the world's
    distractors are short by design."""
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="context of .* tokens")
            yield
    finally:
        model.train(was_training)


def seeded_drop(model, seed: int, panel: str) -> RandomDrop:
    """Seeded memory drops, one stream per panel: a panel's numbers do not depend on what ran before."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, panel)))
    return RandomDrop(per_layer=model.config.drop_memory_per_layer, generator=generator)


@contextmanager
def progress_task(progress: Progress | None, description: str, total: int) -> Iterator[Callable[..., None]]:
    """A progress-bar task for a block; yields its `advance(steps=1)`."""
    if progress is None:
        yield lambda steps=1: None
        return
    task = progress.add_task(description, total=total)
    try:
        yield lambda steps=1: progress.advance(task, steps)
    finally:
        progress.remove_task(task)


def progress_bar(enabled: bool = True) -> Progress:
    """The transient progress bar on stderr that every evaluation reports to (stdout keeps the tables)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True, disable=not enabled)


@dataclass
class Tally:
    """Exact-match counts of one cell. `other`: wrong answers that are the value of another person
    stored in the same memory (for strangers: of any stored person); `abstain`: answers ABSTAIN."""

    correct: int = 0
    total: int = 0
    other: int = 0
    abstain: int = 0

    def add(self, answer: str, truth: str, stored: set[str] | frozenset[str] = frozenset()) -> None:
        right = answer == truth
        self.correct += right
        self.total += 1
        self.other += (not right) and answer in stored
        self.abstain += answer == ABSTAIN

    def __iadd__(self, other: "Tally") -> "Tally":
        self.correct += other.correct
        self.total += other.total
        self.other += other.other
        self.abstain += other.abstain
        return self

    def as_dict(self) -> dict[str, Any]:
        n = self.total
        return {"acc": self.correct / n if n else None, "ci": list(wilson(self.correct, n)), "n": n,
                "other_value_rate": self.other / n if n else None, "abstain_rate": self.abstain / n if n else None}


def errorbar(ax, xs, cells: list[dict], **kw):
    """Accuracies of `cells` (`Tally.as_dict`, or any {"acc", "ci"}) at `xs` with their 95% intervals as
    error bars; matplotlib's container."""
    ys = [c["acc"] for c in cells]
    # accuracies and bounds are rounded separately, so a bound can sit a hair on the wrong side of y
    below = [max(0.0, y - c["ci"][0]) for y, c in zip(ys, cells)]
    above = [max(0.0, c["ci"][1] - y) for y, c in zip(ys, cells)]
    return ax.errorbar(xs, ys, yerr=[below, above], marker="o", capsize=3, **kw)
