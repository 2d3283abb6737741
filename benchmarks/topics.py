"""Does learned routing generalise to topics it never saw? A held-out-topic check on Debian.

All 59,656 descriptions are the keys. The Debian sections are split in two halves of about equal
size (a seeded shuffle of the section names); the router is trained and calibrated on titles of the
first half only. Two test sets are searched:

- *seen topics*: held-out titles from the training half (the training distribution);
- *unseen topics*: titles from the other half, a distribution no training query came from.

For the learned router and for centroid order over the same lists (plain IVF through the same
search): the lists needed for match rate 0.95 at a fixed first round (no confidence test), and the
match rate, lists and QPS (one thread) when asked for target recall 0.95 and 0.99, with the margins
of ``MARGINS`` (learned router; centroid order: the default) — does the calibrated target hold on
unseen topics, and what does it cost there?

    python -m benchmarks.topics
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np

import amips_faiss as af
from amips_faiss.data import default_debian_path, load_folder
from amips_faiss.metrics import found_scores, match_rate
from amips_faiss.targets import split_queries, support_values

from .hybrid import load_docs
from .run import on_same_lists, timed

NPROBES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
# how the confidence margin is set: the calibration queries' one margin, the default (that margin,
# re-weighted when the traffic's first rounds depart from calibration's), one per quartile of the
# router's forecast
MARGINS = {"one, fixed": dict(adaptive_margin=False), "one, adaptive (default)": {},
           "per forecast quartile": dict(calibration_bins=4)}


def topic_halves(sections: list[str], seed: int = 0) -> np.ndarray:
    """True for rows whose section falls in the first half: sections shuffled (seeded), then taken in
    that order until half of the rows are covered."""
    names, counts = np.unique(np.array(sections), return_counts=True)
    order = np.random.default_rng(seed).permutation(len(names))
    chosen = order[:int(np.searchsorted(np.cumsum(counts[order]), counts.sum() / 2)) + 1]
    return np.isin(np.array(sections), names[chosen])


def lists_for(index: af.IndexAMIPS, test: np.ndarray, exact: np.ndarray, keys: np.ndarray, level: float) -> int | None:
    """The fewest lists (first round only, no confidence test) reaching match rate ``level``."""
    for nprobe in NPROBES:
        _, I = index.search(test, 1, params=af.SearchParametersAMIPS(nprobe=nprobe, margin=math.inf))
        if match_rate(found_scores(keys, test, I[:, 0]), exact) >= level:
            return nprobe
    return None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--test", type=int, default=3000, help="queries per test set")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/topics")
    args = ap.parse_args(argv)
    keys, titles = load_folder(default_debian_path())
    seen = topic_halves([d["section"] or "" for d in load_docs(default_debian_path())], args.seed)
    seen_rows, unseen_rows = np.flatnonzero(seen), np.flatnonzero(~seen)
    parts = split_queries(titles[seen_rows], {"test": args.test / len(seen_rows),
                                              "train": 1 - args.test / len(seen_rows)}, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    tests = {"seen topics": titles[seen_rows[parts["test"]]],
             "unseen topics": titles[rng.choice(unseen_rows, min(args.test, len(unseen_rows)), replace=False)]}
    train_q = titles[seen_rows[parts["train"]]]
    print(f"keys {len(keys)}, training titles {len(train_q)} from {seen.mean():.0%} of the rows", flush=True)

    af.set_num_threads(2)
    indexes, build = {}, {}
    for router in ("supportnet", "centroid"):
        start = time.perf_counter()
        if indexes:  # the same lists for both routers
            index = on_same_lists(indexes["supportnet"], router)
        else:
            index = af.IndexAMIPS(keys.shape[1], af.default_nlist(len(keys)), router=router)
        index.train(keys, train_q, seed=args.seed)
        index.add(keys)
        indexes[router], build[router] = index, time.perf_counter() - start
    af.set_num_threads(1)
    rows = [{"keys": len(keys), "train_queries": len(train_q), "nlist": indexes["supportnet"].nlist,
             "build_s": {k: round(v) for k, v in build.items()}}]
    for name, test in tests.items():
        exact = support_values(keys, test, progress=False).values
        for router, index in indexes.items():
            needed = lists_for(index, test, exact, keys, 0.95)
            for margin in MARGINS if router == "supportnet" else ("one, adaptive (default)",):
                row = {"test": name, "n": len(test), "router": router, "margin": margin,
                       "lists_for_0.95": needed}
                for target in (0.95, 0.99):
                    params = af.SearchParametersAMIPS(target_recall=target, **MARGINS[margin])
                    index.search(test[:10], 1, params=params)  # calibration caches outside the timing
                    seconds, (_, I) = timed(lambda x: index.search(x, 1, params=params), test, 3)
                    row[f"target {target}"] = {
                        "match": round(match_rate(found_scores(keys, test, I[:, 0]), exact), 4),
                        "sigma": round(math.sqrt(target * (1 - target) / len(test)), 4),
                        "lists": round(index.stats.mean_lists_probed, 1),
                        "fallback": round(index.stats.fallback_share, 4), "qps": round(len(test) / seconds),
                        "traffic_shift": index.stats.traffic_shift}
                rows.append(row)
                print(json.dumps(row), flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(table(rows[1:]) + "\n")
    print(table(rows[1:]))


def table(rows: list[dict]) -> str:
    head = ("| test | router | margin | lists for 0.95 (fixed) | target 0.95: match (lists, QPS) | "
            "target 0.99: match (lists, QPS) |")
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[t]['match']:.3f} ({r[t]['lists']}, {r[t]['qps']:,}{', shift seen' if r[t]['traffic_shift'] else ''})"
                 for t in ("target 0.95", "target 0.99")]
        lines.append(f"| {r['test']} (n={r['n']}) | {r['router']} | {r['margin']} | "
                     f"{r['lists_for_0.95'] or '> 128'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
