"""Does the calibrated target hold for queries unlike the training sample? A held-out-topic check on
Debian: the keys are the first ``--keys`` packages' descriptions (alphabetical), the router is trained
and calibrated on titles of those packages, and two test sets are searched at each target:

- *same packages*: held-out titles of the indexed packages (the training distribution);
- *next packages*: titles of the next ``--shifted`` packages, whose own descriptions are absent.

Each with one margin (``calibration_bins=1``, the default) and with a margin per quartile of the
router's forecast (``calibration_bins=4``). Also QPS at 1 and 2 threads on the same-packages set.

    python -m benchmarks.shift
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

import amips_faiss as af
from amips_faiss.data import default_debian_path, load_folder
from amips_faiss.metrics import found_scores, match_rate
from amips_faiss.targets import split_queries, support_values

from .run import timed


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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=10_000)
    ap.add_argument("--shifted", type=int, default=2_000)
    ap.add_argument("--steps", type=int, default=2_000)
    ap.add_argument("--out", default="benchmarks/results/shift")
    args = ap.parse_args(argv)
    keys, index, tests, build_seconds = shifted_debian(args.keys, args.shifted, args.steps)
    rows = [{"build_s": round(build_seconds, 1), "calibration_queries": index.n_calibration}]
    af.set_num_threads(1)
    for name, test in tests.items():
        exact = support_values(keys, test, progress=False).values
        for bins, target in ((b, t) for b in (1, 4) for t in (0.9, 0.95, 0.99)):
            params = af.SearchParametersAMIPS(target_recall=target, calibration_bins=bins)
            _, I = index.search(test, 1, params=params)
            rate = match_rate(found_scores(keys, test, I[:, 0]), exact)
            rows.append({"test": name, "n": len(test), "calibration_bins": bins, "target": target,
                         "match": round(rate, 4),
                         "sigma": round(float(np.sqrt(target * (1 - target) / len(test))), 4),
                         "lists": round(index.stats.mean_lists_probed, 1),
                         "fallback": round(index.stats.fallback_share, 4)})
            print(json.dumps(rows[-1]), flush=True)
    params = af.SearchParametersAMIPS(target_recall=0.95)
    big = np.tile(tests["same packages"], (3, 1))  # a batch big enough to split across threads
    for threads in (1, 2):
        af.set_num_threads(threads)
        seconds, _ = timed(lambda x: index.search(x, 1, params=params), big, 5)
        rows.append({"threads": threads, "qps": round(len(big) / seconds)})
        print(json.dumps(rows[-1]), flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
