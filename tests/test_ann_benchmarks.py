import faiss
import numpy as np
import pytest

from amips_faiss.ann_benchmarks import AMIPS
from amips_faiss.data import make_clustered


class FakeRunner:
    """What ann-benchmarks' runner does with an algorithm: build, then for each query-argument
    group set the arguments and query one at a time and in a batch."""

    def __init__(self, algo, train, test, k):
        self.algo, self.train, self.test, self.k = algo, train, test, k

    def run(self, query_args):
        self.algo.fit(self.train)
        out = {}
        for args in query_args:
            self.algo.set_query_arguments(*args)
            single = [list(self.algo.query(v, self.k)) for v in self.test]
            self.algo.batch_query(self.test, self.k)
            batch = self.algo.get_batch_results()
            out[args] = (single, batch, str(self.algo), self.algo.get_additional())
        self.algo.done()
        return out


@pytest.mark.parametrize("metric", ["angular", "euclidean", "ip"])
def test_the_harness_gets_the_nearest_neighbours_of_its_metric(metric):
    keys, queries = make_clustered(3000, 300, 16, n_clusters=8, seed=5)
    # training ends by its steps, not the clock: a loaded CI machine must not get a weaker router
    runner = FakeRunner(AMIPS(metric, router="linear", nlist=32, train_seconds=120), keys, queries[:100], 10)
    results = runner.run([(1.0, 1), (0.9, 4)])  # 1.0: never sure, the exact fallback for every query
    if metric == "euclidean":
        truth = faiss.IndexFlatL2(16)
        truth.add(keys)
    else:
        truth = faiss.IndexFlatIP(16)
        truth.add(keys / np.linalg.norm(keys, axis=1, keepdims=True) if metric == "angular" else keys)
    q = queries[:100] / np.linalg.norm(queries[:100], axis=1, keepdims=True) if metric == "angular" else queries[:100]
    _, I_true = truth.search(q, 1)
    for args, (single, batch, name, extra) in results.items():
        assert str(args[0]) in name and extra["mean_lists_probed"] >= 1
        np.testing.assert_array_equal(np.array([s[0] for s in single]), batch[:, 0])
        hit = np.mean(batch[:, 0] == I_true[:, 0])
        # exact search in the harness's metric; the router, trained without queries, still helps
        assert hit == 1.0 if args[0] == 1.0 else hit >= 0.5


def test_unknown_metric_is_refused():
    with pytest.raises(ValueError, match="metric"):
        AMIPS("hamming")
