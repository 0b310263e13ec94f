"""retention(): structure, intervals and the survival law, on tiny random models."""

from __future__ import annotations

import json
import math

import pytest
import torch

from memllm.core.tiny import random_model
from memllm.eval import retention as evaluate
from memllm.eval.common import first_word, wilson
from memllm.synthetic.world import World


def test_wilson():
    assert wilson(0, 0) == (0.0, 1.0)
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and 0.2 < hi < 0.35
    lo, hi = wilson(10, 10)
    assert 0.65 < lo < 0.8 and hi == pytest.approx(1.0)
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    # all right or all wrong: the interval contains the proportion exactly (rounding left 350 of 350
    # with an upper bound below 1, which broke the retention figure's error bars)
    assert all(wilson(n, n)[1] == 1.0 and wilson(0, n)[0] == 0.0 for n in range(1, 500))


def test_first_word():
    assert first_word(" Zorora. born") == "Zorora"
    assert first_word("  ") == ""


@pytest.fixture(scope="module")
def models():
    common = {"num_layers": 2, "hidden_size": 32, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 64,
              "num_tokens": 8}
    return {
        "memoryllm": random_model(num_blocks=4, **common),
        "mplus": random_model(num_blocks=6, num_ltm_blocks=2, kind="mplus", **common),
    }


def test_retention_structure(models):
    model = models["memoryllm"]
    r = evaluate.retention(model, World(), n_people=2, distractor_counts=(2, 0, 1))
    assert r["counts"] == [0, 1, 2] and r["K"] == 8 and r["N"] == 32
    assert r["n_people"] == 2 and r["n_questions"] == 2 * len(World().attributes)
    for n in r["counts"]:
        lo, hi = r["ci"][n]
        assert 0 <= lo <= r["acc"][n] <= hi <= 1
        assert r["survival"][n] == pytest.approx((1 - 8 / 32) ** n)
    assert 0 <= r["floor_ci"][0] <= r["floor"] <= r["floor_ci"][1] <= 1
    assert r["acc_at_0"] == r["acc"][0]
    assert not model.training


def test_retention_is_deterministic(models):
    model = models["memoryllm"]
    a = evaluate.retention(model, World(), n_people=1, distractor_counts=(0, 1), seed=3)
    b = evaluate.retention(model, World(), n_people=1, distractor_counts=(0, 1), seed=3)
    assert a == b


def test_compare_two_models_table_plot_and_gain(models, tmp_path, capsys):
    plot = tmp_path / "r.png"
    out = evaluate.compare(models, World(), plot=plot, n_people=1, distractor_counts=(0, 1), ks=(1, 2), befores=(1,),
                           one_then=2)
    s = out["summary"]
    for key in ("acc_at_0", "floor", "mplus_gain_at_3x", "memoryllm_acc_at_3x", "mplus_acc_at_3x"):
        assert key in s and not math.isnan(s[key])
    # 3x the STM capacity in biographies: n = 3 N / K distractors (32/8 and 32/8 here)
    assert 12 in out["results"]["memoryllm"]["counts"] and 12 in out["results"]["mplus"]["counts"]
    assert s["mplus_gain_at_3x"] == pytest.approx(
        out["results"]["mplus"]["acc"][12] - out["results"]["memoryllm"]["acc"][12])
    assert plot.exists() and plot.stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "(1-K/N)^n" in printed
    json.dumps(s)  # the last-line JSON


def test_eval_retention_command_on_a_saved_checkpoint(models, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from memllm.cli import app
    from memllm.core.checkpoint import save

    path = save(models["memoryllm"], tmp_path / "ckpt")
    r = CliRunner().invoke(app, ["eval", "retention", str(path), "--n-people", "1", "--counts", "0", "--ks", "2",
                                 "--before", "1", "--plot", str(tmp_path / "p.png")])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    out = evaluate.evaluate_retention([str(path)], n_people=1, distractor_counts=(0,), ks=(2,), befores=(1,),
                                      plot=tmp_path / "q.png")
    assert summary == json.loads(json.dumps(out["summary"])) | {"plot": str(tmp_path / "p.png")}
    assert {"memoryllm_k2_mean", "memoryllm_before1", "memoryllm_stranger_abstain_rate",
            "memoryllm_heldout_template_ratio"} <= set(summary)
    # --dtype loads the checkpoint in it (does a bfloat16 model answer as well?)
    loaded = []
    from memllm.core import checkpoint

    original = checkpoint.load
    monkeypatch.setattr(checkpoint, "load", lambda path, dtype=None: loaded.append(dtype) or original(path, dtype=dtype))
    r = CliRunner().invoke(app, ["eval", "retention", str(path), "--n-people", "1", "--counts", "0", "--ks", "2",
                                 "--before", "1", "--panels", "people", "--plot", str(tmp_path / "b.png"),
                                 "--dtype", "bfloat16"])
    assert r.exit_code == 0 and loaded == ["bfloat16"], r.output


def test_retention_of_the_shipped_model_does_not_depend_on_the_global_rng():
    """The memory drops are seeded by the evaluation's seed: a rerun of the documented command gives
    the same table whatever else drew random numbers before."""
    import memllm
    from memllm.eval.common import world_for

    model, world = memllm.load("tiny-memoryllm"), world_for("tiny-memoryllm")
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        runs.append(evaluate.retention(model, world, n_people=4, distractor_counts=(0, 8)))
    assert runs[0] == runs[1]
    assert runs[0]["acc"][0] > 0.8 > runs[0]["floor"] + 0.5  # the shipped model reads its memory


def test_error_bars_take_bounds_rounded_past_the_accuracy():
    """An accuracy and its interval are rounded separately (0.991 vs an upper bound of 0.99): the plot
    must still draw (matplotlib refuses negative error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from memllm.eval.common import errorbar

    fig, ax = plt.subplots()
    errorbar(ax, [0, 1], [{"acc": 0.991, "ci": [0.98, 0.99]}, {"acc": 0.0, "ci": [0.001, 0.02]}])
    plt.close(fig)
