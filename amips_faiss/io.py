"""One file per index: faiss bytes, router weights, config and calibration — no pickle.

Layout: 8-byte magic ``AMIPSIDX``, a little-endian uint64 header length, a UTF-8 JSON header
(format, config, the table of arrays, the SHA-256 of the payload), then the raw arrays. Reading checks
the magic, the header, every array's dtype/shape/extent and the checksum before anything is built, so
a truncated, corrupted or foreign file (a pickle, a torch checkpoint) raises ValueError. What goes in
is ``IndexAMIPS.get_state()``, what comes out ``IndexAMIPS.from_state``; files of format 1 are read too.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct

import numpy as np

from .index import IndexAMIPS

MAGIC = b"AMIPSIDX"
FORMAT_VERSION = 2
_DTYPES = {"float32", "float64", "int64", "uint64", "uint8"}
_ALIGN = 64


def serialize_index(index: IndexAMIPS) -> bytes:
    """The file ``write_index`` writes, as bytes (its length is what the index takes on disk)."""
    if not isinstance(index, IndexAMIPS):
        raise TypeError(f"serialize_index needs an IndexAMIPS, got {type(index).__name__}")
    config, arrays = index.get_state()
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
    return MAGIC + struct.pack("<Q", len(header)) + header + payload


def write_index(index: IndexAMIPS, path: str) -> None:
    """Save ``index`` to ``path`` atomically (a crash never leaves a half-written file in its place)."""
    data = serialize_index(index)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_index(path: str) -> IndexAMIPS:
    """Load an index saved by ``write_index``; raises ValueError for a corrupt or foreign file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no index file at {path}")
    with open(path, "rb") as f:
        return deserialize_index(f.read(), name=path)


def deserialize_index(data: bytes, name: str = "the data") -> IndexAMIPS:
    """The index ``serialize_index`` made; raises ValueError for corrupt or foreign bytes."""
    if data[:8] != MAGIC:
        hint = " (it looks like a pickle or torch file, which is never loaded)" if data[:1] == b"\x80" or \
            data[:2] == b"PK" else ""
        raise ValueError(f"{name} is not an amips_faiss index file{hint}")
    if len(data) < 16:
        raise ValueError(f"{name} is truncated")
    (header_len,) = struct.unpack("<Q", data[8:16])
    try:
        header = json.loads(data[16:16 + header_len].decode())
        config, table, digest = header["config"], header["arrays"], header["sha256"]
    except (ValueError, KeyError, UnicodeDecodeError) as exc:
        raise ValueError(f"{name} has a corrupt header (truncated or damaged file)") from exc
    if header.get("format") not in (1, FORMAT_VERSION):
        raise ValueError(f"{name} has format {header.get('format')}, this version reads 1 and {FORMAT_VERSION}")
    payload = data[16 + header_len:]
    if hashlib.sha256(payload).hexdigest() != digest:
        raise ValueError(f"{name} is corrupt or truncated (checksum mismatch)")
    arrays = {}
    for entry in table:
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{name}: array {entry['name']!r} has unsupported dtype {entry['dtype']}")
        dtype, shape = np.dtype(entry["dtype"]), tuple(int(s) for s in entry["shape"])
        if entry["nbytes"] != dtype.itemsize * int(np.prod(shape)) or entry["offset"] + entry["nbytes"] > len(payload):
            raise ValueError(f"{name}: array {entry['name']!r} does not fit the file")
        arrays[entry["name"]] = np.frombuffer(payload, dtype, int(np.prod(shape)), entry["offset"]).reshape(shape).copy()
    if header["format"] == 1:
        config = _from_format_1(config)
    return IndexAMIPS.from_state(config, arrays)


def _from_format_1(config: dict) -> dict:
    """Format 1 kept the settings beside the config, had no scan_method, margin, blend or
    confidence_rank, and a KeyNet config with n_outputs (always 1)."""
    settings = {name: config.pop(name) for name in ("nprobe", "max_nprobe", "target_recall", "fallback",
                                                    "fallback_nprobe")}
    model = config.get("model")
    if model is not None and model.get("kind") == "KeyNet":
        model.pop("n_outputs", None)
    return {**config, "settings": settings}
