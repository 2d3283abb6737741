"""Search by probe rounds, as module functions (the index only coordinates): route → plan the
first round's lists → scan them with the *original* queries → confidence test → unsure queries get
the next round, and past the last one the fallback → ``D [n, k] float32, I [n, k] int64``.

Under a filter (``p.sel``), the allowed keys of each list are counted once per call
(``filtering.ListFilter``): lists with no allowed key are never scanned, the BLAS scans read only the
allowed rows, faiss's scan gets the selector, and a filter that leaves at most ``BRUTE_FORCE_LISTS``
average lists' worth of keys is answered by scanning those keys directly (exact), skipping the router.
The confidence test is unchanged: the router predicts each list's best score over all its keys, and
the best allowed score can only be lower, so a list it deems beaten is beaten under any filter.

Also the router/faiss side of calibration: replaying the rounds on calibration queries whose exact
per-list values are known, for ``confidence.calibrate_margin``.
"""
from __future__ import annotations

import functools
import math
import time
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import threadpoolctl

from . import confidence, kernels
from .filtering import ListFilter
from .parameters import SearchParametersAMIPS, SearchStats
from .routing import TOP_PER_ROW_MAX, Router, top_lists
from .scan import EMPTY_SCORE, FlatListViews, is_flat, scan_plan

# A filter leaving at most this many average lists' worth of keys is brute-forced (gathered, one BLAS
# product). Measured on Debian (benchmarks/hybrid.py, one thread, 5,000 queries, target 0.95), that
# gather + BLAS against routed rounds: 2,982 keys (49 lists' worth) 20.1k vs 15.1k QPS; 5,965 (98)
# 10.1k vs 17.7k; 6,099 (section = libs) 9.9k vs 13.4k.
BRUTE_FORCE_LISTS = 64
PARALLEL_MIN_QUERIES = 256  # a batch is split across threads only into chunks at least this big
SEARCH_BLOCK_ROWS = 1 << 15  # queries searched at a time (a row holds ~0.5 KB: its ranked lists, results)
PLAN_BLOCK_BYTES = 64 << 20  # ``[rows, nlist]`` fallback plans built at once
# A big batch's router ranks each row's lists up front for up to this many rounds, as far as the
# compiled top-k pass goes (``routing.TOP_PER_ROW_MAX``); a row's later rounds score it again. Two
# rather than three, router µs per query at target 0.95 (one thread, 5,000 queries, two alternations):
# Debian first round 8 16.6–16.8 vs 18.8–19.3 (first round 4: 18.1–18.4 vs 17.4–17.9); 1M keys,
# 4,000 lists, first round 4: 20.8–20.9 vs 22.9–23.9.
RANKED_ROUNDS = 2
# In batches up to this many queries a row's later rounds are ranked at once, when its second round
# comes (``_rank_rest_once``): a round's fixed cost is what a small batch pays.
PLAN_ONCE_ROWS = 32


def search_parallel(n_threads: int, ivf, router: Router, buffer, xq: np.ndarray, k: int, p: SearchParametersAMIPS,
                    centroids: np.ndarray, calibration: confidence.Calibration | None = None
                    ) -> tuple[np.ndarray, np.ndarray, SearchStats]:
    """``search`` on blocks of a batch: at most ``SEARCH_BLOCK_ROWS`` queries at a time, and a big batch
    on up to ``n_threads`` blocks at once, each thread with one BLAS and one OpenMP thread: the
    router's products, faiss's scan and the compiled by-list scan all run without the GIL.

    Blocks are big on purpose: each round of a block reads the keys of every list its rows probe,
    so a block that meets each list with more queries reads the keys fewer times per query. On 1M
    keys (4,000 lists, 1.5 GB of keys) at target 0.95, one thread, 25,000 queries in blocks of
    5,000 / 12,500 / 25,000 ran 8,243 / 12,571 / 15,373 QPS (medians of 6, the router still holding
    every score). Splitting a small batch across threads costs the same way (Debian, 5,000 queries,
    two halves one after the other took 1.15× the whole batch's time, GloVe 1.05×), which is why a
    batch under ``2 × PARALLEL_MIN_QUERIES`` is not split at all."""
    n = len(xq)
    if n == 1 and p.sel is None:
        return search_one(ivf, router, buffer, xq, k, p, centroids, calibration)
    threads = max(1, min(n_threads, n // PARALLEL_MIN_QUERIES))
    n_blocks = max(threads, -(-n // SEARCH_BLOCK_ROWS))
    if n_blocks < 2:
        return search(ivf, router, buffer, xq, k, p, centroids, calibration)
    start = time.perf_counter()
    bounds = np.linspace(0, n, n_blocks + 1).astype(int)

    # one set of list views for all blocks, loaded up front (loading takes the GIL, list by list)
    views = FlatListViews(ivf)
    if threads > 1 and is_flat(ivf) and p.scan_method != "faiss":
        views.addresses(np.arange(ivf.nlist))

    def run(lo: int, hi: int):
        return search(ivf, router, buffer, xq[lo:hi], k, p, centroids, calibration, views)

    try:
        if threads > 1:
            with _thread_limits().limit(limits=1):
                parts = list(_pool(threads).map(run, bounds[:-1], bounds[1:]))
        else:
            parts = [run(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
    finally:
        views.release()
    weights = np.diff(bounds) / n
    mean = lambda field: float(sum(w * getattr(s, field) for w, (_, _, s) in zip(weights, parts)))  # noqa: E731
    stats = SearchStats(n, mean("mean_lists_probed"), max(s.rounds for _, _, s in parts),
                        mean("fallback_share"), mean("router_seconds_per_query"), time.perf_counter() - start,
                        any(s.brute_force for _, _, s in parts), any(s.traffic_shift for _, _, s in parts))
    return np.vstack([D for D, _, _ in parts]), np.vstack([I for _, I, _ in parts]), stats


@functools.lru_cache(maxsize=None)
def _thread_limits() -> threadpoolctl.ThreadpoolController:
    """The BLAS and OpenMP libraries loaded (found once: looking them up takes ~1 ms)."""
    return threadpoolctl.ThreadpoolController()


@functools.lru_cache(maxsize=None)
def _pool(workers: int) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads kept for the process, each with one OpenMP (faiss, torch) thread
    (a thread's own setting; BLAS's is global, limited around each parallel search)."""
    return ThreadPoolExecutor(workers, thread_name_prefix="amips-search",
                              initializer=lambda: _thread_limits().select(user_api="openmp").limit(limits=1))


def search(ivf, router: Router, buffer, xq: np.ndarray, k: int, p: SearchParametersAMIPS,
           centroids: np.ndarray, calibration: confidence.Calibration | None = None,
           views: FlatListViews | None = None) -> tuple[np.ndarray, np.ndarray, SearchStats]:
    """The k best keys of ``xq [n, d] float32`` by probe rounds over ``ivf``'s lists in ``router``
    order, plus an exact scan of ``buffer`` (keys the router has not seen).

    ``p``: resolved settings (every field set; ``margin`` and ``blend`` numbers). ``calibration``:
    where it has bins, each query's margin comes from its bin instead of ``p.margin``. ``centroids
    [nlist, d]``: needed to scan compressed lists by residual. ``views``: the flat lists' views to
    share (made and released here when None).
    The caller keeps the index unchanged meanwhile (the lists are read in place).
    """
    start_time = time.perf_counter()
    n, nlist = len(xq), ivf.nlist
    D = np.full((n, k), EMPTY_SCORE, np.float32)
    I = np.full((n, k), -1, np.int64)
    listed = ListFilter(ivf, p.sel) if p.sel is not None else None
    if buffer.ntotal:  # keys the router has not seen: scanned exactly for every query
        params = faiss.SearchParameters(sel=listed.selector) if listed else None
        merge_into(D, I, np.arange(n), *buffer.search(xq, k, params=params))
    if listed and is_flat(ivf) and listed.n_allowed <= BRUTE_FORCE_LISTS * ivf.ntotal / nlist:
        # a selective filter: its allowed keys, gathered once (direct map), against every query by BLAS
        allowed_D, allowed_I = brute_force(xq, k, ivf.reconstruct_batch(listed.allowed_ids), listed.allowed_ids)
        merge_into(D, I, np.arange(n), allowed_D, allowed_I)
        return D, I, SearchStats(n, float(np.count_nonzero(listed.counts)), 1, 0.0, 0.0,
                                 time.perf_counter() - start_time, brute_force=True)
    monitor, traffic_shift, blend = traffic_monitor(calibration, p), False, p.blend
    ends = round_ends(p, nlist, monitor)
    own_views = views is None
    views = FlatListViews(ivf) if own_views else views  # made once if a round scans flat lists by BLAS
    scan_views = listed.views(views) if listed else views

    def scan(rows, lists, coarse):
        if listed:
            lists = listed.drop_empty(lists)
        floor = D[rows, k - 1]  # the k-th best so far: what a new key must beat
        merge_into(D, I, rows, *scan_plan(ivf, xq[rows], k, lists, coarse, centroids, p.scan_method, scan_views,
                                          listed.selector if listed else None,
                                          floor=np.where(floor > EMPTY_SCORE, floor, -np.inf)))
        return (lists >= 0).sum(axis=1)

    try:
        router_seconds = -time.perf_counter()
        rank = router.ranker(xq, ranked_width(ends, nlist))  # scores the batch; rounds rank their rows
        if n <= PLAN_ONCE_ROWS:
            rank = _rank_rest_once(rank, n, min(ends[-1] + 1, nlist))
        router_seconds += time.perf_counter()
        q_norm = np.linalg.norm(xq, axis=1)
        first_scores = None  # the router's score of each query's first list
        probed = np.zeros(n, np.int64)
        active, begin, rounds = np.arange(n), 0, 0
        probed_lists = np.zeros((n, 0), np.int64)  # lists probed so far by the active rows
        for end in ends:
            t = time.perf_counter()
            # every row is active in the first round: a slice ranks the scores in place, uncopied
            route_scores, route_lists = rank(active if rounds else slice(None), min(end + 1, nlist))
            router_seconds += time.perf_counter() - t
            if first_scores is None:
                first_scores = route_scores[:, 0].astype(np.float64)
                margins = np.broadcast_to(calibration.margins_for(first_scores / np.maximum(q_norm, 1e-30))
                                          if calibration else p.margin, n)
            probed[active] += scan(active, route_lists[:, begin:end],
                                   router.coarse_distances(route_scores[:, begin:end]))
            rounds += 1
            if rounds == 1 and monitor is not None:
                margin, blend, traffic_shift = monitor.observe(*confidence.first_round_features(
                    first_scores, np.where(D[:, 0] > EMPTY_SCORE, D[:, 0], -np.inf), q_norm))
                margins = np.broadcast_to(margin, n)
            next_scores = route_scores[:, end] if end < route_scores.shape[1] else np.full(len(active), -np.inf)
            # the best score found (target_recall is calibrated for the match rate, recall@1), or the
            # confidence_rank-th best: a list forecast below it cannot change the top confidence_rank
            found = D[active, min(p.confidence_rank, k) - 1]
            found = np.where(found <= EMPTY_SCORE, -np.inf, found)
            unsure = confidence.gaps(next_scores, found, q_norm[active], first_scores[active], blend) > margins[active]
            active, probed_lists, begin = active[unsure], route_lists[unsure, :end], end
            if not len(active):
                break
        n_fallback = len(active) if p.fallback != "none" else 0
        step = max(1, PLAN_BLOCK_BYTES // (9 * nlist))  # a plan's bytes per row: done flags, list numbers
        for lo in range(0, n_fallback, step):
            rows = active[lo:lo + step]
            probed[rows] += scan(rows, *fallback_plan(ivf, xq[rows], probed_lists[lo:lo + step], p))
    finally:
        if own_views:
            views.release()
    stats = SearchStats(n, float(probed.mean()) if n else 0.0, rounds, n_fallback / max(1, n),
                        router_seconds / max(1, n), time.perf_counter() - start_time, traffic_shift=traffic_shift)
    return D, I, stats


def ranked_width(ends: list[int], nlist: int) -> int:
    """The lists ranked up front for each row of a big batch: those of its first ``RANKED_ROUNDS``
    rounds (each round also reads the next list's score), as many as ``TOP_PER_ROW_MAX`` allows, and
    at least the first round's."""
    widths = [end + 1 for end in ends[:RANKED_ROUNDS]]
    return min(nlist, max([widths[0]] + [w for w in widths if w <= TOP_PER_ROW_MAX]))


def traffic_monitor(calibration: confidence.Calibration | None, p: SearchParametersAMIPS
                    ) -> confidence.TrafficMonitor | None:
    """The monitor that adapts the margin and blend to the traffic, when it applies: a calibrated margin
    without bins, ``adaptive_margin`` on and no filter (a filter lowers the strengths found, which is
    not a shift of the traffic)."""
    if calibration is None or calibration.traffic is None or not p.adaptive_margin or p.sel is not None:
        return None
    return calibration.traffic


def round_ends(p: SearchParametersAMIPS, nlist: int, monitor: confidence.TrafficMonitor | None) -> list[int]:
    """The lists probed by the end of each round: the probe schedule, or one round of ``nprobe``
    when the margin is "always sure" and no traffic monitor may tighten it."""
    if p.margin < math.inf or monitor is not None:
        return confidence.probe_schedule(p.nprobe, p.max_nprobe, nlist)
    return [p.nprobe]


def _rank_rest_once(rank, n: int, width: int):
    """``rank`` (``Router.ranker``'s) for a small batch of ``n`` rows: the first round (every row, a
    slice) ranks only what it asks; a row's first later round ranks its whole schedule, ``width``
    lists, kept for its rounds after that. One partial sort per row that goes on, none of the
    schedule's for the rows that stop after one round. 16 queries per call (p50, one thread, six
    alternations against ranking every row's schedule at once): Debian (first round 4, schedule of
    245 lists) 1,561 → 1,510 µs, GloVe (first round 16) 2,281 → 2,079."""
    scores, lists = np.empty((n, width), np.float32), np.empty((n, width), np.int64)
    ranked = np.zeros(n, bool)

    def rank_rows(rows, n_lists: int):
        if isinstance(rows, slice):
            return rank(rows, n_lists)
        todo = rows[~ranked[rows]]
        if len(todo):
            scores[todo], lists[todo] = rank(todo, width)
            ranked[todo] = True
        return scores[rows, :n_lists], lists[rows, :n_lists]
    return rank_rows


def search_one(ivf, router: Router, buffer, xq: np.ndarray, k: int, p: SearchParametersAMIPS,
               centroids: np.ndarray, calibration: confidence.Calibration | None = None
               ) -> tuple[np.ndarray, np.ndarray, SearchStats]:
    """``search`` for a single query ``xq [1, d]`` without a filter: the same rounds, confidence test
    and fallback, without the batch's bookkeeping (active rows, views, per-row margins), which
    costs one query more than its scan. With the cheaper shared pieces it took the p50 per call
    at match 0.95 (one thread, same index) from 329 to 210 µs on Debian and 343 to 208 on GloVe.
    Ranking only the first round's lists until a later round runs (a top 245 of 977 costs ~14 µs
    more than a top 5, and most queries stop after one round), the confidence test on Python
    floats (``confidence.gap``) and a merge that returns at once when nothing new enters the top k
    took ``search_one`` from 158 to 129 µs (warm, Debian, first round of 4)."""
    start_time = time.perf_counter()
    nlist = ivf.nlist
    row = np.zeros(1, np.int64)
    D = np.full((1, k), EMPTY_SCORE, np.float32)
    I = np.full((1, k), -1, np.int64)
    if buffer.ntotal:
        merge_into(D, I, row, *buffer.search(xq, k))
    monitor, traffic_shift, blend = traffic_monitor(calibration, p), False, p.blend
    ends = round_ends(p, nlist, monitor)
    router_seconds = -time.perf_counter()
    rank = router.ranker(xq)
    # the first round's order (and the next list's score); every later round's only if one runs
    route_scores, route_lists = rank(slice(None), min(ends[0] + 1, nlist))
    router_seconds += time.perf_counter()
    q_norm = math.sqrt(float(np.dot(xq[0], xq[0])))
    first_score = float(route_scores[0, 0])
    margin = float(np.ravel(calibration.margins_for(np.array([first_score / max(q_norm, 1e-30)])))[0]) \
        if calibration else p.margin
    rank_k = min(p.confidence_rank, k) - 1
    begin = probed = rounds = 0
    fallback = False
    for end in ends:
        if route_scores.shape[1] < min(end + 1, nlist):
            router_seconds -= time.perf_counter()
            route_scores, route_lists = rank(slice(None), min(ends[-1] + 1, nlist))
            router_seconds += time.perf_counter()
        lists = route_lists[:, begin:end]
        merge_into(D, I, row, *scan_plan(ivf, xq, k, lists, router.coarse_distances(route_scores[:, begin:end]),
                                         centroids, p.scan_method))
        probed += int((lists >= 0).sum())
        rounds, begin = rounds + 1, end
        if rounds == 1 and monitor is not None:
            best = float(D[0, 0]) if D[0, 0] > EMPTY_SCORE else -math.inf
            norm = max(q_norm, 1e-30)  # confidence.first_round_features, on Python floats
            margin, blend, traffic_shift = monitor.observe_one(best / norm, (first_score - best) / norm)
        next_score = float(route_scores[0, end]) if end < route_scores.shape[1] else -math.inf
        found = float(D[0, rank_k]) if D[0, rank_k] > EMPTY_SCORE else -math.inf
        if not confidence.gap(next_score, found, q_norm, first_score, blend) > margin:
            break  # sure
    else:
        fallback = p.fallback != "none"
        if fallback:
            lists, coarse = fallback_plan(ivf, xq, route_lists[:, :begin], p)
            merge_into(D, I, row, *scan_plan(ivf, xq, k, lists, coarse, centroids, p.scan_method))
            probed += int((lists >= 0).sum())
    return D, I, SearchStats(1, float(probed), rounds, float(fallback), router_seconds,
                             time.perf_counter() - start_time, traffic_shift=traffic_shift)


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
                                       hits, cost, target_recall, blends, p.calibration_bins)


def brute_force(xq: np.ndarray, k: int, keys: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of ``xq [n, d]`` over ``keys [m, d]`` with ids ``[m]``, by BLAS in blocks of
    queries: ``D [n, k] float32`` descending, ``I [n, k] int64``, −FLT_MAX / −1 padded."""
    n, m = len(xq), len(keys)
    D = np.full((n, k), EMPTY_SCORE, np.float32)
    I = np.full((n, k), -1, np.int64)
    kk, step = min(k, m), max(1, (1 << 22) // max(1, m))
    for lo in range(0, n if m else 0, step):
        D[lo:lo + step, :kk], cols = top_lists(xq[lo:lo + step] @ keys.T, kk)
        I[lo:lo + step, :kk] = ids[cols]
    return D, I


def merge_into(D: np.ndarray, I: np.ndarray, rows: np.ndarray, D_new: np.ndarray, I_new: np.ndarray) -> None:
    """Merge results ``D_new, I_new [len(rows), k]`` (sorted descending) into rows of ``D, I``, keeping
    the k best (on ties, the results already there first)."""
    if len(rows):
        kernels.merge_sorted(D, I, np.asarray(rows, np.int64), D_new, I_new)
