"""Side-by-side benchmark: IndexAMIPS (every router) against faiss exact, IVF and HNSW, hnswlib and
ScaNN when installed, and the oracle router — same keys, same held-out test queries, same threads.

    python -m benchmarks.run --data glove|debian|synthetic|PATH [--quick] [--threads 1] [--out results]

Test queries are split off first and never seen by training, calibration or parameter choice.
Writes ``<out>/<data>.json`` (every point), ``<out>/<data>.png`` (QPS vs match rate) and
``<out>/<data>.md`` (best QPS at match rate >= 0.90 / 0.95 / 0.99, with ratios).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import faiss
import numpy as np
from tqdm.auto import tqdm

import amips_faiss as af
from amips_faiss.data import load_dataset
from amips_faiss.metrics import found_scores, match_rate, recall_at_k
from amips_faiss.routing import Router
from amips_faiss.targets import split_queries, support_values

LEVELS = (0.90, 0.95, 0.99)


def timed(search, xq: np.ndarray, repeats: int) -> tuple[float, tuple]:
    """Median seconds of ``search(xq)`` over repeats, and its last result."""
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = search(xq)
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


class Bench:
    """Collects points: one per (method, setting)."""

    def __init__(self, keys, test, exact, exact10, repeats):
        self.keys, self.test, self.exact, self.exact10, self.repeats = keys, test, exact, exact10, repeats
        self.points = []

    def measure(self, method: str, setting: str, search, **extra) -> dict:
        seconds, (D, I) = timed(search, self.test, self.repeats)
        point = {"method": method, "setting": setting,
                 "match_rate": match_rate(found_scores(self.keys, self.test, I[:, 0]), self.exact),
                 "recall@10": recall_at_k(I[:, :10], self.exact10) if I.shape[1] >= 10 else None,
                 "qps": len(self.test) / seconds, **extra}
        self.points.append(point)
        return point


def memory_bytes(index) -> int:
    """Bytes an index takes when saved: its faiss serialisation, or the whole IndexAMIPS file (lists,
    buffer, router, calibration queries, fingerprints)."""
    if isinstance(index, af.IndexAMIPS):
        return len(af.serialize_index(index))
    return int(faiss.serialize_index(index).nbytes)


class OracleRouter(Router):
    """The ceiling of learned routing: the list holding the true argmax first, then centroid order.
    Knows the answers of the benchmark's test queries only (rows in order)."""

    def __init__(self, centroid_router, best_lists: np.ndarray):
        self.base, self.best = centroid_router, best_lists

    def scores(self, xq):
        s = self.base.scores(xq)
        s[np.arange(len(xq)), self.best[: len(xq)]] = np.inf
        return s

    @property
    def macs_per_query(self):
        return self.base.macs_per_query


def mips_to_l2(keys: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bachrach et al. (2014): append sqrt(M² − ||k||²) to keys and 0 to queries; then L2 NN = MIPS."""
    norms = np.linalg.norm(keys, axis=1)
    extra = np.sqrt(np.maximum(norms.max() ** 2 - norms ** 2, 0))[:, None]
    return (np.hstack([keys, extra]).astype(np.float32),
            np.hstack([queries, np.zeros((len(queries), 1), np.float32)]).astype(np.float32))


def run(data: str, quick: bool, threads: int, out: str, seed: int = 0, routers=None, steps=None,
        n_train: int | None = None, time_limit: float | None = None, compressed: bool = True) -> dict:
    af.set_num_threads(2)  # building and training use both cores; searches are timed at `threads`
    keys, queries = load_dataset(data, seed=seed)
    n_test = 1000 if quick else 5000
    n_train = n_train or (20_000 if quick else 100_000)
    time_limit = time_limit or (120 if quick else 300)
    parts = split_queries(queries, {"test": min(0.2, n_test / len(queries)),
                                    "train": min(0.8, n_train / len(queries))}, seed=seed)
    test, train_q = queries[parts["test"]], queries[parts["train"]]
    N, d = keys.shape
    nlist = af.default_nlist(N) if not quick else af.default_nlist(N) // 2
    unnormalised = np.ptp(np.linalg.norm(keys, axis=1)) > 1e-3
    print(f"[{data}] keys {keys.shape}, train queries {len(train_q)}, test queries {len(test)}, nlist {nlist}, "
          f"{'unnormalised' if unnormalised else 'unit-norm'} keys", flush=True)

    flat = faiss.IndexFlatIP(d)
    flat.add(keys)
    exact_scores, exact10 = flat.search(test, 10)
    bench = Bench(keys, test, exact_scores[:, 0], exact10, repeats=3)
    af.set_num_threads(threads)
    bench.measure("exact", "IndexFlatIP", lambda x: flat.search(x, 10), memory_bytes=memory_bytes(flat))

    routers = routers or (["supportnet"] if quick else ["supportnet", "linear", "keynet", "centroid"])
    steps = steps or (800 if quick else 6000)
    indexes, build = {}, {}
    for router in routers:
        af.set_num_threads(2)
        t = time.perf_counter()
        if indexes:  # same lists for every router: an empty copy of the first index's trained lists
            lists = faiss.clone_index(next(iter(indexes.values())).ivf)
            lists.reset()
            index = af.IndexAMIPS.from_ivf(lists, router=router)
        else:
            index = af.IndexAMIPS(d, nlist, router=router)
        index.train(keys, train_q, steps=steps, time_limit=time_limit, seed=seed)
        index.add(keys)
        build[router] = time.perf_counter() - t
        indexes[router] = index
        print(f"  trained {router} router in {build[router]:.0f} s: {index.train_summary.get('best', '')}", flush=True)
    base = next(iter(indexes.values()))
    af.set_num_threads(threads)

    ivf = faiss.IndexIVFFlat(base.ivf.quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.add(keys)
    ivf_bytes = memory_bytes(ivf)
    sweep = [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if p <= nlist]
    for p in tqdm(sweep, desc="IVF sweep", leave=False):
        ivf.nprobe = p
        bench.measure("faiss IVFFlat", f"nprobe={p}", lambda x: ivf.search(x, 10), lists=p,
                      memory_bytes=ivf_bytes)

    af.set_num_threads(2)
    t = time.perf_counter()
    hnsw_keys, hnsw_test = mips_to_l2(keys, test) if unnormalised else (keys, test)
    hnsw = faiss.IndexHNSWFlat(hnsw_keys.shape[1], 32, faiss.METRIC_L2 if unnormalised else faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 80
    hnsw.add(hnsw_keys)
    hnsw_build = time.perf_counter() - t
    hnsw_bytes = memory_bytes(hnsw)
    af.set_num_threads(threads)
    hnsw_name = "faiss HNSW32" + (" (MIPS→L2)" if unnormalised else "")
    for ef in tqdm((16, 32, 64, 128, 256, 512), desc="HNSW sweep", leave=False):
        hnsw.hnsw.efSearch = ef
        bench.measure(hnsw_name, f"efSearch={ef}", lambda x: hnsw.search(hnsw_test, 10),
                      build_seconds=hnsw_build, memory_bytes=hnsw_bytes)
    _optional_peers(bench, keys, test, threads, quick)

    for router, index in indexes.items():
        index_bytes = memory_bytes(index)
        for p in [p for p in sweep if p <= 64]:
            params = af.SearchParametersAMIPS(nprobe=p, margin=math.inf)
            point = bench.measure(f"AMIPS {router}", f"nprobe={p}", lambda x: index.search(x, 10, params=params),
                                  lists=p, build_seconds=build[router], memory_bytes=index_bytes)
            point["router_us"] = index.stats.router_seconds_per_query * 1e6
        for target in (0.9, 0.95, 0.99, 0.995):
            for nprobe in (1, 2, 4, 8, 16, 32):
                params = af.SearchParametersAMIPS(nprobe=nprobe, target_recall=target, fallback="exact",
                                                  max_nprobe=max(nprobe, nlist // 4))
                point = bench.measure(f"AMIPS {router} +confidence", f"target={target} nprobe={nprobe}",
                                      lambda x: index.search(x, 10, params=params), build_seconds=build[router],
                                      memory_bytes=index_bytes)
                point.update(lists=index.stats.mean_lists_probed, fallback_share=index.stats.fallback_share,
                             router_us=index.stats.router_seconds_per_query * 1e6, target=target)

    if compressed and not quick and d % 2 == 0:
        _compressed(bench, d, nlist, keys, train_q, steps, seed, threads, time_limit)

    best_lists = support_values(keys, test, base.ivf.quantizer.assign(keys, 1).reshape(-1), nlist,
                                progress=False).cluster_values.argmax(axis=1)
    centroid_order = af.IndexAMIPS.from_ivf(base.ivf, router="centroid").router
    oracle = af.IndexAMIPS.from_ivf(base.ivf, router=OracleRouter(centroid_order, best_lists))
    params = af.SearchParametersAMIPS(nprobe=1, margin=math.inf)
    bench.measure("oracle router", "nprobe=1", lambda x: oracle.search(x, 10, params=params), lists=1)

    result = {"data": data, "n_keys": N, "d": d, "nlist": nlist, "n_test": len(test), "threads": threads,
              "quick": quick, "points": bench.points, "machine": _machine()}
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"{data if os.sep not in data else 'folder'}{'-quick' if quick else ''}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    table = summary_table(bench.points, hnsw_name)
    with open(stem + ".md", "w") as f:
        f.write(table)
    _plot(bench.points, stem + ".png", f"{data}: {N} keys, d={d}, {threads} thread(s)")
    print(table, flush=True)
    return result


def _compressed(bench, d, nlist, keys, train_q, steps, seed, threads, time_limit):
    """A user's own compressed index (IVF + PQ fast-scan, d/2 × 4-bit codes) with and without
    learned routing on top (``from_ivf``: the lists are used in place)."""
    af.set_num_threads(2)
    t = time.perf_counter()
    pq = faiss.index_factory(d, f"IVF{nlist},PQ{d // 2}x4fs", faiss.METRIC_INNER_PRODUCT)
    pq.train(keys)
    pq.add(keys)
    pq_build = time.perf_counter() - t
    wrapped = af.IndexAMIPS.from_ivf(pq, router="supportnet")
    wrapped.train(queries=train_q, steps=steps, time_limit=time_limit, seed=seed)
    train_seconds = time.perf_counter() - t - pq_build
    af.set_num_threads(threads)
    ivf = faiss.extract_index_ivf(pq)
    pq_bytes, wrapped_bytes = memory_bytes(pq), memory_bytes(wrapped)
    for p in (1, 2, 4, 8, 16, 32, 64, 128):
        ivf.nprobe = p
        bench.measure(f"faiss IVF{nlist},PQ{d // 2}x4fs", f"nprobe={p}", lambda x: pq.search(x, 10), lists=p,
                      build_seconds=pq_build, memory_bytes=pq_bytes)
        params = af.SearchParametersAMIPS(nprobe=p, margin=math.inf)
        bench.measure("AMIPS supportnet over IVFPQ-fs (from_ivf)", f"nprobe={p}",
                      lambda x: wrapped.search(x, 10, params=params), lists=p, build_seconds=pq_build + train_seconds,
                      memory_bytes=wrapped_bytes)


def _optional_peers(bench, keys, test, threads, quick):
    """hnswlib and ScaNN, when installed (extra 'bench')."""
    try:
        import hnswlib
    except ImportError:
        print("  hnswlib not installed: skipped")
    else:
        hl_keys, hl_test = mips_to_l2(keys, test)
        g = hnswlib.Index(space="l2", dim=hl_keys.shape[1])
        g.init_index(len(keys), M=32, ef_construction=80)
        g.set_num_threads(2)
        t = time.perf_counter()
        g.add_items(hl_keys)
        built = time.perf_counter() - t
        g.set_num_threads(threads)
        def search(x):
            labels, dist = g.knn_query(hl_test, 10)
            return -dist, labels.astype(np.int64)
        for ef in (16, 32, 64, 128, 256, 512):
            g.set_ef(ef)
            bench.measure("hnswlib M32 (MIPS→L2)", f"ef={ef}", search, build_seconds=built)
    try:
        import scann
    except ImportError:
        print("  scann not installed: skipped")
        return
    t = time.perf_counter()
    n_leaves = int(math.sqrt(len(keys)))
    searcher = (scann.scann_ops_pybind.builder(keys, 10, "dot_product")
                .tree(num_leaves=n_leaves, num_leaves_to_search=10, training_sample_size=min(len(keys), 100_000))
                .score_ah(2, anisotropic_quantization_threshold=0.2).reorder(100).build())
    built = time.perf_counter() - t
    for leaves in (2, 5, 10, 20, 40, 80, 160):
        if leaves > n_leaves:
            break
        def search(x, leaves=leaves):
            I, D = searcher.search_batched(x, leaves_to_search=leaves, pre_reorder_num_neighbors=100)
            return D, I.astype(np.int64)
        bench.measure("ScaNN (tree+AH+reorder)", f"leaves={leaves}", search, build_seconds=built)


def summary_table(points: list[dict], hnsw_name: str) -> str:
    """Markdown: best QPS per method at match rate >= each level, with ratios to IVF and HNSW."""
    methods = list(dict.fromkeys(p["method"] for p in points))
    best = {m: {lv: max((p["qps"] for p in points if p["method"] == m and p["match_rate"] >= lv), default=None)
                for lv in LEVELS} for m in methods}
    lines = ["| method | " + " | ".join(f"QPS @ ≥{lv:.2f} (×IVF, ×HNSW, ×exact)" for lv in LEVELS) + " |",
             "|---|" + "---|" * len(LEVELS)]
    for m in methods:
        cells = []
        for lv in LEVELS:
            q = best[m][lv]
            if q is None:
                cells.append("—")
                continue
            ratios = [f"{q / best[ref][lv]:.2f}" if best.get(ref, {}).get(lv) else "—"
                      for ref in ("faiss IVFFlat", hnsw_name, "exact")]
            cells.append(f"{q:,.0f} ({', '.join(ratios)})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(points, path, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for m in dict.fromkeys(p["method"] for p in points):
        pts, best = [], 0.0  # the method's Pareto frontier: no point both slower and less accurate
        for match, qps in sorted(((p["match_rate"], p["qps"]) for p in points if p["method"] == m), reverse=True):
            if qps > best:
                pts.append((match, qps))
                best = qps
        ax.plot([a for a, _ in pts], [b for _, b in pts], "o-" if len(pts) > 1 else "*", label=m, ms=4)
    ax.set_yscale("log")
    ax.set_xlabel("match rate (recall@1 vs exact)")
    ax.set_ylabel("queries per second")
    ax.set_xlim(left=max(0.5, min(p["match_rate"] for p in points) - 0.02), right=1.005)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _machine() -> str:
    import platform
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, faiss {faiss.__version__}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="glove", help="glove, debian, synthetic, or a folder with keys.npy/queries.npy")
    ap.add_argument("--quick", action="store_true", help="small query sets and short training (minutes)")
    ap.add_argument("--threads", type=int, default=1, help="threads for the timed searches (default 1)")
    ap.add_argument("--routers", default=None, help="comma-separated routers (default: all; quick: supportnet)")
    ap.add_argument("--steps", type=int, default=None, help="router training steps")
    ap.add_argument("--train-queries", type=int, default=None, help="query samples to train on")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds of training per router")
    ap.add_argument("--skip-compressed", action="store_true", help="leave out the IVFPQ fast-scan comparison")
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    run(args.data, args.quick, args.threads, args.out,
        routers=args.routers.split(",") if args.routers else None, steps=args.steps,
        n_train=args.train_queries, time_limit=args.time_limit, compressed=not args.skip_compressed)


if __name__ == "__main__":
    main()
