"""`memllm.bench.inference` on a tiny configuration: the result has every number, main() ends with a JSON line.

No timing assertions: these machines are shared and slow, the full benchmark is run by hand.
"""

from __future__ import annotations

import json

import pytest
import torch

from memllm.bench import inference as bench

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


def test_main_prints_json_last_line(capsys):
    argv = ["--repeats", "1", "--markdown", "--inject-rss-chars", "0"]
    for name, value in TINY.items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    bench.main(argv)
    lines = capsys.readouterr().out.strip().splitlines()
    last = json.loads(lines[-1])
    for key in ("ttft_speedup_reused_prefix", "generate_32_s", "inject_512_s", "config", "torch", "transformers"):
        assert key in last
    assert any("authors" in line for line in lines[:-1])  # the side-by-side table came first


def test_authors_repo_is_refused():
    with pytest.raises(NotImplementedError):
        bench.run_bench(repeats=1, authors_repo="/nonexistent", **TINY)


def test_inject_rss_line_measures_a_fresh_process_without_a_graph():
    r = bench.inject_rss(chars=3000, threads=1)
    assert r["inject_long_updates"] >= 1 and r["inject_long_pool_has_graph"] is False
    assert r["inject_long_peak_rss_mb"] > 0 and r["inject_long_rss_growth_mb"] >= 0
