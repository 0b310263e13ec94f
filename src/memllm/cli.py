"""`memllm` on the command line: inject, ask, chat, memory {new,info,fork}, init, demo, bench.

A model is a checkpoint directory or hub id (`--model`); a memory is a file (`--memory`). Commands
that change a memory hold its lock from load to save and write it back atomically, so concurrent
commands all apply and an interrupted one leaves the old version. torch and transformers are imported
inside the commands, so `memllm --help` starts in a fraction of a second.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
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

DTYPES = ("float32", "bfloat16", "float16")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's placements, not devices

ModelOpt = typer.Option(..., "--model", "-m", help="checkpoint directory or hub id")
MemoryOpt = typer.Option(..., "--memory", help="memory file (.mem)")
DtypeOpt = typer.Option(None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
DeviceOpt = typer.Option(None, help="device_map for transformers, e.g. cpu, cuda, auto")
ConvertOpt = typer.Option(False, "--convert-memory",
                          help="use a memory stored in another dtype, converted to the model's (saved converted)")


def _fail(message: str, code: int = 1) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _check_dtype_device(dtype: Optional[str], device: Optional[str]) -> None:
    """Refuse an unknown dtype or an unusable device before loading anything."""
    if dtype is not None and dtype not in DTYPES:
        _fail(f"unknown --dtype {dtype!r}: use {', '.join(DTYPES)}", 2)
    if device is None or device in DEVICE_MAPS:
        return
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        _fail(f"unknown --device {device!r}: use cpu, cuda, cuda:N, mps or auto", 2)
    try:
        torch.empty(0, device=parsed)
    except (RuntimeError, AssertionError, ValueError) as e:
        reason = (str(e).strip() or type(e).__name__).splitlines()[0]
        _fail(f"--device {device} is not available here ({reason})", 2)


def _load_model(model: str, dtype: Optional[str], device: Optional[str]):
    import memllm

    _check_dtype_device(dtype, device)
    try:
        with console.status(f"loading {model}"):
            return memllm.load(model, dtype=dtype, device_map=device)
    except (memllm.CheckpointError, OSError) as e:
        _fail(str(e))


def _check_memory_path(path: Path, must_exist: bool = False) -> None:
    """Refuse a memory path that cannot be written (or read) before any work is done: a directory, a
    parent that is missing (a typo must not become a new memory) or is a file."""
    if path.is_dir():
        _fail(f"{path} is a directory, not a memory file")
    parent = path.parent
    if not parent.is_dir():
        _fail(f"directory {parent} does not exist" if not parent.exists() else f"{parent} is not a directory")
    if must_exist and not path.exists():
        _fail(f"memory file not found: {path} (create one with `memllm memory new`)")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold the memory's cross-process lock (waiting, and saying so, while another command holds it)."""
    from memllm.core.memory import MemoryFileError, MemoryLockedError, lock

    with ExitStack() as stack:
        try:
            try:
                stack.enter_context(lock(path, timeout=0))
            except MemoryLockedError:
                console.print(f"[dim]waiting for another command to finish with {escape(str(path))}[/]")
                stack.enter_context(lock(path))
        except MemoryFileError as e:
            _fail(str(e))
        yield


def _load_memory(model, path: Path, create: bool, convert: bool = False):
    """The memory at `path` checked against the model; a memory in another dtype is refused with the
    command line's way out, or converted with --convert-memory."""
    from memllm import Memory, MemoryFileError, MemoryMismatchError

    if not path.exists():
        if create:
            console.print(f"[dim]{escape(str(path))} does not exist yet: starting a new memory[/]")
            return model.new_memory()
        _fail(f"memory file not found: {path} (create one with `memllm memory new`)")
    try:
        memory = Memory.load(path, device=model.device)
        if memory.pool.dtype != model.dtype:
            stored, runs = (str(t).removeprefix("torch.") for t in (memory.pool.dtype, model.dtype))
            if not convert:
                _fail(f"memory {path} is {stored} and the model runs in {runs}: "
                      f"pass --dtype {stored}, or --convert-memory to use it in {runs}")
            memory = memory.to(dtype=model.dtype)
        model.check_memory(memory)
        return memory
    except (MemoryFileError, MemoryMismatchError) as e:
        _fail(str(e))


def _refuse_existing(path: Path, force: bool) -> None:
    if path.exists() and not force:
        _fail(f"{path} exists (use --force to overwrite)")


def _save(memory, path: Path) -> None:
    from memllm import MemoryFileError

    try:
        memory.save(path)
    except (MemoryFileError, OSError) as e:
        _fail(str(e) if isinstance(e, MemoryFileError) else f"cannot save memory {path}: {e.strerror or e}")


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """Which version of a memory file is on disk (a save renames a new file into place)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _read_text(text: Optional[str], file: Optional[Path]) -> str:
    """The text to inject, from the argument, a file or stdin; binary input is refused."""
    if text is not None and file is not None:
        _fail("give the text or --file, not both")
    if file is not None:
        if not file.is_file():
            _fail(f"file not found: {file}")
        data, source = file.read_bytes(), str(file)
    elif text is not None:
        data, source = None, ""
    elif sys.stdin.isatty():
        _fail("no text: pass it as an argument, with --file, or on standard input")
    else:
        stdin = getattr(sys.stdin, "buffer", None)
        data, source = (stdin.read() if stdin is not None else sys.stdin.read().encode()), "standard input"
    if data is not None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            _fail(f"{source} is not UTF-8 text (invalid byte at offset {e.start}): inject text, not binary files")
        if "\x00" in text:
            _fail(f"{source} contains NUL bytes: it looks like a binary file, not text")
    return text


def _check_chunk_size(chunk_size: Optional[int]) -> None:
    if chunk_size is not None and chunk_size < 1:
        _fail(f"--chunk-size must be at least 1 token (got {chunk_size})", 2)


def _check_max_new_tokens(max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        _fail(f"--max-new-tokens must be at least 1 (got {max_new_tokens})", 2)


def _write_stream(pieces) -> None:
    """Answer text goes to stdout unformatted, as it arrives, so it can be piped."""
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _inject_with_progress(model, memory, text: str, chunk_size: Optional[int]) -> int:
    """model.inject with a progress bar; ValueError (text the model refuses) leaves the memory as it was."""
    with Progress(TextColumn("injecting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("inject", total=None)

        def report(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            n = model.inject(memory, text, chunk_size=chunk_size, progress=report)
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
    convert_memory: bool = ConvertOpt,
) -> None:
    """Write text into a memory (long text is injected chunk by chunk)."""
    _check_memory_path(memory, must_exist=not create)
    _check_chunk_size(chunk_size)
    content = _read_text(text, file)
    m = _load_model(model, dtype, device)
    with _locked(memory):
        mem = _load_memory(m, memory, create, convert_memory)
        try:
            n = _inject_with_progress(m, mem, content, chunk_size)
        except ValueError as e:
            _fail(str(e))
        _save(mem, memory)
    console.print(f"injected {n} chunk(s); memory has seen {mem.num_updates} updates -> {escape(str(memory))}")


@app.command()
def ask(
    question: str = typer.Argument(..., help="the question"),
    model: str = ModelOpt,
    memory: Path = MemoryOpt,
    max_new_tokens: int = typer.Option(32, help="longest answer, in tokens (within the model's positions)"),
    sample: bool = typer.Option(False, help="sample instead of greedy decoding"),
    temperature: float = typer.Option(0.7, help="sampling temperature"),
    chat: Optional[bool] = typer.Option(None, help="use the chat template (default: if the tokenizer has one)"),
    dtype: Optional[str] = DtypeOpt,
    device: Optional[str] = DeviceOpt,
    convert_memory: bool = ConvertOpt,
) -> None:
    """Answer a question from a memory (streamed)."""
    _check_memory_path(memory, must_exist=True)
    _check_max_new_tokens(max_new_tokens)
    m = _load_model(model, dtype, device)
    mem = _load_memory(m, memory, create=False, convert=convert_memory)
    kwargs = {"do_sample": True, "temperature": temperature} if sample else {}
    try:
        _write_stream(m.stream(mem, question, max_new_tokens=max_new_tokens, chat=chat, **kwargs))
    except ValueError as e:
        _fail(str(e))


@app.command()
def chat(
    model: str = ModelOpt,
    memory: Path = MemoryOpt,
    max_new_tokens: int = typer.Option(128, help="longest answer, in tokens (within the model's positions)"),
    dtype: Optional[str] = DtypeOpt,
    device: Optional[str] = DeviceOpt,
    convert_memory: bool = ConvertOpt,
) -> None:
    """Interactive: questions are answered from memory; `/inject TEXT` writes into it and saves it,
    `/quit` leaves. Every /inject is saved as it happens, so Ctrl-C loses nothing."""
    _check_memory_path(memory)
    _check_max_new_tokens(max_new_tokens)
    m = _load_model(model, dtype, device)
    where = escape(str(memory))

    def reload(create: bool = False):
        stamp = _stamp(memory)  # taken before reading: a save in between only makes it look older
        return _load_memory(m, memory, create=create, convert=convert_memory), stamp

    with _locked(memory):
        mem, stamp = reload(create=True)
    try:  # refuse an answer length that no question leaves room for now, not at the first question
        m.check_room(mem, 1, max_new_tokens, "question")
    except ValueError as e:
        _fail(str(e), 2)
    console.print("[dim]/inject TEXT writes into memory and saves it, /quit leaves[/]")
    injecting = False
    try:
        while True:
            try:
                line = input("> ").strip()
            except EOFError:
                line = "/quit"
            if not line:
                continue
            if line in ("/quit", "/exit", "/save"):
                if not memory.exists():  # a new memory nothing was injected into yet
                    with _locked(memory):
                        _save(mem, memory)
                    stamp = _stamp(memory)
                console.print(f"memory saved -> {where}")
                if line != "/save":
                    return
            elif line == "/inject" or line.startswith("/inject "):
                injecting = True
                with _locked(memory):
                    if _stamp(memory) != stamp:  # another command changed it: write into that version
                        mem, stamp = reload()
                    try:
                        n = _inject_with_progress(m, mem, line[len("/inject "):], None)
                    except ValueError as e:
                        n = 0
                        console.print(f"[bold red]error:[/] {escape(str(e))}")
                    if n:
                        _save(mem, memory)
                        stamp = _stamp(memory)
                injecting = False
                if n:
                    console.print(f"[dim]injected {n} chunk(s), saved -> {where}[/]")
            elif line.startswith("/"):
                console.print("[dim]commands: /inject TEXT, /quit (a line without / is a question)[/]")
            else:
                if _stamp(memory) not in (stamp, None):  # see what other commands wrote meanwhile
                    mem, stamp = reload()
                try:
                    _write_stream(m.stream(mem, line, max_new_tokens=max_new_tokens))
                except ValueError as e:
                    console.print(f"[bold red]error:[/] {escape(str(e))}")
    except KeyboardInterrupt:
        lost = "; the /inject in progress may not have been saved" if injecting else ""
        console.print(f"\ninterrupted: {where} holds every completed /inject{lost}")
        raise typer.Exit(130) from None


@memory_app.command("new")
def memory_new(
    path: Path = typer.Argument(..., help="where to write the memory"),
    model: str = ModelOpt,
    force: bool = typer.Option(False, help="overwrite an existing file"),
) -> None:
    """A fresh memory of a model (its trained initial pool)."""
    _check_memory_path(path)
    _refuse_existing(path, force)
    m = _load_model(model, None, None)
    with _locked(path):
        _refuse_existing(path, force)  # again: another command may have written it meanwhile
        _save(m.new_memory(), path)
    console.print(f"new memory -> {escape(str(path))}")


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
        table.add_row(k, escape(str(v)))
    out.print(table)


@memory_app.command("fork")
def memory_fork(
    source: Path = typer.Argument(..., help="memory to copy"),
    dest: Path = typer.Argument(..., help="new memory file"),
    force: bool = typer.Option(False, help="overwrite an existing file"),
) -> None:
    """Copy a memory (verified on the way)."""
    from memllm import Memory, MemoryFileError

    _check_memory_path(dest)
    _refuse_existing(dest, force)
    try:
        copy = Memory.load(source).fork()
    except MemoryFileError as e:
        _fail(str(e))
    with _locked(dest):
        _refuse_existing(dest, force)  # again: another command may have written it meanwhile
        _save(copy, dest)
    console.print(f"{escape(str(source))} -> {escape(str(dest))}")


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
    from memllm.core.config import LoraSettings

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
    recomputed, 32 tokens, a 512-token injection; options of `python -m memllm.bench.inference --help`).
    `memllm bench ltm [SIZES]`: long-term memory retrieval, dense scan vs index."""
    args = list(ctx.args)
    if args[:1] == ["ltm"]:
        from memllm.bench.ltm import main as ltm_main

        ltm_main(args[1:])
    else:
        from memllm.bench.inference import main as bench_main

        bench_main(args)


@app.command("eval", context_settings=PASS_THROUGH)
def evaluate(ctx: typer.Context) -> None:
    """Evaluations. `memllm eval retention [CHECKPOINT...] [OPTIONS]`: people at random positions among
    k in one memory, text before, strangers, held-out wordings, n distractors after; accuracies with 95%
    CIs (options: `memllm eval retention --help`). `memllm eval integrity [CHECKPOINT] [--updates N]`:
    many updates into one memory. No checkpoint: the shipped tiny models."""
    args = list(ctx.args)
    if args[:1] not in (["retention"], ["integrity"]):
        _fail("usage: memllm eval retention|integrity [CHECKPOINT...] [OPTIONS]")
    from memllm.eval.retention import main as evaluate_main

    evaluate_main(args)


@app.command(context_settings=PASS_THROUGH)
def train(ctx: typer.Context) -> None:
    """Train a memory model to use its memory (accelerate-native: run under `accelerate launch` for
    several processes). Options are those of `python -m memllm.train.trainer --help`."""
    from memllm.train.trainer import main as train_main

    train_main(ctx.args)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
