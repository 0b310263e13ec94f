"""Benchmark: dense-scan vs index retrieval over a large M+ long-term memory (one layer).

Synthetic data (see :func:`synthetic_keys_queries`): keys are drawn from a mixture of
M / ``keys_per_cluster`` Gaussian clusters ("documents", 512 keys each by default); a query
(T rows) is about ``query_topics`` = 8 of them, each row being a topic centre plus noise, so
about 4096 keys are relevant at every LTM size and the exact top R = 2560 is decided by the
within-cluster noise. Why: retrieval keys of a trained selector are not isotropic —
memories of one document/topic share directions and a question targets a few of them. With
isotropic Gaussian keys in 256 dimensions every key is almost equidistant from every query, the
top-R set is decided by noise and no partition-based index can find it without visiting most of
the data; such a benchmark would only measure that pathological case. The cluster structure here
is an assumption, not a measurement of real M+ keys; the exact path makes no such assumption.

Run ``python -m memllm.bench_ltm``; the last printed line is a JSON summary.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from memllm.ltm import LongTermMemory, LTMConfig, LTMIndex, LTMLayer


@dataclass(frozen=True)
class SyntheticSpec:
    """Parameters of the clustered key/query distribution (see module docstring)."""

    keys_per_cluster: int = 512
    centre_norm: float = 3.0  # |centre|; same-topic logits ≈ centre_norm²
    noise_norm: float = 1.5  # expected |key - centre|
    query_topics: int = 8  # topics one query (T rows) is about
    query_noise_norm: float = 1.5


def synthetic_keys_queries(
    m: int, dim: int, t: int, seed: int = 0, spec: SyntheticSpec = SyntheticSpec()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys [m, dim] from a Gaussian-cluster mixture and queries [t, dim] about a few clusters."""
    g = torch.Generator().manual_seed(seed)
    num_clusters = max(1, m // spec.keys_per_cluster)
    centres = torch.randn(num_clusters, dim, generator=g)
    centres *= spec.centre_norm / centres.norm(dim=1, keepdim=True)
    labels = torch.randint(0, num_clusters, (m,), generator=g)
    keys = torch.empty(m, dim)
    sigma = spec.noise_norm / dim**0.5
    step = 1 << 18
    for a in range(0, m, step):  # chunked so peak memory stays ≈ the keys themselves
        b = min(a + step, m)
        torch.randn(b - a, dim, generator=g, out=keys[a:b])
        keys[a:b].mul_(sigma).add_(centres[labels[a:b]])
    topics = torch.randperm(num_clusters, generator=g)[: spec.query_topics]
    q_topic = topics[torch.randint(0, spec.query_topics, (t,), generator=g)]
    queries = centres[q_topic] + torch.randn(t, dim, generator=g) * (spec.query_noise_norm / dim**0.5)
    return keys, queries


def rss_mib() -> float:
    """Current resident set size of this process (MiB), from /proc (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return times[len(times) // 2]


def run_bench_ltm(
    sizes: Sequence[int] = (15_000, 150_000, 1_500_000),
    selector_dim: int = 256,
    R: int = 2560,
    query_tokens: int = 64,
    repeats: int = 5,
    seed: int = 0,
    index_kwargs: dict | None = None,
) -> dict:
    """Time exact vs index retrieval for one layer at each LTM size; measure index recall.

    Returns ``{"rows": [per-size dicts], "index_speedup_at_1_5m", "index_recall_at_1_5m"}``
    (the last two are None if 1.5M is not among ``sizes``). Uses 2 torch threads.
    """
    torch.set_num_threads(2)
    config = LTMConfig(num_tokens=R, num_ltm_blocks=1)
    rows = []
    for m in sizes:
        keys, queries = synthetic_keys_queries(m, selector_dim, query_tokens, seed=seed)
        # Vectors are irrelevant to retrieval latency; a [m, 1] stand-in keeps memory for keys.
        layer = LTMLayer(
            vectors=torch.zeros(m, 1),
            keys=keys,
            ages=torch.randint(0, 10 * m, (m,), generator=torch.Generator().manual_seed(seed)),
            recall_frequencies=torch.ones(m),
        )
        ltm = LongTermMemory(config, [layer])
        t0 = time.perf_counter()
        kwargs = {"min_candidates": 16 * R, **(index_kwargs or {})}
        ltm.indexes[0] = LTMIndex(**kwargs).build(keys)
        build_s = time.perf_counter() - t0

        exact = ltm.retrieve(0, queries, "exact")
        approx = ltm.retrieve(0, queries, "index")
        hit = torch.isin(approx.selected_sorted, exact.selected_sorted).sum().item()
        recall = hit / R
        n_cand = int(ltm.indexes[0].candidates(queries).shape[0])

        exact_ms = _median_ms(lambda: ltm.retrieve(0, queries, "exact"), repeats)
        index_ms = _median_ms(lambda: ltm.retrieve(0, queries, "index"), repeats)
        rows.append(
            {
                "size": m,
                "scan_ms": round(exact_ms, 2),
                "index_ms": round(index_ms, 2),
                "speedup": round(exact_ms / index_ms, 2),
                "recall": round(recall, 4),
                "candidates": n_cand,
                "nlist": int(ltm.indexes[0].centroids.shape[0]),
                "build_s": round(build_s, 2),
                "rss_mib": round(rss_mib(), 1),
            }
        )
        del ltm, layer, keys, exact, approx
    at = {r["size"]: r for r in rows}.get(1_500_000)
    return {
        "rows": rows,
        "selector_dim": selector_dim,
        "R": R,
        "query_tokens": query_tokens,
        "threads": torch.get_num_threads(),
        "index_speedup_at_1_5m": at["speedup"] if at else None,
        "index_recall_at_1_5m": at["recall"] if at else None,
    }


def _print_table(result: dict) -> None:
    headers = ["size", "scan ms/layer", "index ms/layer", "speedup", "recall@R",
               "candidates", "nlist", "build s", "RSS MiB"]
    keys = ["size", "scan_ms", "index_ms", "speedup", "recall", "candidates", "nlist",
            "build_s", "rss_mib"]
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"LTM retrieval, s={result['selector_dim']}, R={result['R']}, "
                      f"T={result['query_tokens']}, {result['threads']} threads")
        for h in headers:
            table.add_column(h, justify="right")
        for r in result["rows"]:
            table.add_row(*(f"{r[k]:,}" if isinstance(r[k], int) else str(r[k]) for k in keys))
        Console(width=120).print(table)
    except ImportError:
        print(" | ".join(headers))
        for r in result["rows"]:
            print(" | ".join(str(r[k]) for k in keys))


def main(argv: Sequence[str] | None = None) -> None:
    """Run the default benchmark; sizes can be given as arguments (e.g. ``15000 150000``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    sizes = tuple(int(a.replace("_", "")) for a in args) or (15_000, 150_000, 1_500_000)
    result = run_bench_ltm(sizes=sizes)
    _print_table(result)
    sys.stdout.flush()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
