"""Input validation shared by every public entry point (one helper per concept).

Every function raises ``TypeError`` or ``ValueError`` with a message that names the argument and
what is wrong with it, so that bad input never reaches faiss (which may crash) or torch.
"""
from __future__ import annotations

import numbers

import numpy as np


def check_vectors(x, name: str = "x", d: int | None = None, allow_empty: bool = False) -> np.ndarray:
    """Return ``x`` as a C-contiguous ``[n, d] float32`` array, or raise.

    Accepts any real array-like (float64, float16, non-contiguous views) like faiss does; refuses
    1-D input, the wrong dimension, empty arrays (unless ``allow_empty``) and NaN/inf values.
    """
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{name} must be a 2-D array of vectors, got {type(x).__name__}")
    arr = np.asarray(x)
    if arr.dtype.kind == "c":
        raise TypeError(f"{name} must hold real numbers, got complex dtype {arr.dtype}")
    if arr.dtype.kind not in "biuf":  # bool, integers, floats
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n, d], got shape {arr.shape}"
                         + (" (use x[None, :] for a single vector)" if arr.ndim == 1 else ""))
    if d is not None and arr.shape[1] != d:
        raise ValueError(f"{name} has dimension {arr.shape[1]}, the index expects d={d}")
    if arr.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is empty (0 vectors)")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} has dimension 0")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
        raise ValueError(f"{name} contains NaN or inf (first in row {bad}), or values too large "
                         "for float32")
    return arr


def check_positive_int(value, name: str, maximum: int | None = None) -> int:
    """Return ``value`` as an int >= 1 (and <= ``maximum``), or raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    value = int(value)
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}={value} exceeds its maximum {maximum}")
    return value


def check_ids(ids, n: int | None = None, name: str = "ids") -> np.ndarray:
    """Return ``ids`` as a contiguous ``[n] int64`` array of non-negative ids, or raise."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be integers, got dtype {arr.dtype}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries for {n} vectors")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} must be non-negative (-1 marks 'no result' in search output)")
    return arr


def check_fraction(value, name: str, low: float = 0.0, high: float = 1.0) -> float:
    """Return ``value`` as a float in ``(low, high]``, or raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not (low < value <= high):
        raise ValueError(f"{name} must be in ({low}, {high}], got {value}")
    return value
