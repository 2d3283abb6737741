"""Command line: build, search, eval, info.

    amips-faiss build --keys K.npy --queries Q.npy -o index.amips [--nlist N] [--router supportnet]
    amips-faiss search --index index.amips --queries Q.npy -k 10 -o result.npz
    amips-faiss eval --index index.amips --keys K.npy --queries Q.npy [--target-recall 0.95]
    amips-faiss info --index index.amips
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from .data import load_npy
from .index import IndexAMIPS, default_nlist, set_num_threads
from .io import read_index, write_index
from .parameters import FALLBACKS, SearchParametersAMIPS
from .routing import ROUTERS
from .training import TrainConfig
from .validation import check_vectors


def _load(path: str, name: str) -> np.ndarray:
    return check_vectors(load_npy(path, name), name)


def _params(args) -> SearchParametersAMIPS:
    return SearchParametersAMIPS(nprobe=args.nprobe, target_recall=args.target_recall, fallback=args.fallback)


def cmd_build(args) -> dict:
    keys = _load(args.keys, "keys")
    queries = _load(args.queries, "queries") if args.queries else None
    nlist = args.nlist or default_nlist(len(keys))
    index = IndexAMIPS(keys.shape[1], nlist, router=args.router)
    t = time.perf_counter()
    options = {name: getattr(args, name) for name in ("steps", "time_limit") if getattr(args, name) is not None}
    index.train(keys, queries, TrainConfig(progress=not args.quiet, **options))
    index.add(keys)
    write_index(index, args.output)
    return {"index": args.output, "ntotal": index.ntotal, "nlist": nlist, "router": args.router,
            "seconds": round(time.perf_counter() - t, 1)}


def cmd_search(args) -> dict:
    index = read_index(args.index)
    queries = _load(args.queries, "queries")
    D, I = index.search(queries, args.k, params=_params(args))
    np.savez(args.output, D=D, I=I)
    return {"output": args.output, "n": len(queries), "k": args.k, "mean_lists_probed": index.stats.mean_lists_probed,
            "fallback_share": index.stats.fallback_share, "traffic_shift": index.stats.traffic_shift}


def cmd_eval(args) -> dict:
    from .metrics import found_scores, match_rate, recall_at_k
    from .targets import support_values
    index = read_index(args.index)
    keys, queries = _load(args.keys, "keys"), _load(args.queries, "queries")
    exact = support_values(keys, queries, progress=not args.quiet)
    t = time.perf_counter()
    D, I = index.search(queries, args.k, params=_params(args))
    seconds = time.perf_counter() - t
    out = {"n": len(queries), "match_rate": match_rate(found_scores(keys, queries, I[:, 0]), exact.values),
           "qps": len(queries) / seconds, "mean_lists_probed": index.stats.mean_lists_probed,
           "fallback_share": index.stats.fallback_share, "traffic_shift": index.stats.traffic_shift}
    if args.k >= 10:
        import faiss
        flat = faiss.IndexFlatIP(keys.shape[1])
        flat.add(keys)
        out["recall@10"] = recall_at_k(I[:, :10], flat.search(queries, 10)[1])
    return out


def cmd_info(args) -> dict:
    index = read_index(args.index)
    return {"d": index.d, "nlist": index.nlist, "ntotal": index.ntotal, "router": index.router_name,
            "buffered_keys": index.buffer.ntotal, "nprobe": index.nprobe, "max_nprobe": index.max_nprobe,
            "target_recall": index.target_recall, "fallback": index.fallback,
            "calibration_queries": index.n_calibration,
            "router_macs_per_query": index.router.macs_per_query}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="amips-faiss", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="faiss and torch threads")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train an index on keys (and query samples) and save it")
    b.add_argument("--keys", required=True)
    b.add_argument("--queries", help="samples of the query traffic (recommended)")
    b.add_argument("-o", "--output", required=True)
    b.add_argument("--nlist", type=int)
    b.add_argument("--router", default="supportnet", choices=ROUTERS)
    b.add_argument("--steps", type=int, help=f"most training steps (default {TrainConfig.steps})")
    b.add_argument("--time-limit", type=float, help=f"training seconds (default {TrainConfig.time_limit})")
    for name, helptext in (("search", "search an index, save D and I as .npz"),
                           ("eval", "match rate, recall@10 and QPS against exact search")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--index", required=True)
        s.add_argument("--queries", required=True)
        s.add_argument("-k", type=int, default=10)
        s.add_argument("--nprobe", type=int)
        s.add_argument("--target-recall", type=float)
        s.add_argument("--fallback", choices=FALLBACKS)
        if name == "search":
            s.add_argument("-o", "--output", required=True)
        else:
            s.add_argument("--keys", required=True)
    i = sub.add_parser("info", help="describe a saved index")
    i.add_argument("--index", required=True)
    args = ap.parse_args(argv)
    if args.threads:
        set_num_threads(args.threads)
    try:
        result = {"build": cmd_build, "search": cmd_search, "eval": cmd_eval, "info": cmd_info}[args.command](args)
    except (FileNotFoundError, ValueError, TypeError, RuntimeError, KeyError) as exc:
        print(f"amips-faiss {args.command}: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
