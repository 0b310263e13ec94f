"""Benchmark: reading from and writing into memory on the configuration the authors' code was timed on.

A random-weight Llama (hidden 512, 8 layers, 8 heads / 4 key-value heads, intermediate 1408,
vocabulary 32,000), K = 256, N = 2,048 memory vectors per layer (num_blocks 8), float32 (`dtype`: or bfloat16), sdpa
attention, 2 torch threads. Measured, as medians over ``repeats`` runs after one warm-up run:

- time to first token (TTFT) of a 64-token prompt: one ``generate(max_new_tokens=1)``, i.e. the
  prefill forward that returns the next-token logits, with the memory prefix reused (computed once
  per memory state and cached, as in a session) and recomputed (cache dropped before the call, as
  for the first question after an update); ``ttft_speedup_reused_prefix`` = recomputed / reused;
- 32 greedy tokens from that prompt, end to end through ``MemoryModel.generate`` (no EOS stop),
  prefix cached (``generate_32_s``) and recomputed (``generate_32_recomputed_s``);
- injecting a 512-token context, delta memory + update, one injection (``inject_512_s``).

With ``num_ltm_blocks`` > 0 the model is an M+ one (R = num_ltm_blocks x K rows retrieved, exactly,
from ``ltm_rows`` random long-term rows per layer), as the authors' M+ was timed.

Each figure is also given as a fraction of what the machine allows, measured on the spot at the same
thread count (`memllm.bench.machine`): decoding against the bytes a token must read (weights, LM head,
key/value cache with the memory prefix) at the machine's read bandwidth
(``decode_bandwidth_fraction``); the prefix, TTFT and injection against the FLOPs they need at its
GEMM rate (``prefix_gemm_fraction``, ``ttft_reused_flop_fraction``, ``inject_gemm_fraction``). 1.0
would be the machine's limit. The authors' code is timed beside memllm by a separate script that
runs both in one session (no copy of their code or numbers here; see docs/bench.md).

Also measured, in a fresh process: the peak resident memory of injecting a long text (default
200,000 characters) into the shipped ``tiny-memoryllm`` (``inject_long_rss_growth_mb``: peak after
minus peak before the injection). An injection that kept its autograd graph grew by ~4.3 GB here.

Run ``memllm bench``; the last printed line is one JSON object with every number.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import torch

from memllm.bench.machine import ModelShape, decode_bytes, forward_flops, measure
from memllm.bench.timing import device_sync, interleaved_medians, load_average
from memllm.train.options import option


@dataclass(frozen=True)
class BenchConfig:
    """Model and workload sizes (defaults: the configuration the authors' code was timed on)."""

    hidden_size: int = option(512, "model width")
    num_layers: int = option(8, "decoder layers")
    num_heads: int = option(8, "attention heads")
    num_kv_heads: int = option(4, "key-value heads")
    intermediate_size: int = option(1408, "MLP width")
    vocab_size: int = option(32000, "vocabulary")
    num_tokens: int = option(256, "K: memory vectors written per injection")
    num_blocks: int = option(8, "N / K: N = 2,048 memory vectors per layer by default")
    prompt_tokens: int = option(64, "tokens of the prompt asked")
    new_tokens: int = option(32, "tokens generated")
    context_tokens: int = option(512, "tokens of the context injected")
    num_ltm_blocks: int = option(0, "M+: R / K long-term blocks retrieved per layer (0: MemoryLLM; the authors' M+: 2)")
    ltm_rows: int = option(4096, "M+: random long-term vectors stored per layer, searched exactly")
    dtype: str = option("float32", "weights, memory and activations (the authors' timed configuration: float32); "
                        "the machine's GEMM and matrix-vector rates are measured in it too", ("float32", "bfloat16"))
    device: str = option("cpu", "where the model runs: cpu, or cuda / cuda:N (a GPU: the machine's rates are "
                                "measured on it, and every timed call waits for the GPU to finish)")

    def __post_init__(self) -> None:
        try:
            device = torch.device(self.device)
        except RuntimeError as e:
            raise ValueError(f"device {self.device!r}: not a torch device ({e})") from e
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device {self.device!r}: use cpu or cuda")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: no GPU is available here (torch.cuda.is_available() is False)")

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.dtype]

    @property
    def memory_tokens(self) -> int:
        """N, the memory (M+: short-term) vectors per layer."""
        return self.num_blocks * self.num_tokens

    @property
    def retrieved_tokens(self) -> int:
        """R, the long-term vectors placed in front of the short-term ones at every layer (M+)."""
        return self.num_ltm_blocks * self.num_tokens

    @property
    def prefix_tokens(self) -> int:
        """P: [bos ; R retrieved ; N memory] rows in front of the prompt."""
        return 1 + self.retrieved_tokens + self.memory_tokens


def build_model(cfg: BenchConfig, seed: int = 0):
    """A random-weight (seeded) memory model in `cfg.dtype` with an initialised memory prefix (M+ when
    `num_ltm_blocks`: the authors' timed M+ settings, selector width 64, merges every 4 injections)."""
    from memllm.core.tiny import random_model

    mplus = cfg.num_ltm_blocks > 0
    model = random_model(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size,
        num_tokens=cfg.num_tokens, num_blocks=cfg.num_blocks + cfg.num_ltm_blocks, seed=seed, tokenizer=False,
        kind="mplus" if mplus else "memoryllm", num_ltm_blocks=cfg.num_ltm_blocks,
        selector_hidden_dim=64, update_ltm_frequency=4,
        # room for [bos ; R ; memory] + prompt + answer, or for an injection behind the K-row prefix
        max_position_embeddings=max(4096, cfg.prefix_tokens + cfg.prompt_tokens + cfg.new_tokens,
                                    cfg.num_tokens + 1 + cfg.context_tokens),
    )
    model.lm.generation_config.eos_token_id = None  # always generate the requested number of tokens
    model.lm.generation_config.pad_token_id = 0
    return model.to(cfg.torch_dtype).to(cfg.device).eval()


def new_memory(model, cfg: BenchConfig, seed: int = 0):
    """A fresh memory; M+: with `ltm_rows` random long-term vectors per layer (and their retrieval
    keys), as in the authors' timed M+ (`ltm_initial_size` 4096)."""
    memory = model.new_memory()
    if cfg.num_ltm_blocks:
        from memllm.core.ltm import LongTermMemory
        from memllm.core.mplus import ltm_config, retrieval_keys

        g = torch.Generator().manual_seed(seed + 2)
        tensors = {}
        for l in range(cfg.num_layers):
            rows = (torch.randn(cfg.ltm_rows, cfg.hidden_size, generator=g) * 0.02).to(cfg.torch_dtype)  # [M, d]
            tensors[f"ltm.{l}"] = rows
            tensors[f"ltm_keys.{l}"] = retrieval_keys(model, l, rows.to(model.device)).float().cpu()  # [M, s]
            tensors[f"ltm_ages.{l}"] = torch.arange(cfg.ltm_rows, 0, -1, dtype=torch.float32)
            tensors[f"ltm_recall_frequencies.{l}"] = torch.ones(cfg.ltm_rows)
        memory.ltm = LongTermMemory.from_tensors(tensors, ltm_config(model))
    return memory


def run_bench(
    repeats: int = 5,
    threads: int = 2,
    seed: int = 0,
    config: BenchConfig | None = None,
    **sizes: int,
) -> dict:
    """Run the benchmark and return every number (seconds) with the configuration and versions.

    Sizes can be overridden by keyword (any `BenchConfig` field, e.g. ``hidden_size=64``) or with a
    whole `config`.
    """
    cfg = config or BenchConfig()
    if sizes:
        cfg = BenchConfig(**{**asdict(cfg), **sizes})
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _run(cfg, repeats, seed)
    finally:
        torch.set_num_threads(previous_threads)


def _run(cfg: BenchConfig, repeats: int, seed: int) -> dict:
    t0 = time.perf_counter()
    model = build_model(cfg, seed)
    build_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(seed + 1)
    prompt = torch.randint(0, cfg.vocab_size, (1, cfg.prompt_tokens), generator=g).to(cfg.device)
    context = torch.randint(0, cfg.vocab_size, (cfg.context_tokens,), generator=g).to(cfg.device)
    memory = new_memory(model, cfg, seed)

    def generate(n: int):
        out = model.generate(memory, prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        assert out.shape[1] == cfg.prompt_tokens + n, out.shape
        return out

    def cached() -> None:
        model.memory_prefix(memory)  # no-op when the prefix of this memory state is cached

    # (c) one injection (delta memory + update), into a fresh copy of the memory each time
    target = {}

    def fresh() -> None:
        target["memory"] = new_memory(model, cfg, seed)

    def inject() -> None:
        updates = model.inject(target["memory"], context, chunk_size=cfg.context_tokens)
        assert updates == 1

    clear = model.clear_prefix_cache
    load_before = load_average()
    m = interleaved_medians({
        # (a) time to first token: the prefill forward of generate's first step
        "ttft_reused": (cached, lambda: generate(1)),
        "ttft_recomputed": (clear, lambda: generate(1)),
        # the prefix alone: [bos ; memory] through every layer's norm, k/v projections and RoPE
        "prefix": (clear, lambda: model.memory_prefix(memory)),
        # (b) greedy tokens end to end, prefix cached (a session) or recomputed (first question after an update)
        "gen_reused": (cached, lambda: generate(cfg.new_tokens)),
        "gen_recomputed": (clear, lambda: generate(cfg.new_tokens)),
        "inject": (fresh, inject),
    }, repeats, sync=device_sync(cfg.device))
    ttft_reused, ttft_recomputed, prefix = m["ttft_reused"], m["ttft_recomputed"], m["prefix"]
    gen_reused, gen_recomputed, inject_s = m["gen_reused"], m["gen_recomputed"], m["inject"]

    import transformers

    rates = measure(torch.get_num_threads(), cfg.torch_dtype, gemv_cols=cfg.hidden_size, device=cfg.device)
    shape = ModelShape.of(model.lm.config, cfg.torch_dtype)
    P, T, n, R = cfg.prefix_tokens, cfg.prompt_tokens, cfg.new_tokens, cfg.retrieved_tokens
    decode_s = (gen_reused - ttft_reused) / max(1, n - 1)
    # a decoded token reads the cache of P + T + i positions, i = 1..n-1: on average P + T + n / 2
    token_bytes = decode_bytes(shape, P + T + n / 2)
    # M+ also projects the retrieved rows (keys, values) and scores its queries against every stored key
    s_dim = model.config.selector_hidden_dim
    retrieval = cfg.num_layers * 2 * T * (cfg.hidden_size * 2 * s_dim + 2 * s_dim * s_dim + cfg.ltm_rows * s_dim)
    ttft_flops = forward_flops(shape, T, P, logits=1, prefix_rows=R) + (retrieval if R else 0)
    prefix_flops = forward_flops(shape, 0, 0, prefix_rows=P - R)
    K = cfg.num_tokens
    # one injection: max(T, K) positions after the [bos ; last K rows] prefix, no LM head
    inject_flops = forward_flops(shape, max(cfg.context_tokens, K), 1 + min(K, cfg.context_tokens),
                                 prefix_rows=1 + min(K, cfg.context_tokens))
    result = {
        "ttft_reused_prefix_s": ttft_reused,
        "ttft_recomputed_prefix_s": ttft_recomputed,
        "ttft_speedup_reused_prefix": ttft_recomputed / ttft_reused,
        "prefix_s": prefix,
        "generate_32_s": gen_reused,
        "generate_32_recomputed_s": gen_recomputed,
        "decode_ms_per_token": 1000 * decode_s,
        "inject_512_s": inject_s,
        # the same figures against the machine's limits, measured in this run at these threads
        "decode_bandwidth_fraction": token_bytes / rates.read_bytes_s / decode_s,
        # ... and against the matrix-vector product at the model's width (what decoding's kernel reaches)
        "decode_gemv_fraction": token_bytes / rates.gemv_bytes_s / decode_s,
        "inject_gemm_fraction": inject_flops / rates.gemm_flop_s / inject_s,
        "ttft_reused_flop_fraction": ttft_flops / rates.gemm_flop_s / ttft_reused,
        "prefix_gemm_fraction": prefix_flops / rates.gemm_flop_s / prefix,
        "decode_bound_ms_per_token": 1000 * token_bytes / rates.read_bytes_s,
        "inject_bound_s": inject_flops / rates.gemm_flop_s,
        "ttft_reused_bound_s": ttft_flops / rates.gemm_flop_s,
        "prefix_bound_s": prefix_flops / rates.gemm_flop_s,
        "machine": {"gemm_gflop_s": round(rates.gemm_flop_s / 1e9, 1),
                    "read_gb_s": round(rates.read_bytes_s / 1e9, 2),
                    "gemv_gb_s": round(rates.gemv_bytes_s / 1e9, 2),
                    "decode_mb_per_token": round(token_bytes / 1e6, 1),
                    "ttft_reused_gflop": round(ttft_flops / 1e9, 3),
                    "inject_gflop": round(inject_flops / 1e9, 3)},
        "build_s": build_s,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "seed": seed,
        "config": {**asdict(cfg), "memory_tokens": cfg.memory_tokens, "kind": model.config.kind,
                   "retrieval_mode": model.retrieval_mode,
                   "attn_implementation": model.lm.config._attn_implementation},
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else None,
        # other processes on the machine slow every number down: the 1-minute load average (compare
        # with cpu_count) before and after the timed rounds
        "loadavg_1m_before": load_before,
        "loadavg_1m_after": load_average(),
    }
    return {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in result.items()}  # 4 significant digits


def _rows(c: dict) -> list[tuple[str, str, str | None, str | None]]:
    """label, key, bound's key, fraction's key."""
    p, n, t = c["prompt_tokens"], c["new_tokens"], c["context_tokens"]
    return [
        (f"TTFT, {p}-token prompt, prefix reused", "ttft_reused_prefix_s", "ttft_reused_bound_s",
         "ttft_reused_flop_fraction"),
        (f"TTFT, {p}-token prompt, prefix recomputed", "ttft_recomputed_prefix_s", None, None),
        ("  speedup from reusing the prefix", "ttft_speedup_reused_prefix", None, None),
        (f"memory prefix alone ({c['num_layers']} layers x {c['memory_tokens'] + 1:,} rows)", "prefix_s",
         "prefix_bound_s", "prefix_gemm_fraction"),
        (f"generate {n} tokens, prefix cached", "generate_32_s", None, None),
        (f"generate {n} tokens, prefix recomputed", "generate_32_recomputed_s", None, None),
        ("  decode, ms per token", "decode_ms_per_token", "decode_bound_ms_per_token", "decode_bandwidth_fraction"),
        (f"inject {t} tokens (delta + update)", "inject_512_s", "inject_bound_s", "inject_gemm_fraction"),
    ]


def table_rows(result: dict) -> list[tuple[str, str, str, str]]:
    """(measurement, memllm, the machine's bound, fraction of the bound) as strings."""
    rows = []
    for label, key, bound, fraction in _rows(result["config"]):
        ours = result[key]
        if key == "ttft_speedup_reused_prefix":
            shown = f"{ours:.2f}x"
        elif key.endswith("_ms_per_token"):
            shown = f"{ours:.1f} ms"
        else:
            shown = f"{ours:.3f} s"
        if bound is None:
            rows.append((label, shown, "-", "-"))
        else:
            unit = " ms" if bound.endswith("_ms_per_token") else " s"
            digits = 1 if unit == " ms" else 3
            rows.append((label, shown, f"{result[bound]:.{digits}f}{unit}", f"{result[fraction]:.2f}"))
    return rows


def print_table(result: dict, file=None) -> None:
    file = file or sys.stdout
    c, m = result["config"], result["machine"]
    title = (f"memllm bench: hidden {c['hidden_size']}, {c['num_layers']} layers, {c['num_heads']}/"
             f"{c['num_kv_heads']} heads, K={c['num_tokens']}, N={c['memory_tokens']}, {c['dtype']}, "
             f"{result.get('gpu') or str(result['threads']) + ' threads'}, median of {result['repeats']}; machine: "
             f"{m['gemm_gflop_s']} GFLOP/s GEMM, {m['read_gb_s']} GB/s read")
    headers = ("measurement", "memllm", "machine's bound", "fraction of bound")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text
        print(title, file=file)
        print(" | ".join(headers), file=file)
        for row in table_rows(result):
            print(" | ".join(row), file=file)
        return
    table = Table(title=title)
    table.add_column(headers[0])
    for h in headers[1:]:
        table.add_column(h, justify="right")
    for row in table_rows(result):
        table.add_row(*row)
    Console(file=file, width=120).print(table)


def markdown_table(result: dict) -> str:
    lines = ["| measurement | memllm | machine's bound | fraction of bound |", "|---|---:|---:|---:|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(result)]
    return "\n".join(lines)


_RSS_SCRIPT = """
import json, resource, sys
import memllm
model = memllm.load("tiny-memoryllm")
memory = model.new_memory()
text = ("Hasel Kordor was born in Jastead and works at Zenlytics as a journalist. " * 10_000)[: int(sys.argv[1])]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
updates = model.inject(memory, text)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"updates": updates, "before_kb": before, "after_kb": after,
                  "graph": memory.pool.grad_fn is not None or memory.pool.requires_grad}))
"""


def inject_rss(chars: int = 200_000, threads: int = 2) -> dict:
    """Peak RSS of injecting `chars` characters into tiny-memoryllm, in a fresh process (peak RSS is
    per process, so the measurement needs its own)."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(chars)], capture_output=True, text=True,
                         env=env, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"inject_long_chars": chars, "inject_long_updates": r["updates"],
            "inject_long_s": round(time.perf_counter() - t0, 2),
            "inject_long_peak_rss_mb": round(r["after_kb"] / 1024, 1),
            "inject_long_rss_growth_mb": round((r["after_kb"] - r["before_kb"]) / 1024, 1),
            "inject_long_pool_has_graph": r["graph"]}


def bench_inference(repeats: int = 5, threads: int = 2, seed: int = 0, config: BenchConfig | None = None,
                    inject_rss_chars: int = 200_000, markdown: bool = False) -> dict:
    """`memllm bench`: `run_bench`, the peak-RSS line of injecting `inject_rss_chars` characters (0:
    skipped) and the table (also as Markdown with `markdown`) on stdout; returns every number."""
    result = run_bench(repeats, threads, seed, config)
    if inject_rss_chars:
        result.update(inject_rss(inject_rss_chars, result["threads"]))
        print(f"injecting {inject_rss_chars:,} characters into tiny-memoryllm: peak RSS "
              f"{result['inject_long_peak_rss_mb']} MB (+{result['inject_long_rss_growth_mb']} MB during the "
              f"injection, {result['inject_long_updates']} updates)")
    print_table(result)
    if markdown:
        print(markdown_table(result))
    sys.stdout.flush()
    return result
