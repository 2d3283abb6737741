"""Scan IVF lists for a probe plan: queries ``xq [n, d]`` and ``lists [n, p]`` (−1 = skip) → the k
best keys of each query among its lists, ``D [n, k] float32`` descending, ``I [n, k] int64``, padded
with −FLT_MAX / −1 like faiss.

Three ways, the same answer up to float rounding in the last bit (as faiss's own flat index gives
between its BLAS and SIMD paths):

- ``scan_faiss``: faiss ``search_preassigned``, for every IVF kind (flat, SQ, PQ, fast-scan).
  Query-major: each (query, list) pair is scanned on its own.
- ``scan_blas_by_list``: for flat lists only. The pairs are grouped by list and each list meets all of
  its queries in one product (the idea of faiss's ``contrib.big_batch_search``), whose scores go
  straight into each query's k-heap, the whole loop compiled (``kernels.scan_lists_into_heaps``,
  numba, free of the GIL: threads searching other queries run meanwhile). Given each query's *floor*
  (its k-th best from earlier rounds), the heaps start at the floor, so only keys above it enter.
  Measured against faiss's scan (one thread, the rounds of a search at target 0.95, 5,000 queries,
  k = 10, one run each): Debian (61 keys × 384-d per list) 2.0× at 21 and at 7.5 pairs per list,
  1.7× at 4.5, 1.2× at 2.1, 0.7× at 1.1; GloVe (137 × 50-d) 1.9× at 38, 2.5× at 8.7, 1.6× at 2.6,
  1.3× at 1.7. (The Python loop it replaced broke even at 4–7.5 pairs per list.)
- ``scan_blas_dense``: for flat lists when most queries probe most of the lists it touches (the exact
  fallback): every query meets every touched list in one BLAS product per list, no grouping, and
  the pairs outside the plan are masked.

``scan_plan`` picks by ``method`` (the ``scan_method`` search setting): "faiss" always takes
``scan_faiss``; "blas" takes ``scan_blas_by_list`` when every query has a floor, else
``scan_blas_dense`` when the plan covers at least half of the (query, touched list) pairs, else
``scan_blas_by_list``; "auto" does the same for flat lists and at least ``BLAS_MIN_QUERIES``
queries, scanning by list only plans of at least ``BY_LIST_PAIRS_PER_LIST`` pairs per touched list
(dense plans still go to ``scan_blas_dense``); else faiss.

The BLAS scans read the lists in place through ``FlatListViews``: pointers into faiss's memory,
valid while the index is not modified (``IndexAMIPS`` holds its read lock for the whole search) and
handed back with ``release`` (a no-op for faiss's in-memory lists, needed for on-disk ones).
"""
from __future__ import annotations

import contextlib
import functools

import faiss
import numpy as np

from . import kernels
from .routing import top_lists

EMPTY_SCORE = kernels.EMPTY_SCORE  # what faiss returns for a missing result (inner product)
# Pairs per touched list from which the by-list scan beats faiss's (measured break-even, module
# docstring: under 2 on Debian and on GloVe).
BY_LIST_PAIRS_PER_LIST = 2
# Fewer queries than this are always scanned by faiss. Measured (Debian, one thread, µs per call,
# faiss / BLAS dense): 1 query × 8 lists 59 / 430, × 900 lists 6,821 / 16,631; 8 × 900: 33,555 /
# 33,874; 16 × 900: 72,232 / 40,841. Reading a list's memory costs ~15 µs, which only a batch repays.
BLAS_MIN_QUERIES = 16
DENSE_SHARE = 0.5  # planned share of all (query, touched list) pairs above which scan_blas_dense wins
SCAN_METHODS = ("auto", "faiss", "blas")
_MAX_CANDIDATES = 1 << 22  # scores held at once by the by-list (a list × its queries) and dense (queries × keys) scans


def is_flat(ivf) -> bool:
    """True when the lists hold raw float32 keys (an ``IndexIVFFlat``)."""
    return type(ivf) is faiss.IndexIVFFlat


class FlatListViews:
    """A flat IVF's lists, read in place, as the rounds of one search first need them.

    ``views.addresses(lists)``: ``(key_addresses, id_addresses, sizes) [nlist] int64`` for the
    compiled scan, set for every list in the plan ``lists`` (zeros for an empty list or one not yet
    needed). ``views(lists)``: ``keys`` and ``ids``, indexed by list number, holding ``[size, d]
    float32`` and ``[size] int64`` numpy views of the same lists (None where not needed). Valid until
    the index is next modified; ``release`` hands the pointers back."""

    def __init__(self, ivf):
        self._ivf = ivf
        self._keys, self._ids = [None] * ivf.nlist, [None] * ivf.nlist
        self._table = np.zeros((3, ivf.nlist), np.int64)  # key address, id address, size
        self._loaded = np.zeros(ivf.nlist, bool)
        self._pointers = {}  # list → faiss's (codes, ids) pointers, handed back by release
        # faiss's in-memory lists hand out their own memory: nothing to give back
        self._must_release = type(faiss.downcast_InvertedLists(ivf.invlists)) is not faiss.ArrayInvertedLists

    def addresses(self, lists: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self._load(np.unique(lists[lists >= 0]))
        return self._table[0], self._table[1], self._table[2]

    def __call__(self, lists: np.ndarray) -> tuple[list, list]:
        planned = np.unique(lists[lists >= 0])
        self._load(planned)
        sizes, d = self._table[2], self._ivf.d
        for i in planned.tolist():
            if self._keys[i] is None and sizes[i]:
                codes, list_ids = self._pointers[i]
                self._keys[i] = faiss.rev_swig_ptr(codes, int(sizes[i]) * d * 4).view(np.float32).reshape(-1, d)
                self._ids[i] = faiss.rev_swig_ptr(list_ids, int(sizes[i]))
        return self._keys, self._ids

    def _load(self, planned: np.ndarray) -> None:
        """Fetch faiss's pointers of the ``planned`` lists (distinct numbers) not fetched yet."""
        invlists = self._ivf.invlists
        need = planned[~self._loaded[planned]]
        self._loaded[need] = True
        found = []
        for i in need.tolist():
            size = invlists.list_size(i)
            if size:
                codes, list_ids = invlists.get_codes(i), invlists.get_ids(i)
                self._pointers[i] = codes, list_ids
                found.append((i, int(codes), int(list_ids), size))
        if found:
            found = np.array(found, np.int64)
            self._table[:, found[:, 0]] = found[:, 1:].T

    def release(self) -> None:
        """Hand every pointer back to the inverted lists; the views are invalid afterwards."""
        if self._must_release:
            invlists = self._ivf.invlists
            for i, (codes, ids) in self._pointers.items():
                invlists.release_codes(i, codes)
                invlists.release_ids(i, ids)
        self._keys, self._ids = [None] * self._ivf.nlist, [None] * self._ivf.nlist
        self._table[:] = 0
        self._loaded[:] = False
        self._pointers = {}


def scan_plan(ivf, xq: np.ndarray, k: int, lists: np.ndarray, coarse: np.ndarray | None = None,
              centroids: np.ndarray | None = None, method: str = "auto", views: FlatListViews | None = None,
              sel=None, floor: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k best keys of each query among its ``lists [n, p]``, by the method that suits the plan.

    ``coarse [n, p]``: the quantizer's distances to those lists (faiss needs them for residual codes);
    when None they are computed from ``centroids [nlist, d]``. ``views``: the lists' views to reuse.
    ``sel``: a faiss ``IDSelector`` for the faiss scan; the BLAS scans see only what ``views`` holds
    (under a filter, views cut down to the allowed keys: ``filtering.ListFilter.views``).
    ``floor [n]``: each query's k-th best score so far (−inf: fewer than k yet); the answer may then
    leave out keys scoring at or below it, which cannot enter the query's top k.
    """
    if method not in SCAN_METHODS:
        raise ValueError(f"unknown scan_method {method!r}; choose one of {SCAN_METHODS}")
    if method == "blas" and not is_flat(ivf):
        raise ValueError("scan_method='blas' needs flat lists (IndexIVFFlat); this index compresses its keys")
    if method == "blas" or (method == "auto" and is_flat(ivf) and len(lists) >= BLAS_MIN_QUERIES):
        pairs, touched = _plan_size(lists, ivf.nlist)
        by_list = method == "blas" or pairs >= BY_LIST_PAIRS_PER_LIST * touched
        dense = pairs >= DENSE_SHARE * len(lists) * touched
        floored = floor is not None and np.isfinite(floor).all()  # a dense plan too: only keys above enter
        if by_list and (floored or not dense):
            return scan_blas_by_list(ivf, xq, k, lists, views, floor)
        if dense:
            return scan_blas_dense(ivf, xq, k, lists, views)
    if coarse is None:
        coarse = coarse_distances(ivf, centroids, xq, lists)
    return scan_faiss(ivf, xq, k, lists, coarse, sel)


def _plan_size(lists: np.ndarray, nlist: int) -> tuple[int, int]:
    """(query, list) pairs in the plan, and how many lists it touches."""
    planned = lists[lists >= 0]
    return len(planned), max(1, np.count_nonzero(np.bincount(planned, minlength=nlist)))


def coarse_distances(ivf, centroids: np.ndarray | None, xq: np.ndarray, lists: np.ndarray) -> np.ndarray:
    """The quantizer's distance of each query to each planned list's centroid ``[n, p] float32``
    (zeros where the codes do not depend on it)."""
    if is_flat(ivf) or not ivf.by_residual:
        return np.zeros(lists.shape, np.float32)
    cents = centroids[lists.clip(0)]
    if ivf.quantizer.metric_type == faiss.METRIC_INNER_PRODUCT:
        return np.einsum("nd,npd->np", xq, cents).astype(np.float32)
    return ((xq[:, None, :] - cents) ** 2).sum(axis=2).astype(np.float32)


def scan_faiss(ivf, xq: np.ndarray, k: int, lists: np.ndarray, coarse: np.ndarray, sel=None
               ) -> tuple[np.ndarray, np.ndarray]:
    """faiss ``search_preassigned`` of ``xq [n, d]`` over ``lists [n, p]`` with ``coarse [n, p]``,
    keeping only the ids a faiss ``IDSelector`` ``sel`` allows (when given)."""
    n, width = lists.shape
    if n == 0 or width == 0:  # nothing to scan (faiss would read a list number past the plan)
        return np.full((n, k), EMPTY_SCORE, np.float32), np.full((n, k), -1, np.int64)
    D = np.empty((n, k), np.float32)
    I = np.empty((n, k), np.int64)
    lists = np.ascontiguousarray(lists, np.int64)
    coarse = np.ascontiguousarray(coarse, np.float32)
    xq = np.ascontiguousarray(xq, np.float32)
    params = faiss.SearchParametersIVF(nprobe=width, sel=sel) if sel is not None else _ivf_params(width)
    ivf.search_preassigned_c(n, faiss.swig_ptr(xq), k, faiss.swig_ptr(lists), faiss.swig_ptr(coarse),
                             faiss.swig_ptr(D), faiss.swig_ptr(I), False, params)
    return D, I


@functools.lru_cache(maxsize=256)
def _ivf_params(nprobe: int):
    """faiss search parameters for ``nprobe`` lists and no filter, made once (read-only in a search)."""
    return faiss.SearchParametersIVF(nprobe=nprobe)


def scan_blas_by_list(ivf, xq: np.ndarray, k: int, lists: np.ndarray, views: FlatListViews | None = None,
                      floor: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Flat lists only: group the (query, list) pairs by list, one product per list, whose scores go
    straight into each query's k-heap (``kernels.scan_lists_into_heaps``, compiled, free of the GIL).
    ``floor [n]``: each query's k-th best so far (−inf: fewer than k); keys scoring at or below it are
    left out. ``views``: the caller's views of the lists (made and released here when None)."""
    n = len(lists)
    bounds, query_of = _pairs_by_list(lists, ivf.nlist)
    # A floor fills a query's heap with placeholders (id −1) at the floor, so only higher scores enter.
    D = np.full((n, k), EMPTY_SCORE, np.float32) if floor is None else np.repeat(
        np.asarray(floor, np.float32)[:, None], k, axis=1)
    I = np.full((n, k), -1, np.int64)
    with _views_of(ivf, views) as own:
        kernels.scan_lists_into_heaps(*own.addresses(lists), np.ascontiguousarray(xq, np.float32), bounds,
                                      query_of, D, I, _MAX_CANDIDATES)
    return D, I


def _pairs_by_list(lists: np.ndarray, nlist: int) -> tuple[np.ndarray, np.ndarray]:
    """The plan's (query, list) pairs grouped by list: ``bounds [nlist + 1]`` into ``query_of``, the
    query of each pair in list order (stable; the −1 entries come first and are skipped): list i's
    queries are ``query_of[bounds[i]:bounds[i + 1]]``."""
    flat = lists.reshape(-1)
    order = np.argsort(flat, kind="stable")
    return np.searchsorted(flat[order], np.arange(nlist + 1)).astype(np.int64), order // lists.shape[1]


def scan_blas_dense(ivf, xq: np.ndarray, k: int, lists: np.ndarray, views: FlatListViews | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Flat lists only: every query against every list the plan touches, unplanned pairs masked.
    ``views``: the caller's views of the lists (made and released here when None)."""
    with _views_of(ivf, views) as own:
        return _dense(*own(lists), xq, k, lists)


@contextlib.contextmanager
def _views_of(ivf, views: FlatListViews | None):
    """The caller's views of the lists, or fresh ones released on exit."""
    if views is not None:
        yield views
        return
    own = FlatListViews(ivf)
    try:
        yield own
    finally:
        own.release()


def _dense(keys: list, ids: list, xq: np.ndarray, k: int, lists: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(lists)
    planned = np.zeros((n, len(keys)), bool)
    valid = lists >= 0
    planned[np.nonzero(valid)[0], lists[valid]] = True
    touched = [i for i in np.flatnonzero(planned.any(axis=0)) if keys[i] is not None]
    D = np.full((n, k), EMPTY_SCORE, np.float32)
    I = np.full((n, k), -1, np.int64)
    if not touched:
        return D, I
    column_list = np.concatenate([np.full(len(ids[i]), i) for i in touched])  # the list of each candidate
    all_ids = np.concatenate([ids[i] for i in touched])
    total = len(all_ids)
    kk = min(k, total)
    step = max(1, _MAX_CANDIDATES // total)
    for lo in range(0, n, step):
        x_t = np.ascontiguousarray(xq[lo:lo + step].T)
        scores_t = np.empty((total, x_t.shape[1]), np.float32)  # one contiguous row block per list
        offset = 0
        for i in touched:
            np.matmul(keys[i], x_t, out=scores_t[offset:offset + len(ids[i])])
            offset += len(ids[i])
        scores = np.ascontiguousarray(scores_t.T)
        scores[~planned[lo:lo + step][:, column_list]] = EMPTY_SCORE
        D[lo:lo + step, :kk], cols = top_lists(scores, kk)
        I[lo:lo + step, :kk] = np.where(D[lo:lo + step, :kk] > EMPTY_SCORE, all_ids[cols], -1)
    return D, I
