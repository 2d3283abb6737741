"""How good an answer is, against exact targets. numpy only."""
from __future__ import annotations

import numpy as np

_REL_TOL = 1e-5


def found_scores(keys: np.ndarray, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """<q_i, keys[ids_i]> for ``ids [n]`` (−inf where ids is −1). ``[n] float32``."""
    ids = np.asarray(ids)
    valid = ids >= 0
    out = np.full(len(ids), -np.inf, np.float32)
    out[valid] = np.einsum("nd,nd->n", queries[valid], keys[ids[valid]])
    return out


def match_rate(scores: np.ndarray, exact_values: np.ndarray) -> float:
    """Share of queries whose returned top-1 has the exact top score (ties count as matches).

    ``scores [n]``: the true inner product of each returned key (see ``found_scores``);
    ``exact_values [n]``: h(q). A relative tolerance absorbs float32 summation order.
    """
    scores, exact = np.asarray(scores, np.float64), np.asarray(exact_values, np.float64)
    return float(np.mean(scores >= exact - _REL_TOL * (np.abs(exact) + 1e-6)))


def recall_at_k(I: np.ndarray, I_true: np.ndarray) -> float:
    """Mean |I_i ∩ I_true_i| / k over queries, for ``I, I_true [n, k]`` ids."""
    I, I_true = np.asarray(I), np.asarray(I_true)
    hits = (I[:, :, None] == I_true[:, None, :]) & (I[:, :, None] >= 0)
    return float(hits.any(axis=2).sum(axis=1).mean() / I_true.shape[1])

