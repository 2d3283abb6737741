"""Search settings: ``SearchParametersAMIPS`` (per call, and the index's own defaults) and what a
search reports back, ``SearchStats``. Every value is checked when it is set; unknown names are
refused, so a typo never passes silently.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

from .scan import SCAN_METHODS
from .validation import check_fraction, check_positive_int

FALLBACKS = ("exact", "ivf", "none")


def _check_real(value, name: str, low: float = -math.inf, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) \
            or not low <= value <= high:
        bounds = "" if (low, high) == (-math.inf, math.inf) else f" in [{low}, {high}]"
        raise ValueError(f"{name} must be a number{bounds}, got {value!r}")
    return float(value)


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
}


@dataclass
class SearchParametersAMIPS:
    """Search settings; a field left None takes the index's attribute of the same name (which an
    index keeps for every field). Numbers of lists above nlist mean nlist, as in faiss.

    nprobe: lists probed in the first round. max_nprobe: lists after which an unsure query goes to
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
    when the margin comes from target_recall, 0 with an explicit margin.
    """
    nprobe: int | None = None
    max_nprobe: int | None = None
    target_recall: float | None = None
    margin: float | None = None
    fallback: str | None = None
    fallback_nprobe: int | None = None
    scan_method: str | None = None
    blend: float | None = None

    def __setattr__(self, name: str, value) -> None:
        if name not in _CHECKS:
            raise AttributeError(f"SearchParametersAMIPS has no setting {name!r}; settings: {SETTINGS}")
        object.__setattr__(self, name, None if value is None else _CHECKS[name](value, name))

    def given(self) -> dict:
        """The fields that are set (not None)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


SETTINGS = tuple(f.name for f in fields(SearchParametersAMIPS))
REQUIRED = ("nprobe", "max_nprobe", "fallback", "fallback_nprobe", "scan_method")  # an index always has these


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
