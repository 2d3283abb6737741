"""Learned support functions: SupportNet (convex, 1-homogeneous) and KeyNet. Pure torch.

Notation: q ∈ R^d a query, x = q/||q|| its direction, h(q) = max_i <q, k_i> the support function
of the keys (convex, positively 1-homogeneous, ∇h(q) = argmax key).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def soft_leaky_relu(u: torch.Tensor, alpha: float = 0.1, beta: float = 20.0) -> torch.Tensor:
    """σ(u) = α·u + (1−α)·softplus_β(u): convex, non-decreasing, smooth.

    torch's softplus turns into the identity past β·u > threshold; at threshold 40 the jump there is
    e^−40/β ≈ 10^−19, below float64 resolution, so σ stays convex to machine precision.
    """
    return alpha * u + (1.0 - alpha) * F.softplus(u, beta=beta, threshold=40.0)


def _positive(raw: torch.Tensor) -> torch.Tensor:
    """The non-negative weight a free parameter stands for: softplus(raw) ≥ 0."""
    return F.softplus(raw)


def _inverse_softplus(y: float) -> float:
    """The raw parameter v with softplus(v) = y (y > 0)."""
    return y + math.log(-math.expm1(-y))


def _unit(q: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """(||q|| [n, 1], q/||q|| [n, d]); the zero vector maps to direction 0."""
    norm = q.norm(dim=-1, keepdim=True)
    return norm, q / norm.clamp_min(eps)


class SupportNet(nn.Module):
    """Input-convex network wrapped to be positively 1-homogeneous: f(q) = s·||q||·g(q/||q||).

    With x = q/||q||, σ the soft leaky ReLU, W_z ≥ 0, A ≥ 0 and biases b, c ≥ 0::

        z_1     = σ(W_0 x + b_0)
        z_{l+1} = σ(W_z,l z_l + W_x,l x + b_l)           (the input re-injected in every layer)
        g_m(x)  = <A_m, z_L> + <w_m, x> + c_m            (one output m per IVF list / target)

    g is convex (non-negative sums of convex non-decreasing maps of affine functions).
    f is 1-homogeneous by construction, so Euler holds: <∇f(q), q> = f(q), and ∇f(q) is the
    predicted argmax key. f is also convex: f(q) = P(q, ||q||) with P(q, t) = t·g(q/t) the
    (jointly convex) perspective of g, and ∂P/∂t = g(x) − <∇g(x), x>, the intercept of g's tangent
    plane, is ≥ 0 when every bias is ≥ 0 (σ(u) − u·σ'(u) ≥ 0 is a binary entropy, and intercepts
    propagate through W_z ≥ 0) — so P is non-decreasing in t and its composition with the convex
    ||q|| is convex. All sign constraints are held by parametrisation (softplus of a free
    parameter), so they hold after every optimizer step and after loading.

    ``linear_rank`` r < d factors w = U·V (cost r·(d + n_outputs) instead of d·n_outputs);
    ``depth=0`` leaves only the linear term: f_m(q) = <w_m, q> + c_m·||q||, a learned linear
    per-list router. ``scale`` s is a fixed positive constant setting the output units.
    Initialisation follows the idea of Hoedt & Klambauer (2023): non-negative weights start at
    1/width, so each layer passes on the mean of the previous one without blowing it up, while the
    centred input injection W_x x carries unit variance into every layer.
    """

    def __init__(self, dim: int, n_outputs: int = 1, width: int = 64, depth: int = 2,
                 linear_rank: int | None = None, scale: float = 1.0,
                 alpha: float = 0.1, beta: float = 20.0):
        super().__init__()
        if depth < 0 or width < 1 or dim < 1 or n_outputs < 1:
            raise ValueError("SupportNet needs dim, n_outputs, width >= 1 and depth >= 0")
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.dim, self.n_outputs, self.width, self.depth = dim, n_outputs, width, depth
        self.linear_rank = linear_rank if linear_rank is not None and linear_rank < dim else None
        self.alpha, self.beta = alpha, beta
        self.register_buffer("scale", torch.tensor(float(scale)))
        zero_bias = _inverse_softplus(1e-3)
        if depth > 0:
            self.input_weights = nn.ParameterList(
                [nn.Parameter(torch.randn(width, dim)) for _ in range(depth)])
            self.hidden_raw = nn.ParameterList(
                [nn.Parameter(torch.full((width, width), _inverse_softplus(1.0 / width))
                              + 0.01 * torch.randn(width, width)) for _ in range(depth - 1)])
            self.bias_raw = nn.ParameterList(
                [nn.Parameter(torch.full((width,), zero_bias)) for _ in range(depth)])
            self.out_raw = nn.Parameter(torch.full((n_outputs, width), _inverse_softplus(0.1 / width))
                                        + 0.01 * torch.randn(n_outputs, width))
        if self.linear_rank is None:
            self.linear = nn.Parameter(torch.randn(n_outputs, dim) / math.sqrt(dim))
        else:
            self.linear_u = nn.Parameter(torch.randn(n_outputs, self.linear_rank) / math.sqrt(self.linear_rank))
            self.linear_v = nn.Parameter(torch.randn(self.linear_rank, dim) / math.sqrt(dim))
        self.out_bias_raw = nn.Parameter(torch.full((n_outputs,), zero_bias))

    @classmethod
    def from_budget(cls, dim: int, n_params: int, **kwargs) -> "SupportNet":
        """The widest SupportNet (other arguments as given) with at most ``n_params`` parameters."""
        return cls(dim, width=_width_for_budget(cls, n_params, dim, **kwargs), **kwargs)

    @torch.no_grad()
    def init_linear(self, weights: torch.Tensor) -> None:
        """Start the linear term at ``weights [n_outputs, dim]`` (e.g. IVF centroids / scale)."""
        weights = torch.as_tensor(weights, dtype=self.out_bias_raw.dtype)
        if self.linear_rank is None:
            self.linear.copy_(weights)
        else:
            u, s, vt = torch.linalg.svd(weights, full_matrices=False)
            r = self.linear_rank
            self.linear_u.copy_(u[:, :r] * s[:r].sqrt())
            self.linear_v.copy_(s[:r].sqrt()[:, None] * vt[:r])

    def g(self, x: torch.Tensor) -> torch.Tensor:
        """The convex network on directions: ``[n, dim]`` → ``[n, n_outputs]``."""
        if self.linear_rank is None:
            out = x @ self.linear.T
        else:
            out = (x @ self.linear_v.T) @ self.linear_u.T
        out = out + _positive(self.out_bias_raw)
        if self.depth > 0:
            act = lambda u: soft_leaky_relu(u, self.alpha, self.beta)  # noqa: E731
            z = act(x @ self.input_weights[0].T + _positive(self.bias_raw[0]))
            for wz, wx, b in zip(self.hidden_raw, list(self.input_weights)[1:], list(self.bias_raw)[1:]):
                z = act(z @ _positive(wz).T + x @ wx.T + _positive(b))
            out = out + z @ _positive(self.out_raw).T
        return out

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """f(q) = scale·||q||·g(q/||q||): ``[n, dim]`` → ``[n, n_outputs]``; f(0) = 0."""
        norm, x = _unit(q)
        return self.scale * norm * self.g(x)

    def argmax_key(self, q: torch.Tensor, output: int = 0) -> torch.Tensor:
        """∇_q f_output(q), the predicted argmax key: ``[n, dim]`` → ``[n, dim]`` (batched autograd)."""
        with torch.enable_grad():
            q = q.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self(q)[:, output].sum(), q)
        return grad

    @torch.no_grad()
    def frozen(self) -> "FrozenSupportNet":
        """This net's f on a snapshot of its weights, in numpy (see ``FrozenSupportNet``)."""
        positive = lambda raw: _positive(raw).float().numpy()  # noqa: E731
        as_numpy = lambda t: t.detach().float().numpy()  # noqa: E731
        s = float(self.scale)
        low_rank = self.linear_rank is not None
        inputs = [as_numpy(self.linear_v)] if low_rank else []  # the products of q, in one BLAS call
        outputs = [s * as_numpy(self.linear_u if low_rank else self.linear)]
        hidden, biases = [], []
        if self.depth > 0:
            inputs += [as_numpy(w) for w in self.input_weights]
            hidden = [positive(wz) for wz in self.hidden_raw]
            biases = [positive(b) for b in self.bias_raw]
            outputs.append(s * positive(self.out_raw))
        outputs.append(s * positive(self.out_bias_raw)[:, None])
        return FrozenSupportNet(np.concatenate(inputs) if inputs else None, self.linear_rank or 0, hidden, biases,
                                np.concatenate(outputs, axis=1), self.alpha, self.beta)

    def config(self) -> dict:
        """The constructor arguments that rebuild this net (``model_from_config``)."""
        return {"kind": "SupportNet", "dim": self.dim, "n_outputs": self.n_outputs, "width": self.width,
                "depth": self.depth, "linear_rank": self.linear_rank, "alpha": self.alpha, "beta": self.beta}


class FrozenSupportNet:
    """A trained SupportNet's f(q) = s·||q||·g(q/||q||), evaluated in numpy float32 on weights taken
    once (sign constraints applied, the scale s folded in): the same numbers as ``SupportNet.forward``
    up to float rounding, without torch's per-call dispatch, which costs ~1 ms for a single query.

    Homogeneity lets the wide output be one product. With P = q·[V; W_x,0; …]ᵀ (one BLAS call; V
    only for a low-rank linear term) and x = q/||q||, every hidden layer sees W_x,l·x = P_l/||q||, and
    ||q||·(<w_m, x> + <A_m, z_L> + c_m) = <[q or qVᵀ, ||q||·z_L, ||q||], [s·w_m or s·U_m, s·A_m, s·c_m]>:
    a single ``[n, K] × [K, n_outputs]`` product writes the scores, with no pass over the
    ``[n, n_outputs]`` output for the bias, the norm or the scale. For inference only (no gradients).
    The weights are kept transposed, ``[K, n_outputs]`` row-major, so BLAS reads them without a
    transpose: for a few queries that is ~2× faster (977 outputs, K = 449, one thread: 16 queries
    185 vs 339 µs, 4 queries 89 vs 246) and never slower (5,000 queries 42.5 vs 43.0 ms).
    """

    def __init__(self, inputs: np.ndarray | None, rank: int, hidden: list, biases: list,
                 outputs: np.ndarray, alpha: float, beta: float):
        """``inputs [rank + depth·width, dim]`` (None if empty), ``rank`` of the linear term's factors
        (0: full), ``hidden`` W_z ≥ 0 and ``biases`` b ≥ 0 per layer, ``outputs [n_outputs, K]``."""
        transposed = lambda w: np.ascontiguousarray(w.T)  # noqa: E731
        self.inputs_t = None if inputs is None else transposed(inputs)
        self.hidden_t = [transposed(w) for w in hidden]
        self.outputs_t = transposed(outputs)
        self.rank, self.biases = rank, biases
        self.alpha, self.beta, self._soft = alpha, beta, (1.0 - alpha) / beta

    def _act(self, u: np.ndarray) -> np.ndarray:
        """σ(u) = α·u + (1−α)·softplus_β(u), in place on ``u``, with softplus_β(u) = max(u, 0) +
        log(1 + e^{−β|u|})/β (stable, and ~10× faster on a batch than ``np.logaddexp``)."""
        t = np.abs(u)
        t *= -self.beta
        np.exp(t, out=t)
        np.log1p(t, out=t)
        t *= self._soft
        t += (1.0 - self.alpha) * np.maximum(u, 0.0)
        u *= self.alpha
        u += t
        return u

    def __call__(self, q: np.ndarray) -> np.ndarray:
        """``[n, dim] float32`` → ``[n, n_outputs] float32``; f(0) = 0."""
        norm = np.sqrt(np.einsum("ij,ij->i", q, q))[:, None]
        parts = [] if self.rank else [q]
        if self.inputs_t is not None:
            P = q @ self.inputs_t
            if self.rank:
                parts.append(P[:, :self.rank])
            if self.biases:
                inv = 1.0 / np.maximum(norm, 1e-12)
                z, at = None, self.rank
                for layer, b in enumerate(self.biases):
                    u = P[:, at:at + len(b)] * inv
                    at += len(b)
                    u += b
                    if layer:
                        u += z @ self.hidden_t[layer - 1]
                    z = self._act(u)
                z *= norm
                parts.append(z)
        parts.append(norm)
        return np.concatenate(parts, axis=1, dtype=np.float32) @ self.outputs_t


class KeyNet(nn.Module):
    """Residual MLP predicting the argmax key: KeyNet(q) = s·R(q/||q||) ≈ ∇h(q).

    0-homogeneous (depends on the direction q/||q|| only, as the argmax key does)::

        u_0 = W_in x;  u_{l+1} = u_l + W_2,l GELU(W_1,l LN(u_l));  out = W_out LN(u_L)

    ``scale`` s is a fixed positive constant setting the output units (e.g. a typical key norm).
    """

    def __init__(self, dim: int, width: int = 256, depth: int = 2, scale: float = 1.0):
        super().__init__()
        if depth < 0 or width < 1 or dim < 1:
            raise ValueError("KeyNet needs dim, width >= 1 and depth >= 0")
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.dim, self.width, self.depth = dim, width, depth
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
            for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)

    @classmethod
    def from_budget(cls, dim: int, n_params: int, **kwargs) -> "KeyNet":
        """The widest KeyNet (other arguments as given) with at most ``n_params`` parameters."""
        return cls(dim, width=_width_for_budget(cls, n_params, dim, **kwargs), **kwargs)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """``[n, dim]`` → ``[n, dim]`` predicted argmax keys."""
        _, x = _unit(q)
        u = self.inp(x)
        for block in self.blocks:
            u = u + block(u)
        return self.scale * self.out(self.norm(u))

    def config(self) -> dict:
        """The constructor arguments that rebuild this net (``model_from_config``)."""
        return {"kind": "KeyNet", "dim": self.dim, "width": self.width, "depth": self.depth}


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters())


def model_from_config(config: dict, state: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild a SupportNet or KeyNet from ``config()`` and its ``state_dict`` (strictly)."""
    config = dict(config)
    kinds = {"SupportNet": SupportNet, "KeyNet": KeyNet}
    kind = config.pop("kind", None)
    if kind not in kinds:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(kinds)}")
    model = kinds[kind](**config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _width_for_budget(cls, n_params: int, dim: int, **kwargs) -> int:
    """Largest width whose model has <= n_params parameters (binary search on meta tensors)."""
    def size(width: int) -> int:
        with torch.device("meta"):
            return count_parameters(cls(dim, width=width, **kwargs))
    if size(1) > n_params:
        raise ValueError(f"a budget of {n_params} parameters is below the smallest {cls.__name__} "
                         f"({size(1)} parameters)")
    lo, hi = 1, 2
    while size(hi) <= n_params:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size(mid) <= n_params else (lo, mid)
    return lo
