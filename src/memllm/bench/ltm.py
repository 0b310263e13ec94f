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

Recall is measured on ``num_queries`` = 8 queries over the same keys (the first is the one
:func:`synthetic_keys_queries` returns, the others come from :func:`synthetic_queries`); the
table shows the mean and the minimum. Scan and index are timed interleaved (scan, index, index,
scan, ...) so that both see the same machine load; the load average is printed with the table.

Run ``memllm bench ltm [SIZES]``; the last printed line is a JSON summary.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from memllm.bench.timing import interleaved_medians, load_average
from memllm.core.ltm import LongTermMemory, LTMConfig, LTMIndex, LTMLayer

SIZES = (15_000, 150_000, 1_500_000)  # long-term vectors per layer (the default run)


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


def synthetic_queries(
    m: int, dim: int, t: int, num: int, seed: int = 0, query_seed: int = 1, spec: SyntheticSpec = SyntheticSpec()
) -> list[torch.Tensor]:
    """``num`` more queries [t, dim] over the keys of ``synthetic_keys_queries(m, dim, .., seed)``
    (same cluster centres, same query model, other topics and noise)."""
    g = torch.Generator().manual_seed(seed)
    num_clusters = max(1, m // spec.keys_per_cluster)
    centres = torch.randn(num_clusters, dim, generator=g)  # the first draw there too
    centres *= spec.centre_norm / centres.norm(dim=1, keepdim=True)
    gq = torch.Generator().manual_seed(query_seed)
    out = []
    for _ in range(num):
        topics = torch.randperm(num_clusters, generator=gq)[: spec.query_topics]
        q_topic = topics[torch.randint(0, spec.query_topics, (t,), generator=gq)]
        out.append(centres[q_topic] + torch.randn(t, dim, generator=gq) * (spec.query_noise_norm / dim**0.5))
    return out


def rss_mib(field: str = "VmRSS") -> float:
    """Resident set size of this process (MiB; ``VmHWM`` for the peak so far), from /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def run_bench_ltm(
    sizes: Sequence[int] = SIZES,
    selector_dim: int = 256,
    R: int = 2560,
    query_tokens: int = 64,
    repeats: int = 7,
    num_queries: int = 8,
    seed: int = 0,
    index_kwargs: dict | None = None,
) -> dict:
    """Time exact vs index retrieval for one layer at each LTM size; measure index recall.

    Returns ``{"rows": [per-size dicts], "index_speedup_at_1_5m", "index_recall_at_1_5m"}``
    (the last two are None if 1.5M is not among ``sizes``; recall is the mean over
    ``num_queries`` queries, its minimum is ``index_recall_min_at_1_5m``). Uses 2 threads.
    """
    torch.set_num_threads(2)
    config = LTMConfig(num_tokens=R, num_ltm_blocks=1)
    rows = []
    load_start = load_average()
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
        rss_keys = rss_mib()
        t0 = time.perf_counter()
        kwargs = {"min_candidates": 24 * R, **(index_kwargs or {})}
        ltm.indexes[0] = LTMIndex(**kwargs).build(keys)
        build_s = time.perf_counter() - t0
        index = ltm.indexes[0]

        recalls, n_cand = [], []
        more = synthetic_queries(m, selector_dim, query_tokens, num_queries - 1, seed=seed)
        for q in [queries, *more]:
            exact = ltm.retrieve(0, q, "exact")
            approx = ltm.retrieve(0, q, "index")
            recalls.append(torch.isin(approx.selected_sorted, exact.selected_sorted).sum().item() / R)
            n_cand.append(int(index.candidates(q).shape[0]))
            del exact, approx

        medians = interleaved_medians(
            {
                "scan": (None, lambda ltm=ltm, q=queries: ltm.retrieve(0, q, "exact")),
                "index": (None, lambda ltm=ltm, q=queries: ltm.retrieve(0, q, "index")),
            },
            repeats,
        )
        exact_ms, index_ms = 1000 * medians["scan"], 1000 * medians["index"]
        rows.append(
            {
                "size": m,
                "scan_ms": round(exact_ms, 2),
                "index_ms": round(index_ms, 2),
                "speedup": round(exact_ms / index_ms, 2),
                "recall": round(sum(recalls) / len(recalls), 4),
                "recall_min": round(min(recalls), 4),
                "candidates": int(sum(n_cand) / len(n_cand)),
                "nlist": int(index.centroids.shape[0]),
                "build_s": round(build_s, 2),
                "keys_mib": round(keys.numel() * keys.element_size() / 2**20, 1),
                "rss_mib": round(rss_mib(), 1),
                "index_mib": round(rss_mib() - rss_keys, 1),
                "load_avg": load_average(),
            }
        )
        del ltm, layer, keys, index
    at = {r["size"]: r for r in rows}.get(1_500_000)
    return {
        "rows": rows,
        "selector_dim": selector_dim,
        "R": R,
        "query_tokens": query_tokens,
        "num_queries": num_queries,
        "threads": torch.get_num_threads(),
        "load_avg_start": load_start,
        "peak_rss_mib": round(rss_mib("VmHWM"), 1),
        "index_speedup_at_1_5m": at["speedup"] if at else None,
        "index_recall_at_1_5m": at["recall"] if at else None,
        "index_recall_min_at_1_5m": at["recall_min"] if at else None,
    }


def print_table(result: dict) -> None:
    headers = ["size", "scan ms/layer", "index ms/layer", "speedup", "recall@R mean",
               "recall@R min", "candidates", "nlist", "build s", "keys MiB", "RSS MiB", "load avg"]
    keys = ["size", "scan_ms", "index_ms", "speedup", "recall", "recall_min", "candidates",
            "nlist", "build_s", "keys_mib", "rss_mib", "load_avg"]
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"LTM retrieval, s={result['selector_dim']}, R={result['R']}, "
                      f"T={result['query_tokens']}, {result['threads']} threads, recall over "
                      f"{result['num_queries']} queries, peak RSS {result['peak_rss_mib']} MiB")
        for h in headers:
            table.add_column(h, justify="right")
        for r in result["rows"]:
            table.add_row(*(f"{r[k]:,}" if isinstance(r[k], int) else str(r[k]) for k in keys))
        Console(width=160).print(table)
    except ImportError:
        print(" | ".join(headers))
        for r in result["rows"]:
            print(" | ".join(str(r[k]) for k in keys))


def bench_ltm(sizes: Sequence[int] = SIZES) -> dict:
    """`memllm bench ltm`: `run_bench_ltm` at these LTM sizes, its table on stdout; returns the result."""
    result = run_bench_ltm(sizes=sizes)
    print_table(result)
    return result
