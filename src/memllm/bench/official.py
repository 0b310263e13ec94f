"""`memllm bench official`: memllm timed beside the authors' code, alternating, in one run.

Their code needs transformers 4.x, so it runs in its own Python environment, as a subprocess: a
timing script of theirs (`bench_official.py` in the project's shared oracle folder, never copied
here) that builds their MemoryLLM or M+ on the configuration `BenchConfig` defaults to and prints one
JSON object with the medians of its runs (`generate_32_from_64_prompt_s`,
`inject_512_tokens_update_memory_s`, each `{"median": seconds, ...}`). Each round runs their script,
then `memllm bench`'s own measurement (`run_bench`) in this process, at the same thread count; the
result holds the medians over rounds of both and the ratios (theirs / ours: above 1, memllm is
faster), with the load average before and after (other processes slow both down, not always alike).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from memllm.bench.inference import BenchConfig, run_bench
from memllm.bench.timing import load_average, median

FAMILIES = ("memoryllm", "mplus")
THEIR_KEYS = {"generate": "generate_32_from_64_prompt_s", "inject": "inject_512_tokens_update_memory_s"}
OUR_KEYS = {"generate": "generate_32_s", "inject": "inject_512_s"}
# memllm's fractions of the machine's bounds, kept per round and given as medians
FRACTIONS = ("decode_bandwidth_fraction", "inject_gemm_fraction", "ttft_reused_flop_fraction")


def run_official(python: str, script: str, official_dir: str, family: str, runs: int, threads: int) -> dict:
    """One run of the authors' timing script in its own environment: its JSON object."""
    cmd = [python, script, "--family", family, "--runs", str(runs), "--threads", str(threads),
           "--official-dir", official_dir]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OFFICIAL_MODELING_DIR": official_dir})
    except OSError as e:
        raise RuntimeError(f"could not run the authors' timing script with {python} ({e})") from e
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the authors' timing script failed (exit {out.returncode}): {last}")
    lines = out.stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("{")), len(lines))
    try:  # their script prints one (indented) JSON object
        result, _ = json.JSONDecoder().raw_decode("\n".join(lines[start:]))
        return {name: float(result[key]["median"]) for name, key in THEIR_KEYS.items()}
    except (ValueError, KeyError, TypeError) as e:
        raise RuntimeError(f"the authors' timing script printed no timing JSON ({e}): {out.stdout[:200]!r}") from e


def side_by_side(
    python: str,
    script: str,
    official_dir: str,
    family: str = "memoryllm",
    rounds: int = 3,
    threads: int = 2,
    runs: int = 3,
    config: BenchConfig | None = None,
    report: Callable[[str], None] | None = None,
) -> dict:
    """Their code and memllm, alternating for `rounds` rounds (`runs` timed runs each per round).

    `config`: memllm's sizes (default: the authors' timed configuration; M+ sets `num_ltm_blocks` 2,
    as their M+ was timed). Returns medians over rounds, ratios and the load average around the run."""
    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: one of {', '.join(FAMILIES)}")
    if rounds < 1 or runs < 1:
        raise ValueError("rounds and runs must be at least 1")
    if not Path(script).is_file():
        raise ValueError(f"no timing script at {script} (the oracle folder's bench_official.py)")
    cfg = config or BenchConfig()
    if family == "mplus" and not cfg.num_ltm_blocks:
        cfg = replace(cfg, num_ltm_blocks=2)
    if family == "memoryllm" and cfg.num_ltm_blocks:
        raise ValueError("family memoryllm with num_ltm_blocks > 0: that is an M+ model (family mplus)")
    theirs: list[dict] = []
    ours: list[dict] = []
    load_before = load_average()
    for i in range(rounds):
        theirs.append(run_official(python, script, official_dir, family, runs, threads))
        ours.append(run_bench(repeats=runs, threads=threads, config=cfg))
        if report is not None:
            report(f"round {i + 1}/{rounds}: theirs generate {theirs[-1]['generate']:.3f} s, inject "
                   f"{theirs[-1]['inject']:.3f} s; memllm generate {ours[-1]['generate_32_s']:.3f} s, "
                   f"inject {ours[-1]['inject_512_s']:.3f} s")
    result: dict = {"family": family}
    for name in ("generate", "inject"):
        t = median([r[name] for r in theirs])
        m = median([r[OUR_KEYS[name]] for r in ours])
        suffix = "32_s" if name == "generate" else "512_s"
        result.update({f"official_{name}_{suffix}": round(t, 4), f"memllm_{name}_{suffix}": round(m, 4),
                       f"{name}_speedup_vs_official": round(t / m, 3)})
    result.update({
        "memllm_fractions": {k: round(median([r[k] for r in ours]), 3) for k in FRACTIONS},
        "rounds": rounds, "runs": runs, "threads": threads, "dtype": cfg.dtype,
        "loadavg_1m_before": load_before, "loadavg_1m_after": load_average(),
    })
    return result
