"""`memllm` on the command line: inject, ask, chat, memory {new,info,fork}, init, demo, bench.

A model is a checkpoint directory or hub id (`--model`); a memory is a file (`--memory`). Commands
that change a memory write it back atomically, so an interrupted command leaves the old version.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

app = typer.Typer(help="Self-updatable language models: write text into a model's memory, ask about it later.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
memory_app = typer.Typer(help="Create, inspect and fork memories.", no_args_is_help=True)
app.add_typer(memory_app, name="memory")

console = Console(stderr=True)
out = Console()

ModelOpt = typer.Option(..., "--model", "-m", help="checkpoint directory or hub id")
MemoryOpt = typer.Option(..., "--memory", help="memory file (.mem)")
DtypeOpt = typer.Option(None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
DeviceOpt = typer.Option(None, help="device_map for transformers, e.g. cpu, cuda, auto")


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(1)


def _load_model(model: str, dtype: Optional[str], device: Optional[str]):
    import memllm

    try:
        with console.status(f"loading {model}"):
            return memllm.load(model, dtype=dtype, device_map=device)
    except (memllm.CheckpointError, OSError) as e:
        _fail(str(e))


def _load_memory(model, path: Path, create: bool):
    from memllm import MemoryFileError, MemoryMismatchError

    if not path.exists():
        if create:
            return model.new_memory()
        _fail(f"memory file not found: {path} (create one with `memllm memory new`)")
    try:
        return model.load_memory(str(path))
    except (MemoryFileError, MemoryMismatchError) as e:
        _fail(str(e))


def _read_text(text: Optional[str], file: Optional[Path]) -> str:
    if text is not None and file is not None:
        _fail("give the text or --file, not both")
    if file is not None:
        if not file.is_file():
            _fail(f"file not found: {file}")
        return file.read_text()
    if text is not None:
        return text
    if sys.stdin.isatty():
        _fail("no text: pass it as an argument, with --file, or on standard input")
    return sys.stdin.read()


def _write_stream(pieces) -> None:
    """Answer text goes to stdout unformatted, as it arrives, so it can be piped."""
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _inject_with_progress(model, memory, text: str, chunk_size: Optional[int]) -> int:
    with Progress(TextColumn("injecting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("inject", total=None)

        def report(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                n = model.inject(memory, text, chunk_size=chunk_size, progress=report)
            except ValueError as e:
                _fail(str(e))
    for w in caught:
        console.print(f"[yellow]warning:[/] {w.message}")
    return n


@app.command()
def inject(
    text: Optional[str] = typer.Argument(None, help="text to write into memory (or --file, or stdin)"),
    model: str = ModelOpt,
    memory: Path = MemoryOpt,
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="read the text from a file"),
    chunk_size: Optional[int] = typer.Option(None, help="tokens per injection for long text (default 2K)"),
    create: bool = typer.Option(True, help="create the memory file if it does not exist"),
    dtype: Optional[str] = DtypeOpt,
    device: Optional[str] = DeviceOpt,
) -> None:
    """Write text into a memory (long text is injected chunk by chunk)."""
    content = _read_text(text, file)
    m = _load_model(model, dtype, device)
    mem = _load_memory(m, memory, create)
    n = _inject_with_progress(m, mem, content, chunk_size)
    mem.save(memory)
    console.print(f"injected {n} chunk(s); memory has seen {mem.num_updates} updates -> {memory}")


@app.command()
def ask(
    question: str = typer.Argument(..., help="the question"),
    model: str = ModelOpt,
    memory: Path = MemoryOpt,
    max_new_tokens: int = typer.Option(32, help="longest answer, in tokens"),
    sample: bool = typer.Option(False, help="sample instead of greedy decoding"),
    temperature: float = typer.Option(0.7, help="sampling temperature"),
    chat: Optional[bool] = typer.Option(None, help="use the chat template (default: if the tokenizer has one)"),
    dtype: Optional[str] = DtypeOpt,
    device: Optional[str] = DeviceOpt,
) -> None:
    """Answer a question from a memory (streamed)."""
    m = _load_model(model, dtype, device)
    mem = _load_memory(m, memory, create=False)
    kwargs = {"do_sample": True, "temperature": temperature} if sample else {}
    try:
        _write_stream(m.stream(mem, question, max_new_tokens=max_new_tokens, chat=chat, **kwargs))
    except ValueError as e:
        _fail(str(e))


@app.command()
def chat(
    model: str = ModelOpt,
    memory: Path = MemoryOpt,
    max_new_tokens: int = typer.Option(128, help="longest answer, in tokens"),
    dtype: Optional[str] = DtypeOpt,
    device: Optional[str] = DeviceOpt,
) -> None:
    """Interactive: questions are answered from memory; `/inject TEXT` writes, `/save` saves, `/quit`."""
    m = _load_model(model, dtype, device)
    mem = _load_memory(m, memory, create=True)
    console.print("[dim]/inject TEXT writes into memory, /save saves it, /quit leaves (saving)[/]")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            line = "/quit"
        if not line:
            continue
        if line in ("/quit", "/exit"):
            mem.save(memory)
            console.print(f"saved {memory}")
            return
        if line == "/save":
            mem.save(memory)
            console.print(f"saved {memory}")
        elif line.startswith("/inject "):
            n = _inject_with_progress(m, mem, line.removeprefix("/inject "), None)
            console.print(f"[dim]injected {n} chunk(s)[/]")
        else:
            _write_stream(m.stream(mem, line, max_new_tokens=max_new_tokens))


@memory_app.command("new")
def memory_new(
    path: Path = typer.Argument(..., help="where to write the memory"),
    model: str = ModelOpt,
    force: bool = typer.Option(False, help="overwrite an existing file"),
) -> None:
    """A fresh memory of a model (its trained initial pool)."""
    if path.exists() and not force:
        _fail(f"{path} exists (use --force to overwrite)")
    m = _load_model(model, None, None)
    m.new_memory().save(path)
    console.print(f"new memory -> {path}")


@memory_app.command("info")
def memory_info(path: Path = typer.Argument(..., help="memory file")) -> None:
    """Sizes, updates, dtype and the model fingerprint of a memory file."""
    from memllm import Memory, MemoryFileError

    try:
        info = Memory.load(path).info()
    except MemoryFileError as e:
        _fail(str(e))
    table = Table(show_header=False)
    for k, v in info.items():
        table.add_row(k, str(v))
    out.print(table)


@memory_app.command("fork")
def memory_fork(
    source: Path = typer.Argument(..., help="memory to copy"),
    dest: Path = typer.Argument(..., help="new memory file"),
    force: bool = typer.Option(False, help="overwrite an existing file"),
) -> None:
    """Copy a memory (verified on the way)."""
    from memllm import Memory, MemoryFileError

    if dest.exists() and not force:
        _fail(f"{dest} exists (use --force to overwrite)")
    try:
        Memory.load(source).fork().save(dest)
    except MemoryFileError as e:
        _fail(str(e))
    console.print(f"{source} -> {dest}")


@app.command()
def init(
    out_dir: Path = typer.Argument(..., help="directory for the new memory model"),
    base: str = typer.Option(..., help="Llama-family causal LM (directory or hub id)"),
    num_tokens: int = typer.Option(256, help="K: memory vectors written per injection"),
    num_blocks: int = typer.Option(50, help="N / K: memory pool size in blocks of K"),
    kind: str = typer.Option("memoryllm", help="memoryllm or mplus"),
    num_ltm_blocks: int = typer.Option(0, help="M+: blocks of K retrieved from long-term memory"),
    lora_rank: int = typer.Option(0, help="LoRA rank for the injection/generation adapters (0: none)"),
    seed: int = typer.Option(0),
) -> None:
    """Turn a base model into an (untrained) memory model directory."""
    import memllm
    from memllm.config import LoraSettings

    if kind not in ("memoryllm", "mplus"):
        _fail("--kind must be memoryllm or mplus")
    lora = LoraSettings(r=lora_rank, lora_alpha=2 * lora_rank) if lora_rank else None
    try:
        model = memllm.init_from_base(base, num_tokens=num_tokens, num_blocks=num_blocks, kind=kind,
                                      num_ltm_blocks=num_ltm_blocks, lora=lora, add_decoder_lora=bool(lora),
                                      seed=seed)
    except memllm.CheckpointError as e:
        _fail(str(e))
    memllm.save(model, out_dir)
    console.print(f"memory model -> {out_dir} (N = {model.config.num_memory_tokens}, K = {num_tokens}; untrained)")


@app.command()
def demo(
    workdir: Optional[Path] = typer.Option(None, help="where to keep the demo's memory file"),
) -> None:
    """The shipped tiny MemoryLLM and M+ models: inject biographies, ask, save and reload the memory,
    inject distractors, ask again."""
    from memllm.demo import run_demo

    run_demo(out, workdir)


PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@app.command(context_settings=PASS_THROUGH)
def bench(ctx: typer.Context) -> None:
    """Benchmarks. `memllm bench [OPTIONS]`: core speed (time to first token with the prefix reused vs
    recomputed, 32 tokens, a 512-token injection; options of `python -m memllm.bench --help`).
    `memllm bench ltm [SIZES]`: long-term memory retrieval, dense scan vs index."""
    args = list(ctx.args)
    if args[:1] == ["ltm"]:
        from memllm.bench_ltm import main as ltm_main

        ltm_main(args[1:])
    else:
        from memllm.bench import main as bench_main

        bench_main(args)


@app.command("eval", context_settings=PASS_THROUGH)
def evaluate(ctx: typer.Context) -> None:
    """Evaluations. `memllm eval retention [CHECKPOINT...] [OPTIONS]`: inject a biography, then n
    distractors, then ask; accuracy per n with 95% CIs, the no-memory floor and the survival law
    (options of `python -m memllm.evaluate --help`). No checkpoint: the shipped tiny models."""
    args = list(ctx.args)
    if args[:1] != ["retention"]:
        _fail("usage: memllm eval retention [CHECKPOINT...] [OPTIONS]")
    from memllm.evaluate import main as evaluate_main

    evaluate_main(args[1:])


@app.command(context_settings=PASS_THROUGH)
def train(ctx: typer.Context) -> None:
    """Train a memory model to use its memory (accelerate-native: run under `accelerate launch` for
    several processes). Options are those of `python -m memllm.train --help`."""
    from memllm.train import main as train_main

    train_main(ctx.args)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
