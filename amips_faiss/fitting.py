"""Building a router for a key set and a query sample, as module functions (``IndexAMIPS.train`` is
a few calls into here): the training set (split, augment, transplant, exact per-list targets), a
fresh net of the router's kind, its training, and the ``Router`` that uses it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .nn import KeyNet, SupportNet
from .routing import Router, make_router
from .targets import SupportTargets, augment_queries, split_queries, support_values, transplant_queries
from .training import TrainConfig, train_direct, train_router


@dataclass
class TrainingSet:
    """Queries and their exact targets, split without leakage: ``train`` (real, noisy and
    transplanted queries) fits the router, ``validation`` stops it early, ``calibration`` sets the
    confidence margin. Each ``*_queries`` is ``[n, d] float32``, each target a ``SupportTargets``
    with per-list values."""
    train_queries: np.ndarray
    train: SupportTargets
    validation_queries: np.ndarray
    validation: SupportTargets
    calibration_queries: np.ndarray
    calibration: SupportTargets


def proxy_queries(keys: np.ndarray, seed: int = 0, n: int = 20_000) -> np.ndarray:
    """Stand-ins for real traffic when none is given: up to ``n`` key directions plus noise
    ``[n, d] float32`` (a proxy; real queries make a better router)."""
    rng = np.random.default_rng(seed)
    sample = keys[rng.choice(len(keys), size=min(len(keys), n), replace=False)]
    directions = sample / np.linalg.norm(sample, axis=1, keepdims=True).clip(1e-12)
    noise = 0.1 * rng.standard_normal(sample.shape).astype(np.float32) / math.sqrt(keys.shape[1])
    return (directions + noise).astype(np.float32)


def build_training_set(keys: np.ndarray, assign: np.ndarray, nlist: int, queries: np.ndarray,
                       config: TrainConfig, learned: bool = True) -> TrainingSet:
    """Split ``queries [n, d]`` into calibration / validation / train and compute exact targets
    against ``keys [N, d]`` in lists ``assign [N]``. ``learned=False`` (a router with nothing to
    learn) keeps only the calibration split."""
    n = len(queries)
    cal_frac = min(0.25, config.n_calibration / n)
    val_frac = min(0.1, config.n_validation / n) if learned else 0.0
    train_frac = 1.0 - cal_frac - val_frac if learned else 0.0
    parts = split_queries(queries, {"calibration": cal_frac, "validation": val_frac, "train": train_frac},
                          seed=config.seed)
    real_train = queries[parts["train"]]
    train_q = augment_queries(real_train, config.augment, seed=config.seed) if len(real_train) else real_train
    cal_q, val_q = queries[parts["calibration"]], queries[parts["validation"]]
    everything = np.concatenate([cal_q, val_q, train_q])
    if not len(everything):
        raise ValueError("no query is left to train or calibrate on: raise n_calibration or pass more queries")
    targets = support_values(keys, everything, assign, nlist, progress=config.progress)
    n_cal, n_val = len(cal_q), len(val_q)
    cal = targets.subset(np.arange(n_cal))
    val = targets.subset(np.arange(n_cal, n_cal + n_val))
    train = targets.subset(np.arange(n_cal + n_val, len(targets.values)))
    n_synthetic = int(config.transplant * len(real_train)) if learned else 0
    if n_synthetic > 0:
        synthetic = transplant_queries(keys, real_train, train.ids[:len(real_train)], n_synthetic, seed=config.seed)
        train = train.concat(support_values(keys, synthetic, assign, nlist, progress=config.progress))
        train_q = np.concatenate([train_q, synthetic])
    return TrainingSet(train_q, train, val_q, val, cal_q, cal)


def new_model(kind: str, keys: np.ndarray, data: TrainingSet, centroids: np.ndarray,
              size: dict) -> torch.nn.Module | None:
    """A fresh, untrained net for router ``kind`` (None for "centroid"), sized by ``size`` (width,
    depth, linear_rank; None = the net's default) and scaled to the data."""
    size = {k: v for k, v in size.items() if v is not None}
    if kind == "centroid":
        return None
    if kind == "keynet":
        size.pop("linear_rank", None)
        return KeyNet(keys.shape[1], **size, scale=float(np.median(np.linalg.norm(keys, axis=1))))
    q_norm = np.linalg.norm(data.train_queries, axis=1).clip(1e-12)
    scale = float(np.median(np.abs(data.train.values) / q_norm)) or 1.0
    if kind == "linear":
        size.update(depth=0, width=1)
    elif "linear_rank" not in size:
        size["linear_rank"] = default_linear_rank(keys.shape[1], len(centroids))
    model = SupportNet(keys.shape[1], len(centroids), **size, scale=scale)
    model.init_linear(torch.as_tensor(centroids / scale))
    return model


def default_linear_rank(dim: int, nlist: int) -> int | None:
    """The SupportNet router's linear term: full (None) up to 1,024 lists or 128 dimensions, else
    rank 64, which costs 64·(d + nlist) instead of d·nlist per query. Measured on 384-d synthetic
    keys (``benchmarks/scaling.py``, one thread, target 0.95): router 30 → 21 µs and QPS +29% at 100k
    keys (1,265 lists), 91 → 60 µs and +10% at 1M (4,000 lists), calibration unchanged; the
    low-rank router needs 1.1–1.8 more lists."""
    return 64 if nlist > 1024 and dim > 128 else None


def fit_router(kind: str, keys: np.ndarray, data: TrainingSet, quantizer, centroids: np.ndarray, size: dict,
               config: TrainConfig) -> tuple[Router, dict]:
    """Train the router ``kind`` on ``data``; returns it and the training summary."""
    model = new_model(kind, keys, data, centroids, size)
    torch.manual_seed(config.seed)
    summary = {}
    if kind in ("supportnet", "linear"):
        summary = train_router(model, data.train_queries, data.train.cluster_values, data.validation_queries,
                               data.validation.cluster_values, config)
    elif kind == "keynet":
        summary = train_direct(model, keys, data.train_queries, data.train, data.validation_queries,
                               data.validation, config)
    return make_router(kind, quantizer, centroids, model), summary
