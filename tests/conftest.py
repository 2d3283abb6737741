import pytest
import torch

import amips_faiss as af
from amips_faiss.data import make_clustered
from amips_faiss.targets import support_values

torch.set_num_threads(2)
D, NLIST = 32, 141


@pytest.fixture(scope="session")
def synthetic():
    """20k unnormalised clustered keys (norms spanning 100x), 14k queries: 12k train, 2k test."""
    keys, queries = make_clustered(20_000, 14_000, D, seed=1)
    test = queries[:2000]
    return {"keys": keys, "train": queries[2000:], "test": test,
            "exact": support_values(keys, test, progress=False)}


_cache = {}


@pytest.fixture(scope="session")
def trained():
    """A factory of trained IndexAMIPS (one per router, built once per session). Tests must not
    change them: take ``copy_of(index)`` to add, remove or set anything."""
    def make(router: str, data) -> af.IndexAMIPS:
        if router not in _cache:
            index = af.IndexAMIPS(D, NLIST, router=router)
            index.train(data["keys"], data["train"], steps=1500, progress=False, seed=0)
            index.add(data["keys"])
            _cache[router] = index
        return _cache[router]
    return make


def copy_of(index: af.IndexAMIPS) -> af.IndexAMIPS:
    """An independent copy (through the index file format)."""
    return af.deserialize_index(af.serialize_index(index))
