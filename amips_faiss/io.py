"""One file per index: faiss bytes, router weights, config and calibration — no pickle.

Layout: 8-byte magic ``AMIPSIDX``, a little-endian uint64 header length, a UTF-8 JSON header
(config, the table of arrays, the SHA-256 of the payload), then the raw arrays. Reading checks the
magic, the header, every array's dtype/shape/extent and the checksum before anything is built, so a
truncated, corrupted or foreign file (a pickle, a torch checkpoint) raises ValueError.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct

import faiss
import numpy as np
import torch

from .index import IndexAMIPS
from .nn import KeyNet, SupportNet

MAGIC = b"AMIPSIDX"
FORMAT_VERSION = 1
_DTYPES = {"float32", "float64", "int64", "uint64", "uint8"}
_ALIGN = 64


def _model_config(model) -> dict | None:
    if isinstance(model, SupportNet):
        return {"kind": "SupportNet", "dim": model.dim, "n_outputs": model.n_outputs, "width": model.width,
                "depth": model.depth, "linear_rank": model.linear_rank, "alpha": model.alpha, "beta": model.beta}
    if isinstance(model, KeyNet):
        return {"kind": "KeyNet", "dim": model.dim, "n_outputs": model.n_outputs, "width": model.width,
                "depth": model.depth}
    return None


def write_index(index: IndexAMIPS, path: str) -> None:
    """Save ``index`` to ``path`` atomically (a crash never leaves a half-written file in its place)."""
    if not isinstance(index, IndexAMIPS):
        raise TypeError(f"write_index needs an IndexAMIPS, got {type(index).__name__}")
    arrays = {"faiss": faiss.serialize_index(index.ivf), "buffer": faiss.serialize_index(index.buffer)}
    model = index.router.model if index.router is not None else None
    if model is not None:
        arrays.update({f"model.{k}": v.detach().cpu().numpy() for k, v in model.state_dict().items()})
    if index.calibration_queries is not None:
        arrays["calibration_queries"] = index.calibration_queries
        arrays["calibration_values"] = index.calibration_values
    if index._trained_fingerprints is not None:
        arrays["trained_fingerprints"] = index._trained_fingerprints
    config = {"router": index.router_name, "router_size": index.router_size, "model": _model_config(model),
              "nprobe": index.nprobe, "max_nprobe": index.max_nprobe, "target_recall": index.target_recall,
              "fallback": index.fallback, "fallback_nprobe": index.fallback_nprobe,
              "has_fingerprints": index._trained_fingerprints is not None}
    table, offset, chunks = [], 0, []
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr)
        pad = (-offset) % _ALIGN
        chunks.append(b"\0" * pad)
        offset += pad
        table.append({"name": name, "dtype": arr.dtype.name, "shape": list(arr.shape), "offset": offset,
                      "nbytes": arr.nbytes})
        chunks.append(arr.tobytes())
        offset += arr.nbytes
    payload = b"".join(chunks)
    header = json.dumps({"format": FORMAT_VERSION, "config": config, "arrays": table,
                         "sha256": hashlib.sha256(payload).hexdigest()}).encode()
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", len(header)) + header + payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_index(path: str) -> IndexAMIPS:
    """Load an index saved by ``write_index``; raises ValueError for a corrupt or foreign file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no index file at {path}")
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != MAGIC:
        hint = " (it looks like a pickle or torch file, which is never loaded)" if data[:1] == b"\x80" or \
            data[:2] == b"PK" else ""
        raise ValueError(f"{path} is not an amips_faiss index file{hint}")
    if len(data) < 16:
        raise ValueError(f"{path} is truncated")
    (header_len,) = struct.unpack("<Q", data[8:16])
    try:
        header = json.loads(data[16:16 + header_len].decode())
        config, table, digest = header["config"], header["arrays"], header["sha256"]
    except (ValueError, KeyError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} has a corrupt header (truncated or damaged file)") from exc
    if header.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} has format {header.get('format')}, this version reads {FORMAT_VERSION}")
    payload = data[16 + header_len:]
    if hashlib.sha256(payload).hexdigest() != digest:
        raise ValueError(f"{path} is corrupt or truncated (checksum mismatch)")
    arrays = {}
    for entry in table:
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: array {entry['name']!r} has unsupported dtype {entry['dtype']}")
        dtype, shape = np.dtype(entry["dtype"]), tuple(int(s) for s in entry["shape"])
        if entry["nbytes"] != dtype.itemsize * int(np.prod(shape)) or entry["offset"] + entry["nbytes"] > len(payload):
            raise ValueError(f"{path}: array {entry['name']!r} does not fit the file")
        arrays[entry["name"]] = np.frombuffer(payload, dtype, int(np.prod(shape)), entry["offset"]).reshape(shape).copy()
    return _build(config, arrays)


def _build(config: dict, arrays: dict) -> IndexAMIPS:
    ivf = faiss.deserialize_index(arrays["faiss"])  # already of its concrete class; owns the C++ object
    index = IndexAMIPS.__new__(IndexAMIPS)
    index._setup(ivf, config["router"], **config["router_size"])
    index.buffer = faiss.deserialize_index(arrays["buffer"])
    model_cfg = config["model"]
    if model_cfg is not None:
        kind = model_cfg.pop("kind")
        model = (SupportNet if kind == "SupportNet" else KeyNet)(**model_cfg)
        state = {k[len("model."):]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("model.")}
        model.load_state_dict(state, strict=True)
        index._make_router(model.eval())
    for name in ("nprobe", "max_nprobe", "target_recall", "fallback", "fallback_nprobe"):
        setattr(index, name, config[name])
    index.calibration_queries = arrays.get("calibration_queries")
    index.calibration_values = arrays.get("calibration_values")
    index._trained_fingerprints = arrays.get("trained_fingerprints") if config["has_fingerprints"] else None
    return index
