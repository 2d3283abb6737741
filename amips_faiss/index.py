"""IndexAMIPS: a FAISS-style inner-product index whose IVF lists are probed in the order a learned
router predicts, with a calibrated confidence test and a fallback.

The facade only coordinates: training sets and routers are built in ``fitting``, searches run in
``probing`` (route → probe rounds scanned by ``scan`` → ``confidence`` test → fallback), settings
are checked in ``parameters``. The index owns the faiss lists, the router, the calibration queries,
a cache of calibrated margins and a readers–writer lock: searches run in parallel, ``add``,
``remove_ids``, ``reset`` and the end of ``train`` alone.
"""
from __future__ import annotations

import math
import threading
import time
import warnings
from dataclasses import replace

import faiss
import numpy as np
import threadpoolctl
import torch
from tqdm.auto import tqdm

from . import keystore, probing
from .confidence import FIRST_ROUNDS, Calibration, cheapest_first_round
from .fitting import build_training_set, fit_router, proxy_queries
from .locking import ReadWriteLock
from .nn import model_from_config
from .parameters import REQUIRED, SETTINGS, SearchParametersAMIPS, SearchStats
from .routing import LEARNED_ROUTERS, ROUTERS, Router, make_router
from .scan import is_flat, scan_plan
from .training import TrainConfig, make_config
from .validation import check_fraction, check_ids, check_positive_int, check_vectors

CUSTOM = "custom"  # router_name of an index given a user-built Router
ADD_BLOCK = 1 << 18  # keys added (and assigned to lists) at a time
RESOLVED_CACHE = 64  # per-call settings kept resolved (a service reuses a few)
LOUD_KMEANS = 100_000  # k-means on this many keys or more prints faiss's per-iteration log (progress=True)


def default_nlist(n_keys: int) -> int:
    """The default number of IVF lists for ``n_keys`` keys: 4·√N. The best count depends on the data
    (README, "Scaling"): GloVe 375k ran 1.76× faster at 4·√N than at √N, synthetic 1M keys with N/2,000
    true clusters 1.52× faster at √N."""
    return max(1, int(round(4 * math.sqrt(n_keys))))


def set_num_threads(n: int) -> None:
    """Set the threads of faiss (OpenMP), torch and numpy's BLAS together."""
    n = check_positive_int(n, "n")
    faiss.omp_set_num_threads(n)
    torch.set_num_threads(n)
    threadpoolctl.threadpool_limits(n)


class IndexAMIPS:
    """Maximum inner product search over IVF lists probed by a learned router.

    ``IndexAMIPS(d, nlist, router)`` owns a ``faiss.IndexIVFFlat`` (inner product);
    ``IndexAMIPS.from_ivf(ivf)`` wraps a user's trained faiss IVF index without copying its lists.
    Routers: "centroid" (plain IVF), "linear" (learned linear per-list router), "supportnet"
    (multi-output SupportNet predicting each list's support value h_c(q)), "keynet" (KeyNet query
    projection), or a user-built ``routing.Router`` (``from_ivf`` only). ``width``, ``depth`` and
    ``linear_rank`` size the router net (``linear_rank`` None: ``fitting.default_linear_rank``, full up
    to 1,024 lists; ``linear_rank=d`` keeps the full linear term).

    The search settings (``SearchParametersAMIPS``'s fields: ``nprobe``, ``max_nprobe``,
    ``target_recall``, ``margin``, ``fallback``, ``fallback_nprobe``, ``scan_method``, ``blend``) are
    attributes, checked when set; any other attribute is refused, as faiss does.

    Keys added after ``train`` that the router has not seen are kept in an exactly scanned buffer,
    so they are never missed; ``refit`` moves them into the lists and retrains the router.
    """

    def __init__(self, d: int, nlist: int, router: str = "supportnet", *, width: int | None = None,
                 depth: int | None = None, linear_rank: int | None = None):
        d = check_positive_int(d, "d")
        nlist = check_positive_int(nlist, "nlist")
        if isinstance(router, Router):
            raise TypeError("a user-built Router needs trained lists: use IndexAMIPS.from_ivf(ivf, router=...)")
        size = {"width": width, "depth": depth, "linear_rank": linear_rank}
        self._setup(faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT), router, size)

    @classmethod
    def from_ivf(cls, ivf_index, router: str | Router = "supportnet", **router_size) -> "IndexAMIPS":
        """Wrap an existing trained faiss IVF index (IVFFlat, IVFScalarQuantizer, IVFPQ, fast-scan,
        as ``index_factory("IVF1024,PQ32x4fs", d, faiss.METRIC_INNER_PRODUCT)`` makes them); a
        pre-transform in front of it (OPQ, PCA) is refused. Its lists are used in place, not copied.
        ``router`` may be a user-built ``routing.Router`` over these lists."""
        ivf = faiss.downcast_index(ivf_index) if isinstance(ivf_index, faiss.Index) else None
        if not isinstance(ivf, faiss.IndexIVF):
            raise TypeError(f"from_ivf needs a faiss IVF index (a pre-transform such as OPQ or PCA in front of "
                            f"it is not supported), got {type(ivf_index).__name__}")
        if ivf.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError("from_ivf needs an inner-product IVF index (faiss.METRIC_INNER_PRODUCT)")
        if not ivf.is_trained:
            raise RuntimeError("from_ivf needs a trained IVF index: call ivf.train(x) first")
        index = cls.__new__(cls)
        index._setup(ivf, router, {"width": None, "depth": None, "linear_rank": None, **router_size})
        index._owner = ivf_index  # the downcast proxy does not own the C++ index: keep the owner alive
        index._trained_fingerprints = None  # the user's own keys go straight into their lists
        return index

    def _setup(self, ivf, router: str | Router, size: dict) -> None:
        if isinstance(router, Router):
            kind, built = CUSTOM, router
        elif router in ROUTERS:
            kind, built = router, None
        else:
            raise ValueError(f"unknown router {router!r}; choose one of {ROUTERS} or pass a Router")
        unknown = set(size) - {"width", "depth", "linear_rank"}
        if unknown:
            raise TypeError(f"unknown router size argument(s) {sorted(unknown)}; use width, depth, linear_rank")
        self._ivf = ivf
        self._owner = None
        self._router_name, self._router_size = kind, dict(size)
        self._centroids = None
        self._buffer = faiss.IndexIDMap2(faiss.IndexFlatIP(ivf.d))
        self._trained_fingerprints: np.ndarray | None = np.zeros(0, np.uint64)
        self._calibration_queries: np.ndarray | None = None
        self._calibration_values: np.ndarray | None = None
        self._calibrations: dict = {}
        self._calibration_mutex = threading.Lock()
        self._lock = ReadWriteLock()
        self._stats = SearchStats()
        self._train_summary: dict = {}
        quarter = max(1, ivf.nlist // 4)
        self._resolved: dict = {}  # settings resolved (margin and blend calibrated) per call's params, until they change
        self._settings = SearchParametersAMIPS(nprobe=1, max_nprobe=quarter, fallback="exact",
                                               fallback_nprobe=quarter, scan_method="auto", confidence_rank=1,
                                               calibration_bins=1, adaptive_margin=True)
        self._router = built
        if kind == "centroid" and ivf.is_trained:  # nothing to learn: ready now
            self._router = make_router(kind, ivf.quantizer, self.centroids())

    # ------------------------------------------------------------ attributes

    def __getattr__(self, name: str):
        if name in SETTINGS and "_settings" in self.__dict__:
            return getattr(self._settings, name)
        raise AttributeError(f"IndexAMIPS has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        elif name in SETTINGS:
            if value is None and name in REQUIRED:
                raise ValueError(f"{name} cannot be None on an index")
            if name == "target_recall" and value is not None and self._calibration_queries is None:
                raise RuntimeError("target_recall needs a calibration: train the index with queries first")
            setattr(self._settings, name, value)
            self._resolved = {}
        else:
            raise AttributeError(f"IndexAMIPS has no setting {name!r}; its settings are {SETTINGS}")

    @property
    def d(self) -> int:
        return self._ivf.d

    @property
    def nlist(self) -> int:
        return self._ivf.nlist

    @property
    def ntotal(self) -> int:
        return int(self._ivf.ntotal + self._buffer.ntotal)

    @property
    def metric_type(self) -> int:
        return faiss.METRIC_INNER_PRODUCT

    @property
    def is_trained(self) -> bool:
        return bool(self._ivf.is_trained) and self._router is not None

    @property
    def ivf(self):
        """The faiss IVF index holding the routed keys (do not modify it behind the index's back)."""
        return self._ivf

    @property
    def buffer(self):
        """The exactly scanned keys the router has not seen (a faiss ``IndexIDMap2``)."""
        return self._buffer

    @property
    def router(self) -> Router | None:
        return self._router

    @property
    def router_name(self) -> str:
        return self._router_name

    @property
    def stats(self) -> SearchStats:
        """What the last search did."""
        return self._stats

    @property
    def train_summary(self) -> dict:
        """The router training's summary (steps, best validation score, seconds, history)."""
        return self._train_summary

    @property
    def n_calibration(self) -> int:
        """Held-out queries the confidence margin is calibrated on."""
        return 0 if self._calibration_queries is None else len(self._calibration_queries)

    def __repr__(self) -> str:
        return (f"IndexAMIPS(d={self.d}, nlist={self.nlist}, router={self.router_name!r}, ntotal={self.ntotal}, "
                f"buffer={self._buffer.ntotal}, target_recall={self.target_recall}, fallback={self.fallback!r})")

    def centroids(self) -> np.ndarray:
        """The IVF centroids ``[nlist, d] float32`` (read from the quantizer once it is trained)."""
        if not self._ivf.is_trained:
            raise RuntimeError("the IVF lists are untrained: call index.train(keys, queries) first")
        if self._centroids is None:
            self._centroids = self._ivf.quantizer.reconstruct_n(0, self.nlist)
        return self._centroids

    # ------------------------------------------------------------ training

    def train(self, xb: np.ndarray | None = None, queries: np.ndarray | None = None,
              config: TrainConfig | None = None, *, target_recall: float = 0.95, **options) -> "IndexAMIPS":
        """Learn the lists (faiss k-means on ``xb``, if untrained) and the router for ``queries``.

        xb ``[N, d]``: the keys the router learns (default: the keys already in the index, buffer
        included). queries ``[n, d]``: samples of the query traffic; without them, perturbed key
        directions stand in (a proxy, with a warning). ``config`` (a ``TrainConfig``) and
        ``options`` (its fields, overriding it) say how: held-out queries for calibration and
        validation, augmentation, steps, time limit, checkpoint, device. ``target_recall`` becomes
        the index's default. Every argument is checked before anything changes.
        """
        config = make_config(config, options)
        target_recall = check_fraction(target_recall, "target_recall")
        if xb is not None:
            xb = check_vectors(xb, "xb", d=self.d)
            if not self._ivf.is_trained and len(xb) < self.nlist:
                raise ValueError(f"training needs at least nlist={self.nlist} vectors, got {len(xb)}")
        elif not self._ivf.is_trained:
            raise RuntimeError("the IVF lists are untrained: pass the keys xb to train()")
        elif self.ntotal == 0:
            raise RuntimeError("the index holds no keys to learn from: pass xb or add keys first")
        if queries is not None:
            queries = check_vectors(queries, "queries", d=self.d)
        if self.router_name in LEARNED_ROUTERS and config.n_validation == 0:
            raise ValueError(f"the {self.router_name} router needs validation queries: n_validation >= 1")

        seconds = {}
        clock = time.perf_counter()
        with self._lock.writing():  # the lists, or a snapshot of the keys
            if xb is not None:
                if not self._ivf.is_trained:
                    self._ivf.cp.verbose = config.progress and len(xb) >= LOUD_KMEANS  # faiss's own k-means log
                    self._ivf.train(xb)
                    self._centroids = None
                keys, assign = xb, self._assign(xb, config.progress)
            else:
                keys, assign = self._all_keys()
        seconds["lists"] = time.perf_counter() - clock
        if queries is None:
            warnings.warn("train() got no queries: the router learns from perturbed key directions, a proxy "
                          "for real traffic; pass queries from your workload for a better router", stacklevel=2)
            queries = proxy_queries(keys, config.seed)
        clock = time.perf_counter()
        data = build_training_set(keys, assign, self.nlist, queries, config,
                                  learned=self.router_name in LEARNED_ROUTERS)
        seconds["targets"], clock = time.perf_counter() - clock, time.perf_counter()
        router, summary = (self._router, {}) if self.router_name == CUSTOM else fit_router(
            self.router_name, keys, data, self._ivf.quantizer, self.centroids(), self._router_size, config)
        seconds["router"] = time.perf_counter() - clock
        summary = {**summary, "phase_seconds": {name: round(s, 2) for name, s in seconds.items()}}

        with self._lock.writing():
            self._router, self._train_summary = router, summary
            self._calibration_queries = data.calibration_queries if len(data.calibration_queries) else None
            self._calibration_values = data.calibration.cluster_values if len(data.calibration_queries) else None
            self._calibrations, self._resolved = {}, {}
            self._trained_fingerprints = keystore.fingerprints(keys)
            self._flush_known()
            self._settings.target_recall = target_recall if self._calibration_queries is not None else None
            if self._calibration_queries is not None:
                self._choose_first_round(target_recall)
        return self

    def _choose_first_round(self, target_recall: float) -> None:
        """Set ``nprobe`` to the first-round size that reaches ``target_recall`` on the calibration
        queries at the lowest expected cost (``confidence.cheapest_first_round``); record the
        candidates' expected lists and rounds in ``train_summary["first_round"]``."""
        p = self._merge(None)
        candidates = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a candidate out of reach is simply not chosen
            for nprobe in [n for n in FIRST_ROUNDS if n <= p.max_nprobe]:
                candidates[nprobe] = self._calibration(target_recall, replace(p, nprobe=nprobe))
        chosen = cheapest_first_round(candidates, target_recall)
        self._settings.nprobe = chosen or 1
        self._resolved = {}
        self._train_summary["first_round"] = {
            "nprobe": self._settings.nprobe, "target_recall": target_recall,
            "candidates": {str(n): {"lists": round(c.lists, 2), "rounds": round(c.rounds, 2), "recall": round(c.recall, 4)}
                           for n, c in candidates.items()}}

    def refit(self, queries: np.ndarray | None = None, config: TrainConfig | None = None, **options) -> "IndexAMIPS":
        """Retrain the router on all stored keys (buffer included), then move the buffered keys into
        their lists; nothing changes if an argument is refused or training fails."""
        return self.train(None, queries, config, **options)

    # ------------------------------------------------------------ keys

    def add(self, x: np.ndarray) -> None:
        """Add keys ``[n, d]`` with ids ntotal, ntotal+1, ... (as faiss does)."""
        x = check_vectors(x, "x", d=self.d, allow_empty=True)
        with self._lock.writing():
            self._add(x, np.arange(self.ntotal, self.ntotal + len(x), dtype=np.int64))

    def add_with_ids(self, x: np.ndarray, ids) -> None:
        """Add keys ``[n, d]`` with user ids ``[n] int64``. Keys the router was not trained on go to
        the exactly scanned buffer until ``refit``."""
        x = check_vectors(x, "x", d=self.d, allow_empty=True)
        ids = check_ids(ids, len(x))
        with self._lock.writing():
            self._add(x, ids)

    def _add(self, x: np.ndarray, ids: np.ndarray) -> None:
        if not self.is_trained:
            raise RuntimeError("add before train: call index.train(keys, queries) first")
        if not len(x):
            return
        buffered = False
        for lo in tqdm(range(0, len(x), ADD_BLOCK), desc="add", unit="block", leave=False,
                       disable=len(x) <= ADD_BLOCK):  # in blocks: faiss's temporaries stay bounded
            block, block_ids = x[lo:lo + ADD_BLOCK], ids[lo:lo + ADD_BLOCK]
            known = self._known(block)
            if known.any():
                self._ivf.add_with_ids(np.ascontiguousarray(block[known]), np.ascontiguousarray(block_ids[known]))
            if not known.all():
                self._buffer.add_with_ids(np.ascontiguousarray(block[~known]), np.ascontiguousarray(block_ids[~known]))
                buffered = True
        if buffered and self._buffer.ntotal > max(1000, 0.05 * self._ivf.ntotal):
            warnings.warn(f"{self._buffer.ntotal} keys the router was not trained on are scanned exactly on "
                          "every search; call index.refit(queries) to route them", stacklevel=3)

    def _known(self, x: np.ndarray) -> np.ndarray:
        """Which rows of ``x`` the router may route: it saw them in training, or needs not have."""
        if self._trained_fingerprints is None or self.router_name not in LEARNED_ROUTERS:
            return np.ones(len(x), bool)
        return keystore.is_fingerprinted(x, self._trained_fingerprints)

    def remove_ids(self, ids) -> int:
        """Remove keys by id; returns how many were removed."""
        ids = check_ids(ids)
        with self._lock.writing():
            if not self.is_trained:
                raise RuntimeError("remove_ids before train: the index is empty")
            return int(self._ivf.remove_ids(ids) + self._buffer.remove_ids(ids))

    def reset(self) -> None:
        """Remove every key; the lists and the router stay trained."""
        with self._lock.writing():
            self._ivf.reset()
            self._buffer.reset()

    def reconstruct(self, key: int) -> np.ndarray:
        """The stored vector ``[d] float32`` of id ``key`` (approximate for compressed IVF kinds)."""
        return self.reconstruct_batch(np.array([key]))[0]

    def reconstruct_batch(self, ids) -> np.ndarray:
        """The stored vectors ``[m, d] float32`` of ``ids [m]``; KeyError names an id not stored."""
        ids = check_ids(ids, name="id")
        self._direct_map_ready()
        out = np.empty((len(ids), self.d), np.float32)
        with self._lock.reading():
            buffered = np.isin(ids, faiss.vector_to_array(self._buffer.id_map)) if self._buffer.ntotal else \
                np.zeros(len(ids), bool)
            for store, rows in ((self._buffer, buffered), (self._ivf, ~buffered)):
                if rows.any():
                    try:
                        out[rows] = store.reconstruct_batch(ids[rows])
                    except RuntimeError:
                        missing = next(int(i) for i in ids[rows] if not self._stores(store, int(i)))
                        raise KeyError(f"id {missing} is not in the index") from None
        return out

    @staticmethod
    def _stores(store, key: int) -> bool:
        try:
            store.reconstruct(key)
            return True
        except RuntimeError:
            return False

    def _direct_map_ready(self) -> None:
        """Give the lists an id → position map (once, alone), for reading keys by id."""
        if self._ivf.direct_map.type == faiss.DirectMap.NoMap:
            with self._lock.writing():
                self._ensure_direct_map()

    def _ensure_direct_map(self) -> None:
        if self._ivf.direct_map.type == faiss.DirectMap.NoMap:
            self._ivf.set_direct_map_type(faiss.DirectMap.Hashtable)

    def _assign(self, x: np.ndarray, progress: bool) -> np.ndarray:
        """The list of each key ``[n] int64`` (nearest centroid), in blocks with a progress bar."""
        blocks = range(0, len(x), ADD_BLOCK)
        return np.concatenate([self._ivf.quantizer.assign(x[lo:lo + ADD_BLOCK], 1).reshape(-1)
                               for lo in tqdm(blocks, desc="assign lists", unit="block", leave=False,
                                              disable=not progress or len(blocks) < 2)] or [np.zeros(0, np.int64)])

    def _all_keys(self) -> tuple[np.ndarray, np.ndarray]:
        """Every stored key, lists then buffer, ``[ntotal, d] float32``, and its list ``[ntotal]``."""
        self._ensure_direct_map()
        listed, listed_assign = keystore.list_keys(self._ivf)
        buffered, _ = keystore.buffer_keys(self._buffer)
        assign = self._ivf.quantizer.assign(buffered, 1).reshape(-1) if len(buffered) else np.zeros(0, np.int64)
        return np.concatenate([listed, buffered]), np.concatenate([listed_assign, assign]).astype(np.int64)

    def _flush_known(self) -> None:
        """Move the buffered keys the router now knows into their lists."""
        keys, ids = keystore.buffer_keys(self._buffer)
        known = self._known(keys)
        if known.any():
            self._buffer.remove_ids(ids[known])
            self._ivf.add_with_ids(np.ascontiguousarray(keys[known]), ids[known])

    # ------------------------------------------------------------ search

    def search(self, xq: np.ndarray, k: int, *, params: SearchParametersAMIPS | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """The k keys of largest inner product with each query.

        xq ``[n, d]`` (any real dtype; n may be 0). Returns ``D [n, k] float32`` (descending) and
        ``I [n, k] int64`` ids, padded with −FLT_MAX / −1 like faiss. ``index.stats`` then tells
        what it did. A big batch is split across the threads ``set_num_threads`` allows.
        """
        xq = check_vectors(xq, "xq", d=self.d, allow_empty=True)
        k = check_positive_int(k, "k")
        if getattr(params, "sel", None) is not None and is_flat(self._ivf):
            self._direct_map_ready()  # a selective filter gathers its keys by id
        with self._lock.reading():
            if not self.is_trained:
                raise RuntimeError("search before train: call index.train(keys, queries) and index.add(keys)")
            p, calibration = self._resolve(params)
            if not len(xq):
                self._stats = SearchStats()
                return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
            D, I, self._stats = probing.search_parallel(faiss.omp_get_max_threads(), self._ivf, self._router,
                                                        self._buffer, xq, k, p, self.centroids(), calibration)
        return D, I

    def _merge(self, params: SearchParametersAMIPS | None) -> SearchParametersAMIPS:
        """The index's settings overridden by the fields ``params`` sets, numbers of lists capped at nlist."""
        if params is not None and not isinstance(params, SearchParametersAMIPS):
            raise TypeError(f"params must be SearchParametersAMIPS, got {type(params).__name__}")
        p = replace(self._settings, **(params.given() if params is not None else {}))
        nprobe = min(p.nprobe, self.nlist)
        return replace(p, nprobe=nprobe, max_nprobe=max(nprobe, min(p.max_nprobe, self.nlist)),
                       fallback_nprobe=min(p.fallback_nprobe, self.nlist))

    def _resolve(self, params: SearchParametersAMIPS | None) -> tuple[SearchParametersAMIPS, Calibration | None]:
        """``_merge``, then the margin and blend: explicit, fixed probing, or calibrated (then also the
        ``Calibration``, whose bins give per-query margins). Under a
        filter the blend is 0: the router's forecast for its first list is over all keys, so only
        the best *allowed* score found is a safe reference (a blend there stops queries too early:
        0.88 instead of 0.95 at 10% selectivity on the test set). Settings without a filter resolve
        once until the index's change (a single-query call should not pay for it)."""
        key = () if params is None else tuple(params.given().items()) \
            if isinstance(params, SearchParametersAMIPS) and params.sel is None else None  # None: not kept
        resolved = self._resolved.get(key) if key is not None else None
        if resolved is None:
            resolved = self._resolve_now(params)
            if key is not None:
                if len(self._resolved) >= RESOLVED_CACHE:
                    self._resolved.clear()
                self._resolved[key] = resolved
        return resolved

    def _resolve_now(self, params: SearchParametersAMIPS | None) -> tuple[SearchParametersAMIPS, Calibration | None]:
        p = self._merge(params)
        if p.sel is not None:
            p = replace(p, blend=0.0)
        if p.margin is not None:
            return replace(p, blend=p.blend or 0.0), None
        if p.target_recall is None:
            return replace(p, margin=math.inf, blend=0.0), None
        calibration = self._calibration(p.target_recall, p)
        return replace(p, margin=calibration.margin, blend=calibration.blend), calibration

    def calibrate_margin(self, target_recall: float, params: SearchParametersAMIPS | None = None) -> Calibration:
        """The margin τ and blend λ that reach ``target_recall`` on the calibration queries with the
        probe schedule and fallback of ``params`` (else the index's) at the fewest lists probed, and
        the calibration recall they give. Cached per setting."""
        target_recall = check_fraction(target_recall, "target_recall")
        with self._lock.reading():
            return self._calibration(target_recall, self._merge(params))

    def _calibration(self, target_recall: float, p: SearchParametersAMIPS) -> Calibration:
        if self._calibration_queries is None:
            raise RuntimeError("target_recall needs a calibration: train the index with queries first")
        key = (target_recall, p.nprobe, p.max_nprobe, p.fallback, p.fallback_nprobe, p.blend, p.calibration_bins)
        with self._calibration_mutex:
            if key in self._calibrations:
                return self._calibrations[key]
        result = probing.calibrate(self._ivf, self._router, self._calibration_queries, self._calibration_values,
                                   target_recall, p)
        if result.recall < target_recall:
            warnings.warn(f"target_recall={target_recall} is out of reach with max_nprobe={p.max_nprobe} and "
                          f"fallback={p.fallback!r} (calibration recall {result.recall:.4f}); "
                          "raise max_nprobe or use fallback='exact'", stacklevel=4)
        with self._calibration_mutex:
            self._calibrations[key] = result
        return result

    def predict(self, xq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The model's own answer, without confidence test, fallback or buffer: the router's
        predicted support value ``[n] float32`` and the best key id of the list it ranks first ``[n] int64``."""
        xq = check_vectors(xq, "xq", d=self.d, allow_empty=True)
        with self._lock.reading():
            if not self.is_trained:
                raise RuntimeError("predict before train: call index.train(keys, queries) first")
            scores, lists = self._router.route(xq, 1)
            predicted = self._router.predicted_support(xq, scores[:, 0])
            _, ids = scan_plan(self._ivf, xq, 1, lists, self._router.coarse_distances(scores), self.centroids(),
                               self._settings.scan_method)
        return predicted.astype(np.float32), ids[:, 0]

    # ------------------------------------------------------------ state (for io)

    def get_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """Everything that rebuilds this index: a JSON-able config and named numpy arrays."""
        with self._lock.reading():
            if self.router_name == CUSTOM:
                raise TypeError("an index with a user-built router cannot be saved; save its faiss index instead")
            arrays = {"faiss": faiss.serialize_index(self._ivf), "buffer": faiss.serialize_index(self._buffer)}
            model = self._router.model if self._router is not None else None
            if model is not None:
                arrays.update({f"model.{k}": v.detach().cpu().numpy() for k, v in model.state_dict().items()})
            if self._calibration_queries is not None:
                arrays["calibration_queries"] = self._calibration_queries
                arrays["calibration_values"] = self._calibration_values
            if self._trained_fingerprints is not None:
                arrays["trained_fingerprints"] = self._trained_fingerprints
            config = {"router": self.router_name, "router_size": self._router_size,
                      "model": model.config() if model is not None else None,
                      "settings": {name: getattr(self._settings, name) for name in SETTINGS},
                      "has_fingerprints": self._trained_fingerprints is not None}
        return config, arrays

    @classmethod
    def from_state(cls, config: dict, arrays: dict[str, np.ndarray]) -> "IndexAMIPS":
        """The index ``get_state`` described."""
        index = cls.__new__(cls)
        index._setup(faiss.deserialize_index(arrays["faiss"]), config["router"], config["router_size"])
        index._buffer = faiss.deserialize_index(arrays["buffer"])
        if config["model"] is not None:
            state = {k[len("model."):]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("model.")}
            index._router = make_router(index.router_name, index._ivf.quantizer, index.centroids(),
                                        model_from_config(config["model"], state))
        index._calibration_queries = arrays.get("calibration_queries")
        index._calibration_values = arrays.get("calibration_values")
        index._trained_fingerprints = arrays.get("trained_fingerprints") if config["has_fingerprints"] else None
        for name, value in config["settings"].items():
            setattr(index, name, value)
        return index
