"""Retention of facts in memory: recall of held-out people's facts after n distractor injections.

    python -m memllm.evaluate [CHECKPOINT ...] [--n-people 100] [--plot retention.png]

With no checkpoint it evaluates the shipped tiny models (MemoryLLM and M+) side by side.

For each held-out person: a fresh memory (``model.new_memory()``), inject the biography, then inject
distractors one at a time; after n of them (for each n in ``distractor_counts``) ask every attribute
question (greedy, at most 3 new tokens) and score exact match of the first answer word. The same
memory is carried from one n to the next, so a person costs max(n) + 1 injections, not sum(n).

Also measured: the no-memory floor (the questions asked of a fresh memory with nothing about the
person in it) and, for comparison, the survival law (1 - K/N)^n: the fraction of the biography's
memory vectors that survive n random drops of K out of N. Accuracies come with a 95% Wilson interval.

Any memllm model can be evaluated, given QA data: ``world`` needs ``heldout_people(n, seed)``,
``attributes``, ``biography(person, rng)``, ``question(person, attr, rng) -> (prompt, " answer")``
and ``distractor(rng)`` (``memllm.world.World`` has them all).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import track

from memllm.inject import RandomDrop

DEFAULT_COUNTS = (0, 1, 2, 4, 8, 16, 24)


def wilson(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (0, 1 when total is 0)."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def first_word(text: str) -> str:
    words = re.findall(r"[A-Za-z0-9]+", text)
    return words[0] if words else ""


def stm_capacity(model) -> tuple[int, int]:
    """(K, N): vectors written per injection and short-term memory vectors per layer."""
    return model.config.num_tokens, model.config.num_memory_tokens


def _ask(model, memory, prompts: list[str], max_new_tokens: int) -> list[str]:
    with torch.no_grad():
        return model.ask(memory, prompts, max_new_tokens=max_new_tokens, chat=False)


def retention(
    model,
    world,
    tokenizer=None,
    n_people: int = 100,
    distractor_counts: tuple[int, ...] = DEFAULT_COUNTS,
    seed: int = 0,
    max_new_tokens: int = 3,
    progress: bool = False,
) -> dict[str, Any]:
    """Recall accuracy per number of distractors, with 95% CIs, the floor and the survival law.

    Returns {"K", "N", "n_people", "n_questions", "counts": [n...], "acc": {n: a}, "ci": {n: [lo, hi]},
    "survival": {n: (1-K/N)^n}, "floor", "floor_ci", "acc_at_0"}.
    """
    if tokenizer is not None:
        model.tokenizer = tokenizer
    if model.tokenizer is None:
        raise ValueError("retention needs a tokenizer: pass one or use a model that ships one")
    was_training = model.training
    model.eval()
    counts = sorted({int(n) for n in distractor_counts})
    K, N = stm_capacity(model)
    people = world.heldout_people(n_people, seed=seed)
    rng = random.Random(f"retention:{seed}")
    # which memory vectors each update drops: seeded too, so a rerun gives the same table
    drop = RandomDrop(per_layer=model.config.drop_memory_per_layer, generator=torch.Generator().manual_seed(seed))
    correct = {n: 0 for n in counts}
    floor_correct = total = 0
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="context of .* tokens")  # short distractors are expected
            bar = Console(stderr=True)
            for person in track(people, description="retention", disable=not progress, console=bar, transient=True):
                questions = [world.question(person, a, rng) for a in world.attributes]
                prompts = [q for q, _ in questions]
                answers = [a.strip() for _, a in questions]
                total += len(questions)

                floor_answers = _ask(model, model.new_memory(), prompts, max_new_tokens)
                floor_correct += sum(first_word(p) == a for p, a in zip(floor_answers, answers))

                memory = model.new_memory()
                model.inject(memory, world.biography(person, rng), drop=drop)
                done = 0
                for n in counts:
                    while done < n:
                        model.inject(memory, world.distractor(rng), drop=drop)
                        done += 1
                    predicted = _ask(model, memory, prompts, max_new_tokens)
                    correct[n] += sum(first_word(p) == a for p, a in zip(predicted, answers))
    finally:
        model.train(was_training)
    acc = {n: correct[n] / total for n in counts}
    return {
        "K": K, "N": N, "n_people": len(people), "n_questions": total, "counts": counts,
        "acc": acc, "ci": {n: list(wilson(correct[n], total)) for n in counts},
        "survival": {n: (1 - K / N) ** n for n in counts},
        "floor": floor_correct / total, "floor_ci": list(wilson(floor_correct, total)),
        "acc_at_0": acc.get(0),
    }


def three_x(result: dict) -> int:
    """The distractor count at 3x the short-term capacity in biographies: n = 3 N / K."""
    return 3 * result["N"] // result["K"]


def compare(models: dict[str, Any], world, tokenizer=None, plot: str | Path | None = None,
            print_table: bool = True, **kw) -> dict[str, Any]:
    """`retention` of each named model; with a "memoryllm" and an "mplus" model also
    ``mplus_gain_at_3x`` (M+ minus MemoryLLM accuracy at n = 3 N / K). Prints a table, writes a plot,
    returns {"results": {name: retention}, "summary": {...}} (summary is the last-line JSON)."""
    results: dict[str, dict] = {}
    base_counts = set(kw.pop("distractor_counts", DEFAULT_COUNTS))
    for name, model in models.items():
        K, N = stm_capacity(model)
        counts = base_counts | {3 * N // K}
        results[name] = retention(model, world, tokenizer, distractor_counts=tuple(counts), **kw)
    summary: dict[str, Any] = {}
    for name, r in results.items():
        prefix = "" if len(results) == 1 else f"{name}_"
        summary[prefix + "acc_at_0"] = r["acc_at_0"]
        summary[prefix + "floor"] = r["floor"]
        summary[prefix + "acc_at_3x"] = r["acc"][three_x(r)]
    if len(results) > 1:
        first = next(iter(results.values()))
        summary["acc_at_0"], summary["floor"] = first["acc_at_0"], first["floor"]
    if "mplus" in results and "memoryllm" in results:
        n = three_x(results["mplus"])
        summary["mplus_gain_at_3x"] = results["mplus"]["acc"][n] - results["memoryllm"]["acc"].get(n, float("nan"))
    if print_table:
        print_results(results)
    if plot is not None:
        plot_results(results, plot)
        summary["plot"] = str(plot)
    return {"results": results, "summary": summary}


def print_results(results: dict[str, dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    for name, r in results.items():
        console = Console(width=120)
        console.print(f"{name}: recall after n distractors (K {r['K']}, N {r['N']}, "
                      f"{r['n_questions']} questions, no-memory floor {r['floor']:.3f})")
        table = Table()
        table.add_column("n", justify="right")
        table.add_column("accuracy", justify="right")
        table.add_column("95% CI", justify="right")
        table.add_column("(1-K/N)^n", justify="right")
        for n in r["counts"]:
            lo, hi = r["ci"][n]
            table.add_row(str(n), f"{r['acc'][n]:.3f}", f"[{lo:.3f}, {hi:.3f}]", f"{r['survival'][n]:.3f}")
        console.print(table)


def plot_results(results: dict[str, dict], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        xs = r["counts"]
        ys = [r["acc"][n] for n in xs]
        lo = [r["acc"][n] - r["ci"][n][0] for n in xs]
        hi = [r["ci"][n][1] - r["acc"][n] for n in xs]
        line = ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=name)
        ax.axhline(r["floor"], linestyle=":", color=line[0].get_color(), label=f"{name} floor")
    first = next(iter(results.values()))
    xs = first["counts"]
    a0 = first["acc"][xs[0]]
    ax.plot(xs, [first["floor"] + (a0 - first["floor"]) * first["survival"][n] for n in xs], "k--",
            label="survival law (scaled)")
    ax.set_xlabel("distractor injections after the biography")
    ax.set_ylabel("exact-match recall")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    from memllm.checkpoint import load
    from memllm.world import World, WorldConfig

    parser = argparse.ArgumentParser(description="Retention curve of memllm checkpoints on a synthetic world.")
    parser.add_argument("checkpoints", nargs="*", default=["tiny-memoryllm", "tiny-mplus"],
                        help="checkpoint dirs or shipped names (named by their config kind); default: the "
                             "shipped tiny MemoryLLM and M+ models")
    parser.add_argument("--n-people", type=int, default=100)
    parser.add_argument("--counts", default=",".join(map(str, DEFAULT_COUNTS)))
    parser.add_argument("--seed", type=int, default=0, help="held-out people and text draws")
    parser.add_argument("--world-seed", type=int, default=0, help="the world the models were trained on")
    parser.add_argument("--plot", default="retention.png")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    world = World(WorldConfig(seed=args.world_seed))
    models = {}
    for path in args.checkpoints:
        model = load(path)
        name = model.config.kind if model.config.kind not in models else f"{model.config.kind}:{path}"
        models[name] = model
    out = compare(models, world, plot=args.plot, n_people=args.n_people, seed=args.seed,
                  distractor_counts=tuple(int(c) for c in args.counts.split(",")), progress=True)
    print(json.dumps(out["summary"]))
    return out


if __name__ == "__main__":
    main()
