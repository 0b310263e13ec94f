"""`memllm bench` on a tiny configuration: the result has every number, the command ends with a JSON line;
the one timer the benchmarks share.

No timing assertions: these machines are shared and slow, the full benchmark is run by hand.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from typer.testing import CliRunner

from memllm.bench import inference as bench
from memllm.bench.machine import ModelShape, decode_bytes, forward_flops, measure
from memllm.bench.timing import interleaved_medians, median
from memllm.cli import app

TINY = {
    "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128, "vocab_size": 256,
    "num_tokens": 8, "num_blocks": 2, "prompt_tokens": 8, "new_tokens": 4, "context_tokens": 16,
}
TIMINGS = [
    "ttft_reused_prefix_s", "ttft_recomputed_prefix_s", "ttft_speedup_reused_prefix", "prefix_s",
    "generate_32_s", "generate_32_recomputed_s", "inject_512_s",
]


def test_run_bench_returns_every_number():
    threads = torch.get_num_threads()
    result = bench.run_bench(repeats=1, threads=1, seed=0, **TINY)
    assert torch.get_num_threads() == threads  # restored
    for key in TIMINGS:
        assert isinstance(result[key], float) and result[key] > 0, key
    assert result["config"]["hidden_size"] == 64 and result["config"]["memory_tokens"] == 16
    assert result["threads"] == 1 and result["repeats"] == 1
    for key in ("decode_bandwidth_fraction", "inject_gemm_fraction", "ttft_reused_flop_fraction"):
        assert isinstance(result[key], float) and result[key] > 0, key
    assert not any(key.startswith("authors") or key.endswith("_vs_authors") for key in result)
    assert result["machine"]["gemm_gflop_s"] > 0 and result["machine"]["read_gb_s"] > 0
    # a fraction is the bound over the measured time, both reported
    assert result["inject_gemm_fraction"] == pytest.approx(result["inject_bound_s"] / result["inject_512_s"], rel=1e-2)
    assert result["torch"] == torch.__version__ and result["transformers"]
    assert len(bench.table_rows(result)) == len(TIMINGS) + 1  # and the decode row
    json.dumps(result)


def test_bfloat16_runs_the_model_in_it_and_measures_the_machine_in_it(monkeypatch):
    """--dtype bfloat16: weights, memory (M+: long-term rows too) in bfloat16, and the bounds counted at
    2 bytes an element against rates measured in bfloat16."""
    from memllm.bench import machine

    seen = []
    real_measure = machine.measure
    monkeypatch.setattr(bench, "measure", lambda threads, dtype, **kw: seen.append(dtype) or real_measure(
        threads, dtype, gemm_size=64, read_mib=4, repeats=1, **kw))
    for extra in ({}, {"num_ltm_blocks": 1, "ltm_rows": 32}):
        cfg = bench.BenchConfig(**TINY, **extra, dtype="bfloat16")
        model = bench.build_model(cfg)
        memory = bench.new_memory(model, cfg)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and memory.pool.dtype == torch.bfloat16
        result = bench.run_bench(repeats=1, threads=1, config=cfg)
        assert result["config"]["dtype"] == "bfloat16" and result["inject_512_s"] > 0
        float32 = ModelShape.of(model.lm.config)
        assert result["machine"]["decode_mb_per_token"] == pytest.approx(
            decode_bytes(float32, cfg.prefix_tokens + cfg.prompt_tokens + cfg.new_tokens / 2) / 2 / 1e6, abs=0.06)
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert CliRunner().invoke(app, ["bench", "--dtype", "float16"]).exit_code == 2


def test_the_command_prints_json_last_line():
    argv = ["bench", "--repeats", "1", "--markdown", "--inject-rss-chars", "0"]
    for name, value in TINY.items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    last = json.loads(lines[-1])
    for key in ("ttft_speedup_reused_prefix", "generate_32_s", "inject_512_s", "config", "torch", "transformers",
                "decode_bandwidth_fraction", "inject_gemm_fraction", "ttft_reused_flop_fraction"):
        assert key in last
    assert last["config"]["intermediate_size"] == 128 and last["repeats"] == 1
    assert any(line.startswith("| measurement") for line in lines[:-1])  # --markdown: the table as Markdown too
    assert CliRunner().invoke(app, ["bench", "--repeats", "0"]).exit_code == 2


def test_inject_rss_line_measures_a_fresh_process_without_a_graph():
    r = bench.inject_rss(chars=3000, threads=1)
    assert r["inject_long_updates"] >= 1 and r["inject_long_pool_has_graph"] is False
    assert r["inject_long_peak_rss_mb"] > 0 and r["inject_long_rss_growth_mb"] >= 0


def test_flops_and_bytes_count_the_models_own_weights():
    """The analytic counts against a real transformers model: its decoder's matrices and LM head."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2)
    lm = AutoModelForCausalLM.from_config(config)
    shape = ModelShape.of(config)
    matrices = sum(m.weight.numel() for m in lm.model.layers.modules() if isinstance(m, torch.nn.Linear))
    assert shape.layers * shape.layer_weights == matrices
    # one token, nothing cached, no logits: 2 FLOPs per matrix entry, plus q.k and p.v over itself
    assert forward_flops(shape, 1, 0) == 2 * matrices + 3 * 4 * 4 * 8
    assert forward_flops(shape, 1, 0, logits=1) - forward_flops(shape, 1, 0) == 2 * 96 * 32
    # a cached position adds its keys and values at every layer
    everything = sum(p.numel() for p in lm.parameters()) * 4  # embedding counted as one row below
    assert decode_bytes(shape, 0) == everything - (96 - 1) * 32 * 4
    assert decode_bytes(shape, 10) - decode_bytes(shape, 0) == 3 * 2 * 2 * 8 * 10 * 4


def test_machine_rates_are_measured_at_the_given_threads():
    threads = torch.get_num_threads()
    rates = measure(1, gemm_size=64, read_mib=4, repeats=1)
    assert torch.get_num_threads() == threads  # restored
    assert rates.threads == 1 and rates.gemm_flop_s > 0 and rates.read_bytes_s >= rates.gemv_bytes_s > 0


def test_the_timer_interleaves_the_cases_and_skips_the_warm_up_round():
    calls: list[str] = []
    cases = {name: (lambda name=name: calls.append("setup " + name), lambda name=name: calls.append(name))
             for name in ("a", "b", "c")}
    medians = interleaved_medians(cases, repeats=2)
    runs = [c for c in calls if not c.startswith("setup")]
    assert runs == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]  # warm-up, then every other round reversed
    assert calls[:2] == ["setup a", "a"] and calls.count("setup b") == 3  # each call after its own setup
    assert set(medians) == {"a", "b", "c"} and all(0 <= m < 1 for m in medians.values())
    assert median([3.0, 1.0, 2.0]) == 2.0 and median([4.0, 1.0, 3.0, 2.0]) == 2.5
    with pytest.raises(ValueError):
        interleaved_medians(cases, repeats=0)
    calls.clear()  # a device's queue is waited for before the clock starts and before it stops
    interleaved_medians({"a": cases["a"]}, repeats=1, sync=lambda: calls.append("sync"))
    assert calls == ["setup a", "sync", "a", "sync"] * 2


def test_a_device_that_is_not_here_is_refused_before_anything_runs():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for device, message in (("cuda", "no GPU is available here"), ("mps", "use cpu or cuda"),
                            ("tpu", "not a torch device")):
        with pytest.raises(ValueError, match=message):
            bench.BenchConfig(device=device)
    r = CliRunner().invoke(app, ["bench", "--device", "cuda", "--inject-rss-chars", "0"])
    assert r.exit_code == 2 and "no GPU is available here" in r.output and "Traceback" not in r.output
    assert bench.BenchConfig(device="cpu").device == "cpu"


def test_bench_serve_times_both_modes_in_one_run():
    """`memllm bench serve`: every cell has asks and injections timed batched and one at a time, and the
    ratio is of the two measured in this run."""
    pytest.importorskip("fastapi")
    from typer.testing import CliRunner

    from memllm.cli import app

    done = CliRunner().invoke(app, ["bench", "serve", "--clients", "2", "--memories", "2", "--requests", "2"])
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout.strip().splitlines()[-1])
    (cell,) = result["cells"]
    for mode in ("batched", "one_at_a_time"):
        assert cell[f"ask_{mode}"]["requests"] == 4 and cell[f"inject_{mode}"]["requests"] == 2
        assert cell[f"ask_{mode}"]["p50_ms"] <= cell[f"ask_{mode}"]["p95_ms"]
    assert cell["ask_speedup"] == round(cell["ask_batched"]["per_s"] / cell["ask_one_at_a_time"]["per_s"], 2)
    assert result["batched_speedup_16_clients_8_memories"] is None  # that cell was not run


FAKE_ORACLE = '''
import argparse, json, os, sys
ap = argparse.ArgumentParser()
for name in ("--family", "--runs", "--threads", "--official-dir"):
    ap.add_argument(name)
a = ap.parse_args()
if a.family == "broken":
    sys.exit("ImportError: no module named transformers")
with open(os.path.join(a.official_dir, "calls"), "a") as f:
    f.write(f"theirs {a.family} {a.runs} {a.threads} {os.environ['OFFICIAL_MODELING_DIR'] == a.official_dir}\\n")
n = len(open(os.path.join(a.official_dir, "calls")).read().splitlines())
print("loading their model...")
print(json.dumps({"family": a.family, "generate_32_from_64_prompt_s": {"median": 0.5 * n, "all": []},
                  "inject_512_tokens_update_memory_s": {"median": 0.25 * n, "all": []}}, indent=1))
'''


def test_side_by_side_alternates_their_script_and_memllm_and_divides_medians(tmp_path, monkeypatch):
    """`memllm bench official`: their script (a stand-in here) and memllm's bench take turns each round,
    at the same threads and runs; M+ gets num_ltm_blocks 2; ratios are their median over ours."""
    from memllm.bench import official

    script = tmp_path / "bench_official.py"
    script.write_text(FAKE_ORACLE)
    calls = tmp_path / "calls"
    ours = iter([0.5, 1.0, 0.25])  # memllm's generate times, round by round

    def fake_run_bench(repeats, threads, config):
        calls.open("a").write(f"ours {config.num_ltm_blocks} {repeats} {threads}\n")
        g = next(ours)
        return {"generate_32_s": g, "inject_512_s": g / 2, "decode_bandwidth_fraction": 0.5,
                "inject_gemm_fraction": 0.4, "ttft_reused_flop_fraction": 0.3}

    monkeypatch.setattr(official, "run_bench", fake_run_bench)
    r = official.side_by_side(sys.executable, str(script), str(tmp_path), family="mplus", rounds=3, threads=1, runs=2)
    assert calls.read_text().splitlines() == ["theirs mplus 2 1 True", "ours 2 2 1"] * 3
    # theirs: 0.5, 1.5, 2.5 s (medians 1.5 / 0.75); ours: 0.5, 1.0, 0.25 s (medians 0.5 / 0.25)
    assert r["official_generate_32_s"] == 1.5 and r["memllm_generate_32_s"] == 0.5
    assert r["generate_speedup_vs_official"] == 3.0 and r["inject_speedup_vs_official"] == 3.0
    assert r["memllm_fractions"]["inject_gemm_fraction"] == 0.4 and r["rounds"] == 3 and r["family"] == "mplus"
    assert "loadavg_1m_before" in r
    json.dumps(r)


def test_side_by_side_names_what_went_wrong(tmp_path):
    from memllm.bench import official

    script = tmp_path / "bench_official.py"
    script.write_text(FAKE_ORACLE)
    with pytest.raises(RuntimeError, match="failed .exit 1.: ImportError: no module named transformers"):
        official.run_official(sys.executable, str(script), str(tmp_path), "broken", 1, 1)
    r = CliRunner().invoke(app, ["bench", "official", "--script", str(tmp_path / "missing.py"),
                                 "--official-dir", str(tmp_path)])
    assert r.exit_code == 2 and "no timing script at" in r.output
    r = CliRunner().invoke(app, ["bench", "official", "--script", str(script), "--official-dir", str(tmp_path),
                                 "--family", "other"])
    assert r.exit_code == 2 and "family" in r.output
