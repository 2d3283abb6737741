"""Hybrid search on the Debian set: filtered search against faiss IVFFlat, faiss HNSW32 and exact
search under the same IDSelector, and dense + BM25 fusion against the gold relevance labels.

    python -m benchmarks.hybrid [--quick] [--threads 1] [--out results]

Filters: random ids at 50% / 10% / 5% / 2.5% / 1% / 0.1% of the keys, and what a user writes from the packages'
metadata (section = games, section = libs, installed size below 100 KiB). For each: the filtered
match rate (top-1 has the exact filtered top score) and QPS of every method's settings, one thread,
side by side; the table keeps each method's best QPS at filtered match rate ≥ 0.95 (IndexAMIPS:
asked for target_recall 0.95 / 0.99, first round of 1–8 lists; also with its planner forced to route
or to brute-force the allowed keys, which measures the planner's threshold). Fusion: recall@10 and MRR@10 of the
package's own description for its title, on held-out titles; the fusion constants (RRF c, weight)
are chosen on training titles, never on the test ones. Test titles are split off first and never
reach training, calibration or any choice.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import time

import faiss
import numpy as np

import amips_faiss as af
from amips_faiss import probing
from amips_faiss.data import default_debian_path, load_folder
from amips_faiss.hybrid import HybridSearcher, reciprocal_rank_fusion, weighted_fusion
from amips_faiss.metrics import found_scores, match_rate
from amips_faiss.targets import split_queries

from .run import blas_exact, timed


def load_docs(path: str) -> list[dict]:
    """The rows of ``docs.jsonl.gz``: package, title, description, section, priority, installed_size_kib."""
    with gzip.open(os.path.join(path, "docs.jsonl.gz"), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def filters(docs: list[dict], seed: int = 0) -> dict[str, np.ndarray]:
    """Allowed ids per filter: random selectivities and metadata predicates."""
    n = len(docs)
    rng = np.random.default_rng(seed)
    out = {f"random {100 * s:g}%": np.sort(rng.choice(n, max(1, int(s * n)), replace=False))
           for s in (0.5, 0.1, 0.05, 0.025, 0.01, 0.001)}
    section = np.array([d["section"] or "" for d in docs])
    size = np.array([d["installed_size_kib"] if d["installed_size_kib"] is not None else -1 for d in docs])
    out["section = games"] = np.flatnonzero(section == "games")
    out["section = libs"] = np.flatnonzero(section == "libs")
    out["installed size < 100 KiB"] = np.flatnonzero((size >= 0) & (size < 100))
    return out


def filtered_search(index: af.IndexAMIPS, keys: np.ndarray, test: np.ndarray, allowed_ids: dict, threads: int,
                    repeats: int) -> list[dict]:
    """Every method under every filter: points with filter, method, setting, match rate, QPS."""
    d, nlist = keys.shape[1], index.nlist
    flat = faiss.IndexFlatIP(d)
    flat.add(keys)
    ivf = faiss.IndexIVFFlat(index.ivf.quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.add(keys)
    af.set_num_threads(2)
    hnsw = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 80
    hnsw.add(keys)
    af.set_num_threads(threads)
    points, default_threshold = [], probing.BRUTE_FORCE_LISTS
    for name, ids in allowed_ids.items():
        sel = faiss.IDSelectorBatch(ids)
        exact_scores, _ = flat.search(test, 1, params=faiss.SearchParameters(sel=sel))

        def measure(method, setting, search, **extra):
            seconds, (D, I) = timed(search, test, repeats)
            points.append({"filter": name, "allowed": len(ids), "method": method, "setting": setting,
                           "match_rate": match_rate(found_scores(keys, test, I[:, 0]), exact_scores[:, 0]),
                           "qps": len(test) / seconds, **extra})
            return points[-1]
        measure("exact (IndexFlatIP)", "sel", lambda x: flat.search(x, 10, params=faiss.SearchParameters(sel=sel)))

        def blas_allowed(x, ids=ids):  # the allowed keys gathered (per call) and scanned by BLAS
            D, rows = blas_exact(keys[ids], min(10, len(ids)))(x)
            return D, ids[rows]
        measure("exact (BLAS over allowed keys)", "gather + BLAS", blas_allowed)
        for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512):  # each sweep stops once past match rate 0.99
            if measure("faiss IVFFlat", f"nprobe={p}", lambda x, p=p: ivf.search(
                    x, 10, params=faiss.SearchParametersIVF(sel=sel, nprobe=p)))["match_rate"] >= 0.99:
                break
        for ef in (16, 32, 64, 128, 256, 512, 1024):
            if measure("faiss HNSW32", f"efSearch={ef}", lambda x, ef=ef: hnsw.search(
                    x, 10, params=faiss.SearchParametersHNSW(sel=sel, efSearch=ef)))["match_rate"] >= 0.99:
                break
        for planner, threshold in (("IndexAMIPS", probing.BRUTE_FORCE_LISTS), ("IndexAMIPS routed only", 0),
                                   ("IndexAMIPS brute force only", np.inf)):
            probing.BRUTE_FORCE_LISTS = threshold  # the planner's rule, then each of its two ways forced
            try:
                for target in (0.95, 0.99):
                    for nprobe in (1, 2, 4, 8):
                        params = af.SearchParametersAMIPS(target_recall=target, nprobe=nprobe, sel=sel)
                        point = measure(planner, f"target={target} nprobe={nprobe}",
                                        lambda x, params=params: index.search(x, 10, params=params), target=target)
                        point.update(lists=index.stats.mean_lists_probed, brute_force=index.stats.brute_force)
            finally:
                probing.BRUTE_FORCE_LISTS = default_threshold
        print(f"  filter {name!r}: {len(ids)} keys allowed", flush=True)
    return points


def filter_table(points: list[dict], level: float = 0.95) -> str:
    """Markdown: per filter, each method's best QPS at filtered match rate ≥ level, AMIPS's ratio to
    the best faiss peer and to exact, and the match rate AMIPS gave when asked for 0.95."""
    methods = ("exact (IndexFlatIP)", "exact (BLAS over allowed keys)", "faiss IVFFlat", "faiss HNSW32",
               "IndexAMIPS", "IndexAMIPS routed only", "IndexAMIPS brute force only")
    peers = methods[:4]
    lines = ["| filter (allowed keys) | " + " | ".join(f"{m} QPS" for m in methods)
             + " | AMIPS × best peer | AMIPS × exact | AMIPS match @ target 0.95 |",
             "|---|" + "---|" * (len(methods) + 3)]
    for name in dict.fromkeys(p["filter"] for p in points):
        rows = [p for p in points if p["filter"] == name]
        best = {m: max((p["qps"] for p in rows if p["method"] == m and p["match_rate"] >= level), default=None)
                for m in methods}
        peer = max((best[m] for m in peers if best[m]), default=None)
        exact = max((best[m] for m in peers[:2] if best[m]), default=None)
        asked = [p["match_rate"] for p in rows if p["method"] == "IndexAMIPS" and p.get("target") == 0.95]
        ours = best["IndexAMIPS"]
        cells = [f"{best[m]:,.0f}" if best[m] else "never" for m in methods]
        ratio = lambda ref: f"{ours / ref:.2f}" if ours and ref else "—"  # noqa: E731
        lines.append(f"| {name} ({rows[0]['allowed']:,}) | " + " | ".join(cells)
                     + f" | {ratio(peer)} | {ratio(exact)} | {min(asked):.3f}–{max(asked):.3f} |")
    return "\n".join(lines) + "\n"


def rank_metrics(I: np.ndarray, gold: np.ndarray) -> dict:
    """recall@10 (the gold id among the first 10) and MRR@10 of ``I [n, ≥10]`` against ``gold [n]``."""
    hit = I[:, :10] == gold[:, None]
    rank = np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, 0)
    return {"recall@10": float(hit.any(axis=1).mean()), "mrr@10": float(np.where(rank > 0, 1.0 / np.maximum(rank, 1), 0).mean())}


def fusion(searcher: HybridSearcher, keys: np.ndarray, queries: np.ndarray, gold: np.ndarray, titles: list[str],
           tune_rows: np.ndarray, test_rows: np.ndarray) -> list[dict]:
    """Dense (exact, and IndexAMIPS at its default target), BM25 and the fusions as the hybrid searcher
    makes them (BM25's candidates scored by the dense side too) on test titles; the RRF constant and the weighted fusion's dense weight are tuned on
    ``tune_rows`` titles."""
    flat = faiss.IndexFlatIP(keys.shape[1])
    flat.add(keys)
    depth = searcher.depth

    def score(rows, **options):
        I = searcher.search(queries[rows], [titles[i] for i in rows], 10, **options)[1]
        return rank_metrics(I, gold[rows])

    c = max((10, 30, 60, 100), key=lambda c: score(tune_rows, method="rrf", c=c)["mrr@10"])
    weight = max(np.linspace(0.1, 0.9, 9), key=lambda w: score(tune_rows, method="weighted", weight=w)["mrr@10"])
    q, texts = queries[test_rows], [titles[i] for i in test_rows]
    exact = flat.search(q, depth)
    lexical = searcher.lexical(texts, depth)
    dense_only = searcher.dense(q, depth)
    dense = searcher.with_candidates(q, dense_only, lexical[1])
    rows = [("dense exact", exact[1]), ("dense IndexAMIPS", dense_only[1]), ("BM25", lexical[1]),
            ("RRF c=60, IndexAMIPS dense without BM25's candidates",
             reciprocal_rank_fusion([dense_only[1], lexical[1]], 10)[1]),
            ("RRF c=60, exact dense", reciprocal_rank_fusion([exact[1], lexical[1]], 10)[1]),
            ("RRF c=60", reciprocal_rank_fusion([dense[1], lexical[1]], 10)[1]),
            (f"RRF c={c} (tuned)", reciprocal_rank_fusion([dense[1], lexical[1]], 10, c)[1]),
            ("weighted 0.5, exact dense", weighted_fusion([exact, lexical], 10)[1]),
            ("weighted 0.5", weighted_fusion([dense, lexical], 10)[1]),
            (f"weighted {weight:.1f} (tuned)", weighted_fusion([dense, lexical], 10, [weight, 1 - weight])[1])]
    return [{"method": name, **rank_metrics(I, gold[test_rows])} for name, I in rows]


def run(quick: bool, threads: int, out: str, seed: int = 0, fusion_too: bool = True) -> dict:
    af.set_num_threads(2)
    path = default_debian_path()
    keys, queries = load_folder(path)
    gold = np.load(os.path.join(path, "gold.npy"))
    docs = load_docs(path)
    n_test = 1000 if quick else 5000
    parts = split_queries(queries, {"test": n_test / len(queries), "train": 1 - n_test / len(queries)}, seed=seed)
    test_rows, train_rows = parts["test"], parts["train"]
    index = af.IndexAMIPS(keys.shape[1], af.default_nlist(len(keys)))
    t = time.perf_counter()
    index.train(keys, queries[train_rows], af.TrainConfig(time_limit=60 if quick else 360, seed=seed))
    index.add(keys)
    print(f"[debian] trained IndexAMIPS in {time.perf_counter() - t:.0f} s", flush=True)
    af.set_num_threads(threads)
    allowed_ids = filters(docs, seed)
    if quick:
        allowed_ids = {k: v for k, v in allowed_ids.items() if k in ("random 10%", "section = games")}
    points = filtered_search(index, keys, queries[test_rows], allowed_ids, threads, repeats=3)
    tune_rows = np.random.default_rng(seed).choice(train_rows, min(2000, len(train_rows)), replace=False)
    fused = fusion(HybridSearcher(index, [d["description"] for d in docs]), keys, queries, gold,
                   [d["title"] for d in docs], tune_rows, test_rows) if fusion_too else []
    table = filter_table(points)
    fusion_md = "| method | recall@10 | MRR@10 |\n|---|---|---|\n" + "".join(
        f"| {r['method']} | {r['recall@10']:.3f} | {r['mrr@10']:.3f} |\n" for r in fused)
    result = {"n_keys": len(keys), "n_test": len(test_rows), "threads": threads, "quick": quick,
              "filtered": points, "fusion": fused}
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"debian-hybrid{'-quick' if quick else ''}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(table + "\n" + fusion_md)
    print(table + "\n" + fusion_md, flush=True)
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1,000 test titles, short training, two filters")
    ap.add_argument("--threads", type=int, default=1, help="threads for the timed searches (default 1)")
    ap.add_argument("--skip-fusion", action="store_true", help="filtered search only")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    run(args.quick, args.threads, args.out, fusion_too=not args.skip_fusion)


if __name__ == "__main__":
    main()
