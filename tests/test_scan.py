import faiss
import numpy as np
import pytest

from amips_faiss import scan
from amips_faiss.probing import merge_into
from amips_faiss.scan import (EMPTY_SCORE, FlatListViews, scan_blas_by_list, scan_blas_dense, scan_faiss,
                              scan_plan)

from .conftest import D, NLIST


@pytest.mark.parametrize("k", [1, 10, 500])
@pytest.mark.parametrize("blas_scan", [scan_blas_by_list, scan_blas_dense])
def test_blas_scans_give_faiss_answers(synthetic, trained, k, blas_scan):
    """The BLAS scans (pairs grouped by list, or all queries × touched lists, masked) find the same
    keys as faiss's scan, up to float rounding; lists shorter than k, −1 entries in the plan included."""
    index = trained("centroid", synthetic)
    xq = synthetic["test"][:300]
    _, lists = index.router.route(xq, 12)
    lists[::7, 3:] = -1  # some queries probe fewer lists
    coarse = np.zeros(lists.shape, np.float32)
    D_ref, I_ref = scan_faiss(index.ivf, xq, k, lists, coarse)
    D_ours, I_ours = blas_scan(index.ivf, xq, k, lists)
    np.testing.assert_allclose(D_ours, D_ref, rtol=1e-5, atol=1e-4)
    found = D_ref > EMPTY_SCORE
    assert (I_ours[~found] == -1).all() and (~found).any() == (k == 500)
    # ids may only differ between keys of equal score
    rows = np.nonzero((I_ours != I_ref) & found)[0]
    assert len(rows) <= 0.01 * found.sum()


@pytest.mark.parametrize("method", ["auto", "faiss", "blas"])
def test_every_scan_method_gives_the_same_top1(synthetic, trained, method):
    index = trained("centroid", synthetic)
    xq = synthetic["test"][:200]
    _, lists = index.router.route(xq, 5)
    views = FlatListViews(index.ivf)
    try:
        D_m, I_m = scan_plan(index.ivf, xq, 1, lists, None, index.centroids(), method, views)
    finally:
        views.release()
    D_f, _ = scan_faiss(index.ivf, xq, 1, lists, np.zeros(lists.shape, np.float32))
    np.testing.assert_allclose(D_m, D_f, rtol=1e-5)


def test_blas_scan_is_refused_for_compressed_lists_and_unknown_methods(synthetic):
    pq = faiss.index_factory(D, "IVF16,PQ8", faiss.METRIC_INNER_PRODUCT)
    pq.train(synthetic["keys"][:5000])
    pq.add(synthetic["keys"][:5000])
    lists = np.zeros((3, 1), np.int64)
    with pytest.raises(ValueError, match="flat lists"):
        scan_plan(faiss.extract_index_ivf(pq), synthetic["test"][:3], 1, lists, None, None, "blas")
    with pytest.raises(ValueError, match="scan_method"):
        scan_plan(faiss.extract_index_ivf(pq), synthetic["test"][:3], 1, lists, None, None, "simd")


def test_flat_list_views_load_only_the_planned_lists_and_are_released(synthetic, trained):
    index = trained("centroid", synthetic)
    views = FlatListViews(index.ivf)
    sizes = [index.ivf.invlists.list_size(i) for i in range(NLIST)]
    biggest = int(np.argmax(sizes))
    keys, ids = views(np.array([[biggest, -1]]))
    assert sum(k is not None for k in keys) == 1  # only what the plan touches
    np.testing.assert_array_equal(keys[biggest], synthetic["keys"][ids[biggest]])  # ids are the key rows
    keys, _ = views(np.array([[biggest, 0]]))
    assert sum(k is not None for k in keys) == 1 + (sizes[0] > 0) and len(views._pointers) == 1 + (sizes[0] > 0)
    views.release()
    assert not views._pointers and all(k is None for k in views(np.zeros((1, 0), np.int64))[0])


def _gaussian_ivf(seed: int, n_keys: int, n_queries: int, d: int, nlist: int):
    """A flat IVF over ``n_keys`` standard normal keys in ``nlist`` lists, and ``n_queries`` queries."""
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((n_keys, d)).astype(np.float32)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.train(keys)
    ivf.add(keys)
    return ivf, rng.standard_normal((n_queries, d)).astype(np.float32)


def _record_scans(monkeypatch) -> list[str]:
    """The names of the scans ``scan_plan`` calls from now on, in order (each still runs)."""
    used = []
    for name in ("scan_faiss", "scan_blas_by_list", "scan_blas_dense"):
        real = getattr(scan, name)
        monkeypatch.setattr(scan, name, lambda *a, _real=real, _name=name, **kw: used.append(_name) or _real(*a, **kw))
    return used


def test_a_dense_plan_with_floors_goes_by_list(monkeypatch):
    """Every query over every list (the exact fallback) with floors from an earlier round is scanned
    list by list from the floors (never faiss's per-pair scan), with faiss's answers above them."""
    nlist = 8
    ivf, xq = _gaussian_ivf(2, 2000, 64, 128, nlist)
    lists = np.tile(np.arange(nlist), (64, 1))
    floor = scan.scan_faiss(ivf, xq, 5, lists[:, :1], np.zeros((64, 1), np.float32))[0][:, -1]
    used = _record_scans(monkeypatch)
    D, _ = scan.scan_plan(ivf, xq, 5, lists, floor=floor)
    assert used == ["scan_blas_by_list"]
    D_faiss, _ = scan.scan_faiss(ivf, xq, 5, lists, np.zeros(lists.shape, np.float32))
    above = D > EMPTY_SCORE
    np.testing.assert_array_equal(above, D_faiss > floor[:, None])
    np.testing.assert_allclose(D[above], D_faiss[above], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("queries_per_list, chosen", [(1, "scan_faiss"), (3, "scan_blas_by_list")])
def test_auto_scans_by_list_from_two_pairs_per_list(monkeypatch, queries_per_list, chosen):
    """"auto" leaves a plan of 1 pair per list to faiss and scans one of 3 per list list by list
    (``BY_LIST_PAIRS_PER_LIST``), with faiss's answers either way."""
    nlist = 16
    ivf, xq = _gaussian_ivf(1, 2000, nlist * queries_per_list, 64, nlist)
    lists = (np.arange(len(xq)) % nlist)[:, None]
    used = _record_scans(monkeypatch)
    D, I = scan.scan_plan(ivf, xq, 3, lists)
    assert used == [chosen]
    D_faiss, I_faiss = scan.scan_plan(ivf, xq, 3, lists, method="faiss")
    np.testing.assert_allclose(D, D_faiss, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(I[:, 0], I_faiss[:, 0])


@pytest.mark.parametrize("max_candidates", [None, 50])
def test_scan_above_the_floor_completes_the_top_k(synthetic, trained, monkeypatch, max_candidates):
    """A later round scanned list by list with each query's floor (its k-th best after the first
    lists), merged with the first round, gives faiss's answer over all lists; keys at or below the
    floor are left out. Also when a list meets its queries a few at a time (bounded memory), and for
    a query with no floor (−inf: everything passes)."""
    if max_candidates:
        monkeypatch.setattr(scan, "_MAX_CANDIDATES", max_candidates)
    index = trained("centroid", synthetic)
    xq, k = synthetic["test"][:300], 10
    _, lists = index.router.route(xq, 12)
    lists[::5, 9:] = -1
    coarse = np.zeros(lists.shape, np.float32)
    D_all, _ = scan_faiss(index.ivf, xq, k, lists, coarse)
    D, I = scan_faiss(index.ivf, xq, k, lists[:, :2], coarse[:, :2])
    floor = D[:, -1].copy()
    floor[0] = -np.inf
    D_above, I_above = scan_blas_by_list(index.ivf, xq, k, lists[:, 2:], floor=floor)
    passed = D_above > EMPTY_SCORE
    assert (D_above[passed] > np.repeat(floor, k).reshape(-1, k)[passed]).all() and passed[0].all()
    assert (np.diff(D_above, axis=1) <= 0).all() and ((I_above >= 0) == passed).all()
    merge_into(D, I, np.arange(len(xq)), D_above, I_above)
    np.testing.assert_allclose(D, D_all, rtol=1e-5, atol=1e-4)
    keys = synthetic["keys"]
    np.testing.assert_allclose(np.einsum("nd,nkd->nk", xq, keys[I]), D, rtol=1e-4, atol=1e-4)  # ids match scores
