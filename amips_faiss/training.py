"""Losses and the training loop for SupportNet, KeyNet and multi-output routers.

The loop (``fit``): AdamW, linear warm-up then cosine decay, gradient clipping, an exponential
moving average (EMA) of the weights that is what gets validated and kept, early stopping on a
validation metric, checkpoint/resume, seeded batches and a tqdm bar that can be silenced.
"""
from __future__ import annotations

import copy
import math
import os
import time
import numbers
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .nn import KeyNet, SupportNet
from .targets import SupportTargets


@dataclass
class TrainConfig:
    """How a router is trained: the one place for its defaults (``IndexAMIPS.train``, the CLI and
    the benchmarks all start from these). Every value is checked when the config is made.

    Optimisation: ``steps`` (at most), ``batch_size``, ``lr`` (AdamW), ``weight_decay``, ``warmup``
    steps, gradient ``clip``, ``ema_decay``, validation every ``eval_every`` steps (None: steps/10,
    clamped to [50, 250]) with early stopping after ``patience`` checks without progress,
    ``time_limit`` seconds (None: no limit), ``device`` (None: CUDA when present), ``checkpoint``
    (a path: resumable), ``progress`` bars, ``seed``.
    Training data (``fitting.build_training_set``): ``augment`` noisy copies per training query,
    ``transplant`` × as many transplanted queries, up to ``n_calibration`` / ``n_validation``
    queries held out to calibrate the confidence margin / validate the router.
    """
    steps: int = 4000
    batch_size: int = 512
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup: int = 100
    clip: float = 1.0
    ema_decay: float = 0.98
    eval_every: int | None = None
    patience: int = 5
    seed: int = 0
    time_limit: float | None = 360.0
    device: str | None = None
    progress: bool = True
    checkpoint: str | None = None
    augment: int = 1
    transplant: float = 3.0
    n_calibration: int = 5000
    n_validation: int = 1000

    def __post_init__(self):
        for name, low in (("steps", 1), ("batch_size", 1), ("patience", 1), ("warmup", 0), ("seed", 0),
                          ("augment", 0), ("n_calibration", 0), ("n_validation", 0), ("eval_every", 1)):
            value = getattr(self, name)
            if value is None and name == "eval_every":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name, low, high in (("lr", 0.0, math.inf), ("clip", 0.0, math.inf), ("time_limit", 0.0, math.inf)):
            value = getattr(self, name)
            if value is None and name == "time_limit":
                continue
            if not _is_real(value) or not low < value <= high:
                raise ValueError(f"{name} must be a number > {low}, got {value!r}")
        for name, low, high in (("weight_decay", 0.0, math.inf), ("transplant", 0.0, math.inf),
                                ("ema_decay", 0.0, 1.0)):
            value = getattr(self, name)
            if not _is_real(value) or not low <= value < high:
                raise ValueError(f"{name} must be a number in [{low}, {high}), got {value!r}")
        for name in ("device", "checkpoint"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a string or None, got {type(getattr(self, name)).__name__}")
        if not isinstance(self.progress, bool):
            raise TypeError(f"progress must be True or False, got {self.progress!r}")

    @property
    def validation_interval(self) -> int:
        """Steps between validations: ``eval_every``, or steps/10 clamped to [50, 250]."""
        return self.eval_every or max(50, min(250, self.steps // 10))


def make_config(config: TrainConfig | None, options: dict) -> TrainConfig:
    """``config`` (default ``TrainConfig()``) with the fields in ``options`` replaced, every value
    checked; a wrong type or an unknown field is refused by name."""
    if config is not None and not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    unknown = set(options) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise TypeError(f"unknown training option(s) {sorted(unknown)}; see TrainConfig")
    return replace(config or TrainConfig(), **options)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)


def default_device() -> str:
    """"cuda" when a GPU is present, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------- losses

def supportnet_loss(model: SupportNet, q: torch.Tensor, h: torch.Tensor, key: torch.Tensor,
                    score_weight: float = 0.01, grad_weight: float = 1.0) -> torch.Tensor:
    """score_weight·(f(q) − h(q))² + grad_weight·||∇f(q) − k*(q)||², in units of ``model.scale``.

    ``q [b, d]``, ``h [b]`` exact support values, ``key [b, d]`` exact argmax keys.
    """
    q = q.detach().requires_grad_(True)
    f = model(q)[:, 0]
    (grad,) = torch.autograd.grad(f.sum(), q, create_graph=True)
    s = model.scale
    norm = q.detach().norm(dim=1).clamp_min(1e-12)
    score = (((f - h) / (s * norm)) ** 2).mean()
    gradient = (((grad - key) / s) ** 2).sum(dim=1).mean()
    return score_weight * score + grad_weight * gradient


def keynet_loss(model: KeyNet, q: torch.Tensor, h: torch.Tensor, key: torch.Tensor,
                consistency_weight: float = 1.0) -> torch.Tensor:
    """||KeyNet(q) − k*||² + λ·(<KeyNet(q), q> − h(q))² (score consistency, from Euler)."""
    pred = model(q)
    s = model.scale
    norm = q.norm(dim=1).clamp_min(1e-12)
    target = (((pred - key) / s) ** 2).sum(dim=1).mean()
    consistency = ((((pred * q).sum(dim=1) - h) / (s * norm)) ** 2).mean()
    return target + consistency_weight * consistency


def router_loss(pred: torch.Tensor, cluster_values: torch.Tensor, q_norm: torch.Tensor, scale: torch.Tensor,
                temperature: float = 0.05) -> torch.Tensor:
    """Fit per-list support values h_c(q) so that the ranking of lists is right.

    ``pred, cluster_values [b, nlist]`` (−inf marks an empty list), ``q_norm [b]``. The listwise
    cross-entropy between softmax(h_c/τ) and softmax(f_c/τ) (the lists near the top carry the
    weight), plus 0.1 × the mean squared error over all non-empty lists in units of scale·||q||, so
    that predicted scores keep their meaning for the confidence test.
    """
    unit = (scale * q_norm.clamp_min(1e-12))[:, None]
    valid = torch.isfinite(cluster_values)
    err = torch.where(valid, (pred - cluster_values) / unit, torch.zeros_like(pred))
    regression = (err ** 2).sum() / valid.sum().clamp_min(1)
    neg = torch.finfo(pred.dtype).min
    target = torch.softmax(torch.where(valid, cluster_values / unit, neg) / temperature, dim=1)
    logp = torch.log_softmax(torch.where(valid, pred / unit, neg) / temperature, dim=1)
    listwise = -(target * torch.where(valid, logp, torch.zeros_like(logp))).sum(dim=1).mean()
    return listwise + 0.1 * regression


# ---------------------------------------------------------------- the loop

def fit(model: nn.Module, batch_loss: Callable[[nn.Module, torch.Tensor], torch.Tensor], n_train: int,
        validate: Callable[[nn.Module], float], config: TrainConfig) -> dict:
    """Train ``model`` in place; keep the EMA weights with the best validation score.

    ``batch_loss(model, rows)`` returns the loss of the training rows ``rows [b] int64``;
    ``validate(model)`` returns a score, higher is better. With ``config.checkpoint``, the state is
    saved at each validation and an interrupted run (Ctrl-C, a crash) resumes where it stopped.
    Returns a summary: steps run, best score, its step, seconds, and the score history.
    """
    device = torch.device(config.device or default_device())
    model.to(device)
    torch.manual_seed(config.seed)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def lr_factor(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    state = {"step": 0, "best": -math.inf, "best_step": -1, "bad": 0, "history": [], "seconds": 0.0}
    best_weights = copy.deepcopy(ema.state_dict())
    if config.checkpoint and os.path.exists(config.checkpoint):
        ckpt = torch.load(config.checkpoint, map_location=device, weights_only=True)
        if ckpt["config"] != _config_key(config):
            raise ValueError(f"checkpoint {config.checkpoint} was made with other settings "
                             f"({ckpt['config']}); delete it or pass the same settings")
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        gen.set_state(ckpt["gen"])
        best_weights = ckpt["best_weights"]
        state = ckpt["state"]

    def save_checkpoint(gen_state: torch.Tensor) -> None:
        if not config.checkpoint:
            return
        tmp = config.checkpoint + ".tmp"
        torch.save({"config": _config_key(config), "model": model.state_dict(), "ema": ema.state_dict(),
                    "opt": opt.state_dict(), "sched": sched.state_dict(), "gen": gen_state,
                    "best_weights": best_weights, "state": state}, tmp)
        os.replace(tmp, config.checkpoint)

    start = time.perf_counter() - state["seconds"]
    gen_state = gen.get_state()
    params, ema_params = list(model.parameters()), list(ema.parameters())
    bar = tqdm(total=config.steps, initial=state["step"], desc="training", unit="step",
               disable=not config.progress, leave=False)
    try:
        while state["step"] < config.steps:
            model.train()
            gen_state = gen.get_state()  # an interrupted step is redone from here
            rows = torch.randint(n_train, (config.batch_size,), generator=gen).to(device)
            loss = batch_loss(model, rows)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()} at step {state['step']}; "
                                         "lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, config.clip)
            opt.step()
            sched.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, params, 1.0 - config.ema_decay)
            state["step"] += 1
            bar.update(1)
            elapsed = time.perf_counter() - start
            out_of_time = config.time_limit is not None and elapsed > config.time_limit
            if state["step"] % config.validation_interval == 0 or state["step"] == config.steps or out_of_time:
                ema.eval()
                score = float(validate(ema))
                state["history"].append((state["step"], round(float(loss.item()), 6), score))
                bar.set_postfix(loss=f"{loss.item():.4g}", val=f"{score:.4f}")
                if score > state["best"]:
                    state.update(best=score, best_step=state["step"], bad=0)
                    best_weights = copy.deepcopy(ema.state_dict())
                else:
                    state["bad"] += 1
                state["seconds"] = elapsed
                save_checkpoint(gen.get_state())
                if state["bad"] >= config.patience or out_of_time:
                    break
    except KeyboardInterrupt:
        state["seconds"] = time.perf_counter() - start
        save_checkpoint(gen_state)
        raise
    finally:
        bar.close()
    model.load_state_dict(best_weights)
    model.eval()
    return {"steps": state["step"], "best": state["best"], "best_step": state["best_step"],
            "seconds": round(time.perf_counter() - start, 2), "history": state["history"]}


def _config_key(config: TrainConfig) -> dict:
    """The settings a checkpoint must agree on to be resumed (not progress, device or time)."""
    return {k: v for k, v in asdict(config).items() if k not in ("progress", "device", "time_limit", "checkpoint")}


# ---------------------------------------------------------------- trainers

def _tensors(device: str, *arrays: np.ndarray) -> list[torch.Tensor]:
    return [torch.as_tensor(np.ascontiguousarray(a), device=device) for a in arrays]


def direct_match_rate(predicted_keys: torch.Tensor, q: torch.Tensor, h: torch.Tensor, keys: torch.Tensor,
                      block: int = 4096) -> float:
    """Share of queries whose predicted key, snapped to the nearest stored key (L2), has score h(q)."""
    hits = 0
    key_sq = (keys ** 2).sum(dim=1)
    for lo in range(0, len(q), block):
        p = predicted_keys[lo:lo + block]
        nearest = (key_sq[None, :] - 2 * p @ keys.T).argmin(dim=1)
        score = (q[lo:lo + block] * keys[nearest]).sum(dim=1)
        hv = h[lo:lo + block]
        hits += int((score >= hv - 1e-5 * (hv.abs() + 1e-6)).sum())
    return hits / max(1, len(q))


def train_direct(model: SupportNet | KeyNet, keys: np.ndarray, queries: np.ndarray, targets: SupportTargets,
                 val_queries: np.ndarray, val_targets: SupportTargets, config: TrainConfig | None = None,
                 consistency_weight: float = 1.0) -> dict:
    """Fit a SupportNet (scores + gradients) or a KeyNet (keys + score consistency) to predict
    the argmax key directly; early stopping on the validation match rate of the snapped key."""
    config = config or TrainConfig()
    device = config.device or default_device()
    keys_t, q, h, vq, vh = _tensors(device, keys, queries, targets.values, val_queries, val_targets.values)
    argmax_keys = keys_t[torch.as_tensor(targets.ids, device=device)]
    model.to(device)

    if isinstance(model, SupportNet):
        def batch_loss(m, rows):
            return supportnet_loss(m, q[rows], h[rows], argmax_keys[rows])

        def predict(m, x):
            return torch.cat([m.argmax_key(x[lo:lo + 4096]) for lo in range(0, len(x), 4096)])
    else:
        def batch_loss(m, rows):
            return keynet_loss(m, q[rows], h[rows], argmax_keys[rows], consistency_weight)

        def predict(m, x):
            with torch.no_grad():
                return m(x)

    summary = fit(model, batch_loss, len(q), lambda m: direct_match_rate(predict(m, vq), vq, vh, keys_t), config)
    model.cpu()
    return summary


def train_router(model: SupportNet, queries: np.ndarray, cluster_values: np.ndarray,
                 val_queries: np.ndarray, val_cluster_values: np.ndarray, config: TrainConfig | None = None) -> dict:
    """Fit a multi-output SupportNet to per-list support values h_c(q) (``[n, nlist]``).

    Early stopping on the validation share of queries whose argmax list is in the predicted top-p,
    averaged over p = 1, 2, 4, 8.
    """
    config = config or TrainConfig()
    device = config.device or default_device()
    q, hc, vq = _tensors(device, queries, cluster_values, val_queries)
    q_norm = q.norm(dim=1)
    val_best = torch.as_tensor(np.argmax(val_cluster_values, axis=1), device=device)
    model.to(device)

    def batch_loss(m, rows):
        return router_loss(m(q[rows]), hc[rows], q_norm[rows], m.scale)

    def validate(m):
        with torch.no_grad():
            pred = torch.cat([m(vq[lo:lo + 8192]) for lo in range(0, len(vq), 8192)])
        rank = (pred > pred.gather(1, val_best[:, None])).sum(dim=1)
        return float(np.mean([(rank < p).float().mean().item() for p in (1, 2, 4, 8)]))

    summary = fit(model, batch_loss, len(q), validate, config)
    model.cpu()
    return summary
