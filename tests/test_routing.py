import numpy as np
import pytest
import torch

from amips_faiss.nn import KeyNet, SupportNet
from amips_faiss.routing import CentroidRouter, KeyNetProjectionRouter, SupportNetRouter, make_router, top_lists


# torch.topk for up to max(12, nlist/40) lists in a batch, numpy's partition beyond, 1-D for one row
@pytest.mark.parametrize("n_rows, nlist, n_lists", [(300, 60, 5), (300, 60, 40), (100, 2000, 30), (100, 2000, 60),
                                                    (1, 2000, 30)])
def test_top_lists_with_ties_returns_distinct_lists_with_the_best_scores(n_rows, nlist, n_lists):
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(n_rows, nlist)).astype(np.float32)  # ties everywhere
    s, lists = top_lists(scores, n_lists)
    assert s.shape == lists.shape == (n_rows, n_lists) and lists.dtype == np.int64
    np.testing.assert_array_equal(s, -np.sort(-scores, axis=1)[:, :n_lists])  # the best scores, descending
    np.testing.assert_array_equal(np.take_along_axis(scores, lists, axis=1), s)  # lists hold them
    assert all(len(set(row)) == n_lists for row in lists)  # no list twice


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
