import math
import threading
import time

import faiss
import numpy as np
import pytest

import amips_faiss as af
from amips_faiss import probing
from amips_faiss.confidence import ROUND_COST_LISTS
from amips_faiss.metrics import found_scores, match_rate
from amips_faiss.routing import Router

from .conftest import D, NLIST, copy_of

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
        params = af.SearchParametersAMIPS(nprobe=nprobe, margin=FIXED, scan_method="faiss")
        D_ours, I_ours = index.search(synthetic["test"], 10, params=params)
        np.testing.assert_array_equal(I_ours, I_ref)
        np.testing.assert_array_equal(D_ours, D_ref)


@pytest.mark.parametrize("router", ["centroid", "supportnet"])
def test_exact_fallback_at_zero_confidence_is_exact_search(synthetic, trained, router):
    index = trained(router, synthetic)
    flat = faiss.IndexFlatIP(D)
    flat.add(synthetic["keys"])
    D_ref, I_ref = flat.search(synthetic["test"], 5)
    params = af.SearchParametersAMIPS(nprobe=2, max_nprobe=4, margin=-math.inf, fallback="exact")
    D_ours, I_ours = index.search(synthetic["test"], 5, params=params)
    np.testing.assert_array_equal(I_ours, I_ref)
    np.testing.assert_allclose(D_ours, D_ref, rtol=1e-5)
    assert index.stats.fallback_share == 1.0


@pytest.mark.parametrize("filtered", [False, True])
def test_every_scan_method_gives_the_same_rounds_and_answers(synthetic, trained, filtered):
    """Later rounds scanned by BLAS above each query's floor (or list by list) give faiss's
    answers and lists, with and without a filter."""
    index = trained("supportnet", synthetic)
    q = synthetic["test"][:400]
    sel = faiss.IDSelectorBatch(np.arange(0, len(synthetic["keys"]), 2)) if filtered else None
    results = {}
    for method in ("faiss", "blas", "auto"):
        params = af.SearchParametersAMIPS(nprobe=1, max_nprobe=16, margin=-math.inf, fallback="exact",
                                          scan_method=method, sel=sel)
        results[method] = index.search(q, 10, params=params), index.stats.mean_lists_probed
    (D_ref, I_ref), lists_ref = results.pop("faiss")
    if filtered:
        assert (I_ref % 2 == 0).all()
    for (D_m, I_m), lists in results.values():
        np.testing.assert_allclose(D_m, D_ref, rtol=1e-5, atol=1e-5)
        assert np.mean(I_m == I_ref) > 0.999 and lists == lists_ref


def test_target_recall_one_with_exact_fallback_is_exact_search(synthetic, trained):
    """A target no calibration sample can certify means "never sure": all queries fall back."""
    index = trained("supportnet", synthetic)
    flat = faiss.IndexFlatIP(D)
    flat.add(synthetic["keys"])
    _, I_ref = flat.search(synthetic["test"], 1)
    D_ours, I_ours = index.search(synthetic["test"], 1, params=af.SearchParametersAMIPS(target_recall=1.0))
    assert _match(synthetic, I_ours) == 1.0 and index.stats.fallback_share == 1.0
    assert np.mean(I_ours == I_ref) > 0.999  # ids may differ only between keys of equal score


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


@pytest.mark.slow
def test_from_ivf_learned_router_over_pq_keeps_the_users_codes(synthetic):
    user = faiss.index_factory(D, "IVF256,PQ16", faiss.METRIC_INNER_PRODUCT)
    user.train(synthetic["keys"])
    user.add(synthetic["keys"])
    index = af.IndexAMIPS.from_ivf(user, router="supportnet")
    index.train(queries=synthetic["train"], steps=400, progress=False)
    assert index.ntotal == user.ntotal and index.buffer.ntotal == 0
    # the best answer the user's own PQ codes allow: every list scanned
    _, I_all = index.search(synthetic["test"], 1, params=af.SearchParametersAMIPS(margin=-math.inf, fallback="exact"))
    _, I = index.search(synthetic["test"], 1, params=af.SearchParametersAMIPS(nprobe=1, margin=FIXED))
    centroid = af.IndexAMIPS.from_ivf(user, router="centroid")
    _, I_c = centroid.search(synthetic["test"], 1, params=af.SearchParametersAMIPS(nprobe=1, margin=FIXED))
    assert np.mean(I == I_all) > np.mean(I_c == I_all) + 0.05


@pytest.mark.slow
@pytest.mark.parametrize("router", ["supportnet", "keynet", "linear"])
def test_learned_routers_beat_centroids_at_equal_nprobe(synthetic, trained, router):
    index = trained(router, synthetic)
    centroid = trained("centroid", synthetic)
    for nprobe in (1, 2):
        params = af.SearchParametersAMIPS(nprobe=nprobe, margin=FIXED)
        assert _match(synthetic, index.search(synthetic["test"], 1, params=params)[1]) > \
            _match(synthetic, centroid.search(synthetic["test"], 1, params=params)[1]) + 0.02


@pytest.mark.parametrize("target", [0.95, 0.99])
def test_target_recall_is_met_with_fewer_lists_than_centroid_routing(synthetic, trained, target):
    index = trained("supportnet", synthetic)
    _, I = index.search(synthetic["test"], 1, params=af.SearchParametersAMIPS(target_recall=target))
    n = len(synthetic["test"])
    assert _match(synthetic, I) >= target - 2 * math.sqrt(target * (1 - target) / n)
    lists_used = index.stats.mean_lists_probed
    centroid = trained("centroid", synthetic)
    needed = next(p for p in range(1, NLIST + 1) if _match(
        synthetic, centroid.search(synthetic["test"], 1, params=af.SearchParametersAMIPS(nprobe=p, margin=FIXED))[1]) >= target)
    assert lists_used < needed


def test_train_picks_the_cheapest_first_round_on_calibration_queries(synthetic, trained):
    """nprobe after train: the first-round size reaching the target on the calibration queries at
    the fewest lists + ROUND_COST_LISTS · rounds; its expected lists are what test queries cost."""
    index = trained("supportnet", synthetic)
    summary = index.train_summary["first_round"]
    costs = {int(n): c["lists"] + ROUND_COST_LISTS * c["rounds"]
             for n, c in summary["candidates"].items() if c["recall"] >= 0.95}
    assert index.nprobe == summary["nprobe"] == min(costs, key=costs.get) and len(summary["candidates"]) >= 4
    _, I = index.search(synthetic["test"], 1)
    assert _match(synthetic, I) >= 0.95 - 3 * math.sqrt(0.95 * 0.05 / len(I))
    assert index.stats.mean_lists_probed == pytest.approx(summary["candidates"][str(index.nprobe)]["lists"], rel=0.3)
    assert copy_of(index).nprobe == index.nprobe  # saved with the index


def test_fallback_ivf_and_none_are_calibrated_per_setting(synthetic, trained):
    index = trained("supportnet", synthetic)
    settings = {"fallback": "exact", "max_nprobe": 2, "blend": 0.0}
    exact = index.calibrate_margin(0.99, af.SearchParametersAMIPS(**settings))
    settings["fallback"] = "none"
    with pytest.warns(UserWarning, match="out of reach"):
        none = index.calibrate_margin(0.99, af.SearchParametersAMIPS(**settings))
    assert exact.margin >= none.margin and exact.recall >= 0.99 > none.recall
    _, I = index.search(synthetic["test"], 1, params=af.SearchParametersAMIPS(target_recall=0.9, fallback="ivf", fallback_nprobe=40))
    assert _match(synthetic, I) >= 0.88


def test_a_new_key_that_wins_many_queries_is_found(synthetic, trained):
    index = copy_of(trained("supportnet", synthetic))
    direction = synthetic["test"][:200].mean(axis=0)
    winner = (direction / np.linalg.norm(direction) * 1e4).astype(np.float32)[None, :]
    index.add_with_ids(winner, np.array([999_999]))
    assert index.buffer.ntotal == 1
    _, I = index.search(synthetic["test"][:200], 1, params=af.SearchParametersAMIPS(nprobe=1, margin=FIXED))
    wins = (synthetic["test"][:200] @ winner[0]) > synthetic["exact"].values[:200]
    assert wins.sum() > 100
    assert (I[wins, 0] == 999_999).all()
    np.testing.assert_array_equal(index.reconstruct(999_999), winner[0])
    assert index.remove_ids(np.array([999_999])) == 1 and index.buffer.ntotal == 0


def _small_linear_index(synthetic):
    keys = synthetic["keys"]
    index = af.IndexAMIPS(D, 64, router="linear")
    index.train(keys[:10_000], synthetic["train"][:3000], steps=200, progress=False)
    index.add(keys[:10_000])
    index.add(keys[10_000:])
    return index


def test_refit_moves_buffered_keys_into_lists(synthetic):
    index = _small_linear_index(synthetic)
    assert index.buffer.ntotal == 10_000 and index.ntotal == 20_000
    index.refit(synthetic["train"][:3000], steps=200, progress=False)
    assert index.buffer.ntotal == 0 and index.ntotal == 20_000
    _, I = index.search(synthetic["test"], 1, params=af.SearchParametersAMIPS(target_recall=0.95))
    assert _match(synthetic, I) >= 0.93


@pytest.mark.parametrize("queries, options, error", [
    ("bad", {}, TypeError),
    (np.zeros((10, D + 1), np.float32), {}, ValueError),
    (np.full((10, D), np.nan, np.float32), {}, ValueError),
    (None, {"augment": -1}, ValueError),
    (None, {"n_calibration": 2.5}, ValueError),
    (None, {"n_validation": 0}, ValueError),
    (None, {"steps": 0}, ValueError),
    (None, {"batch_size": "big"}, ValueError),
    (None, {"stpes": 10}, TypeError),
])
def test_refit_with_a_bad_argument_changes_nothing(synthetic, queries, options, error):
    index = _small_linear_index(synthetic)
    state = (index.buffer.ntotal, index.ivf.ntotal, index.router, index.n_calibration)
    with pytest.raises(error):
        index.refit(queries, **options)
    assert (index.buffer.ntotal, index.ivf.ntotal, index.router, index.n_calibration) == state


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
    strided = np.repeat(keys[:50].astype(np.float64), 2, axis=1)[:, ::2]  # a non-contiguous float64 view
    assert not strided.flags.c_contiguous
    Dk, Ik = index.search(strided, 4, params=af.SearchParametersAMIPS(margin=-math.inf))
    np.testing.assert_array_equal(Ik, index.search(np.ascontiguousarray(strided, np.float32), 4,
                                                   params=af.SearchParametersAMIPS(margin=-math.inf))[1])
    flat = faiss.IndexFlatIP(D)
    flat.add(keys)
    assert np.isin(Ik, ids).all() and (np.diff(Dk, axis=1) <= 0).all()
    assert (Ik[:, 0] == ids[flat.search(keys[:50], 1)[1][:, 0]]).all()  # exact answers, user ids
    np.testing.assert_array_equal(index.reconstruct(int(ids[17])), keys[17])
    with pytest.raises(KeyError, match="not in the index"):
        index.reconstruct(6)
    assert index.remove_ids(ids[:10]) == 10 and index.ntotal == 2990
    index.reset()
    assert index.ntotal == 0 and index.is_trained
    D_few, I_few = index.search(keys[:1], 5)
    assert (I_few == -1).all() and (D_few == np.finfo(np.float32).min).all()


@pytest.mark.parametrize("router", ["centroid", "supportnet"])
def test_empty_batches_behave_as_in_faiss(synthetic, trained, router):
    index = copy_of(trained(router, synthetic))
    for params in (None, af.SearchParametersAMIPS(target_recall=0.99), af.SearchParametersAMIPS(margin=-math.inf)):
        D_, I_ = index.search(np.zeros((0, D), np.float32), 7, params=params)
        assert D_.shape == I_.shape == (0, 7) and D_.dtype == np.float32 and I_.dtype == np.int64
    flat_D, flat_I = faiss.IndexFlatIP(D).search(np.zeros((0, D), np.float32), 7)
    assert flat_D.shape == D_.shape and flat_I.shape == I_.shape
    scores, ids = index.predict(np.zeros((0, D), np.float32))
    assert scores.shape == ids.shape == (0,)
    before = index.ntotal
    index.add(np.zeros((0, D), np.float32))
    index.add_with_ids(np.zeros((0, D), np.float32), np.zeros(0, np.int64))
    assert index.ntotal == before
    with pytest.raises(ValueError, match="dimension"):
        index.search(np.zeros((0, D + 1), np.float32), 1)
    with pytest.raises(ValueError, match="k must be positive"):
        index.search(np.zeros((0, D), np.float32), 0)
    with pytest.raises(ValueError, match="empty"):
        af.IndexAMIPS(D, 8).train(np.zeros((0, D), np.float32))
    with pytest.raises(ValueError, match="empty"):
        index.refit(np.zeros((0, D), np.float32))


def _bad_calls(index, q, tmp_path):
    return {
        "wrong dimension": (lambda: index.search(q[:, :5], 1), ValueError, "dimension 5"),
        "1-D query": (lambda: index.search(q[0], 1), ValueError, "2-D"),
        "NaN": (lambda: index.search(np.where(np.eye(4, D) > 0, np.nan, q), 1), ValueError, "NaN"),
        "k = 0": (lambda: index.search(q, 0), ValueError, "k must be positive"),
        "float k": (lambda: index.search(q, 2.5), TypeError, "k must be an integer"),
        "string query": (lambda: index.search("abc", 1), TypeError, "2-D array"),
        "params positional": (lambda: index.search(q, 1, af.SearchParametersAMIPS()), TypeError, "positional"),
        "params dict": (lambda: index.search(q, 1, params={"nprobe": 2}), TypeError, "SearchParametersAMIPS"),
        "fallback": (lambda: af.SearchParametersAMIPS(fallback="maybe"), ValueError, "fallback"),
        "target_recall": (lambda: af.SearchParametersAMIPS(target_recall=1.5), ValueError, "target_recall"),
        "blend": (lambda: af.SearchParametersAMIPS(blend=2.0), ValueError, "blend"),
        "margin NaN": (lambda: af.SearchParametersAMIPS(margin=float("nan")), ValueError, "margin"),
        "nprobe 0": (lambda: af.SearchParametersAMIPS(nprobe=0), ValueError, "nprobe"),
        "scan_method": (lambda: af.SearchParametersAMIPS(scan_method="simd"), ValueError, "scan_method"),
        "params typo": (lambda: af.SearchParametersAMIPS(n_probe=3), TypeError, "n_probe"),
        "transplant": (lambda: af.IndexAMIPS(D, 8).train(np.ones((20, D)), transplant=-1), ValueError, "transplant"),
        "ids count": (lambda: index.add_with_ids(q, np.arange(3)), ValueError, "3 entries for 4"),
        "negative id": (lambda: index.add_with_ids(q, np.array([1, 2, -3, 4])), ValueError, "non-negative"),
        "unknown id": (lambda: index.reconstruct(123_456_789), KeyError, "not in the index"),
        "router": (lambda: af.IndexAMIPS(D, 4, router="magic"), ValueError, "unknown router"),
        "nlist": (lambda: af.IndexAMIPS(D, 0), ValueError, "nlist"),
        "not IVF": (lambda: af.IndexAMIPS.from_ivf(faiss.IndexFlatIP(D)), TypeError, "IVF"),
        "pre-transform": (lambda: af.IndexAMIPS.from_ivf(faiss.index_factory(D, "PCA16,IVF4,Flat",
                                                                            faiss.METRIC_INNER_PRODUCT)),
                          TypeError, "pre-transform"),
        "too few keys": (lambda: af.IndexAMIPS(D, 64).train(np.ones((10, D))), ValueError, "at least nlist"),
        "train config": (lambda: af.IndexAMIPS(D, 8).train(np.ones((20, D)), config={"steps": 3}), TypeError,
                         "TrainConfig"),
    }


BAD = list(_bad_calls(None, np.zeros((4, D), np.float32), None))


@pytest.mark.parametrize("case", BAD)
def test_bad_input_raises_clear_errors(synthetic, trained, case):
    index = trained("supportnet", synthetic)
    call, exc, match = _bad_calls(index, synthetic["test"][:4], None)[case]
    with pytest.raises(exc, match=match):
        call()


def test_settings_are_checked_when_set_and_typos_refused(synthetic, trained):
    index = copy_of(trained("supportnet", synthetic))
    with pytest.raises(AttributeError, match="n_probe"):
        index.n_probe = 8
    with pytest.raises(ValueError, match="fallback"):
        index.fallback = "x"
    with pytest.raises(ValueError, match="cannot be None"):
        index.nprobe = None
    with pytest.raises(AttributeError, match="ntotal"):
        index.ntotal = 5
    params = af.SearchParametersAMIPS()
    with pytest.raises(AttributeError, match="n_probe"):
        params.n_probe = 8
    with pytest.raises(ValueError, match="max_nprobe"):
        params.max_nprobe = -1
    untrained = af.IndexAMIPS(D, 8)
    with pytest.raises(RuntimeError, match="calibration"):
        untrained.target_recall = 0.9
    index.nprobe, index.target_recall = 4, None  # good values are taken and used
    index.search(synthetic["test"][:100], 1)
    assert index.stats.mean_lists_probed == 4


def test_numbers_of_lists_above_nlist_mean_nlist_everywhere(synthetic, trained):
    index = trained("centroid", synthetic)
    q = synthetic["test"][:100]
    big = af.SearchParametersAMIPS(nprobe=10 ** 6, max_nprobe=10 ** 6, fallback_nprobe=10 ** 6, margin=FIXED)
    all_lists = af.SearchParametersAMIPS(nprobe=NLIST, max_nprobe=NLIST, fallback_nprobe=NLIST, margin=FIXED)
    np.testing.assert_array_equal(index.search(q, 3, params=big)[1], index.search(q, 3, params=all_lists)[1])
    assert index.stats.mean_lists_probed == NLIST


def test_confidence_rank_holds_the_top_r_against_the_forecast(synthetic, trained):
    """Comparing the forecast with the 10th best score found probes more lists and finds more of
    the exact top 10 than comparing it with the best."""
    index = trained("supportnet", synthetic)
    flat = faiss.IndexFlatIP(D)
    flat.add(synthetic["keys"])
    _, I_ref = flat.search(synthetic["test"], 10)
    recall, lists = {}, {}
    for rank in (1, 10):
        params = af.SearchParametersAMIPS(target_recall=0.9, confidence_rank=rank)
        _, I = index.search(synthetic["test"], 10, params=params)
        recall[rank] = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, I_ref)])
        lists[rank] = index.stats.mean_lists_probed
    assert lists[10] > lists[1] and recall[10] > recall[1] + 0.01


def test_the_margin_follows_traffic_unlike_the_calibration_queries(synthetic, trained):
    """Traffic like the calibration queries keeps the calibrated margin (same answers as
    adaptive_margin=False); traffic made only of the quarter of queries the keys match weakest
    (h(q) / ||q||) is flagged, and its tightened margin holds the target (one margin: ~0.93)."""
    index = copy_of(trained("supportnet", synthetic))  # its own traffic history
    q, exact = synthetic["test"], synthetic["exact"].values
    fixed = af.SearchParametersAMIPS(target_recall=0.95, adaptive_margin=False)
    I_fixed = index.search(q, 1, params=fixed)[1]
    I = index.search(q, 1)[1]
    assert not index.stats.traffic_shift
    np.testing.assert_array_equal(I, I_fixed)
    strength = exact / np.linalg.norm(q, axis=1)
    weak = strength < np.quantile(strength, 0.25)
    rates, lists = {}, {}
    for name, params in (("fixed", fixed), ("adaptive", None)):
        _, I = index.search(q[weak], 1, params=params)
        rates[name] = match_rate(found_scores(synthetic["keys"], q[weak], I[:, 0]), exact[weak])
        lists[name] = index.stats.mean_lists_probed
        assert index.stats.traffic_shift == (name == "adaptive")
    sigma = math.sqrt(0.95 * 0.05 / weak.sum())
    assert rates["adaptive"] >= 0.95 - 1.5 * sigma and rates["adaptive"] > rates["fixed"] + 0.01, rates
    assert lists["adaptive"] > lists["fixed"]
    with pytest.raises(ValueError, match="adaptive_margin"):
        af.SearchParametersAMIPS(adaptive_margin=1)


def test_margins_per_bin_of_the_forecast_hold_the_target_on_the_weakest_queries(synthetic, trained):
    """calibration_bins=4: one margin per quartile of the router's first-list forecast / ||q||, each
    reaching the target on its own calibration queries, so the target also holds on a test sample
    made only of the weakest-forecast quarter (a shifted traffic)."""
    index = trained("supportnet", synthetic)
    params = af.SearchParametersAMIPS(target_recall=0.95, calibration_bins=4)
    calibration = index.calibrate_margin(0.95, params)
    assert len(calibration.margins) == 4 and list(calibration.edges) == sorted(calibration.edges)
    assert calibration.recall >= 0.95 and calibration.margin == min(calibration.margins)
    q = synthetic["test"]
    scores, _ = index.router.route(q, 1)
    weak = scores[:, 0] / np.linalg.norm(q, axis=1) < calibration.edges[0]
    assert 200 < weak.sum() < 1000
    _, I = index.search(q[weak], 1, params=params)
    rate = match_rate(found_scores(synthetic["keys"], q[weak], I[:, 0]), synthetic["exact"].values[weak])
    assert rate >= 0.95 - 3 * math.sqrt(0.95 * 0.05 / weak.sum()), rate  # one global margin: 0.915
    _, I = index.search(q, 1, params=params)  # and on the whole test set
    assert match_rate(found_scores(synthetic["keys"], q, I[:, 0]), synthetic["exact"].values) >= 0.95 - 0.015
    with pytest.raises(ValueError, match="calibration_bins"):
        af.SearchParametersAMIPS(calibration_bins=0)


def test_reconstruct_batch_reads_lists_and_buffer(synthetic, trained):
    index = copy_of(trained("supportnet", synthetic))
    extra = np.full((1, D), 3.0, np.float32)
    index.add_with_ids(extra, np.array([123_456]))
    got = index.reconstruct_batch(np.array([5, 123_456, 7]))
    np.testing.assert_array_equal(got, np.vstack([synthetic["keys"][5], extra[0], synthetic["keys"][7]]))
    with pytest.raises(KeyError, match="999999"):
        index.reconstruct_batch(np.array([5, 999_999]))


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


def test_writers_wait_for_searches_and_searches_share_the_index(synthetic, trained, monkeypatch):
    """A search holds the index for reading while it scans the lists in place: a second search runs
    beside it, an add, remove_ids or reset waits until both are done."""
    index = copy_of(trained("centroid", synthetic))
    inside, release = threading.Semaphore(0), threading.Event()
    real_scan = probing.scan_plan

    def paused_scan(*args, **kwargs):
        inside.release()
        assert release.wait(10)
        return real_scan(*args, **kwargs)
    monkeypatch.setattr(probing, "scan_plan", paused_scan)
    q = synthetic["test"][:50]
    params = af.SearchParametersAMIPS(nprobe=2, margin=FIXED)
    results = []
    searches = [threading.Thread(target=lambda: results.append(index.search(q, 1, params=params))) for _ in range(2)]
    for t in searches:
        t.start()
    assert inside.acquire(timeout=10) and inside.acquire(timeout=10)  # both searches are scanning at once
    before = index.ntotal
    writers = [threading.Thread(target=index.add, args=(synthetic["keys"][:10],)),
               threading.Thread(target=index.remove_ids, args=(np.arange(5),)),
               threading.Thread(target=index.reset)]
    for t in writers:
        t.start()
    time.sleep(0.3)
    assert all(t.is_alive() for t in writers) and index.ntotal == before  # the writers wait
    release.set()
    for t in searches + writers:
        t.join(10)
    assert len(results) == 2 and not any(t.is_alive() for t in writers)


def test_predict_is_the_model_answer(synthetic, trained):
    index = trained("supportnet", synthetic)
    scores, ids = index.predict(synthetic["test"])
    assert scores.shape == ids.shape == (len(synthetic["test"]),)
    exact = synthetic["exact"].values
    # trained with a ranking loss, the router's values are a ranking first and an estimate second
    assert np.median(np.abs(scores - exact) / np.abs(exact)) < 0.25
    assert _match(synthetic, ids[:, None]) > 0.8


class _FirstListRouter(Router):
    """A user-built router: a fixed list first, then centroid order."""

    def __init__(self, base, first):
        self.base, self.first = base, first

    def scores(self, xq):
        s = self.base.scores(xq)
        s[:, self.first] = np.inf
        return s

    @property
    def macs_per_query(self):
        return self.base.macs_per_query


def test_a_user_built_router_is_used_as_given_and_can_be_calibrated(synthetic, trained):
    base = trained("centroid", synthetic)
    index = af.IndexAMIPS.from_ivf(base.ivf, router=_FirstListRouter(base.router, 7))
    assert index.is_trained and index.router_name == "custom" and index.target_recall is None
    _, I = index.search(synthetic["test"][:20], 1, params=af.SearchParametersAMIPS(nprobe=1, margin=FIXED))
    assert np.isin(I[:, 0], faiss.rev_swig_ptr(base.ivf.invlists.get_ids(7), base.ivf.invlists.list_size(7))).all()
    with pytest.raises(TypeError, match="from_ivf"):
        af.IndexAMIPS(D, 8, router=_FirstListRouter(base.router, 0))


def test_a_big_batch_split_across_threads_gives_the_one_thread_answer(synthetic, trained):
    index = trained("supportnet", synthetic)
    q = synthetic["test"]
    af.set_num_threads(1)
    try:
        D1, I1 = index.search(q, 5)
        lists1 = index.stats.mean_lists_probed
        af.set_num_threads(2)
        D2, I2 = index.search(q, 5)
    finally:
        af.set_num_threads(2)
    assert np.mean(I1 == I2) > 0.999  # ids may differ only between keys of equal score
    np.testing.assert_allclose(D1, D2, rtol=1e-5)  # the chunks' BLAS calls round alike, not identically
    assert index.stats.mean_lists_probed == pytest.approx(lists1) and index.stats.n_queries == len(q)


@pytest.mark.parametrize("router", ["supportnet", "keynet", "centroid"])
def test_one_query_per_call_gets_the_batch_answer(synthetic, trained, router, monkeypatch):
    """A single query takes the lean path (``probing.search_one``), and a small batch ranks a row's
    later rounds only when it gets there: same rounds, confidence test, fallback and buffer as a
    big batch, so the same answer and the same lists probed."""
    index = copy_of(trained(router, synthetic))
    index.add_with_ids(synthetic["keys"][:50] * 1.5, np.arange(10 ** 6, 10 ** 6 + 50))  # a buffer to scan too
    q = synthetic["test"][:120]
    batch_calls, batch_search = [], probing.search
    monkeypatch.setattr(probing, "search", lambda *a, **kw: batch_calls.append(1) or batch_search(*a, **kw))
    settings = [dict(nprobe=2, margin=-math.inf, max_nprobe=8), dict(nprobe=1, margin=FIXED),
                dict(nprobe=2, fallback="ivf", fallback_nprobe=5, margin=0.0, max_nprobe=8)]
    if router != "centroid":
        settings += [dict(target_recall=0.9), dict(target_recall=0.95, confidence_rank=3),
                     dict(target_recall=0.95, calibration_bins=4)]
    for setting in settings:
        params = af.SearchParametersAMIPS(scan_method="faiss", **setting)
        D, I = index.search(q, 5, params=params)
        lists = index.stats.mean_lists_probed
        batch_calls.clear()
        single, single_lists = [], []
        for i in range(len(q)):
            single.append(index.search(q[i:i + 1], 5, params=params))
            single_lists.append(index.stats.mean_lists_probed)
        assert not batch_calls, "one query went through the batch path"
        np.testing.assert_array_equal(np.vstack([s[1] for s in single]), I, err_msg=str(setting))
        np.testing.assert_array_equal(np.vstack([s[0] for s in single]), D)
        assert np.mean(single_lists) == pytest.approx(lists) and index.stats.n_queries == 1
        small = [index.search(q[lo:lo + 15], 5, params=params) for lo in range(0, len(q), 15)]
        assert 1 < 15 <= probing.PLAN_ONCE_ROWS < len(q)
        np.testing.assert_array_equal(np.vstack([s[1] for s in small]), I, err_msg=str(setting))
        np.testing.assert_array_equal(np.vstack([s[0] for s in small]), D)
    assert np.isin(I, np.arange(10 ** 6, 10 ** 6 + 50)).any()  # the buffer's keys were found


def test_big_batches_are_searched_in_blocks_and_big_adds_in_blocks(synthetic, trained, monkeypatch):
    """Memory stays bounded: a batch is routed a block of rows at a time and keys are added a block at
    a time; the answers and the lists are those of one whole call."""
    index = trained("supportnet", synthetic)
    q = synthetic["test"]
    af.set_num_threads(1)
    try:
        D1, I1 = index.search(q, 5)
        always_unsure = af.SearchParametersAMIPS(margin=-math.inf, max_nprobe=8, fallback="exact")
        D3, I3 = index.search(q, 5, params=always_unsure)
        assert index.stats.fallback_share == 1.0
        monkeypatch.setattr(probing, "SEARCH_BLOCK_ROWS", 700)
        monkeypatch.setattr("amips_faiss.routing.RANK_CHUNK_BYTES", 4 * NLIST * 300)  # ranked 300 rows at a time
        monkeypatch.setattr(probing, "PLAN_BLOCK_BYTES", 9 * NLIST * 200)  # fallback plans of 200 rows
        assert probing.SEARCH_BLOCK_ROWS < len(q)
        D2, I2 = index.search(q, 5)
        D4, I4 = index.search(q, 5, params=always_unsure)
    finally:
        af.set_num_threads(2)
    np.testing.assert_array_equal(I1, I2)
    np.testing.assert_allclose(D1, D2, rtol=1e-6)
    np.testing.assert_array_equal(I3, I4)
    np.testing.assert_allclose(D3, D4, rtol=1e-6)
    assert index.stats.n_queries == len(q)
    monkeypatch.setattr("amips_faiss.index.ADD_BLOCK", 3000)
    blocked = copy_of(index)
    blocked.reset()
    blocked.add(synthetic["keys"])
    sizes = lambda ix: [ix.ivf.invlists.list_size(c) for c in range(NLIST)]  # noqa: E731
    assert sizes(blocked) == sizes(index) and blocked.ntotal == index.ntotal and not blocked.buffer.ntotal


def test_a_big_batch_ranks_its_first_rounds_up_front():
    """Each round reads its lists and the next list's score: two rounds' worth, as far as the
    compiled top-k pass goes, never under the first round's nor over nlist."""
    assert probing.ranked_width([4, 8, 16, 1000], 4000) == 9
    assert probing.ranked_width([40, 80, 160], 4000) == 41  # the second round's 81 is past the pass
    assert probing.ranked_width([100, 200], 4000) == 101
    assert probing.ranked_width([4], 3) == 3


def test_set_num_threads():
    af.set_num_threads(1)
    assert faiss.omp_get_max_threads() == 1
    af.set_num_threads(2)
    with pytest.raises(ValueError):
        af.set_num_threads(0)
