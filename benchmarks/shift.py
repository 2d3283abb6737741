"""Does the calibrated target hold for queries unlike the training sample? A held-out-topic check on
Debian: the keys are the first ``--keys`` packages' descriptions (alphabetical), the router is trained
and calibrated on titles of those packages, and two test sets are searched at each target:

- *same packages*: held-out titles of the indexed packages (the training distribution);
- *next packages*: titles of the next ``--shifted`` packages, whose own descriptions are absent.

Each with the margins of ``topics.MARGINS``: the calibration queries' one margin, the default
(that margin, re-weighted when the traffic's first rounds depart from calibration's:
``confidence.TrafficMonitor``) and a margin per quartile of the router's forecast. Each test set is searched as one batch, and at target
0.95 with the default also one query per call on a fresh copy of the index (no traffic history: the
first ``MIN_EVIDENCE`` queries are judged unshifted). Also QPS at 1 and 2 threads on the
unshifted set.

``--data glove``: the same on GloVe, training on frequent words and testing on rare ones
(``shifted_glove``); ``--keys``, ``--shifted`` and ``--steps`` are Debian's.

    python -m benchmarks.shift [--data glove --out benchmarks/results/shift-glove]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

import amips_faiss as af
from amips_faiss.data import default_debian_path, glove_vectors, load_folder
from amips_faiss.metrics import found_scores, match_rate
from amips_faiss.targets import split_queries, support_values

from .run import timed
from .topics import MARGINS


def shifted_debian(n_keys: int = 10_000, n_shifted: int = 2_000, steps: int = 2_000
                   ) -> tuple[np.ndarray, af.IndexAMIPS, dict[str, np.ndarray], float]:
    """The held-out-topic set-up: keys = the first ``n_keys`` packages' descriptions, an index
    trained (2 threads) on 80% of their titles; returns the keys, the index, the test sets
    {"same packages": the other titles, "next packages": the next ``n_shifted`` packages' titles}
    and the build seconds."""
    keys_all, titles = load_folder(default_debian_path())
    keys = keys_all[:n_keys]
    parts = split_queries(titles[:n_keys], {"test": 0.2, "train": 0.8})
    af.set_num_threads(2)
    index = af.IndexAMIPS(keys.shape[1], af.default_nlist(len(keys)))
    start = time.perf_counter()
    index.train(keys, titles[parts["train"]], steps=steps, time_limit=None, progress=False)
    index.add(keys)
    tests = {"same packages": titles[parts["test"]], "next packages": titles[n_keys:n_keys + n_shifted]}
    return keys, index, tests, time.perf_counter() - start


def shifted_glove(n_test: int = 3_000, seed: int = 0) -> tuple[np.ndarray, af.IndexAMIPS, dict[str, np.ndarray], float]:
    """The same check on GloVe (unnormalised, a set the traffic monitor was not tuned on): a seeded
    60% of the 400k words are the keys; the router is trained (2 threads, default ``TrainConfig``)
    on the other words among the 150,000 most frequent, and tested on ``n_test`` held-out ones
    ("frequent words") and on ``n_test`` words of frequency rank 300,000 or more ("rare words")."""
    vectors = glove_vectors()
    rng = np.random.default_rng(seed)
    is_key = rng.random(len(vectors)) < 0.6
    rank = np.arange(len(vectors))  # the file is in frequency order
    frequent, rare = (rng.permutation(np.flatnonzero(~is_key & band)) for band in (rank < 150_000, rank >= 300_000))
    keys = vectors[is_key]
    af.set_num_threads(2)
    index = af.IndexAMIPS(keys.shape[1], af.default_nlist(len(keys)))
    start = time.perf_counter()
    index.train(keys, vectors[frequent[n_test:]], progress=False, seed=seed)
    index.add(keys)
    tests = {"frequent words": vectors[frequent[:n_test]], "rare words": vectors[rare[:n_test]]}
    return keys, index, tests, time.perf_counter() - start


def result(test_name: str, margin: str, target: float, keys: np.ndarray, test: np.ndarray, answers: np.ndarray,
           exact: np.ndarray, stats: af.SearchStats) -> dict:
    """One table row: the match rate of ``answers [n]`` (ids of ``keys``) against ``exact [n]``."""
    return {"test": test_name, "n": len(test), "margin": margin, "target": target,
            "match": round(match_rate(found_scores(keys, test, answers), exact), 4),
            "sigma": round(float(np.sqrt(target * (1 - target) / len(test))), 4),
            "lists": round(stats.mean_lists_probed, 1), "fallback": round(stats.fallback_share, 4),
            "traffic_shift": stats.traffic_shift}


def table(rows: list[dict]) -> str:
    """Match rate (lists) per test set and margin, one column per target."""
    targets = sorted({r["target"] for r in rows})
    lines = ["| test | margin | " + " | ".join(f"target {t}" for t in targets) + " |",
             "|---|---|" + "---|" * len(targets)]
    for key in dict.fromkeys((r["test"], r["margin"]) for r in rows):
        cells = {r["target"]: f"{r['match']:.3f} ({r['lists']}{', shift seen' if r['traffic_shift'] else ''})"
                 for r in rows if (r["test"], r["margin"]) == key}
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells.get(t, "") for t in targets) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=10_000)
    ap.add_argument("--data", choices=("debian", "glove"), default="debian")
    ap.add_argument("--shifted", type=int, default=2_000)
    ap.add_argument("--steps", type=int, default=2_000)
    ap.add_argument("--out", default="benchmarks/results/shift")
    args = ap.parse_args(argv)
    keys, index, tests, build_seconds = shifted_debian(args.keys, args.shifted, args.steps) \
        if args.data == "debian" else shifted_glove()
    rows = [{"build_s": round(build_seconds, 1), "calibration_queries": index.n_calibration}]
    af.set_num_threads(1)
    for name, test in tests.items():
        exact = support_values(keys, test, progress=False).values
        for margin, target in ((m, t) for m in MARGINS for t in (0.9, 0.95, 0.99)):
            _, I = index.search(test, 1, params=af.SearchParametersAMIPS(target_recall=target, **MARGINS[margin]))
            rows.append(result(name, margin, target, keys, test, I[:, 0], exact, index.stats))
            print(json.dumps(rows[-1]), flush=True)
        fresh = af.deserialize_index(af.serialize_index(index))
        answers, lists, shifted = [], [], []
        for query in test:
            answers.append(fresh.search(query[None], 1)[1][0, 0])
            lists.append(fresh.stats.mean_lists_probed)
            shifted.append(fresh.stats.traffic_shift)
        stream = af.SearchStats(len(test), float(np.mean(lists)), traffic_shift=bool(np.mean(shifted) > 0.5))
        rows.append({**result(name, "one, adaptive (default), one query per call", 0.95, keys, test,
                              np.array(answers), exact, stream), "shift_seen_share": round(float(np.mean(shifted)), 3)})
        print(json.dumps(rows[-1]), flush=True)
    params = af.SearchParametersAMIPS(target_recall=0.95)
    big = np.tile(next(iter(tests.values())), (3, 1))  # the unshifted set, big enough to split across threads
    for threads in (1, 2):
        af.set_num_threads(threads)
        seconds, _ = timed(lambda x: index.search(x, 1, params=params), big, 5)
        rows.append({"threads": threads, "qps": round(len(big) / seconds)})
        print(json.dumps(rows[-1]), flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(table([r for r in rows if "target" in r]) + "\n")
    print(table([r for r in rows if "target" in r]))


if __name__ == "__main__":
    main()
