import json
import math
import struct

import numpy as np
import pytest

import amips_faiss as af
from amips_faiss.io import MAGIC
from amips_faiss.parameters import SETTINGS

# a value other than the default for every search setting
NON_DEFAULT = {"nprobe": 3, "max_nprobe": 9, "target_recall": 0.9, "margin": 0.125, "fallback": "ivf",
               "fallback_nprobe": 7, "scan_method": "faiss", "blend": 0.5, "confidence_rank": 10,
               "calibration_bins": 3, "adaptive_margin": False}


def test_the_non_default_table_covers_every_setting():
    assert set(NON_DEFAULT) == set(SETTINGS)


@pytest.mark.parametrize("router", ["supportnet", "keynet"])
def test_save_load_gives_identical_answers(synthetic, trained, tmp_path, router):
    index = trained(router, synthetic)
    path = str(tmp_path / f"{router}.amips")
    af.write_index(index, path)
    loaded = af.read_index(path)
    assert loaded.ntotal == index.ntotal and loaded.router_name == router
    for params in (None, af.SearchParametersAMIPS(nprobe=3, margin=math.inf)):
        D1, I1 = index.search(synthetic["test"], 5, params=params)
        D2, I2 = loaded.search(synthetic["test"], 5, params=params)
        np.testing.assert_array_equal(I1, I2)
        np.testing.assert_array_equal(D1, D2)


def test_every_setting_survives_save_and_load(synthetic, trained, tmp_path):
    from .conftest import copy_of
    index = copy_of(trained("supportnet", synthetic))
    for name, value in NON_DEFAULT.items():
        assert getattr(index, name) != value
        setattr(index, name, value)
    path = str(tmp_path / "set.amips")
    af.write_index(index, path)
    loaded = af.read_index(path)
    assert {name: getattr(loaded, name) for name in SETTINGS} == NON_DEFAULT


def _rewrite_as_format_1(blob: bytes) -> bytes:
    """The same index in the layout of format 1 (settings beside the config, no scan_method,
    margin or blend; a KeyNet config with n_outputs)."""
    (n,) = struct.unpack("<Q", blob[8:16])
    header = json.loads(blob[16:16 + n])
    config = header["config"]
    settings = config.pop("settings")
    config.update({k: settings[k] for k in ("nprobe", "max_nprobe", "target_recall", "fallback", "fallback_nprobe")})
    if config["model"]["kind"] == "KeyNet":
        config["model"]["n_outputs"] = 1
    header.update(format=1, config=config)
    new = json.dumps(header).encode()
    return MAGIC + struct.pack("<Q", len(new)) + new + blob[16 + n:]


@pytest.mark.parametrize("router", ["supportnet", "keynet"])
def test_files_of_format_1_still_load(synthetic, trained, router):
    index = trained(router, synthetic)
    loaded = af.deserialize_index(_rewrite_as_format_1(af.serialize_index(index)))
    assert loaded.scan_method == "auto" and loaded.margin is None and loaded.target_recall == index.target_recall
    np.testing.assert_array_equal(loaded.search(synthetic["test"], 3)[1], index.search(synthetic["test"], 3)[1])


def test_corrupt_truncated_and_pickle_files_are_refused(synthetic, trained, tmp_path):
    path = str(tmp_path / "x.amips")
    af.write_index(trained("supportnet", synthetic), path)
    blob = open(path, "rb").read()
    damaged = bytearray(blob)
    damaged[len(blob) // 2] ^= 0xFF
    for name, content, match in [("flip", bytes(damaged), "corrupt"), ("cut", blob[: len(blob) // 3], "corrupt|truncated"),
                                 ("tiny", blob[:10], "truncated"), ("header", blob[:20], "corrupt"),
                                 ("pickle", b"\x80\x04\x95" + b"cos\nsystem\n", "pickle"),
                                 ("zip", b"PK\x03\x04torch", "pickle")]:
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(ValueError, match=match):
            af.read_index(str(p))
    with pytest.raises(FileNotFoundError):
        af.read_index(str(tmp_path / "missing"))


def test_serialized_size_counts_everything_saved(synthetic, trained):
    index = trained("supportnet", synthetic)
    config, arrays = index.get_state()
    assert {"faiss", "buffer", "calibration_queries", "calibration_values", "trained_fingerprints"} <= set(arrays)
    assert len(af.serialize_index(index)) >= sum(np.asarray(a).nbytes for a in arrays.values())


def test_write_index_refuses_other_objects_and_user_routers(synthetic, trained, tmp_path):
    with pytest.raises(TypeError, match="IndexAMIPS"):
        af.write_index("not an index", str(tmp_path / "x"))
    base = trained("centroid", synthetic)
    custom = af.IndexAMIPS.from_ivf(base.ivf, router=base.router)
    with pytest.raises(TypeError, match="user-built router"):
        af.write_index(custom, str(tmp_path / "y"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
