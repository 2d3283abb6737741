"""ShardedIndexAMIPS on a local Ray with 2 CPUs and 2 shards (skipped without the ray extra)."""
import json
import os

import faiss
import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the distributed tests need the ray extra: pip install 'amips_faiss[ray]'")

import amips_faiss as af  # noqa: E402
from amips_faiss.data import make_clustered  # noqa: E402
from amips_faiss.distributed import ShardError, ShardedIndexAMIPS, merge_topk, shard_of  # noqa: E402
from amips_faiss.metrics import found_scores, match_rate  # noqa: E402

D_ = 16
HALF = 0.5  # CPUs per shard actor: the module's index and one more fit the 2 CPUs
TRAIN = dict(steps=150, progress=False, n_calibration=400, n_validation=100, seed=0)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data():
    keys, queries = make_clustered(3000, 2000, d=D_, n_clusters=16, seed=3)
    flat = faiss.IndexFlatIP(D_)
    flat.add(keys)
    return {"keys": keys, "train": queries[:1400], "test": queries[1400:], "flat": flat}


@pytest.fixture(scope="module")
def sharded(cluster, data):
    with ShardedIndexAMIPS(D_, 8, 2, cpus_per_shard=HALF) as index:
        index.train(data["keys"], data["train"], **TRAIN)
        index.add(data["keys"])
        yield index


def test_shards_split_the_keys_and_train(sharded, data):
    info = sharded.shard_info()
    assert sharded.ntotal == len(data["keys"]) == sum(i["ntotal"] for i in info)
    assert all(i["is_trained"] for i in info) and min(i["ntotal"] for i in info) > 1000
    owner = shard_of(np.arange(len(data["keys"])), 2)
    assert [int((owner == s).sum()) for s in range(2)] == [i["ntotal"] for i in info]


def test_answers_are_the_merge_of_the_shards_own(sharded, data, tmp_path):
    """The sharded answer equals the faiss-style merge of each shard searched on its own, and a
    query is answered right exactly when the shard holding its global top-1 answers it right."""
    sharded.save(str(tmp_path))
    shards = [af.read_index(str(tmp_path / f"shard_{s:04d}.amips")) for s in range(2)]
    af.set_num_threads(1)  # as on the actors: the same BLAS sums
    try:
        own = [s.search(data["test"], 5) for s in shards]
    finally:
        af.set_num_threads(2)
    D, I = sharded.search(data["test"], 5)
    D_ref, I_ref = merge_topk(own, 5)
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_allclose(D, D_ref, rtol=1e-6)
    exact_D, exact_I = data["flat"].search(data["test"], 1)
    right = found_scores(data["keys"], data["test"], I[:, 0]) >= exact_D[:, 0] - 1e-4 * np.abs(exact_D[:, 0])
    owner = shard_of(exact_I[:, 0], 2)
    own_top = np.where(owner == 0, own[0][1][:, 0], own[1][1][:, 0])
    owner_right = found_scores(data["keys"], data["test"], own_top) >= exact_D[:, 0] - 1e-4 * np.abs(exact_D[:, 0])
    np.testing.assert_array_equal(right, owner_right)


def test_exact_fallback_equals_flat(sharded, data):
    params = af.SearchParametersAMIPS(margin=-np.inf, fallback="exact")
    D, I = sharded.search(data["test"], 10, params=params)
    D_ref, I_ref = data["flat"].search(data["test"], 10)
    np.testing.assert_allclose(D, D_ref, rtol=1e-5, atol=1e-4)
    assert (I == I_ref).mean() > 0.999  # (ties may swap)


def test_target_recall_holds_for_the_merged_answer(sharded, data):
    exact = data["flat"].search(data["test"], 1)[0][:, 0]
    for target in (0.9, 0.99):
        _, I = sharded.search(data["test"], 1, params=af.SearchParametersAMIPS(target_recall=target))
        rate = match_rate(found_scores(data["keys"], data["test"], I[:, 0]), exact)
        sigma = np.sqrt(target * (1 - target) / len(exact))
        assert rate >= target - 3 * sigma - 0.01, (target, rate)


def test_range_split_keeps_user_ids_and_filters(cluster, data):
    with ShardedIndexAMIPS(D_, 8, 2, split="range", cpus_per_shard=HALF) as index:
        _check_range_split(index, data)


def _check_range_split(index, data):
    index.train(data["keys"], data["train"], **TRAIN)
    ids = 10**12 + 7 * np.arange(len(data["keys"]))
    index.add_with_ids(data["keys"], ids)
    assert [i["ntotal"] for i in index.shard_info()] == [1500, 1500]
    exact = af.SearchParametersAMIPS(margin=-np.inf, fallback="exact")
    D, I = index.search(data["test"][:50], 3, params=exact)
    D_ref, I_ref = data["flat"].search(data["test"][:50], 3)
    np.testing.assert_array_equal(I, ids[I_ref])
    allowed = ids[::10]
    _, I = index.search(data["test"][:50], 3, params=af.SearchParametersAMIPS(sel=allowed, margin=-np.inf,
                                                                             fallback="exact"))
    assert np.isin(I, allowed).all()
    assert index.remove_ids(ids[:100]) == 100 and index.ntotal == 2900
    with pytest.raises(TypeError, match="array of allowed ids"):
        index.search(data["test"][:5], 3, params=af.SearchParametersAMIPS(sel=faiss.IDSelectorRange(0, 10)))


def test_save_load_and_corrupt_manifest(sharded, data, tmp_path):
    sharded.save(str(tmp_path))
    with ShardedIndexAMIPS.load(str(tmp_path)) as loaded:
        assert loaded.ntotal == sharded.ntotal and loaded.cpus_per_shard == HALF
        for a, b in zip(loaded.search(data["test"], 3), sharded.search(data["test"], 3)):
            np.testing.assert_array_equal(a, b)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "files": manifest["files"][:1]}))
    with pytest.raises(ValueError, match="file list"):
        ShardedIndexAMIPS.load(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        ShardedIndexAMIPS.load(str(tmp_path))
    os.remove(tmp_path / "manifest.json")
    with pytest.raises(FileNotFoundError, match="manifest"):
        ShardedIndexAMIPS.load(str(tmp_path))


def test_dead_shard_raises_then_reloads_its_file(cluster, data, tmp_path):
    with ShardedIndexAMIPS(D_, 8, 2, cpus_per_shard=HALF) as index:
        _check_dead_shard(index, data, tmp_path)


def _check_dead_shard(index, data, tmp_path):
    index.train(data["keys"], data["train"], **TRAIN)
    index.add(data["keys"])
    index.save(str(tmp_path))
    before = index.search(data["test"], 3)
    ray.kill(index.actors[1])
    with pytest.raises(ShardError, match="shard 1 died during search.*restarts it from"):
        index.search(data["test"], 3)
    after = index.search(data["test"], 3)  # restarted from its file, which is current
    for a, b in zip(after, before):
        np.testing.assert_array_equal(a, b)
    index.add(data["keys"][:10])  # the files are now stale
    ray.kill(index.actors[0])
    with pytest.raises(ShardError, match="shard 0 died.*no saved copy"):
        index.search(data["test"], 3)
    with pytest.raises(ShardError, match="shard 0 is dead"):
        index.search(data["test"], 3)


def test_bad_arguments_are_refused(cluster, data):
    with pytest.raises(ValueError, match="unknown split"):
        ShardedIndexAMIPS(D_, 8, 2, split="modulo")
    with pytest.raises(ValueError, match="n_shards"):
        ShardedIndexAMIPS(D_, 8, 0)
    with pytest.raises(ValueError, match="unknown router"):
        ShardedIndexAMIPS(D_, 8, 2, router="magic")
    with pytest.raises(ValueError, match="cpus_per_shard"):
        ShardedIndexAMIPS(D_, 8, 2, cpus_per_shard=0)
    with ShardedIndexAMIPS(D_, 64, 2, cpus_per_shard=HALF) as index:
        with pytest.raises(ValueError, match="fewer than nlist"):
            index.train(data["keys"][:100], data["train"])
        with pytest.raises(ValueError, match="dimension|d="):
            index.add(data["keys"][:, :8])
        with pytest.raises(TypeError, match="unknown training option"):
            index.train(data["keys"], data["train"], stepz=3)
        with pytest.raises(ValueError, match="target_recall"):
            index.train(data["keys"], data["train"], target_recall=1.5)
        with pytest.raises(ValueError, match="validation queries"):  # refused by the shards themselves
            index.train(data["keys"], data["train"], **{**TRAIN, "n_validation": 0})
        with pytest.raises(RuntimeError, match="search before train"):  # not "restarted from an older state"
            index.search(data["test"][:5], 3)
