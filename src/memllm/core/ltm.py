"""M+ long-term memory (LTM): per-layer storage, merge schedule and retrieval.

This module is a pure tensor data structure (no model). It reproduces the published M+
bookkeeping (SPEC §4, golden README "M+"):

* every layer ``l`` holds LTM rows ``vectors`` [M_l, d], retrieval ``keys`` [M_l, s], integer
  ``ages`` [M_l] and ``recall_frequencies`` [M_l]; plus a cache of rows dropped from the
  short-term memory that have not been merged yet (rows, keys, ages);
* provenance (ours, not the paper's): every row and cached row carries ``sources``, the id of the
  memory update that wrote it (0: the initial memory, -1: unknown), moved along with the row by
  every merge and removed with it by :meth:`LongTermMemory.forget`;
* one global ``update_step`` counter decides when caches are merged into the LTMs.

Update protocol, once per injection (K = rows dropped per layer)::

    for l in layers:
        ltm.add_dropped(l, dropped_rows, dropped_keys, dropped_stm_ages)   # steps 3 + 4
    merge = ltm.finish_update(K)                                           # step 5
    # merge is None, or a list (per layer) of source positions in [old LTM ; cache]

Retrieval scores every candidate of ``[LTM ; cache]`` by ``mean_t sigmoid(q_t · key)`` and
returns the top R ordered oldest first (:meth:`LongTermMemory.retrieve`). Two modes:
``"exact"`` is the published dense scan; ``"index"`` uses an :class:`LTMIndex` (faiss IVF
partition of the LTM keys) to propose candidates that are then scored exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from memllm.core.ltm_index import SCAN_CHUNK, LTMIndex
from memllm.core.ops import dequantize_rows, quantize_rows

RetrievalMode = Literal["exact", "index"]

# Recall frequencies at or below this count as "reached 0" (official threshold).
_RF_ALIVE_THRESHOLD = 0.01

INITIAL_SOURCE = 0  # the source id of rows a memory started with (the checkpoint's initial memory)
UNKNOWN_SOURCE = -1  # the source id of rows whose update was not recorded (files from before provenance)


@dataclass(frozen=True)
class LTMConfig:
    """The M+ memory hyper-parameters the LTM needs (names as in the HF config)."""

    num_tokens: int  # K: rows dropped from the STM per injection
    num_ltm_blocks: int  # R = num_ltm_blocks * num_tokens rows are retrieved
    update_ltm_frequency: int = 60  # merge the cache every this many injections
    decay_frequency: float = 1.0
    initial_rf_when_moving_stm_to_ltm: float = 10.0

    @property
    def retrieval_size(self) -> int:
        """R, the number of LTM rows put in front of the STM at every layer."""
        return self.num_ltm_blocks * self.num_tokens

    @classmethod
    def from_dict(cls, values: Mapping[str, object], strict: bool = False) -> LTMConfig:
        """The one way to build it from stored settings: a checkpoint's ``config.json``, a
        ``MemoryConfig``'s fields (``strict`` False: other keys and null values are ignored) or a
        memory file's header (``strict``: exactly these fields). Every value must be a non-negative
        number, integral for the integer fields; ValueError says which is not."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if strict:
            unknown = sorted(set(values) - set(fields))
            if unknown:
                raise ValueError(f"unknown LTM settings {unknown}: expected keys among {sorted(fields)}")
        kwargs: dict[str, int | float] = {}
        for name, f in fields.items():
            if name not in values or (values[name] is None and not strict):
                continue
            value = values[name]
            integral = f.type == "int"
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0
                    or (integral and not float(value).is_integer())):
                kind = "a non-negative integer" if integral else "a non-negative number"
                raise ValueError(f"LTM setting {name}={value!r}: expected {kind}")
            kwargs[name] = int(value) if integral else float(value)
        missing = [name for name, f in fields.items()
                   if name not in kwargs and f.default is dataclasses.MISSING]
        if missing:
            raise ValueError(f"LTM settings lack {missing}")
        return cls(**kwargs)


@dataclass
class LTMLayer:
    """One layer's LTM and cache of dropped-but-not-merged rows.

    The cache is kept as a list of chunks (one per injection) so that appending is O(K) and
    the concatenation is only materialised when needed.

    Compact holding (``LongTermMemory.to(torch.int8)``): ``vectors`` are int8 with a float32 scale per
    row in ``scales``, and every read (`rows`, `dense_vectors`) dequantises only the rows it returns, to
    ``dense_dtype``. The cache (at most one merge interval of rows) stays in the dtype it arrived in
    and is quantised when it merges.
    """

    vectors: Tensor  # [M, d]
    keys: Tensor  # [M, s]
    ages: Tensor  # [M] int64
    recall_frequencies: Tensor  # [M] float32
    cache_vector_chunks: list[Tensor] = field(default_factory=list)  # each [k_i, d]
    cache_key_chunks: list[Tensor] = field(default_factory=list)  # each [k_i, s]
    cache_age_chunks: list[Tensor] = field(default_factory=list)  # each [k_i] int64
    sources: Tensor | None = None  # [M] int64, the update that wrote each row (None: INITIAL_SOURCE)
    cache_source_chunks: list[Tensor] = field(default_factory=list)  # each [k_i] int64
    scales: Tensor | None = None  # [M] float32 when vectors are held as int8: row i is vectors[i] * scales[i]
    dense_dtype: torch.dtype = torch.float32  # what reads of int8-held rows return

    def __post_init__(self) -> None:
        if self.sources is None:
            self.sources = torch.full((self.num_ltm,), INITIAL_SOURCE, dtype=torch.int64)
        if len(self.cache_source_chunks) != len(self.cache_age_chunks):  # cache given without its sources
            self.cache_source_chunks = [torch.full_like(a, UNKNOWN_SOURCE) for a in self.cache_age_chunks]

    @property
    def num_ltm(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def num_cached(self) -> int:
        return sum(int(c.shape[0]) for c in self.cache_age_chunks)

    def _cat(self, chunks: list[Tensor], like: Tensor) -> Tensor:
        if not chunks:
            return like.new_empty((0, *like.shape[1:]))
        if len(chunks) > 1:
            merged = torch.cat(chunks)
            chunks[:] = [merged]  # keep the concatenation, later calls are free
        return chunks[0]

    @property
    def cache_vectors(self) -> Tensor:  # [C, d]
        return self._cat(self.cache_vector_chunks, self.vectors if self.scales is None
                         else self.vectors[:0].to(self.dense_dtype))  # an int8-held LTM caches float rows

    @property
    def cache_keys(self) -> Tensor:  # [C, s]
        return self._cat(self.cache_key_chunks, self.keys)

    @property
    def cache_ages(self) -> Tensor:  # [C] int64
        return self._cat(self.cache_age_chunks, self.ages)

    @property
    def cache_sources(self) -> Tensor:  # [C] int64
        return self._cat(self.cache_source_chunks, self.sources)

    def dense_vectors(self) -> Tensor:
        """The LTM rows [M, d] in a float dtype (dequantised when held as int8)."""
        return self.vectors if self.scales is None else dequantize_rows(self.vectors, self.scales, self.dense_dtype)

    def rows(self, positions: Tensor) -> Tensor:
        """Rows of ``[LTM ; cache]`` at ``positions`` without concatenating the two; int8-held rows
        are dequantised here, only the ones asked for. [n, d]"""
        if self.scales is None:
            return _gather_two(self.vectors, self.cache_vectors, positions)
        in_ltm = positions < self.num_ltm
        out = torch.empty(positions.shape[0], self.vectors.shape[1], dtype=self.dense_dtype)
        at = positions[in_ltm]
        out[in_ltm] = dequantize_rows(self.vectors[at], self.scales[at], self.dense_dtype)
        out[~in_ltm] = self.cache_vectors[positions[~in_ltm] - self.num_ltm].to(self.dense_dtype)
        return out

    def row_ages(self, positions: Tensor) -> Tensor:
        """Ages of ``[LTM ; cache]`` at ``positions``. [n] int64"""
        return _gather_two(self.ages, self.cache_ages, positions)

    def row_sources(self, positions: Tensor) -> Tensor:
        """Source update ids of ``[LTM ; cache]`` at ``positions`` (e.g. a retrieval's order). [n] int64"""
        return _gather_two(self.sources, self.cache_sources, positions)

    def forget(self, doomed: Tensor) -> Tensor | None:
        """Remove the rows and cached rows whose source is in ``doomed`` [u]; returns the kept LTM
        positions (ascending) when LTM rows went, None when only the cache changed or nothing did."""
        gone = torch.isin(self.cache_sources, doomed)
        if bool(gone.any()):
            keep = ~gone
            self.cache_vector_chunks[:] = [self.cache_vectors[keep]]
            self.cache_key_chunks[:] = [self.cache_keys[keep]]
            self.cache_age_chunks[:] = [self.cache_ages[keep]]
            self.cache_source_chunks[:] = [self.cache_sources[keep]]
        gone = torch.isin(self.sources, doomed)
        if not bool(gone.any()):
            return None
        kept = torch.nonzero(~gone).squeeze(1)
        self.vectors, self.keys = self.vectors[kept], self.keys[kept]
        self.ages, self.recall_frequencies = self.ages[kept], self.recall_frequencies[kept]
        if self.scales is not None:
            self.scales = self.scales[kept]
        self.sources = self.sources[kept]
        return kept


def _sources(stored: Tensor | None, rows: int, missing: int) -> Tensor:
    """Stored source ids as int64 [rows], or ``missing`` for every row when the file has none."""
    return stored.to(torch.int64) if stored is not None else torch.full((rows,), missing, dtype=torch.int64)


def _gather_two(first: Tensor, second: Tensor, positions: Tensor) -> Tensor:
    """``torch.cat([first, second])[positions]`` without materialising the concatenation."""
    n_first = first.shape[0]
    out = first.new_empty((positions.shape[0], *first.shape[1:]))
    in_first = positions < n_first
    n_in = int(in_first.sum())
    if bool(in_first[:n_in].all()):  # sorted-like: LTM positions first, write slices in place
        torch.index_select(first, 0, positions[:n_in], out=out[:n_in])
        out[n_in:] = second[positions[n_in:] - n_first].to(first.dtype)
    else:
        out[in_first] = first[positions[in_first]]
        out[~in_first] = second[positions[~in_first] - n_first].to(first.dtype)
    return out


@dataclass
class Retrieval:
    """Result of one retrieval at one layer.

    Positions index ``[LTM ; cache]`` of that layer (cache rows follow the M LTM rows).
    """

    order: Tensor  # [R] int64, the retrieved rows in prefix order (oldest first)
    selected_sorted: Tensor  # [R] int64, the top-R positions ascending (LTM ≥ R case)
    order_scores: Tensor  # [R] float32, score of each row of `order`
    scores: Tensor | None  # [M + C] all scores (exact mode); None in index mode
    repeated: bool = False  # True when the LTM held < R rows and indices were repeated


def retrieval_scores(queries: Tensor, keys: Tensor, chunk: int = SCAN_CHUNK) -> Tensor:
    """Dense score of every key: ``mean_t sigmoid(q_t · key)``.

    queries [T, s] or [B, T, s]; keys [M, s] → scores [M] or [B, M]. Chunked over M so the
    [chunk, B·T] logits buffer stays small for millions of keys.
    """
    batched = queries.dim() == 3
    q = queries if batched else queries.unsqueeze(0)
    b, t, s = q.shape
    qt = q.reshape(b * t, s).to(torch.float32).t().contiguous()  # [s, B·T]
    m = keys.shape[0]
    out = torch.empty((b, m), dtype=torch.float32)
    for start in range(0, m, chunk):
        stop = min(start + chunk, m)
        logits = keys[start:stop].to(torch.float32) @ qt  # [c, B·T]
        torch.sigmoid_(logits)
        out[:, start:stop] = logits.view(stop - start, b, t).mean(dim=2).t()
    return out if batched else out[0]


def _scores_at(queries: Tensor, keys: Tensor, positions: Tensor, chunk: int = 8192) -> Tensor:
    """``retrieval_scores(queries, keys[positions])`` without gathering all rows at once.

    queries [T, s], keys [M, s], positions [n] → [n]. Rows are gathered ``chunk`` at a time
    (8 MiB at s = 256): a one-shot gather of ~60k rows allocates ~60 MiB per call and pays a
    page fault per 4 KiB page, as much time as the matmul itself.
    """
    qt = queries.to(torch.float32).t().contiguous()  # [s, T]
    out = torch.empty(positions.shape[0], dtype=torch.float32)
    for a in range(0, positions.shape[0], chunk):
        b = min(a + chunk, positions.shape[0])
        logits = torch.index_select(keys, 0, positions[a:b]).to(torch.float32) @ qt  # [c, T]
        torch.mean(torch.sigmoid_(logits), dim=1, out=out[a:b])
    return out


def order_by_age(selected_sorted: Tensor, ages: Tensor) -> Tensor:
    """Order positions oldest first; equal ages: the later position first.

    selected_sorted [..., R] ascending positions, ages [..., R] their ages → [..., R] positions. This is what
    the official ``numpy.argsort(ages)[::-1]`` gives for R ≤ 16 (insertion sort, stable,
    then reversed); we apply the same rule for every R so results are deterministic.
    """
    rev = selected_sorted.flip(-1)
    perm = torch.sort(-ages.flip(-1).to(torch.int64), dim=-1, stable=True).indices
    return rev.gather(-1, perm)


def _select(
    layer: LTMLayer, positions: Tensor, scores: Tensor, r: int, all_scores: Tensor | None
) -> Retrieval:
    """Top-r of candidate ``positions`` with ``scores`` → ordered :class:`Retrieval`."""
    top = torch.topk(scores, r, sorted=False).indices
    chosen = positions[top]
    selected_sorted, perm = torch.sort(chosen)
    chosen_scores = scores[top][perm]
    order = order_by_age(selected_sorted, layer.row_ages(selected_sorted))
    # Scores in `order`: map each ordered position back through the sorted selection.
    idx = torch.searchsorted(selected_sorted, order)
    return Retrieval(order, selected_sorted, chosen_scores[idx], all_scores)


class LongTermMemory:
    """All layers' LTMs and caches plus the global merge counter (see module docstring)."""

    def __init__(self, config: LTMConfig, layers: Sequence[LTMLayer], update_step: int = 0):
        self.config = config
        self.layers: list[LTMLayer] = list(layers)
        self.update_step = update_step
        self.indexes: list[LTMIndex | None] = [None] * len(self.layers)

    # ------------------------------------------------------------------ construction / io
    @classmethod
    def empty(cls, config: LTMConfig, num_layers: int, dim: int, selector_dim: int) -> LongTermMemory:
        layers = [
            LTMLayer(
                torch.empty(0, dim),
                torch.empty(0, selector_dim),
                torch.empty(0, dtype=torch.int64),
                torch.empty(0, dtype=torch.float32),
            )
            for _ in range(num_layers)
        ]
        return cls(config, layers)

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], config: LTMConfig,
                     missing_source: int = INITIAL_SOURCE) -> LongTermMemory:
        """Build from ``ltm.{l}``, ``ltm_keys.{l}``, ... tensors (checkpoint or :meth:`state_dict`).

        ``ltm.{l}`` and ``ltm_keys.{l}`` are used as given (no copy), so tensors memory-mapped
        from safetensors stay mapped; only the small per-row ages/frequencies are converted.
        Cache tensors and ``ltm_update_step`` are optional (absent in published checkpoints), and so
        are the provenance tensors ``ltm_sources.{l}`` / ``ltm_cache_sources.{l}``: rows without
        them get ``missing_source`` (a checkpoint's rows are its initial memory's).
        """
        num_layers = 0
        while f"ltm.{num_layers}" in tensors:
            num_layers += 1
        layers = []
        for l in range(num_layers):
            vectors, keys = tensors[f"ltm.{l}"], tensors[f"ltm_keys.{l}"]
            cache = tensors.get(f"ltm_cache.{l}")
            layer = LTMLayer(
                vectors,
                keys,
                tensors[f"ltm_ages.{l}"].round().to(torch.int64),
                tensors[f"ltm_recall_frequencies.{l}"].to(torch.float32),
                sources=_sources(tensors.get(f"ltm_sources.{l}"), vectors.shape[0], missing_source),
                scales=tensors[f"ltm_scale.{l}"].to(torch.float32) if vectors.dtype == torch.int8 else None,
                dense_dtype=cache.dtype if cache is not None and cache.is_floating_point() else torch.float32,
            )
            if layer.scales is not None and tuple(layer.scales.shape) != (vectors.shape[0],):
                raise ValueError(f"ltm_scale.{l} has shape {tuple(layer.scales.shape)}, not ({vectors.shape[0]},)")
            if cache is not None and cache.shape[0] > 0:
                layer.cache_vector_chunks.append(cache)
                layer.cache_key_chunks.append(tensors[f"ltm_cache_keys.{l}"])
                layer.cache_age_chunks.append(tensors[f"ltm_cache_ages.{l}"].round().to(torch.int64))
                layer.cache_source_chunks.append(
                    _sources(tensors.get(f"ltm_cache_sources.{l}"), cache.shape[0], missing_source))
            layers.append(layer)
        step = tensors.get("ltm_update_step")
        return cls(config, layers, int(step.item()) if step is not None else 0)

    def state_dict(self) -> dict[str, Tensor]:
        """Flat tensors in checkpoint naming; ages saved as float like published checkpoints."""
        out: dict[str, Tensor] = {}
        for l, layer in enumerate(self.layers):
            out[f"ltm.{l}"] = layer.vectors
            if layer.scales is not None:
                out[f"ltm_scale.{l}"] = layer.scales
            out[f"ltm_keys.{l}"] = layer.keys
            out[f"ltm_ages.{l}"] = layer.ages.to(torch.float32)
            out[f"ltm_recall_frequencies.{l}"] = layer.recall_frequencies
            out[f"ltm_cache.{l}"] = layer.cache_vectors
            out[f"ltm_cache_keys.{l}"] = layer.cache_keys
            out[f"ltm_cache_ages.{l}"] = layer.cache_ages.to(torch.float32)
            out[f"ltm_sources.{l}"] = layer.sources
            out[f"ltm_cache_sources.{l}"] = layer.cache_sources
        out["ltm_update_step"] = torch.tensor(self.update_step, dtype=torch.int64)
        return out

    def fork(self) -> LongTermMemory:
        """An independent copy sharing tensor storage: updates replace tensors or append to the
        (copied) chunk lists, so neither copy sees the other's changes. Indexes are not shared."""
        layers = [
            dataclasses.replace(
                st,
                cache_vector_chunks=list(st.cache_vector_chunks),
                cache_key_chunks=list(st.cache_key_chunks),
                cache_age_chunks=list(st.cache_age_chunks),
                cache_source_chunks=list(st.cache_source_chunks),
            )
            for st in self.layers
        ]
        return LongTermMemory(self.config, layers, self.update_step)

    def to(self, dtype: torch.dtype) -> LongTermMemory:
        """A copy holding its vectors in ``dtype``; keys, ages and sources as they are. ``torch.int8``
        holds the LTM rows as int8 with a float32 scale per row (|error| <= max|row| / 254), dequantised
        on every read to the dtype they had; the cache stays as it is until it merges."""
        copy = self.fork()
        for st in copy.layers:
            dense = st.dense_vectors()
            if dtype == torch.int8:
                st.vectors, st.scales = quantize_rows(dense)
                st.dense_dtype = dense.dtype
            else:
                st.vectors, st.scales, st.dense_dtype = dense.to(dtype), None, dtype
                st.cache_vector_chunks[:] = [c.to(dtype) for c in st.cache_vector_chunks]
        return copy

    @property
    def dtype(self) -> torch.dtype | None:
        """How the LTM rows are held (torch.int8 when quantised); None without layers."""
        return self.layers[0].vectors.dtype if self.layers else None

    def forget(self, doomed: Tensor) -> None:
        """Remove every row and cached row whose source update id is in ``doomed`` [u], at every
        layer, keeping built indexes aligned with the rows that stay."""
        for l, st in enumerate(self.layers):
            kept = st.forget(doomed)
            if kept is not None and self.indexes[l] is not None:
                self.indexes[l].keep(kept)

    def source_counts(self) -> dict[int, int]:
        """Rows (LTM and cache, all layers) per source update id."""
        ids = torch.cat([t for st in self.layers for t in (st.sources, st.cache_sources)])
        values, counts = torch.unique(ids, return_counts=True)
        return dict(zip(values.tolist(), counts.tolist()))

    def info(self) -> dict[str, object]:
        """Sizes, age range and host-memory footprint, for `memllm memory info`."""
        ages = [st.ages for st in self.layers if st.num_ltm]
        nbytes = sum(
            t.numel() * t.element_size()
            for st in self.layers
            for t in (st.vectors, st.keys, st.ages, st.recall_frequencies, st.cache_vectors, st.cache_keys)
            + ((st.scales,) if st.scales is not None else ())
        )
        return {
            "ltm_vectors_per_layer": [st.num_ltm for st in self.layers],
            "ltm_cached_per_layer": self.layers[0].num_cached if self.layers else 0,
            "ltm_age_range": [int(min(a.min() for a in ages)), int(max(a.max() for a in ages))] if ages else None,
            "ltm_bytes": nbytes,
            "ltm_dtype": str(self.dtype).removeprefix("torch."),
            "ltm_update_step": self.update_step,
        }

    # ------------------------------------------------------------------ update
    def add_dropped(self, layer: int, vectors: Tensor, keys: Tensor, ages: Tensor,
                    sources: Tensor | None = None) -> None:
        """Steps 3-4 for one layer: age LTM and cache by K = len(vectors), then cache the rows.

        vectors [K, d], keys [K, s], ages [K] (their STM ages at drop time), sources [K] (the
        updates that wrote them; None: unknown).
        """
        k = int(vectors.shape[0])
        st = self.layers[layer]
        st.ages = st.ages + k
        st.cache_age_chunks[:] = [a + k for a in st.cache_age_chunks]
        st.cache_vector_chunks.append(vectors.detach())
        st.cache_key_chunks.append(keys.detach())
        st.cache_age_chunks.append(ages.detach().to(torch.int64))
        st.cache_source_chunks.append(
            sources.to("cpu", torch.int64) if sources is not None else torch.full((k,), UNKNOWN_SOURCE))

    def finish_update(self, k: int) -> list[Tensor] | None:
        """Step 5, once per injection: advance the counter and merge if it is time.

        Returns None when nothing was merged, else per layer the positions in
        ``[old LTM ; cache]`` of the rows that form the new LTM (ascending).
        """
        self.update_step += k
        if self.update_step < self.config.update_ltm_frequency * k:
            return None
        sources = [self._merge_layer(l) for l in range(len(self.layers))]
        self.update_step = 0
        return sources

    def _merge_layer(self, l: int) -> Tensor:
        cfg = self.config
        st = self.layers[l]
        m, c = st.num_ltm, st.num_cached
        rf = torch.cat(
            [
                st.recall_frequencies.to(torch.float32),
                torch.full((c,), float(cfg.initial_rf_when_moving_stm_to_ltm)),
            ]
        )
        rf -= cfg.decay_frequency
        alive = rf > _RF_ALIVE_THRESHOLD
        cache_v, cache_k, cache_a, cache_s = st.cache_vectors, st.cache_keys, st.cache_ages, st.cache_sources
        cache_scales = None
        if st.scales is not None:  # held as int8: the cache joins quantised
            cache_v, cache_scales = quantize_rows(cache_v)
        index = self.indexes[l]
        if int(alive.sum()) > cfg.retrieval_size:
            keep = torch.nonzero(alive).squeeze(1)  # [n] ascending
            st.vectors = _gather_two(st.vectors, cache_v, keep)
            st.keys = _gather_two(st.keys, cache_k, keep)
            st.ages = _gather_two(st.ages, cache_a, keep)
            st.sources = _gather_two(st.sources, cache_s, keep)
            if cache_scales is not None:
                st.scales = _gather_two(st.scales, cache_scales, keep)
            st.recall_frequencies = rf[keep]
            if index is not None:
                index.add(cache_k)
                index.keep(keep)
        else:
            keep = torch.arange(m + c)
            st.vectors = torch.cat([st.vectors, cache_v.to(st.vectors.dtype)])
            st.keys = torch.cat([st.keys, cache_k.to(st.keys.dtype)])
            st.ages = torch.cat([st.ages, cache_a])
            st.sources = torch.cat([st.sources, cache_s])
            if cache_scales is not None:
                st.scales = torch.cat([st.scales, cache_scales])
            st.recall_frequencies = rf + cfg.decay_frequency
            if index is not None:
                index.add(cache_k)
        st.cache_vector_chunks.clear()
        st.cache_key_chunks.clear()
        st.cache_age_chunks.clear()
        st.cache_source_chunks.clear()
        return keep

    # ------------------------------------------------------------------ retrieval
    def build_index(self, layer: int | None = None, **index_kwargs: object) -> None:
        """Build an :class:`LTMIndex` for one layer (or all), enabling ``mode="index"``.

        ``min_candidates`` defaults to 24·R (measured on the clustered keys of
        :mod:`memllm.bench.ltm` at 1.5M: mean recall of the exact top R ≈ 0.97-0.98 over 8
        queries; 16·R gives ≈ 0.95).
        """
        index_kwargs.setdefault("min_candidates", 24 * self.config.retrieval_size)
        targets = range(len(self.layers)) if layer is None else [layer]
        for l in targets:
            self.indexes[l] = LTMIndex(**index_kwargs).build(self.layers[l].keys)  # type: ignore[arg-type]

    def retrieve(self, layer: int, queries: Tensor, mode: RetrievalMode = "exact") -> Retrieval:
        """Top-R rows of ``[LTM ; cache]`` for queries [T, s], ordered oldest first.

        If the LTM holds fewer than R rows the official code repeats LTM positions cyclically
        (0, 1, ..., M-1, 0, ...) and ignores the cache; we do the same (no age ordering).
        """
        st = self.layers[layer]
        r = self.config.retrieval_size
        m = st.num_ltm
        if m < r:
            return self._repeat(st, queries)
        if mode == "exact":
            scores = retrieval_scores(queries, st.keys)
            if st.num_cached:
                scores = torch.cat([scores, retrieval_scores(queries, st.cache_keys)])
            return _select(st, torch.arange(scores.shape[0]), scores, r, scores)
        if mode != "index":
            raise ValueError(f"unknown retrieval mode {mode!r}")
        index = self.indexes[layer]
        if index is None or index.size != m:
            raise RuntimeError(f"layer {layer}: no up-to-date index; call build_index() first")
        cand = index.candidates(queries)
        if cand.shape[0] < r:  # too few proposals (tiny LTM): fall back to the exact scan
            return self.retrieve(layer, queries, "exact")
        scores = _scores_at(queries, st.keys, cand)
        if st.num_cached:
            cand = torch.cat([cand, torch.arange(m, m + st.num_cached)])
            scores = torch.cat([scores, retrieval_scores(queries, st.cache_keys)])
        return _select(st, cand, scores, r, None)

    def retrieve_batch(
        self, layer: int, queries: Tensor, mode: RetrievalMode = "exact"
    ) -> list[Retrieval]:
        """Per-batch-row retrieval for queries [B, T, s] (our extension; official is batch 1).

        In exact mode the B·T query rows share one pass over the keys.
        """
        st = self.layers[layer]
        if mode != "exact" or st.num_ltm < self.config.retrieval_size:
            return [self.retrieve(layer, q, mode) for q in queries]
        scores = retrieval_scores(queries, st.keys)  # [B, M]
        if st.num_cached:
            scores = torch.cat([scores, retrieval_scores(queries, st.cache_keys)], dim=1)
        positions = torch.arange(scores.shape[1])
        r = self.config.retrieval_size
        return [_select(st, positions, row, r, row) for row in scores]

    def _repeat(self, st: LTMLayer, queries: Tensor) -> Retrieval:
        r, m = self.config.retrieval_size, st.num_ltm
        if m == 0:
            raise ValueError("cannot retrieve from an empty LTM")
        scores = retrieval_scores(queries, st.keys)  # [M]
        order = torch.arange(r) % m
        return Retrieval(order, order.clone(), scores[order], scores, repeated=True)
