import json

from benchmarks.run import main


def test_quick_synthetic_benchmark_end_to_end(tmp_path):
    main(["--data", "synthetic", "--quick", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "synthetic-quick.json").read_text())
    methods = {p["method"] for p in result["points"]}
    assert {"exact", "faiss IVFFlat", "AMIPS supportnet", "AMIPS supportnet +confidence", "oracle router"} <= methods
    assert any(m.startswith("faiss HNSW32") for m in methods)
    exact = [p for p in result["points"] if p["method"] == "exact"]
    assert exact[0]["match_rate"] == 1.0 and exact[0]["recall@10"] == 1.0
    keys_bytes = result["n_keys"] * result["d"] * 4
    assert exact[0]["memory_bytes"] >= keys_bytes
    learned = [p for p in result["points"] if p["method"] == "AMIPS supportnet"]
    assert learned[0]["memory_bytes"] > keys_bytes and learned[0]["router_us"] > 0
    oracle = [p for p in result["points"] if p["method"] == "oracle router"]
    assert oracle[0]["match_rate"] == 1.0
    for p in result["points"]:
        assert 0 <= p["match_rate"] <= 1 and p["qps"] > 0
    assert (tmp_path / "synthetic-quick.md").read_text().startswith("| method |")
    assert (tmp_path / "synthetic-quick.png").stat().st_size > 1000
