"""`memllm bench` on a tiny configuration: the result has every number, the command ends with a JSON line;
the one timer the benchmarks share.

No timing assertions: these machines are shared and slow, the full benchmark is run by hand.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from memllm.bench import inference as bench
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
    assert result["authors_generate_32_s"] == bench.AUTHORS_REFERENCE_S["generate_32_s"]
    assert result["torch"] == torch.__version__ and result["transformers"]
    assert len(bench.table_rows(result)) == len(TIMINGS)
    json.dumps(result)


def test_the_command_prints_json_last_line():
    argv = ["bench", "--repeats", "1", "--markdown", "--inject-rss-chars", "0"]
    for name, value in TINY.items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    last = json.loads(lines[-1])
    for key in ("ttft_speedup_reused_prefix", "generate_32_s", "inject_512_s", "config", "torch", "transformers"):
        assert key in last
    assert last["config"]["intermediate_size"] == 128 and last["repeats"] == 1
    assert any(line.startswith("| measurement") for line in lines[:-1])  # --markdown: the table as Markdown too
    assert CliRunner().invoke(app, ["bench", "--repeats", "0"]).exit_code == 2


def test_inject_rss_line_measures_a_fresh_process_without_a_graph():
    r = bench.inject_rss(chars=3000, threads=1)
    assert r["inject_long_updates"] >= 1 and r["inject_long_pool_has_graph"] is False
    assert r["inject_long_peak_rss_mb"] > 0 and r["inject_long_rss_growth_mb"] >= 0


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
