"""How IndexAMIPS grows with the number of keys: time and peak memory of train, add and search, and
search speed at match rate 0.95 against faiss IVFFlat over the same lists (one thread, side by side).

Each point runs in its own process, so that its peak RSS is its own:

    python -m benchmarks.scaling --sizes 100000,300000,1000000 --d 384 --glove

Synthetic points are ``amips_faiss.data.make_clustered`` keys (clustered, anisotropic, norms spanning
100×) with queries from another mixture; the GloVe point is the full 400k vocabulary (keys) minus the
held-out query words. Training uses the default ``TrainConfig`` on 2 threads with ``--train-queries``
sampled queries; searches run on one thread on ``--test`` held-out queries, timed as one call and in
calls of ``--call`` (a batch job's big calls let each round of probes meet every list with more
queries; IVFFlat scans query by query, so its speed does not depend on the call).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

import amips_faiss as af
from amips_faiss.data import load_glove, make_clustered
from amips_faiss.metrics import found_scores, match_rate
from amips_faiss.targets import support_values

from .run import timed

LEVEL = 0.95
NPROBES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def peak_rss_gib() -> float:
    """This process's peak resident memory so far, GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def point_data(name: str, n_keys: int, d: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if name == "glove":
        return load_glove(n_keys=400_000 - n_queries, seed=seed)
    return make_clustered(n_keys, n_queries, d, n_clusters=max(64, n_keys // 2000), seed=seed)


def measure_point(name: str, n_keys: int, d: int, n_train: int, n_test: int, linear_rank: int | None = None,
                  nlist: int | None = None, call: int = 5_000, seed: int = 0) -> dict:
    """Build, search and time one point (the router's linear term of rank ``linear_rank``, None =
    the default rule; ``nlist`` lists, None = ``default_nlist``); returns its row. The test set is
    timed as one call and, when bigger, in calls of ``call`` queries."""
    keys, queries = point_data(name, n_keys, d, n_train + n_test, seed)
    train_q, test = queries[:n_train], queries[n_train:]
    row = {"data": name, "n_keys": len(keys), "d": keys.shape[1], "train_queries": len(train_q), "test_queries": len(test),
           "linear_rank": linear_rank,
           "data_rss_gib": round(peak_rss_gib(), 2)}
    af.set_num_threads(2)
    nlist = af.default_nlist(len(keys)) if nlist is None else nlist
    index = af.IndexAMIPS(keys.shape[1], nlist, linear_rank=linear_rank)
    start = time.perf_counter()
    index.train(keys, train_q)
    row.update(nlist=nlist, train_s=round(time.perf_counter() - start, 1),
               phase_s=index.train_summary["phase_seconds"], train_steps=index.train_summary["steps"],
               linear_rank=index.router.model.linear_rank)  # the one used (None asks for the default rule)
    start = time.perf_counter()
    index.add(keys)
    row["add_s"] = round(time.perf_counter() - start, 1)
    row["build_rss_gib"] = round(peak_rss_gib(), 2)
    exact = support_values(keys, test).values
    af.set_num_threads(1)

    def score(I):
        return match_rate(found_scores(keys, test, I[:, 0]), exact)

    for target in (LEVEL, 0.99):
        params = af.SearchParametersAMIPS(target_recall=target)
        index.search(test[:100], 1, params=params)  # calibrates outside the timing
        seconds, (_, I) = timed(lambda x: index.search(x, 1, params=params), test, 3)
        row[f"amips@{target}"] = {"qps": round(len(test) / seconds), "match": round(score(I), 4),
                                  "lists": round(index.stats.mean_lists_probed, 1),
                                  "router_us": round(1e6 * index.stats.router_seconds_per_query, 1)}
        if len(test) > call:  # the same queries in smaller calls: a round's lists meet fewer queries
            seconds, _ = timed(lambda x: [index.search(x[lo:lo + call], 1, params=params)
                                          for lo in range(0, len(x), call)], test, 3)
            row[f"amips@{target}"]["qps_in_calls"] = {str(call): round(len(test) / seconds)}
    row["ivf"] = ivf_at_level(index.ivf, test, score)
    row["speedup_vs_ivf"] = round(row[f"amips@{LEVEL}"]["qps"] / row["ivf"]["qps"], 2)
    row["peak_rss_gib"] = round(peak_rss_gib(), 2)
    return row


def ivf_at_level(ivf, test: np.ndarray, score) -> dict:
    """faiss IVFFlat over the same lists at the fewest lists reaching match rate LEVEL: a grid of
    nprobe, then the integers between the last miss and the first hit (bisection)."""
    def run(nprobe: int) -> dict:
        ivf.nprobe = nprobe
        seconds, (_, I) = timed(lambda x: ivf.search(x, 1), test, 3)
        return {"nprobe": nprobe, "qps": round(len(test) / seconds), "match": round(score(I), 4)}

    low, high = 0, None
    for nprobe in NPROBES + (ivf.nlist,):
        high = run(min(nprobe, ivf.nlist))
        if high["match"] >= LEVEL or nprobe >= ivf.nlist:
            break
        low = nprobe
    while high["nprobe"] - low > 1:
        middle = run((low + high["nprobe"]) // 2)
        if middle["match"] >= LEVEL:
            high = middle
        else:
            low = middle["nprobe"]
    return high


def table(rows: list[dict]) -> str:
    head = ("| data | keys | d | nlist | router linear term | train s (lists / targets / router) | add s | peak RSS GiB | "
            "test queries | AMIPS@0.95 QPS (match, lists, router µs) | IVFFlat QPS (match, nprobe) | × IVF | "
            "AMIPS@0.95 QPS in smaller calls (× IVF) | AMIPS@0.99 QPS (match) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        a, b, i, p = r["amips@0.95"], r["amips@0.99"], r["ivf"], r["phase_s"]
        rank = f"rank {r['linear_rank']}" if r.get("linear_rank") else "full"
        calls = "; ".join(f"{qps:,} in {int(size):,}s ({qps / i['qps']:.2f})" for size, qps in a.get("qps_in_calls", {}).items())
        lines.append(f"| {r['data']} | {r['n_keys']:,} | {r['d']} | {r['nlist']} | {rank} | {r['train_s']:.0f} "
                     f"({p['lists']:.0f} / {p['targets']:.0f} / {p['router']:.0f}) | {r['add_s']:.0f} | "
                     f"{r['peak_rss_gib']:.1f} | {r.get('test_queries', 5000):,} | "
                     f"{a['qps']:,} ({a['match']:.3f}, {a['lists']}, {a['router_us']}) | "
                     f"{i['qps']:,} ({i['match']:.3f}, {i['nprobe']}) | {r['speedup_vs_ivf']:.2f} | {calls or '–'} | "
                     f"{b['qps']:,} ({b['match']:.3f}) |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    synthetic = sorted((r for r in rows if r["data"] == "synthetic"), key=lambda r: r["n_keys"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, field, label in ((axes[0], "train_s", "train seconds"), (axes[1], "peak_rss_gib", "peak RSS (GiB)")):
        ax.loglog([r["n_keys"] for r in synthetic], [r[field] for r in synthetic], "o-", label="synthetic")
        for r in rows:
            if r["data"] != "synthetic":
                ax.loglog([r["n_keys"]], [r[field]], "s", label=r["data"])
        ax.set_xlabel("keys")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("IndexAMIPS build cost vs keys (2 cores, default training)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100000,300000,1000000", help="synthetic key counts, comma-separated")
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--glove", action="store_true", help="add the full GloVe 400k point")
    ap.add_argument("--train-queries", type=int, default=20_000)
    ap.add_argument("--linear-rank", type=int, help="rank of the router's linear term (default: full)")
    ap.add_argument("--nlist", type=int, help="number of IVF lists (default: af.default_nlist of each size)")
    ap.add_argument("--test", type=int, default=25_000, help="held-out queries, searched as one call")
    ap.add_argument("--call", type=int, default=5_000, help="... and in calls of this many")
    ap.add_argument("--out", default="benchmarks/results/scaling")
    ap.add_argument("--point", help=argparse.SUPPRESS)  # name:n_keys: one point, in this process
    args = ap.parse_args(argv)
    if args.test < 1 or args.call < 1:
        ap.error("--test and --call must be at least 1")
    if args.point:
        name, n = args.point.split(":")
        print(json.dumps(measure_point(name, int(n), args.d, args.train_queries, args.test, args.linear_rank,
                                       args.nlist, args.call)))
        return
    points = [f"synthetic:{n}" for n in args.sizes.split(",") if n] + (["glove:0"] if args.glove else [])
    rows = []
    for point in points:
        print(f"== {point}", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "benchmarks.scaling", "--point", point, "--d", str(args.d),
               "--train-queries", str(args.train_queries), "--test", str(args.test), "--call", str(args.call)]
        cmd += ["--linear-rank", str(args.linear_rank)] if args.linear_rank else []
        cmd += ["--nlist", str(args.nlist)] if args.nlist is not None else []
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if out.returncode:
            print(f"{point} failed with exit code {out.returncode}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(rows, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(table(rows) + "\n")
    print(table(rows))
    if rows:
        plot(rows, args.out + ".png")


if __name__ == "__main__":
    main()
