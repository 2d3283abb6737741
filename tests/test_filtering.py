import math

import faiss
import numpy as np
import pytest

import amips_faiss as af
from amips_faiss import probing
from amips_faiss.filtering import allowed, check_selector
from amips_faiss.metrics import found_scores, match_rate

from .conftest import D, NLIST, copy_of

N_KEYS = 20_000


def _bitmap(mask: np.ndarray):
    bits = np.packbits(mask, bitorder="little")
    return faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits)), bits  # keep the bytes alive


def _selectors(share: float, seed: int = 0) -> dict:
    """Selectors over ids 0..N_KEYS−1 of about ``share`` of the keys, of every kind, with their masks."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(N_KEYS, int(share * N_KEYS), replace=False))
    mask = np.isin(np.arange(N_KEYS), chosen)
    bitmap, bits = _bitmap(mask)
    cut = int(share * N_KEYS)
    return {
        "batch": (faiss.IDSelectorBatch(chosen), mask),
        "array": (chosen, mask),
        "bitmap": (bitmap, mask, bits),
        "range": (faiss.IDSelectorRange(1000, 1000 + cut), (np.arange(N_KEYS) >= 1000) & (np.arange(N_KEYS) < 1000 + cut)),
        "not": (faiss.IDSelectorNot(faiss.IDSelectorRange(0, N_KEYS - cut)), np.arange(N_KEYS) >= N_KEYS - cut),
    }


@pytest.mark.parametrize("kind", ["batch", "array", "bitmap", "range", "not"])
def test_allowed_follows_the_selectors_own_membership(kind):
    selectors = _selectors(0.3)  # holds the bitmap's bytes while it is used
    sel, mask = selectors[kind][:2]
    ids = np.random.default_rng(1).permutation(N_KEYS).astype(np.int64)
    expect = mask[ids]
    got = allowed(ids, check_selector(sel))
    np.testing.assert_array_equal(got, expect)
    if isinstance(sel, faiss.IDSelector):
        assert all(sel.is_member(int(i)) == e for i, e in zip(ids[:500], expect[:500]))


def _filtered_exact(keys, queries, sel_mask, k):
    flat = faiss.IndexFlatIP(D)
    flat.add(keys)
    ids = np.flatnonzero(sel_mask)
    return flat.search(queries, k, params=faiss.SearchParameters(sel=faiss.IDSelectorBatch(ids)))


@pytest.mark.parametrize("router", ["centroid", "supportnet", "keynet"])
@pytest.mark.parametrize("kind", ["batch", "array", "bitmap", "range", "not"])
@pytest.mark.parametrize("share", [0.5, 0.01])  # routed rounds; the brute-force planner
def test_exact_fallback_at_margin_minus_inf_is_exact_filtered_search(synthetic, trained, router, kind, share):
    index = trained(router, synthetic)
    selectors = _selectors(share)  # holds the bitmap's bytes while it is used
    sel, mask = selectors[kind][:2]
    q = synthetic["test"][:300]
    D_ref, I_ref = _filtered_exact(synthetic["keys"], q, mask, 5)
    D_ours, I_ours = index.search(q, 5, params=af.SearchParametersAMIPS(margin=-math.inf, fallback="exact", sel=sel))
    assert index.stats.brute_force == (share < 0.1)
    assert mask[I_ours[I_ours >= 0]].all()  # never an id outside the selector
    np.testing.assert_allclose(D_ours, D_ref, rtol=1e-5)
    assert np.mean(I_ours == I_ref) > 0.999  # ids may differ only between keys of equal score


@pytest.mark.parametrize("scan_method", ["faiss", "auto"])
@pytest.mark.parametrize("kind", ["batch", "range", "not"])
def test_centroid_router_with_a_selector_is_faiss_ivfflat_with_that_selector(synthetic, trained, scan_method, kind):
    index = trained("centroid", synthetic)
    sel, mask = _selectors(0.5, seed=2)[kind][:2]
    ivf = faiss.IndexIVFFlat(index.ivf.quantizer, D, NLIST, faiss.METRIC_INNER_PRODUCT)
    ivf.add(synthetic["keys"])
    q = synthetic["test"][:500]
    for nprobe in (1, 4):
        D_ref, I_ref = ivf.search(q, 10, params=faiss.SearchParametersIVF(sel=sel, nprobe=nprobe))
        D_ours, I_ours = index.search(q, 10, params=af.SearchParametersAMIPS(
            nprobe=nprobe, margin=math.inf, scan_method=scan_method, sel=sel))
        np.testing.assert_allclose(D_ours, D_ref, rtol=1e-5)
        assert np.mean(I_ours == I_ref) > (1.0 if scan_method == "faiss" else 0.999) - 1e-12


def test_filtered_target_recall_is_met_at_ten_percent(synthetic, trained, monkeypatch):
    """The confidence test stays a valid stop rule under a filter: asked for 0.95, held-out queries
    reach the filtered match rate 0.95 (routed rounds forced: the planner would brute-force this)."""
    monkeypatch.setattr(probing, "BRUTE_FORCE_LISTS", 0)
    index = trained("supportnet", synthetic)
    sel, mask = _selectors(0.1, seed=3)["batch"][:2]
    q = synthetic["test"]
    D_ref, _ = _filtered_exact(synthetic["keys"], q, mask, 1)
    _, I = index.search(q, 1, params=af.SearchParametersAMIPS(target_recall=0.95, sel=sel))
    assert not index.stats.brute_force and index.stats.mean_lists_probed < NLIST / 2
    rate = match_rate(found_scores(synthetic["keys"], q, I[:, 0]), D_ref[:, 0])
    assert rate >= 0.95 - 2 * math.sqrt(0.95 * 0.05 / len(q))


def test_buffered_keys_obey_the_filter_and_few_allowed_pads(synthetic, trained):
    index = copy_of(trained("supportnet", synthetic))
    direction = synthetic["test"][:50].mean(axis=0)
    winner = (direction / np.linalg.norm(direction) * 1e4).astype(np.float32)[None, :]
    index.add_with_ids(winner, np.array([777_777]))
    q = synthetic["test"][:50]
    _, I_in = index.search(q, 3, params=af.SearchParametersAMIPS(sel=np.array([777_777, 5, 6])))
    assert (I_in[:, 0] == 777_777).any() and np.isin(I_in, [777_777, 5, 6]).all()
    D_out, I_out = index.search(q, 10, params=af.SearchParametersAMIPS(sel=faiss.IDSelectorRange(0, 4)))
    assert np.isin(I_out[:, :4], [0, 1, 2, 3]).all() and (I_out[:, 4:] == -1).all()
    assert (D_out[:, 4:] == np.finfo(np.float32).min).all()
    D_none, I_none = index.search(q, 2, params=af.SearchParametersAMIPS(sel=np.zeros(0, np.int64)))
    assert (I_none == -1).all()


def test_filters_work_over_a_users_compressed_ivf(synthetic):
    user = faiss.index_factory(D, "IVF64,SQ8", faiss.METRIC_INNER_PRODUCT)
    user.train(synthetic["keys"])
    user.add(synthetic["keys"])
    sel = faiss.IDSelectorRange(0, N_KEYS // 2)
    index = af.IndexAMIPS.from_ivf(user, router="centroid")
    q = synthetic["test"][:300]
    user.nprobe = 6
    D_ref, I_ref = user.search(q, 5, params=faiss.SearchParametersIVF(sel=sel, nprobe=6))
    D_ours, I_ours = index.search(q, 5, params=af.SearchParametersAMIPS(nprobe=6, margin=math.inf, sel=sel))
    np.testing.assert_array_equal(I_ours, I_ref)
    assert (I_ours < N_KEYS // 2).all()


@pytest.mark.parametrize("sel, error, match", [
    ("games", TypeError, "IDSelector"),
    ({"section": "games"}, TypeError, "IDSelector"),
    (3, TypeError, "IDSelector"),
    (np.array([1.0, np.nan]), TypeError, "integer ids"),
    (np.array([True, False]), TypeError, "integer ids"),
    (np.array([[1, 2]]), ValueError, "1-D"),
    (np.array([3, -1]), ValueError, "negative"),
])
def test_bad_selectors_are_refused_clearly(sel, error, match):
    with pytest.raises(error, match=match):
        af.SearchParametersAMIPS(sel=sel)


def test_a_selector_is_per_call_only(synthetic, trained):
    index = copy_of(trained("centroid", synthetic))
    with pytest.raises(AttributeError, match="sel"):
        index.sel = faiss.IDSelectorRange(0, 10)
