"""`memllm demo`: the project's own tiny memory models, on a machine with no GPU and no network.

The package ships two ~1M-parameter models trained here from scratch (`memllm recipe tiny`) on
a synthetic world of invented people: MemoryLLM and M+ (the same model plus a retriever and a
long-term memory). Nothing about the demo's people is in their weights (they are held out from
training, and their names and facts are invented): every right answer comes from the memory.

The demo writes five people's biographies into ONE memory per model (a memory is an object of its
own; one model serves many), asks about each of them and about a stranger it was never told about
(the right answer is "unknown"), and asks a fresh memory too (the no-memory floor). It saves the
memory and reloads it, then writes three times as many distractor texts as the short-term memory
holds and asks again: what MemoryLLM has dropped, M+ can bring back from long-term memory. A wrong
answer that is another stored person's value is marked with that person's name. The full
measurements are `memllm eval retention`.
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
from memllm.eval.common import answer_words, world_for
from memllm.core.inject import RandomDrop
from memllm.synthetic.world import ABSTAIN

NAMES = {"memoryllm": "tiny-memoryllm", "mplus": "tiny-mplus"}
PEOPLE, SEED = 5, 7


def _table(console: Console, title: str, prompts: list[str], truth: list[str], owners: dict[tuple[int, str], str],
           columns: dict[str, list[str]]) -> None:
    """owners: (question index, value) -> the name of the other stored person who has that value
    (not shown for the fresh memory, which holds nobody)."""
    table = Table(title=title, title_justify="left")
    table.add_column("question")
    table.add_column("truth")
    for name in columns:
        table.add_column(name)
    for i, prompt in enumerate(prompts):
        cells = []
        for name, column in columns.items():
            answer = column[i]
            if answer == truth[i]:
                cells.append(f"[green]{answer}[/]")
            else:
                whose = owners.get((i, answer)) if name != "no memory" else None
                cells.append(f"[red]{answer or '-'}[/]" + (f" [dim]({whose}'s)[/]" if whose else ""))
        table.add_row(prompt, truth[i], *cells)
    console.print(table)


def run_demo(console: Console, workdir: Path | None = None) -> dict:
    """Run the demo, printing as it goes; returns the counts of right answers and what it measured."""
    tmp = tempfile.TemporaryDirectory(prefix="memllm-demo-") if workdir is None else None
    workdir = Path(tmp.name) if tmp is not None else workdir
    workdir.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", message="context of .* tokens")  # biographies are short by design
    models = {k: memllm.load(name).eval() for k, name in NAMES.items()}
    K, N = models["memoryllm"].config.num_tokens, models["memoryllm"].config.num_memory_tokens
    params = sum(p.numel() for p in models["memoryllm"].parameters()) / 1e6
    console.print(Panel(
        f"Two tiny memory models trained by this project on CPU ({params:.1f}M parameters, "
        f"{len(models['memoryllm'].layers)} layers; memory of {N} vectors per layer, {K} written per text: "
        f"{N // K} texts fit in short-term memory).\n"
        "The people below are invented and were never seen in training: what the models know about them "
        "comes from their memory.", title="memllm demo", border_style="cyan"))

    world = world_for(NAMES["memoryllm"])  # the world the shipped models were trained on (both share it)
    rng = random.Random(SEED)
    *people, stranger = world.heldout_people(PEOPLE + 1, seed=SEED)
    bios = [world.biography(p, rng) for p in people]
    # two questions about each person, then two about the stranger (i None)
    about = [(i, a) for i in [*range(len(people)), None] for a in rng.sample(world.attributes, 2)]
    questions = [world.question(stranger if i is None else people[i], a, rng, stranger=i is None) for i, a in about]
    prompts, truth = [q for q, _ in questions], [a.strip() for _, a in questions]
    owners = {(q, p.attrs[a]): p.name for q, (i, a) in enumerate(about) for j, p in enumerate(people) if j != i}
    known = 2 * len(people)

    memories = {k: m.new_memory() for k, m in models.items()}  # ONE memory per model, everyone in it
    drop = RandomDrop(generator=torch.Generator().manual_seed(SEED))  # seeded: the same demo every run
    console.print(f"inject {len(bios)} biographies into one memory (per model), oldest first:")
    for bio in bios:
        console.print(f"  [italic]{bio}[/]")
        for k, m in models.items():
            m.inject(memories[k], bio, drop=drop)
    console.print(f"and ask about each of them, and about {stranger.name}, who was never written into the memory "
                  f"(the right answer: {ABSTAIN!r}).")
    floor = answer_words(models["memoryllm"], models["memoryllm"].new_memory(), prompts)
    now = {k: answer_words(m, memories[k], prompts) for k, m in models.items()}
    _table(console, "after reading the biographies", prompts, truth, owners,
           {"no memory": floor, "MemoryLLM": now["memoryllm"], "M+": now["mplus"]})

    path = memories["memoryllm"].save(workdir / "people.mem")
    reloaded = models["memoryllm"].load_memory(str(path))
    identical = answer_words(models["memoryllm"], reloaded, prompts) == now["memoryllm"]
    console.print(f"MemoryLLM's memory saved to {path.name} ({path.stat().st_size / 1e6:.1f} MB) and reloaded: "
                  f"answers identical = [bold]{identical}[/]")

    n = 3 * N // K
    console.print(f"inject {n} distractor texts into each memory (3x the short-term capacity), e.g. "
                  f"[italic]{world.distractor(random.Random(0))}[/]")
    for _ in range(n):
        text = world.distractor(rng)
        for k, m in models.items():
            m.inject(memories[k], text, drop=drop)
    later = {k: answer_words(m, memories[k], prompts) for k, m in models.items()}
    _table(console, f"after {n} distractors", prompts, truth, owners,
           {"MemoryLLM": later["memoryllm"], "M+": later["mplus"]})

    def right(answers: list[str]) -> int:
        return sum(a == t for a, t in zip(answers[:known], truth[:known]))

    result = {"people": len(people), "questions": known, "floor": right(floor),
              "memoryllm": right(now["memoryllm"]), "mplus": right(now["mplus"]),
              "memoryllm_after": right(later["memoryllm"]), "mplus_after": right(later["mplus"]),
              "stranger_questions": len(prompts) - known,
              "memoryllm_abstained": sum(a == ABSTAIN for a in now["memoryllm"][known:]),
              "mplus_abstained": sum(a == ABSTAIN for a in now["mplus"][known:]),
              "distractors": n, "identical_after_reload": identical}
    console.print(f"right answers about the {len(people)} people ({known} questions): no memory {result['floor']}; "
                  f"MemoryLLM {result['memoryllm']} then {result['memoryllm_after']} after {n} distractors; M+ "
                  f"{result['mplus']} then {result['mplus_after']}. The stranger: MemoryLLM said {ABSTAIN!r} "
                  f"{result['memoryllm_abstained']} of {result['stranger_questions']} times, "
                  f"M+ {result['mplus_abstained']}. "
                  "Full measurements: `memllm eval retention`.")
    if tmp is not None:
        tmp.cleanup()
    return result
