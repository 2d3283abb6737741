import math
import threading

import faiss
import numpy as np
import pytest

import amips_faiss as af
from amips_faiss.metrics import found_scores, match_rate
from amips_faiss.scan import EMPTY_SCORE, scan_by_list, scan_dense, scan_preassigned

from .conftest import D, NLIST

FIXED = math.inf  # margin = inf: fixed probing, as faiss IVF does


def _match(data, I):
    return match_rate(found_scores(data["keys"], data["test"], I[:, 0]), data["exact"].values)


def test_centroid_router_returns_exactly_faiss_ivfflat(synthetic, trained):
    index = trained("centroid", synthetic)
    ivf = faiss.IndexIVFFlat(index.ivf.quantizer, D, NLIST, faiss.METRIC_INNER_PRODUCT)
    ivf.add(synthetic["keys"])
    for nprobe in (1, 3, 17):
        ivf.nprobe = nprobe
        D_ref, I_ref = ivf.search(synthetic["test"], 10)
        params = af.SearchParametersAMIPS(nprobe=nprobe, margin=FIXED, scan="faiss")
        D_ours, I_ours = index.search(synthetic["test"], 10, params)
        np.testing.assert_array_equal(I_ours, I_ref)
        np.testing.assert_array_equal(D_ours, D_ref)


@pytest.mark.parametrize("k", [1, 10, 500])
@pytest.mark.parametrize("blas_scan", [scan_by_list, scan_dense])
def test_blas_scans_give_faiss_answers(synthetic, trained, k, blas_scan):
    """The BLAS scans (pairs grouped by list, or all queries × touched lists, masked) find the same
    keys as faiss's scan, up to float rounding; lists shorter than k, −1 entries in the plan included."""
    index = trained("centroid", synthetic)
    xq = synthetic["test"][:300]
    _, lists = index.router.route(xq, 12)
    lists[::7, 3:] = -1  # some queries probe fewer lists
    coarse = np.zeros(lists.shape, np.float32)
    D_ref, I_ref = scan_preassigned(index.ivf, xq, k, lists, coarse)
    D_ours, I_ours = blas_scan(index.ivf, xq, k, lists)
    np.testing.assert_allclose(D_ours, D_ref, rtol=1e-5, atol=1e-4)
    found = D_ref > EMPTY_SCORE
    assert (I_ours[~found] == -1).all() and (~found).any() == (k == 500)
    # ids may only differ between keys of equal score
    rows = np.nonzero((I_ours != I_ref) & found)[0]
    assert len(rows) <= 0.01 * found.sum()
    with pytest.raises(ValueError, match="scan"):
        index.search(xq, 5, af.SearchParametersAMIPS(scan="simd"))


@pytest.mark.parametrize("router", ["centroid", "supportnet"])
def test_exact_fallback_at_zero_confidence_is_exact_search(synthetic, trained, router):
    index = trained(router, synthetic)
    flat = faiss.IndexFlatIP(D)
    flat.add(synthetic["keys"])
    D_ref, I_ref = flat.search(synthetic["test"], 5)
    params = af.SearchParametersAMIPS(nprobe=2, max_nprobe=4, margin=-math.inf, fallback="exact")
    D_ours, I_ours = index.search(synthetic["test"], 5, params)
    np.testing.assert_array_equal(I_ours, I_ref)
    np.testing.assert_allclose(D_ours, D_ref, rtol=1e-5)
    assert index.stats.fallback_share == 1.0


@pytest.mark.parametrize("kind", ["IVF64,Flat", "IVF64,PQ8x4fs", "IVF64,SQ8"])
def test_from_ivf_matches_the_wrapped_index_at_centroid_routing(synthetic, kind):
    user = faiss.index_factory(D, kind, faiss.METRIC_INNER_PRODUCT)
    user.train(synthetic["keys"])
    user.add(synthetic["keys"])
    faiss.extract_index_ivf(user).nprobe = 6
    D_ref, I_ref = user.search(synthetic["test"][:500], 5)
    index = af.IndexAMIPS.from_ivf(user, router="centroid")
    index.nprobe = 6
    D_ours, I_ours = index.search(synthetic["test"][:500], 5)
    assert index.ntotal == user.ntotal
    np.testing.assert_array_equal(I_ours, I_ref)
    np.testing.assert_allclose(D_ours, D_ref, rtol=1e-5)


def test_from_ivf_learned_router_over_pq_keeps_the_users_codes(synthetic):
    user = faiss.index_factory(D, "IVF256,PQ16", faiss.METRIC_INNER_PRODUCT)
    user.train(synthetic["keys"])
    user.add(synthetic["keys"])
    index = af.IndexAMIPS.from_ivf(user, router="supportnet")
    index.train(queries=synthetic["train"], steps=400, progress=False)
    assert index.ntotal == user.ntotal and index.buffer.ntotal == 0
    # the best answer the user's own PQ codes allow: every list scanned
    _, I_all = index.search(synthetic["test"], 1, af.SearchParametersAMIPS(margin=-math.inf, fallback="exact"))
    _, I = index.search(synthetic["test"], 1, af.SearchParametersAMIPS(nprobe=1, margin=FIXED))
    centroid = af.IndexAMIPS.from_ivf(user, router="centroid")
    _, I_c = centroid.search(synthetic["test"], 1, af.SearchParametersAMIPS(nprobe=1, margin=FIXED))
    assert np.mean(I == I_all) > np.mean(I_c == I_all) + 0.05


@pytest.mark.parametrize("router", ["supportnet", "keynet", "linear"])
def test_learned_routers_beat_centroids_at_equal_nprobe(synthetic, trained, router):
    index = trained(router, synthetic)
    centroid = trained("centroid", synthetic)
    for nprobe in (1, 2):
        params = af.SearchParametersAMIPS(nprobe=nprobe, margin=FIXED)
        assert _match(synthetic, index.search(synthetic["test"], 1, params)[1]) > \
            _match(synthetic, centroid.search(synthetic["test"], 1, params)[1]) + 0.02


@pytest.mark.parametrize("target", [0.95, 0.99])
def test_target_recall_is_met_with_fewer_lists_than_centroid_routing(synthetic, trained, target):
    index = trained("supportnet", synthetic)
    _, I = index.search(synthetic["test"], 1, af.SearchParametersAMIPS(target_recall=target))
    n = len(synthetic["test"])
    assert _match(synthetic, I) >= target - 2 * math.sqrt(target * (1 - target) / n)
    lists_used = index.stats.mean_lists_probed
    centroid = trained("centroid", synthetic)
    needed = next(p for p in range(1, NLIST + 1) if _match(
        synthetic, centroid.search(synthetic["test"], 1, af.SearchParametersAMIPS(nprobe=p, margin=FIXED))[1]) >= target)
    assert lists_used < needed


def test_fallback_ivf_and_none_are_calibrated_per_setting(synthetic, trained):
    index = trained("supportnet", synthetic)
    settings = {"fallback": "exact", "max_nprobe": 2, "blend": 0.0}
    tau_exact, _, _ = index.calibrate_margin(0.99, index._resolve(af.SearchParametersAMIPS(**settings)))
    settings["fallback"] = "none"
    tau_none, _, _ = index.calibrate_margin(0.99, index._resolve(af.SearchParametersAMIPS(**settings)))
    assert tau_exact >= tau_none
    _, I = index.search(synthetic["test"], 1, af.SearchParametersAMIPS(target_recall=0.9, fallback="ivf", fallback_nprobe=40))
    assert _match(synthetic, I) >= 0.88


def test_save_load_gives_identical_answers(synthetic, trained, tmp_path):
    for router in ("supportnet", "keynet"):
        index = trained(router, synthetic)
        path = str(tmp_path / f"{router}.amips")
        af.write_index(index, path)
        loaded = af.read_index(path)
        assert loaded.ntotal == index.ntotal and loaded.router_name == router
        for params in (None, af.SearchParametersAMIPS(nprobe=3, margin=FIXED)):
            D1, I1 = index.search(synthetic["test"], 5, params)
            D2, I2 = loaded.search(synthetic["test"], 5, params)
            np.testing.assert_array_equal(I1, I2)
            np.testing.assert_array_equal(D1, D2)


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


def test_a_new_key_that_wins_many_queries_is_found(synthetic, trained):
    index = trained("supportnet", synthetic)
    direction = synthetic["test"][:200].mean(axis=0)
    winner = (direction / np.linalg.norm(direction) * 1e4).astype(np.float32)[None, :]
    index.add_with_ids(winner, np.array([999_999]))
    try:
        assert index.buffer.ntotal == 1
        _, I = index.search(synthetic["test"][:200], 1, af.SearchParametersAMIPS(nprobe=1, margin=FIXED))
        wins = (synthetic["test"][:200] @ winner[0]) > synthetic["exact"].values[:200]
        assert wins.sum() > 100
        assert (I[wins, 0] == 999_999).all()
        np.testing.assert_array_equal(index.reconstruct(999_999), winner[0])
    finally:
        assert index.remove_ids(np.array([999_999])) == 1
    assert index.buffer.ntotal == 0


def test_refit_moves_buffered_keys_into_lists(synthetic):
    keys = synthetic["keys"]
    index = af.IndexAMIPS(D, 64, router="linear")
    index.train(keys[:10_000], synthetic["train"][:3000], steps=200, progress=False)
    index.add(keys[:10_000])
    index.add(keys[10_000:])
    assert index.buffer.ntotal == 10_000 and index.ntotal == 20_000
    index.refit(synthetic["train"][:3000], steps=200, progress=False)
    assert index.buffer.ntotal == 0 and index.ntotal == 20_000
    _, I = index.search(synthetic["test"], 1, af.SearchParametersAMIPS(target_recall=0.95))
    assert _match(synthetic, I) >= 0.93


def test_faiss_semantics_ids_padding_reset(synthetic):
    keys = synthetic["keys"][:3000]
    index = af.IndexAMIPS(D, 16, router="centroid")
    with pytest.raises(RuntimeError, match="before train"):
        index.search(keys[:2], 1)
    index.train(keys, synthetic["train"][:500], progress=False)
    assert index.is_trained and index.ntotal == 0 and index.metric_type == faiss.METRIC_INNER_PRODUCT
    D0, I0 = index.search(keys[:2], 3)
    assert (I0 == -1).all() and D0.dtype == np.float32 and I0.dtype == np.int64
    ids = np.arange(3000, dtype=np.int64) * 7 + 5
    index.add_with_ids(keys, ids)
    Dk, Ik = index.search(keys[:50].astype(np.float64)[:, ::1], 4, af.SearchParametersAMIPS(margin=-math.inf))
    assert np.isin(Ik, ids).all() and (np.diff(Dk, axis=1) <= 0).all()
    np.testing.assert_array_equal(index.reconstruct(int(ids[17])), keys[17])
    with pytest.raises(KeyError, match="not in the index"):
        index.reconstruct(6)
    assert index.remove_ids(ids[:10]) == 10 and index.ntotal == 2990
    index.reset()
    assert index.ntotal == 0 and index.is_trained
    D_few, I_few = af.IndexAMIPS.search(index, keys[:1], 5)
    assert (I_few == -1).all() and (D_few == np.finfo(np.float32).min).all()


def test_bad_input_raises_clear_errors(synthetic, trained):
    index = trained("supportnet", synthetic)
    q = synthetic["test"][:4]
    cases = [
        (lambda: index.search(q[:, :5], 1), ValueError, "dimension 5"),
        (lambda: index.search(q[0], 1), ValueError, "2-D"),
        (lambda: index.search(np.where(np.eye(4, D) > 0, np.nan, q), 1), ValueError, "NaN"),
        (lambda: index.search(q, 0), ValueError, "k must be positive"),
        (lambda: index.search(q, 2.5), TypeError, "k must be an integer"),
        (lambda: index.search(q[:0], 1), ValueError, "empty"),
        (lambda: index.search("abc", 1), TypeError, "2-D array"),
        (lambda: index.search(q, 1, {"nprobe": 2}), TypeError, "SearchParametersAMIPS"),
        (lambda: index.search(q, 1, af.SearchParametersAMIPS(nprobe=10**6)), ValueError, "nprobe"),
        (lambda: index.search(q, 1, af.SearchParametersAMIPS(fallback="maybe")), ValueError, "fallback"),
        (lambda: index.search(q, 1, af.SearchParametersAMIPS(target_recall=1.5)), ValueError, "target_recall"),
        (lambda: index.search(q, 1, af.SearchParametersAMIPS(blend=2.0)), ValueError, "blend"),
        (lambda: af.IndexAMIPS(D, 8).train(synthetic["keys"], transplant=-1), ValueError, "transplant"),
        (lambda: index.add_with_ids(q, np.arange(3)), ValueError, "3 entries for 4"),
        (lambda: index.add_with_ids(q, np.array([1, 2, -3, 4])), ValueError, "non-negative"),
        (lambda: index.reconstruct(123_456_789), KeyError, "not in the index"),
        (lambda: af.IndexAMIPS(D, 4, router="magic"), ValueError, "unknown router"),
        (lambda: af.IndexAMIPS(D, 0), ValueError, "nlist"),
        (lambda: af.IndexAMIPS.from_ivf(faiss.IndexFlatIP(D)), TypeError, "IVF"),
        (lambda: af.IndexAMIPS(D, 64).train(synthetic["keys"][:10]), ValueError, "at least nlist"),
        (lambda: af.write_index("not an index", "/tmp/x"), TypeError, "IndexAMIPS"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()


def test_concurrent_searches_agree_with_serial(synthetic, trained):
    index = trained("supportnet", synthetic)
    expect = index.search(synthetic["test"], 3)
    results, errors = [None] * 4, []

    def run(i):
        try:
            results[i] = index.search(synthetic["test"], 3)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for D_, I_ in results:
        np.testing.assert_array_equal(I_, expect[1])


def test_predict_is_the_model_answer(synthetic, trained):
    index = trained("supportnet", synthetic)
    scores, ids = index.predict(synthetic["test"])
    assert scores.shape == ids.shape == (len(synthetic["test"]),)
    exact = synthetic["exact"].values
    # trained with a ranking loss, the router's values are a ranking first and an estimate second
    assert np.median(np.abs(scores - exact) / np.abs(exact)) < 0.25
    assert _match(synthetic, ids[:, None]) > 0.8


def test_set_num_threads():
    af.set_num_threads(1)
    assert faiss.omp_get_max_threads() == 1
    af.set_num_threads(2)
    with pytest.raises(ValueError):
        af.set_num_threads(0)
