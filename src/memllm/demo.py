"""`memllm demo`: the project's own tiny memory models, on a machine with no GPU and no network.

The package ships two ~1M-parameter models trained here from scratch (`python -m memllm.tinymodel`) on
a synthetic world of invented people: MemoryLLM and M+ (the same model plus a retriever and a
long-term memory). Nothing about the demo's people is in their weights (they are held out from
training, and their names and facts are invented): every right answer comes from the memory.

The demo gives each of three people their own memory (a memory is an object of its own; one model
serves many), writes their biography into it, asks about them (and asks a fresh memory, the
no-memory floor), saves one memory and reloads it, then writes three times as many distractor texts
as the short-term memory holds into every memory and asks again: MemoryLLM has dropped most of what
it read, M+ brings it back from long-term memory. (One memory per person because the shipped models
were trained to answer about the oldest biography in a memory; with several people in one memory
they mix them up: docs/tinymodel.md.)
"""

from __future__ import annotations

import random
import tempfile
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

import memllm
from memllm.evaluate import first_word
from memllm.inject import RandomDrop
from memllm.world import World, WorldConfig

NAMES = {"memoryllm": "tiny-memoryllm", "mplus": "tiny-mplus"}
PEOPLE, SEED = 3, 7


def _answers(models: dict, memories: dict, prompts: list[list[str]]) -> dict[str, list[str]]:
    """Per model, the first answer word of every question; person i's questions ask memories[k][i]."""
    return {k: [first_word(a) for memory, asked in zip(memories[k], prompts)
                for a in models[k].ask(memory, asked, max_new_tokens=3, chat=False)] for k in models}


def _table(console: Console, title: str, prompts: list[str], truth: list[str], columns: dict[str, list[str]]) -> None:
    table = Table(title=title, title_justify="left")
    table.add_column("question")
    table.add_column("truth")
    for name in columns:
        table.add_column(name)
    for i, prompt in enumerate(prompts):
        cells = [f"[green]{c[i]}[/]" if c[i] == truth[i] else f"[red]{c[i] or '-'}[/]" for c in columns.values()]
        table.add_row(prompt, truth[i], *cells)
    console.print(table)


def run_demo(console: Console, workdir: Path | None = None) -> dict:
    """Run the demo, printing as it goes; returns the answers and what it measured."""
    tmp = tempfile.TemporaryDirectory(prefix="memllm-demo-") if workdir is None else None
    workdir = Path(tmp.name) if tmp is not None else workdir
    workdir.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", message="context of .* tokens")  # biographies are short by design
    models = {k: memllm.load(name).eval() for k, name in NAMES.items()}
    K, N = models["memoryllm"].config.num_tokens, models["memoryllm"].config.num_memory_tokens
    params = sum(p.numel() for p in models["memoryllm"].parameters()) / 1e6
    console.print(Panel(
        f"Two tiny memory models trained by this project on CPU ({params:.1f}M parameters, {len(models['memoryllm'].layers)} "
        f"layers; memory of {N} vectors per layer, {K} written per text: {N // K} texts fit in short-term memory).\n"
        "The people below are invented and were never seen in training: what the models know about them "
        "comes from their memory.", title="memllm demo", border_style="cyan"))

    world = World(WorldConfig(seed=0))  # the world the shipped models were trained on
    rng = random.Random(SEED)
    people = world.heldout_people(PEOPLE, seed=SEED)
    bios = [world.biography(p, rng) for p in people]
    questions = [[world.question(p, a, rng) for a in rng.sample(world.attributes, 2)] for p in people]
    asked = [[q for q, _ in person] for person in questions]  # per person
    prompts, truth = [q for person in asked for q in person], [a.strip() for p in questions for _, a in p]

    memories = {k: [m.new_memory() for _ in people] for k, m in models.items()}  # one memory per person
    drop = RandomDrop(generator=torch.Generator().manual_seed(SEED))  # seeded: the same demo every run
    for i, bio in enumerate(bios):
        console.print(f"inject into memory {i + 1}: [italic]{bio}[/]")
        for k, m in models.items():
            m.inject(memories[k][i], bio, drop=drop)
    fresh = {"memoryllm": [models["memoryllm"].new_memory() for _ in people]}
    floor = _answers({"memoryllm": models["memoryllm"]}, fresh, asked)
    now = _answers(models, memories, asked)
    _table(console, "after reading the biographies", prompts, truth,
           {"no memory": floor["memoryllm"], "MemoryLLM": now["memoryllm"], "M+": now["mplus"]})

    path = memories["memoryllm"][0].save(workdir / "person1.mem")
    reloaded = models["memoryllm"].load_memory(str(path))
    again = _answers({"memoryllm": models["memoryllm"]}, {"memoryllm": [reloaded]}, asked[:1])["memoryllm"]
    identical = again == now["memoryllm"][: len(asked[0])]
    console.print(f"MemoryLLM memory 1 saved to {path.name} ({path.stat().st_size / 1e6:.1f} MB) and reloaded: "
                  f"answers identical = [bold]{identical}[/]")

    n = 3 * N // K
    console.print(f"inject {n} distractor texts into every memory (3x the short-term capacity), e.g. "
                  f"[italic]{world.distractor(random.Random(0))}[/]")
    for _ in range(n):
        text = world.distractor(rng)
        for k, m in models.items():
            for memory in memories[k]:
                m.inject(memory, text, drop=drop)
    later = _answers(models, memories, asked)
    _table(console, f"after {n} distractors", prompts, truth, {"MemoryLLM": later["memoryllm"], "M+": later["mplus"]})

    def score(answers: list[str]) -> int:
        return sum(a == t for a, t in zip(answers, truth))

    result = {"questions": len(prompts), "floor": score(floor["memoryllm"]),
              "memoryllm": score(now["memoryllm"]), "mplus": score(now["mplus"]),
              "memoryllm_after": score(later["memoryllm"]), "mplus_after": score(later["mplus"]),
              "distractors": n, "identical_after_reload": identical}
    console.print(f"right answers of {len(prompts)}: no memory {result['floor']}; MemoryLLM {result['memoryllm']} "
                  f"then {result['memoryllm_after']} after {n} distractors; M+ {result['mplus']} then "
                  f"{result['mplus_after']}.  Full curves: `memllm eval retention`.")
    if tmp is not None:
        tmp.cleanup()
    return result
