"""IndexAMIPS sharded across Ray actors (the optional ``ray`` extra: ``pip install amips_faiss[ray]``).

``ShardedIndexAMIPS`` splits the keys across ``n_shards`` shards, each an ``IndexAMIPS`` held by a
Ray actor. Each shard learns its own lists and router from the same query sample, all shards at
once, so training scales out with the cluster. ``search`` sends the batch to every shard and merges
their top-k as faiss's ``IndexShards`` does (same ``D``/``I`` contract, user ids kept).

Recall. The global top-1 of a query lives in exactly one shard s, and the merge keeps it whenever
shard s returns it (nothing in another shard scores higher). So if every shard finds its own top-1
with probability ≥ t (each shard calibrated for ``target_recall`` t), the merged answer is the
global top-1 with probability ≥ t: the shards' misses on other shards' keys cannot hurt.

Ray runs on one machine (``ray.init()``, which the index calls when Ray is not yet running) or on a
cluster (``ray start --head`` on one node, ``ray start --address=<head>:6379`` on the others, then
``ray.init(address="auto")`` in the script). Shard files are written and read by the actors, so on a
cluster ``save``/``load`` paths must be on storage every node sees.

A shard actor that dies makes the call in flight raise ``ShardError`` (never a partial answer). The
next call re-creates it from the shard's saved file if that file is current; otherwise it keeps
raising until the index is rebuilt or loaded.
"""
from __future__ import annotations

import json
import os

import numpy as np

try:
    import ray
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("amips_faiss.distributed needs Ray: pip install 'amips_faiss[ray]'") from exc

from .index import IndexAMIPS, set_num_threads
from .io import read_index, write_index
from .parameters import SearchParametersAMIPS
from .training import TrainConfig, make_config
from .validation import check_fraction, check_ids, check_positive_int, check_vectors

SPLITS = ("hash", "range")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


class ShardError(RuntimeError):
    """A shard actor died or lost its keys; the answer would be partial, so none is given."""


class _Shard:
    """The Ray actor behind one shard: an IndexAMIPS and the version of its keys."""

    def __init__(self, threads: int, args: tuple | None = None, path: str | None = None, version: int = 0):
        set_num_threads(threads)
        self.index = read_index(path) if path else IndexAMIPS(*args[:3], **args[3])
        self.version = version

    def call(self, version: int, method: str, *args, **kwargs):
        """``index.method(*args, **kwargs)`` as write number ``version``. A write the index refuses
        changes nothing there, so the shard still agrees with the driver's count: the version moves
        either way, and the driver gets the refusal."""
        try:
            out = getattr(self.index, method)(*args, **kwargs)
        finally:
            self.version = version
        return None if out is self.index else out  # (train returns the index, which stays here)

    def search(self, version: int, xq: np.ndarray, k: int, given: dict):
        if version != self.version:
            return None  # the shard restarted from an older state: the driver refuses the answer
        return self.index.search(xq, k, params=SearchParametersAMIPS(**given) if given else None)

    def save(self, path: str) -> None:
        write_index(self.index, path)

    def info(self) -> dict:
        return {"ntotal": self.index.ntotal, "version": self.version, "is_trained": self.index.is_trained,
                "train_seconds": self.index.train_summary.get("phase_seconds")}


_RemoteShard = ray.remote(_Shard)


def check_cpus(cpus) -> float:
    """A shard actor's CPU reservation: a number > 0 (a fraction lets several shards share a CPU)."""
    if isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or not 0 < cpus < float("inf"):
        raise ValueError(f"cpus_per_shard must be a number > 0, got {cpus!r}")
    return cpus


def shard_of(ids: np.ndarray, n_shards: int) -> np.ndarray:
    """The shard of each id under ``split="hash"``: a 64-bit mix (splitmix64) of the id, mod n_shards."""
    z = ids.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return ((z ^ (z >> np.uint64(31))) % np.uint64(n_shards)).astype(np.int64)


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of the shards' ``(D [n, k], I [n, k])`` answers: ``D`` descending, −FLT_MAX / −1
    padded, ties in shard order (as faiss ``IndexShards`` merges)."""
    D = np.hstack([d for d, _ in parts])
    I = np.hstack([i for _, i in parts])
    order = np.argsort(-D, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(D, order, axis=1), np.take_along_axis(I, order, axis=1)


class ShardedIndexAMIPS:
    """An inner-product index over ``n_shards`` IndexAMIPS shards held by Ray actors.

    ``ShardedIndexAMIPS(d, nlist, n_shards, router="supportnet", split="hash", cpus_per_shard=1,
    **index_options)``: each shard is ``IndexAMIPS(d, nlist, router, **index_options)`` (``nlist``
    lists per shard) on an actor reserving ``cpus_per_shard`` CPUs. ``split`` says which keys go to
    which shard: "hash" by a hash of the id, "range" by position (each ``add`` call is cut into
    ``n_shards`` contiguous blocks, as faiss ``IndexShards`` does). ``cpus_per_shard`` may be a
    fraction (several shards per CPU); each shard runs max(1, int(cpus_per_shard)) threads. Ray waits
    for free CPUs before it starts an actor, so a cluster too small for the shards waits too. Calls: ``train``, ``add``,
    ``add_with_ids``, ``remove_ids``, ``reset``, ``search``, ``ntotal``, ``save``, ``load``, ``close``
    (also as a context manager).
    """

    def __init__(self, d: int, nlist: int, n_shards: int, router: str = "supportnet", *, split: str = "hash",
                 cpus_per_shard: float = 1, **index_options):
        d, nlist = check_positive_int(d, "d"), check_positive_int(nlist, "nlist")
        n_shards = check_positive_int(n_shards, "n_shards")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        cpus_per_shard = check_cpus(cpus_per_shard)
        IndexAMIPS(d, nlist, router, **index_options)  # refuses bad arguments here, before any actor starts
        self._setup(d, nlist, n_shards, split, cpus_per_shard, (d, nlist, router, index_options))
        self._actors = [self._start(i) for i in range(n_shards)]

    def _setup(self, d, nlist, n_shards, split, cpus, args) -> None:
        if not ray.is_initialized():
            ray.init()
        self.d, self.nlist, self.n_shards, self.split, self.cpus_per_shard = d, nlist, n_shards, split, cpus
        self._threads = max(1, int(cpus))  # threads each shard's faiss/BLAS/torch use
        self._args = args
        self._versions = [0] * n_shards  # bumped by every write; a shard answering for another is refused
        self._files: list[str | None] = [None] * n_shards  # each shard's saved file, if current
        self._saved_versions = [-1] * n_shards
        self._ntotal = 0

    def _start(self, shard: int, path: str | None = None):
        actor = _RemoteShard.options(num_cpus=self.cpus_per_shard)
        if path is None:
            return actor.remote(self._threads, self._args)
        return actor.remote(self._threads, path=path, version=self._versions[shard])

    # ------------------------------------------------------------ shard calls

    def _gather(self, refs: list, what: str) -> list:
        """ray.get of one ref per shard; a dead shard raises ShardError (and is restarted next call
        from its file when that file is current)."""
        out = []
        for shard, ref in enumerate(refs):
            try:
                out.append(ray.get(ref))
            except ray.exceptions.RayActorError as exc:
                self._actors[shard] = None
                raise ShardError(f"shard {shard} died during {what}; {self._recovery(shard)}") from exc
        return out

    def _recovery(self, shard: int) -> str:
        if self._files[shard] and self._saved_versions[shard] == self._versions[shard]:
            return f"the next call restarts it from {self._files[shard]}"
        return "it has no saved copy of its current keys: rebuild the index or load a saved one"

    def _live(self) -> list:
        """Every shard's actor, restarting a dead one from its current file."""
        for shard, actor in enumerate(self._actors):
            if actor is None:
                if not (self._files[shard] and self._saved_versions[shard] == self._versions[shard]):
                    raise ShardError(f"shard {shard} is dead; {self._recovery(shard)}")
                self._actors[shard] = self._start(shard, self._files[shard])
        return self._actors

    def _write(self, what: str, calls: dict[int, tuple], **kwargs) -> list:
        """Run ``index.<what>(*args, **kwargs)`` on the shards in ``calls`` ({shard: args}) at once,
        as a write."""
        actors = self._live()
        for shard in calls:
            self._versions[shard] += 1
        refs = [actors[s].call.remote(self._versions[s], what, *args, **kwargs) for s, args in calls.items()]
        return self._gather(refs, what)

    # ------------------------------------------------------------ the faiss-style calls

    @property
    def ntotal(self) -> int:
        return self._ntotal

    @property
    def actors(self) -> list:
        """The shards' Ray actor handles (None for a dead one not yet restarted), e.g. to watch them."""
        return list(self._actors)

    @property
    def is_trained(self) -> bool:
        return all(info["is_trained"] for info in self.shard_info())

    def shard_info(self) -> list[dict]:
        """Per shard: keys held, version, whether trained, training seconds by phase."""
        actors = self._live()
        return self._gather([a.info.remote() for a in actors], "shard_info")

    def _split(self, n: int, ids: np.ndarray) -> list[np.ndarray]:
        """Rows of an n-row batch going to each shard."""
        if self.split == "hash":
            owner = shard_of(ids, self.n_shards)
            return [np.flatnonzero(owner == s) for s in range(self.n_shards)]
        bounds = np.linspace(0, n, self.n_shards + 1).astype(int)
        return [np.arange(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]

    def train(self, xb: np.ndarray, queries: np.ndarray | None = None, config: TrainConfig | None = None, *,
              target_recall: float = 0.95, **options) -> "ShardedIndexAMIPS":
        """Each shard learns its lists and router from its part of ``xb [N, d]`` (the part that
        ``add(xb)`` on an empty index gives it) and the same ``queries [n, d]``, all shards at once."""
        xb = check_vectors(xb, "xb", d=self.d)
        if queries is not None:
            queries = check_vectors(queries, "queries", d=self.d)
        config = make_config(config, options)
        target_recall = check_fraction(target_recall, "target_recall")
        rows = self._split(len(xb), np.arange(self._ntotal, self._ntotal + len(xb)))
        small = [s for s, r in enumerate(rows) if len(r) < self.nlist]
        if small:
            raise ValueError(f"shard(s) {small} would get fewer than nlist={self.nlist} training keys: "
                             "pass more keys, fewer lists or fewer shards")
        queries_ref = ray.put(queries)
        self._write("train", {s: (ray.put(xb[r]), queries_ref, config) for s, r in enumerate(rows)},
                    target_recall=target_recall)
        return self

    def add(self, x: np.ndarray) -> None:
        """Add keys ``[n, d]`` with ids ntotal, ntotal+1, ..."""
        x = check_vectors(x, "x", d=self.d, allow_empty=True)
        self.add_with_ids(x, np.arange(self._ntotal, self._ntotal + len(x), dtype=np.int64))

    def add_with_ids(self, x: np.ndarray, ids) -> None:
        """Add keys ``[n, d]`` with user ids ``[n] int64``, each to its shard."""
        x = check_vectors(x, "x", d=self.d, allow_empty=True)
        ids = check_ids(ids, len(x))
        if not len(x):
            return
        rows = self._split(len(x), ids)
        self._write("add_with_ids", {s: (x[r], ids[r]) for s, r in enumerate(rows) if len(r)})
        self._ntotal += len(x)

    def remove_ids(self, ids) -> int:
        """Remove keys by id from every shard; returns how many were removed."""
        ids = check_ids(ids)
        removed = int(sum(self._write("remove_ids", {s: (ids,) for s in range(self.n_shards)})))
        self._ntotal -= removed
        return removed

    def reset(self) -> None:
        """Remove every key; lists and routers stay trained."""
        self._write("reset", {s: () for s in range(self.n_shards)})
        self._ntotal = 0

    def search(self, xq: np.ndarray, k: int, *, params: SearchParametersAMIPS | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """The k keys of largest inner product over all shards: ``D [n, k] float32`` descending,
        ``I [n, k] int64`` user ids, −FLT_MAX / −1 padded. ``params`` applies on every shard; a
        filter ``sel`` must be an array of allowed ids (a faiss IDSelector cannot travel to actors)."""
        xq = check_vectors(xq, "xq", d=self.d, allow_empty=True)
        k = check_positive_int(k, "k")
        if params is not None and not isinstance(params, SearchParametersAMIPS):
            raise TypeError(f"params must be SearchParametersAMIPS, got {type(params).__name__}")
        given = params.given() if params is not None else {}
        if "sel" in given and not isinstance(given["sel"], np.ndarray):
            raise TypeError("a sharded search takes sel as an array of allowed ids; a faiss IDSelector "
                            "cannot be sent to the shard actors")
        if not len(xq):
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        actors = self._live()
        xq_ref = ray.put(xq)
        parts = self._gather([a.search.remote(v, xq_ref, k, given) for a, v in zip(actors, self._versions)],
                             "search")
        stale = [s for s, part in enumerate(parts) if part is None]
        if stale:
            raise ShardError(f"shard(s) {stale} restarted from a state older than their keys; "
                             "rebuild the index or load a saved one")
        return merge_topk(parts, k)

    # ------------------------------------------------------------ files

    def save(self, path: str) -> None:
        """Write each shard to ``path/shard_<i>.amips`` (by its actor) and then ``path/manifest.json``."""
        os.makedirs(path, exist_ok=True)
        actors = self._live()
        files = [os.path.abspath(os.path.join(path, f"shard_{s:04d}.amips")) for s in range(self.n_shards)]
        self._gather([a.save.remote(f) for a, f in zip(actors, files)], "save")
        manifest = {"format": MANIFEST_FORMAT, "d": self.d, "nlist": self.nlist, "n_shards": self.n_shards,
                    "split": self.split, "cpus_per_shard": self.cpus_per_shard, "ntotal": self._ntotal,
                    "router": self._args[2], "index_options": self._args[3],
                    "files": [os.path.basename(f) for f in files]}
        tmp = os.path.join(path, MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(tmp, os.path.join(path, MANIFEST))
        self._files, self._saved_versions = files, list(self._versions)

    @classmethod
    def load(cls, path: str, cpus_per_shard: int | None = None) -> "ShardedIndexAMIPS":
        """The index ``save`` wrote to ``path``; each shard's actor reads its own file."""
        manifest_path = os.path.join(path, MANIFEST)
        if not os.path.isfile(manifest_path):
            raise FileNotFoundError(f"no sharded index at {path} (missing {MANIFEST})")
        try:
            with open(manifest_path) as f:
                m = json.load(f)
            files = [os.path.abspath(os.path.join(path, name)) for name in m["files"]]
            fixed = (m["d"], m["nlist"], m["n_shards"], m["split"], m["router"], m["index_options"], m["ntotal"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{manifest_path} is corrupt") from exc
        if m.get("format") != MANIFEST_FORMAT or len(files) != m["n_shards"]:
            raise ValueError(f"{manifest_path} has format {m.get('format')} or a wrong file list")
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"shard file(s) missing: {missing}")
        d, nlist, n_shards, split, router, options, ntotal = fixed
        index = cls.__new__(cls)
        index._setup(d, nlist, n_shards, split, check_cpus(cpus_per_shard or m["cpus_per_shard"]),
                     (d, nlist, router, options))
        index._files, index._saved_versions, index._ntotal = files, [0] * n_shards, ntotal
        index._actors = [index._start(s, f) for s, f in enumerate(files)]
        index.shard_info()  # a corrupt shard file fails here, not at the first search
        return index

    def close(self) -> None:
        """Stop the shard actors (their CPUs go back to Ray); the index is unusable afterwards."""
        for actor in self._actors:
            if actor is not None:
                ray.kill(actor)
        self._actors = [None] * self.n_shards
        self._files = [None] * self.n_shards

    def __enter__(self) -> "ShardedIndexAMIPS":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ShardedIndexAMIPS(d={self.d}, nlist={self.nlist}, n_shards={self.n_shards}, "
                f"split={self.split!r}, ntotal={self.ntotal})")
