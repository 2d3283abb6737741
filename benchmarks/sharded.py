"""One machine, 1 vs 2 local Ray shards: build time (each shard's training too) and QPS at match rate
0.95, side by side in one run, with the in-process IndexAMIPS as the reference.

    python -m benchmarks.sharded --data debian

Every build uses the same query sample and ``--steps`` training steps without a time limit (so the
shards' training times compare); searches run on ``--test`` held-out queries, the whole batch per call.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import ray

import amips_faiss as af
from amips_faiss.data import load_dataset
from amips_faiss.distributed import ShardedIndexAMIPS
from amips_faiss.metrics import found_scores, match_rate
from amips_faiss.targets import split_queries, support_values

from .run import timed

LEVEL = 0.95


def measure(name: str, index, build_s: float, keys, test, exact, shard_train_s=None) -> dict:
    params = af.SearchParametersAMIPS(target_recall=LEVEL)
    index.search(test[:100], 1, params=params)  # calibrates outside the timing
    seconds, (_, I) = timed(lambda x: index.search(x, 1, params=params), test, 5)
    row = {"setup": name, "build_s": round(build_s, 1), "qps": round(len(test) / seconds),
           "match": round(match_rate(found_scores(keys, test, I[:, 0]), exact), 4)}
    if shard_train_s is not None:
        row["shard_train_s"] = shard_train_s
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="debian")
    ap.add_argument("--train-queries", type=int, default=20_000)
    ap.add_argument("--test", type=int, default=5_000)
    ap.add_argument("--steps", type=int, default=2_000)
    ap.add_argument("--out", default="benchmarks/results/sharded")
    args = ap.parse_args(argv)
    keys, queries = load_dataset(args.data)
    parts = split_queries(queries, {"test": args.test / len(queries),
                                    "train": min(0.8, args.train_queries / len(queries))})
    test, train_q = queries[parts["test"]], queries[parts["train"]]
    exact = support_values(keys, test, progress=False).values
    config = af.TrainConfig(steps=args.steps, time_limit=None, progress=False)
    rows = []

    af.set_num_threads(2)
    start = time.perf_counter()
    local = af.IndexAMIPS(keys.shape[1], af.default_nlist(len(keys)))
    local.train(keys, train_q, config)
    local.add(keys)
    build = time.perf_counter() - start
    for threads in (1, 2):
        af.set_num_threads(threads)
        rows.append(measure(f"IndexAMIPS in process, {threads} thread(s)", local, build, keys, test, exact,
                            [local.train_summary["phase_seconds"]]))

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    for n_shards in (1, 2):
        start = time.perf_counter()
        nlist = af.default_nlist(len(keys) // n_shards)
        with ShardedIndexAMIPS(keys.shape[1], nlist, n_shards, cpus_per_shard=2 // n_shards) as index:
            index.train(keys, train_q, config)
            index.add(keys)
            build = time.perf_counter() - start
            phases = [info["train_seconds"] for info in index.shard_info()]
            rows.append(measure(f"Ray, {n_shards} shard(s) × {2 // n_shards} CPU, nlist {nlist} each",
                                index, build, keys, test, exact, phases))
    ray.shutdown()

    lines = ["| setup | build s | per-shard training s (lists / targets / router) | QPS at target 0.95 | match |",
             "|---|---|---|---|---|"]
    for r in rows:
        shards = "; ".join(f"{p['lists']:.0f} / {p['targets']:.0f} / {p['router']:.0f}" for p in r["shard_train_s"])
        lines.append(f"| {r['setup']} | {r['build_s']:.0f} | {shards} | {r['qps']:,} | {r['match']:.3f} |")
    print("\n".join(lines))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
