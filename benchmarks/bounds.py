"""How much of the exact-target work could a cheap upper bound skip? (issue 12's question, measured.)

Per IVF list c (centroid μ_c), two upper bounds on h_c(q) = max_{k∈c} <q, k>:
- radius: <q, μ_c> + r_c·||q||, r_c = max_{k∈c} ||k − μ_c||;
- cone: with û = μ_c/||μ_c||, a = <k, û> ∈ [a_min, a_max] and p_max = max ||k − a·û||,
  max(a_max·<q,û>, a_min·<q,û>) + p_max·sqrt(||q||² − <q,û>²).
A list whose bound is below the best exact value among the ``t`` lists nearest by centroid score
(minus a slack δ in units of the typical score) provably cannot hold the top, so its exact value is
not needed for the top-1 (a stand-in would do in the listwise loss). The table gives the share of
(query, list) pairs that would still need an exact value: 1.0 means the bound saves nothing.

    python -m benchmarks.bounds
"""
from __future__ import annotations

import numpy as np
import faiss

import amips_faiss as af
from amips_faiss.data import load_dataset, make_clustered
from amips_faiss.targets import support_values


def list_bounds(keys: np.ndarray, assign: np.ndarray, centroids: np.ndarray, queries: np.ndarray) -> dict:
    """The two upper bounds ``[n, nlist]`` of every list's support value for ``queries``."""
    nlist = len(centroids)
    radius = np.zeros(nlist, np.float32)
    np.maximum.at(radius, assign, np.linalg.norm(keys - centroids[assign], axis=1))
    q_norm = np.linalg.norm(queries, axis=1)[:, None]
    unit = centroids / np.linalg.norm(centroids, axis=1, keepdims=True).clip(1e-30)
    along = np.einsum("nd,nd->n", keys, unit[assign])
    across = np.sqrt(np.maximum(np.einsum("nd,nd->n", keys, keys) - along ** 2, 0))
    a_max, a_min, p_max = (np.full(nlist, v, np.float32) for v in (-np.inf, np.inf, 0.0))
    np.maximum.at(a_max, assign, along)
    np.minimum.at(a_min, assign, along)
    np.maximum.at(p_max, assign, across)
    s = queries @ unit.T
    return {"radius": queries @ centroids.T + radius * q_norm,
            "cone": np.maximum(a_max * s, a_min * s) + p_max * np.sqrt(np.maximum(q_norm ** 2 - s ** 2, 0))}


def measure(name: str, keys: np.ndarray, queries: np.ndarray) -> list[str]:
    nlist = af.default_nlist(len(keys))
    kmeans = faiss.Kmeans(keys.shape[1], nlist, niter=10, seed=1, max_points_per_centroid=64)
    kmeans.train(keys)
    assign = kmeans.index.search(keys, 1)[1][:, 0]
    exact = support_values(keys, queries, assign, nlist, progress=False)
    values = exact.cluster_values
    bounds = list_bounds(keys, assign, kmeans.centroids, queries)
    assert all((b[np.isfinite(values)] >= values[np.isfinite(values)] - 1e-3).all() for b in bounds.values())
    q_norm = np.linalg.norm(queries, axis=1)
    unit = float(np.median(np.abs(exact.values) / q_norm))
    order = np.argsort(-(queries @ kmeans.centroids.T), axis=1)
    rows = []
    for t in (1, 16):
        best = np.take_along_axis(values, order[:, :t], axis=1).max(axis=1)
        for slack in (0.0, 0.15):
            floor = (best - slack * unit * q_norm)[:, None]
            shares = {kind: float((b >= floor).mean()) for kind, b in bounds.items()}
            rows.append(f"| {name} | {len(keys):,} × {keys.shape[1]} | {nlist} | {t} | {slack} | "
                        f"{shares['radius']:.3f} | {shares['cone']:.3f} |")
    return rows


def main() -> None:
    af.set_num_threads(2)
    rows = ["| data | keys | nlist | exact lists t | slack δ | share left (radius) | share left (cone) |",
            "|---|---|---|---|---|---|---|"]
    debian_keys, debian_q = load_dataset("debian")
    rows += measure("Debian", debian_keys, debian_q[:3000])
    glove_keys, glove_q = load_dataset("glove")
    rows += measure("GloVe", glove_keys, glove_q[:3000])
    synth_keys, synth_q = make_clustered(200_000, 3000, d=384, n_clusters=100, seed=1)
    rows += measure("synthetic", synth_keys, synth_q)
    print("\n".join(rows))
    with open("benchmarks/results/bounds.md", "w") as f:
        f.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
