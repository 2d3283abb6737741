import json

from benchmarks.run import main


def test_quick_synthetic_benchmark_end_to_end(tmp_path):
    main(["--data", "synthetic", "--quick", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "synthetic-quick.json").read_text())
    methods = {p["method"] for p in result["points"]}
    assert {"exact IndexFlatIP", "exact BLAS + partial sort", "faiss IVFFlat", "faiss HNSW32",
            "AMIPS supportnet", "AMIPS supportnet +confidence", "oracle router"} <= methods
    assert "faiss HNSW32 (MIPS→L2)" in result["missing"]  # the slower extra row is left to the full run
    for exact in (p for p in result["points"] if p["method"].startswith("exact")):
        assert exact["match_rate"] == 1.0 and exact["recall@10"] == 1.0
    keys_bytes = result["n_keys"] * result["d"] * 4
    learned = [p for p in result["points"] if p["method"] == "AMIPS supportnet"]
    assert learned[0]["memory_bytes"] > keys_bytes and learned[0]["router_us"] > 0
    oracle = [p for p in result["points"] if p["method"] == "oracle router"]
    assert oracle[0]["match_rate"] == 1.0
    for p in result["points"]:
        assert 0 <= p["match_rate"] <= 1 and p["qps"] > 0
    serving = {r["method"]: r for r in result["serving"]}
    assert "exact IndexFlatIP" in serving and "oracle router" not in serving
    for r in serving.values():
        assert r["match_rate"] >= 0.95 and 0 < r["batch1_p50_us"] <= r["batch1_p99_us"] and r["qps_2_threads"] > 0
        settings = {p["setting"] for p in result["points"] if p["method"] == r["method"]}
        assert r["qps_1_thread_side_by_side"] > 0 and r["qps_2_threads_setting"] in settings
        assert r["batch1_match_rate"] >= 0.85 and r["batch16_match_rate"] >= 0.9  # served as measured (100 / 1,000 queries)
    table = (tmp_path / "synthetic-quick.md").read_text()
    assert table.startswith("| method |") and "batch 1" in table
    assert (tmp_path / "synthetic-quick.png").stat().st_size > 1000
    assert (tmp_path / "synthetic-quick-serving.png").stat().st_size > 1000
