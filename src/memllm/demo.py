"""`memllm demo`: the whole loop of a memory model on a machine with no checkpoint and no network.

Until the project's own trained tiny model ships, the demo runs on a small *random* model: it shows
the mechanics (a checkpoint on disk, a memory written, asked, saved and reloaded in a new process with
identical logits), and says plainly that its answers are meaningless.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.panel import Panel

import memllm
from memllm.tiny import random_model

PARAGRAPH = (
    "Zorvan Kettle was born in Velmora in 1987. He works as a glassblower for Quillmarsh Works, "
    "keeps a tortoise named Pim, and his favourite colour is teal."
)
QUESTION = "Where was Zorvan Kettle born?"
PROBE = "Zorvan Kettle was born in"


def _logits_in_new_process(model_dir: Path, memory_path: Path, prompt: str) -> torch.Tensor:
    out = memory_path.with_suffix(".logits.pt")
    script = (
        "import torch, memllm\n"
        f"m = memllm.load({str(model_dir)!r})\n"
        f"mem = m.load_memory({str(memory_path)!r})\n"
        f"ids = m.tokenizer({prompt!r}, return_tensors='pt', add_special_tokens=False).input_ids\n"
        "with torch.no_grad():\n"
        f"    torch.save(m(ids, mem).logits, {str(out)!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    return torch.load(out)


def run_demo(console: Console, workdir: Path | None = None) -> dict:
    """Run the demo, printing as it goes; returns what it measured."""
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="memllm-demo-")
        workdir = Path(tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    console.print(Panel(
        "This demo uses a small model with [bold]random weights[/]: its answers are meaningless.\n"
        "It shows the mechanics: a memory model on disk, a memory written, asked, saved and reloaded.",
        title="memllm demo", border_style="yellow",
    ))
    model_dir = memllm.save(random_model(num_layers=4, hidden_size=128, num_tokens=64, num_blocks=4, seed=0),
                            workdir / "model")
    model = memllm.load(model_dir)
    console.print(f"model: {model_dir}  (layers {model.num_layers}, memory {model.config.num_memory_tokens} "
                  f"vectors/layer, K {model.config.num_tokens})")

    memory = model.new_memory()
    n = model.inject(memory, PARAGRAPH)
    console.print(f"injected {n} chunk(s) of: [italic]{PARAGRAPH}[/]")
    answer = model.ask(memory, QUESTION, max_new_tokens=12)
    console.print(f"Q: {QUESTION}\nA (random model): {answer!r}")

    path = memory.save(workdir / "zorvan.mem")
    console.print(f"memory saved -> {path} ({path.stat().st_size / 1024:.0f} KiB)")
    ids = model.tokenizer(PROBE, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        here = model(ids, memory).logits
        fresh = model(ids, model.new_memory()).logits
    there = _logits_in_new_process(model_dir, path, PROBE)
    identical = torch.equal(here, there)
    console.print(f"reloaded in a new process: logits identical = [bold]{identical}[/]; "
                  f"the memory moved the logits by {(here - fresh).abs().max().item():.3g} vs an empty memory")
    if tmp is not None:
        tmp.cleanup()
    return {"identical_after_reload": identical, "answer": answer}
