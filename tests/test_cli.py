"""The command line as a user drives it: init, memory new/info/fork, inject (arg, file, stdin), ask, chat;
commands whose options are a dataclass's fields (train, recipe tiny, bench)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

import memllm
from memllm.cli import app, dataclass_command, option_parameter
from memllm.core.tiny import random_model

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return memllm.save(random_model(seed=5), tmp_path_factory.mktemp("cli") / "model")


def run(*args: str, input: str | None = None):
    result = runner.invoke(app, list(args), input=input)
    return result


def test_inject_ask_info_fork(model_dir: Path, tmp_path: Path) -> None:
    mem = tmp_path / "a.mem"
    r = run("memory", "new", str(mem), "--model", str(model_dir))
    assert r.exit_code == 0, r.output
    r = run("inject", "The orchard on the hill grows forty kinds of pears.", "--model", str(model_dir), "--memory", str(mem))
    assert r.exit_code == 0, r.output
    doc = tmp_path / "doc.txt"
    doc.write_text("Pears ripen in late September. " * 4)
    assert run("inject", "--file", str(doc), "--model", str(model_dir), "--memory", str(mem)).exit_code == 0
    assert run("inject", "--model", str(model_dir), "--memory", str(mem), input="From stdin, a longer sentence.").exit_code == 0
    info = run("memory", "info", str(mem))
    assert info.exit_code == 0 and "updates" in info.output
    loaded = memllm.Memory.load(mem)
    assert loaded.num_updates >= 3
    r = run("ask", "What grows on the hill?", "--model", str(model_dir), "--memory", str(mem), "--max-new-tokens", "4")
    assert r.exit_code == 0, r.output
    m = memllm.load(model_dir)
    assert r.stdout.rstrip("\n") == m.ask(m.load_memory(mem), "What grows on the hill?", max_new_tokens=4)
    fork = tmp_path / "b.mem"
    assert run("memory", "fork", str(mem), str(fork)).exit_code == 0
    assert torch.equal(memllm.Memory.load(fork).pool, loaded.pool)
    assert run("memory", "fork", str(mem), str(fork)).exit_code == 1  # no silent overwrite


def test_chat_session_writes_and_saves(model_dir: Path, tmp_path: Path) -> None:
    mem = tmp_path / "chat.mem"
    r = run("chat", "--model", str(model_dir), "--memory", str(mem), "--max-new-tokens", "3",
            input="/inject The ferry leaves at six every morning.\nWhen does the ferry leave?\n/quit\n")
    assert r.exit_code == 0, r.output
    assert memllm.Memory.load(mem).num_updates >= 1


def test_errors_are_clear_and_memory_untouched(model_dir: Path, tmp_path: Path) -> None:
    mem = tmp_path / "a.mem"
    assert run("memory", "new", str(mem), "--model", str(model_dir)).exit_code == 0
    before = mem.read_bytes()
    other = memllm.save(random_model(seed=9), tmp_path / "other")
    r = run("inject", "Some text that is long enough to inject.", "--model", str(other), "--memory", str(mem))
    assert r.exit_code == 1 and "fingerprint" in r.output
    r = run("inject", "   ", "--model", str(model_dir), "--memory", str(mem))
    assert r.exit_code == 1 and "empty" in r.output
    assert mem.read_bytes() == before
    r = run("ask", "q?", "--model", str(tmp_path / "nope"), "--memory", str(mem))
    assert r.exit_code == 1 and "not found" in r.output


def test_init_from_base(tmp_path: Path) -> None:
    base = random_model()
    base.lm.save_pretrained(tmp_path / "base")
    base.tokenizer.save_pretrained(tmp_path / "base")
    r = run("init", str(tmp_path / "mm"), "--base", str(tmp_path / "base"), "--num-tokens", "8", "--num-blocks", "4")
    assert r.exit_code == 0, r.output
    assert memllm.load(tmp_path / "mm").config.num_memory_tokens == 32


def test_shipped_models_load_by_name_and_eval_retention_defaults_to_them(tmp_path: Path) -> None:
    for name, kind in (("tiny-memoryllm", "memoryllm"), ("tiny-mplus", "mplus")):
        model = memllm.load(name)
        assert model.config.kind == kind and model.tokenizer is not None and model.initialized
    r = run("eval", "retention", "--n-people", "2", "--counts", "0", "--plot", str(tmp_path / "r.png"))
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"acc_at_0", "floor", "mplus_gain_at_3x"} <= set(summary)
    assert (tmp_path / "r.png").stat().st_size > 0


def test_a_missing_shipped_model_is_a_clear_error(monkeypatch, tmp_path: Path) -> None:
    from memllm.core import checkpoint

    monkeypatch.setattr(checkpoint, "__file__", str(tmp_path / "checkpoint.py"))
    with pytest.raises(memllm.CheckpointError, match="tiny-mplus is not in this installation"):
        memllm.load("tiny-mplus")


def test_bench_passes_its_options_through_and_ends_with_json() -> None:
    r = run("bench", "--repeats", "1", "--hidden-size", "64", "--num-layers", "2", "--vocab-size", "256",
            "--num-blocks", "2", "--num-tokens", "16", "--context-tokens", "32")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["config"]["hidden_size"] == 64 and result["inject_512_s"] > 0


@dataclass
class Knobs:
    name: str = field(metadata={"help": "what to call the run"})
    steps: int = field(default=3, metadata={"help": "how many steps to take"})
    rate: float | None = field(default=None, metadata={"help": "a rate, or none at all"})
    tags: list[str] = field(default_factory=list, metadata={"help": "labels, one option per label"})
    fast: bool = field(default=True, metadata={"help": "skip the slow checks"})
    mode: str = field(default="plain", metadata={"help": "how to run", "choices": ("plain", "fancy")})
    bare: int = 7  # no metadata: an option without help


def knobs_app(seen: list) -> typer.Typer:
    knobs = typer.Typer()
    out = option_parameter("out", Path, Path("."), "where to")
    knobs.command()(dataclass_command(Knobs, lambda config, out: seen.append((config, out)), extra=[out]))
    return knobs


def test_a_dataclass_becomes_a_command_with_its_help_types_and_defaults() -> None:
    seen: list = []
    knobs = knobs_app(seen)
    shown = runner.invoke(knobs, ["--help"])
    assert shown.exit_code == 0, shown.output
    flat = " ".join(shown.output.replace("│", " ").split())  # the help as one line, without its box
    for text in ("what to call the run", "how many steps to take", "labels, one option per label", "--no-fast",
                 "--bare", "plain|fancy", "where to", "[default: 3]", "[default: plain]"):
        assert text in flat, text
    assert runner.invoke(knobs, ["--name", "a"]).exit_code == 0
    assert seen.pop() == (Knobs(name="a"), Path("."))  # every default kept
    r = runner.invoke(knobs, ["--name", "b", "--steps", "5", "--rate", "0.5", "--tags", "x", "--tags", "y",
                              "--no-fast", "--mode", "fancy", "--bare", "9", "--out", "there"])
    assert r.exit_code == 0, r.output
    config, out = seen.pop()
    assert (config, out) == (Knobs("b", 5, 0.5, ["x", "y"], False, "fancy", 9), Path("there"))
    assert type(config.mode) is str  # the plain value, not the Enum typer offers the choices as
    for bad in (["--steps", "5"], ["--name", "c", "--steps", "many"], ["--name", "c", "--mode", "odd"]):
        assert runner.invoke(knobs, bad).exit_code == 2, bad
    assert not seen


def test_train_and_recipe_tiny_build_their_configs_from_the_options(monkeypatch, tmp_path: Path) -> None:
    from memllm.recipes import tiny
    from memllm.train import trainer

    configs: list = []
    monkeypatch.setattr(trainer, "train", lambda config: configs.append(config) or {"steps": config.steps})
    r = run("train", "--model", "m", "--data", "a.txt", "--data", "b.txt", "--out", str(tmp_path), "--steps", "3",
            "--no-resume", "--mixed-precision", "bf16", "--dropout", "0")
    assert r.exit_code == 0, r.output
    assert configs == [trainer.TrainConfig(model="m", data=["a.txt", "b.txt"], out=str(tmp_path), steps=3,
                                           resume=False, mixed_precision="bf16", dropout=0.0)]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"steps": 3}
    assert run("train", "--model", "m", "--data", "a", "--out", "o", "--mixed-precision", "fp8").exit_code == 2
    assert run("train", "--data", "a", "--out", "o").exit_code == 2  # --model is required
    assert "--batch-size" in run("train", "--help").output

    recipes: list = []
    monkeypatch.setattr(tiny, "run", lambda recipe, out: recipes.append((recipe, out)))
    r = run("recipe", "tiny", "--out", str(tmp_path), "--kind", "memoryllm", "--stage1-steps", "5", "--lr", "0.01")
    assert r.exit_code == 0, r.output
    assert recipes == [(tiny.Recipe(kind="memoryllm", stage1_steps=5, lr=0.01), tmp_path)]
    assert run("recipe", "tiny", "--out", str(tmp_path), "--kind", "neither").exit_code == 2
    assert run("recipe", "tiny").exit_code == 2  # --out is required
    r = run("recipe", "tiny", "--out", str(tmp_path), "--mplus-phases", "10:40", "--mplus-phases", "5:80")
    assert r.exit_code == 0 and recipes[-1][0].mplus_phases == ["10:40", "5:80"], r.output
    for bad in ("12", "5:0", "a:b"):  # the config's own check, one line, before any training
        r = run("recipe", "tiny", "--out", str(tmp_path), "--mplus-phases", bad)
        assert r.exit_code == 2 and "--mplus-phases" in r.output and "Traceback" not in r.output, r.output
    assert len(recipes) == 2 and len(configs) == 1
