"""The confidence test: is the best score found so far above what the router predicts for the
lists not yet probed? And the margin that reaches a target recall on calibration queries. numpy only.

A query probes lists in router order, in rounds that end after ``p_1 < p_2 < ... < p_R`` lists.
After round r its *gap* is (predicted score of list p_r + 1 − reference) / ||q||: the router's
claim that an unprobed list may still beat the answer, in units of the query norm (the test is
scale-free, as the support function is 1-homogeneous). The reference is the best score found,
blended with weight λ (``blend``) with the router's own prediction for its first list:
(1 − λ)·found + λ·predicted_first. The router's errors on one query's lists are correlated, so
a query whose answer beats the router's forecast for it (found > predicted_first) also warrants
doubt about the lists not yet probed; λ is chosen on the calibration queries. A query is **sure**
when gap ≤ τ; unsure queries go on to the next round, and past the last one to the fallback.

The margin is conformal: it holds for traffic like the calibration queries. ``TrafficMonitor``
keeps it holding when traffic moves. After the first round, two exact numbers describe a query: its
*strength* (best score found / ||q||: how well the keys match it) and its *surprise* ((router's
forecast for its first list − best score found) / ||q||: how far the router missed it). When the
traffic's shares of the calibration queries' strength-quartile × surprise-half cells depart from
calibration's (a two-sample χ² test), the calibration queries are re-weighted by share ratio and the
margin recomputed (weighted conformal calibration under covariate shift), with blend 0: under
shift the router's forecast is what is off (unless the calibrated test, re-weighted, still reaches
the target: traffic that moved towards easy queries keeps it). Queries unlike the training sample (weakly matched, or
surprising) then count for more.
"""
from __future__ import annotations

import bisect
import math
import threading
from dataclasses import dataclass, field, replace

import numpy as np


def probe_schedule(nprobe: int, max_nprobe: int, nlist: int) -> list[int]:
    """Round ends: nprobe, 2·nprobe, 4·nprobe, ... up to max_nprobe (all capped at nlist)."""
    max_nprobe = min(max_nprobe, nlist)
    ends, p = [], min(nprobe, max_nprobe)
    while p < max_nprobe:
        ends.append(p)
        p *= 2
    return ends + [max_nprobe]


BLENDS = (0.0, 0.25, 0.5, 0.75)  # the weights λ tried by calibration


def gaps(next_scores: np.ndarray, found: np.ndarray, q_norm: np.ndarray, first_scores: np.ndarray | None = None,
         blend: float = 0.0) -> np.ndarray:
    """(next_scores − (1 − λ)·found − λ·first_scores) / ||q||, all ``[n]``; +inf where nothing was
    found, −inf where no list is left."""
    missing = found == -np.inf
    reference = np.where(missing, 0.0, found.astype(np.float64))  # finite: no inf − inf below
    if blend:
        reference = (1.0 - blend) * reference + blend * first_scores
    g = (next_scores.astype(np.float64) - reference) / np.maximum(q_norm, 1e-30)
    g[missing & (next_scores != -np.inf)] = np.inf
    return g


def gap(next_score: float, found: float, q_norm: float, first_score: float = 0.0, blend: float = 0.0) -> float:
    """``gaps`` for one query, on Python floats: a single-query search pays ~1 µs for it instead of
    ~9 µs for the array version's small-array calls."""
    if found == -math.inf:
        return math.inf if next_score != -math.inf else -math.inf
    reference = (1.0 - blend) * found + blend * first_score if blend else found
    return (next_score - reference) / max(q_norm, 1e-30)


def critical_margins(round_gaps: np.ndarray, round_correct: np.ndarray, fallback_correct: np.ndarray) -> np.ndarray:
    """Per calibration query, the margin τ*_q such that the search is right iff τ < τ*_q.

    ``round_gaps [n, R]``: the gap after each round; ``round_correct [n, R]``: whether the argmax
    list was probed by the end of that round (non-decreasing along R); ``fallback_correct [n]``
    (at least ``round_correct[:, -1]``: a fallback only adds lists).
    A query stops at the first round with gap ≤ τ; it is right iff that round is correct, or it
    never stops and the fallback is right. Since stopping later only adds lists, correctness is
    monotone in τ, and τ*_q = min gap over the rounds before the first correct one.
    """
    n, R = round_gaps.shape
    first_correct = np.where(round_correct.any(axis=1), round_correct.argmax(axis=1), R)
    before = np.arange(R)[None, :] < first_correct[:, None]
    tau = np.where(before, round_gaps, np.inf).min(axis=1)
    never_right = (first_correct == R) & ~fallback_correct
    return np.where(never_right, -np.inf, tau)


def margin_for_recall(critical: np.ndarray, target_recall: float) -> tuple[float, float]:
    """The largest margin τ whose recall on the calibration queries is >= the target.

    Uses the ⌈target·(n+1)⌉-th largest critical margin (a conformal-style finite-sample
    correction). A target that n queries cannot certify (⌈target·(n+1)⌉ > n, e.g. 1.0) gives
    τ = −inf. Returns ``(τ, calibration recall at τ)``; τ = −inf means "never sure" (every query
    runs all rounds and the fallback), the best the schedule can do; τ = +inf "always sure" (enough
    queries are right after the first round: a query with τ*_q = +inf is right at any τ).
    """
    n = len(critical)
    if n == 0:
        raise ValueError("calibration needs at least one query")
    m = math.ceil(target_recall * (n + 1))
    if m > n:
        return -math.inf, float(np.mean(critical > -np.inf))
    v = np.sort(critical)[::-1][m - 1]
    tau = float(np.nextafter(v, -np.inf)) if np.isfinite(v) else float(v)
    return tau, float(np.mean((tau < critical) | np.isposinf(critical)))


def weighted_margin(critical: np.ndarray, weights: np.ndarray, target_recall: float) -> float:
    """``margin_for_recall`` with calibration queries weighted: the largest τ whose weighted recall
    is >= the target, where the finite-sample correction counts the test query at the largest weight.
    ``critical [n]`` sorted in descending order, ``weights [n]`` > 0 in the same order; equal
    weights give ``margin_for_recall``'s τ."""
    covered = np.cumsum(weights) / (weights.sum() + weights.max())
    j = int(np.searchsorted(covered, target_recall * (1 - 1e-12)))  # first prefix reaching the target
    if j >= len(critical):
        return -math.inf
    v = critical[j]
    return float(np.nextafter(v, -np.inf)) if np.isfinite(v) else float(v)


def mean_cost(round_gaps: np.ndarray, tau, ends: list[int], fallback_lists: int) -> tuple[float, float]:
    """Mean lists probed and mean rounds run (the fallback counts as one) when each query stops at its
    first round with gap ≤ τ (a number, or one per query), and one that never stops also scans
    ``fallback_lists`` more: the search cost a margin implies."""
    sure = round_gaps <= np.reshape(tau, (-1, 1))
    stop = np.where(sure.any(axis=1), sure.argmax(axis=1), len(ends))
    lists = np.append(np.asarray(ends, np.float64), ends[-1] + fallback_lists)
    return float(lists[stop].mean()), float(stop.mean() + 1)


# First-round sizes (nprobe) tried when an index picks its own, and what a round costs in lists:
# measured one query per call (one thread), a round's fixed cost (route slice, faiss call, merge,
# test) is ~25 µs against ~9 µs per Debian list (122 keys × 384-d) and ~4 µs per GloVe list; in
# big batches rounds cost less. With 3, the calibration picked nprobe 8 on a 488-list Debian index
# and 16 on GloVe, the settings with the lowest measured p50 latency there, and 4 on the 977-list
# Debian index of benchmarks/run.py (0.91x the best batch QPS of its sweep; GloVe's 16: 0.94x).
# Re-measured after the single-query path got leaner (p50, one round of p lists vs two of p/2):
# Debian (977 lists of 61 keys) 4.6 µs per list, 31.5 per extra round (6.9 lists); GloVe 2.1 and 43
# (20.5 lists). 3 is kept: train's picks (4 and 16) were still the best batch-1 settings of the
# benchmark, and a new value must be re-validated by it (the ratio depends on list size, d, nlist).
FIRST_ROUNDS = (1, 2, 4, 8, 16, 32)
ROUND_COST_LISTS = 3.0


# Traffic monitoring (``TrafficMonitor``): cells of strength quantile × surprise quantile, the χ²
# level that calls the traffic shifted (the 0.999 quantile with 4·2 − 1 = 7 degrees of freedom: one
# false alarm in a thousand checks of unshifted traffic, and a false alarm only re-weights by ratios
# near 1), the least evidence tested (a batch this big is judged on its own), how often a stream of
# smaller batches is re-tested, and the half-life (queries) of the history they are judged by.
# The cells were chosen on Debian's two shift checks (benchmarks/shift.py, benchmarks/topics.py),
# replayed offline: strength octiles alone missed the unseen-topics shift, surprise octiles alone
# under-corrected the absent-packages one; 4 × 2 caught both.
STRENGTH_BINS, SURPRISE_BINS = 4, 2
SHIFT_CHI2 = 24.32
MIN_EVIDENCE = 256
RECHECK_QUERIES = 64
TRAFFIC_HALF_LIFE = 4096


def shifted(calibration_counts: np.ndarray, traffic_counts: np.ndarray) -> bool:
    """Whether two samples' bin counts ``[b]`` come from different distributions: the two-sample
    χ² statistic Σ (√(T/C)·c − √(C/T)·t)² / (c + t) above ``SHIFT_CHI2``."""
    c, t = calibration_counts.astype(np.float64), traffic_counts.astype(np.float64)
    C, T = c.sum(), t.sum()
    both = (c + t) > 0
    chi2 = np.sum((math.sqrt(T / C) * c[both] - math.sqrt(C / T) * t[both]) ** 2 / (c[both] + t[both]))
    return bool(chi2 > SHIFT_CHI2)


class TrafficMonitor:
    """The margin and blend for the traffic a search sees: the calibrated ``margin`` and ``blend``
    while the queries fall in the calibration queries' (strength, surprise) cells as often as theirs
    did, or while the calibration queries re-weighted to the traffic's cell shares still reach the
    target with them; else blend 0 and the blend-0 margin re-weighted to the traffic
    (``weighted_margin``), never looser than the blend-0 margin unweighted. A batch of
    ``MIN_EVIDENCE`` queries or more is judged on its own; smaller ones on the history of recent
    traffic (counts halving every ``TRAFFIC_HALF_LIFE`` queries), re-tested every
    ``RECHECK_QUERIES``. Thread-safe.

    strength, surprise ``[n]``: the calibration queries' (``first_round_features``); critical,
    critical_0 ``[n]``: their critical margins (``critical_margins``) at ``blend`` and at blend 0;
    margin, blend: the calibrated test."""

    def __init__(self, strength: np.ndarray, surprise: np.ndarray, critical: np.ndarray, critical_0: np.ndarray,
                 target_recall: float, margin: float, blend: float):
        quantiles = lambda x, b: np.quantile(x, np.linspace(0, 1, b + 1)[1:-1], method="lower")  # noqa: E731
        self.strength_edges, self.surprise_edges = quantiles(strength, STRENGTH_BINS), quantiles(surprise, SURPRISE_BINS)
        self._strength_list, self._surprise_list = self.strength_edges.tolist(), self.surprise_edges.tolist()
        self.target_recall, self.margin, self.blend = target_recall, margin, blend
        self._cells = self.cells(strength, surprise)
        self._right = (margin < critical) | np.isposinf(critical)  # the calibrated test is right on them
        order = np.argsort(-critical_0, kind="stable")
        self._critical_0, self._cells_0 = critical_0[order], self._cells[order]
        self._calibration_counts = np.bincount(self._cells, minlength=STRENGTH_BINS * SURPRISE_BINS).astype(np.float64)
        self._margin_0 = margin_for_recall(critical_0, target_recall)[0]
        self._counts = np.zeros_like(self._calibration_counts)
        self._since_check = 0
        self._current = (margin, blend, False)
        self._mutex = threading.Lock()

    def cells(self, strength: np.ndarray, surprise: np.ndarray) -> np.ndarray:
        """The (strength, surprise) cell of each query ``[n] int``."""
        return np.searchsorted(self.strength_edges, strength) * SURPRISE_BINS + np.searchsorted(self.surprise_edges,
                                                                                                  surprise)

    def observe(self, strength: np.ndarray, surprise: np.ndarray) -> tuple[float, float, bool]:
        """Record queries' strengths and surprises ``[n]``; the margin and blend for them, and
        whether the traffic is shifted."""
        batch = np.bincount(self.cells(strength, surprise), minlength=len(self._calibration_counts))
        return self._record(batch, len(strength), batch if len(strength) >= MIN_EVIDENCE else None)

    def observe_one(self, strength: float, surprise: float) -> tuple[float, float, bool]:
        """``observe`` for one query, on Python floats (~2 µs instead of ~8)."""
        cell = bisect.bisect_left(self._strength_list, strength) * SURPRISE_BINS + \
            bisect.bisect_left(self._surprise_list, surprise)
        return self._record(cell, 1, None)

    def _record(self, add: np.ndarray | int, n: int, evidence: np.ndarray | None) -> tuple[float, float, bool]:
        """Add ``add`` (counts per cell, or one cell) for ``n`` queries to the decayed history; the
        verdict on ``evidence`` if given, else on the history every ``RECHECK_QUERIES``."""
        with self._mutex:
            self._counts *= 0.5 ** (n / TRAFFIC_HALF_LIFE)
            if isinstance(add, int):
                self._counts[add] += 1
            else:
                self._counts += add
            self._since_check += n
            if evidence is not None:
                return self._test_for(evidence)
            if self._since_check >= RECHECK_QUERIES:
                self._since_check = 0
                self._current = self._test_for(self._counts)
            return self._current

    def _test_for(self, counts: np.ndarray) -> tuple[float, float, bool]:
        if counts.sum() < MIN_EVIDENCE or not shifted(self._calibration_counts, counts):
            return self.margin, self.blend, False
        ratio = (counts / counts.sum()) / np.maximum(self._calibration_counts / self._calibration_counts.sum(), 1e-12)
        cell_weight = np.maximum(ratio, 1e-6)  # a cell the traffic left keeps a trace of its queries
        weights = cell_weight[self._cells]
        if weights[self._right].sum() / (weights.sum() + weights.max()) >= self.target_recall:
            return self.margin, self.blend, True  # still right often enough on this traffic
        return min(self._margin_0, weighted_margin(self._critical_0, cell_weight[self._cells_0], self.target_recall)), \
            0.0, True


@dataclass(frozen=True)
class Calibration:
    """A calibrated confidence test: margin τ, blend λ, and the recall they give on the calibration
    queries (below the target when the target is out of reach of the schedule and fallback).
    With bins: ``edges`` (b − 1 increasing values of the router's first-list forecast / ||q||) and
    one margin per bin in ``margins``; ``margin`` is then the smallest of them. Without bins:
    ``traffic``, the ``TrafficMonitor`` that adapts τ to traffic unlike the calibration queries."""
    margin: float
    blend: float
    recall: float
    edges: tuple[float, ...] = ()
    margins: tuple[float, ...] = ()
    lists: float = math.nan  # mean lists probed per calibration query (fallback included)
    rounds: float = math.nan  # mean rounds per calibration query (the fallback counts as one)
    traffic: TrafficMonitor | None = field(default=None, compare=False, repr=False)

    def margins_for(self, forecast: np.ndarray) -> np.ndarray | float:
        """Each query's margin from its first-list forecast / ||q|| ``[n]`` (the one margin without bins)."""
        if not self.edges:
            return self.margin
        return np.asarray(self.margins)[np.searchsorted(np.asarray(self.edges), forecast)]


def cheapest_first_round(calibrations: dict[int, "Calibration"], target_recall: float) -> int | None:
    """Among ``{nprobe: Calibration}``, the first-round size reaching ``target_recall`` at the lowest
    expected cost, lists + ``ROUND_COST_LISTS`` · rounds (None when none reaches it)."""
    reached = {nprobe: c for nprobe, c in calibrations.items() if c.recall >= target_recall}
    return min(reached, key=lambda nprobe: (reached[nprobe].lists + ROUND_COST_LISTS * reached[nprobe].rounds, nprobe),
               default=None)


def replay(route_scores: np.ndarray, route_lists: np.ndarray, cluster_values: np.ndarray, q_norm: np.ndarray,
           ends: list[int], fallback_hits: np.ndarray, blend: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The probe rounds of queries whose exact per-list values are known: each round's gap
    ``[n, R]``, whether the argmax list was probed by then ``[n, R] bool``, and whether the search is
    right after the fallback ``[n] bool`` (arguments as in ``calibrate_margin``)."""
    n = len(route_scores)
    best = cluster_values.argmax(axis=1)
    found = found_in_order(route_lists, cluster_values)
    hit = route_lists == best[:, None]
    rank = np.where(hit.any(axis=1), hit.argmax(axis=1), cluster_values.shape[1])
    padded = np.hstack([route_scores, np.full((n, 1), -np.inf, np.float32)])
    round_correct = np.stack([rank < e for e in ends], axis=1)
    round_gaps = np.stack([gaps(padded[:, e], found[:, e - 1], q_norm, route_scores[:, 0], blend) for e in ends],
                          axis=1)
    return round_gaps, round_correct, round_correct[:, -1] | fallback_hits


def found_in_order(route_lists: np.ndarray, cluster_values: np.ndarray) -> np.ndarray:
    """The best exact value found by each rank of the route ``[n, p]`` (−1 = skipped, −inf until a
    list is probed), from the exact per-list values ``cluster_values [n, nlist]``."""
    true_in_order = np.take_along_axis(cluster_values, route_lists.clip(0), axis=1)
    true_in_order[route_lists < 0] = -np.inf
    return np.maximum.accumulate(true_in_order, axis=1)


def first_round_features(first_score: np.ndarray, found: np.ndarray, q_norm: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray]:
    """What ``TrafficMonitor`` bins, from the router's forecast for each query's first list, the
    best score found in its first round (−inf: none) and ||q||, all ``[n]``: strength = found / ||q||
    (−inf where nothing was found) and surprise = (forecast − found) / ||q|| (+inf there)."""
    q_norm = np.maximum(q_norm, 1e-30)
    return found / q_norm, (first_score - found) / q_norm


def calibrate_margin(route_scores: np.ndarray, route_lists: np.ndarray, cluster_values: np.ndarray,
                     q_norm: np.ndarray, ends: list[int], fallback_hits: np.ndarray, fallback_lists: int,
                     target_recall: float, blends: tuple[float, ...] = BLENDS, n_bins: int = 1) -> Calibration:
    """The margin τ and blend λ that reach ``target_recall`` on calibration queries at the fewest
    lists probed (or, when no λ reaches it, the best recall).

    ``route_scores, route_lists [n, m]``: the router's order (m ≥ ends[-1] + 1 where lists remain,
    −1 padded); ``cluster_values [n, nlist]``: exact per-list support values h_c(q);
    ``q_norm [n]``; ``ends``: the probe schedule; ``fallback_hits [n] bool``: whether the fallback's
    lists hold the argmax list; ``fallback_lists``: what the fallback scans, for the cost.
    ``n_bins`` > 1: one margin per quantile bin of route_scores[:, 0] / q_norm, each reaching the
    target on its own bin's queries; 1: one margin, with a ``TrafficMonitor`` on the calibration
    queries' first rounds.
    """
    forecast = route_scores[:, 0] / np.maximum(q_norm, 1e-30)
    edges = tuple(float(e) for e in np.quantile(forecast, np.linspace(0, 1, n_bins + 1)[1:-1])) if n_bins > 1 else ()
    bins = np.searchsorted(np.asarray(edges), forecast)
    chosen, critical_at = None, {}  # (preference, result): reach the target, then fewest lists (or best recall)
    for blend in blends:
        round_gaps, round_correct, fallback_correct = replay(route_scores, route_lists, cluster_values, q_norm,
                                                             ends, fallback_hits, blend)
        critical = critical_at[blend] = critical_margins(round_gaps, round_correct, fallback_correct)
        if edges:  # an empty bin (ties) is never sure
            sizes = np.bincount(bins, minlength=n_bins)
            per_bin = [margin_for_recall(critical[bins == b], target_recall) if sizes[b] else (-math.inf, 0.0)
                       for b in range(n_bins)]
            margins = tuple(tau for tau, _ in per_bin)
            recall = float(np.dot(sizes, [r for _, r in per_bin]) / len(critical))
            calibration = Calibration(min(margins), blend, recall, edges, margins)
        else:
            tau, recall = margin_for_recall(critical, target_recall)
            calibration = Calibration(tau, blend, recall)
        lists, rounds = mean_cost(round_gaps, calibration.margins_for(forecast), ends, fallback_lists)
        calibration = replace(calibration, lists=lists, rounds=rounds)
        preference = (recall >= target_recall, recall if recall < target_recall else -lists)
        if chosen is None or preference > chosen[0]:
            chosen = (preference, calibration)
    calibration = chosen[1]
    if edges:
        return calibration
    if 0.0 not in critical_at:
        critical_at[0.0] = critical_margins(*replay(route_scores, route_lists, cluster_values, q_norm, ends,
                                                    fallback_hits, 0.0))
    found = found_in_order(route_lists[:, :ends[0]], cluster_values)[:, -1]
    strength, surprise = first_round_features(route_scores[:, 0], found, q_norm)
    return replace(calibration, traffic=TrafficMonitor(strength, surprise, critical_at[calibration.blend],
                                                       critical_at[0.0], target_recall, calibration.margin,
                                                       calibration.blend))
