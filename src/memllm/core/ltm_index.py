"""A faiss-built partition of one layer's long-term-memory keys, to retrieve without a dense scan.

The published M+ retrieval scores every long-term key per layer per question. This index proposes
candidates (the keys of a few inverted lists) that the caller re-scores exactly, so the scores are the
true ones and recall is controlled by how many keys are visited. See `LTMIndex`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

# Rows per chunk when a pass over the keys needs a [chunk, ...] buffer.
SCAN_CHUNK = 1 << 17


class LTMIndex:
    """Approximate candidate generator over one layer's LTM keys: a k-means partition (IVF lists).

    Why not a plain ANN search: the retrieval score ``mean_t sigmoid(q_t · k)`` is not an inner
    product. We therefore *partition* the keys with k-means (L2, faiss) into inverted lists and
    choose which lists to visit; every key of a visited list is then scored exactly by the
    caller, so the returned scores are the true ones and recall is controlled by how many keys
    are visited. Lists are chosen as the union of (a) the lists ranked by an optimistic score,
    taken in that order until at least ``nprobe`` lists and ``min_candidates`` keys are
    covered, and (b) the ``per_row_probe`` centroids with the highest inner product with each
    query row (catches keys that one row likes a lot). The optimistic score of a list is the
    true score of its centroid ``mean_t sigmoid(q_t · c)`` plus ``spread_weight`` · (its RMS
    spread per dimension) · |gradient of the score at c| — a first-order estimate of how far
    its best keys exceed the centroid (mixed, wide lists hold the tails of several clusters).
    All of it comes from one [T, nlist] matmul plus one [nlist, T] × [T, s] matmul.

    Build is two-level (as faiss' ``two_level_clustering``): a coarse k-means with about
    sqrt(nlist) centroids splits a training sample, each coarse cell gets its own k-means
    (k-means++ seeds) with a share of the nlist lists proportional to its share of the sample,
    and every key is assigned to its L2-nearest list among the lists of its ``coarse_probe``
    nearest cells. Assignment thus costs M·sqrt(nlist)·(1 + coarse_probe) dot products
    instead of M·nlist (1.5M keys, nlist 9,798: ~400 instead of 9,798 per key). The keys
    themselves are never copied (only sampled rows and 64k-row chunks).

    Lists are stored as CSR ids only (``_offsets``, ``_members``: positions grouped by list),
    not as a second copy of the keys. Positions are kept aligned with the LTM: appends assign
    new keys to the globally nearest centroid; evictions filter the assignment array.
    Centroids are not retrained on updates; call :meth:`build` again if the key distribution
    drifts far from the one trained on.
    """

    def __init__(
        self,
        nlist: int | None = None,
        nprobe: int = 8,
        per_row_probe: int = 2,
        min_candidates: int = 24 * 2560,
        train_points_per_list: int = 16,
        niter: int = 8,
        coarse_lists: int | None = None,
        coarse_probe: int = 3,
        spread_weight: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.nlist_request = nlist
        self.nprobe = nprobe
        self.per_row_probe = per_row_probe
        self.min_candidates = min_candidates
        self.train_points_per_list = train_points_per_list
        self.niter = niter
        self.coarse_lists = coarse_lists
        self.coarse_probe = coarse_probe
        self.spread_weight = spread_weight
        self.seed = seed
        self.centroids = torch.empty(0)  # [nlist, s]
        self._centroids_t = torch.empty(0)  # [s, nlist] contiguous, for the query matmul
        self._assign = np.empty(0, dtype=np.int64)  # [M] list of every key
        self._sq_dist = np.empty(0, dtype=np.float32)  # [M] |key - its centroid|²
        self._spread = torch.empty(0)  # [nlist] per-list RMS distance to the centroid per dimension
        self._sizes = np.zeros(0, dtype=np.int64)  # [nlist] keys per list
        self._offsets = np.zeros(1, dtype=np.int64)  # [nlist + 1] CSR offsets
        self._members = np.empty(0, dtype=np.int64)  # [M] positions grouped by list, ascending

    @property
    def size(self) -> int:
        return int(self._assign.shape[0])

    @staticmethod
    def default_nlist(m: int) -> int:
        """About 8·sqrt(M) partitions (9,798 lists of ~150 keys at 1.5M).

        Fewer lists than natural clusters is harmful: k-means then parks unmatched clusters in
        low-norm "garbage" centroids whose score is low, and their keys are rarely visited.
        Measured at 1.5M (bench_ltm data, 8 queries, 16·R candidates): 4·sqrt(M) lists gave
        mean recall 0.92, 8·sqrt(M) 0.96; the build costs ~1.4× more.
        """
        return max(1, min(m // 16, int(8 * math.sqrt(max(m, 1)))))

    def build(self, keys: Tensor) -> LTMIndex:
        """Train centroids on samples of ``keys`` [M, s] and assign every key (two-level)."""
        m = int(keys.shape[0])
        nlist = max(1, min(self.nlist_request or self.default_nlist(m), m))
        n1 = self.coarse_lists or (round(math.sqrt(nlist)) if nlist >= 64 else 1)
        n1 = max(1, min(n1, nlist))
        g = torch.Generator().manual_seed(self.seed)
        if n1 == 1:
            self._set_centroids(self._kmeans(keys, nlist, g))
            self._assign, self._sq_dist = _nearest_centroid(keys, self.centroids)
            self._rebuild_lists()
            return self
        # 1. coarse k-means on a sample; a (larger) training sample split by coarse cell
        n_train = min(m, nlist * self.train_points_per_list)
        train_rows = torch.randperm(m, generator=g)[:n_train].sort().values.numpy()
        with _single_thread():  # many small problems: threads cost more than they give
            coarse = self._kmeans(keys, n1, g, points_per_list=64, rows=train_rows)
            cell_of = _nearest_centroid(keys[torch.from_numpy(train_rows)], torch.from_numpy(coarse))[0]
            # 2. per coarse cell: k-means on its training keys, with a share of the nlist lists
            #    proportional to its share of the sample
            by_cell = np.argsort(cell_of, kind="stable")
            bounds = np.concatenate([[0], np.cumsum(np.bincount(cell_of, minlength=n1))])
            pieces: list[np.ndarray] = []
            cell_base = np.zeros(n1 + 1, dtype=np.int64)  # fine lists of cell c: [base[c], base[c+1])
            for c in range(n1):
                rows = train_rows[by_cell[bounds[c] : bounds[c + 1]]]
                k2 = min(rows.shape[0], round(nlist * rows.shape[0] / n_train))
                if k2 > 0:
                    pieces.append(self._kmeans(keys, k2, g, rows=rows))
                cell_base[c + 1] = cell_base[c] + k2
        self._set_centroids(np.concatenate(pieces))
        # 3. assign every key to its L2-nearest list among the fine lists of its `coarse_probe`
        #    nearest coarse cells: a natural cluster cut by a coarse boundary still lands in one
        #    list. Cell by cell, so each step is one [rows, lists of the cell] matmul.
        probe = min(self.coarse_probe, n1)
        near = _nearest_centroid(keys, torch.from_numpy(coarse), k=probe)[0]
        near = near.reshape(-1)  # [M·probe]
        slots = np.argsort(near, kind="stable")  # (key, probe) slots grouped by cell, keys ascending
        slot_bounds = np.concatenate([[0], np.cumsum(np.bincount(near, minlength=n1))])
        del near
        best = np.full(m, -np.inf, dtype=np.float32)
        assign = np.zeros(m, dtype=np.int64)
        sq_dist = np.zeros(m, dtype=np.float32)
        chunk = SCAN_CHUNK // 2
        buf = torch.empty(min(chunk, m), int(keys.shape[1]))  # reused: no page faults per chunk
        for c in range(n1):
            lo, hi = int(cell_base[c]), int(cell_base[c + 1])
            if hi == lo:
                continue
            ct = self._centroids_t[:, lo:hi].contiguous()
            neg_half_norm = -0.5 * (self.centroids[lo:hi] ** 2).sum(dim=1)
            cell_slots = slot_bounds[c], slot_bounds[c + 1]
            for a in range(int(cell_slots[0]), int(cell_slots[1]), chunk):
                rows = slots[a : min(a + chunk, int(cell_slots[1]))] // probe
                rows_t = torch.from_numpy(rows)
                if keys.dtype == torch.float32:
                    sub = torch.index_select(keys, 0, rows_t, out=buf[: rows.shape[0]])
                else:
                    sub = keys[rows_t].to(torch.float32)
                val_t, arg_t = torch.addmm(neg_half_norm, sub, ct).max(dim=1)
                val, arg = val_t.numpy(), arg_t.numpy()
                better = val > best[rows]  # bookkeeping in numpy: cheaper than torch's small ops
                rows = rows[better]
                best[rows] = val[better]
                assign[rows] = arg[better] + lo
                sq_dist[rows] = (torch.linalg.vector_norm(sub, dim=1) ** 2).numpy()[better] - 2 * val[better]
        orphans = np.flatnonzero(best == -np.inf)  # all probed cells got no list (tiny cells)
        if orphans.shape[0]:
            assign[orphans], sq_dist[orphans] = _nearest_centroid(keys[torch.from_numpy(orphans)], self.centroids)
        self._assign, self._sq_dist = assign, np.maximum(sq_dist, 0)
        self._rebuild_lists()
        return self

    def _kmeans(
        self,
        keys: Tensor,
        k: int,
        g: torch.Generator,
        points_per_list: int | None = None,
        rows: np.ndarray | None = None,
    ) -> np.ndarray:
        """faiss k-means (L2, k-means++ seeds) with ``k`` centroids on a random sample of
        ``keys`` [M, s] (of ``keys[rows]`` if given) → [k, s]. Only the sample is copied."""
        n = int(keys.shape[0]) if rows is None else int(rows.shape[0])
        s = int(keys.shape[1])
        n_train = min(n, k * (points_per_list or self.train_points_per_list))
        pick = torch.randperm(n, generator=g)[:n_train].sort().values
        if rows is not None:
            pick = torch.from_numpy(rows)[pick]
        x = _as_f32_numpy(keys[pick])
        if k == 1:
            return x.mean(axis=0, keepdims=True).astype(np.float32)
        if n_train <= k:
            return np.ascontiguousarray(x[:k])
        import faiss  # imported when first used: it takes seconds to load

        km = faiss.Kmeans(
            s,
            k,
            niter=self.niter,
            seed=int(torch.randint(0, 2**31 - 1, (1,), generator=g)),
            spherical=False,
            max_points_per_centroid=n_train,  # we sampled already
            min_points_per_centroid=1,
        )
        km.train(x, init_centroids=_kmeans_pp(torch.from_numpy(x), k, g))
        return np.ascontiguousarray(km.centroids, dtype=np.float32)

    def _set_centroids(self, centroids: np.ndarray) -> None:
        self.centroids = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32))
        self._centroids_t = self.centroids.t().contiguous()

    def _rebuild_lists(self) -> None:
        self._members = np.argsort(self._assign, kind="stable").astype(np.int64, copy=False)
        self._sizes = np.bincount(self._assign, minlength=self.centroids.shape[0]).astype(np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self._sizes)]).astype(np.int64)
        sum_sq = np.bincount(self._assign, weights=self._sq_dist, minlength=self.centroids.shape[0])
        dim = max(1, int(self.centroids.shape[1]) if self.centroids.dim() == 2 else 1)
        self._spread = torch.from_numpy(np.sqrt(sum_sq / np.maximum(self._sizes, 1) / dim).astype(np.float32))

    def add(self, keys: Tensor) -> None:
        """Append keys [n, s] (positions M..M+n-1), e.g. the cache merged into the LTM."""
        ids, sq_dist = _nearest_centroid(keys, self.centroids)
        self._assign = np.concatenate([self._assign, ids])
        self._sq_dist = np.concatenate([self._sq_dist, sq_dist])
        self._rebuild_lists()

    def keep(self, positions: Tensor) -> None:
        """Keep only the rows at ascending ``positions`` (eviction), renumbering them 0..n-1."""
        self._assign = self._assign[positions.numpy()]
        self._sq_dist = self._sq_dist[positions.numpy()]
        self._rebuild_lists()

    def candidate_lists(self, queries: Tensor) -> np.ndarray:
        """Ids of the lists to visit for queries [T, s] (ascending). → [L] int64."""
        nlist = int(self.centroids.shape[0])
        logits = queries.to(torch.float32) @ self._centroids_t  # [T, nlist]
        chosen = np.zeros(nlist, dtype=bool)
        if self.per_row_probe > 0:
            top = torch.topk(logits, min(self.per_row_probe, nlist), dim=1, sorted=False).indices
            chosen[top.reshape(-1).numpy()] = True
        torch.sigmoid_(logits)
        centroid_scores = logits.mean(dim=0)  # [nlist] true score of each centroid
        if self.spread_weight > 0:
            # optimistic score of the list's best keys: score(c) + z·spread·|∇score(c)|, with
            # ∇score(c) = mean_t σ'(q_t·c) q_t (first order; isotropic spread per list)
            logits.mul_(1 - logits)  # σ' = σ(1 - σ), [T, nlist]
            grad = logits.t() @ queries.to(torch.float32)  # [nlist, s] (× T)
            grad_norm = torch.linalg.vector_norm(grad, dim=1) / logits.shape[0]
            centroid_scores += self.spread_weight * self._spread * grad_norm
        ranked = torch.argsort(centroid_scores, descending=True).numpy()
        enough = int(np.searchsorted(np.cumsum(self._sizes[ranked]), self.min_candidates)) + 1
        chosen[ranked[: max(self.nprobe, enough)]] = True
        return np.flatnonzero(chosen)

    def candidates(self, queries: Tensor) -> Tensor:
        """Positions of LTM keys worth scoring exactly for queries [T, s] (ascending). → [n] int64."""
        with _single_thread():  # [T, nlist] ops: thread sync costs more than it saves
            lists = self.candidate_lists(queries)
        lens = self._sizes[lists]
        total = int(lens.sum())
        if total == 0:
            return torch.empty(0, dtype=torch.int64)
        # member slots of the chosen lists, without a Python loop: start of the list + rank in it
        shift = np.repeat(self._offsets[lists] - (np.cumsum(lens) - lens), lens)
        slots = np.arange(total, dtype=np.int64) + shift
        out = self._members[slots]
        out.sort()  # ascending positions: the key gather then walks memory forwards
        return torch.from_numpy(out)


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Run torch and faiss on one thread inside the block (restored after).

    For many small k-means problems (a few thousand points each) thread start-up and
    barriers dominate: measured 142 ms vs 8 ms per k-means++ seeding on 2 busy cores.
    """
    import faiss

    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        faiss.omp_set_num_threads(faiss_threads)


def _kmeans_pp(x: Tensor, k: int, g: torch.Generator) -> np.ndarray:
    """k-means++ seeding (D² sampling) of ``k`` centroids among the rows of ``x`` [n, s] → [k, s].

    faiss seeds k-means with k random points; when the data has about as many natural
    clusters as k, ~1/e of the clusters then get no seed and end up merged into mixed lists
    whose centroid scores low, so their keys are rarely visited. D² sampling seeds far-apart
    points first and leaves almost no cluster unseeded. Sequential (k steps of one [n, s]
    mat-vec), so it is only used on the small per-cell samples of the two-level build.
    """
    n = int(x.shape[0])
    sq = (x * x).sum(dim=1)  # [n]
    chosen = [int(torch.randint(0, n, (1,), generator=g))]
    d2 = (sq - 2 * (x @ x[chosen[0]]) + sq[chosen[0]]).clamp_(min=0)
    for _ in range(1, k):
        total = float(d2.sum())
        i = int(torch.multinomial(d2, 1, generator=g)) if total > 0 else int(torch.randint(0, n, (1,), generator=g))
        chosen.append(i)
        torch.minimum(d2, (sq - 2 * (x @ x[i]) + sq[i]).clamp_(min=0), out=d2)
    return np.ascontiguousarray(x[chosen].numpy())


def _nearest_centroid(keys: Tensor, centroids: Tensor, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """L2-nearest centroid (as k-means trains) of every key [n, s].

    Returns (ids [n] int64, or [n, k] nearest first if k > 1; squared distance [n] float32 of
    every key to its nearest centroid). argmin |x - c|² = argmax (x·c - |c|²/2); a plain
    inner-product assignment would pull keys towards large-norm centroids.
    """
    n = int(keys.shape[0])
    ids = np.empty((n, k) if k > 1 else n, dtype=np.int64)
    sq_dist = np.empty(n, dtype=np.float32)
    ct = centroids.t().contiguous()  # [s, nlist]
    neg_half_norm = -0.5 * (centroids**2).sum(dim=1)  # [nlist]
    chunk = max(1024, min(SCAN_CHUNK, (1 << 24) // max(1, int(centroids.shape[0]))))  # ≤ 64 MiB
    logits = torch.empty(min(chunk, n), int(centroids.shape[0]))  # reused: no page faults per chunk
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        x = keys[a:b].to(torch.float32)
        lg = torch.addmm(neg_half_norm, x, ct, out=logits[: b - a])
        top, arg = torch.topk(lg, k, dim=1) if k > 1 else lg.max(dim=1, keepdim=True)
        ids[a:b] = arg.numpy() if k > 1 else arg[:, 0].numpy()
        sq_dist[a:b] = (torch.linalg.vector_norm(x, dim=1) ** 2 - 2 * top[:, 0]).clamp_(min=0).numpy()
    return ids, sq_dist


def _as_f32_numpy(t: Tensor) -> np.ndarray:
    """A float32 C-contiguous numpy view of ``t`` (copies only if dtype/layout demand it)."""
    t = t.detach()
    if t.dtype != torch.float32:
        t = t.to(torch.float32)
    return np.ascontiguousarray(t.numpy())
