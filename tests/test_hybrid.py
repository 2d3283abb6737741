import faiss
import numpy as np
import pytest

import amips_faiss as af
from amips_faiss.hybrid import HybridSearcher, reciprocal_rank_fusion, weighted_fusion


def test_reciprocal_rank_fusion_on_a_hand_made_example():
    dense = np.array([[1, 2, 3], [5, -1, -1]])
    lexical = np.array([[3, 1, 9], [-1, -1, -1]])
    scores, ids = reciprocal_rank_fusion([dense, lexical], 4, c=0)
    # id 1: 1/1 + 1/2 = 1.5; id 3: 1/3 + 1/1; id 2: 1/2; id 9: 1/3; row 2 holds only id 5
    assert ids.tolist() == [[1, 3, 2, 9], [5, -1, -1, -1]]
    np.testing.assert_allclose(scores[0], [1.5, 4 / 3, 0.5, 1 / 3], rtol=1e-6)
    assert scores[1].tolist() == [1.0, 0.0, 0.0, 0.0] and scores.dtype == np.float32
    # with c = 60: id 1 (ranks 1, 2) 1/61 + 1/62 still beats id 3 (ranks 3, 1) 1/63 + 1/61
    scores60, ids60 = reciprocal_rank_fusion([dense, lexical], 2)
    assert ids60[0].tolist() == [1, 3]
    np.testing.assert_allclose(scores60[0], [1 / 61 + 1 / 62, 1 / 63 + 1 / 61], rtol=1e-6)
    # ties are broken by the smaller id
    assert reciprocal_rank_fusion([np.array([[7, 4]]), np.array([[4, 7]])], 2)[1].tolist() == [[4, 7]]


def test_weighted_fusion_normalises_each_ranking_per_query():
    dense = (np.array([[3.0, 2.0, 1.0]]), np.array([[1, 2, 3]]))
    lexical = (np.array([[10.0, 5.0, 0.0]]), np.array([[3, 1, 9]]))
    scores, ids = weighted_fusion([dense, lexical], 3)
    # dense → 1, .5, 0; lexical → 1, .5, 0; equal weights: id 1 = .5 + .25, id 3 = 0 + .5, id 2 = .25
    assert ids.tolist() == [[1, 3, 2]]
    np.testing.assert_allclose(scores, [[0.75, 0.5, 0.25]])
    only_lexical = weighted_fusion([dense, lexical], 1, weights=[0.0, 1.0])[1]
    assert only_lexical.tolist() == [[3]]
    with pytest.raises(ValueError, match="weights"):
        weighted_fusion([dense, lexical], 1, weights=[1.0])


def test_fusion_refuses_bad_rankings():
    with pytest.raises(ValueError, match="non-empty"):
        reciprocal_rank_fusion([], 3)
    with pytest.raises(ValueError, match="same n"):
        reciprocal_rank_fusion([np.zeros((2, 3), int), np.zeros((3, 3), int)], 3)
    with pytest.raises(ValueError, match="k must be positive"):
        reciprocal_rank_fusion([np.zeros((2, 3), int)], 0)


TEXTS = ["fast fourier transform library for signals", "a game of chess against the computer",
         "python bindings for the fourier library", "arcade space shooter game",
         "documentation for the chess engine", "image viewer for the desktop"] + \
    [f"filler package number {i} of the archive" for i in range(54)]


@pytest.fixture(scope="module")
def hybrid():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((len(TEXTS), 8)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)  # unit keys: a multiple of a key finds that key first
    index = af.IndexAMIPS(8, 4, router="centroid")
    index.train(keys, rng.standard_normal((400, 8)).astype(np.float32), progress=False)
    index.add(keys)
    return HybridSearcher(index, TEXTS, depth=20), keys


def test_lexical_side_finds_the_words_and_obeys_the_filter(hybrid):
    searcher, _ = hybrid
    D, I = searcher.lexical(["chess engine"], 5)
    assert all("chess" in TEXTS[i] for i in I[0] if i >= 0) and D[0, 0] > 0
    _, If = searcher.lexical(["chess engine"], 5, sel=np.array([4, 40]))
    assert If[0].tolist() == [4, -1, -1, -1, -1]  # doc 1 (chess) is filtered out, 40 has no such word
    _, Inone = searcher.lexical(["zebra"], 3)
    assert (Inone == -1).all()


@pytest.mark.parametrize("method", ["rrf", "weighted"])
def test_hybrid_search_fuses_both_sides_under_one_filter(hybrid, method):
    searcher, keys = hybrid
    xq = keys[[1, 3]] * 5  # dense side: each query's own key wins
    sel = faiss.IDSelectorRange(0, 30)
    scores, I = searcher.search(xq, ["chess computer", "space shooter"], 5, method=method, sel=sel)
    assert I.shape == scores.shape == (2, 5) and I.dtype == np.int64 and scores.dtype == np.float32
    assert (I[I >= 0] < 30).all()
    assert I[0, 0] == 1 and I[1, 0] == 3  # first in both rankings
    assert (np.diff(scores, axis=1) <= 0).all()


def test_hybrid_search_refuses_bad_input(hybrid):
    searcher, keys = hybrid
    with pytest.raises(ValueError, match="query_texts"):
        searcher.search(keys[:2], ["one"], 3)
    with pytest.raises(ValueError, match="fusion method"):
        searcher.search(keys[:1], ["one"], 3, method="max")
    with pytest.raises(TypeError, match="IDSelector"):
        searcher.search(keys[:1], ["one"], 3, sel="games")
    with pytest.raises(TypeError, match="IndexAMIPS"):
        HybridSearcher(faiss.IndexFlatIP(8), TEXTS)
    with pytest.raises(ValueError, match="one per text"):
        HybridSearcher(searcher.index, TEXTS, ids=np.arange(3))


def test_lexical_candidates_join_the_dense_ranking_with_their_exact_scores(hybrid):
    searcher, keys = hybrid
    xq = keys[:2] * 3
    D, I = searcher.index.search(xq, 4)
    missed = np.array([[I[0, 0], 42, -1], [55, I[1, 1], 17]])  # one already there, new ones, a −1
    D2, I2 = searcher.with_candidates(xq, (D[:, :2], I[:, :2]), missed)
    assert I2.shape == (2, 2) and all(len(set(row)) == len(row) for row in I2)
    full_D, full_I = searcher.with_candidates(xq, (D, I), missed)
    for row, ids in ((0, [42]), (1, [55, 17])):
        for i in ids:
            at = np.flatnonzero(full_I[row] == i)
            if len(at):  # merged with its exact inner product
                np.testing.assert_allclose(full_D[row, at[0]], xq[row] @ keys[i], rtol=1e-5)
    assert (np.diff(full_D, axis=1) <= 0).all()
    exact = xq @ keys.T
    best_of = {row: max(exact[row, [int(j) for j in set(I[row]) | set(missed[row][missed[row] >= 0])]])
               for row in (0, 1)}
    assert all(np.isclose(full_D[row, 0], best_of[row]) for row in (0, 1))
