"""Routers: given queries, score every IVF list; the probe order is the score order.

One small interface: ``scores(xq) -> [n, nlist]`` (higher = probe first),
``route(xq, n_lists) -> (scores [n, n_lists] descending, lists [n, n_lists] int64, −1 padded)`` and
``ranker(xq, width)``, which scores a batch once and then routes any subset of its rows, for search
rounds (a big batch keeping only each row's ``width`` best lists).
``coarse_distances`` says whether route scores are the faiss quantizer's own distances (needed to
scan residual-coded lists), ``predicted_support`` turns them into an estimate of h(q), and
``macs_per_query`` is the router's own multiply-add count, part of the cost of a search. Subclass
``Router`` to bring your own; ``make_router`` builds the built-in kinds.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from . import kernels
from .nn import KeyNet, SupportNet

ROUTERS = ("centroid", "linear", "supportnet", "keynet")
LEARNED_ROUTERS = ("linear", "supportnet", "keynet")  # the kinds with a net to train
_CHUNK = 8192  # queries per forward pass, to bound memory
# Up to this many best lists, ``top_lists`` makes one compiled pass per row (``kernels.top_per_row``);
# beyond, a partition. µs per row, one thread, 5,000 rows (against the torch.topk used before):
# 4,000 lists, 5 best 2.9 (6.2), 17 best 5.7 (9.6), 65 best 17.8 (36.5); 977 lists, 5 best 1.4
# (1.9), 17 best 3.2 (8.8), 65 best 9.6 (10.6); one row of 4,000, 5 best 2.1 against 42 by partition.
TOP_PER_ROW_MAX = 64
_MIN_RANK_CHUNK = 256  # rows ranked at a time by ``Router.ranker``, at least
RANK_CHUNK_BYTES = 8 << 20  # router scores of a big batch held at once by ``Router.ranker`` (cache-sized)


def top_lists(scores: np.ndarray, n_lists: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_lists`` best lists of each row of ``scores [n, nlist]``, best first.

    The one place that turns cluster scores into a probe order. Returns ``(scores [n, n_lists]
    float32, lists [n, n_lists] int64)``; columns beyond nlist hold −inf and −1.
    """
    n, nlist = scores.shape
    m = min(n_lists, nlist)
    if m <= TOP_PER_ROW_MAX and m < nlist:  # a few of many: one compiled pass per row
        out_scores, lists = np.empty((n, m), np.float32), np.empty((n, m), np.int64)
        kernels.top_per_row(np.ascontiguousarray(scores, np.float32), out_scores, lists)
    elif n == 1 and m < nlist:  # one query (a service's call): 1-D, a third of the 2-D path's cost
        row = scores[0]
        part = np.argpartition(row, nlist - m)[nlist - m:]
        order = part[np.argsort(-row[part], kind="stable")]
        out_scores, lists = row[order][None].astype(np.float32, copy=False), order[None].astype(np.int64, copy=False)
    else:
        at = np.arange(n)[:, None]  # row indices: plain indexing costs less than take_along_axis
        part = np.argpartition(scores, nlist - m, axis=1)[:, nlist - m:] if m < nlist else \
            np.broadcast_to(np.arange(nlist), (n, nlist))
        part_scores = scores[at, part]
        order = np.argsort(-part_scores, axis=1, kind="stable")
        lists = part[at, order].astype(np.int64, copy=False)
        out_scores = part_scores[at, order].astype(np.float32, copy=False)
    if n_lists > nlist:
        pad = n_lists - nlist
        lists = np.hstack([lists, np.full((n, pad), -1, np.int64)])
        out_scores = np.hstack([out_scores, np.full((n, pad), -np.inf, np.float32)])
    return out_scores, lists


class Router:
    """Base class: subclasses implement ``scores`` (and ``macs_per_query``); ``route`` ranks lists by
    them. ``model``: the torch net behind the scores, saved with the index (None: nothing to save)."""

    model: torch.nn.Module | None = None

    def scores(self, xq: np.ndarray) -> np.ndarray:
        """Per-list scores ``[n, nlist] float32`` for queries ``[n, d] float32``."""
        raise NotImplementedError

    def route(self, xq: np.ndarray, n_lists: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores [n, n_lists], lists [n, n_lists])``, best list first."""
        return self.ranker(xq)(slice(None), n_lists)

    def ranker(self, xq: np.ndarray, width: int | None = None) -> Callable:
        """Score ``xq [n, d]`` once; the result ``rank(rows, n_lists)`` is ``route(xq[rows], n_lists)``.

        ``width``: the most lists most calls will ask for (a search's first rounds). A batch whose
        ``[n, nlist]`` scores exceed ``RANK_CHUNK_BYTES`` is then scored a cache-sized chunk of rows at
        a time and keeps only each row's ``width`` best lists (``[n, width]``, not ``[n, nlist]``:
        search blocks can be big without holding every list's score, and the scores are ranked
        while still in cache); a wider call scores its rows again. None: keep every score."""
        chunk = len(xq)
        if width is not None and len(xq) > _MIN_RANK_CHUNK:
            nlist = self.scores(xq[:1]).shape[1]  # one row's scores tell nlist
            chunk = len(xq) if width >= nlist else max(_MIN_RANK_CHUNK, RANK_CHUNK_BYTES // (4 * nlist))
        if chunk >= len(xq):
            scores = self.scores(xq)
            return lambda rows, n_lists: top_lists(scores[rows], n_lists)

        def route_in_chunks(x: np.ndarray, n_lists: int) -> tuple[np.ndarray, np.ndarray]:
            parts = [top_lists(self.scores(x[lo:lo + chunk]), n_lists) for lo in range(0, len(x), chunk)]
            if not parts:
                return np.zeros((0, n_lists), np.float32), np.zeros((0, n_lists), np.int64)
            return np.vstack([s for s, _ in parts]), np.vstack([lists for _, lists in parts])

        top_scores, top = route_in_chunks(xq, width)

        def rank(rows, n_lists: int) -> tuple[np.ndarray, np.ndarray]:
            if n_lists <= width:
                return top_scores[rows, :n_lists], top[rows, :n_lists]
            return route_in_chunks(xq[rows], n_lists)
        return rank

    def coarse_distances(self, route_scores: np.ndarray) -> np.ndarray | None:
        """The quantizer's distances to the routed lists when the route scores are them, else None
        (the scan then computes them where the list codes need them)."""
        return None

    def predicted_support(self, xq: np.ndarray, first_scores: np.ndarray) -> np.ndarray:
        """The router's estimate of h(q) ``[n]``, given its score of each query's first list."""
        return first_scores

    @property
    def macs_per_query(self) -> int:
        """Multiply-adds the router spends per query."""
        raise NotImplementedError


class CentroidRouter(Router):
    """Plain IVF: lists ranked by the faiss coarse quantizer (<q, c> for an inner-product index).

    Routing calls the quantizer's own search, so the probe lists are exactly faiss's.
    """

    def __init__(self, quantizer, centroids: np.ndarray):
        self.quantizer = quantizer
        self.centroids = centroids

    def scores(self, xq: np.ndarray) -> np.ndarray:
        return xq @ self.centroids.T

    def ranker(self, xq: np.ndarray, width: int | None = None) -> Callable:
        return lambda rows, n_lists: self.quantizer.search(xq[rows], n_lists)

    def coarse_distances(self, route_scores: np.ndarray) -> np.ndarray:
        return route_scores

    @property
    def macs_per_query(self) -> int:
        return self.centroids.size


class SupportNetRouter(Router):
    """Lists ranked by a multi-output SupportNet's predicted per-list support values f_c(q) ≈ h_c(q).

    With ``depth=0`` the SupportNet is linear, f_c(q) = <w_c, q> + b_c·||q||: the learned linear
    per-list router of Vecchiato et al. (SIGIR 2024), trained with the same listwise loss.
    """

    def __init__(self, model: SupportNet):
        self.model = model.eval()
        self._forward = model.frozen()  # numpy on a snapshot: no torch dispatch per call

    def scores(self, xq: np.ndarray) -> np.ndarray:
        if 0 < len(xq) <= _CHUNK:
            return self._forward(xq)
        out = [self._forward(xq[lo:lo + _CHUNK]) for lo in range(0, len(xq), _CHUNK)]
        return np.concatenate(out) if out else np.zeros((0, self.model.n_outputs), np.float32)

    @property
    def macs_per_query(self) -> int:
        m = self.model
        linear = m.n_outputs * m.dim if m.linear_rank is None else m.linear_rank * (m.dim + m.n_outputs)
        trunk = m.depth * m.width * m.dim + max(0, m.depth - 1) * m.width ** 2 + (m.depth > 0) * m.width * m.n_outputs
        return linear + trunk


class KeyNetProjectionRouter(Router):
    """Query projection: the coarse step of the IVF sees ||q||·KeyNet(q) instead of q.

    Lists are those the faiss quantizer picks for the predicted argmax key; candidates in them are
    still scored with the original query.
    """

    def __init__(self, model: KeyNet, quantizer, centroids: np.ndarray):
        self.model = model.eval()
        self.quantizer = quantizer
        self.centroids = centroids

    @torch.inference_mode()
    def project(self, xq: np.ndarray) -> np.ndarray:
        """``[n, d]`` → ``[n, d]`` predicted argmax keys times ||q||."""
        out = []
        for lo in range(0, len(xq), _CHUNK):
            q = torch.from_numpy(xq[lo:lo + _CHUNK])
            out.append((self.model(q) * q.norm(dim=1, keepdim=True)).numpy())
        return np.ascontiguousarray(np.concatenate(out) if out else np.zeros_like(xq), np.float32)

    def scores(self, xq: np.ndarray) -> np.ndarray:
        return self.project(xq) @ self.centroids.T

    def ranker(self, xq: np.ndarray, width: int | None = None) -> Callable:
        projected = self.project(xq)
        return lambda rows, n_lists: self.quantizer.search(projected[rows], n_lists)

    def predicted_support(self, xq: np.ndarray, first_scores: np.ndarray) -> np.ndarray:
        """Euler: h(q) = <∇h(q), q>, with KeyNet(q) standing in for ∇h(q)."""
        return (self.project(xq) * xq).sum(axis=1) / np.linalg.norm(xq, axis=1).clip(1e-30)

    @property
    def macs_per_query(self) -> int:
        m = self.model
        return m.dim * m.width + 2 * m.depth * m.width ** 2 + m.width * m.dim + self.centroids.size


def make_router(kind: str, quantizer, centroids: np.ndarray, model: torch.nn.Module | None = None) -> Router:
    """The built-in router ``kind`` (one of ``ROUTERS``) over a trained quantizer with ``centroids
    [nlist, d]``; learned kinds take their trained ``model`` (a SupportNet, or a KeyNet for "keynet")."""
    if kind == "centroid":
        return CentroidRouter(quantizer, centroids)
    if kind in ("supportnet", "linear") and isinstance(model, SupportNet):
        return SupportNetRouter(model)
    if kind == "keynet" and isinstance(model, KeyNet):
        return KeyNetProjectionRouter(model, quantizer, centroids)
    raise ValueError(f"router {kind!r} cannot be built from {type(model).__name__}; "
                     f"built-in routers: {ROUTERS}")
