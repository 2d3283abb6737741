import json
import subprocess
import sys

import numpy as np

from amips_faiss.cli import main
from amips_faiss.data import make_clustered


def test_build_search_eval_info(tmp_path, capsys):
    keys, queries = make_clustered(3000, 1500, 16, n_clusters=16, seed=4)
    np.save(tmp_path / "k.npy", keys)
    np.save(tmp_path / "q.npy", queries[:1000])
    np.save(tmp_path / "t.npy", queries[1000:])
    idx = str(tmp_path / "i.amips")
    assert main(["--quiet", "build", "--keys", str(tmp_path / "k.npy"), "--queries", str(tmp_path / "q.npy"),
                 "-o", idx, "--nlist", "32", "--steps", "200"]) == 0
    assert json.loads(capsys.readouterr().out)["ntotal"] == 3000
    assert main(["search", "--index", idx, "--queries", str(tmp_path / "t.npy"), "-k", "5",
                 "-o", str(tmp_path / "r.npz")]) == 0
    assert json.loads(capsys.readouterr().out)["traffic_shift"] is False  # test queries like the training ones
    assert np.load(tmp_path / "r.npz")["I"].shape == (500, 5)
    assert main(["--quiet", "eval", "--index", idx, "--keys", str(tmp_path / "k.npy"), "--queries",
                 str(tmp_path / "t.npy"), "--target-recall", "0.99"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["match_rate"] >= 0.95 and 0 < report["recall@10"] <= 1
    assert main(["info", "--index", idx]) == 0
    assert json.loads(capsys.readouterr().out)["nlist"] == 32


def test_clear_errors_for_missing_and_invalid_files(tmp_path, capsys):
    assert main(["info", "--index", str(tmp_path / "nope.amips")]) == 2
    assert "no index file" in capsys.readouterr().err
    (tmp_path / "bad.amips").write_bytes(b"garbage")
    assert main(["info", "--index", str(tmp_path / "bad.amips")]) == 2
    assert "not an amips_faiss index" in capsys.readouterr().err
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert main(["build", "--keys", str(tmp_path / "obj.npy"), "-o", str(tmp_path / "x")]) == 2
    assert "not a plain numeric" in capsys.readouterr().err


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "amips_faiss.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "build" in out.stdout
