"""Search by probe rounds, as module functions (the index only coordinates): route → plan the
first round's lists → scan them with the *original* queries → confidence test → unsure queries get
the next round, and past the last one the fallback → ``D [n, k] float32, I [n, k] int64``.

Also the router/faiss side of calibration: replaying the rounds on calibration queries whose exact
per-list values are known, for ``confidence.calibrate_margin``.
"""
from __future__ import annotations

import math
import time

import numpy as np

from . import confidence
from .parameters import SearchParametersAMIPS, SearchStats
from .routing import Router
from .scan import EMPTY_SCORE, FlatListViews, scan_plan


def search(ivf, router: Router, buffer, xq: np.ndarray, k: int, p: SearchParametersAMIPS,
           centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, SearchStats]:
    """The k best keys of ``xq [n, d] float32`` by probe rounds over ``ivf``'s lists in ``router``
    order, plus an exact scan of ``buffer`` (keys the router has not seen).

    ``p``: resolved settings (every field set; ``margin`` and ``blend`` numbers). ``centroids
    [nlist, d]``: needed to scan compressed lists by residual.
    The caller keeps the index unchanged meanwhile (the lists are read in place).
    """
    start_time = time.perf_counter()
    n, nlist = len(xq), ivf.nlist
    D = np.full((n, k), EMPTY_SCORE, np.float32)
    I = np.full((n, k), -1, np.int64)
    if buffer.ntotal:  # keys the router has not seen: scanned exactly for every query
        merge_into(D, I, np.arange(n), *buffer.search(xq, k))
    ends = confidence.probe_schedule(p.nprobe, p.max_nprobe, nlist) if p.margin < math.inf else [p.nprobe]
    views = FlatListViews(ivf)  # made once if a round scans flat lists by BLAS

    def scan(rows, lists, coarse):
        merge_into(D, I, rows, *scan_plan(ivf, xq[rows], k, lists, coarse, centroids, p.scan_method, views))

    try:
        router_seconds = -time.perf_counter()
        rank = router.ranker(xq)  # scores the batch once; each round ranks its active rows
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
            scan(active, lists, router.coarse_distances(route_scores[:, begin:end]))
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
            lists, coarse = fallback_plan(ivf, xq[active], probed_lists, p)
            scan(active, lists, coarse)
            probed[active] += (lists >= 0).sum(axis=1)
    finally:
        views.release()
    stats = SearchStats(n, float(probed.mean()) if n else 0.0, rounds, n_fallback / max(1, n),
                        router_seconds / max(1, n), time.perf_counter() - start_time)
    return D, I, stats


def fallback_plan(ivf, xq: np.ndarray, probed_lists: np.ndarray, p: SearchParametersAMIPS
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """The fallback's lists not yet probed, ``[n, m]`` (−1 = skip), and their coarse distances when
    known: "exact" takes every other list, "ivf" the ``fallback_nprobe`` nearest centroids."""
    nlist = ivf.nlist
    done = np.zeros((len(xq), nlist), bool)
    rows = np.repeat(np.arange(len(xq)), probed_lists.shape[1])
    cols = probed_lists.reshape(-1)
    done[rows[cols >= 0], cols[cols >= 0]] = True
    if p.fallback == "exact":
        return np.where(done, -1, np.arange(nlist)[None, :]), None
    coarse, lists = ivf.quantizer.search(xq, p.fallback_nprobe)
    return np.where(np.take_along_axis(done, lists.clip(0), axis=1), -1, lists), coarse


def calibrate(ivf, router: Router, queries: np.ndarray, cluster_values: np.ndarray, target_recall: float,
              p: SearchParametersAMIPS) -> confidence.Calibration:
    """Margin and blend reaching ``target_recall`` on calibration ``queries [n, d]`` with exact
    per-list values ``cluster_values [n, nlist]``, for the schedule and fallback of ``p`` (blend
    fixed by ``p.blend``, else chosen among ``confidence.BLENDS``)."""
    nlist = ivf.nlist
    ends = confidence.probe_schedule(p.nprobe, p.max_nprobe, nlist)
    scores, lists = router.route(queries, min(ends[-1] + 1, nlist))
    best = cluster_values.argmax(axis=1)
    if p.fallback == "exact":
        hits, cost = np.ones(len(queries), bool), nlist - ends[-1]
    elif p.fallback == "ivf":
        _, centroid_lists = ivf.quantizer.search(queries, p.fallback_nprobe)
        hits, cost = (centroid_lists == best[:, None]).any(axis=1), p.fallback_nprobe
    else:
        hits, cost = np.zeros(len(queries), bool), 0
    blends = confidence.BLENDS if p.blend is None else (p.blend,)
    return confidence.calibrate_margin(scores, lists, cluster_values, np.linalg.norm(queries, axis=1), ends,
                                       hits, cost, target_recall, blends)


def merge_into(D: np.ndarray, I: np.ndarray, rows: np.ndarray, D_new: np.ndarray, I_new: np.ndarray) -> None:
    """Merge results ``D_new, I_new [len(rows), k]`` into rows of ``D, I``, keeping the k best."""
    if not len(rows):
        return
    k = D.shape[1]
    Dc = np.hstack([D[rows], D_new])
    Ic = np.hstack([I[rows], I_new])
    order = np.argsort(-Dc, axis=1, kind="stable")[:, :k]
    D[rows] = np.take_along_axis(Dc, order, axis=1)
    I[rows] = np.take_along_axis(Ic, order, axis=1)
