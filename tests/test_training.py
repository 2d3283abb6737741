import numpy as np
import pytest
import torch

from amips_faiss.data import make_clustered
from amips_faiss.nn import KeyNet, SupportNet
from amips_faiss.targets import SupportTargets, split_queries, support_values
from amips_faiss.training import TrainConfig, fit, router_loss, train_direct, train_router

D = 32


def lists_needed(scores: np.ndarray, target_lists: np.ndarray) -> np.ndarray:
    """How many lists a router probes, in its score order, to reach ``target_lists [n]``."""
    target = np.take_along_axis(scores, target_lists[:, None], axis=1)
    return (scores > target).sum(axis=1) + 1


@pytest.fixture(scope="module")
def routed():
    """Synthetic keys in 141 lists (faiss k-means), exact per-list targets for train/val/test."""
    import faiss
    keys, queries = make_clustered(20_000, 14_000, D, seed=2)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(D), D, 141, faiss.METRIC_INNER_PRODUCT)
    ivf.train(keys)
    assign = ivf.quantizer.assign(keys, 1).reshape(-1)
    parts = split_queries(queries, {"train": 0.8, "val": 0.05, "test": 0.15}, seed=0)
    t = {n: support_values(keys, queries[r], assign, 141, progress=False) for n, r in parts.items()}
    return keys, queries, parts, t, ivf.quantizer.reconstruct_n(0, 141)


def test_router_beats_centroids_and_finds_the_argmax_list_in_top2(routed):
    keys, queries, parts, t, centroids = routed
    scale = float(np.median(np.abs(t["train"].values) / np.linalg.norm(queries[parts["train"]], axis=1)))
    model = SupportNet(D, 141, width=64, depth=2, scale=scale)
    model.init_linear(torch.as_tensor(centroids / scale))
    summary = train_router(model, queries[parts["train"]], t["train"].cluster_values, queries[parts["val"]],
                           t["val"].cluster_values, TrainConfig(steps=1500, batch_size=512, progress=False))
    assert summary["steps"] > 0
    test_q = queries[parts["test"]]
    best = t["test"].cluster_values.argmax(axis=1)
    with torch.no_grad():
        learned = lists_needed(model(torch.as_tensor(test_q)).numpy(), best)
    centroid = lists_needed(test_q @ centroids.T, best)
    assert np.mean(learned <= 2) >= 0.95
    assert np.mean(learned <= 1) > np.mean(centroid <= 1) + 0.05


@pytest.mark.parametrize("kind", ["supportnet", "keynet"])
def test_direct_prediction_beats_most_frequent_argmax(routed, kind):
    keys, queries, parts, t, _ = routed
    torch.manual_seed(0)
    scale = float(np.median(np.linalg.norm(keys, axis=1)))
    model = SupportNet(D, 1, width=128, depth=3, scale=scale) if kind == "supportnet" else \
        KeyNet(D, width=128, depth=2, scale=scale)
    lr = 1e-2 if kind == "supportnet" else 3e-3
    summary = train_direct(model, keys, queries[parts["train"]], t["train"], queries[parts["val"]], t["val"],
                           TrainConfig(steps=800, batch_size=512, lr=lr, progress=False))
    most_frequent = np.mean(t["val"].ids == np.bincount(t["train"].ids).argmax())
    # SupportNet learns the key through its gradient, slower on CPU than KeyNet's direct output
    assert summary["best"] > (2 * most_frequent if kind == "supportnet" else most_frequent + 0.3)


def test_router_loss_prefers_the_right_order_and_ignores_empty_lists():
    h = torch.tensor([[3.0, 1.0, -float("inf")]])
    good, bad = torch.tensor([[2.9, 1.1, 0.0]]), torch.tensor([[1.1, 2.9, 0.0]])
    norm, scale = torch.ones(1), torch.tensor(1.0)
    assert router_loss(good, h, norm, scale) < router_loss(bad, h, norm, scale)
    # whatever the router says of an empty list (h_c = −inf) costs nothing, and stays finite
    far = torch.tensor([[2.9, 1.1, 1e6]])
    assert torch.isfinite(router_loss(far, h, norm, scale))
    assert router_loss(far, h, norm, scale) == pytest.approx(float(router_loss(good, h, norm, scale)), rel=1e-5)


@pytest.mark.parametrize("field, value", [("steps", 0), ("batch_size", 2.5), ("lr", -1.0), ("lr", float("nan")),
                                          ("augment", -1), ("transplant", -0.5), ("n_calibration", "many"),
                                          ("ema_decay", 1.0), ("time_limit", 0), ("eval_every", 0),
                                          ("progress", "yes"), ("checkpoint", 3)])
def test_train_config_refuses_bad_values(field, value):
    with pytest.raises((ValueError, TypeError), match=field):
        TrainConfig(**{field: value})


def test_train_config_derives_the_validation_interval():
    assert TrainConfig(steps=4000).validation_interval == 250
    assert TrainConfig(steps=300).validation_interval == 50
    assert TrainConfig(steps=300, eval_every=7).validation_interval == 7


def _toy_problem():
    torch.manual_seed(0)
    x = torch.randn(512, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    model = torch.nn.Linear(4, 1)
    loss = lambda m, rows: ((m(x[rows])[:, 0] - y[rows]) ** 2).mean()  # noqa: E731
    val = lambda m: -float(((m(x)[:, 0] - y) ** 2).mean())  # noqa: E731
    return model, loss, val


def test_interrupted_training_resumes_where_it_stopped(tmp_path):
    ckpt = str(tmp_path / "run.pt")
    config = TrainConfig(steps=300, batch_size=64, eval_every=50, patience=100, progress=False, device="cpu")
    model, loss, val = _toy_problem()
    reference = fit(model, loss, 512, val, config)
    reference_weights = model.weight.detach().clone()

    model, loss, val = _toy_problem()
    calls = {"n": 0}

    def interrupting(m, rows):
        calls["n"] += 1
        if calls["n"] == 175:
            raise KeyboardInterrupt
        return loss(m, rows)
    with pytest.raises(KeyboardInterrupt):
        fit(model, interrupting, 512, val, TrainConfig(**{**config.__dict__, "checkpoint": ckpt}))
    model, loss, val = _toy_problem()
    resumed = fit(model, loss, 512, val, TrainConfig(**{**config.__dict__, "checkpoint": ckpt}))
    assert resumed["steps"] == reference["steps"] == 300
    assert torch.allclose(model.weight, reference_weights, atol=1e-6)
    with pytest.raises(ValueError, match="other settings"):
        fit(model, loss, 512, val, TrainConfig(**{**config.__dict__, "checkpoint": ckpt, "lr": 1.0}))


def test_early_stopping_keeps_the_best_weights():
    model, loss, val = _toy_problem()
    scores = iter([0.5, 0.9, 0.1, 0.1, 0.1, 0.1])
    summary = fit(model, loss, 512, lambda m: next(scores),
                  TrainConfig(steps=10_000, eval_every=10, patience=3, progress=False, device="cpu"))
    assert summary["best"] == 0.9 and summary["best_step"] == 20 and summary["steps"] == 50


@pytest.mark.parametrize("dim, nlist, size, rank", [
    (200, 1100, {}, 64),                      # many lists, wide keys: the low-rank linear term
    (200, 1000, {}, None),                    # up to 1,024 lists: full
    (64, 2000, {}, None),                     # narrow keys: full
    (200, 1100, {"linear_rank": 200}, None),  # linear_rank=d asks for the full term
    (200, 1100, {"linear_rank": 16}, 16),
])
def test_the_router_linear_term_is_low_rank_only_where_it_pays(dim, nlist, size, rank):
    from amips_faiss.fitting import TrainingSet, new_model
    rng = np.random.default_rng(0)
    q = rng.standard_normal((20, dim)).astype(np.float32)
    targets = SupportTargets(np.ones(20, np.float32), np.zeros(20, np.int64))
    data = TrainingSet(q, targets, q, targets, q, targets)
    centroids = rng.standard_normal((nlist, dim)).astype(np.float32)
    model = new_model("supportnet", q, data, centroids, size)
    assert model.linear_rank == rank
    linear = [tuple(p.shape) for name, p in model.named_parameters() if name.startswith("linear")]
    assert linear == ([(nlist, dim)] if rank is None else [(nlist, rank), (rank, dim)])
