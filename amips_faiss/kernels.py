"""Compiled loops (numba, ``nogil``): the parts of a scan that would otherwise be a Python loop per IVF
list holding the GIL, so that threads searching other queries meanwhile run on other cores.

``scan_lists_into_heaps`` is the by-list scan's whole loop: for each list, its queries gathered, their
products with the list's keys (``inner_products``, register-blocked; no BLAS library, so no BLAS
thread pool to compete with the caller's threads), every score pushed into its query's k-heap.
Lists are passed as raw addresses of faiss's own memory (``key_addresses``, ``id_addresses``,
``sizes``), read in place, never copied. ``merge_sorted`` merges sorted results (``probing.merge_into``);
``top_per_row`` is the k best of each row of scores (``routing.top_lists`` for a few of many).

Compiled on first use and cached on disk by numba (``__pycache__`` beside this file, or numba's
user-wide cache when that is read-only): ~3–6 s once per install, ~0.5 s to load in a new process.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

EMPTY_SCORE = np.float32(np.finfo(np.float32).min)  # faiss's value for a missing inner-product result


def _pointer_intrinsic(item_type):
    @intrinsic
    def pointer_at(typingctx, address):
        sig = types.CPointer(item_type)(types.int64)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(types.CPointer(item_type)))
        return sig, codegen
    return pointer_at


_float32_at = _pointer_intrinsic(types.float32)
_int64_at = _pointer_intrinsic(types.int64)


@numba.njit(nogil=True, cache=True, inline="always")
def _replace_smallest(values, ids, score, ident):
    """Min-heap ``values, ids [k]`` (smallest at 0): put ``(score, ident)`` in place of the smallest."""
    k = len(values)
    j = 0
    while True:
        child = 2 * j + 1
        if child >= k:
            break
        if child + 1 < k and values[child + 1] < values[child]:
            child += 1
        if score <= values[child]:
            break
        values[j], ids[j] = values[child], ids[child]
        j = child
    values[j], ids[j] = score, ident


@numba.njit(nogil=True, cache=True, fastmath=True)
def inner_products(queries, keys, scores):
    """``scores [m, size] = queries [m, d] @ keys [size, d]ᵀ`` (float32), in blocks of 2 queries ×
    4 keys so that each value loaded serves several multiply-adds (a list often meets only 1–3
    queries, so the block is narrow in queries: on Debian's 61 × 384-d lists 2.4× a plain loop at 2
    queries, as fast as 4 × 2 blocks from 8)."""
    m, d = queries.shape
    size = keys.shape[0]
    j = 0
    while j < m:
        pair = j + 1 < m  # two queries, or the last one alone
        q0, q1 = queries[j], queries[j + 1 if pair else j]
        t = 0
        while t + 4 <= size:
            k0, k1, k2, k3 = keys[t], keys[t + 1], keys[t + 2], keys[t + 3]
            a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0)
            for c in range(d):
                a0 += q0[c] * k0[c]
                a1 += q0[c] * k1[c]
                a2 += q0[c] * k2[c]
                a3 += q0[c] * k3[c]
                if pair:
                    b0 += q1[c] * k0[c]
                    b1 += q1[c] * k1[c]
                    b2 += q1[c] * k2[c]
                    b3 += q1[c] * k3[c]
            scores[j, t], scores[j, t + 1], scores[j, t + 2], scores[j, t + 3] = a0, a1, a2, a3
            if pair:
                scores[j + 1, t], scores[j + 1, t + 1], scores[j + 1, t + 2], scores[j + 1, t + 3] = b0, b1, b2, b3
            t += 4
        for t in range(t, size):
            a0 = b0 = np.float32(0)
            for c in range(d):
                a0 += q0[c] * keys[t, c]
                b0 += q1[c] * keys[t, c]
            scores[j, t] = a0
            if pair:
                scores[j + 1, t] = b0
        j += 2


@numba.njit(nogil=True, cache=True)
def scan_lists_into_heaps(key_addresses, id_addresses, sizes, xq, bounds, query_of, D, I, max_scores):
    """Scan lists for their queries, into per-query heaps, then sort them.

    ``key_addresses, id_addresses, sizes [nlist] int64``: where list i's ``[sizes[i], d] float32``
    keys and ``[sizes[i]] int64`` ids live (0 / 0 / 0 for a list not to read). ``xq [n, d] float32``.
    List i meets queries ``query_of[bounds[i]:bounds[i + 1]]`` (``[nlist + 1]``, ``[pairs]`` int64).
    ``D [n, k] float32, I [n, k] int64``: min-heaps on entry (a floor = k placeholders at it with id
    −1: only higher scores enter); on exit each row sorted descending, placeholders dropped, padded
    with ``EMPTY_SCORE`` / −1. ``max_scores``: scores held at once (a list × a block of its queries).
    """
    n, k = D.shape
    d = xq.shape[1]
    most, most_scores = 1, 1  # queries, and scores, of the biggest block
    for i in range(len(sizes)):
        if sizes[i]:
            block = min(bounds[i + 1] - bounds[i], max(1, max_scores // sizes[i]))
            most, most_scores = max(most, block), max(most_scores, block * sizes[i])
    gathered = np.empty((most, d), np.float32)
    scores_buffer = np.empty(most_scores, np.float32)
    for i in range(len(sizes)):
        size = sizes[i]
        if size == 0 or bounds[i] == bounds[i + 1]:
            continue
        keys = numba.carray(_float32_at(key_addresses[i]), (size, d))
        ids = numba.carray(_int64_at(id_addresses[i]), (size,))
        step = max(1, max_scores // size)
        for lo in range(bounds[i], bounds[i + 1], step):
            m = min(step, bounds[i + 1] - lo)
            queries = gathered[:m]
            for j in range(m):
                queries[j, :] = xq[query_of[lo + j]]
            scores = scores_buffer[:m * size].reshape((m, size))
            inner_products(queries, keys, scores)
            for j in range(m):
                row = query_of[lo + j]
                values, row_ids = D[row], I[row]
                for t in range(size):
                    if scores[j, t] > values[0]:
                        _replace_smallest(values, row_ids, scores[j, t], ids[t])
    for row in range(n):
        order = np.argsort(-D[row], kind="mergesort")
        values, row_ids = D[row].copy(), I[row].copy()
        kept = 0
        for j in order:
            if row_ids[j] >= 0:
                D[row, kept], I[row, kept] = values[j], row_ids[j]
                kept += 1
        D[row, kept:] = EMPTY_SCORE
        I[row, kept:] = -1


@numba.njit(nogil=True, cache=True)
def merge_sorted(D, I, rows, D_new, I_new):
    """Merge ``D_new, I_new [len(rows), k]`` into rows ``rows`` of ``D, I [n, k]``, both sorted
    descending: each row keeps its k best, on ties the results already there first."""
    k = D.shape[1]
    values, ids = np.empty(k, D.dtype), np.empty(k, I.dtype)
    for j in range(len(rows)):
        row = rows[j]
        if D_new[j, 0] <= D[row, k - 1]:
            continue
        a = b = 0
        for t in range(k):
            if D_new[j, b] > D[row, a]:
                values[t], ids[t] = D_new[j, b], I_new[j, b]
                b += 1
            else:
                values[t], ids[t] = D[row, a], I[row, a]
                a += 1
        D[row], I[row] = values, ids


@numba.njit(nogil=True, cache=True, inline="always")
def _offer(top, cols, filled, value, column):
    """Offer ``(value, column)`` to the descending ``top, cols [m]`` holding ``filled`` entries: kept
    if there is room or it beats the last (then dropped), after equal values; returns the new count."""
    m = len(top)
    if filled == m and not value > top[m - 1]:
        return filled
    p = filled if filled < m else m - 1
    while p > 0 and top[p - 1] < value:
        top[p], cols[p] = top[p - 1], cols[p - 1]
        p -= 1
    top[p], cols[p] = value, column
    return min(filled + 1, m)


@numba.njit(nogil=True, cache=True, fastmath=True)
def top_per_row(scores, out_scores, out_columns):
    """The ``m = out_scores.shape[1]`` largest values of each row of ``scores [n, c]`` (C-contiguous,
    m ≤ c), best first (ties: lower column first), into ``out_scores [n, m]`` and ``out_columns [n, m]
    int64``. One pass per row against the m-th best so far, 16 values at a time: a block with no
    value above it costs one vectorised comparison (a fixed-size block of a reshaped row; loops of a
    variable count did not vectorise)."""
    n, c = scores.shape
    m = out_scores.shape[1]
    n_blocks = c // 16
    for r in range(n):
        top, cols = out_scores[r], out_columns[r]
        filled = 0
        blocks = scores[r, :n_blocks * 16].reshape(n_blocks, 16)
        for b in range(n_blocks):
            if filled == m:
                above = 0
                for j in range(16):
                    above += blocks[b, j] > top[m - 1]
                if above == 0:
                    continue
            for j in range(16):
                filled = _offer(top, cols, filled, blocks[b, j], 16 * b + j)
        for j in range(16 * n_blocks, c):
            filled = _offer(top, cols, filled, scores[r, j], j)
