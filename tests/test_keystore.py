import faiss
import numpy as np

from amips_faiss.keystore import buffer_keys, fingerprints, is_fingerprinted, list_keys, row_fingerprints


def test_fingerprints_tell_seen_rows_apart_bit_for_bit():
    x = np.random.default_rng(0).standard_normal((500, 8)).astype(np.float32)
    seen = fingerprints(x[:300])
    assert is_fingerprinted(x, seen).tolist() == [True] * 300 + [False] * 200
    nudged = x[:1].copy()
    nudged[0, 3] = np.nextafter(nudged[0, 3], np.inf)  # one ulp away is another key
    assert not is_fingerprinted(nudged, seen)[0]
    assert not is_fingerprinted(x, np.zeros(0, np.uint64)).any()
    assert len(np.unique(row_fingerprints(x))) == 500


def test_keys_come_back_out_of_lists_and_buffer_with_their_lists_and_ids():
    x = np.random.default_rng(1).standard_normal((2000, 8)).astype(np.float32)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(8), 8, 16, faiss.METRIC_INNER_PRODUCT)
    ivf.train(x)
    ivf.add_with_ids(x, np.arange(2000) * 3)
    ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    keys, lists = list_keys(ivf)
    order = np.lexsort(keys.T)
    np.testing.assert_array_equal(keys[order], x[np.lexsort(x.T)])
    np.testing.assert_array_equal(lists, ivf.quantizer.assign(keys, 1).reshape(-1))
    buffer = faiss.IndexIDMap2(faiss.IndexFlatIP(8))
    buffer.add_with_ids(x[:5], np.array([9, 8, 7, 6, 5]))
    bk, bi = buffer_keys(buffer)
    np.testing.assert_array_equal(bk, x[:5])
    assert bi.tolist() == [9, 8, 7, 6, 5]


def test_fingerprints_do_not_depend_on_the_block_size():
    x = np.random.default_rng(0).standard_normal((1000, 7)).astype(np.float32)
    whole = row_fingerprints(x, block=4096)
    np.testing.assert_array_equal(row_fingerprints(x, block=33), whole)
    assert len(np.unique(whole)) == len(x)
