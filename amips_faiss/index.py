"""IndexAMIPS: a FAISS-style inner-product index whose IVF lists are probed in the order a learned
router predicts, with a calibrated confidence test and a fallback.

Search, batched end to end: validate → router scores lists → probe rounds that scan the lists with
the *original* queries (faiss ``search_preassigned``, or BLAS grouped by list for big batches of flat
lists: see ``scan``) → confidence test → unsure queries get more lists, then the fallback (exact,
plain IVF, or none) → ``D [n, k] float32, I [n, k] int64``.
"""
from __future__ import annotations

import math
import threading
import time
import warnings
from dataclasses import dataclass, replace

import faiss
import numpy as np
import threadpoolctl
import torch

from . import confidence
from .nn import KeyNet, SupportNet
from .routing import CentroidRouter, KeyNetProjectionRouter, Router, SupportNetRouter
from .scan import EMPTY_SCORE, SCAN_METHODS, FlatListViews, is_flat, scan
from .targets import augment_queries, split_queries, support_values, transplant_queries
from .training import TrainConfig, train_direct, train_router
from .validation import check_fraction, check_ids, check_positive_int, check_vectors

ROUTERS = ("centroid", "linear", "supportnet", "keynet")
FALLBACKS = ("exact", "ivf", "none")


@dataclass
class SearchParametersAMIPS:
    """Per-call search settings; a field left None takes the index's attribute of the same name.

    nprobe: lists probed in the first round. max_nprobe: lists after which an unsure query goes to
    the fallback (rounds double nprobe up to it). target_recall: the match rate (recall@1) to reach,
    via the margin calibrated on held-out queries (an index whose ``target_recall`` is None probes a
    fixed ``nprobe`` lists, as faiss IVF does). margin: an explicit confidence margin τ that
    overrides target_recall: ``math.inf`` = always sure, i.e. fixed probing of ``nprobe`` lists;
    ``-math.inf`` = never sure: every query runs all rounds and the fallback. fallback: "exact" (scan every list not
    yet probed: the exact answer for a flat index), "ivf" (the ``fallback_nprobe`` lists of plain
    centroid routing) or "none". scan: how lists are scanned, "auto" (BLAS grouped by list for big
    batches of flat lists, else faiss), "faiss" (always ``search_preassigned``: bit-identical to
    faiss's own IVF search) or "blas" (see ``amips_faiss.scan``). blend: the weight λ in [0, 1] of
    the router's first-list prediction in the confidence test (see ``amips_faiss.confidence``);
    None = chosen with the margin by calibration (0 with an explicit margin).
    """
    nprobe: int | None = None
    max_nprobe: int | None = None
    target_recall: float | None = None
    margin: float | None = None
    fallback: str | None = None
    fallback_nprobe: int | None = None
    scan: str | None = None
    blend: float | None = None


@dataclass
class SearchStats:
    """What the last search did: mean lists probed per query (fallback included), rounds run,
    share of queries that reached the fallback, router seconds per query, total seconds."""
    n_queries: int = 0
    mean_lists_probed: float = 0.0
    rounds: int = 0
    fallback_share: float = 0.0
    router_seconds_per_query: float = 0.0
    seconds: float = 0.0


def set_num_threads(n: int) -> None:
    """Set the threads of faiss (OpenMP), torch and numpy's BLAS together."""
    n = check_positive_int(n, "n")
    faiss.omp_set_num_threads(n)
    torch.set_num_threads(n)
    threadpoolctl.threadpool_limits(n)


def row_fingerprints(x: np.ndarray) -> np.ndarray:
    """64-bit FNV-1a hash of each row's float32 bytes: ``[n, d]`` → ``[n] uint64``."""
    words = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    h = np.full(len(words), 0xCBF29CE484222325, np.uint64)
    prime = np.uint64(0x100000001B3)
    for j in range(words.shape[1]):
        h = (h ^ words[:, j]) * prime
    return h


class IndexAMIPS:
    """Maximum inner product search over IVF lists probed by a learned router.

    ``IndexAMIPS(d, nlist, router)`` owns a ``faiss.IndexIVFFlat`` (inner product);
    ``IndexAMIPS.from_ivf(ivf)`` wraps a user's trained faiss IVF index of any kind without copying
    its lists. Routers: "centroid" (plain IVF), "linear" (learned linear per-list router),
    "supportnet" (multi-output SupportNet predicting each list's support value h_c(q)), "keynet"
    (KeyNet query projection). ``width``, ``depth`` and ``linear_rank`` size the router net.

    Keys added after ``train`` that the router has not seen are kept in an exactly scanned buffer,
    so they are never missed; ``refit`` moves them into the lists and retrains the router.
    """

    def __init__(self, d: int, nlist: int, router: str = "supportnet", *, width: int | None = None,
                 depth: int | None = None, linear_rank: int | None = None):
        d = check_positive_int(d, "d")
        nlist = check_positive_int(nlist, "nlist")
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        self._setup(ivf, router, width, depth, linear_rank)

    @classmethod
    def from_ivf(cls, ivf_index, router: str = "supportnet", **router_size) -> "IndexAMIPS":
        """Wrap an existing trained faiss IVF index (IVFFlat, IVFScalarQuantizer, IVFPQ, fast-scan,
        or an index_factory result holding one). Its lists are used in place, not copied."""
        ivf = faiss.downcast_index(ivf_index) if isinstance(ivf_index, faiss.Index) else None
        if not isinstance(ivf, faiss.IndexIVF):
            raise TypeError(f"from_ivf needs a faiss IVF index (a pre-transform such as OPQ or PCA in front of "
                            f"it is not supported), got {type(ivf_index).__name__}")
        if ivf.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError("from_ivf needs an inner-product IVF index (faiss.METRIC_INNER_PRODUCT)")
        if not ivf.is_trained:
            raise RuntimeError("from_ivf needs a trained IVF index: call ivf.train(x) first")
        index = cls.__new__(cls)
        index._setup(ivf, router, **router_size)
        index._owner = ivf_index  # the downcast proxy does not own the C++ index: keep the owner alive
        index._trained_fingerprints = None  # the user's own keys go straight into their lists
        return index

    def _setup(self, ivf, router: str, width=None, depth=None, linear_rank=None) -> None:
        if router not in ROUTERS:
            raise ValueError(f"unknown router {router!r}; choose one of {ROUTERS}")
        self.ivf = ivf
        self._centroids = None
        self.router_name = router
        self.router_size = {"width": width, "depth": depth, "linear_rank": linear_rank}
        self.buffer = faiss.IndexIDMap2(faiss.IndexFlatIP(ivf.d))
        self.router: Router | None = None
        self._trained_fingerprints: np.ndarray | None = np.zeros(0, np.uint64)
        self.calibration_queries: np.ndarray | None = None
        self.calibration_values: np.ndarray | None = None
        self._calibration_cache: dict = {}
        self._lock = threading.Lock()
        self.nprobe, self.max_nprobe = 1, max(1, ivf.nlist // 4)
        self.target_recall: float | None = None
        self.fallback, self.fallback_nprobe = "exact", max(1, ivf.nlist // 4)
        self.scan = "auto"
        self.stats = SearchStats()
        self.train_summary: dict = {}
        if ivf.is_trained:
            self._make_router()

    # ------------------------------------------------------------ faiss-style attributes

    @property
    def d(self) -> int:
        return self.ivf.d

    @property
    def nlist(self) -> int:
        return self.ivf.nlist

    @property
    def ntotal(self) -> int:
        return int(self.ivf.ntotal + self.buffer.ntotal)

    @property
    def metric_type(self) -> int:
        return faiss.METRIC_INNER_PRODUCT

    @property
    def is_trained(self) -> bool:
        return bool(self.ivf.is_trained) and self.router is not None

    def __repr__(self) -> str:
        return (f"IndexAMIPS(d={self.d}, nlist={self.nlist}, router={self.router_name!r}, ntotal={self.ntotal}, "
                f"buffer={self.buffer.ntotal}, target_recall={self.target_recall}, fallback={self.fallback!r})")

    def centroids(self) -> np.ndarray:
        """The IVF centroids ``[nlist, d] float32`` (read from the quantizer once it is trained)."""
        if not self.ivf.is_trained:
            raise RuntimeError("the IVF lists are untrained: call index.train(keys, queries) first")
        if self._centroids is None:
            self._centroids = self.ivf.quantizer.reconstruct_n(0, self.nlist)
        return self._centroids

    # ------------------------------------------------------------ training

    def train(self, xb: np.ndarray | None = None, queries: np.ndarray | None = None, *, steps: int = 4000,
              batch_size: int = 512, time_limit: float | None = 360.0, augment: int = 1, transplant: float = 3.0,
              n_calibration: int = 5000,
              n_validation: int = 1000, target_recall: float = 0.95, seed: int = 0, progress: bool = True,
              checkpoint: str | None = None, device: str | None = None) -> "IndexAMIPS":
        """Learn the lists (faiss k-means on ``xb``, if untrained) and the router for ``queries``.

        xb ``[N, d]``: the keys the router learns (default: the keys already in the index).
        queries ``[n, d]``: samples of the query traffic. Without them, perturbed key directions stand
        in (a proxy, with a warning). Part of the queries is held out to validate training and to
        calibrate the confidence margin; the rest, plus ``augment`` noisy copies and ``transplant`` ×
        as many synthetic queries near other keys (``targets.transplant_queries``), trains the router.
        ``time_limit`` (seconds) bounds the router's training; ``checkpoint`` makes it resumable.
        """
        if not isinstance(transplant, (int, float)) or not transplant >= 0:
            raise ValueError(f"transplant must be a number >= 0, got {transplant!r}")
        if xb is not None:
            xb = check_vectors(xb, "xb", d=self.d)
            if not self.ivf.is_trained:
                if len(xb) < self.nlist:
                    raise ValueError(f"training needs at least nlist={self.nlist} vectors, got {len(xb)}")
                self.ivf.train(xb)
            assign = self.ivf.quantizer.assign(xb, 1).reshape(-1)
        else:
            if not self.ivf.is_trained:
                raise RuntimeError("the IVF lists are untrained: pass the keys xb to train()")
            self._flush_buffer()
            xb, assign = self._stored_keys()
            if len(xb) == 0:
                raise RuntimeError("the index holds no keys to learn from: pass xb or add keys first")
        rng = np.random.default_rng(seed)
        if queries is None:
            warnings.warn("train() got no queries: the router learns from perturbed key directions, a proxy "
                          "for real traffic; pass queries from your workload for a better router", stacklevel=2)
            sample = xb[rng.choice(len(xb), size=min(len(xb), 20_000), replace=False)]
            directions = sample / np.linalg.norm(sample, axis=1, keepdims=True).clip(1e-12)
            queries = directions + 0.1 * rng.standard_normal(sample.shape).astype(np.float32) / math.sqrt(self.d)
        queries = check_vectors(queries, "queries", d=self.d)
        n = len(queries)
        cal_frac = min(0.25, n_calibration / n) if n_calibration else 0.0
        val_frac = min(0.1, n_validation / n) if self.router_name != "centroid" else 0.0
        parts = split_queries(queries, {"calibration": cal_frac, "validation": val_frac,
                                        "train": 1.0 - cal_frac - val_frac}, seed=seed)
        train_q = augment_queries(queries[parts["train"]], augment, seed=seed) if self.router_name != "centroid" \
            else queries[:0]
        held_out = np.concatenate([queries[parts["calibration"]], queries[parts["validation"]]])
        everything = np.concatenate([held_out, train_q])
        targets = support_values(xb, everything, assign, self.nlist, progress=progress)
        n_cal, n_val = len(parts["calibration"]), len(parts["validation"])
        cal, val, tr = (targets.subset(np.arange(0, n_cal)), targets.subset(np.arange(n_cal, n_cal + n_val)),
                        targets.subset(np.arange(n_cal + n_val, len(everything))))
        n_synthetic = int(transplant * len(parts["train"])) if self.router_name != "centroid" else 0
        if n_synthetic > 0:
            synthetic = transplant_queries(xb, train_q[:len(parts["train"])], tr.ids[:len(parts["train"])],
                                           n_synthetic, seed=seed)
            tr = tr.concat(support_values(xb, synthetic, assign, self.nlist, progress=progress))
            train_q = np.concatenate([train_q, synthetic])
        config = TrainConfig(steps=steps, batch_size=batch_size, time_limit=time_limit, seed=seed,
                             progress=progress, checkpoint=checkpoint, device=device,
                             eval_every=max(50, min(250, steps // 10)))
        model = self._new_model(xb, tr.values, train_q)
        torch.manual_seed(seed)
        if isinstance(model, SupportNet):
            self.train_summary = train_router(model, train_q, tr.cluster_values, held_out[n_cal:],
                                              val.cluster_values, config)
        elif isinstance(model, KeyNet):
            self.train_summary = train_direct(model, xb, train_q, tr, held_out[n_cal:], val, config)
        self._make_router(model)
        self.calibration_queries = held_out[:n_cal]
        self.calibration_values = cal.cluster_values
        self._calibration_cache = {}
        self._trained_fingerprints = np.unique(row_fingerprints(xb))
        self.target_recall = check_fraction(target_recall, "target_recall") if n_cal else None
        return self

    def refit(self, queries: np.ndarray | None = None, **train_options) -> "IndexAMIPS":
        """Move the buffered keys into their lists and retrain the router on all stored keys."""
        return self.train(None, queries, **train_options)

    def _new_model(self, xb: np.ndarray, values: np.ndarray, queries: np.ndarray):
        """A fresh, untrained router net of the configured kind, or None for "centroid"."""
        size = {k: v for k, v in self.router_size.items() if v is not None}
        if self.router_name == "keynet":
            size.pop("linear_rank", None)
            return KeyNet(self.d, 1, **{"width": 256, "depth": 2, **size},
                          scale=float(np.median(np.linalg.norm(xb, axis=1))))
        if self.router_name == "centroid":
            return None
        q_norm = np.linalg.norm(queries, axis=1).clip(1e-12)
        scale = float(np.median(np.abs(values) / q_norm)) or 1.0
        if self.router_name == "linear":
            size.update(depth=0, width=1)
        model = SupportNet(self.d, self.nlist, **{"width": 64, "depth": 2, **size}, scale=scale)
        model.init_linear(torch.as_tensor(self.centroids() / scale))
        return model

    def _make_router(self, model=None) -> None:
        if self.router_name == "centroid":
            self.router = CentroidRouter(self.ivf.quantizer, self.centroids())
        elif isinstance(model, SupportNet):
            self.router = SupportNetRouter(model)
        elif isinstance(model, KeyNet):
            self.router = KeyNetProjectionRouter(model, self.ivf.quantizer, self.centroids())

    # ------------------------------------------------------------ keys

    def add(self, x: np.ndarray) -> None:
        """Add keys ``[n, d]`` with ids ntotal, ntotal+1, ... (as faiss does)."""
        x = check_vectors(x, "x", d=self.d, allow_empty=True)
        self.add_with_ids(x, np.arange(self.ntotal, self.ntotal + len(x), dtype=np.int64))

    def add_with_ids(self, x: np.ndarray, ids) -> None:
        """Add keys ``[n, d]`` with user ids ``[n] int64``. Keys the router was not trained on go to
        the exactly scanned buffer until ``refit``."""
        x = check_vectors(x, "x", d=self.d, allow_empty=True)
        ids = check_ids(ids, len(x))
        if not self.is_trained:
            raise RuntimeError("add before train: call index.train(keys, queries) first")
        if not len(x):
            return
        if self._trained_fingerprints is None or self.router_name == "centroid":
            known = np.ones(len(x), bool)
        else:
            fp = row_fingerprints(x)
            pos = np.searchsorted(self._trained_fingerprints, fp).clip(0, max(0, len(self._trained_fingerprints) - 1))
            known = self._trained_fingerprints[pos] == fp if len(self._trained_fingerprints) else np.zeros(len(x), bool)
        if known.any():
            self.ivf.add_with_ids(np.ascontiguousarray(x[known]), np.ascontiguousarray(ids[known]))
        if not known.all():
            self.buffer.add_with_ids(np.ascontiguousarray(x[~known]), np.ascontiguousarray(ids[~known]))
            if self.buffer.ntotal > max(1000, 0.05 * self.ivf.ntotal):
                warnings.warn(f"{self.buffer.ntotal} keys the router was not trained on are scanned exactly on "
                              "every search; call index.refit(queries) to route them", stacklevel=2)

    def remove_ids(self, ids) -> int:
        """Remove keys by id; returns how many were removed."""
        ids = check_ids(ids)
        if not self.is_trained:
            raise RuntimeError("remove_ids before train: the index is empty")
        batch = faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))
        hashed = self.ivf.direct_map.type == faiss.DirectMap.Hashtable  # faiss then needs an id array
        ivf_sel = faiss.IDSelectorArray(len(ids), faiss.swig_ptr(ids)) if hashed else batch
        return int(self.ivf.remove_ids(ivf_sel) + self.buffer.remove_ids(batch))

    def reset(self) -> None:
        """Remove every key; the lists and the router stay trained."""
        self.ivf.reset()
        self.buffer.reset()

    def reconstruct(self, key: int) -> np.ndarray:
        """The stored vector ``[d] float32`` of id ``key`` (approximate for compressed IVF kinds)."""
        key = int(check_ids(np.array([key]), name="id")[0])
        try:
            return self.buffer.reconstruct(key)
        except RuntimeError:
            pass
        self._ensure_direct_map()
        try:
            return self.ivf.reconstruct(key)
        except RuntimeError:
            raise KeyError(f"id {key} is not in the index") from None

    def _ensure_direct_map(self) -> None:
        if self.ivf.direct_map.type == faiss.DirectMap.NoMap:
            self.ivf.set_direct_map_type(faiss.DirectMap.Hashtable)

    def _stored_keys(self) -> tuple[np.ndarray, np.ndarray]:
        """All keys held in the lists, ``[ntotal, d]``, and their list numbers ``[ntotal]``."""
        invlists = self.ivf.invlists
        sizes = np.array([invlists.list_size(i) for i in range(self.nlist)], np.int64)
        ids = np.empty(int(sizes.sum()), np.int64)
        offset = 0
        for i in np.flatnonzero(sizes):
            ids[offset:offset + sizes[i]] = faiss.rev_swig_ptr(invlists.get_ids(int(i)), int(sizes[i]))
            offset += sizes[i]
        self._ensure_direct_map()
        keys = self.ivf.reconstruct_batch(ids) if len(ids) else np.zeros((0, self.d), np.float32)
        return np.ascontiguousarray(keys, np.float32), np.repeat(np.arange(self.nlist), sizes)

    def _flush_buffer(self) -> None:
        if self.buffer.ntotal:
            ids = faiss.vector_to_array(self.buffer.id_map).astype(np.int64)
            keys = faiss.downcast_index(self.buffer.index).reconstruct_n(0, self.buffer.ntotal)
            self.ivf.add_with_ids(keys, ids)
            self.buffer.reset()

    # ------------------------------------------------------------ search

    def search(self, xq: np.ndarray, k: int, params: SearchParametersAMIPS | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """The k keys of largest inner product with each query.

        xq ``[n, d]`` (any real dtype). Returns ``D [n, k] float32`` (descending) and ``I [n, k]
        int64`` ids, padded with −FLT_MAX / −1 like faiss. ``index.stats`` then tells what it did.
        """
        xq = check_vectors(xq, "xq", d=self.d)
        k = check_positive_int(k, "k")
        if not self.is_trained:
            raise RuntimeError("search before train: call index.train(keys, queries) and index.add(keys)")
        p = self._resolve(params)
        start_time = time.perf_counter()
        n, nlist = len(xq), self.nlist
        D = np.full((n, k), EMPTY_SCORE, np.float32)
        I = np.full((n, k), -1, np.int64)
        if self.buffer.ntotal:  # keys the router has not seen: scanned exactly for every query
            _merge_into(D, I, np.arange(n), *self.buffer.search(xq, k))
        ends = confidence.probe_schedule(p.nprobe, p.max_nprobe, nlist) if p.margin < math.inf else \
            [min(p.nprobe, nlist)]
        router_seconds = -time.perf_counter()
        views = FlatListViews(self.ivf)  # built once if a round scans flat lists by BLAS
        rank = self.router.ranker(xq)  # scores the batch once; each round ranks its active rows
        router_seconds += time.perf_counter()
        q_norm = np.linalg.norm(xq, axis=1)
        first_scores = None  # the router's score of each query's first list
        probed = np.zeros(n, np.int64)
        active, begin, rounds = np.arange(n), 0, 0
        probed_lists = np.zeros((n, 0), np.int64)  # lists probed so far by the active rows
        for end in ends:
            t = time.perf_counter()
            route_scores, route_lists = rank(active, min(end + 1, nlist))
            router_seconds += time.perf_counter() - t
            if first_scores is None:
                first_scores = route_scores[:, 0].astype(np.float64)
            lists = route_lists[:, begin:end]
            coarse = route_scores[:, begin:end] if isinstance(self.router, CentroidRouter) else None
            _merge_into(D, I, active, *self._scan(xq[active], k, lists, coarse, p.scan, views))
            probed[active] += (lists >= 0).sum(axis=1)
            rounds += 1
            next_scores = route_scores[:, end] if end < route_scores.shape[1] else np.full(len(active), -np.inf)
            # the best score found: target_recall is calibrated for the match rate (recall@1)
            found = np.where(D[active, 0] <= EMPTY_SCORE, -np.inf, D[active, 0])
            unsure = confidence.gaps(next_scores, found, q_norm[active], first_scores[active], p.blend) > p.margin
            active, probed_lists, begin = active[unsure], route_lists[unsure, :end], end
            if not len(active):
                break
        n_fallback = len(active) if p.fallback != "none" else 0
        if n_fallback:
            probed[active] += self._fallback(xq, k, active, probed_lists, p, D, I, views)
        self.stats = SearchStats(n, float(probed.mean()), rounds, n_fallback / n, router_seconds / n,
                                 time.perf_counter() - start_time)
        return D, I

    def _resolve(self, params: SearchParametersAMIPS | None) -> SearchParametersAMIPS:
        """Merge per-call parameters with the index defaults, validate them, and fix the margin."""
        if params is not None and not isinstance(params, SearchParametersAMIPS):
            raise TypeError(f"params must be SearchParametersAMIPS, got {type(params).__name__}")
        defaults = SearchParametersAMIPS(self.nprobe, self.max_nprobe, self.target_recall, None, self.fallback,
                                         self.fallback_nprobe, self.scan)
        p = replace(defaults, **{k: v for k, v in vars(params or SearchParametersAMIPS()).items() if v is not None})
        nprobe = check_positive_int(p.nprobe, "nprobe", maximum=self.nlist)
        max_nprobe = max(nprobe, min(check_positive_int(p.max_nprobe, "max_nprobe"), self.nlist))
        fallback_nprobe = min(check_positive_int(p.fallback_nprobe, "fallback_nprobe"), self.nlist)
        if p.fallback not in FALLBACKS:
            raise ValueError(f"unknown fallback {p.fallback!r}; choose one of {FALLBACKS}")
        if p.scan not in SCAN_METHODS:
            raise ValueError(f"unknown scan {p.scan!r}; choose one of {SCAN_METHODS}")
        p = replace(p, nprobe=nprobe, max_nprobe=max_nprobe, fallback_nprobe=fallback_nprobe)
        if p.blend is not None:
            if not isinstance(p.blend, (int, float)) or not 0 <= p.blend <= 1:
                raise ValueError(f"blend must be a number in [0, 1], got {p.blend!r}")
            p = replace(p, blend=float(p.blend))
        if p.margin is not None:
            if not isinstance(p.margin, (int, float)) or math.isnan(p.margin):
                raise ValueError(f"margin must be a number, got {p.margin!r}")
            return replace(p, margin=float(p.margin), blend=p.blend or 0.0)
        if p.target_recall is None:
            return replace(p, margin=math.inf, blend=0.0)
        target = check_fraction(p.target_recall, "target_recall")
        if self.calibration_queries is None or not len(self.calibration_queries):
            raise RuntimeError("target_recall needs a calibration: train the index with queries first")
        margin, blend, _ = self.calibrate_margin(target, p)
        return replace(p, margin=margin, blend=blend)

    def calibrate_margin(self, target_recall: float, params: SearchParametersAMIPS) -> tuple[float, float, float]:
        """The margin τ and blend λ that reach ``target_recall`` on the calibration queries with this
        probe schedule and fallback at the fewest lists probed (λ from ``params.blend``, or tried
        over ``confidence.BLENDS``), and the calibration recall they give. Cached per setting."""
        key = (target_recall, params.nprobe, params.max_nprobe, params.fallback, params.fallback_nprobe, params.blend)
        with self._lock:
            if key in self._calibration_cache:
                return self._calibration_cache[key]
        cq, cv = self.calibration_queries, self.calibration_values
        ends = confidence.probe_schedule(params.nprobe, params.max_nprobe, self.nlist)
        scores, lists = self.router.route(cq, min(ends[-1] + 1, self.nlist))
        best = cv.argmax(axis=1)
        true_in_order = np.take_along_axis(cv, lists.clip(0), axis=1)
        true_in_order[lists < 0] = -np.inf
        found = np.maximum.accumulate(true_in_order, axis=1)
        rank = np.where((lists == best[:, None]).any(axis=1), (lists == best[:, None]).argmax(axis=1), self.nlist)
        q_norm = np.linalg.norm(cq, axis=1)
        padded = np.hstack([scores, np.full((len(cq), 1), -np.inf, np.float32)])
        round_correct = np.stack([rank < e for e in ends], axis=1)
        if params.fallback == "exact":
            fallback_correct = np.ones(len(cq), bool)
        elif params.fallback == "ivf":
            _, centroid_lists = self.ivf.quantizer.search(cq, params.fallback_nprobe)
            fallback_correct = round_correct[:, -1] | (centroid_lists == best[:, None]).any(axis=1)
        else:
            fallback_correct = round_correct[:, -1]
        fallback_lists = self.nlist - ends[-1] if params.fallback == "exact" else \
            params.fallback_nprobe if params.fallback == "ivf" else 0
        chosen = None  # (preference, result): reach the target, then fewest lists (or best recall)
        for blend in confidence.BLENDS if params.blend is None else (params.blend,):
            round_gaps = np.stack([confidence.gaps(padded[:, e], found[:, e - 1], q_norm, scores[:, 0], blend)
                                   for e in ends], axis=1)
            tau, recall = confidence.calibrate_margin(
                confidence.critical_margins(round_gaps, round_correct, fallback_correct), target_recall)
            cost = confidence.mean_lists(round_gaps, tau, ends, fallback_lists)
            preference = (recall >= target_recall, recall if recall < target_recall else -cost)
            if chosen is None or preference > chosen[0]:
                chosen = (preference, (tau, blend, recall))
        result = chosen[1]
        if result[2] < target_recall:
            warnings.warn(f"target_recall={target_recall} is out of reach with max_nprobe={params.max_nprobe} and "
                          f"fallback={params.fallback!r} (calibration recall {result[2]:.4f}); "
                          "raise max_nprobe or use fallback='exact'", stacklevel=3)
        with self._lock:
            self._calibration_cache[key] = result
        return result

    def _scan(self, xq: np.ndarray, k: int, lists: np.ndarray, coarse: np.ndarray | None, method: str,
              views: FlatListViews | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The k best keys of ``xq [n, d]`` in ``lists [n, p]`` (−1 skipped); see ``amips_faiss.scan``."""
        centroids = self.centroids() if coarse is None and not is_flat(self.ivf) else None
        return scan(self.ivf, xq, k, lists, coarse, centroids, method, views)

    def _fallback(self, xq, k, active, probed_lists, p, D, I, views) -> np.ndarray:
        """Scan the fallback's lists not yet probed by the unsure queries ``active``, merging into
        ``D, I``; returns the lists scanned per query. "exact" scans every other list."""
        done = np.zeros((len(active), self.nlist), bool)
        rows = np.repeat(np.arange(len(active)), probed_lists.shape[1])
        cols = probed_lists.reshape(-1)
        done[rows[cols >= 0], cols[cols >= 0]] = True
        coarse = None
        if p.fallback == "exact":
            lists = np.where(done, -1, np.arange(self.nlist)[None, :])
        else:
            coarse, lists = self.ivf.quantizer.search(xq[active], p.fallback_nprobe)
            lists = np.where(np.take_along_axis(done, lists.clip(0), axis=1), -1, lists)
        _merge_into(D, I, active, *self._scan(xq[active], k, lists, coarse, p.scan, views))
        return (lists >= 0).sum(axis=1)

    def predict(self, xq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The model's own answer, without confidence test or fallback: the router's predicted
        support value ``[n] float32`` and the best key id of the one list it ranks first ``[n] int64``."""
        xq = check_vectors(xq, "xq", d=self.d)
        if not self.is_trained:
            raise RuntimeError("predict before train: call index.train(keys, queries) first")
        scores, lists = self.router.route(xq, 1)
        if isinstance(self.router, KeyNetProjectionRouter):  # Euler: h(q) = <∇h(q), q>
            predicted = (self.router.project(xq) * xq).sum(axis=1) / np.linalg.norm(xq, axis=1).clip(1e-30)
        else:
            predicted = scores[:, 0]
        _, ids = self._scan(xq, 1, lists, scores if isinstance(self.router, CentroidRouter) else None, self.scan)
        return predicted.astype(np.float32), ids[:, 0]


def _merge_into(D: np.ndarray, I: np.ndarray, rows: np.ndarray, D_new: np.ndarray, I_new: np.ndarray) -> None:
    """Merge results ``D_new, I_new [len(rows), k]`` into rows of ``D, I``, keeping the k best."""
    if not len(rows):
        return
    k = D.shape[1]
    Dc = np.hstack([D[rows], D_new])
    Ic = np.hstack([I[rows], I_new])
    order = np.argsort(-Dc, axis=1, kind="stable")[:, :k]
    D[rows] = np.take_along_axis(Dc, order, axis=1)
    I[rows] = np.take_along_axis(Ic, order, axis=1)
