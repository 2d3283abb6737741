import math

import pytest
import torch
import torch.nn.functional as F

from amips_faiss.nn import KeyNet, SupportNet, count_parameters, soft_leaky_relu


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
    clone = SupportNet(net.dim, net.n_outputs, width=net.width, depth=net.depth).double()
    clone.load_state_dict(net.state_dict())
    return clone


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
    a = torch.randn(10_000, 16, generator=g, dtype=torch.float64) * torch.rand(10_000, 1, generator=g) * 10
    b = torch.randn(10_000, 16, generator=g, dtype=torch.float64)
    mid = net((a + b) / 2)
    assert (mid <= (net(a) + net(b)) / 2 + 1e-9).all()
    assert net(torch.zeros(3, 16, dtype=torch.float64)).abs().max() == 0


def test_sign_constraints_hold_after_steps_and_loading():
    net = _reload(_trained_supportnet())
    for raw in list(net.hidden_raw) + [net.out_raw] + list(net.bias_raw) + [net.out_bias_raw]:
        assert (F.softplus(raw) >= 0).all()
    # the constraint is structural: even raw parameters pushed far negative give non-negative weights
    with torch.no_grad():
        for raw in net.hidden_raw:
            raw.fill_(-50.0)
    a, b = torch.randn(1000, 16, dtype=torch.float64), torch.randn(1000, 16, dtype=torch.float64)
    assert (net((a + b) / 2) <= (net(a) + net(b)) / 2 + 1e-9).all()


def test_convexity_fails_without_constraints():
    """The convexity test has teeth: a net with a negative hidden weight is caught by it."""
    torch.manual_seed(3)
    net = SupportNet(4, 1, width=8, depth=2).double()
    a, b = torch.randn(10_000, 4, dtype=torch.float64), torch.randn(10_000, 4, dtype=torch.float64)

    def g_unconstrained(x):  # same structure, but the hidden-to-output weights are negative
        z = soft_leaky_relu(x @ net.input_weights[0].T + 1.0)
        return -(z.sum(dim=1, keepdim=True))
    f = lambda q: q.norm(dim=1, keepdim=True) * g_unconstrained(q / q.norm(dim=1, keepdim=True))  # noqa: E731
    assert ((f((a + b) / 2) - (f(a) + f(b)) / 2) > 1e-6).any()


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
    multi = KeyNet(12, n_outputs=4, width=16, depth=1)
    assert multi(torch.randn(5, 12)).shape == (5, 4, 12)


@pytest.mark.parametrize("cls", [SupportNet, KeyNet])
def test_from_budget_is_the_widest_net_within_budget(cls):
    budget = int(0.2 * 5000 * 64)
    net = cls.from_budget(64, 1, budget)
    assert count_parameters(net) <= budget
    wider = cls(64, 1, width=net.width + 1, depth=net.depth)
    assert count_parameters(wider) > budget
    with pytest.raises(ValueError, match="budget"):
        cls.from_budget(64, 1, 10)


def test_linear_supportnet_is_the_centroid_router_at_init():
    centroids = torch.randn(7, 5)
    net = SupportNet(5, 7, depth=0, scale=2.0)
    net.init_linear(centroids / 2.0)
    q = torch.randn(20, 5)
    bias = 2.0 * F.softplus(net.out_bias_raw) * q.norm(dim=1, keepdim=True)
    assert torch.allclose(net(q), q @ centroids.T + bias, atol=1e-5)
    assert math.isclose(float(F.softplus(net.out_bias_raw)[0]), 1e-3, rel_tol=1e-3)
