"""Exact answers the models learn from, and leakage-free query splits. numpy in, numpy out.

The support function of a key set K is h(q) = max_i <q, k_i>; its gradient is the argmax key.
Per IVF list c, h_c(q) = max over the keys of list c (−inf for an empty list).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from .validation import check_positive_int, check_vectors

_BLOCK_BYTES = 256 << 20  # memory for one block of query-key scores


@dataclass
class SupportTargets:
    """Exact MIPS answers for ``n`` queries.

    values: ``[n] float32`` h(q); ids: ``[n] int64`` argmax row of ``keys``;
    cluster_values: ``[n, nlist] float32`` h_c(q) (−inf for empty lists) or None.
    """
    values: np.ndarray
    ids: np.ndarray
    cluster_values: np.ndarray | None = None

    def subset(self, rows: np.ndarray) -> "SupportTargets":
        """The targets of the given query rows."""
        cv = None if self.cluster_values is None else self.cluster_values[rows]
        return SupportTargets(self.values[rows], self.ids[rows], cv)

    def concat(self, other: "SupportTargets") -> "SupportTargets":
        """These targets followed by ``other``'s."""
        cv = None if self.cluster_values is None else np.concatenate([self.cluster_values, other.cluster_values])
        return SupportTargets(np.concatenate([self.values, other.values]), np.concatenate([self.ids, other.ids]), cv)


def support_values(keys: np.ndarray, queries: np.ndarray, assign: np.ndarray | None = None,
                   nlist: int | None = None, block_size: int | None = None,
                   progress: bool = True) -> SupportTargets:
    """h(q), its argmax id and, given ``assign [N] int`` (key → list), per-list h_c(q).

    Scores are computed by BLAS in blocks of queries so that memory stays bounded
    (``block_size`` queries × N keys at a time; default: 256 MiB of scores).
    Keys may be unnormalised. ``keys [N, d]``, ``queries [n, d]``.
    """
    keys = check_vectors(keys, "keys")
    queries = check_vectors(queries, "queries", d=keys.shape[1])
    n, N = len(queries), len(keys)
    if block_size is None:
        block_size = max(1, min(4096, _BLOCK_BYTES // (4 * N)))
    check_positive_int(block_size, "block_size")
    values = np.empty(n, np.float32)
    ids = np.empty(n, np.int64)
    cluster_values = None
    if assign is not None:
        assign = np.asarray(assign)
        if assign.shape != (N,) or not np.issubdtype(assign.dtype, np.integer):
            raise ValueError(f"assign must be an integer array of shape ({N},), got "
                             f"{assign.dtype} {assign.shape}")
        nlist = check_positive_int(nlist if nlist is not None else int(assign.max()) + 1, "nlist")
        if assign.min() < 0 or assign.max() >= nlist:
            raise ValueError(f"assign holds list numbers outside [0, {nlist})")
        order = np.argsort(assign, kind="stable")
        keys = keys[order]
        counts = np.bincount(assign, minlength=nlist)
        nonempty = np.flatnonzero(counts)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[nonempty]
        cluster_values = np.full((n, nlist), -np.inf, np.float32)
    bar = tqdm(total=n, desc="exact targets", unit="q", disable=not progress, leave=False)
    for lo in range(0, n, block_size):
        scores = queries[lo:lo + block_size] @ keys.T
        best = scores.argmax(axis=1)
        values[lo:lo + block_size] = scores[np.arange(len(best)), best]
        if assign is not None:
            ids[lo:lo + block_size] = order[best]
            cluster_values[lo:lo + block_size, nonempty] = np.maximum.reduceat(scores, starts, axis=1)
        else:
            ids[lo:lo + block_size] = best
        bar.update(len(best))
    bar.close()
    return SupportTargets(values, ids, cluster_values)


def split_queries(queries: np.ndarray, fractions: dict[str, float], seed: int = 0) -> dict[str, np.ndarray]:
    """Disjoint random row splits, e.g. ``{"train": .8, "calibration": .1, "test": .1}``.

    Rows holding the same vector are kept in the same split, so that no test query reaches training
    as a duplicate. Returns sorted index arrays ``{name: [m] int64}``; fractions must sum to <= 1.
    """
    queries = check_vectors(queries, "queries")
    if any(f < 0 for f in fractions.values()) or sum(fractions.values()) > 1 + 1e-9:
        raise ValueError(f"split fractions must be non-negative and sum to at most 1: {fractions}")
    _, group = np.unique(queries, axis=0, return_inverse=True)
    group = group.reshape(-1)
    n_groups = int(group.max()) + 1
    perm = np.random.default_rng(seed).permutation(n_groups)
    bounds = np.round(np.cumsum([0.0] + list(fractions.values())) * n_groups).astype(int)
    splits = {}
    for (name, _), lo, hi in zip(fractions.items(), bounds[:-1], bounds[1:]):
        member = np.zeros(n_groups, bool)
        member[perm[lo:hi]] = True
        splits[name] = np.flatnonzero(member[group])
    return splits


def augment_queries(queries: np.ndarray, copies: int, sigma: float = 0.02, seed: int = 0) -> np.ndarray:
    """``queries`` followed by ``copies`` noisy copies: q + sigma·||q||·ε, ε ~ N(0, I).

    Call it on the training split only (the copies of a test query must never reach training).
    Returns ``[n · (1 + copies), d] float32``.
    """
    queries = check_vectors(queries, "queries")
    if copies < 0:
        raise ValueError(f"copies must be >= 0, got {copies}")
    rng = np.random.default_rng(seed)
    norms = np.linalg.norm(queries, axis=1, keepdims=True)
    noisy = [queries] + [queries + sigma * norms * rng.standard_normal(queries.shape, np.float32)
                         for _ in range(copies)]
    return np.concatenate(noisy).astype(np.float32)


def transplant_queries(keys: np.ndarray, queries: np.ndarray, answer_ids: np.ndarray, n: int,
                       seed: int = 0) -> np.ndarray:
    """``n`` synthetic queries that look like real ones but sit near other keys.

    Query i's offset from its answer key a_i, in directions, is moved onto a random key j:
    q = ||q_i|| · (k_j/||k_j|| + q_i/||q_i|| − k_a/||k_a||). Real traffic asks about few of the keys;
    these queries cover the others with the same kind of query-to-answer offset (their exact
    targets are computed like any query's). ``answer_ids [len(queries)]``: argmax key rows.
    Call it on the training split only. Returns ``[n, d] float32``.
    """
    keys = check_vectors(keys, "keys")
    queries = check_vectors(queries, "queries", d=keys.shape[1])
    answer_ids = np.asarray(answer_ids)
    if answer_ids.shape != (len(queries),) or not np.issubdtype(answer_ids.dtype, np.integer) or \
            (len(answer_ids) and not 0 <= answer_ids.min() <= answer_ids.max() < len(keys)):
        raise ValueError(f"answer_ids must hold one key row in [0, {len(keys)}) per query ({len(queries)})")
    if n <= 0:
        return np.zeros((0, keys.shape[1]), np.float32)
    rng = np.random.default_rng(seed)
    i = rng.integers(0, len(queries), n)
    j = rng.integers(0, len(keys), n)
    unit_keys = keys / np.linalg.norm(keys, axis=1, keepdims=True).clip(1e-30)
    q_norm = np.linalg.norm(queries[i], axis=1, keepdims=True)
    offset = queries[i] / q_norm.clip(1e-30) - unit_keys[answer_ids[i]]
    return (q_norm * (unit_keys[j] + offset)).astype(np.float32)
