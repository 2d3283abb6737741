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
    reference = found.astype(np.float64)
    if blend:
        reference = (1.0 - blend) * reference + blend * first_scores
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        g = (next_scores.astype(np.float64) - reference) / np.maximum(q_norm, 1e-30)
    g = np.where(np.isneginf(found), np.inf, g)
    return np.where(np.isneginf(next_scores), -np.inf, g)


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


def calibrate_margin(critical: np.ndarray, target_recall: float) -> tuple[float, float]:
    """The largest margin τ whose recall on the calibration queries is >= the target.

    Uses the ⌈target·(n+1)⌉-th largest critical margin (a conformal-style finite-sample
    correction). Returns ``(τ, calibration recall at τ)``; τ = −inf means "never sure" (every query
    runs all rounds and the fallback), the best the schedule can do; τ = +inf "always sure" (enough
    queries are right after the first round: a query with τ*_q = +inf is right at any τ).
    """
    n = len(critical)
    if n == 0:
        raise ValueError("calibration needs at least one query")
    m = min(n, math.ceil(target_recall * (n + 1)))
    v = np.sort(critical)[::-1][m - 1]
    tau = float(np.nextafter(v, -np.inf)) if np.isfinite(v) else float(v)
    return tau, float(np.mean((tau < critical) | np.isposinf(critical)))


def mean_lists(round_gaps: np.ndarray, tau: float, ends: list[int], fallback_lists: int) -> float:
    """Mean lists probed when each query stops at its first round with gap ≤ τ, and one that never
    stops also scans ``fallback_lists`` more: the search cost a margin implies."""
    sure = round_gaps <= tau
    stop = np.where(sure.any(axis=1), sure.argmax(axis=1), len(ends))
    cost = np.append(np.asarray(ends, np.float64), ends[-1] + fallback_lists)
    return float(cost[stop].mean())
