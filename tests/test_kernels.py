import numpy as np
import pytest

from amips_faiss import kernels
from amips_faiss.scan import EMPTY_SCORE


def _sorted_results(rng, n, k, fill):
    """Rows of ``fill`` results drawn from few distinct values (ties), sorted descending, padded."""
    D = np.full((n, k), EMPTY_SCORE, np.float32)
    I = np.full((n, k), -1, np.int64)
    D[:, :fill] = -np.sort(-rng.integers(0, 6, (n, fill)).astype(np.float32), axis=1)
    I[:, :fill] = rng.integers(0, 10 ** 6, (n, fill))
    return D, I


@pytest.mark.parametrize("fill_old, fill_new", [(5, 5), (2, 5), (0, 3), (5, 0)])
def test_merge_sorted_keeps_the_k_best_old_first_on_ties(fill_old, fill_new):
    rng = np.random.default_rng(fill_old * 10 + fill_new)
    D, I = _sorted_results(rng, 40, 5, fill_old)
    D_new, I_new = _sorted_results(rng, 20, 5, fill_new)
    rows = np.arange(0, 40, 2)
    expect_D, expect_I = D.copy(), I.copy()
    for j, r in enumerate(rows):  # a stable sort of old then new: old results first among equals
        order = np.argsort(-np.concatenate([D[r], D_new[j]]), kind="stable")[:5]
        expect_D[r] = np.concatenate([D[r], D_new[j]])[order]
        expect_I[r] = np.concatenate([I[r], I_new[j]])[order]
    kernels.merge_sorted(D, I, rows, D_new, I_new)
    np.testing.assert_array_equal(D, expect_D)
    np.testing.assert_array_equal(I, expect_I)


def test_inner_products_match_numpy_at_every_block_remainder():
    rng = np.random.default_rng(0)
    for m, size, d in [(1, 1, 1), (4, 2, 8), (7, 5, 50), (9, 3, 384)]:
        queries = rng.standard_normal((m, d)).astype(np.float32)
        keys = rng.standard_normal((size, d)).astype(np.float32) * 100  # unnormalised
        scores = np.empty((m, size), np.float32)
        kernels.inner_products(queries, keys, scores)
        np.testing.assert_allclose(scores, queries @ keys.T, rtol=1e-4, atol=1e-3)
