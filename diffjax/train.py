"""Training: `TrainState`, one pure `train_step`, and the loop behind `python -m diffjax.train`.

    python -m diffjax.train --config configs/default.py --workdir DIR [--config.a.b=value ...]

The step (data flow of ../shared/design/ARCHITECTURE.md):

    key = fold_in(state.rng, state.step)         -> t ~ timestep sampler, noise, label dropout, dropout
    loss, grads = value_and_grad(objective)       (microbatches accumulated with lax.scan)
    clip, AdamW (warm-up + schedule)              (optax)
    EMA for every rate (with warm-up)             ema <- d ema + (1 - d) params
    timestep-sampler update                       (loss-second-moment history)
    non-finite loss or gradient                   -> nothing changes but the step and the counters

It is `jax.jit`-compiled once over a (data, fsdp) `Mesh` (diffjax.parallel): the batch is split over
every device, parameters / EMA / optimizer state over "fsdp" when asked; the state is donated;
`steps_per_dispatch` steps run per call inside `lax.scan`. Randomness depends only on (seed, step),
and the data order only on (seed, batch index), so a run resumed from a checkpoint reproduces an
uninterrupted run bit for bit on the same machine.

Multi-host (diffjax.distributed, launch/): the same command on every process of a TPU pod or GPU
cluster; each process feeds its rows of every global batch, process 0 writes metrics and images,
all write their checkpoint shards, and a preemption notice stops all at one agreed step.

Tasks (what guided-diffusion, improved-diffusion and GLIDE train):
* task="diffusion", conditioning "none" | "class" | "classifier_free" (labels replaced by the null
  label `num_classes` with probability `label_dropout`), `super_res.small_size` > 0 for the
  super-resolution model (low-res input = area downsampling of the batch, GD's super_res_train);
* task="classifier": GD's classifier_train, a noisy-image classifier on inputs noised at t ~ U;
* `init_from`: fine-tune from a `python -m diffjax.convert` checkpoint (its model and diffusion).
"""
from __future__ import annotations

from diffjax import hugepages

if __name__ == "__main__":
    hugepages.reexec()  # first: glibc reads its malloc tunables only when a process starts

import dataclasses
import functools
import json
import os
import pathlib
import socket
import struct
import sys
import tempfile
import time
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from diffjax import data as data_lib
from diffjax.core import diffusion as D
from diffjax import distributed
from diffjax import images as images_lib
from diffjax import parallel
from diffjax import paths
from diffjax.core import schedules as S
from diffjax.core import timestep_sampling
from diffjax.io import checkpoints as ckpt_lib
from diffjax.compat import gd_models
from diffjax import tokenizer as tokenizer_lib

TASKS = ("diffusion", "classifier")
CONDITIONINGS = ("none", "class", "classifier_free", "text")
LR_SCHEDULES = ("constant", "cosine", "linear")


# =========================================================================== configuration


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
        if self.schedule not in LR_SCHEDULES:
            raise ValueError(f"optim.schedule={self.schedule!r}: choose one of {LR_SCHEDULES}")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError(f"optim.lr={self.lr}, optim.warmup_steps={self.warmup_steps}: the "
                             f"learning rate must be > 0 and the warm-up >= 0 steps")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What one step does. batch_size is GLOBAL (split over all devices and processes);
    microbatch > 0 accumulates gradients over batch_size / microbatch chunks (GD's --microbatch);
    ema_rates: one EMA of the parameters per rate, decay min(rate, (1 + n) / (10 + n)) at update n
    when ema_warmup; compute_dtype "auto" is bfloat16 on GPU / TPU and float32 on CPU;
    max_bad_steps: consecutive non-finite steps that stop the run."""

    task: str = "diffusion"
    conditioning: str = "none"
    label_dropout: float = 0.0
    num_classes: int = 0
    batch_size: int = 32
    microbatch: int = 0
    total_steps: int = 1000
    steps_per_dispatch: int = 1
    ema_rates: tuple = (0.9999,)
    ema_warmup: bool = True
    compute_dtype: str = "auto"
    remat: bool = False
    fsdp: int = 1
    max_bad_steps: int = 20
    schedule_sampler: str = "uniform"
    small_size: int = 0  # > 0: super-resolution from small_size x small_size
    seed: int = 0
    # GLIDE (conditioning="text"): empty-caption probability; inpainting with random masks.
    caption_dropout: float = 0.0
    inpaint: bool = False

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"train.task={self.task!r}: choose one of {TASKS}")
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"train.conditioning={self.conditioning!r}: choose one of "
                             f"{CONDITIONINGS}")
        if (self.conditioning not in ("none", "text") or self.task == "classifier") \
                and self.num_classes < 1:
            raise ValueError(f"train.num_classes={self.num_classes}: conditioning="
                             f"{self.conditioning!r} / task={self.task!r} needs the number of "
                             f"classes (e.g. 10 for Fashion-MNIST)")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"train.label_dropout={self.label_dropout} must be in [0, 1)")
        if self.label_dropout and self.conditioning != "classifier_free":
            raise ValueError(f"train.label_dropout={self.label_dropout} only applies with "
                             f"conditioning='classifier_free' (got {self.conditioning!r})")
        _check_text_config(self)
        if self.microbatch and self.batch_size % self.microbatch:
            raise ValueError(f"train.microbatch={self.microbatch} does not divide train.batch_size="
                             f"{self.batch_size}: choose a divisor, or 0 for no accumulation")
        if self.steps_per_dispatch < 1 or self.total_steps % self.steps_per_dispatch:
            raise ValueError(f"train.steps_per_dispatch={self.steps_per_dispatch} must divide "
                             f"train.total_steps={self.total_steps}")
        if any(not 0.0 <= r < 1.0 for r in self.ema_rates):
            raise ValueError(f"train.ema_rates={self.ema_rates}: every rate must be in [0, 1)")
        if self.compute_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"train.compute_dtype={self.compute_dtype!r}: choose 'auto', "
                             f"'float32' or 'bfloat16'")

    @property
    def num_microbatches(self) -> int:
        return self.batch_size // self.microbatch if self.microbatch else 1

    @property
    def model_num_classes(self) -> int | None:
        """Label-embedding rows: one more for classifier-free guidance's null label."""
        if self.conditioning in ("none", "text"):
            return None
        return self.num_classes + (self.conditioning == "classifier_free")

    def resolved_dtype(self):
        if self.compute_dtype == "auto":
            return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
        return jnp.dtype(self.compute_dtype)


def dataclass_from(cls, section, **overrides):
    """A config dataclass from a ConfigDict section; unknown keys are an error naming the valid
    ones (a typo must not silently fall back to a default)."""
    values = dict(section.to_dict() if hasattr(section, "to_dict") else section or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} setting(s) {unknown}: valid names are "
                         f"{sorted(names)}")
    values.update(overrides)
    for key, value in values.items():
        if isinstance(value, list):
            values[key] = tuple(value)
    return cls(**values)


def gaussian_diffusion(flags: dict):
    """The compat GaussianDiffusion (.schedule, .config) of guided-diffusion's diffusion flags,
    through create_gaussian_diffusion (learn_sigma, diffusion_steps, noise_schedule,
    timestep_respacing, use_kl, predict_xstart, rescale_timesteps, rescale_learned_sigmas,
    sigma_small)."""
    from diffjax.compat import guided_diffusion as gdc

    f = {**gd_models.diffusion_defaults(), **dict(flags)}
    names = ("learn_sigma", "sigma_small", "noise_schedule", "use_kl", "predict_xstart",
             "rescale_timesteps", "rescale_learned_sigmas", "timestep_respacing")
    return gdc.create_gaussian_diffusion(steps=int(f["diffusion_steps"]),
                                         **{k: f[k] for k in names if k in f})


def build_model(model_flags: dict, train: TrainConfig, image_size: int, channels: int,
                learn_sigma: bool):
    """The Flax module of a config: UNetModel, SuperResModel (small_size > 0) or EncoderUNetModel
    (task="classifier"), from guided-diffusion's constructor flags; attention_resolutions are
    resolutions (GD's command-line convention), converted to downsample rates here."""
    flags = dict(model_flags)
    resolutions = flags.pop("attention_resolutions", ())
    if isinstance(resolutions, str):
        resolutions = [int(r) for r in resolutions.split(",") if r.strip()]
    bad = [r for r in resolutions if image_size % r]
    if bad:
        raise ValueError(f"model.attention_resolutions={tuple(resolutions)}: {bad} do not divide "
                         f"image_size={image_size}; give resolutions such as {image_size // 4}")
    flags["attention_resolutions"] = tuple(image_size // r for r in resolutions)
    common = dict(image_size=image_size, in_channels=channels, dtype=train.resolved_dtype(),
                  use_checkpoint=train.remat, **flags)
    if train.task == "classifier":
        return gd_models.build("EncoderUNetModel", out_channels=train.num_classes, **common)
    out = channels * (2 if learn_sigma else 1)
    cls = "SuperResModel" if train.small_size else "UNetModel"
    return gd_models.build(cls, out_channels=out, num_classes=train.model_num_classes, **common)


# =========================================================================== state and maths


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; a pytree (checkpointed whole).

    step: int32 []; params: the model's "params"; ema: tuple of params trees, one per rate of
    TrainConfig.ema_rates; opt_state: optax state; rng: uint32 [2] base key (fold_in(rng, step) is
    the step's key); sampler_state: the timestep sampler's; bad_steps: consecutive non-finite
    steps; skipped: all skipped steps."""

    step: jnp.ndarray
    params: Any
    ema: tuple
    opt_state: Any
    rng: jnp.ndarray
    sampler_state: Any
    bad_steps: jnp.ndarray
    skipped: jnp.ndarray


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


def area_downsample(x, size: int):
    """Average-pool x [B, H, W, C] to [B, size, size, C] (F.interpolate(mode="area") for an
    integer factor, GD's super-resolution low-res input)."""
    b, h, w, c = x.shape
    if h % size or w % size:
        raise ValueError(f"train.small_size={size} must divide the image size {h}x{w}")
    return x.reshape(b, size, h // size, size, w // size, c).mean(axis=(2, 4))


# =========================================================================== the step


def _raw_key(key):
    """uint32 key data of a typed or raw PRNG key (raw data checkpoints like any array)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The static parts of training (hashable: closed over by jit): the module, the schedule,
    the diffusion config, the timestep sampler, the optimizer, the train config."""

    module: Any
    schedule: S.Schedule
    diffusion: D.DiffusionConfig
    sampler: Any
    optimizer: Any
    config: TrainConfig
    optim: OptimConfig
    image_shape: tuple
    text: Any = None  # TextSetup of a text-conditional (GLIDE) model
    # The diffusion flags the schedule was built from (a converted checkpoint's, for init_from),
    # as sorted (name, value) pairs to stay hashable; sampling respaces from these.
    diffusion_flags: tuple = ()

    def sampling_diffusion(self, respacing: str = ""):
        """The compat GaussianDiffusion (.schedule respaced with GD's `respacing` string, .config)
        of the flags the trainer was built from, for sampling."""
        return gaussian_diffusion({**dict(self.diffusion_flags), "timestep_respacing": respacing})

    # -- construction ---------------------------------------------------------------------------

    def init(self, key, params=None) -> TrainState:
        """A fresh TrainState; `params` (e.g. converted weights) replace the random init."""
        key_params, key_rng = jax.random.split(key)
        if params is None:
            args, kwargs = self.module.example_inputs(1)
            params = self.module.init({"params": key_params}, *args, **kwargs)["params"]
        params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema=tuple(params for _ in self.config.ema_rates),
            opt_state=self.optimizer.init(params),
            rng=_raw_key(key_rng),
            sampler_state=self.sampler.init(),
            bad_steps=jnp.zeros((), jnp.int32),
            skipped=jnp.zeros((), jnp.int32),
        )

    # -- losses ---------------------------------------------------------------------------------

    def _model_kwargs(self, batch, key):
        """Conditioning inputs of the model for a batch: y (with label dropout to the null label
        num_classes for classifier-free training) and low_res for super-resolution."""
        cfg, kwargs = self.config, {}
        if cfg.task == "classifier":  # the labels are its targets, not an input
            return kwargs
        if cfg.conditioning == "text":
            return text_model_kwargs(self, batch, key)
        if cfg.conditioning != "none":
            y = batch["label"].astype(jnp.int32)
            if cfg.label_dropout:
                drop = jax.random.uniform(key, y.shape) < cfg.label_dropout
                y = jnp.where(drop, cfg.num_classes, y)
            kwargs["y"] = y
        if cfg.small_size:
            kwargs["low_res"] = area_downsample(batch["image"], cfg.small_size)
        return kwargs

    def _losses(self, params, example, dropout_key):
        """Per-example terms of one (micro)batch; `example` holds x0, t, noise, weights and the
        model kwargs. Returns (objective, terms) with terms[loss] [b]."""
        apply = functools.partial(self.module.apply, {"params": params}, train=True,
                                  rngs={"dropout": dropout_key}, **example["kwargs"])
        if self.config.task == "classifier":
            # GD's classifier_train: noised inputs, the timestep index as the model's t.
            x_t = D.q_sample(self.schedule, example["x0"], example["t"], example["noise"])
            logits = apply(x_t, D.model_timesteps(self.schedule, self.diffusion, example["t"]))
            labels = example["label"]
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            top5 = jnp.argsort(-logits, axis=-1)[:, :5]
            terms = {"loss": loss,
                     "acc@1": (jnp.argmax(logits, -1) == labels).astype(jnp.float32),
                     "acc@5": jnp.any(top5 == labels[:, None], -1).astype(jnp.float32)}
            return jnp.mean(loss), terms
        terms = D.training_losses(self.schedule, self.diffusion, apply, example["x0"],
                                  example["t"], example["noise"], weights=example["weights"])
        objective = terms.pop("objective")
        return objective, terms

    def _grads(self, params, example, dropout_key):
        """(objective, terms, grads), accumulated over microbatches with lax.scan. Microbatch j
        holds examples j, j + M, j + 2M, ...: a reshape that keeps every device's rows local."""
        grad_fn = jax.value_and_grad(self._losses, has_aux=True)
        m = self.config.num_microbatches
        if m == 1:
            (objective, terms), grads = grad_fn(params, example, dropout_key)
            return objective, terms, grads

        def split(x):
            return jnp.swapaxes(x.reshape((x.shape[0] // m, m) + x.shape[1:]), 0, 1)

        def merge(x):
            return jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])

        chunks = jax.tree.map(split, example)

        def body(carry, inputs):
            index, chunk = inputs
            (objective, terms), grads = grad_fn(params, chunk, jax.random.fold_in(dropout_key, index))
            total_obj, total_grads = carry
            return (total_obj + objective, jax.tree.map(jnp.add, total_grads, grads)), terms

        zeros = jax.tree.map(jnp.zeros_like, params)
        (objective, grads), terms = jax.lax.scan(body, (jnp.zeros(()), zeros),
                                                 (jnp.arange(m), chunks))
        # Equal chunks: the mean of the chunk means is the batch mean.
        return objective / m, jax.tree.map(merge, terms), jax.tree.map(lambda g: g / m, grads)

    # -- one step -------------------------------------------------------------------------------

    def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        """One optimisation step on a global batch {"image": [B, H, W, C], "label": [B]}.
        Pure: the randomness is fold_in(state.rng, state.step). Returns (new state, metrics)."""
        cfg = self.config
        x0 = batch["image"].astype(jnp.float32)
        key = jax.random.fold_in(state.rng, state.step)
        key_t, key_noise, key_label, key_dropout = jax.random.split(key, 4)
        t, weights = self.sampler.sample(state.sampler_state, key_t, x0.shape[0])
        example = {"x0": x0, "t": t, "weights": weights, "label": batch["label"].astype(jnp.int32),
                   "noise": jax.random.normal(key_noise, x0.shape, jnp.float32),
                   "kwargs": self._model_kwargs(batch, key_label)}
        objective, terms, grads = self._grads(state.params, example, key_dropout)

        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(objective) & jnp.isfinite(grad_norm)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = tuple(ema_update(e, params, ema_decay(rate, state.step, cfg.ema_warmup))
                    for e, rate in zip(state.ema, cfg.ema_rates))
        losses = jax.lax.stop_gradient(terms["loss"])
        sampler_state = self.sampler.update(state.sampler_state, t, losses)

        def keep_if_finite(new, old):
            return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

        new_state = TrainState(
            step=state.step + 1,
            params=keep_if_finite(params, state.params),
            ema=keep_if_finite(ema, state.ema),
            opt_state=keep_if_finite(opt_state, state.opt_state),
            rng=state.rng,
            sampler_state=keep_if_finite(sampler_state, state.sampler_state),
            bad_steps=jnp.where(finite, 0, state.bad_steps + 1),
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
        # GD logs each term's mean per quartile of t (loss_q0 ... loss_q3): sums and counts here.
        quartile = (t * 4) // self.schedule.num_timesteps
        metrics = {
            "objective": objective,
            "grad_norm": grad_norm,
            "finite": finite,
            "bad_steps": new_state.bad_steps,
            "lr": lr_schedule(self.optim)(state.step),
            "loss_quartile_sum": jax.ops.segment_sum(losses, quartile, 4),
            "loss_quartile_count": jax.ops.segment_sum(jnp.ones_like(losses), quartile, 4),
        }
        for name, value in terms.items():
            metrics[name] = jnp.mean(value)
        return new_state, metrics

    def train_steps(self, state: TrainState, batches: dict) -> tuple[TrainState, dict]:
        """`steps_per_dispatch` steps on stacked batches [S, B, ...]; metrics [S]. The steps are
        unrolled: XLA:CPU runs a UNet step ~30x slower inside a rolled while loop (measured:
        46 s vs 1.5 s), and S is small."""
        if jax.tree.leaves(batches)[0].shape[0] == 1:
            state, metrics = self.train_step(state, jax.tree.map(lambda x: x[0], batches))
            return state, jax.tree.map(lambda x: x[None], metrics)
        return jax.lax.scan(self.train_step, state, batches, unroll=True)


def compile_steps(trainer: Trainer, mesh, state_sharding):
    """`train_steps` jitted over `mesh`: state in and out with `state_sharding` (donated), the
    stacked batches split over every device, metrics replicated."""
    batch_sh = parallel.batch_sharding(mesh, ndim_leading=1)
    # One sharding for every leaf of the batch, whatever its keys (image, label, tokens, mask).
    return jax.jit(trainer.train_steps,
                   in_shardings=(state_sharding, batch_sh),
                   out_shardings=(state_sharding, parallel.replicated(mesh)),
                   donate_argnums=0)


def create_state(trainer: Trainer, mesh, key, params=None, fsdp_min_size: int = 2**14):
    """(state, its shardings): a fresh TrainState created directly with its shardings (parameters
    and optimizer state split over "fsdp" when the mesh has that axis)."""
    init = functools.partial(trainer.init, params=params)
    abstract = jax.eval_shape(init, key)
    shardings = parallel.state_shardings(mesh, abstract, fsdp_min_size)
    return jax.jit(init, out_shardings=shardings)(key), shardings


# =========================================================================== from a ConfigDict


def trainer_from_config(config: ml_collections.ConfigDict):
    """(Trainer, DataConfig, init params or None) of a full experiment config; the only place
    that reads the ConfigDict (modules get typed dataclasses)."""
    train_cfg = dataclass_from(TrainConfig, config.train)
    data_cfg = dataclass_from(data_lib.DataConfig, config.data)
    diffusion_flags = dict(config.diffusion)
    init_params = None
    if config.get("init_from"):
        from diffjax.convert import load_converted

        module, variables, converted = load_converted(config.init_from)
        diffusion_flags = {**diffusion_flags, **dict(converted.get("diffusion", {}))}
        diffusion_flags.pop("timestep_respacing", None)  # sampling-time respacing
        module = module.clone(dtype=train_cfg.resolved_dtype(), use_checkpoint=train_cfg.remat)
        init_params = variables["params"]
    text = None
    if train_cfg.conditioning == "text":
        from diffjax.text2im import glide_diffusion_flags

        diffusion_flags = glide_diffusion_flags(diffusion_flags)
        module, init_params, text = text_model_setup(
            config, train_cfg, data_cfg, module if config.get("init_from") else None, init_params,
            bool(diffusion_flags["learn_sigma"]))
    gd = gaussian_diffusion(diffusion_flags)
    sched, dcfg = gd.schedule, gd.config
    if not config.get("init_from") and text is None:
        module = build_model(dict(config.model), train_cfg, data_cfg.image_size, data_cfg.channels,
                             bool(diffusion_flags.get("learn_sigma", False)))
    optim_cfg = dataclass_from(OptimConfig, config.optim, total_steps=train_cfg.total_steps)
    sampler = timestep_sampling.create_named_schedule_sampler(train_cfg.schedule_sampler,
                                                              sched.num_timesteps)
    trainer = Trainer(module=module, schedule=sched, diffusion=dcfg, sampler=sampler,
                      optimizer=make_optimizer(optim_cfg), config=train_cfg, optim=optim_cfg,
                      image_shape=(data_cfg.image_size, data_cfg.image_size, data_cfg.channels),
                      text=text,
                      diffusion_flags=tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                                   for k, v in diffusion_flags.items())))
    return trainer, data_cfg, init_params


def load_config_json(workdir) -> ml_collections.ConfigDict:
    """The experiment config a training run wrote to workdir/config.json."""
    file = pathlib.Path(workdir) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{pathlib.Path(workdir).absolute()} is not a diffjax.train "
                                f"workdir (no config.json): give the --workdir of a training run")
    return ml_collections.ConfigDict(json.loads(file.read_text()))


def load_workdir(workdir, ema_index: int = 0, step: int | None = None):
    """(trainer, params, data config, description) of a `python -m diffjax.train` workdir: its
    config.json and the checkpoint of `step` (default the latest), restored on one device; params
    are EMA number `ema_index` of the config's ema_rates, or the raw ones for -1. What sampling and
    evaluation of a trained run start from."""
    workdir = pathlib.Path(workdir).absolute()
    config = load_config_json(workdir)
    trainer, data_cfg, init_params = trainer_from_config(config)
    rates = trainer.config.ema_rates
    if not -1 <= ema_index < len(rates):
        raise ValueError(f"ema_index={ema_index}: {workdir} keeps {len(rates)} EMA(s) (rates "
                         f"{tuple(rates)}); choose 0..{len(rates) - 1}, or -1 for the raw "
                         f"parameters")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.eval_shape(functools.partial(trainer.init, params=init_params),
                              jax.random.PRNGKey(0))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                            abstract)
    manager = ckpt_lib.CheckpointManager(workdir / "checkpoints",
                                         ckpt_lib.CheckpointConfig(async_save=False))
    try:
        restored = manager.restore(abstract, step)
        found = manager.latest_step() if step is None else step
    finally:
        manager.close()
    if restored is None:
        raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint yet: train first "
                                f"(python -m diffjax.train --workdir {workdir})")
    state, _ = restored
    params = state.params if ema_index < 0 else state.ema[ema_index]
    which = "raw parameters" if ema_index < 0 else f"EMA {rates[ema_index]}"
    return trainer, params, data_cfg, f"{workdir} step {found}, {which}"


# =========================================================================== metric writer


def _crc32c_table():
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord framing uses it."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        bits, n = n & 0x7F, n >> 7
        out.append(bits | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(step: int, wall_time: float, scalars: dict | None = None, version: str | None = None):
    """A tensorflow.Event protobuf: wall_time (1, double), step (2, int64), file_version (3) or
    summary (5) of Summary.Value{tag (1), simple_value (2, float)}."""
    body = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
    if version is not None:
        body += _field(3, version.encode())
    if scalars:
        values = b"".join(_field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
                          for tag, value in scalars.items())
        body += _field(5, values)
    return body


class MetricWriter:
    """Scalars to the console, to `metrics.jsonl` and to a TensorBoard event file, on process 0.

    Why not clu: `clu.metric_writers` imports TensorFlow at import time (its SummaryWriter is
    tf.summary); the event-file format is small (TFRecord framing + two protobuf messages), so it
    is written here with no dependency."""

    UPLOAD_EVERY_S = 60.0  # a gs:// workdir: how often the staged files are copied up

    def __init__(self, workdir: str | os.PathLike, console: bool = True):
        self.active = jax.process_index() == 0
        self.console = console
        if not self.active:
            return
        self.workdir = paths.as_path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        # A bucket object cannot be appended to: write to a local staging folder and copy the
        # whole files up (every UPLOAD_EVERY_S seconds and at close); a local workdir is written
        # in place.
        self._remote = paths.is_remote(self.workdir)
        local = pathlib.Path(tempfile.mkdtemp(prefix="diffjax_metrics_")) if self._remote \
            else pathlib.Path(os.fspath(self.workdir))
        if self._remote and (self.workdir / "metrics.jsonl").exists():  # a resumed run appends
            (local / "metrics.jsonl").write_bytes((self.workdir / "metrics.jsonl").read_bytes())
        self._local, self._uploaded = local, time.monotonic()
        self._jsonl = open(local / "metrics.jsonl", "a")
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        (local / "tensorboard").mkdir(exist_ok=True)
        self._events_name = name
        self._events = open(local / "tensorboard" / name, "ab")
        self._write_record(_event(0, time.time(), version="brain.Event:2"))

    def _write_record(self, data: bytes):
        header = struct.pack("<Q", len(data))
        self._events.write(header + struct.pack("<I", _masked_crc(header)) + data
                           + struct.pack("<I", _masked_crc(data)))

    def write_scalars(self, step: int, scalars: dict) -> None:
        if not self.active:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
        self._write_record(_event(int(step), time.time(), scalars))
        self.flush()
        if self.console:
            text = ", ".join(f"{k}={v:.4g}" for k, v in scalars.items())
            print(f"[step {step}] {text}", file=sys.stderr, flush=True)

    def flush(self, upload: bool = False):
        """Flush to disk; for a gs:// workdir also copy up, when `upload` or when the last copy
        is UPLOAD_EVERY_S old."""
        if not self.active:
            return
        self._jsonl.flush()
        self._events.flush()
        if self._remote and (upload or time.monotonic() - self._uploaded > self.UPLOAD_EVERY_S):
            for rel in ("metrics.jsonl", f"tensorboard/{self._events_name}"):
                (self.workdir / rel).parent.mkdir(parents=True, exist_ok=True)
                (self.workdir / rel).write_bytes((self._local / rel).read_bytes())
            self._uploaded = time.monotonic()

    def close(self):
        if self.active:
            self.flush(upload=True)
            self._jsonl.close()
            self._events.close()


# =========================================================================== sampling and bits/dim


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """After training: a sample grid (per_class columns per class, or rows x per_class images for
    an unconditional model; per_class=0: no samples, no bits/dim) drawn with `sampler` over
    `respacing` steps, classifier-free guidance `guidance_scale` (1 = the conditional model); bits/dim by a Monte-Carlo estimate of the
    variational bound on `bpd_images` test images x `bpd_t_per_image` uniform timesteps (plus the
    exact decoder term, see estimate_bpd);
    ema_index: which EMA rate samples (-1: the raw parameters)."""

    per_class: int = 8
    rows: int = 8
    sampler: str = "ddim"
    respacing: str = "ddim50"
    guidance_scale: float = 1.0
    ema_index: int = 0
    sample_every: int = 0
    bpd_images: int = 0
    bpd_t_per_image: int = 4
    bpd_split: str = "test"
    batch: int = 200
    seed: int = 0
    prompts: tuple = ()  # text-conditional models: one row of per_class samples per prompt


def sample_images(trainer: Trainer, params, key, eval_cfg: EvalConfig):
    """(images [N, H, W, C] in [-1, 1], row labels): a grid's worth of samples from `params` with
    diffjax.sample; class-conditional models get per_class images of every class, with
    classifier-free guidance for a classifier-free model."""
    import diffjax
    from diffjax.core import guidance as G

    cfg = trainer.config
    if cfg.conditioning == "text":
        return sample_text_images(trainer, params, key, eval_cfg)
    gd = trainer.sampling_diffusion(eval_cfg.respacing)
    sched, dcfg = gd.schedule, gd.config
    model = (trainer.module, {"params": params})
    channels = trainer.image_shape[-1]
    if cfg.conditioning == "none":
        shape = (eval_cfg.rows * eval_cfg.per_class,) + trainer.image_shape
        return diffjax.sample(key, model, sched, shape, sampler=eval_cfg.sampler, config=dcfg), None
    labels = jnp.repeat(jnp.arange(cfg.num_classes, dtype=jnp.int32), eval_cfg.per_class)
    guidance = None
    if cfg.conditioning == "classifier_free":
        guidance = G.classifier_free(eval_cfg.guidance_scale, {"y": cfg.num_classes},
                                     mean_channels=channels)
    shape = (labels.shape[0],) + trainer.image_shape
    images = diffjax.sample(key, model, sched, shape, sampler=eval_cfg.sampler, guidance=guidance,
                            config=dcfg, model_kwargs={"y": labels})
    return images, list(range(cfg.num_classes))


def estimate_bpd(trainer: Trainer, params, images, labels, key, t_per_image: int, batch: int):
    """Bits/dim of each image [N]: an unbiased Monte-Carlo estimate of the variational bound
    L_prior + L_0 + sum_{t>=1} L_t (Ho et al. 2020 eq. 5; GD's calc_bpd_loop sums all T terms) as
    L_prior + L_0 + (T - 1) mean_k L_{t_k}, t_k ~ U{1..T-1}, k < t_per_image. The decoder term L_0
    is computed exactly rather than sampled: drawn with probability 1/T and weighted by T it would
    dominate the variance. Its expectation is that of T mean_k L_{t_k}, t_k ~ U{0..T-1}. True
    labels for a class-conditional model (the conditional model for a classifier-free one)."""
    cfg, sched = trainer.config, trainer.schedule
    num_t = sched.num_timesteps

    def terms(params, x, t, noise, y):
        x_t = D.q_sample(sched, x, t, noise)
        kwargs = {}
        if cfg.conditioning != "none":
            kwargs["y"] = y
        if cfg.small_size:
            kwargs["low_res"] = area_downsample(x, cfg.small_size)
        out = trainer.module.apply({"params": params}, x_t,
                                   D.model_timesteps(sched, trainer.diffusion, t), **kwargs)
        return D.vb_terms_bpd(sched, trainer.diffusion, out, x, x_t, t)["output"]

    @jax.jit
    def chunk_bpd(params, x0, y, key):
        k_t, k_noise, k_zero = jax.random.split(key, 3)
        x = jnp.repeat(x0, t_per_image, axis=0)
        t = jax.random.randint(k_t, (x.shape[0],), 1, num_t)
        sampled = terms(params, x, t, jax.random.normal(k_noise, x.shape), jnp.repeat(y, t_per_image))
        decoder = terms(params, x0, jnp.zeros((x0.shape[0],), jnp.int32),
                        jax.random.normal(k_zero, x0.shape), y)
        mean_t = sampled.reshape(-1, t_per_image).mean(axis=1)
        return decoder + (num_t - 1) * mean_t + D.prior_bpd(sched, x0)

    per = max(batch // (t_per_image + 1), 1)
    results = []
    for i in range(0, len(images), per):
        results.append(np.asarray(chunk_bpd(params, images[i:i + per], labels[i:i + per],
                                            jax.random.fold_in(key, i))))
    return np.concatenate(results)


# =========================================================================== the loop


class TrainingDiverged(RuntimeError):
    """`max_bad_steps` consecutive steps had a non-finite loss or gradient."""


class _Logger:
    """Host-side bookkeeping of the step metrics: averages over each logging interval, the
    non-finite watchdog, and the run of losses for the final metrics."""

    def __init__(self, writer: MetricWriter, trainer: Trainer, log_every: int, images_per_step: int):
        self.writer, self.trainer = writer, trainer
        self.log_every, self.images_per_step = log_every, images_per_step
        self.sums, self.count, self.last_ok = {}, 0, {}
        self.losses = []  # (step, loss) of every finite step of this process's run
        self.clock, self.clock_step = None, None

    def start_clock(self, step: int):
        self.clock, self.clock_step = time.perf_counter(), step

    def add(self, first_step: int, metrics: dict) -> None:
        """Metrics [S] of the S steps that started at first_step (host numpy)."""
        metrics = jax.device_get(metrics)
        for i in range(len(metrics["objective"])):
            step = first_step + i + 1
            row = {k: v[i] for k, v in metrics.items()}
            if int(row["bad_steps"]) >= self.trainer.config.max_bad_steps:
                raise TrainingDiverged(self._diagnostic(step, row))
            if row["finite"]:
                self.last_ok = row
                self.losses.append((step, float(row["loss"])))
            for k, v in row.items():
                self.sums[k] = self.sums.get(k, 0.0) + np.asarray(v, np.float64)
            self.count += 1
            if step % self.log_every == 0:
                self.flush(step)

    def flush(self, step: int) -> None:
        if not self.count:
            return
        s, n = self.sums, self.count
        scalars = {k: s[k] / n for k in s if k not in ("loss_quartile_sum", "loss_quartile_count",
                                                       "finite", "bad_steps")}
        for q in range(4):
            if s["loss_quartile_count"][q]:
                scalars[f"loss_q{q}"] = s["loss_quartile_sum"][q] / s["loss_quartile_count"][q]
        scalars["skipped"] = n - s["finite"]
        if self.clock is not None and step > self.clock_step:
            seconds = time.perf_counter() - self.clock
            scalars["steps_per_s"] = (step - self.clock_step) / seconds
            scalars["images_per_s"] = scalars["steps_per_s"] * self.images_per_step
            self.start_clock(step)
        self.writer.write_scalars(step, scalars)
        self.sums, self.count = {}, 0

    def _diagnostic(self, step: int, row: dict) -> str:
        last = self.last_ok
        good = (f"the last finite step had loss {float(last['loss']):.4g}, grad norm "
                f"{float(last['grad_norm']):.4g}" if last else "no step was finite")
        return (f"training stopped at step {step}: {int(row['bad_steps'])} consecutive steps "
                f"(train.max_bad_steps={self.trainer.config.max_bad_steps}) had a non-finite loss "
                f"or gradient (now loss {float(row['loss'])}, grad norm {float(row['grad_norm'])}, "
                f"lr {float(row['lr']):.3g}); {good}. Skipped steps change no parameter, so every "
                f"checkpoint holds the last good weights and the run stopped before saving this "
                f"step; the latest checkpoint is intact. Try a lower "
                f"optim.lr, a longer optim.warmup_steps, optim.grad_clip > 0, or "
                f"train.compute_dtype='float32'.")


def _eval_config(config) -> EvalConfig:
    return dataclass_from(EvalConfig, config.get("eval", {}))


def _write_samples(trainer, state, eval_cfg, path, class_names=None):
    params = state.params if eval_cfg.ema_index < 0 else state.ema[eval_cfg.ema_index]
    images, rows = sample_images(trainer, params, jax.random.PRNGKey(eval_cfg.seed), eval_cfg)
    images = parallel.global_to_host(images)
    labels = [class_names[r] for r in rows] if rows is not None and class_names else rows
    if jax.process_index() == 0:
        grid = images_lib.grid(images_lib.to_uint8(images), eval_cfg.per_class, scale=3,
                               row_labels=labels)
        paths.write_with(path, grid.save)
    return images


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Train (resuming from workdir/checkpoints when it holds a checkpoint), then sample a grid,
    estimate bits/dim and write PNGs and metrics to `workdir`. Returns the final metrics."""
    wall_start = time.perf_counter()
    workdir = paths.as_path(workdir)  # local or gs://...: one code path (etils.epath)
    workdir.mkdir(parents=True, exist_ok=True)
    trainer, data_cfg, init_params = trainer_from_config(config)
    tc, eval_cfg = trainer.config, _eval_config(config)
    ckpt_cfg = dataclass_from(ckpt_lib.CheckpointConfig, config.get("checkpoint", {}))
    if ckpt_cfg.every % tc.steps_per_dispatch:
        raise ValueError(f"checkpoint.every={ckpt_cfg.every} must be a multiple of "
                         f"train.steps_per_dispatch={tc.steps_per_dispatch}")
    mesh = parallel.make_mesh(tc.fsdp)
    parallel.local_batch_size(tc.batch_size, mesh)  # checks that every device gets a share
    if process0 := jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))

    key = jax.random.PRNGKey(tc.seed)
    init = functools.partial(trainer.init, params=init_params)
    abstract = jax.eval_shape(init, key)
    state_sh = parallel.state_shardings(mesh, abstract)
    ckpts = ckpt_lib.CheckpointManager(workdir / "checkpoints", ckpt_cfg)
    restored = ckpts.restore(jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh))
    if restored is None:
        state, data_state = jax.jit(init, out_shardings=state_sh)(key), None
    else:
        state, data_state = restored
    # Each process reads only its rows of every global batch (data.py: "Order").
    iterator = data_lib.make_iterator(data_cfg, tc.batch_size, data_state)
    step = int(state.step)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    batch_sh = parallel.batch_sharding(mesh, ndim_leading=1)

    def next_batches():
        return parallel.host_to_global(iterator.next(tc.steps_per_dispatch), batch_sh)

    writer = MetricWriter(workdir)
    logger = _Logger(writer, trainer, int(config.get("log_every", 100)), tc.batch_size)
    if process0:
        print(f"diffjax.train: {type(trainer.module).__name__} {n_params / 1e6:.2f} M params, "
              f"{jax.device_count()} {jax.default_backend()} device(s) mesh {dict(mesh.shape)}, "
              f"global batch {tc.batch_size}, {'resuming at step ' + str(step) if step else 'from scratch'}"
              f" -> {tc.total_steps} steps; workdir {workdir}", file=sys.stderr, flush=True)
    compile_start = time.perf_counter()
    batches = next_batches() if step < tc.total_steps else None
    compiled = compile_steps(trainer, mesh, state_sh).lower(state, batches).compile() \
        if batches is not None else None
    compile_s = time.perf_counter() - compile_start
    preempted = ckpt_lib.PreemptionFlag()
    pending = None
    from tqdm import tqdm

    bar = tqdm(total=tc.total_steps, initial=step, disable=not process0, unit="step",
               dynamic_ncols=True, mininterval=2.0)
    train_start = time.perf_counter()
    logger.start_clock(step)
    try:
        while step < tc.total_steps:
            state, metrics = compiled(state, batches)
            first, step = step, step + tc.steps_per_dispatch
            # The previous dispatch's metrics are read while this one runs (no device stall).
            if pending is not None:
                logger.add(*pending)
            pending = (first, metrics)
            bar.update(tc.steps_per_dispatch)
            # Every process calls reached() after every dispatch: with several processes it is
            # JAX's agreement on one step, so that all save the same one.
            stop = preempted.reached(step // tc.steps_per_dispatch)
            save = step % ckpt_cfg.every == 0 or step == tc.total_steps or stop
            if save:
                logger.add(*pending)  # a diverged run raises here, before anything is saved
                pending = None
                ckpts.save(step, state, iterator.get_state(), force=True)
            if stop:
                ckpts.wait()
                print(f"diffjax.train: SIGTERM: saved step {step}, exiting; rerun the same "
                      f"command to resume", file=sys.stderr, flush=True)
                raise SystemExit(143)
            if eval_cfg.sample_every and step % eval_cfg.sample_every == 0 and tc.task == "diffusion":
                _write_samples(trainer, state, eval_cfg,
                               workdir / f"samples_{step:07d}.png", data_lib.class_names(data_cfg))
            if step < tc.total_steps:
                batches = next_batches()
        if pending is not None:
            logger.add(*pending)
        logger.flush(step)
    finally:
        bar.close()
        ckpts.close()
        preempted.close()
    train_s = time.perf_counter() - train_start
    final = {"steps": step, "params": int(n_params), "compile_s": compile_s, "train_s": train_s,
             "skipped_steps": int(state.skipped)}
    if logger.losses:
        tail = [l for _, l in logger.losses[-max(len(logger.losses) // 10, 1):]]
        final["final_loss"] = float(np.mean(tail))
    writer.flush(upload=True)  # _final_outputs reads metrics.jsonl back from the workdir
    final.update(_final_outputs(trainer, state, eval_cfg, data_cfg, workdir))
    final["wall_s"] = time.perf_counter() - wall_start
    writer.close()
    if process0:
        (workdir / "final_metrics.json").write_text(json.dumps(final, indent=1))
        print("diffjax.train: " + json.dumps(final), file=sys.stderr, flush=True)
    return final


def _final_outputs(trainer, state, eval_cfg, data_cfg, workdir) -> dict:
    """The loss-curve PNG, the sample grid and the bits/dim estimates (diffusion tasks)."""
    out = {}
    log = workdir / "metrics.jsonl"
    if jax.process_index() == 0 and log.exists():
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "loss" in r]
        rows = list({r["step"]: r for r in rows}.values())  # a resumed run may repeat steps
        if rows:
            paths.write_with(workdir / "loss_curve.png", functools.partial(
                images_lib.loss_curve, [r["step"] for r in rows], [r["loss"] for r in rows]))
    if trainer.config.task != "diffusion" or trainer.config.small_size or not eval_cfg.per_class:
        return out
    start = time.perf_counter()
    _write_samples(trainer, state, eval_cfg, workdir / "samples.png",
                   data_lib.class_names(data_cfg))
    out["sample_s"] = time.perf_counter() - start
    if eval_cfg.bpd_images:
        start = time.perf_counter()
        test = data_lib.eval_arrays(data_cfg, eval_cfg.bpd_split, eval_cfg.bpd_images)
        key = jax.random.PRNGKey(eval_cfg.seed + 1)
        for name, params in (("raw", state.params), ("ema", state.ema[eval_cfg.ema_index])):
            bpd = estimate_bpd(trainer, params, test["image"], test["label"], key,
                               eval_cfg.bpd_t_per_image, eval_cfg.batch)
            out[f"bpd_{name}"] = float(bpd.mean())
            out[f"bpd_{name}_stderr"] = float(bpd.std() / np.sqrt(len(bpd)))
        out["bpd_s"] = time.perf_counter() - start
    return out


# =========================================================================== command line

_DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py"


def main(argv=None) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", str(_DEFAULT_CONFIG),
                                    "experiment config (configs/*.py)", lock_config=True)
    flags.DEFINE_string("workdir", None, "checkpoints, metrics and images go here (a local "
                        "path, or gs://bucket/dir: every process of a multi-host run must see it)")
    flags.mark_flags_as_required(["workdir"])
    distributed.define_flags()

    def run(_):
        from absl import logging

        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
        # Before any computation: the processes of a pod / cluster become one JAX program.
        distributed.initialize(distributed.config_from_flags(flags.FLAGS))
        distributed.exit_on_error(train_and_evaluate, flags.FLAGS.config, flags.FLAGS.workdir)

    app.run(run, argv=argv)


# =========================================================================== GLIDE: text conditioning
#
# conditioning="text" trains GLIDE's text-conditional UNets (diffjax.models.glide) on image-caption
# batches {"image", "tokens", "mask"} (data.captions): captions dropped to the empty one with
# probability caption_dropout (GLIDE: 0.2) for classifier-free guidance; inpaint=True adds random
# masks (diffjax.text2im.random_inpaint_masks) and the inpainting model's inputs; small_size > 0 the
# text-conditional upsampler (low_res = the area-downsampled batch, quantised to 8 bits as GLIDE
# samples it). With init_from a converted GLIDE checkpoint of another class (text2im -> inpaint,
# upsample -> upsample-inpaint) the new input channels start at zero (GLIDE paper, sec. 4).


@dataclasses.dataclass(frozen=True)
class TextSetup:
    """What the step and the sampler need to know about captions."""

    tokenizer: str
    text_ctx: int
    pad_token: int


def _check_text_config(cfg: TrainConfig) -> None:
    if not 0.0 <= cfg.caption_dropout < 1.0:
        raise ValueError(f"train.caption_dropout={cfg.caption_dropout} must be in [0, 1) "
                         f"(GLIDE: 0.2)")
    if (cfg.caption_dropout or cfg.inpaint) and cfg.conditioning != "text":
        raise ValueError(f"train.caption_dropout / train.inpaint apply to GLIDE's text models: set "
                         f"train.conditioning='text' (got {cfg.conditioning!r})")
    if cfg.conditioning == "text" and cfg.task != "diffusion":
        raise ValueError(f"train.conditioning='text' trains a diffusion model, not task="
                         f"{cfg.task!r}")


def build_text_model(model_flags: dict, train: TrainConfig, data_cfg, n_vocab: int,
                     learn_sigma: bool):
    """A GLIDE model from glide-text2im's create_model flags (num_channels, attention_resolutions
    as resolutions, xf_width, ...): Text2ImUNet, or the inpainting / super-resolution classes for
    train.inpaint / train.small_size; text_ctx and n_vocab come from the data's tokenizer."""
    from diffjax.compat import glide_text2im as GT

    flags = dict(model_flags)
    if flags.pop("text_ctx", data_cfg.text_ctx) != data_cfg.text_ctx:
        raise ValueError(f"model.text_ctx={model_flags['text_ctx']} differs from data.text_ctx="
                         f"{data_cfg.text_ctx}: set them equal (the captions' token count)")
    if data_cfg.channels != 3:
        raise ValueError(f"GLIDE models take RGB images: set data.channels=3 (got "
                         f"{data_cfg.channels})")
    module = GT.create_model(image_size=data_cfg.image_size, inpaint=train.inpaint,
                             super_res=bool(train.small_size), use_fp16=False,
                             text_ctx=data_cfg.text_ctx, n_vocab=n_vocab, **flags)
    return module.clone(out_channels=6 if learn_sigma else 3, dtype=train.resolved_dtype(),
                        use_checkpoint=train.remat)


def text_model_setup(config, train: TrainConfig, data_cfg, loaded_module, loaded_params,
                     learn_sigma: bool):
    """(module, init params or None, TextSetup) of a text-conditional run. From a converted
    checkpoint of a different GLIDE class the weights are carried over with zero weights for the
    new input channels (diffjax.text2im.expand_input_channels)."""
    from diffjax import text2im
    from diffjax.compat import glide_text2im as GT

    if not data_cfg.captions:
        raise ValueError("train.conditioning='text' needs captions: set data.captions (the caption "
                         "feature, 'txt' for an image folder with .txt files) and data.tokenizer")
    tokenizer = tokenizer_lib.load(data_cfg.tokenizer)
    text = TextSetup(data_cfg.tokenizer, data_cfg.text_ctx, tokenizer.end_token)
    if loaded_module is None:
        return (build_text_model(dict(config.model), train, data_cfg, tokenizer.n_vocab,
                                 learn_sigma), None, text)
    tokenizer_lib.check_vocabulary(tokenizer, getattr(loaded_module, 'n_vocab', None), type(loaded_module).__name__)
    if getattr(loaded_module, "text_ctx", None) != data_cfg.text_ctx:
        raise ValueError(f"init_from has text_ctx={getattr(loaded_module, 'text_ctx', None)}; set "
                         f"data.text_ctx to it")
    name = {(False, False): "Text2ImUNet", (True, False): "InpaintText2ImUNet",
            (False, True): "SuperResText2ImUNet",
            (True, True): "SuperResInpaintText2ImUNet"}[(train.inpaint, bool(train.small_size))]
    target = GT.MODEL_CLASSES[name]
    if type(loaded_module) is target:
        return loaded_module, loaded_params, text
    module = text2im.with_class(loaded_module, target)
    args, kwargs = module.example_inputs(1)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, **kwargs))["params"]
    params = text2im.expand_input_channels(module, shapes, loaded_module, loaded_params)
    return module, params, text


def text_model_kwargs(trainer: Trainer, batch: dict, key) -> dict:
    """The text model's inputs for a batch: tokens / mask with caption dropout, plus low_res
    (upsampler) and random-mask inpainting inputs."""
    from diffjax import text2im

    cfg, text = trainer.config, trainer.text
    if "tokens" not in batch or "mask" not in batch:
        raise ValueError(f"conditioning='text' needs batches with 'tokens' and 'mask' (got "
                         f"{sorted(batch)}): set data.captions and data.tokenizer")
    k_drop, k_mask = jax.random.split(key)
    tokens, mask, _ = text2im.drop_captions(k_drop, batch["tokens"].astype(jnp.int32),
                                            batch["mask"].astype(bool), cfg.caption_dropout,
                                            text.pad_token)
    kwargs = {"tokens": tokens, "mask": mask}
    image = batch["image"].astype(jnp.float32)
    if cfg.small_size:
        kwargs["low_res"] = text2im.quantize_8bit(area_downsample(image, cfg.small_size))
    if cfg.inpaint:
        masks = text2im.random_inpaint_masks(k_mask, image.shape[0], image.shape[1])
        kwargs.update(text2im.inpaint_kwargs(image, masks))
    return kwargs


def sample_text_images(trainer: Trainer, params, key, eval_cfg: EvalConfig):
    """(images [P * per_class, H, W, C], prompts): per_class samples of each of eval.prompts (the
    empty caption when none) with classifier-free guidance eval.guidance_scale."""
    from diffjax import text2im
    from diffjax.tokenizer import tokens_and_mask

    text = trainer.text
    prompts = list(eval_cfg.prompts) or [""]
    tokens, mask = tokens_and_mask(tokenizer_lib.load(text.tokenizer), prompts, text.text_ctx)
    tokens, mask = (np.repeat(tokens, eval_cfg.per_class, 0), np.repeat(mask, eval_cfg.per_class, 0))
    stage = text2im.Stage(trainer.module, {"params": params},
                          trainer.sampling_diffusion(eval_cfg.respacing))
    inpaint = {}
    if trainer.config.inpaint:  # nothing known: the inpainting model as a text2im one
        inpaint = {"inpaint_image": np.zeros((len(tokens),) + trainer.image_shape, np.float32),
                   "inpaint_mask": np.zeros((len(tokens),) + trainer.image_shape[:2] + (1,),
                                            np.float32)}
    images = text2im.sample_base(key, stage, tokens, mask, batch_size=len(tokens),
                                 cfg_scale=eval_cfg.guidance_scale, pad_token=text.pad_token,
                                 sampler=eval_cfg.sampler, **inpaint)
    return images, prompts


# Last in the file: `python -m diffjax.train` runs the module top to bottom, so everything main()
# reaches must be defined above this line.
if __name__ == "__main__":
    main()
