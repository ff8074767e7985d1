"""The optimizer and the EMA of training: AdamW after global-norm clipping, its learning-rate
schedule, and exponential moving averages of the parameters with warm-up."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from diffjax.core import fields

LR_SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW (decoupled weight decay, as torch.optim.AdamW) after global-norm clipping.

    lr: the peak learning rate, reached after `warmup_steps` (linear ramp); then "constant",
    "cosine" or "linear" decay to lr * end_factor at `total_steps` (GD's --lr_anneal_steps and
    classifier --anneal_lr are "linear" with end_factor 0). grad_clip <= 0 disables clipping."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 0
    schedule: str = "constant"
    end_factor: float = 0.0
    total_steps: int = 1

    def __post_init__(self):
        fields.check_choice("optim.schedule", self.schedule, LR_SCHEDULES)
        fields.check_finite("optim.lr", self.lr, low=0.0, low_open=True)
        fields.check_finite("optim.weight_decay", self.weight_decay, low=0.0)
        fields.check_finite("optim.b1", self.b1, low=0.0, high=1.0, high_open=True)
        fields.check_finite("optim.b2", self.b2, low=0.0, high=1.0, high_open=True)
        fields.check_finite("optim.eps", self.eps, low=0.0)
        fields.check_finite("optim.grad_clip", self.grad_clip)
        fields.check_finite("optim.end_factor", self.end_factor, low=0.0)
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps!r} must be an integer >= 0")


def lr_schedule(cfg: OptimConfig) -> Callable[[Any], jnp.ndarray]:
    """lr(n) for update n = 0, 1, ...: lr (n + 1) / W during the W warm-up updates, then with
    p = clip((n - W) / (total - W), 0, 1): constant lr; cosine lr_end + (lr - lr_end)(1 + cos(pi p))
    / 2 (Loshchilov & Hutter 2017); linear lr + (lr_end - lr) p; lr_end = lr * end_factor."""
    peak, end = cfg.lr, cfg.lr * cfg.end_factor
    warm = cfg.warmup_steps
    span = max(cfg.total_steps - warm, 1)

    def schedule(n):
        n = jnp.asarray(n, jnp.float32)
        p = jnp.clip((n - warm) / span, 0.0, 1.0)
        if cfg.schedule == "cosine":
            after = end + (peak - end) * 0.5 * (1 + jnp.cos(jnp.pi * p))
        elif cfg.schedule == "linear":
            after = peak + (end - peak) * p
        else:
            after = jnp.full_like(p, peak)
        if warm == 0:
            return after
        return jnp.where(n < warm, peak * (n + 1) / warm, after)

    return schedule


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    clip = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    return optax.chain(*clip, optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                          weight_decay=cfg.weight_decay))


def ema_decay(rate, n, warmup: bool):
    """The EMA decay at update n (0-based): min(rate, (1 + n) / (10 + n)) with warm-up (the
    num_updates rule of tf.train.ExponentialMovingAverage), else rate. With warm-up the weight
    left on the initial parameters after N updates is prod_n (1 + n)/(10 + n) = 1 / C(N + 9, 9)
    instead of rate^N (0.999^1300 = 27 %)."""
    if not warmup:
        return jnp.asarray(rate, jnp.float32)
    n = jnp.asarray(n, jnp.float32)
    return jnp.minimum(rate, (1.0 + n) / (10.0 + n))


def ema_update(ema, params, decay):
    """ema <- decay * ema + (1 - decay) * params (GD's update_ema), leaf by leaf."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
