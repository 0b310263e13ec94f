"""`memllm` on the command line: inject, ask, chat, memory {new,info,fork,forget}, init, demo, train, recipe tiny,
eval {retention,integrity,forgetting}, bench [official, ltm, serve, train-step], serve [keys {create,list,revoke}].

A model is a checkpoint directory or hub id (`--model`); a memory is a file (`--memory`). Commands
that change a memory hold its lock from load to save and write it back atomically, so concurrent
commands all apply and an interrupted one leaves the old version. torch and transformers are imported
inside the commands, and the commands whose options come from modules that import torch (train,
recipe tiny, eval, bench) are built only when they run, so `memllm --help` starts in a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import sys
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Optional

import click
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
from typer.core import TyperGroup


class _DeferredGroup(TyperGroup):
    """A group some of whose commands are built only when they run (or their --help is asked for):
    `train`, `recipe tiny`, `eval` and `bench` take their options and defaults from modules that
    import torch, and `memllm --help` must not. Such a command is a stub (`_defer`) that lists it;
    resolving its name swaps in what its builder makes."""

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name, command, rest = super().resolve_command(ctx, args)
        build = getattr(getattr(command, "callback", None), "build", None)
        if build is not None:
            command = typer.main.get_command(build())
        return name, command, rest


def _defer(parent: typer.Typer, name: str, summary: str, build: Callable[[], typer.Typer]) -> None:
    """List `name` in `parent` (a `_DeferredGroup`) with `summary`; `build` makes the real command(s)."""

    def stub() -> None:
        """Replaced by what `build` makes before it could run."""

    stub.build = build  # type: ignore[attr-defined]
    parent.command(name, help=summary)(stub)


app = typer.Typer(help="Self-updatable language models: write text into a model's memory, ask about it later.",
                  no_args_is_help=True, pretty_exceptions_enable=False, cls=_DeferredGroup)
memory_app = typer.Typer(help="Create, inspect, fork memories and forget updates.", no_args_is_help=True)
app.add_typer(memory_app, name="memory")
recipe_app = typer.Typer(help="Recipes that produce the models memllm ships.", no_args_is_help=True,
                         cls=_DeferredGroup)
app.add_typer(recipe_app, name="recipe")

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
    explain: bool = typer.Option(False, "--explain", help="also show which updates the answer attended to"),
) -> None:
    """Answer a question from a memory (streamed; with --explain, whole, then its sources)."""
    _check_memory_path(memory, must_exist=True)
    _check_max_new_tokens(max_new_tokens)
    m = _load_model(model, dtype, device)
    mem = _load_memory(m, memory, create=False, convert=convert_memory)
    kwargs = {"do_sample": True, "temperature": temperature} if sample else {}
    try:
        if explain:
            _write_explained(m, mem, question, max_new_tokens, chat, kwargs)
        else:
            _write_stream(m.stream(mem, question, max_new_tokens=max_new_tokens, chat=chat, **kwargs))
    except ValueError as e:
        _fail(str(e))


def _write_explained(model, memory, question: str, max_new_tokens: int, chat: Optional[bool], kwargs: dict) -> None:
    """The answer on stdout, then the updates whose memory rows its tokens attended to most."""
    from memllm.core.attribution import explain

    result = explain(model, memory, question, max_new_tokens=max_new_tokens, chat=chat, **kwargs)
    sys.stdout.write(result.answer + "\n")
    table = Table("source update", "share of attention to memory",
                  title=f"{result.memory_mass:.1%} of the answer's attention went to memory rows "
                        f"({result.retrieved_share:.1%} of that to retrieved long-term rows)", title_justify="left")
    for update, share in result.top(5):
        table.add_row("initial memory (0)" if update == 0 else str(update), f"{share:.3f}")
    out.print(table)


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
def memory_info(
    path: Path = typer.Argument(..., help="memory file"),
    plot: Optional[Path] = typer.Option(None, help="also draw each update's surviving rows by its age into this PNG"),
) -> None:
    """Sizes, updates, dtype and the model fingerprint of a memory file, and how much of each update's
    rows survive in short-term and long-term memory."""
    from memllm import Memory, MemoryFileError
    from memllm.eval.forgetting import plot_survival, survival_bar

    try:
        memory = Memory.load(path)
    except MemoryFileError as e:
        _fail(str(e))
    table = Table(show_header=False)
    for k, v in memory.info().items():
        table.add_row(k, escape(str(v)))
    out.print(table)
    table = Table("update", "age", "STM rows", "LTM rows", "share in STM", "in LTM", "held", "forgotten",
                  title="rows per update that wrote them (0: the initial memory, -1: unknown); held: the share of its "
                        "rows still in short-term (\u2588) and long-term (\u2592) memory", title_justify="left")
    table.columns[6].no_wrap = True

    def share(x: Optional[float]) -> str:
        return "" if x is None else f"{x:.1%}"

    provenance = memory.provenance()
    for row in provenance:
        age = str(memory.num_updates - row["update"]) if row["update"] >= 1 else ""
        bar = survival_bar(row["stm_share"], row["ltm_share"], width=10) if row["written"] else ""
        table.add_row(str(row["update"]), age, str(row["stm_rows"]), str(row["ltm_rows"]), share(row["stm_share"]),
                      share(row["ltm_share"]), bar, "yes" if row["forgotten"] else "")
    out.print(table)
    if plot is not None:
        plot_survival(provenance, memory.num_updates, plot)
        console.print(f"plot -> {escape(str(plot))}")


@memory_app.command("forget")
def memory_forget(
    path: Path = typer.Argument(..., help="memory file"),
    update: list[int] = typer.Option(..., "--update", "-u", help="update id to forget (repeat for several)"),
    model: str = ModelOpt,
) -> None:
    """Remove the rows that updates wrote, from short-term and long-term memory (freed short-term slots
    take the model's initial pool rows; see docs/memory.md), and mark the updates forgotten."""
    from memllm.core.memory import Memory, MemoryFileError, MemoryMismatchError, UnknownUpdateError

    _check_memory_path(path, must_exist=True)
    m = _load_model(model, None, None)
    with _locked(path):
        try:
            mem = Memory.load(path, device=m.device)  # in the dtype it is held in: forgetting converts nothing
            if mem.fingerprint != m.fingerprint:
                raise MemoryMismatchError(f"memory {path} was written by another model (fingerprint "
                                          f"{mem.fingerprint}, the model's is {m.fingerprint})")
            removed = mem.forget(update, m.initial_pool)
        except (MemoryFileError, UnknownUpdateError, MemoryMismatchError) as e:
            _fail(str(e))
        _save(mem, path)
    console.print(f"forgot update(s) {', '.join(map(str, sorted(set(update))))}: {removed['stm_rows']} short-term "
                  f"and {removed['ltm_rows']} long-term rows removed -> {escape(str(path))}", highlight=False)


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


# ---- commands whose options come from modules that import torch -----------------------------------


def dataclass_command(
    cls: type,
    run: Callable[..., object],
    extra: Sequence[inspect.Parameter] = (),
    choices: Mapping[str, Sequence[str]] | None = None,
    doc: str | None = None,
) -> Callable[..., object]:
    """A function for `Typer.command()` (or `.callback()`) whose options are the fields of the dataclass
    `cls`, so a config and its command line cannot drift apart: `--kebab-case` per field, its type and
    default (a field without one is a required option, a list one given once per value), help from
    `field.metadata["help"]`, allowed values from `choices` or `field.metadata["choices"]`; then the
    `extra` parameters. It calls `run(cls(**fields), **extras)`. Typer reads the function's
    `__signature__`, which is built here."""
    hints = typing.get_type_hints(cls)
    params: list[inspect.Parameter] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = ...
        annotation = hints[f.name]
        allowed = (choices or {}).get(f.name) or f.metadata.get("choices")
        if allowed:  # typer offers a fixed set of values as an Enum; run() gets the plain value
            annotation = enum.Enum(f.name, {str(c): str(c) for c in allowed}, type=str)
            default = default if default is ... else annotation(default)
        params.append(option_parameter(f.name, annotation, default, f.metadata.get("help", "")))
    extra_names = [p.name for p in extra]

    def command(**values: Any) -> object:
        extras = {name: values.pop(name) for name in extra_names}
        fields = {k: v.value if isinstance(v, enum.Enum) else v for k, v in values.items()}
        try:
            config = cls(**fields)
        except ValueError as e:  # the config's own checks: one line naming the option
            _fail(str(e), 2)
        return run(config, **extras)

    command.__signature__ = inspect.Signature([*params, *extra])  # type: ignore[attr-defined]
    command.__doc__ = doc if doc is not None else inspect.getdoc(cls)
    command.__name__ = command.__qualname__ = cls.__name__.lower()
    return command


def option_parameter(name: str, annotation: Any, default: Any, help: str = "") -> inspect.Parameter:
    """A keyword parameter that typer reads as the option `--kebab-name` (`--name/--no-name` for a bool)."""
    flag = "--" + name.replace("_", "-")
    if annotation is bool:
        flag += "/--no-" + name.replace("_", "-")
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=typer.Option(default, flag, help=help))


def _echo_json(result: dict) -> None:
    """The last line of a measuring command: every number, as one JSON object."""
    sys.stdout.flush()
    typer.echo(json.dumps(result))


def _train_app() -> typer.Typer:
    """`memllm train`: `TrainConfig`'s fields as options."""
    from memllm.train.trainer import TrainConfig, train

    def run(config: TrainConfig) -> None:
        _echo_json(train(config))

    built = typer.Typer(add_completion=False)
    built.command()(dataclass_command(
        TrainConfig, run,
        doc="Train a memory model to use its memory: the options are the fields of "
            "`memllm.train.trainer.TrainConfig`. Run under `accelerate launch -m memllm train ...` for several "
            "processes. Prints the result as JSON."))
    return built


def _recipe_tiny_app() -> typer.Typer:
    """`memllm recipe tiny`: `Recipe`'s fields as options, and --out."""
    from memllm.recipes.tiny import Recipe, run

    built = typer.Typer(add_completion=False)
    built.command()(dataclass_command(
        Recipe, run, choices={"kind": ("memoryllm", "mplus", "both")},
        extra=[option_parameter("out", Path, ..., "output directory (kind both: OUT/memoryllm and OUT/mplus)")],
        doc="Train the tiny MemoryLLM and M+ models from scratch on CPU (seeded; the defaults are the shipped "
            "recipe): kind memoryllm, stages 1-2; mplus, stage 3 from --init; both, the shipped pair."))
    return built


def _ints(text: str) -> tuple[int, ...]:
    """`--counts 0,1,2` and friends."""
    try:
        return tuple(int(c) for c in text.split(",") if c.strip())
    except ValueError:
        _fail(f"not a comma-separated list of integers: {text!r}", 2)


def _eval_app() -> typer.Typer:
    """`memllm eval retention|integrity|forgetting`, defaults from `memllm.eval.retention`."""
    from memllm.eval.retention import BEFORE, DEFAULT_COUNTS, ONE_THEN, PANELS, SHIPPED

    def csv(values: Sequence) -> str:
        return ",".join(map(str, values))

    built = typer.Typer(help="Evaluations of memory models on held-out people of a synthetic world.",
                        no_args_is_help=True, add_completion=False)

    @built.command("retention")
    def retention(
        checkpoints: list[str] = typer.Argument(list(SHIPPED), help="checkpoint dirs or shipped names (named by "
                                                "their config kind); default: the shipped tiny MemoryLLM and M+"),
        n_people: int = typer.Option(50, help="held-out people asked per cell"),
        counts: str = typer.Option(csv(DEFAULT_COUNTS),
                                   help="single panel: distractor counts (3 N / K is always added)"),
        ks: str = typer.Option("", help="people per memory (default: 1, 4, N/K, and 4 N/K for M+)"),
        before: str = typer.Option(csv(BEFORE), help="distractor texts before the person"),
        one_then: int = typer.Option(ONE_THEN, help="M+: biographies after the person asked"),
        panels: str = typer.Option(csv(PANELS), help=f"which panels, of {csv(PANELS)}"),
        seed: int = typer.Option(0, help="held-out people, text draws and memory drops"),
        world_seed: int = typer.Option(0, help="the world the models were trained on, when recipe.json does not say"),
        plot: str = typer.Option("retention.png", help="where to write the figure"),
        threads: int = typer.Option(2, help="torch threads"),
        dtype: Optional[str] = DtypeOpt,
    ) -> None:
        """People at random positions among k in one memory, text before, strangers, held-out wordings, n
        distractors after: accuracies with 95% CIs, a figure, and every number as JSON on the last line."""
        from memllm.core.checkpoint import CheckpointError
        from memllm.eval.retention import evaluate_retention

        chosen = tuple(p.strip() for p in panels.split(",") if p.strip())
        if unknown := set(chosen) - set(PANELS):
            _fail(f"unknown panel(s) {', '.join(sorted(unknown))}; choose from {', '.join(PANELS)}", 2)
        if n_people < 1:
            _fail("--n-people must be at least 1", 2)
        _check_dtype_device(dtype, None)
        try:
            result = evaluate_retention(checkpoints, n_people=n_people, distractor_counts=_ints(counts),
                                        ks=_ints(ks) or None, befores=_ints(before), one_then=one_then, panels=chosen,
                                        seed=seed, world_seed=world_seed, plot=plot, threads=threads, dtype=dtype)
        except (CheckpointError, OSError) as e:
            _fail(str(e))
        _echo_json(result["summary"])

    @built.command("integrity")
    def integrity(
        checkpoint: str = typer.Argument(SHIPPED[0], help="checkpoint dir or shipped name"),
        updates: int = typer.Option(100_000, help="memory updates into the one memory"),
        points: int = typer.Option(20, help="evenly spaced checkpoints (plus 0 and powers of 10)"),
        recall_people: int = typer.Option(50, help="held-out people asked at each checkpoint"),
        seed: int = typer.Option(0),
        world_seed: int = typer.Option(0, help="the world the model was trained on, when recipe.json does not say"),
        plot: str = typer.Option("integrity.png", help="where to write the figure (empty: none)"),
        threads: int = typer.Option(2, help="torch threads"),
    ) -> None:
        """Many updates into one memory: non-finite values, pool row norms, recall start vs end. An M+
        memory keeps every dropped row in long-term memory (K rows per layer per update)."""
        from memllm.core.checkpoint import CheckpointError
        from memllm.eval.integrity import evaluate_integrity

        if updates < 1 or recall_people < 1:
            _fail("--updates and --recall-people must be at least 1", 2)
        try:
            result = evaluate_integrity(checkpoint, updates=updates, points=points, recall_people=recall_people,
                                        seed=seed, world_seed=world_seed, plot=plot, threads=threads)
        except (CheckpointError, OSError) as e:
            _fail(str(e))
        _echo_json({k: v for k, v in result.items() if k != "checkpoints"} | {"plot": plot or None})

    @built.command("forgetting")
    def forgetting(
        checkpoints: list[str] = typer.Argument(list(SHIPPED), help="checkpoint dirs or shipped names"),
        n_people: int = typer.Option(50, help="memories, one forgotten person each"),
        seed: int = typer.Option(0, help="held-out people, text draws and memory drops"),
        world_seed: int = typer.Option(0, help="the world the models were trained on, when recipe.json does not say"),
        threads: int = typer.Option(2, help="torch threads"),
    ) -> None:
        """Forget one person's update (MemoryLLM: 4 people per memory; M+: 32, the person in long-term memory):
        its accuracy vs the no-memory floor, the other three's kept, attribution top-1, int8/bfloat16 files;
        95% intervals, JSON per model on the last line."""
        from memllm.core.checkpoint import CheckpointError
        from memllm.eval.forgetting import evaluate_forgetting

        if n_people < 1:
            _fail("--n-people must be at least 1", 2)
        try:
            result = evaluate_forgetting(checkpoints, n_people=n_people, seed=seed, world_seed=world_seed,
                                         threads=threads)
        except (CheckpointError, OSError) as e:
            _fail(str(e))
        _echo_json(result["summary"])

    return built


def _bench_app() -> typer.Typer:
    """`memllm bench` (`BenchConfig`'s fields as options), `bench ltm`, `bench train-step`."""
    from memllm.bench.inference import BenchConfig, bench_inference
    from memllm.bench.ltm import SIZES

    def run(config: BenchConfig, ctx: typer.Context, repeats: int, threads: int, seed: int, markdown: bool,
            inject_rss_chars: int) -> None:
        if ctx.invoked_subcommand is None:
            if repeats < 1:
                _fail("--repeats must be at least 1", 2)
            _echo_json(bench_inference(repeats, threads, seed, config, inject_rss_chars, markdown))

    built = typer.Typer(add_completion=False)
    built.callback(invoke_without_command=True)(dataclass_command(BenchConfig, run, extra=[
        inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context),
        option_parameter("repeats", int, 5, "timed rounds (medians; one warm-up round before)"),
        option_parameter("threads", int, 2, "torch threads"),
        option_parameter("seed", int, 0, "random weights and inputs"),
        option_parameter("markdown", bool, False, "also print the table as Markdown"),
        option_parameter("inject_rss_chars", int, 200_000,
                         "characters injected into tiny-memoryllm for the peak-RSS line (0: skip)"),
    ], doc="Benchmarks. Without a command: core speed on the configuration the authors' code was timed on "
           "(time to first token with the memory prefix reused vs recomputed, 32 tokens, a 512-token injection; the "
           "sizes are the options) and the peak RSS of a long injection; every number as JSON on the last line."))

    @built.command("ltm")
    def ltm(sizes: list[int] = typer.Argument(list(SIZES), help="long-term vectors per layer")) -> None:
        """Long-term memory retrieval, dense scan vs index, one layer per size; JSON on the last line."""
        from memllm.bench.ltm import bench_ltm

        _echo_json(bench_ltm(tuple(sizes)))

    @built.command("serve")
    def serve_bench(
        model: str = typer.Option("tiny-memoryllm", help="checkpoint directory or shipped name"),
        clients: str = typer.Option("1,4,16,64", help="concurrent clients per cell"),
        memories: str = typer.Option("1,8,64", help="memories the clients' requests spread over"),
        requests: int = typer.Option(4, help="requests per client per cell (injections: half)"),
        max_new_tokens: int = typer.Option(4, help="tokens per answer"),
        threads: int = typer.Option(1, help="torch threads of the server process"),
    ) -> None:
        """The server on loopback (its own process): asks/s and p50/p95 latency of asks and injections, batched
        against one question at a time, per (clients, memories) cell; JSON on the last line with
        `batched_speedup_16_clients_8_memories`."""
        from memllm.bench.serve import run_bench_serve

        result = run_bench_serve(model, clients=_ints(clients), memories=_ints(memories), requests_per_client=requests,
                                 max_new_tokens=max_new_tokens, threads=threads, report=console.print)
        _echo_json(result)

    @built.command("official")
    def official(
        script: str = typer.Option(..., help="the authors' timing script: the oracle folder's bench_official.py"),
        official_dir: str = typer.Option(..., envvar="OFFICIAL_MODELING_DIR",
                                         help="their modeling files, as the oracle's make_golden.py extracts them"),
        python: str = typer.Option("python3", envvar="ORACLE_PY",
                                   help="Python of the environment their code runs in (transformers 4.48)"),
        family: str = typer.Option("memoryllm", help="memoryllm, or mplus (exact retrieval, their timed M+)"),
        rounds: int = typer.Option(3, help="rounds: their script, then memllm's bench, each round"),
        runs: int = typer.Option(3, help="timed runs per round on each side (medians)"),
        threads: int = typer.Option(2, help="torch threads on both sides"),
    ) -> None:
        """memllm beside the authors' code (their own environment, a subprocess), alternating round after
        round on their timed configuration; JSON on the last line: both medians, the ratios
        (`generate_speedup_vs_official`, `inject_speedup_vs_official`) and the load average."""
        from memllm.bench.official import side_by_side

        try:
            result = side_by_side(python, script, official_dir, family, rounds, threads, runs, report=console.print)
        except ValueError as e:
            _fail(str(e), 2)
        except RuntimeError as e:
            _fail(str(e))
        _echo_json(result)

    @built.command("train-step")
    def train_step() -> None:
        """One memory-training step (inject with gradient, predict from memory, backward) against a plain LM
        step on the same tokens; JSON."""
        from memllm.bench.train_step import bench_train_step

        _echo_json(bench_train_step())

    return built


_defer(app, "train", "Train a memory model to use its memory (accelerate-native: `accelerate launch -m memllm "
       "train ...` for several processes); options: `memllm train --help`.", _train_app)
_defer(app, "eval", "Evaluations: `retention` (people among k in one memory, text before, strangers, held-out "
       "wordings, distractors after; 95% CIs), `integrity` (many updates into one memory) and `forgetting` "
       "(forgetting an update, attribution, compact files). Default: the shipped tiny models.", _eval_app)
_defer(app, "bench", "Benchmarks: core speed (`memllm bench`), beside the authors' code (`memllm bench official`), "
       "long-term memory retrieval (`memllm bench ltm`), a training step (`memllm bench train-step`).", _bench_app)
_defer(recipe_app, "tiny", "Train the tiny MemoryLLM and M+ models that memllm ships, from scratch on CPU.",
       _recipe_tiny_app)


# ---- memllm serve ---------------------------------------------------------------------------------

serve_app = typer.Typer(help="Serve memories over an OpenAI-compatible HTTP API (docs/serve.md); `serve keys` "
                             "manages API keys.", invoke_without_command=True)
app.add_typer(serve_app, name="serve")
keys_app = typer.Typer(help="API keys of a store: create, list, revoke.", no_args_is_help=True)
serve_app.add_typer(keys_app, name="keys")
StoreOpt = typer.Option(..., "--store", help="where memories live: a directory or an fsspec URL (s3://...)")
CatalogueOpt = typer.Option(None, help="SQLAlchemy URL of the catalogue (default: SQLite in the store directory)")


@serve_app.callback()
def serve(
    ctx: typer.Context,
    model: str = typer.Option("tiny-memoryllm", "--model", "-m", help="checkpoint directory or shipped name"),
    store: Optional[str] = typer.Option(None, help="where memories live: a directory or an fsspec URL"),
    catalogue: Optional[str] = CatalogueOpt,
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000),
    max_batch: int = typer.Option(64, help="queued questions answered together (1: one at a time)"),
    retention: int = typer.Option(20, help="versions per memory whose files are kept"),
    keep_texts: bool = typer.Option(True, "--keep-texts/--no-keep-texts", help="keep injected texts in the history"),
    threads: Optional[int] = typer.Option(None, help="torch threads"),
    cache_bytes: int = typer.Option(1 << 30, help="bytes of memories each worker keeps loaded (least recently "
                                                  "used out first)"),
    prefix_cache_bytes: int = typer.Option(1 << 30, help="bytes of those memories' key/value prefixes each model "
                                                         "keeps ready (least recently used out first)"),
    ray: bool = typer.Option(False, "--ray", help="run on Ray Serve (RAY_ADDRESS's cluster, else a local one), "
                                                 "requests routed to replicas by memory; needs the `ray` extra"),
    replicas: int = typer.Option(1, help="with --ray: replicas of the model (each with its own worker)"),
) -> None:
    """Start the server: `memllm serve --store DIR` (create a key first: `memllm serve keys create`)."""
    if ctx.invoked_subcommand is not None:
        return
    if store is None:
        _fail("give --store DIR (or an fsspec URL): where the memories live", 2)
    if min(max_batch, retention, replicas, cache_bytes, prefix_cache_bytes) < 1:
        _fail("--max-batch, --retention, --replicas, --cache-bytes and --prefix-cache-bytes must be at least 1", 2)
    if replicas > 1 and not ray:
        _fail("--replicas needs --ray (one process serves one replica)", 2)
    from memllm.core.checkpoint import CheckpointError
    from memllm.serve.run import ServeConfig, serve as run
    from memllm.serve.store import StoreError

    config = ServeConfig(store, model, catalogue, max_batch=max_batch, retention=retention, keep_texts=keep_texts,
                         threads=threads, cache_bytes=cache_bytes, prefix_cache_bytes=prefix_cache_bytes)
    where = f"{replicas} Ray Serve replica(s)" if ray else "one process"
    console.print(f"memllm serve: {model} on http://{host}:{port}/v1 ({where}), memories in {store}", highlight=False)
    try:
        if ray:
            try:
                from memllm.serve.ray_serve import serve_ray
            except ImportError as e:
                _fail(f"--ray needs Ray Serve: pip install -e \".[ray]\" ({e})")
            serve_ray(config, replicas, host=host, port=port)
        else:
            run(config, host=host, port=port)
    except (CheckpointError, StoreError, OSError) as e:
        _fail(str(e))


def _store(store: str, catalogue: Optional[str]):
    from memllm.serve.store import Store

    return Store(store, catalogue)


@keys_app.command("create")
def keys_create(store: str = StoreOpt, catalogue: Optional[str] = CatalogueOpt,
                tenant: Optional[str] = typer.Option(None, help="the tenant the key belongs to"),
                admin: bool = typer.Option(False, help="an admin key: manages keys, sees no memories")) -> None:
    """Make an API key and print it (once: only its hash is stored)."""
    from memllm.serve.store import StoreError

    if admin == (tenant is not None):
        _fail("give --tenant NAME for a tenant's key, or --admin", 2)
    try:
        typer.echo(_store(store, catalogue).create_key(None if admin else tenant))
    except StoreError as e:
        _fail(str(e))


@keys_app.command("list")
def keys_list(store: str = StoreOpt, catalogue: Optional[str] = CatalogueOpt) -> None:
    """Keys by id, tenant and state (secrets are not stored)."""
    table = Table("key id", "tenant", "created", "revoked")
    for k in _store(store, catalogue).list_keys():
        table.add_row(k["id"], k["tenant"] or "(admin)", f"{k['created']:.0f}", "yes" if k["revoked"] else "")
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="key id (key_...)"), store: str = StoreOpt,
                catalogue: Optional[str] = CatalogueOpt) -> None:
    """Revoke a key: requests with it are refused from now on."""
    from memllm.serve.store import StoreError

    try:
        _store(store, catalogue).revoke_key(key_id)
    except StoreError as e:
        _fail(str(e))
    console.print(f"revoked {key_id}", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
