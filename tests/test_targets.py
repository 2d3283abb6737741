import numpy as np
import pytest

from amips_faiss.data import load_folder, make_clustered
from amips_faiss.metrics import match_rate, recall_at_k
from amips_faiss.targets import augment_queries, split_queries, support_values, transplant_queries


def test_support_values_match_brute_force_unnormalised_with_empty_lists():
    keys, queries = make_clustered(900, 70, 8, n_clusters=5, seed=3)
    norms = np.linalg.norm(keys, axis=1)
    assert norms.max() / norms.min() > 50
    nlist = 12
    assign = np.random.default_rng(0).integers(0, nlist - 3, len(keys))  # lists 9..11 stay empty
    t = support_values(keys, queries, assign, nlist, block_size=16, progress=False)
    scores = queries.astype(np.float64) @ keys.T.astype(np.float64)
    np.testing.assert_allclose(t.values, scores.max(axis=1), rtol=1e-5)
    assert (t.ids == scores.argmax(axis=1)).all()
    for c in range(nlist):
        members = assign == c
        expect = scores[:, members].max(axis=1) if members.any() else np.full(len(queries), -np.inf)
        np.testing.assert_allclose(t.cluster_values[:, c], expect, rtol=1e-5)
    assert np.isneginf(t.cluster_values[:, nlist - 3:]).all()
    plain = support_values(keys, queries, progress=False)
    assert (plain.ids == t.ids).all() and plain.cluster_values is None


def test_support_values_rejects_bad_assignments():
    keys, queries = make_clustered(100, 10, 4, n_clusters=2)
    with pytest.raises(ValueError, match="assign"):
        support_values(keys, queries, np.zeros(99, int), 3, progress=False)
    with pytest.raises(ValueError, match="outside"):
        support_values(keys, queries, np.full(100, 5), 3, progress=False)
    with pytest.raises(ValueError, match="dimension"):
        support_values(keys, queries[:, :3], progress=False)


def test_split_has_no_leakage_even_with_duplicate_rows():
    q = np.random.default_rng(0).standard_normal((1000, 6)).astype(np.float32)
    q[500:600] = q[:100]  # exact duplicates
    parts = split_queries(q, {"train": 0.6, "calibration": 0.2, "test": 0.2}, seed=1)
    all_rows = np.concatenate(list(parts.values()))
    assert len(all_rows) == len(np.unique(all_rows)) == 1000
    as_set = {name: {r.tobytes() for r in q[rows]} for name, rows in parts.items()}
    assert not (as_set["train"] & as_set["test"]) and not (as_set["train"] & as_set["calibration"])
    assert abs(len(parts["test"]) - 200) < 40
    with pytest.raises(ValueError):
        split_queries(q, {"a": 0.8, "b": 0.5})


def test_augmentation_keeps_originals_and_scales_noise_with_norm():
    q = np.array([[1.0, 0, 0], [0, 100.0, 0]], np.float32)
    out = augment_queries(q, 3, sigma=0.02, seed=0)
    assert out.shape == (8, 3)
    np.testing.assert_array_equal(out[:2], q)
    noise = (out[2:] - np.tile(q, (3, 1))).reshape(3, 2, 3)
    ratio = np.linalg.norm(noise[:, 1], axis=1).mean() / np.linalg.norm(noise[:, 0], axis=1).mean()
    assert 30 < ratio < 300


def test_metrics():
    assert match_rate(np.array([1.0, 0.5, 2.0]), np.array([1.0, 1.0, 2.0])) == pytest.approx(2 / 3)
    assert recall_at_k(np.array([[1, 2], [3, -1]]), np.array([[2, 1], [3, 4]])) == pytest.approx(0.75)


def test_load_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_folder(str(tmp_path / "nope"))
    np.save(tmp_path / "keys.npy", np.zeros((3, 4), np.float16))
    with pytest.raises(FileNotFoundError, match="queries file not found"):
        load_folder(str(tmp_path))
    np.save(tmp_path / "queries.npy", np.zeros((3, 5), np.float16))
    with pytest.raises(ValueError, match="4-d"):
        load_folder(str(tmp_path))
    np.save(tmp_path / "queries.npy", np.zeros((2, 4), np.float16))
    keys, queries = load_folder(str(tmp_path))
    assert keys.dtype == np.float32 and queries.shape == (2, 4)


def test_transplanted_queries_keep_query_norms_and_offsets():
    keys, queries = make_clustered(2000, 500, 16, seed=3)
    answers = support_values(keys, queries, progress=False).ids
    synthetic = transplant_queries(keys, queries, answers, 300, seed=1)
    assert synthetic.shape == (300, 16) and synthetic.dtype == np.float32
    unit_keys = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    # a query lying on its answer's direction has no offset: its transplants lie on key directions
    on_key = np.linalg.norm(queries, axis=1, keepdims=True) * unit_keys[answers]
    moved = transplant_queries(keys, on_key, answers, 300, seed=1)
    cosine = (moved / np.linalg.norm(moved, axis=1, keepdims=True)) @ unit_keys.T
    np.testing.assert_allclose(cosine.max(axis=1), 1.0, atol=1e-5)
    q_norms = np.linalg.norm(queries, axis=1)
    assert np.isclose(np.linalg.norm(moved, axis=1)[:, None], q_norms[None, :], rtol=1e-5).any(axis=1).all()
    with pytest.raises(ValueError, match="answer_ids"):
        transplant_queries(keys, queries, answers[:-1], 10)
    with pytest.raises(ValueError, match="answer_ids"):
        transplant_queries(keys, queries, answers + len(keys), 10)
