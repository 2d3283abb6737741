"""IndexAMIPS in the ann-benchmarks harness (the algorithm interface its runner calls).

Copy ``benchmarks/ann_benchmarks/`` into ann-benchmarks as ``ann_benchmarks/algorithms/amips_faiss/``
(its ``config.yml`` sweeps ``target_recall`` × first-round lists) and run
``python run.py --algorithm amips-faiss --local --dataset glove-100-angular``.

The harness hands ``fit`` the keys only: the router then learns from perturbed key directions (the
proxy ``IndexAMIPS.train`` uses without queries). Metrics: "angular" searches unit keys and queries
by inner product; "euclidean" maps nearest neighbours to MIPS exactly, keys → [x, −||x||²/2] and
queries → [q, 1] (so <q', x'> = <q, x> − ||x||²/2 ranks as −||q − x||²/2); "ip"/"dot" is MIPS as is.
"""
from __future__ import annotations

import numpy as np

from .index import IndexAMIPS, default_nlist
from .parameters import SearchParametersAMIPS
from .training import TrainConfig

try:  # inside the harness; a plain base class elsewhere (tests, users without it)
    from ann_benchmarks.algorithms.base.module import BaseANN
except ImportError:  # pragma: no cover - depends on the environment
    class BaseANN:
        def done(self) -> None:
            pass

        def get_memory_usage(self) -> float | None:
            return None

        def get_additional(self) -> dict:
            return {}

        def __str__(self) -> str:
            return self.name

METRICS = ("angular", "euclidean", "ip", "dot")


class AMIPS(BaseANN):
    """``AMIPS(metric, router="supportnet", nlist=None, train_seconds=300)``; query arguments
    ``(target_recall, nprobe)`` (``set_query_arguments``)."""

    def __init__(self, metric: str, router: str = "supportnet", nlist: int | None = None,
                 train_seconds: float = 300.0):
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; amips_faiss serves {METRICS}")
        self.metric, self.router, self.nlist, self.train_seconds = metric, router, nlist, train_seconds
        self.index: IndexAMIPS | None = None
        self.params = SearchParametersAMIPS()
        self.name = f"AMIPS(router={router})"
        self.res = None

    def _keys(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, np.float32)
        if self.metric == "angular":
            return X / np.linalg.norm(X, axis=1, keepdims=True).clip(1e-30)
        if self.metric == "euclidean":
            return np.hstack([X, -0.5 * (X ** 2).sum(axis=1, keepdims=True)]).astype(np.float32)
        return X

    def _queries(self, Q: np.ndarray) -> np.ndarray:
        Q = np.atleast_2d(np.asarray(Q, np.float32))
        if self.metric == "angular":
            return Q / np.linalg.norm(Q, axis=1, keepdims=True).clip(1e-30)
        if self.metric == "euclidean":
            return np.hstack([Q, np.ones((len(Q), 1), np.float32)])
        return Q

    def fit(self, X: np.ndarray) -> None:
        keys = self._keys(X)
        self.index = IndexAMIPS(keys.shape[1], self.nlist or default_nlist(len(keys)), router=self.router)
        self.index.train(keys, None, TrainConfig(time_limit=self.train_seconds, progress=False))
        self.index.add(keys)

    def set_query_arguments(self, target_recall: float, nprobe: int) -> None:
        self.params = SearchParametersAMIPS(target_recall=target_recall, nprobe=nprobe)
        self.name = f"AMIPS(router={self.router}, target_recall={target_recall}, nprobe={nprobe})"

    def query(self, v: np.ndarray, n: int) -> np.ndarray:
        _, I = self.index.search(self._queries(v), n, params=self.params)
        return I[0][I[0] >= 0]

    def batch_query(self, X: np.ndarray, n: int) -> None:
        _, self.res = self.index.search(self._queries(X), n, params=self.params)

    def get_batch_results(self) -> np.ndarray:
        return self.res

    def get_additional(self) -> dict:
        stats = self.index.stats
        return {"mean_lists_probed": stats.mean_lists_probed, "fallback_share": stats.fallback_share}
