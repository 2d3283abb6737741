"""Where the keys are: reading them back out of faiss IVF lists and the exactly scanned buffer, and
fingerprints that tell which keys a router was trained on. numpy and faiss, no state of its own."""
from __future__ import annotations

import faiss
import numpy as np
from faiss.contrib.inspect_tools import get_invlist_sizes


def row_fingerprints(x: np.ndarray, block: int = 1 << 16) -> np.ndarray:
    """64-bit FNV-1a hash of each row's float32 bytes: ``[n, d]`` → ``[n] uint64`` (in blocks of
    rows, so that millions of keys need no ``[n, d] uint64`` copy)."""
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty(len(x), np.uint64)
    prime = np.uint64(0x100000001B3)
    for lo in range(0, len(x), block):
        words = x[lo:lo + block].view(np.uint32).astype(np.uint64)
        h = np.full(len(words), 0xCBF29CE484222325, np.uint64)
        for j in range(words.shape[1]):
            h = (h ^ words[:, j]) * prime
        out[lo:lo + block] = h
    return out


def fingerprints(keys: np.ndarray) -> np.ndarray:
    """The sorted, distinct fingerprints of ``keys [n, d]``: ``[m] uint64``."""
    return np.unique(row_fingerprints(keys))


def is_fingerprinted(x: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Which rows of ``x [n, d]`` have a fingerprint in the sorted ``known [m] uint64``: ``[n] bool``."""
    if not len(known):
        return np.zeros(len(x), bool)
    fp = row_fingerprints(x)
    return known[np.searchsorted(known, fp).clip(0, len(known) - 1)] == fp


def list_ids(invlists, list_no: int) -> np.ndarray:
    """A copy of one inverted list's ids ``[size] int64``; the pointer is handed back to faiss
    (which on-disk lists need)."""
    size = invlists.list_size(list_no)
    pointer = invlists.get_ids(list_no)
    try:
        return faiss.rev_swig_ptr(pointer, int(size)).copy()
    finally:
        invlists.release_ids(list_no, pointer)


def list_keys(ivf) -> tuple[np.ndarray, np.ndarray]:
    """Every key in ``ivf``'s lists (reconstructed: approximate for compressed kinds) ``[n, d]
    float32`` and its list ``[n] int64``. The index needs a direct map."""
    sizes = get_invlist_sizes(ivf.invlists)
    ids = [list_ids(ivf.invlists, int(i)) for i in np.flatnonzero(sizes)]
    ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    keys = ivf.reconstruct_batch(ids) if len(ids) else np.zeros((0, ivf.d), np.float32)
    return np.ascontiguousarray(keys, np.float32), np.repeat(np.arange(ivf.nlist), sizes)


def buffer_keys(buffer) -> tuple[np.ndarray, np.ndarray]:
    """The keys ``[n, d] float32`` and ids ``[n] int64`` of an ``IndexIDMap2`` over a flat index."""
    if not buffer.ntotal:
        return np.zeros((0, buffer.d), np.float32), np.zeros(0, np.int64)
    keys = faiss.downcast_index(buffer.index).reconstruct_n(0, buffer.ntotal)
    return keys, faiss.vector_to_array(buffer.id_map).astype(np.int64)
