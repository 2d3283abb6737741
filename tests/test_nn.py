import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from amips_faiss import nn as amips_nn
from amips_faiss.nn import KeyNet, SupportNet, count_parameters, model_from_config, soft_leaky_relu


def _trained_supportnet(n_outputs=1, steps=30):
    """A SupportNet after some optimizer steps on a random convex target (max of linear maps)."""
    torch.manual_seed(0)
    net = SupportNet(16, n_outputs, width=32, depth=3)
    keys = torch.randn(50, 16) * torch.rand(50, 1) * 10
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(steps):
        q = torch.randn(256, 16)
        loss = ((net(q) - (q @ keys.T).max(dim=1).values[:, None]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.double()


def _reload(net):
    return model_from_config(net.config(), net.state_dict()).double()


def _midpoint_convexity_violation(net, n=10_000, seed=0) -> float:
    """max over random pairs of f((a+b)/2) − (f(a)+f(b))/2: ≤ 0 (up to rounding) for a convex net."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, net.dim, generator=g, dtype=torch.float64) * torch.rand(n, 1, generator=g, dtype=torch.float64) * 10
    b = torch.randn(n, net.dim, generator=g, dtype=torch.float64)
    with torch.no_grad():
        return float((net((a + b) / 2) - (net(a) + net(b)) / 2).max())


@pytest.mark.parametrize("reload", [False, True])
def test_homogeneity_euler_convexity_after_training(reload):
    net = _trained_supportnet(n_outputs=3)
    if reload:
        net = _reload(net)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2000, 16, generator=g, dtype=torch.float64) * 5
    f = net(q)
    for lam in (1e-3, 0.5, 7.0, 1e3):
        assert torch.allclose(net(lam * q), lam * f, rtol=1e-9, atol=1e-12)
    for out in range(3):
        grad = net.argmax_key(q, output=out)
        assert torch.allclose((grad * q).sum(dim=1), f[:, out], rtol=1e-9, atol=1e-9)
    assert _midpoint_convexity_violation(net) <= 1e-9
    assert net(torch.zeros(3, 16, dtype=torch.float64)).abs().max() == 0


def _scramble_raw_parameters(net, seed=0):
    """Set every sign-constrained raw parameter to random values in [−3, 3]."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for raw in list(net.hidden_raw) + [net.out_raw] + list(net.bias_raw) + [net.out_bias_raw]:
            raw.copy_(3 * (2 * torch.rand(raw.shape, generator=g, dtype=raw.dtype) - 1))


def test_convexity_holds_for_any_raw_parameters_after_loading():
    """The sign constraints are structural: whatever values the raw parameters take (here random
    ones in [−3, 3], half of them negative, after a save/load), the net stays convex and 1-homogeneous."""
    net = _reload(_trained_supportnet())
    _scramble_raw_parameters(net)
    assert _midpoint_convexity_violation(net) <= 1e-9
    q = torch.randn(100, 16, dtype=torch.float64)
    assert torch.allclose(net(3.5 * q), 3.5 * net(q), rtol=1e-9)


def test_convexity_check_catches_a_supportnet_without_its_constraints(monkeypatch):
    """The convexity test has teeth: the same SupportNet with its positivity map replaced by the
    identity (the reference code's 'identity rectifier') and the same scrambled raw parameters is
    not convex, and the check above catches it."""
    net = _reload(_trained_supportnet())
    _scramble_raw_parameters(net)
    monkeypatch.setattr(amips_nn, "_positive", lambda raw: raw)
    assert _midpoint_convexity_violation(net) > 1e-3


def test_soft_leaky_relu_is_convex_nondecreasing():
    u = torch.linspace(-5, 5, 1001, dtype=torch.float64)
    y = soft_leaky_relu(u)
    assert (torch.diff(y) > 0).all()
    assert (torch.diff(y, n=2) >= -1e-12).all()


def test_keynet_scale_invariance_and_shapes():
    torch.manual_seed(0)
    net = KeyNet(12, width=32, depth=2).double()
    q = torch.randn(100, 12, dtype=torch.float64)
    out = net(q)
    assert out.shape == (100, 12)
    for lam in (1e-3, 3.0, 1e3):
        assert torch.allclose(net(lam * q), out, atol=1e-9)
    reloaded = model_from_config(net.config(), net.state_dict()).double()
    assert torch.equal(reloaded(q), out)
    with pytest.raises(ValueError, match="unknown model kind"):
        model_from_config({"kind": "Pickle"}, {})


@pytest.mark.parametrize("cls", [SupportNet, KeyNet])
def test_from_budget_is_the_widest_net_within_budget(cls):
    budget = int(0.2 * 5000 * 64)
    net = cls.from_budget(64, budget, depth=3)
    assert count_parameters(net) <= budget and net.depth == 3
    wider = cls(64, width=net.width + 1, depth=net.depth)
    assert count_parameters(wider) > budget
    with pytest.raises(ValueError, match="budget"):
        cls.from_budget(64, 10)


def test_linear_supportnet_is_the_centroid_router_at_init():
    centroids = torch.randn(7, 5)
    net = SupportNet(5, 7, depth=0, scale=2.0)
    net.init_linear(centroids / 2.0)
    q = torch.randn(20, 5)
    bias = 2.0 * F.softplus(net.out_bias_raw) * q.norm(dim=1, keepdim=True)
    assert torch.allclose(net(q), q @ centroids.T + bias, atol=1e-5)
    assert math.isclose(float(F.softplus(net.out_bias_raw.detach())[0]), 1e-3, rel_tol=1e-3)


@pytest.mark.parametrize("depth, rank", [(0, None), (2, None), (3, 4)])
def test_frozen_supportnet_computes_the_same_f_in_numpy(depth, rank):
    torch.manual_seed(0)
    net = SupportNet(16, 7, width=24, depth=depth, linear_rank=rank, scale=3.0)
    if depth:
        _scramble_raw_parameters(net)
    q = torch.randn(50, 16) * torch.rand(50, 1) * 10
    q[0] = 0
    with torch.no_grad():
        expect = net(q).numpy()
    got = net.frozen()(q.numpy())
    assert got.dtype == expect.dtype and got.shape == expect.shape
    np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-4 * np.abs(expect).max())
    assert (got[0] == 0).all()
