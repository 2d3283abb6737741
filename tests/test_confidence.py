import itertools

import numpy as np
import pytest

from amips_faiss import confidence
from amips_faiss.confidence import (Calibration, TrafficMonitor, calibrate_margin, cheapest_first_round,
                                    critical_margins, gap, gaps, margin_for_recall, mean_cost, probe_schedule,
                                    shifted, weighted_margin)


def test_probe_schedule_doubles_up_to_the_cap():
    assert probe_schedule(2, 20, 100) == [2, 4, 8, 16, 20]
    assert probe_schedule(4, 4, 100) == [4]
    assert probe_schedule(8, 500, 50) == [8, 16, 32, 50]


def test_gaps_handle_missing_results_and_exhausted_lists():
    g = gaps(np.array([2.0, 1.0, -np.inf]), np.array([1.0, -np.inf, 5.0]), np.array([2.0, 1.0, 1.0]))
    assert g.tolist() == [0.5, np.inf, -np.inf]


def test_the_one_query_gap_equals_the_batch_gaps():
    rng = np.random.default_rng(0)
    values = [-np.inf, -1.5, 0.0, 0.7, 3.0]
    cases = list(itertools.product(values, values, [0.5, 2.0], [-1.0, 4.0], [0.0, 0.25]))
    cases += [tuple(rng.normal(size=2)) + (float(rng.uniform(0.1, 3)), float(rng.normal()), 0.5) for _ in range(50)]
    for next_score, found, q_norm, first, blend in cases:
        batch = gaps(np.array([next_score], np.float32), np.array([found], np.float32), np.array([q_norm]),
                     np.array([first]), blend)[0]
        one = gap(float(np.float32(next_score)), float(np.float32(found)), q_norm, first, blend)
        assert one == pytest.approx(batch, rel=1e-12, abs=0) or (np.isinf(one) and one == batch), \
            (next_score, found, q_norm, first, blend)


def test_blended_gap_moves_the_reference_towards_the_routers_first_forecast():
    next_scores, found, first = np.array([3.0, 3.0]), np.array([2.0, 4.0]), np.array([4.0, 2.0])
    q_norm = np.array([1.0, 2.0])
    assert gaps(next_scores, found, q_norm, first, blend=0.0).tolist() == [1.0, -0.5]
    assert gaps(next_scores, found, q_norm, first, blend=0.5).tolist() == [0.0, 0.0]
    # a query that beat its forecast (found > first) is less sure after blending
    assert gaps(next_scores, found, q_norm, first, 0.5)[1] > gaps(next_scores, found, q_norm, first, 0.0)[1]


def test_mean_cost_counts_lists_and_rounds_until_sure_and_the_fallback():
    round_gaps = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert mean_cost(round_gaps, 0.5, [2, 4, 8], fallback_lists=100) == pytest.approx(((2 + 4 + 108) / 3, (1 + 2 + 4) / 3))


def _simulate(tau, round_gaps, round_correct, fallback_correct):
    """Reference: walk the rounds of each query one by one."""
    right = []
    for g, c, fb in zip(round_gaps, round_correct, fallback_correct):
        stop = next((r for r in range(len(g)) if g[r] <= tau), None)
        right.append(fb if stop is None else c[stop])
    return np.mean(right)


def test_critical_margins_agree_with_step_by_step_simulation():
    rng = np.random.default_rng(0)
    n, R = 300, 4
    round_gaps = rng.normal(size=(n, R))
    first = rng.integers(0, R + 1, n)
    round_correct = np.arange(R)[None, :] >= first[:, None]
    fallback_correct = (rng.random(n) < 0.7) | round_correct[:, -1]  # the fallback only adds lists
    crit = critical_margins(round_gaps, round_correct, fallback_correct)
    for tau in itertools.chain(np.linspace(-3, 3, 41), [-np.inf, 1e300]):
        assert np.mean(tau < crit) == pytest.approx(_simulate(tau, round_gaps, round_correct, fallback_correct))


@pytest.mark.parametrize("target", [0.5, 0.8, 0.95, 0.99])
def test_calibrated_margin_reaches_the_target_and_is_the_largest_that_does(target):
    crit = np.random.default_rng(1).normal(size=1000)
    tau, recall = margin_for_recall(crit, target)
    assert recall >= target and recall == np.mean(tau < crit)
    assert np.mean(np.nextafter(tau, np.inf) + 1e-9 < crit) < recall


def test_unreachable_target_gives_never_sure():
    crit = np.array([np.inf, 1.0, -np.inf, -np.inf])
    tau, recall = margin_for_recall(crit, 0.99)
    assert tau == -np.inf and recall == 0.5


@pytest.mark.parametrize("n, target", [(5000, 1.0), (98, 0.99), (18, 0.95)])
def test_a_target_the_sample_cannot_certify_means_never_sure(n, target):
    """⌈t·(n+1)⌉ > n: no margin is certified by n queries, even when every one of them is right
    at any margin (critical margins all +inf): every query must go to the fallback."""
    tau, recall = margin_for_recall(np.full(n, np.inf), target)
    assert tau == -np.inf and recall == 1.0
    tau, _ = margin_for_recall(np.full(n + 1, np.inf), target)
    assert tau == (np.inf if np.ceil(target * (n + 2)) <= n + 1 else -np.inf)


def test_target_met_at_the_first_round_gives_always_sure_with_its_true_recall():
    crit = np.array([np.inf] * 97 + [0.5, -1.0, -np.inf])
    tau, recall = margin_for_recall(crit, 0.95)
    assert tau == np.inf and recall == 0.97


def test_calibrate_margin_sends_exactly_the_wrong_first_rounds_to_the_fallback():
    """Three lists, one round of one list then the exact fallback. The router ranks list 0 first
    for every query; it is the argmax list for 90 of 100 queries."""
    n = 100
    cluster_values = np.tile(np.array([[2.0, 1.0, 0.0]], np.float32), (n, 1))
    cluster_values[:10] = [1.0, 2.0, 0.0]  # the router's first list is wrong for these
    route_lists = np.tile(np.arange(3), (n, 1))
    route_scores = np.tile(np.array([[1.5, 1.25, 0.125]], np.float32), (n, 1))
    q_norm = np.ones(n)
    result = calibrate_margin(route_scores, route_lists, cluster_values, q_norm, [1], np.ones(n, bool), 2, 0.95,
                              blends=(0.0,))
    assert isinstance(result, Calibration) and result.blend == 0.0
    # the wrong queries found 1.0 < next prediction 1.25 (gap 0.25): they must be unsure; the right
    # ones found 2.0 (gap −0.75) and may stop
    assert -0.75 <= result.margin < 0.25 and result.recall == 1.0
    never = calibrate_margin(route_scores, route_lists, cluster_values, q_norm, [1], np.zeros(n, bool), 0, 0.95,
                             blends=(0.0,))
    assert never.recall == 0.9 and never.margin == -np.inf


def test_cheapest_first_round_weighs_rounds_against_lists_and_needs_the_target():
    def cal(recall, lists, rounds):
        return Calibration(0.0, 0.0, recall, lists=lists, rounds=rounds)
    # 1 list first: 10 lists in 4 rounds (cost 22); 8 first: 12 lists in 1.5 rounds (16.5); 16 first misses
    calibrations = {1: cal(0.95, 10.0, 4.0), 8: cal(0.95, 12.0, 1.5), 16: cal(0.94, 16.0, 1.0)}
    assert cheapest_first_round(calibrations, 0.95) == 8
    assert cheapest_first_round({**calibrations, 16: cal(0.96, 16.0, 1.0)}, 0.95) == 8  # 19 > 16.5
    assert cheapest_first_round({1: cal(0.9, 5.0, 1.0)}, 0.95) is None


@pytest.mark.parametrize("n, target", [(1000, 0.95), (2003, 0.99), (40, 0.9), (18, 0.95)])
def test_equal_weights_give_the_unweighted_margin(n, target):
    rng = np.random.default_rng(n)
    crit = np.concatenate([np.round(rng.normal(size=n - 6), 2), [np.inf] * 3, [-np.inf] * 3])  # ties and infinities
    order = np.sort(crit)[::-1]
    assert weighted_margin(order, np.ones(n), target) == margin_for_recall(crit, target)[0]
    assert weighted_margin(order, np.full(n, 3.5), target) == margin_for_recall(crit, target)[0]


def test_weights_on_the_hard_queries_tighten_the_margin_to_their_own_recall():
    """Half the queries easy (critical margin high), half hard: weighting the hard half 9:1 gives
    a margin reaching the target on the weighted mixture, which is stricter than the unweighted one."""
    rng = np.random.default_rng(0)
    easy, hard = rng.normal(1.0, 0.3, 2000), rng.normal(0.0, 0.3, 2000)
    crit = np.concatenate([easy, hard])
    order = np.argsort(-crit)
    weights = np.where(np.arange(4000) >= 2000, 9.0, 1.0)
    tau = weighted_margin(crit[order], weights[order], 0.9)
    assert tau < margin_for_recall(crit, 0.9)[0]
    recall = 0.1 * np.mean(tau < easy) + 0.9 * np.mean(tau < hard)
    assert 0.9 <= recall < 0.9 + 0.005


def test_the_shift_test_passes_same_shares_and_flags_moved_ones():
    rng = np.random.default_rng(0)
    calibration = np.bincount(rng.integers(0, 8, 2000), minlength=8)
    false_alarms = sum(shifted(calibration, np.bincount(rng.integers(0, 8, 3000), minlength=8)) for _ in range(200))
    assert false_alarms <= 3  # the test's level is 0.001
    moved = np.bincount(np.minimum(rng.integers(0, 8, 3000), rng.integers(0, 8, 3000)), minlength=8)
    assert shifted(calibration, moved)


def _monitor(n: int = 4000, seed: int = 0, target: float = 0.9, blend: float = 0.0):
    """A monitor on calibration queries whose strength predicts how hard they are: strength and
    surprise ~ U(0, 1), critical margin (blend 0) ~ N(strength, 0.2)."""
    rng = np.random.default_rng(seed)
    strength, surprise = rng.random(n), rng.random(n)
    crit = rng.normal(strength, 0.2)
    return TrafficMonitor(strength, surprise, crit, crit, target, margin_for_recall(crit, target)[0], blend), rng


def test_traffic_like_the_calibration_keeps_the_margin_and_blend():
    monitor, rng = _monitor(blend=0.5)
    assert monitor.observe(rng.random(3000), rng.random(3000)) == (monitor.margin, 0.5, False)  # a batch on its own
    for _ in range(200):  # small batches, judged on the history
        assert monitor.observe(rng.random(16), rng.random(16)) == (monitor.margin, 0.5, False)


def test_weak_traffic_tightens_the_margin_to_reach_the_target_on_it():
    """Traffic that only has the weakest half of the strengths: the monitor flags it, drops the
    blend, and its margin reaches the target on that traffic, where the calibration's misses it."""
    monitor, rng = _monitor(blend=0.5)
    weak = rng.random(3000) * 0.5
    crit = rng.normal(weak, 0.2)  # the same law as the calibration's, on weaker queries
    margin, blend, is_shifted = monitor.observe(weak, rng.random(3000))
    assert is_shifted and blend == 0.0 and margin < monitor.margin
    assert np.mean(monitor.margin < crit) < 0.88  # the calibration's margin misses the target
    assert np.mean(margin < crit) >= 0.9 - 3 * np.sqrt(0.09 / 3000)


def test_surprising_traffic_is_flagged():
    monitor, rng = _monitor()
    assert monitor.observe(rng.random(3000), 0.5 + rng.random(3000) * 0.5)[2]


def test_small_batches_follow_the_history():
    monitor, rng = _monitor()
    verdicts = [monitor.observe(rng.random(8) * 0.5, rng.random(8))[2] for _ in range(100)]
    assert not any(verdicts[:confidence.MIN_EVIDENCE // 8 - 1]) and all(verdicts[-20:])


def test_easy_traffic_keeps_the_calibrated_test():
    """Traffic moved towards strong queries is flagged, but the calibrated margin and blend,
    re-weighted to it, still reach the target: they are kept (never loosened)."""
    monitor, rng = _monitor(blend=0.5)
    assert monitor.observe(0.5 + rng.random(3000) * 0.5, rng.random(3000)) == (monitor.margin, 0.5, True)


def test_one_query_observations_match_the_array_version():
    (a, rng), (b, _) = _monitor(), _monitor()
    strength, surprise = rng.random(400) * 0.6, rng.random(400)
    strength[:3] = a.strength_edges[:3]  # ties with the edges fall in the same cell
    for s, u in zip(strength, surprise):
        assert a.observe(np.array([s]), np.array([u])) == b.observe_one(float(s), float(u))
    assert a.observe(strength[:1], surprise[:1])[2]  # the history is now shifted
