"""`memllm demo`: the project's own tiny memory models, on a machine with no GPU and no network.

The package ships two ~1M-parameter models trained here from scratch (`python -m memllm.tinymodel`) on
a synthetic world of invented people: MemoryLLM and M+ (the same model plus a retriever and a
long-term memory). Nothing about the demo's people is in their weights (they are held out from
training, and their names and facts are invented): every right answer comes from the memory.

The demo writes three biographies into a memory of each model, asks about them (and asks a fresh
memory, the no-memory floor), saves the MemoryLLM memory and reloads it, then writes three times as
many distractor texts as the short-term memory holds and asks again: MemoryLLM has dropped most of
what it read, M+ brings it back from long-term memory.
"""

from __future__ import annotations

import random
import tempfile
import warnings
from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

import memllm
from memllm.evaluate import first_word
from memllm.world import World, WorldConfig

NAMES = {"memoryllm": "tiny-memoryllm", "mplus": "tiny-mplus"}
PEOPLE, SEED = 3, 7


def _answers(models: dict, memories: dict, prompts: list[str]) -> dict[str, list[str]]:
    return {k: [first_word(a) for a in models[k].ask(memories[k], prompts, max_new_tokens=3, chat=False)]
            for k in models}


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
    questions = [world.question(p, a, rng) for p in people for a in rng.sample(world.attributes, 2)]
    prompts, truth = [q for q, _ in questions], [a.strip() for _, a in questions]

    memories = {k: m.new_memory() for k, m in models.items()}
    for bio in bios:
        console.print(f"inject: [italic]{bio}[/]")
        for k, m in models.items():
            m.inject(memories[k], bio)
    floor = _answers({"memoryllm": models["memoryllm"]}, {"memoryllm": models["memoryllm"].new_memory()}, prompts)
    now = _answers(models, memories, prompts)
    _table(console, "after reading the biographies", prompts, truth,
           {"no memory": floor["memoryllm"], "MemoryLLM": now["memoryllm"], "M+": now["mplus"]})

    path = memories["memoryllm"].save(workdir / "people.mem")
    reloaded = models["memoryllm"].load_memory(str(path))
    again = _answers({"memoryllm": models["memoryllm"]}, {"memoryllm": reloaded}, prompts)["memoryllm"]
    identical = again == now["memoryllm"]
    console.print(f"MemoryLLM memory saved to {path.name} ({path.stat().st_size / 1e6:.1f} MB) and reloaded: "
                  f"answers identical = [bold]{identical}[/]")

    n = 3 * N // K
    console.print(f"inject {n} distractor texts (3x the short-term capacity), e.g. "
                  f"[italic]{world.distractor(random.Random(0))}[/]")
    for _ in range(n):
        text = world.distractor(rng)
        for k, m in models.items():
            m.inject(memories[k], text)
    later = _answers(models, memories, prompts)
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
