"""Routers: given queries, score every IVF list; the probe order is the score order.

One small interface: ``scores(xq) -> [n, nlist]`` (higher = probe first),
``route(xq, n_lists) -> (scores [n, n_lists] descending, lists [n, n_lists] int64, −1 padded)`` and
``ranker(xq)``, which scores a batch once and then routes any subset of its rows, for search rounds.
``macs_per_query`` is the router's own multiply-add count, part of the cost of a search.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .nn import KeyNet, SupportNet

_CHUNK = 8192  # queries per forward pass, to bound memory


def top_lists(scores: np.ndarray, n_lists: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_lists`` best lists of each row of ``scores [n, nlist]``, best first.

    The one place that turns cluster scores into a probe order. Returns ``(scores [n, n_lists]
    float32, lists [n, n_lists] int64)``; columns beyond nlist hold −inf and −1.
    """
    n, nlist = scores.shape
    m = min(n_lists, nlist)
    if m <= 12:  # a partial heap (torch.topk) beats numpy's partition for very few lists
        top = torch.topk(torch.from_numpy(np.ascontiguousarray(scores, np.float32)), m, dim=1, sorted=True)
        out_scores, lists = top.values.numpy(), top.indices.numpy()
    else:
        part = np.argpartition(scores, nlist - m, axis=1)[:, nlist - m:] if m < nlist else \
            np.broadcast_to(np.arange(nlist), (n, nlist))
        part_scores = np.take_along_axis(scores, part, axis=1)
        order = np.argsort(-part_scores, axis=1, kind="stable")
        lists = np.take_along_axis(part, order, axis=1).astype(np.int64)
        out_scores = np.take_along_axis(part_scores, order, axis=1).astype(np.float32)
    if n_lists > nlist:
        pad = n_lists - nlist
        lists = np.hstack([lists, np.full((n, pad), -1, np.int64)])
        out_scores = np.hstack([out_scores, np.full((n, pad), -np.inf, np.float32)])
    return out_scores, lists


class Router:
    """Base class: subclasses implement ``scores``; ``route`` ranks lists by them."""

    name = "router"
    model: torch.nn.Module | None = None

    def scores(self, xq: np.ndarray) -> np.ndarray:
        """Per-list scores ``[n, nlist] float32`` for queries ``[n, d] float32``."""
        raise NotImplementedError

    def route(self, xq: np.ndarray, n_lists: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores [n, n_lists], lists [n, n_lists])``, best list first."""
        return self.ranker(xq)(slice(None), n_lists)

    def ranker(self, xq: np.ndarray) -> Callable:
        """Score ``xq [n, d]`` once; the result ``rank(rows, n_lists)`` is ``route(xq[rows], n_lists)``."""
        scores = self.scores(xq)
        return lambda rows, n_lists: top_lists(scores[rows], n_lists)

    @property
    def macs_per_query(self) -> int:
        """Multiply-adds the router spends per query."""
        raise NotImplementedError


class CentroidRouter(Router):
    """Plain IVF: lists ranked by the faiss coarse quantizer (<q, c> for an inner-product index).

    Routing calls the quantizer's own search, so the probe lists are exactly faiss's.
    """

    name = "centroid"

    def __init__(self, quantizer, centroids: np.ndarray):
        self.quantizer = quantizer
        self.centroids = centroids

    def scores(self, xq: np.ndarray) -> np.ndarray:
        return xq @ self.centroids.T

    def ranker(self, xq: np.ndarray) -> Callable:
        return lambda rows, n_lists: self.quantizer.search(xq[rows], n_lists)

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
        self.name = "linear" if model.depth == 0 else "supportnet"

    @torch.inference_mode()
    def scores(self, xq: np.ndarray) -> np.ndarray:
        out = [self.model(torch.from_numpy(xq[lo:lo + _CHUNK])).numpy() for lo in range(0, len(xq), _CHUNK)]
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

    name = "keynet"

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

    def ranker(self, xq: np.ndarray) -> Callable:
        projected = self.project(xq)
        return lambda rows, n_lists: self.quantizer.search(projected[rows], n_lists)

    @property
    def macs_per_query(self) -> int:
        m = self.model
        return m.dim * m.width + 2 * m.depth * m.width ** 2 + m.width * m.dim * m.n_outputs + self.centroids.size
