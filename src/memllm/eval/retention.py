"""Retention and lookup: memory models on a synthetic world of invented people, measuring what a user does.

    memllm eval retention [CHECKPOINT ...] [--n-people 50] [--plot retention.png]

With no checkpoint the shipped tiny models (MemoryLLM and M+) are evaluated side by side. Every
person asked about is held out from training; every question is asked greedily (at most 3 new
tokens) and scored by exact match of the first answer word; every attribute of a person is asked.
Accuracies come with 95% Wilson intervals. (Many updates into one memory: `memllm.eval.integrity`.)

`retention` panels (each a subplot of ``--plot``):

- ``single`` (the original curve): one person per fresh memory, then n distractors, asked after each
  n; the no-memory floor and the survival law (1 - K/N)^n: the share of the biography's memory vectors
  left after n random drops of K of N. The same memory is carried from one n to the next.
- ``people``: k held-out people written into ONE memory in random order (k = 1, 4, N/K (the short-term
  capacity) and, for M+, 4 N/K), every person asked: mean accuracy, accuracy per position (1 = oldest)
  and the share of questions answered with another stored person's value. M+ at its largest k also
  gets the retrieval precision: the share of retrieved long-term rows written by the asked person's
  injection (found by provenance: every row an update adds is a row of that injection's delta memory,
  and long-term memory keeps rows unchanged), next to chance (that person's share of long-term rows).
- ``before``: d distractor texts, then the person's biography, then its questions (d = 1, 4, 8).
- ``strangers``: in the k = 4 memories, questions about held-out people never written into them:
  abstention (the answer ``memllm.synthetic.world.ABSTAIN``) and answers that are a stored person's value.
- ``wording``: the k = 4 memories asked with question templates held out from training, and with the
  name in upper case; ``heldout_template_ratio`` = held-out / trained-template accuracy.
- ``one_then`` (M+ only): one person, then 96 other people's biographies (12x the short-term capacity
  of the tiny models), the first person asked.

A checkpoint is evaluated on the world it was trained on: ``recipe.json``'s ``"world"`` when present,
else ``WorldConfig(seed=--world-seed)``. Any memllm model can be evaluated given such a world:
``heldout_people(n, seed)``, ``attributes``, ``biography(person, rng)``, ``question(person, attr, rng,
phrasings=, casing=, stranger=)`` and ``distractor(rng)`` (``memllm.synthetic.world.World`` has them all).
"""

from __future__ import annotations

import math
import random
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from rich.console import Console
from rich.progress import Progress

from memllm.core.inject import RandomDrop
from memllm.eval.common import (
    ASK_BATCH,
    Tally,
    answer_words,
    errorbar,
    evaluating,
    progress_bar,
    progress_task,
    seeded_drop,
    stm_capacity,
    wilson,
    world_for,
)
from memllm.synthetic.world import ABSTAIN

DEFAULT_COUNTS = (0, 1, 2, 4, 8, 16, 24)
BEFORE = (1, 4, 8)
ONE_THEN = 96
STRANGER_K = 4
PANELS = ("single", "people", "before", "strangers", "wording", "one_then")
SHIPPED = ("tiny-memoryllm", "tiny-mplus")  # what is evaluated when no checkpoint is named


# ---- the single-person curve (the original protocol) ---------------------------------------------


def retention(
    model,
    world,
    tokenizer=None,
    n_people: int = 100,
    distractor_counts: tuple[int, ...] = DEFAULT_COUNTS,
    seed: int = 0,
    max_new_tokens: int = 3,
    progress: "bool | Progress" = False,
) -> dict[str, Any]:
    """Recall accuracy per number of distractors, with 95% CIs, the floor and the survival law.
    `progress`: True for a progress bar on stderr, or a `Progress` to add a task to.

    Returns {"K", "N", "n_people", "n_questions", "counts": [n...], "acc": {n: a}, "ci": {n: [lo, hi]},
    "survival": {n: (1-K/N)^n}, "floor", "floor_ci", "acc_at_0"}.
    """
    if tokenizer is not None:
        model.tokenizer = tokenizer
    if model.tokenizer is None:
        raise ValueError("retention needs a tokenizer: pass one or use a model that ships one")
    counts = sorted({int(n) for n in distractor_counts})
    K, N = stm_capacity(model)
    people = world.heldout_people(n_people, seed=seed)
    rng = random.Random(f"retention:{seed}")
    # which memory vectors each update drops: seeded too, so a rerun gives the same table
    drop = RandomDrop(per_layer=model.config.drop_memory_per_layer, generator=torch.Generator().manual_seed(seed))
    correct = {n: 0 for n in counts}
    floor_correct = total = 0
    own = progress_bar() if progress is True else None
    bar = own or (progress if isinstance(progress, Progress) else None)
    with evaluating(model), own or nullcontext(), progress_task(bar, f"{model.config.kind}: one person", len(people)) as tick:
        for person in people:
            questions = [world.question(person, a, rng) for a in world.attributes]
            prompts = [q for q, _ in questions]
            answers = [a.strip() for _, a in questions]
            total += len(questions)

            floor_answers = answer_words(model, model.new_memory(), prompts, max_new_tokens)
            floor_correct += sum(p == a for p, a in zip(floor_answers, answers))

            memory = model.new_memory()
            model.inject(memory, world.biography(person, rng), drop=drop)
            done = 0
            for n in counts:
                while done < n:
                    model.inject(memory, world.distractor(rng), drop=drop)
                    done += 1
                predicted = answer_words(model, memory, prompts, max_new_tokens)
                correct[n] += sum(p == a for p, a in zip(predicted, answers))
            tick()
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


# ---- lookup: several people in one memory, text before, strangers, wording ------------------------

def _row_keys(rows: torch.Tensor) -> list[bytes]:
    return [r.tobytes() for r in rows.detach().float().cpu().numpy()]


class Provenance:
    """Which injection wrote each memory row. An update appends the injection's delta memory as the
    pool's last rows and M+ moves dropped rows to long-term memory unchanged, so a row's bytes name
    its injection. Rows no injection wrote (the initial pool) have source -1."""

    def __init__(self) -> None:
        self.sources: dict[int, dict[bytes, int]] = {}

    def inject(self, model, memory, context, index: int, drop=None) -> int:
        """`model.inject`, recording the rows each of its updates appends (the pool's last K) as `index`'s."""
        K = model.config.num_tokens

        def record(done: int, total: int) -> None:
            for l in range(memory.pool.shape[0]):
                self.sources.setdefault(l, {}).update(dict.fromkeys(_row_keys(memory.pool[l, -K:]), index))

        return model.inject(memory, context, drop=drop, progress=record)

    def source(self, layer: int, rows: torch.Tensor) -> list[int]:
        known = self.sources.get(layer, {})
        return [known.get(key, -1) for key in _row_keys(rows)]


def retrieval_precision(model, memory, prompts: list[str], owners: list[int],
                        provenance: Provenance) -> tuple[int, int, float]:
    """For M+ questions whose asked person was written by injection owners[i]: (retrieved long-term
    rows written by that injection, rows retrieved, expected hits of a retriever that ignores the
    question: per question and layer, that injection's share of the long-term rows times R)."""
    from memllm.core.generate import encode_prompt

    hits = total = 0
    chance = 0.0
    for i in range(0, len(prompts), ASK_BATCH):
        enc = encode_prompt(model, prompts[i:i + ASK_BATCH], chat=False)
        trace: list = []
        with torch.no_grad():
            model(enc["input_ids"], memory, enc["attention_mask"], retrievals=trace)
        for l, results in trace:
            st = memory.ltm.layers[l]
            dense = st.dense_vectors()
            everything = provenance.source(l, torch.cat([dense, st.cache_vectors.to(dense.dtype)]))
            for owner, r in zip(owners[i:i + ASK_BATCH], results):
                sources = provenance.source(l, st.rows(r.order))
                hits += sum(s == owner for s in sources)
                total += len(sources)
                chance += len(sources) * everything.count(owner) / len(everything)
    return hits, total, chance


def people_in_memory(
    model,
    world,
    k: int,
    n_people: int = 50,
    seed: int = 0,
    strangers: bool = False,
    wording: bool = False,
    trace: bool = False,
    max_new_tokens: int = 3,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """k held-out people written into ONE memory in random order, every attribute of each asked.

    ceil(n_people / k) memories, so at least n_people people are asked. Returns {"k", "memories",
    "all": tally, "positions": [tally per position, 1 = oldest]} (tallies as `Tally.as_dict`), plus
    with `strangers` "strangers": questions about as many held-out people never written into the
    memory (truth ABSTAIN); with `wording` "heldout" (question templates held out from training) and
    "upper" (the name in upper case); with `trace` (M+) "retrieval": {"precision", "chance", "rows"}.
    """
    memories = math.ceil(n_people / k)
    outsiders = math.ceil(n_people / memories) if strangers else 0
    rng = random.Random(f"people:{k}:{seed}")
    pool = world.heldout_people(memories * (k + outsiders), seed=seed)
    drop = seeded_drop(model, seed, f"people{k}")
    positions = [Tally() for _ in range(k)]
    cells = {name: Tally() for name in ("strangers", "heldout", "upper")}
    hits = retrieved = 0
    chance = 0.0
    with evaluating(model), progress_task(progress, f"{model.config.kind}: {k} people per memory", memories) as tick:
        for m in range(memories):
            chunk = pool[m * (k + outsiders):(m + 1) * (k + outsiders)]
            group, others = chunk[:k], chunk[k:]
            rng.shuffle(group)
            memory = model.new_memory()
            provenance = Provenance() if trace and getattr(memory, "ltm", None) is not None else None
            for i, person in enumerate(group):
                if provenance is not None:
                    provenance.inject(model, memory, world.biography(person, rng), i, drop=drop)
                else:
                    model.inject(memory, world.biography(person, rng), drop=drop)
            stored = {a: {p.attrs[a] for p in group} for a in world.attributes}
            asked = []  # (cell, position or -1, prompt, truth, values that are another stored person's)
            for i, person in enumerate(group):
                rest = {a: {p.attrs[a] for j, p in enumerate(group) if j != i} for a in world.attributes}
                for a in world.attributes:
                    variants = [("train", "train", "as_is")]
                    if wording:
                        variants += [("heldout", "heldout", "as_is"), ("upper", "train", "upper")]
                    for cell, phrasings, casing in variants:
                        prompt, truth = world.question(person, a, rng, phrasings=phrasings, casing=casing)
                        asked.append((cell, i, prompt, truth.strip(), rest[a]))
            for person in others:
                for a in world.attributes:
                    prompt, truth = world.question(person, a, rng, stranger=True)
                    asked.append(("strangers", -1, prompt, truth.strip(), stored[a]))
            answers = answer_words(model, memory, [q[2] for q in asked], max_new_tokens)
            for (cell, i, _, truth, rest), answer in zip(asked, answers):
                (positions[i] if cell == "train" else cells[cell]).add(answer, truth, rest)
            if provenance is not None and any(layer.num_ltm for layer in memory.ltm.layers):
                train = [(i, prompt) for cell, i, prompt, _, _ in asked if cell == "train"]
                h, t, c = retrieval_precision(model, memory, [p for _, p in train], [i for i, _ in train], provenance)
                hits, retrieved, chance = hits + h, retrieved + t, chance + c
            tick()
    overall = Tally()
    for t in positions:
        overall += t
    out: dict[str, Any] = {"k": k, "memories": memories, "all": overall.as_dict(),
                           "positions": [t.as_dict() for t in positions]}
    if strangers:
        out["strangers"] = cells["strangers"].as_dict()
    if wording:
        out["heldout"], out["upper"] = cells["heldout"].as_dict(), cells["upper"].as_dict()
    if trace:
        out["retrieval"] = {"precision": hits / retrieved if retrieved else None,
                            "chance": chance / retrieved if retrieved else None, "rows": retrieved}
    return out


def recall_among(
    model,
    world,
    n_people: int = 50,
    seed: int = 0,
    before: int = 0,
    after: int = 0,
    max_new_tokens: int = 3,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Each of n_people held-out people in a fresh memory: `before` distractor texts, the person's
    biography, then `after` other held-out people's biographies; every attribute asked. Returns
    `Tally.as_dict` ("other_value_rate": answered with one of the other biographies' values)."""
    rng = random.Random(f"among:{before}:{after}:{seed}")
    people = world.heldout_people(n_people + after, seed=seed)
    drop = seeded_drop(model, seed, f"among{before}:{after}")
    tally = Tally()
    with evaluating(model), progress_task(progress, f"{model.config.kind}: {before} before, {after} after", n_people) as tick:
        for t, person in enumerate(people[:n_people]):
            rest = rng.sample(people[:t] + people[t + 1:], after)
            memory = model.new_memory()
            texts = ([world.distractor(rng) for _ in range(before)] + [world.biography(person, rng)]
                     + [world.biography(p, rng) for p in rest])
            for text in texts:
                model.inject(memory, text, drop=drop)
            questions = [world.question(person, a, rng) for a in world.attributes]
            answers = answer_words(model, memory, [q for q, _ in questions], max_new_tokens)
            for a, (_, truth), answer in zip(world.attributes, questions, answers):
                tally.add(answer, truth.strip(), {p.attrs[a] for p in rest})
            tick()
    return tally.as_dict()


def default_ks(model) -> tuple[int, ...]:
    """1, 4 and the short-term capacity N/K; M+ also 4 N/K (most of it in long-term memory)."""
    K, N = stm_capacity(model)
    cap = max(1, N // K)
    return tuple(sorted({1, 4, cap} | ({4 * cap} if model.config.kind == "mplus" else set())))


def lookup(
    model,
    world,
    n_people: int = 50,
    seed: int = 0,
    ks: Sequence[int] | None = None,
    befores: Sequence[int] = BEFORE,
    one_then: int = ONE_THEN,
    panels: Sequence[str] = PANELS,
    max_new_tokens: int = 3,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The lookup panels of one model (see the module docstring): {"people": {k: people_in_memory},
    "before": {d: tally}, "strangers", "heldout", "upper", "one_then": tally (M+)}."""
    ks = tuple(sorted(set(ks or default_ks(model))))
    mplus = model.config.kind == "mplus"
    out: dict[str, Any] = {}
    kw = {"n_people": n_people, "seed": seed, "max_new_tokens": max_new_tokens, "progress": progress}
    people_ks = set(ks) if "people" in panels else set()
    if {"strangers", "wording"} & set(panels):
        people_ks.add(STRANGER_K)  # strangers and wording are asked in the memories of STRANGER_K people
    for k in sorted(people_ks):
        r = people_in_memory(model, world, k, strangers=k == STRANGER_K and "strangers" in panels,
                             wording=k == STRANGER_K and "wording" in panels,
                             trace=mplus and "people" in panels and k == max(ks), **kw)
        for probe in ("strangers", "heldout", "upper"):
            if probe in r:
                out[probe] = r.pop(probe)
        if "heldout" in out and k == STRANGER_K:
            out["trained_templates"] = r["all"]
        if "people" in panels:
            out.setdefault("people", {})[k] = r
    if "before" in panels:
        out["before"] = {d: recall_among(model, world, before=d, **kw) for d in befores}
    if "one_then" in panels and mplus:
        out["one_then"] = recall_among(model, world, after=one_then, **kw)
        out["one_then_count"] = one_then
    return out


def lookup_summary(name: str, r: dict[str, Any]) -> dict[str, Any]:
    """The last-line JSON keys of one model's lookup panels, prefixed with its name."""
    s: dict[str, Any] = {}
    for k, cell in r.get("people", {}).items():
        accs = [p["acc"] for p in cell["positions"]]
        s[f"{name}_k{k}_mean"] = cell["all"]["acc"]
        s[f"{name}_k{k}_min_position"] = min(accs)
        s[f"{name}_k{k}_other_value_rate"] = cell["all"]["other_value_rate"]
        s[f"{name}_k{k}_positions"] = [round(a, 4) for a in accs]
        if cell.get("retrieval"):
            s[f"{name}_retrieval_precision_k{k}"] = cell["retrieval"]["precision"]
            s[f"{name}_retrieval_chance_k{k}"] = cell["retrieval"]["chance"]
    for d, cell in r.get("before", {}).items():
        s[f"{name}_before{d}"] = cell["acc"]
    if "strangers" in r:
        s[f"{name}_stranger_abstain_rate"] = r["strangers"]["abstain_rate"]
        s[f"{name}_stranger_stored_value_rate"] = r["strangers"]["other_value_rate"]
    if "heldout" in r:
        trained = r["trained_templates"]["acc"]
        s[f"{name}_trained_template_acc"] = trained
        s[f"{name}_heldout_template_acc"] = r["heldout"]["acc"]
        s[f"{name}_heldout_template_ratio"] = r["heldout"]["acc"] / trained if trained else None
        s[f"{name}_upper_name_acc"] = r["upper"]["acc"]
    if "one_then" in r:
        s[f"{name}_one_then_{r['one_then_count']}"] = r["one_then"]["acc"]
    return s


# ---- all panels, several models --------------------------------------------------------------------


def compare(models: dict[str, Any], world, tokenizer=None, plot: str | Path | None = None,
            print_table: bool = True, panels: Sequence[str] = PANELS, ks: Sequence[int] | None = None,
            befores: Sequence[int] = BEFORE, one_then: int = ONE_THEN, **kw) -> dict[str, Any]:
    """Every panel of each named model (``world``: one World, or one per name). Prints tables, writes
    a plot, returns {"results": {name: retention}, "lookup": {name: lookup}, "summary": {...}} (summary
    is the last-line JSON: the single-person keys (``acc_at_0``, ``floor``, with a "memoryllm" and an
    "mplus" model ``mplus_gain_at_3x``, M+ minus MemoryLLM at n = 3 N / K) and `lookup_summary`'s)."""
    worlds = world if isinstance(world, dict) else {name: world for name in models}
    progress = kw.pop("progress", False)
    results: dict[str, dict] = {}
    lookups: dict[str, dict] = {}
    base_counts = set(kw.pop("distractor_counts", DEFAULT_COUNTS))
    with progress_bar(progress) as bar:
        for name, model in models.items():
            if tokenizer is not None:
                model.tokenizer = tokenizer
            if "single" in panels:
                K, N = stm_capacity(model)
                counts = base_counts | {3 * N // K}
                results[name] = retention(model, worlds[name], distractor_counts=tuple(counts),
                                          progress=bar if progress else False, **kw)
            lookup_kw = {k: v for k, v in kw.items() if k in ("n_people", "seed", "max_new_tokens")}
            lookups[name] = lookup(model, worlds[name], ks=ks, befores=befores, one_then=one_then, panels=panels,
                                   progress=bar if progress else None, **lookup_kw)
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
    for name, r in lookups.items():
        summary.update(lookup_summary(name, r))
    if print_table:
        print_results(results)
        print_lookup(lookups)
    if plot is not None:
        plot_all(results, lookups, plot)
        summary["plot"] = str(plot)
    return {"results": results, "lookup": lookups, "summary": summary}


def _pct(cell: dict) -> str:
    return "-" if cell["acc"] is None else f"{cell['acc']:.3f} [{cell['ci'][0]:.2f}, {cell['ci'][1]:.2f}]"


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def print_results(results: dict[str, dict]) -> None:
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


def print_lookup(lookups: dict[str, dict]) -> None:
    """Rich tables of the lookup panels: accuracy (95% CI) per cell."""
    from rich.table import Table

    console = Console(width=140)
    for name, r in lookups.items():
        if "people" in r:
            table = Table(title=f"{name}: k people in one memory, every person asked (position 1 = oldest)",
                          title_justify="left")
            for col in ("k", "questions", "mean accuracy [95% CI]", "another stored person's value", "per position"):
                table.add_column(col, justify="right" if col != "per position" else "left")
            for k, cell in r["people"].items():
                per = " ".join(f"{p['acc']:.2f}" for p in cell["positions"])
                everyone = cell["all"]
                table.add_row(str(k), str(everyone["n"]), _pct(everyone), _rate(everyone["other_value_rate"]), per)
            console.print(table)
            for k, cell in r["people"].items():
                if (cell.get("retrieval") or {}).get("precision") is not None:
                    console.print(f"{name}: {k} people, share of retrieved long-term rows written by the asked person: "
                                  f"{cell['retrieval']['precision']:.3f} (chance {cell['retrieval']['chance']:.3f})")
        rows = [(f"{d} distractors, then the person", c) for d, c in r.get("before", {}).items()]
        if "one_then" in r:
            rows.append((f"the person, then {r['one_then_count']} other people", r["one_then"]))
        if "heldout" in r:
            rows += [(f"{STRANGER_K} people, held-out question templates", r["heldout"]),
                     (f"{STRANGER_K} people, name in upper case", r["upper"])]
        if rows:
            table = Table(title=f"{name}: other memories", title_justify="left")
            for col in ("memory", "questions", "accuracy [95% CI]", "another person's value"):
                table.add_column(col, justify="left" if col == "memory" else "right")
            for label, cell in rows:
                table.add_row(label, str(cell["n"]), _pct(cell), _rate(cell["other_value_rate"]))
            console.print(table)
        if "heldout" in r:
            ratio = lookup_summary(name, r)[f"{name}_heldout_template_ratio"]
            console.print(f"{name}: held-out / trained question templates: {_rate(ratio)}")
        if "strangers" in r:
            s = r["strangers"]
            console.print(f"{name}: strangers (never written into a memory of {STRANGER_K} people), "
                          f"{s['n']} questions: "
                          f"abstained ({ABSTAIN!r}) {_rate(s['abstain_rate'])}, answered with a stored person's value "
                          f"{_rate(s['other_value_rate'])}")


def _plot_single(ax, results: dict[str, dict]) -> None:
    for name, r in results.items():
        xs = r["counts"]
        line = errorbar(ax, xs, [{"acc": r["acc"][n], "ci": r["ci"][n]} for n in xs], label=name)
        ax.axhline(r["floor"], linestyle=":", color=line[0].get_color(), label=f"{name} floor")
    first = next(iter(results.values()))
    xs = first["counts"]
    a0 = first["acc"][xs[0]]
    ax.plot(xs, [first["floor"] + (a0 - first["floor"]) * first["survival"][n] for n in xs], "k--",
            label="survival law (scaled)")
    ax.set_xlabel("distractor injections after the biography")
    ax.set_ylabel("exact-match recall")
    ax.set_title("one person per memory", fontsize=9)


def _bars(ax, lookups: dict[str, dict], items: list[tuple[str, Callable[[dict], float | None]]], title: str,
          colors: dict[str, str]) -> None:
    width = 0.8 / max(1, len(lookups))
    for j, (name, r) in enumerate(lookups.items()):
        values = [get(r) for _, get in items]
        xs = [i + j * width for i, v in enumerate(values) if v is not None]
        ax.bar(xs, [v for v in values if v is not None], width, label=name, color=colors[name])
    ax.set_xticks([i + width * (len(lookups) - 1) / 2 for i in range(len(items))], [label for label, _ in items],
                  rotation=20, fontsize=7, ha="right")
    ax.set_title(title, fontsize=9)


def plot_all(results: dict[str, dict], lookups: dict[str, dict], path: str | Path) -> None:
    """One subplot per panel: the single-person curve, accuracy per position, mean accuracy per k,
    text before, strangers and wording, M+ (one then many; retrieval precision vs chance)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    ax_single, ax_pos, ax_k, ax_before, ax_probe, ax_mplus = axes.flat
    colors = {name: f"C{i}" for i, name in enumerate(dict.fromkeys([*results, *lookups]))}
    if results:
        _plot_single(ax_single, results)
    styles = iter(["-", "--", ":", "-."] * 8)
    for name, r in lookups.items():
        people = r.get("people", {})
        for k, cell in people.items():
            if k > 1:  # k = 1 is the mean panel's first point
                accs = [p["acc"] for p in cell["positions"]]
                ax_pos.plot(range(1, k + 1), accs, next(styles), marker=".", color=colors[name], label=f"{name}, k={k}")
                ax_pos.fill_between(range(1, k + 1), [p["ci"][0] for p in cell["positions"]],
                                    [p["ci"][1] for p in cell["positions"]], color=colors[name], alpha=0.08)
        if people:
            errorbar(ax_k, list(people), [c["all"] for c in people.values()], label=name, color=colors[name])
        if r.get("before"):
            errorbar(ax_before, list(r["before"]), list(r["before"].values()), label=name, color=colors[name])
    ax_pos.set(xlabel="position in memory (1 = oldest)", ylabel="accuracy", xscale="log")
    ax_pos.set_title("k people in one memory: per position (95% CI shaded)", fontsize=9)
    ax_k.set(xlabel="people in one memory (k)", ylabel="mean accuracy", xscale="log")
    ax_k.set_title("k people in one memory: mean", fontsize=9)
    ax_before.set(xlabel="distractor texts before the biography", ylabel="accuracy")
    ax_before.set_title("text before the person", fontsize=9)
    _bars(ax_probe, lookups, [
        ("stranger: abstains", lambda r: (r.get("strangers") or {}).get("abstain_rate")),
        ("stranger: stored value", lambda r: (r.get("strangers") or {}).get("other_value_rate")),
        ("trained templates", lambda r: (r.get("trained_templates") or {}).get("acc")),
        ("held-out templates", lambda r: (r.get("heldout") or {}).get("acc")),
        ("UPPER-CASE name", lambda r: (r.get("upper") or {}).get("acc")),
    ], f"strangers and wording ({STRANGER_K} people per memory)", colors)
    mplus = {n: r for n, r in lookups.items()
             if "one_then" in r or any(c.get("retrieval") for c in r.get("people", {}).values())}
    if mplus:
        def retrieval(r: dict, key: str) -> float | None:
            cells = [c["retrieval"] for c in r.get("people", {}).values() if c.get("retrieval")]
            return cells[-1][key] if cells else None

        _bars(ax_mplus, mplus, [
            ("one person, then many", lambda r: (r.get("one_then") or {}).get("acc")),
            ("retrieval precision", lambda r: retrieval(r, "precision")),
            ("retrieval chance", lambda r: retrieval(r, "chance")),
        ], "M+: long-term memory", colors)
    else:
        ax_mplus.axis("off")
    for ax in axes.flat:
        if ax.axison:
            ax.set_ylim(0, 1.02)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate_retention(
    checkpoints: Sequence[str] = SHIPPED,
    n_people: int = 50,
    distractor_counts: Sequence[int] = DEFAULT_COUNTS,
    ks: Sequence[int] | None = None,
    befores: Sequence[int] = BEFORE,
    one_then: int = ONE_THEN,
    panels: Sequence[str] = PANELS,
    seed: int = 0,
    world_seed: int = 0,
    plot: str | Path = "retention.png",
    threads: int = 2,
    dtype: str | None = None,
) -> dict[str, Any]:
    """`memllm eval retention`: `compare` of the checkpoints (each named by its config kind, the path
    added for a second one of a kind, loaded in `dtype` if given: does a bfloat16 model, which injects
    faster on CPUs with AMX, answer as well?), each on the world it was trained on (``world_seed`` when
    recipe.json does not name it), with a progress bar. Raises CheckpointError or OSError for a
    checkpoint that cannot be loaded."""
    from memllm.core.checkpoint import load

    torch.set_num_threads(threads)
    models, worlds = {}, {}
    for path in checkpoints:
        model = load(path, dtype=dtype)
        name = model.config.kind if model.config.kind not in models else f"{model.config.kind}:{path}"
        models[name], worlds[name] = model, world_for(path, world_seed)
    return compare(models, worlds, plot=plot, n_people=n_people, seed=seed, panels=panels, ks=ks or None,
                   befores=befores, one_then=one_then, distractor_counts=distractor_counts, progress=True)
