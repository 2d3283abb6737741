"""Search settings: ``SearchParametersAMIPS`` (per call, and the index's own defaults) and what a
search reports back, ``SearchStats``. Every value is checked when it is set; unknown names are
refused, so a typo never passes silently.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

import numpy as np

from .filtering import check_selector
from .scan import SCAN_METHODS
from .validation import check_fraction, check_positive_int

FALLBACKS = ("exact", "ivf", "none")


def _check_real(value, name: str, low: float = -math.inf, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) \
            or not low <= value <= high:
        bounds = "" if (low, high) == (-math.inf, math.inf) else f" in [{low}, {high}]"
        raise ValueError(f"{name} must be a number{bounds}, got {value!r}")
    return float(value)


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _check_choice(value, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {choices}")
    return value


_CHECKS = {
    "nprobe": check_positive_int,
    "max_nprobe": check_positive_int,
    "target_recall": check_fraction,
    "margin": _check_real,
    "fallback": lambda v, name: _check_choice(v, name, FALLBACKS),
    "fallback_nprobe": check_positive_int,
    "scan_method": lambda v, name: _check_choice(v, name, SCAN_METHODS),
    "blend": lambda v, name: _check_real(v, name, 0.0, 1.0),
    "confidence_rank": check_positive_int,
    "calibration_bins": check_positive_int,
    "adaptive_margin": _check_bool,
    "sel": check_selector,
}


@dataclass
class SearchParametersAMIPS:
    """Search settings; a field left None takes the index's attribute of the same name (which an
    index keeps for every field). Numbers of lists above nlist mean nlist, as in faiss.

    nprobe: lists probed in the first round (an index's own is set by ``train``: the size reaching
    the target on the calibration queries at the lowest expected cost). max_nprobe: lists after which an unsure query goes to
    the fallback (rounds double nprobe up to it). target_recall: the match rate (recall@1) to reach,
    via the margin calibrated on held-out queries (None on the index: probe a fixed ``nprobe``
    lists, as faiss IVF does). margin: an explicit confidence margin τ that overrides
    target_recall: ``math.inf`` = always sure, i.e. fixed probing of ``nprobe`` lists;
    ``-math.inf`` = never sure: every query runs all rounds and the fallback. fallback: "exact"
    (scan every list not yet probed: the exact answer for a flat index), "ivf" (the
    ``fallback_nprobe`` lists of plain centroid routing) or "none". scan_method: how lists are
    scanned, "auto" (BLAS for big batches of flat lists, else faiss), "faiss" (always
    ``search_preassigned``: bit-identical to faiss's own IVF search) or "blas" (see
    ``amips_faiss.scan``). blend: the weight λ in [0, 1] of the router's first-list prediction in the
    confidence test (see ``amips_faiss.confidence``); None = chosen with the margin by calibration
    when the margin comes from target_recall, 0 with an explicit margin. confidence_rank: which
    found score the confidence test holds against the router's forecast: 1 (default) = the best, what
    target_recall is calibrated for; r > 1 = the r-th best, so that a query stops only when no
    unprobed list is forecast to enter its top r (more lists, a better top-r; at least the target
    for the top-1). calibration_bins: 1 (default) = one margin for all queries; b > 1 = a margin per
    b-quantile bin of the router's forecast for its first list / ||q||, each calibrated on its own
    calibration queries, so that the target holds within each bin (Mondrian-style): traffic that
    shifts towards queries the keys match weakly stays covered, at more lists probed (Debian,
    ``benchmarks/shift_conditional.py``: with 4 bins, 0.961 instead of 0.913 at target 0.95 on
    titles of packages absent from the keys, 5.7 instead of 3.5 lists on the usual traffic; the
    default ``adaptive_margin`` holds that shift at no cost on the usual traffic).
    adaptive_margin: True (default) = with one calibrated margin, the test follows the traffic: when
    the queries' first rounds (strength: best score found / ||q||; surprise: how far the router's
    forecast missed it) fall in the calibration queries' cells in other shares than theirs, the
    calibration is re-weighted to the traffic, the margin tightened and the blend set to 0
    (``confidence.TrafficMonitor``; ``index.stats.traffic_shift`` says so). Batches under 256
    queries are judged on the recent traffic, so on shifted traffic the same small batch may probe
    more lists later than at first; False = the calibration queries' test, whatever the traffic
    (answers that depend on nothing but the query).
    sel (per call only, as in
    faiss): a faiss ``IDSelector`` over user ids (Batch, Range, Bitmap, Array, Not/And/Or, ...) or an
    array of allowed ids; the answer is then the filtered MIPS answer, −1 padded when fewer than k
    keys pass, and target_recall means the filtered match rate.
    """
    nprobe: int | None = None
    max_nprobe: int | None = None
    target_recall: float | None = None
    margin: float | None = None
    fallback: str | None = None
    fallback_nprobe: int | None = None
    scan_method: str | None = None
    blend: float | None = None
    confidence_rank: int | None = None
    calibration_bins: int | None = None
    adaptive_margin: bool | None = None
    sel: object = None

    def __setattr__(self, name: str, value) -> None:
        if name not in _CHECKS:
            raise AttributeError(f"SearchParametersAMIPS has no setting {name!r}; settings: {SETTINGS + ('sel',)}")
        object.__setattr__(self, name, None if value is None else _CHECKS[name](value, name))

    def given(self) -> dict:
        """The fields that are set (not None)."""
        return {name: value for name, value in vars(self).items() if value is not None}


SETTINGS = tuple(f.name for f in fields(SearchParametersAMIPS) if f.name != "sel")  # what an index keeps
REQUIRED = ("nprobe", "max_nprobe", "fallback", "fallback_nprobe", "scan_method", "confidence_rank",
            "calibration_bins", "adaptive_margin")  # an index always has these


@dataclass
class SearchStats:
    """What the last search did: mean lists probed per query (fallback included), rounds run,
    share of queries that reached the fallback, router seconds per query, total seconds, and
    whether a selective filter made it scan the allowed keys directly (``brute_force``), and whether
    the margin was tightened for traffic unlike the calibration queries (``traffic_shift``)."""
    n_queries: int = 0
    mean_lists_probed: float = 0.0
    rounds: int = 0
    fallback_share: float = 0.0
    router_seconds_per_query: float = 0.0
    seconds: float = 0.0
    brute_force: bool = False
    traffic_shift: bool = False
