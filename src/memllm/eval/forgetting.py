"""Forgetting, attribution and compact memories, measured on held-out people:

    memllm eval forgetting [CHECKPOINT ...] [--n-people 50]

With no checkpoint the shipped tiny models (MemoryLLM and M+) are evaluated. Each memory holds k
held-out people written in random order (MemoryLLM k = 4; M+ k = 32, so that by the time they are
asked the first people's rows have mostly moved to long-term memory). The target is one of the first
four written, at a uniformly random position (the shipped tiny models answer the first person written
whatever the question, so a fixed first target would flatter them); the other three of those four
are the others. Every attribute of the four is asked (greedy, first answer word,
exact match, 95% Wilson intervals) and then, per memory:

- attribution: for every correct answer, is the top source of `memllm.core.attribution.explain` one
  of the asked person's updates? (``attribution_top1``)
- compact files: the memory saved as float32, bfloat16 and int8, loaded back, the four asked again:
  file size ratios and accuracy deltas against the memory as held (``int8_size_ratio``,
  ``int8_accuracy_delta``, and bfloat16's); for M+ also the long-term memory held in int8 and
  dequantised as retrieval reads it (``int8_held_accuracy_delta``);
- forgetting: the target's updates forgotten (`Memory.forget`), the four asked again: the target's
  accuracy minus the no-memory floor (the target asked against a fresh memory;
  ``forgotten_minus_floor``) and the others' accuracy after over before (``others_kept_ratio``).
  Forgetting removes the rows an update wrote, not what later updates read from them: the next
  injection attends to the newest rows, so the person written after the target carries some of it.
  The target's accuracy after forgetting is therefore also given apart for targets written last (no
  later injection saw their rows: ``forgotten_last_minus_floor``) and for those followed by another
  (``forgotten_followed_minus_floor``).

Differences of two accuracies carry Newcombe's interval (hybrid Wilson score); the kept ratio carries
the conservative bounds of its two Wilson intervals. The last line of output is the JSON summary, one
object per model.
"""

from __future__ import annotations

import math
import random
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from memllm.core.attribution import explain
from memllm.core.memory import Memory
from memllm.eval.common import (
    Tally,
    answer_words,
    evaluating,
    progress_bar,
    progress_task,
    seeded_drop,
    wilson,
    world_for,
)

SHIPPED = ("tiny-memoryllm", "tiny-mplus")
ASKED = 4  # the first four people written into each memory: the target (a random one) and three others
PEOPLE_PER_MEMORY = {"memoryllm": 4, "mplus": 32}
STORAGE = ("float32", "bfloat16", "int8")


def difference(a: Tally, b: Tally) -> dict[str, Any]:
    """acc(a) - acc(b) with Newcombe's 95% interval (method 10: from the two Wilson intervals)."""
    if not a.total or not b.total:
        return {"delta": None, "ci": [None, None]}
    pa, pb = a.correct / a.total, b.correct / b.total
    (la, ua), (lb, ub) = wilson(a.correct, a.total), wilson(b.correct, b.total)
    d = pa - pb
    return {"delta": d, "ci": [d - math.hypot(pa - la, ub - pb), d + math.hypot(ua - pa, pb - lb)]}


def kept_ratio(after: Tally, before: Tally) -> dict[str, Any]:
    """acc(after) / acc(before), with the conservative bounds of the two Wilson intervals."""
    if not before.correct:
        return {"ratio": None, "ci": [None, None]}
    (la, ua), (lb, ub) = wilson(after.correct, after.total), wilson(before.correct, before.total)
    ratio = (after.correct / after.total) / (before.correct / before.total)
    return {"ratio": ratio, "ci": [la / ub, ua / lb if lb else None]}


def forgetting(model, world, n_people: int = 50, k: int | None = None, seed: int = 0, max_new_tokens: int = 3,
               progress: Progress | None = None) -> dict[str, Any]:
    """The measurements of the module docstring for one model: n_people memories (one target each)."""
    k = k or PEOPLE_PER_MEMORY[model.config.kind]
    if k < ASKED:
        raise ValueError(f"k={k}: each memory needs at least {ASKED} people (the target and three others)")
    rng = random.Random(f"forgetting:{k}:{seed}")
    pool = world.heldout_people(n_people * k, seed=seed)
    drop = seeded_drop(model, seed, f"forgetting{k}")
    cells = {name: Tally() for name in ("floor", "target", "others", "target_forgotten", "others_after",
                                        "target_forgotten_last", "target_forgotten_followed", "floor_last",
                                        "floor_followed", "attribution_top1", "asked_int8_held",
                                        *(f"asked_{s}" for s in STORAGE))}
    sizes = {s: 0 for s in STORAGE}
    target_ltm_rows = target_rows = 0
    with evaluating(model), tempfile.TemporaryDirectory() as tmp, \
            progress_task(progress, f"{model.config.kind}: forgetting, {k} people per memory", n_people) as tick:
        for m in range(n_people):
            group = pool[m * k:(m + 1) * k]
            rng.shuffle(group)
            memory = model.new_memory()
            updates: list[range] = []  # the update ids each person's biography made
            for person in group:
                start = memory.num_updates
                model.inject(memory, world.biography(person, rng), drop=drop)
                updates.append(range(start + 1, memory.num_updates + 1))
            questions = [(i, *world.question(group[i], a, rng)) for i in range(ASKED) for a in world.attributes]
            prompts = [q for _, q, _ in questions]
            truths = [t.strip() for _, _, t in questions]
            owners = [i for i, _, _ in questions]
            target = rng.randrange(ASKED)
            written = "last" if target == k - 1 else "followed"  # did a later injection read its rows?

            def score(answers: list[str], target_cell: str, others: str) -> None:
                for i, answer, truth in zip(owners, answers, truths):
                    cells[target_cell if i == target else others].add(answer, truth)

            before = answer_words(model, memory, prompts, max_new_tokens)
            score(before, "target", "others")
            asked = [j for j, i in enumerate(owners) if i == target]
            floor = answer_words(model, model.new_memory(), [prompts[j] for j in asked], max_new_tokens)
            for answer, j in zip(floor, asked):
                cells["floor"].add(answer, truths[j])
                cells[f"floor_{written}"].add(answer, truths[j])
            for i, prompt, answer, truth in zip(owners, prompts, before, truths):
                if answer == truth:  # attribute the greedy answer, as `ask` gives it
                    why = explain(model, memory, prompt, max_new_tokens=max_new_tokens, chat=False)
                    top = why.top(1, updates_only=True)
                    cells["attribution_top1"].correct += bool(top) and top[0][0] in updates[i]
                    cells["attribution_top1"].total += 1
            stm, ltm = _rows_of(memory, updates[target])
            target_rows, target_ltm_rows = target_rows + stm + ltm, target_ltm_rows + ltm

            for storage in STORAGE:
                path = Path(tmp) / f"{storage}.mem"
                memory.save(path, dtype=storage)
                sizes[storage] += path.stat().st_size
                loaded = Memory.load(path, device=model.device)
                for answer, truth in zip(answer_words(model, loaded, prompts, max_new_tokens), truths):
                    cells[f"asked_{storage}"].add(answer, truth)
            if memory.ltm is not None:  # M+: the long-term memory held as int8, dequantised as it is read
                for answer, truth in zip(answer_words(model, memory.to(dtype=torch.int8), prompts, max_new_tokens),
                                         truths):
                    cells["asked_int8_held"].add(answer, truth)

            memory.forget(list(updates[target]), model.initial_pool)
            after = answer_words(model, memory, prompts, max_new_tokens)
            score(after, "target_forgotten", "others_after")
            for j in asked:
                cells[f"target_forgotten_{written}"].add(after[j], truths[j])
            tick()
    held = Tally()
    held += cells["target"]
    held += cells["others"]
    out: dict[str, Any] = {"k": k, "memories": n_people, **{name: t.as_dict() for name, t in cells.items()}}
    out["forgotten_minus_floor"] = difference(cells["target_forgotten"], cells["floor"])
    for written in ("last", "followed"):
        out[f"forgotten_{written}_minus_floor"] = difference(cells[f"target_forgotten_{written}"],
                                                             cells[f"floor_{written}"])
    out["others_kept_ratio"] = kept_ratio(cells["others_after"], cells["others"])
    out["target_ltm_share"] = target_ltm_rows / target_rows if target_rows else None
    for storage in ("bfloat16", "int8"):
        short = "bf16" if storage == "bfloat16" else storage
        out[f"{short}_size_ratio"] = sizes[storage] / sizes["float32"]
        out[f"{short}_accuracy_delta"] = difference(cells[f"asked_{storage}"], held)
    held_int8 = cells["asked_int8_held"]
    out["int8_held_accuracy_delta"] = difference(held_int8, held) if held_int8.total else None
    return out


def _rows_of(memory: Memory, updates: range) -> tuple[int, int]:
    """(short-term rows, long-term rows) that the given updates still hold in a memory."""
    counts = memory.source_counts()
    return (sum(counts.get(u, (0, 0))[0] for u in updates), sum(counts.get(u, (0, 0))[1] for u in updates))


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The last-line keys of one model's result."""
    return {
        "forgotten_minus_floor": result["forgotten_minus_floor"]["delta"],
        "forgotten_minus_floor_ci": result["forgotten_minus_floor"]["ci"],
        "forgotten_last_minus_floor": result["forgotten_last_minus_floor"]["delta"],
        "forgotten_followed_minus_floor": result["forgotten_followed_minus_floor"]["delta"],
        "others_kept_ratio": result["others_kept_ratio"]["ratio"],
        "others_kept_ratio_ci": result["others_kept_ratio"]["ci"],
        "attribution_top1": result["attribution_top1"]["acc"],
        "attribution_top1_ci": result["attribution_top1"]["ci"],
        "attributed_answers": result["attribution_top1"]["n"],
        "int8_size_ratio": result["int8_size_ratio"],
        "int8_accuracy_delta": result["int8_accuracy_delta"]["delta"],
        "int8_accuracy_delta_ci": result["int8_accuracy_delta"]["ci"],
        "int8_held_accuracy_delta": (result["int8_held_accuracy_delta"] or {}).get("delta"),
        "bf16_size_ratio": result["bf16_size_ratio"],
        "bf16_accuracy_delta": result["bf16_accuracy_delta"]["delta"],
        "bf16_accuracy_delta_ci": result["bf16_accuracy_delta"]["ci"],
        "target_acc": result["target"]["acc"],
        "target_forgotten_acc": result["target_forgotten"]["acc"],
        "floor": result["floor"]["acc"],
        "others_acc": result["others"]["acc"],
        "others_after_acc": result["others_after"]["acc"],
        "target_ltm_share": result["target_ltm_share"],
        "people_per_memory": result["k"],
        "memories": result["memories"],
    }


def print_results(results: dict[str, dict[str, Any]]) -> None:
    console = Console(width=140)

    def cell(t: dict) -> str:
        return "-" if t["acc"] is None else f"{t['acc']:.3f} [{t['ci'][0]:.2f}, {t['ci'][1]:.2f}] n={t['n']}"

    def interval(value: float | None, ci: list) -> str:
        if value is None:
            return "-"
        lo, hi = ("-" if c is None else f"{c:.3f}" for c in ci)
        return f"{value:+.3f} [{lo}, {hi}]"

    for name, r in results.items():
        table = Table(title=f"{name}: {r['k']} people per memory, {r['memories']} memories, "
                            f"target = one of the first 4 written "
                            f"({_share(r['target_ltm_share'])} of its remaining rows in long-term memory)",
                      title_justify="left")
        table.add_column("measure")
        table.add_column("value [95% CI]", justify="right")
        rows = [
            ("target, before forgetting", cell(r["target"])),
            ("target, after forgetting", cell(r["target_forgotten"])),
            ("target, no memory (floor)", cell(r["floor"])),
            ("forgotten - floor", interval(r["forgotten_minus_floor"]["delta"], r["forgotten_minus_floor"]["ci"])),
            (f"  target written last ({r['target_forgotten_last']['n']} questions)",
             interval(r["forgotten_last_minus_floor"]["delta"], r["forgotten_last_minus_floor"]["ci"])),
            (f"  target followed by a later write ({r['target_forgotten_followed']['n']})",
             interval(r["forgotten_followed_minus_floor"]["delta"], r["forgotten_followed_minus_floor"]["ci"])),
            ("3 others, before", cell(r["others"])),
            ("3 others, after", cell(r["others_after"])),
            ("others kept (after / before)", interval(r["others_kept_ratio"]["ratio"], r["others_kept_ratio"]["ci"])),
            ("attribution: top source is the asked person's (correct answers)", cell(r["attribution_top1"])),
            ("bfloat16 file / float32 file", f"{r['bf16_size_ratio']:.3f}"),
            ("int8 file / float32 file", f"{r['int8_size_ratio']:.3f}"),
            ("accuracy, bfloat16 file - as held", interval(r["bf16_accuracy_delta"]["delta"],
                                                          r["bf16_accuracy_delta"]["ci"])),
            ("accuracy, int8 file - as held", interval(r["int8_accuracy_delta"]["delta"],
                                                      r["int8_accuracy_delta"]["ci"])),
        ]
        if r.get("int8_held_accuracy_delta"):
            rows.append(("accuracy, long-term memory held in int8 - as held",
                         interval(r["int8_held_accuracy_delta"]["delta"], r["int8_held_accuracy_delta"]["ci"])))
        for label, value in rows:
            table.add_row(label, value)
        console.print(table)


def _share(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def evaluate_forgetting(checkpoints: Sequence[str] = SHIPPED, n_people: int = 50, seed: int = 0,
                        world_seed: int = 0, threads: int = 2, print_table: bool = True) -> dict[str, Any]:
    """`memllm eval forgetting`: `forgetting` of each checkpoint (named by its config kind) on the world it
    was trained on. Returns {"results": {name: result}, "summary": {name: summary}}. Raises
    CheckpointError or OSError for a checkpoint that cannot be loaded."""
    from memllm.core.checkpoint import load

    torch.set_num_threads(threads)
    results: dict[str, dict[str, Any]] = {}
    with progress_bar() as bar:
        for path in checkpoints:
            model = load(path)
            name = model.config.kind if model.config.kind not in results else f"{model.config.kind}:{path}"
            results[name] = forgetting(model, world_for(path, world_seed), n_people=n_people, seed=seed, progress=bar)
    if print_table:
        print_results(results)
    return {"results": results, "summary": {name: summary(r) for name, r in results.items()}}


def survival_bar(stm_share: float | None, ltm_share: float | None, width: int = 20) -> str:
    """A text bar of an update's rows still held: one block per 1/width of what it wrote, solid for
    short-term rows, shaded for long-term ones."""
    stm = round((stm_share or 0.0) * width)
    ltm = min(round((ltm_share or 0.0) * width), width - stm)
    return "\u2588" * stm + "\u2592" * ltm + "\u00b7" * (width - stm - ltm)


def plot_survival(provenance: list[dict[str, Any]], num_updates: int, path: str | Path) -> None:
    """Rows still held per update, as a share of the rows it wrote, by the update's age (updates since
    it was written): short-term and long-term memory stacked; forgotten updates marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in provenance if r["written"]]
    ages = [num_updates - r["update"] for r in rows]
    stm = [r["stm_share"] or 0.0 for r in rows]
    ltm = [r["ltm_share"] or 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.bar(ages, stm, width=0.9, label="short-term memory", color="C0")
    ax.bar(ages, ltm, width=0.9, bottom=stm, label="long-term memory", color="C1")
    gone = [a for a, r in zip(ages, rows) if r["forgotten"]]
    if gone:
        ax.scatter(gone, [0.02] * len(gone), marker="x", color="C3", label="forgotten", zorder=3)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set(xlabel="update age (updates written since; 0 = newest)", ylabel="share of its rows still held",
           ylim=(0, 1.05))
    ax.set_title(f"survival of each update's rows ({num_updates} updates)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

