"""Offline analysis for issue 10: does calibrating the confidence margin *per bin* of the router's
own forecast keep the target under query shift? (Mondrian-style conformal calibration: coverage then
holds within each bin, so traffic that moves towards weakly matched queries stays covered.)

Same set-up as ``benchmarks/shift.py`` (Debian, keys = the first 10,000 packages, router trained on
their titles; tests: held-out titles of the same packages, and titles of the next 2,000 packages).
For the index's default schedule it replays the probe rounds on the calibration queries and on both
test sets (exact per-list values known) and compares one global margin τ with per-bin margins τ_b,
bins = quantiles of the calibration queries' feature:

- ``support``: the router's forecast for its first list / ||q|| (how well the best list matches);
- ``flat``: (first − second forecast) / ||q|| (how clear the winner is);
- ``surprise``: (best exact value in the first round's lists − the first forecast) / ||q||, known
  after the first round, before its test (how far the router missed this query), and its absolute
  value ``abs_surprise``. Measured: at target 0.95 on the next packages' titles 0.933 with 4 bins,
  against 0.948 with 4 ``support`` bins and 0.918 with one margin.

It reads the index's calibration data (private attributes): analysis code, not an API.

    python -m benchmarks.shift_conditional
"""
from __future__ import annotations

import numpy as np

from amips_faiss import confidence
from amips_faiss.targets import support_values

from .shift import shifted_debian


def main() -> None:
    keys, index, test_sets, _ = shifted_debian()
    nlist, p = index.nlist, index._merge(None)
    ends = confidence.probe_schedule(p.nprobe, p.max_nprobe, nlist)
    assign = index.ivf.quantizer.assign(keys, 1).reshape(-1)

    def prepared(queries, values):
        scores, lists = index.router.route(queries, min(ends[-1] + 1, nlist))
        q_norm = np.linalg.norm(queries, axis=1)
        found_first = np.take_along_axis(values, lists[:, :ends[0]].clip(0), axis=1).max(axis=1)
        surprise = (found_first - scores[:, 0]) / q_norm
        features = {"support": scores[:, 0] / q_norm, "flat": (scores[:, 0] - scores[:, 1]) / q_norm,
                    "surprise": surprise, "abs_surprise": np.abs(surprise)}
        return (scores, lists, values, q_norm), features

    calibration = prepared(index._calibration_queries, index._calibration_values)
    tests = {name: prepared(q, support_values(keys, q, assign, nlist, progress=False).cluster_values)
             for name, q in test_sets.items()}

    def outcome(replayed, taus):
        round_gaps, round_correct, fallback_correct = replayed
        sure = round_gaps <= taus[:, None]
        stop = np.where(sure.any(axis=1), sure.argmax(axis=1), len(ends))
        right = np.where(stop < len(ends), round_correct[np.arange(len(stop)), stop.clip(max=len(ends) - 1)],
                         fallback_correct)
        return right.mean(), np.append(np.asarray(ends, float), nlist)[stop].mean()

    for target in (0.95, 0.99):
        for blend in (0.0, 0.25):
            def replay(data):
                return confidence.replay(*data, ends, np.ones(len(data[0]), bool), blend)
            critical = confidence.critical_margins(*replay(calibration[0]))
            for feature, n_bins in (("global", 1), ("support", 4), ("flat", 4), ("surprise", 2), ("surprise", 4),
                                    ("abs_surprise", 4)):
                values = calibration[1]["support" if feature == "global" else feature]
                edges = np.quantile(values, np.linspace(0, 1, n_bins + 1)[1:-1])
                bins = np.searchsorted(edges, values)
                taus = np.array([confidence.margin_for_recall(critical[bins == b], target)[0] for b in range(n_bins)])
                cells = []
                for name, (data, features) in tests.items():
                    f = features["support" if feature == "global" else feature]
                    match, lists = outcome(replay(data), taus[np.searchsorted(edges, f)])
                    cells.append(f"{name} {match:.4f} ({lists:.1f} lists)")
                print(f"target {target} blend {blend} {feature:7s} B={n_bins}: " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
