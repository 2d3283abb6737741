"""Direct prediction (no index): train SupportNet and KeyNet, each sized at 20% of the keys' float32
bytes, to predict the argmax key; report match rate, recall@10 and training time on test queries.

    python -m benchmarks.train_models --data debian glove [--minutes 5]

The predicted key (∇f for SupportNet, the output for KeyNet) is snapped to the nearest stored key
(L2); recall@10 counts the exact top-10 keys among the 10 keys nearest to the prediction.
"""
from __future__ import annotations

import argparse
import json

import faiss
import numpy as np
import torch

from amips_faiss import set_num_threads
from amips_faiss.data import load_dataset
from amips_faiss.metrics import found_scores, match_rate, recall_at_k
from amips_faiss.nn import KeyNet, SupportNet, count_parameters
from amips_faiss.targets import augment_queries, split_queries, support_values
from amips_faiss.training import TrainConfig, train_direct


def evaluate(model, keys: np.ndarray, test: np.ndarray) -> tuple[float, float]:
    """(match rate, recall@10) of the snapped predictions on test queries."""
    q = torch.from_numpy(test)
    if isinstance(model, SupportNet):
        pred = torch.cat([model.argmax_key(q[lo:lo + 2048]) for lo in range(0, len(q), 2048)])
    else:
        with torch.no_grad():
            pred = model(q)
    l2 = faiss.IndexFlatL2(keys.shape[1])
    l2.add(keys)
    _, near = l2.search(np.ascontiguousarray(pred.numpy(), np.float32), 10)
    ip = faiss.IndexFlatIP(keys.shape[1])
    ip.add(keys)
    exact_scores, exact10 = ip.search(test, 10)
    return match_rate(found_scores(keys, test, near[:, 0]), exact_scores[:, 0]), recall_at_k(near, exact10)


def run(data: str, minutes: float, seed: int = 0) -> list[dict]:
    set_num_threads(2)
    keys, queries = load_dataset(data, seed=seed)
    parts = split_queries(queries, {"test": min(0.1, 5000 / len(queries)), "val": min(0.05, 2000 / len(queries)),
                                    "train": min(0.85, 100_000 / len(queries))}, seed=seed)
    train_q = augment_queries(queries[parts["train"]], 1, seed=seed)
    t_train = support_values(keys, train_q)
    t_val = support_values(keys, queries[parts["val"]])
    budget = int(0.2 * keys.size)
    scale = float(np.median(np.linalg.norm(keys[t_train.ids], axis=1)))
    rows = []
    for cls, lr, depth in ((KeyNet, 1e-3, 2), (SupportNet, 3e-3, 3)):
        torch.manual_seed(seed)
        model = cls.from_budget(keys.shape[1], budget, depth=depth, scale=scale)
        summary = train_direct(model, keys, train_q, t_train, queries[parts["val"]], t_val,
                               TrainConfig(steps=100_000, batch_size=1024, lr=lr, time_limit=60 * minutes,
                                           eval_every=250, patience=8, seed=seed))
        match, r10 = evaluate(model, keys, queries[parts["test"]])
        row = {"data": data, "model": cls.__name__, "width": model.width, "depth": model.depth,
               "params": count_parameters(model), "params_vs_keys": round(count_parameters(model) / keys.size, 3),
               "steps": summary["steps"], "train_seconds": summary["seconds"], "test_match_rate": round(match, 4),
               "test_recall@10": round(r10, 4),
               "most_frequent_argmax_baseline": round(float(np.mean(
                   support_values(keys, queries[parts["test"]], progress=False).ids == np.bincount(t_train.ids).argmax())), 4)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", default=["debian", "glove"])
    ap.add_argument("--minutes", type=float, default=5.0, help="training time per model")
    args = ap.parse_args(argv)
    for data in args.data:
        run(data, args.minutes)


if __name__ == "__main__":
    main()
