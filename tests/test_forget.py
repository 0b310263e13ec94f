"""Surgical forgetting: exactly an update's rows leave short-term memory (refilled by the documented rule)
and long-term memory (rows, cache, index); everything else stays bit-identical. And the CLI commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import memllm
from memllm.cli import app
from memllm.core.inject import RandomDrop
from memllm.core.memory import Memory, UnknownUpdateError
from memllm.core.tiny import random_model
from memllm.eval.forgetting import survival_bar

TEXTS = [f"Entry {i}: the ferry to island {i} leaves at {i % 12} o'clock from pier {i * 7}." for i in range(40)]
runner = CliRunner()


def filled(kind: str, updates: int = 12, seed: int = 0):
    model = random_model(kind=kind, num_ltm_blocks=1 if kind == "mplus" else 0, num_tokens=8, num_blocks=4, seed=3,
                         update_ltm_frequency=3)
    memory = model.new_memory()
    drop = RandomDrop(generator=torch.Generator().manual_seed(seed))
    for text in TEXTS[:updates]:
        model.inject(memory, text, chunk_size=32, drop=drop)
    return model, memory


@pytest.mark.parametrize("kind", ["memoryllm", "mplus"])
def test_forget_removes_exactly_the_rows_of_an_update(kind: str) -> None:
    model, memory = filled(kind)
    counts = memory.source_counts()
    doomed = sorted(u for u in counts if u > 0 and counts[u][0] > 0)[:2]  # two updates still in short-term memory
    if kind == "mplus":
        doomed.append(next(u for u in counts if u > 0 and counts[u][1] > 0 and u not in doomed))
        for l in range(model.num_layers):
            memory.ltm.build_index(l, nlist=2)
    old = memory.fork()
    old_assign = [memory.ltm.indexes[l]._assign.copy() for l in range(model.num_layers)] if kind == "mplus" else []
    removed = memory.forget(doomed, model.initial_pool)
    assert removed["stm_rows"] == sum(counts[u][0] for u in doomed) > 0
    assert memory.forgotten == tuple(sorted(doomed)) and memory.num_updates == old.num_updates
    is_doomed = torch.isin(old.sources, torch.tensor(doomed))
    for l in range(model.num_layers):
        keep = ~is_doomed[l]
        f = int(is_doomed[l].sum())
        # refill rule: the initial pool's first f rows in front (source 0, the layer's largest age), then the rest
        assert torch.equal(memory.pool[l, :f], model.initial_pool[l, :f])
        assert torch.equal(memory.pool[l, f:], old.pool[l, keep])
        assert memory.sources[l].tolist() == [0] * f + old.sources[l, keep].tolist()
        if kind == "mplus":
            oldest = int(old.stm_ages[l].max())
            assert memory.stm_ages[l].tolist() == [oldest] * f + old.stm_ages[l, keep].tolist()
    if kind == "mplus":
        assert removed["ltm_rows"] == sum(counts[u][1] for u in doomed) > 0
        for l, (st, was) in enumerate(zip(memory.ltm.layers, old.ltm.layers)):
            keep = ~torch.isin(was.sources, torch.tensor(doomed))
            for name in ("vectors", "keys", "ages", "recall_frequencies", "sources"):
                assert torch.equal(getattr(st, name), getattr(was, name)[keep]), name
            cache_keep = ~torch.isin(was.cache_sources, torch.tensor(doomed))
            for name in ("cache_vectors", "cache_keys", "cache_ages", "cache_sources"):
                assert torch.equal(getattr(st, name), getattr(was, name)[cache_keep]), name
            index = memory.ltm.indexes[l]
            assert index.size == st.num_ltm and np.array_equal(index._assign, old_assign[l][keep.numpy()])
        q = torch.randn(5, model.config.selector_hidden_dim)
        exact = memory.ltm.retrieve(0, q, "exact")
        assert torch.equal(memory.ltm.retrieve(0, q, "index").order, exact.order)  # the index still names rows
    assert not set(doomed) & set(memory.source_counts())


def test_forget_everything_leaves_only_initial_rows_and_ids_are_never_reused() -> None:
    model, memory = filled("memoryllm", updates=3)
    ids = list(range(1, memory.num_updates + 1))
    memory.forget(ids, model.initial_pool)
    assert set(memory.source_counts()) == {0}
    for l in range(model.num_layers):
        initial = {row.numpy().tobytes() for row in model.initial_pool[l]}
        assert all(row.numpy().tobytes() in initial for row in memory.pool[l])
    n = memory.num_updates
    model.inject(memory, TEXTS[20], chunk_size=32)
    assert min(set(memory.source_counts()) - {0}) == n + 1  # new updates get new ids


def test_bad_ids_are_refused_before_anything_changes(tmp_path: Path) -> None:
    model, memory = filled("mplus", updates=4)
    before = {k: v.clone() for k, v in memory.tensors().items()}
    for bad in (0, memory.num_updates + 1, -1, [1, 99], [], "3"):
        with pytest.raises(UnknownUpdateError):
            memory.forget(bad, model.initial_pool)
    with pytest.raises(ValueError, match="another model"):
        memory.forget(1, model.initial_pool[:, :4])
    assert all(torch.equal(before[k], v) for k, v in memory.tensors().items()) and memory.forgotten == ()


def test_forgotten_updates_are_saved(tmp_path: Path) -> None:
    model, memory = filled("mplus", updates=4)
    memory.forget([2, 3], model.initial_pool)
    loaded = Memory.load(memory.save(tmp_path / "m.mem"))
    assert loaded.forgotten == (2, 3) and torch.equal(loaded.sources, memory.sources)


def test_survival_bar_shows_short_and_long_term_shares() -> None:
    assert survival_bar(1.0, 0.0, width=10) == "\u2588" * 10
    assert survival_bar(0.25, 0.5, width=8) == "\u2588" * 2 + "\u2592" * 4 + "\u00b7" * 2
    assert survival_bar(None, None, width=4) == "\u00b7" * 4
    assert survival_bar(0.9, 0.9, width=10) == "\u2588" * 9 + "\u2592"  # never longer than its width


# ---- the command line ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return memllm.save(random_model(seed=5, num_tokens=8, num_blocks=4), tmp_path_factory.mktemp("forget") / "model")


def test_cli_memory_info_forget_and_ask_explain(model_dir: Path, tmp_path: Path) -> None:
    mem = tmp_path / "a.mem"
    for text in TEXTS[:3]:
        r = runner.invoke(app, ["inject", text, "--model", str(model_dir), "--memory", str(mem), "--chunk-size", "32"])
        assert r.exit_code == 0, r.output
    memory = Memory.load(mem)
    r = runner.invoke(app, ["memory", "info", str(mem)])
    assert r.exit_code == 0 and "rows per update" in r.output
    last = memory.num_updates
    assert f"│ {last} " in r.output.replace("┃", "│")  # the newest update is listed
    assert "\u2588" * 10 in r.output  # ... and all its rows are still in short-term memory: a full bar
    r = runner.invoke(app, ["memory", "info", str(mem), "--plot", str(tmp_path / "survival.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "survival.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = runner.invoke(app, ["ask", "Where does the ferry leave?", "--model", str(model_dir), "--memory", str(mem),
                            "--max-new-tokens", "3", "--explain"])
    assert r.exit_code == 0, r.output
    assert "source update" in r.output and "of the answer's attention went to memory rows" in r.output
    r = runner.invoke(app, ["memory", "forget", str(mem), "--update", str(last), "--model", str(model_dir)])
    assert r.exit_code == 0, r.output
    after = Memory.load(mem)
    assert after.forgotten == (last,) and last not in after.source_counts()
    data = mem.read_bytes()
    r = runner.invoke(app, ["memory", "forget", str(mem), "--update", "99", "--model", str(model_dir)])
    assert r.exit_code == 1 and "unknown update 99" in r.output
    assert mem.read_bytes() == data  # a refused forget leaves the file as it was


def test_cli_eval_forgetting_prints_its_json_last() -> None:
    r = runner.invoke(app, ["eval", "forgetting", "tiny-memoryllm", "--n-people", "1", "--threads", "1"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout.strip().splitlines()[-1])
    keys = {"forgotten_minus_floor", "others_kept_ratio", "attribution_top1", "int8_size_ratio", "int8_accuracy_delta",
            "bf16_size_ratio", "bf16_accuracy_delta"}
    assert keys <= set(result["memoryllm"]) and result["memoryllm"]["int8_size_ratio"] <= 0.3


def test_eval_forgetting_splits_targets_by_whether_a_later_write_read_them() -> None:
    """The forgotten target's questions (and their floor) split into targets written last and targets a
    later injection followed; the two parts add up to the whole."""
    from memllm.eval.common import world_for
    from memllm.eval.forgetting import forgetting

    model = memllm.load("tiny-memoryllm")
    r = forgetting(model, world_for("tiny-memoryllm"), n_people=2, seed=1)  # seed 1: one target of each kind
    for cell in ("target_forgotten", "floor"):
        last, followed = r[f"{cell}_last"], r[f"{cell}_followed"]
        assert last["n"] + followed["n"] == r[cell]["n"] and last["n"] > 0 and followed["n"] > 0
    whole = r["target_forgotten"]["acc"]
    parts = (r["target_forgotten_last"]["acc"] * r["target_forgotten_last"]["n"]
             + r["target_forgotten_followed"]["acc"] * r["target_forgotten_followed"]["n"]) / r["target_forgotten"]["n"]
    assert parts == pytest.approx(whole)
    assert r["forgotten_last_minus_floor"]["delta"] == pytest.approx(
        r["target_forgotten_last"]["acc"] - r["floor_last"]["acc"])
