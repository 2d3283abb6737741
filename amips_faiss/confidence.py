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
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

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


@dataclass(frozen=True)
class Calibration:
    """A calibrated confidence test: margin τ, blend λ, and the recall they give on the calibration
    queries (below the target when the target is out of reach of the schedule and fallback).
    With bins: ``edges`` (b − 1 increasing values of the router's first-list forecast / ||q||) and
    one margin per bin in ``margins``; ``margin`` is then the smallest of them."""
    margin: float
    blend: float
    recall: float
    edges: tuple[float, ...] = ()
    margins: tuple[float, ...] = ()
    lists: float = math.nan  # mean lists probed per calibration query (fallback included)
    rounds: float = math.nan  # mean rounds per calibration query (the fallback counts as one)

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
    true_in_order = np.take_along_axis(cluster_values, route_lists.clip(0), axis=1)
    true_in_order[route_lists < 0] = -np.inf
    found = np.maximum.accumulate(true_in_order, axis=1)
    hit = route_lists == best[:, None]
    rank = np.where(hit.any(axis=1), hit.argmax(axis=1), cluster_values.shape[1])
    padded = np.hstack([route_scores, np.full((n, 1), -np.inf, np.float32)])
    round_correct = np.stack([rank < e for e in ends], axis=1)
    round_gaps = np.stack([gaps(padded[:, e], found[:, e - 1], q_norm, route_scores[:, 0], blend) for e in ends],
                          axis=1)
    return round_gaps, round_correct, round_correct[:, -1] | fallback_hits


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
    target on its own bin's queries.
    """
    forecast = route_scores[:, 0] / np.maximum(q_norm, 1e-30)
    edges = tuple(float(e) for e in np.quantile(forecast, np.linspace(0, 1, n_bins + 1)[1:-1])) if n_bins > 1 else ()
    bins = np.searchsorted(np.asarray(edges), forecast)
    chosen = None  # (preference, result): reach the target, then fewest lists (or best recall)
    for blend in blends:
        round_gaps, round_correct, fallback_correct = replay(route_scores, route_lists, cluster_values, q_norm,
                                                             ends, fallback_hits, blend)
        critical = critical_margins(round_gaps, round_correct, fallback_correct)
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
    return chosen[1]
