"""The command line under bad input, faults, Ctrl-C and concurrency (issue 10): every refusal is one
`error:` line with exit code 1-2 and leaves the stored memory byte-identical; concurrent injections all
apply; chat never loses an injection; `import memllm` and `memllm --help` stay light."""

from __future__ import annotations

import builtins
import errno
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import memllm
from memllm.cli import app

runner = CliRunner()
MODEL = "tiny-memoryllm"
TEXT = "The lighthouse keeper of Orlan paints the tower red every spring."
HEAVY = ("torch", "transformers", "faiss", "peft", "accelerate")


@pytest.fixture(scope="module")
def tiny():
    return memllm.load(MODEL)


@pytest.fixture(scope="module")
def template(tiny, tmp_path_factory) -> Path:
    return tiny.new_memory().save(tmp_path_factory.mktemp("template") / "template.mem")


@pytest.fixture
def mem(template: Path, tmp_path: Path) -> Path:
    """A fresh memory of the tiny model in this test's directory."""
    return Path(shutil.copy(template, tmp_path / "a.mem"))


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the command gets as far as loading a model: bad input is refused first."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr("memllm.core.checkpoint.load", load)


def run(*args: str, input: str | bytes | None = None):
    return runner.invoke(app, list(args), input=input)


def assert_one_line_error(result, *needles: str, codes: tuple[int, ...] = (1, 2)) -> str:
    assert result.exit_code in codes, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# ---- start-up ----------------------------------------------------------------------------------


def test_import_and_help_leave_the_heavy_libraries_unloaded() -> None:
    report = f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    plain = subprocess.run([sys.executable, "-c", f"import sys, memllm; {report}"],
                           capture_output=True, text=True, check=True)
    assert plain.stdout.strip() == "[]", plain.stdout
    assert "MemoryModel" in dir(memllm) and "Memory" in memllm.__all__
    help_code = ("import sys\nfrom memllm.cli import main\nsys.argv = ['memllm', '--help']\n"
                 f"try:\n    main()\nexcept SystemExit:\n    pass\n{report}")
    helped = subprocess.run([sys.executable, "-c", help_code], capture_output=True, text=True, check=True)
    assert "inject" in helped.stdout and helped.stdout.strip().endswith("[]"), helped.stdout


# ---- bad input: one line, exit 1-2, the memory untouched ---------------------------------------


def test_binary_text_is_refused_before_the_model_loads(mem: Path, tmp_path: Path, no_model_load) -> None:
    before = mem.read_bytes()
    binary = tmp_path / "image.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    assert_one_line_error(run("inject", "--file", str(binary), "-m", MODEL, "--memory", str(mem)), "not UTF-8")
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"text\x00with\x00NUL bytes")
    assert_one_line_error(run("inject", "--file", str(nul), "-m", MODEL, "--memory", str(mem)), "NUL")
    r = run("inject", "-m", MODEL, "--memory", str(mem), input=b"\xff\xfe\x00 not utf-8 \xc3")
    assert_one_line_error(r, "standard input is not UTF-8")
    assert mem.read_bytes() == before


@pytest.mark.parametrize("args, needle, code", [
    (["--dtype", "bogus"], "unknown --dtype 'bogus'", 2),
    (["--device", "bogus"], "unknown --device 'bogus'", 2),
    (["--chunk-size", "-5"], "--chunk-size must be at least 1", 2),
    (["--chunk-size", "0"], "--chunk-size must be at least 1", 2),
], ids=["dtype", "device", "chunk-negative", "chunk-zero"])
def test_bad_options_are_refused_before_the_model_loads(mem: Path, no_model_load, args, needle, code) -> None:
    before = mem.read_bytes()
    assert_one_line_error(run("inject", TEXT, "-m", MODEL, "--memory", str(mem), *args), needle, codes=(code,))
    assert mem.read_bytes() == before


def test_an_unavailable_device_is_refused(mem: Path, no_model_load) -> None:
    r = run("inject", TEXT, "-m", MODEL, "--memory", str(mem), "--device", "cuda:99")
    assert_one_line_error(r, "--device cuda:99 is not available", codes=(2,))


def test_chunk_size_beyond_the_positions_names_the_limit(tiny, mem: Path) -> None:
    before = mem.read_bytes()
    limit = tiny.lm.config.max_position_embeddings - tiny.config.num_tokens - 1
    r = run("inject", TEXT, "-m", MODEL, "--memory", str(mem), "--chunk-size", "5000")
    assert_one_line_error(r, "5000", str(limit))
    assert mem.read_bytes() == before


def test_memory_paths_that_cannot_be_a_memory(mem: Path, tmp_path: Path, no_model_load) -> None:
    before = mem.read_bytes()
    folder = tmp_path / "folder"
    folder.mkdir()
    assert_one_line_error(run("memory", "new", str(folder), "-m", MODEL), "is a directory")
    assert_one_line_error(run("memory", "new", str(folder), "-m", MODEL, "--force"), "is a directory")
    assert_one_line_error(run("memory", "fork", str(mem), str(folder), "--force"), "is a directory")
    assert_one_line_error(run("inject", TEXT, "-m", MODEL, "--memory", str(folder)), "is a directory")
    # a parent that is a file: refused before any injection (the model is never loaded)
    assert_one_line_error(run("inject", TEXT, "-m", MODEL, "--memory", str(mem / "x.mem")), "is not a directory")
    # a typo in the directory must not become a new memory (nor new directories)
    typo = tmp_path / "notes" / "a.mem"
    assert_one_line_error(run("inject", TEXT, "-m", MODEL, "--memory", str(typo)),
                          f"directory {typo.parent} does not exist")
    assert_one_line_error(run("memory", "new", str(typo), "-m", MODEL), "does not exist")
    assert_one_line_error(run("memory", "fork", str(mem), str(typo)), "does not exist")
    assert not typo.parent.exists() and folder.is_dir() and not any(folder.iterdir())
    assert mem.read_bytes() == before


def test_a_memory_in_another_dtype_gets_the_command_line_way_out(mem: Path) -> None:
    before = mem.read_bytes()
    r = run("ask", "Who paints the tower?", "-m", MODEL, "--memory", str(mem), "--dtype", "bfloat16")
    line = assert_one_line_error(r, "float32", "bfloat16", "--dtype float32", "--convert-memory")
    assert "memory.to" not in line
    r = run("ask", "Who paints the tower?", "-m", MODEL, "--memory", str(mem), "--dtype", "bfloat16",
            "--convert-memory", "--max-new-tokens", "2")
    assert r.exit_code == 0, r.output
    assert mem.read_bytes() == before


def test_limits_are_refused_quickly_with_the_limit_named(tiny, mem: Path) -> None:
    before = mem.read_bytes()
    positions = str(tiny.lm.config.max_position_embeddings)
    start = time.perf_counter()
    r = run("ask", "Who paints the tower?", "-m", MODEL, "--memory", str(mem), "--max-new-tokens", "1000000000")
    assert_one_line_error(r, "1000000000", positions)
    r = run("ask", "Who paints the tower? " * 4600, "-m", MODEL, "--memory", str(mem))  # 100k characters
    assert_one_line_error(r, "too long", positions)
    r = run("chat", "-m", MODEL, "--memory", str(mem), "--max-new-tokens", "1000000000", input="/quit\n")
    assert_one_line_error(r, "1000000000", positions)
    assert_one_line_error(run("ask", "Who?", "-m", MODEL, "--memory", str(mem), "--max-new-tokens", "0"),
                          "at least 1")
    assert time.perf_counter() - start < 30
    assert mem.read_bytes() == before


@pytest.mark.parametrize("why, fault", [
    ("No space left on device", OSError(errno.ENOSPC, "No space left on device")),
    ("Read-only file system", OSError(errno.EROFS, "Read-only file system")),
], ids=["disk-full", "read-only-fs"])
def test_a_failed_save_is_one_line_and_keeps_the_old_memory(mem: Path, monkeypatch, why, fault) -> None:
    before = mem.read_bytes()

    def failing_write(*args, **kwargs):
        raise fault

    monkeypatch.setattr("memllm.core.memory.save_file", failing_write)
    assert_one_line_error(run("inject", TEXT, "-m", MODEL, "--memory", str(mem)), why)
    assert mem.read_bytes() == before


def test_a_read_only_memory_is_refused(mem: Path) -> None:
    before = mem.read_bytes()
    mem.chmod(0o444)
    assert_one_line_error(run("inject", TEXT, "-m", MODEL, "--memory", str(mem)), "read-only")
    assert mem.read_bytes() == before and (mem.stat().st_mode & 0o777) == 0o444


# ---- chat keeps the session --------------------------------------------------------------------


def scripted_input(monkeypatch, steps) -> None:
    """`input()` answers with each step: a line, or a callable run at that prompt (which may raise)."""
    steps = iter(steps)

    def fake_input(prompt: str = "") -> str:
        step = next(steps)
        return step() if callable(step) else step

    monkeypatch.setattr(builtins, "input", fake_input)


def test_chat_saves_every_inject_and_ctrl_c_loses_nothing(mem: Path, monkeypatch) -> None:
    seen = []

    def ctrl_c() -> str:
        seen.append(memllm.Memory.load(mem).num_updates)  # on disk before anything ends the session
        raise KeyboardInterrupt

    scripted_input(monkeypatch, [f"/inject {TEXT}", "/inject The ferry to Orlan leaves at six every morning.",
                                 ctrl_c])
    r = run("chat", "-m", MODEL, "--memory", str(mem), "--max-new-tokens", "3")
    assert r.exit_code == 130 and "Traceback" not in r.output, r.output
    assert seen == [2] and memllm.Memory.load(mem).num_updates == 2
    assert "interrupted" in r.output and str(mem) in r.output.replace("\n", "")


def test_chat_writes_into_what_other_commands_saved_meanwhile(tiny, mem: Path, monkeypatch) -> None:
    def another_command() -> str:
        other = tiny.load_memory(str(mem))
        tiny.inject(other, "Another process wrote this sentence into the same memory meanwhile.")
        other.save(mem)
        return "Who paints the tower?"

    scripted_input(monkeypatch, [f"/inject {TEXT}", another_command, f"/inject {TEXT}", "/quit"])
    r = run("chat", "-m", MODEL, "--memory", str(mem), "--max-new-tokens", "3")
    assert r.exit_code == 0, r.output
    assert memllm.Memory.load(mem).num_updates == 3  # the other command's update was not overwritten


# ---- concurrent injections ---------------------------------------------------------------------

WORKER = """
import sys, time, pathlib
import memllm.core.model  # torch and transformers imported before the start line, so the injections race
from memllm.cli import app
folder, name, rounds = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
for r in range(rounds):
    (folder / f"ready-{r}-{name}").touch()
    while not (folder / f"go-{r}").exists():
        time.sleep(0.002)
    try:
        app(["inject", sys.argv[4], "-m", "tiny-memoryllm", "--memory", str(folder / f"round-{r}.mem")])
    except SystemExit as e:
        print(f"exit {r} {e.code}", flush=True)
"""


def concurrent_injections(folder: Path, workers: int, rounds: int) -> None:
    """`workers` processes run `memllm inject` into one new memory per round, started together."""
    env = {**os.environ, "COLUMNS": "1000", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(folder), str(w), str(rounds), TEXT],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for w in range(workers)]
    try:
        for r in range(rounds):
            deadline = time.monotonic() + 300
            while len(list(folder.glob(f"ready-{r}-*"))) < workers:
                assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a worker died"
                time.sleep(0.01)
            (folder / f"go-{r}").touch()
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for stdout, stderr in results:
        assert stdout.split() == [w for r in range(rounds) for w in ("exit", str(r), "0")], stderr
    for r in range(rounds):
        assert memllm.Memory.load(folder / f"round-{r}.mem").num_updates == workers, f"round {r}"
        reported = sorted(int(n) for _, err in results
                          for n in re.findall(rf"memory has seen (\d+) updates -> \S*round-{r}\.mem", err))
        assert reported == list(range(1, workers + 1)), f"round {r}: {reported}"


def test_four_concurrent_injections_all_apply(tmp_path: Path) -> None:
    concurrent_injections(tmp_path, workers=4, rounds=2)


@pytest.mark.slow
def test_four_concurrent_injections_all_apply_in_ten_rounds(tmp_path: Path) -> None:
    concurrent_injections(tmp_path, workers=4, rounds=10)
