import numpy as np
import pytest
import torch

from amips_faiss import routing
from amips_faiss.nn import KeyNet, SupportNet
from amips_faiss.routing import CentroidRouter, KeyNetProjectionRouter, SupportNetRouter, make_router, top_lists


# the compiled pass for up to TOP_PER_ROW_MAX lists (with a tail of fewer than 16 columns: 60, 2001),
# numpy's partition beyond, 1-D for one row
@pytest.mark.parametrize("n_rows, nlist, n_lists", [(300, 60, 5), (300, 60, 40), (100, 2001, 30), (100, 2000, 64),
                                                    (100, 2000, 65), (1, 2000, 30), (1, 2000, 100), (3, 17, 16)])
def test_top_lists_with_ties_returns_distinct_lists_with_the_best_scores(n_rows, nlist, n_lists):
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(n_rows, nlist)).astype(np.float32)  # ties everywhere
    s, lists = top_lists(scores, n_lists)
    assert s.shape == lists.shape == (n_rows, n_lists) and lists.dtype == np.int64
    np.testing.assert_array_equal(s, -np.sort(-scores, axis=1)[:, :n_lists])  # the best scores, descending
    np.testing.assert_array_equal(np.take_along_axis(scores, lists, axis=1), s)  # lists hold them
    assert all(len(set(row)) == n_lists for row in lists)  # no list twice


def test_top_lists_orders_real_valued_scores_like_a_full_sort():
    scores = np.random.default_rng(1).standard_normal((200, 977)).astype(np.float32) * 100  # no ties
    for n_lists in (1, 9, routing.TOP_PER_ROW_MAX, routing.TOP_PER_ROW_MAX + 1):
        _, lists = top_lists(scores, n_lists)
        np.testing.assert_array_equal(lists, np.argsort(-scores, axis=1)[:, :n_lists])


def test_a_big_batch_ranker_keeps_its_width_and_scores_wider_calls_again(monkeypatch):
    """A batch over ``RANK_CHUNK_BYTES`` keeps only each row's ``width`` best lists, ranked chunk by
    chunk; every call, within the width or wider, any rows, answers as ``route`` does."""
    rng = np.random.default_rng(2)
    net, q = SupportNet(16, 300, width=32, depth=2), rng.standard_normal((1000, 16)).astype(np.float32)
    router = SupportNetRouter(net)
    full_scores, full_lists = router.route(q, 40)
    monkeypatch.setattr(routing, "RANK_CHUNK_BYTES", 4 * 300 * 300)  # 300-row chunks
    scored = []
    monkeypatch.setattr(router, "scores", lambda x, f=router.scores: scored.append(len(x)) or f(x))
    rank = router.ranker(q, 9)
    assert scored[0] == 1 and sum(scored[1:]) == len(q) and max(scored) == 300  # nlist, then chunk by chunk
    rows = np.sort(rng.choice(len(q), 400, replace=False))
    for n_lists in (1, 5, 9):
        np.testing.assert_array_equal(rank(slice(None), n_lists)[1], full_lists[:, :n_lists])
        np.testing.assert_array_equal(rank(rows, n_lists)[1], full_lists[rows, :n_lists])
    assert sum(scored) == 1 + len(q)  # within the width: no scoring again
    for n_lists in (10, 40):
        s, lists = rank(rows, n_lists)
        np.testing.assert_array_equal(lists, full_lists[rows, :n_lists])
        np.testing.assert_allclose(s, full_scores[rows, :n_lists], rtol=1e-6)
    assert sum(scored) == 1 + len(q) + 2 * len(rows)  # only the wider calls' rows scored again
    assert rank(rows[:0], 40)[1].shape == (0, 40)


def test_top_lists_pads_beyond_nlist():
    scores = np.array([[0.5, 2.0, 1.0]], np.float32)
    s, lists = top_lists(scores, 5)
    assert lists.tolist() == [[1, 2, 0, -1, -1]]
    assert s[0, :3].tolist() == [2.0, 1.0, 0.5] and np.isneginf(s[0, 3:]).all()


def test_routers_know_their_coarse_distances_and_predicted_support(synthetic, trained):
    index = trained("centroid", synthetic)
    q, cents = synthetic["test"][:50], index.centroids()
    centroid = make_router("centroid", index.ivf.quantizer, cents)
    scores, lists = centroid.route(q, 3)
    np.testing.assert_allclose(scores, np.take_along_axis(q @ cents.T, lists, axis=1), rtol=1e-5)
    assert centroid.coarse_distances(scores) is scores
    net = SupportNet(q.shape[1], len(cents))
    learned = make_router("supportnet", index.ivf.quantizer, cents, net)
    assert isinstance(learned, SupportNetRouter) and learned.coarse_distances(scores) is None
    keynet = KeyNet(q.shape[1], width=16, depth=1)
    projection = make_router("keynet", index.ivf.quantizer, cents, keynet)
    with torch.no_grad():
        euler = (keynet(torch.from_numpy(q)).numpy() * q).sum(axis=1)  # <KeyNet(q), q> = h(q) by Euler
    np.testing.assert_allclose(projection.predicted_support(q, scores[:, 0]), euler, rtol=1e-4, atol=1e-4)
    assert isinstance(centroid, CentroidRouter) and isinstance(projection, KeyNetProjectionRouter)
    with pytest.raises(ValueError, match="cannot be built"):
        make_router("keynet", index.ivf.quantizer, cents, net)
    with pytest.raises(ValueError, match="cannot be built"):
        make_router("magic", index.ivf.quantizer, cents)
