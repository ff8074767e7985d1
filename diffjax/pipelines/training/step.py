"""One pure training step, `Trainer.train_step(state, batch)`, and its compilation over a mesh.

    key = fold_in(state.rng, state.step)         -> t ~ timestep sampler, noise, conditioning
                                                    dropout (diffjax.conditioning), dropout
    loss, grads = value_and_grad(objective)       (microbatches accumulated with lax.scan)
    clip, AdamW (warm-up + schedule)              (optax)
    EMA for every rate (with warm-up)             ema <- d ema + (1 - d) params
    timestep-sampler update                       (loss-second-moment history)
    a non-finite loss, gradient, update or new parameter
                                                  -> nothing changes but the step and the counters

Randomness depends only on (seed, step), so a run resumed from a checkpoint reproduces an
uninterrupted run bit for bit on the same machine.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from diffjax import parallel
from diffjax.conditioning import Conditioning
from diffjax.core import diffusion as D
from diffjax.core import schedules as S
from diffjax.core import timestep_sampling
from diffjax.core.spec import DiffusionSpec
from diffjax.pipelines.training.config import TrainConfig
from diffjax.models.registry import build_network
from diffjax.pipelines.training.optim import (
    OptimConfig, ema_decay, ema_update, lr_schedule, make_optimizer)
from diffjax.pipelines.training.state import TrainState, new_state


def _all_finite(tree) -> jnp.ndarray:
    """True when every floating-point value of `tree` is finite. x * 0 is 0 for a finite x and NaN
    for inf or NaN (XLA keeps IEEE semantics: it does not fold x * 0), so one fused sum per leaf
    answers, with no boolean copy of the leaf and no overflow. (isfinite + all ran as three
    operations per leaf: 80 ms of a CIFAR-10 training step, for the weights and Adam's moments.)"""
    sums = [jnp.sum(x * 0) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
    return jnp.isfinite(functools.reduce(jnp.add, sums)) if sums else jnp.asarray(True)


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The static parts of training (hashable: closed over by jit): the module, the diffusion
    (spec, its schedule and config), the conditioning, the timestep sampler, the optimizer and
    the train config."""

    module: Any
    spec: DiffusionSpec
    schedule: S.Schedule
    diffusion: D.DiffusionConfig
    conditioning: Conditioning
    sampler: Any
    optimizer: Any
    config: TrainConfig
    optim: OptimConfig
    image_shape: tuple

    def init(self, key, params=None) -> TrainState:
        """A fresh TrainState; `params` (e.g. a loaded model's) replace the random init."""
        return new_state(self.module, self.optimizer, self.sampler, self.config.ema_rates, key,
                         params)

    # -- losses ---------------------------------------------------------------------------------

    def _training_module(self):
        """The module the losses differentiate: conv_algorithm "auto" runs as "direct", where
        Winograd's forward did not pay (diffjax.models.winograd.CONV_ALGORITHMS); sampling and
        evaluation keep "auto"."""
        if getattr(self.module, "conv_algorithm", None) == "auto":
            return self.module.clone(conv_algorithm="direct")
        return self.module

    def _model_kwargs(self, batch, key):
        """The network's conditioning inputs for a batch (with each kind's dropout for
        classifier-free training); a classifier's labels are its targets, not an input."""
        if self.config.task == "classifier":
            return {}
        return self.conditioning.model_kwargs(batch, key)

    def _losses(self, params, example, dropout_key):
        """Per-example terms of one (micro)batch; `example` holds x0, t, noise, weights and the
        model kwargs. Returns (objective, terms) with terms[loss] [b]."""
        apply = functools.partial(self._training_module().apply, {"params": params}, train=True,
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
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A finite loss and gradient can still give non-finite weights (an overflowing learning
        # rate, Adam with eps = 0): the new parameters are checked too. Adam's moments need no
        # check: with a finite gradient norm every g and g^2 is finite, and m <- b1 m + (1 - b1) g,
        # v <- b2 v + (1 - b2) g^2 stay below max(|m|, |g|) and max(v, g^2), finite from finite.
        finite = jnp.isfinite(objective) & jnp.isfinite(grad_norm) & _all_finite(params)
        ema = tuple(ema_update(e, params, ema_decay(rate, state.step, cfg.ema_warmup))
                    for e, rate in zip(state.ema, cfg.ema_rates))
        losses = jax.lax.stop_gradient(terms["loss"])
        sampler_state = self.sampler.update(state.sampler_state, t, losses)

        # One conditional keeps the old state after a non-finite step. (A select per leaf would
        # do the same, but XLA copies the flag's computation, a chain of per-leaf scalar ops,
        # into every leaf's select: leaves^2 operations, a 1M-line program and minutes of
        # compile for the default model.)
        params, ema, opt_state, sampler_state = jax.lax.cond(
            finite, lambda: (params, ema, opt_state, sampler_state),
            lambda: (state.params, state.ema, state.opt_state, state.sampler_state))
        new_state = TrainState(
            step=state.step + 1, params=params, ema=ema, opt_state=opt_state,
            rng=state.rng, sampler_state=sampler_state,
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
        """`steps_per_dispatch` steps on stacked batches [S, B, ...]; metrics [S], as one rolled
        `lax.scan`: compile time does not grow with S. (XLA:CPU used to run a UNet step ~30x slower
        inside a while loop, 46 s vs 1.5 s, until diffjax.models.convolution made the gradient
        convolutions canonical; the default model's 3 steps now take 0.61 s rolled or unrolled,
        and compile in 18 s instead of 41 s.)"""
        if jax.tree.leaves(batches)[0].shape[0] == 1:
            state, metrics = self.train_step(state, jax.tree.map(lambda x: x[0], batches))
            return state, jax.tree.map(lambda x: x[None], metrics)
        return jax.lax.scan(self.train_step, state, batches)


def compile_steps(trainer: Trainer, mesh, state_sharding):
    """`train_steps` jitted over `mesh`: state in and out with `state_sharding` (donated), the
    stacked batches split over every device, metrics replicated."""
    batch_sh = parallel.batch_sharding(mesh, ndim_leading=1)
    # One sharding for every leaf of the batch, whatever its keys (image, label, tokens, mask).
    return jax.jit(trainer.train_steps,
                   in_shardings=(state_sharding, batch_sh),
                   out_shardings=(state_sharding, parallel.replicated(mesh)),
                   donate_argnums=0)


def build_trainer(experiment) -> Trainer:
    """The Trainer of a validated `config.Experiment`."""
    schedule = experiment.spec.schedule()
    return Trainer(
        module=build_network(experiment.network), spec=experiment.spec, schedule=schedule,
        diffusion=experiment.spec.config, conditioning=experiment.conditioning,
        sampler=timestep_sampling.create_named_schedule_sampler(
            experiment.train.schedule_sampler, schedule.num_timesteps),
        optimizer=make_optimizer(experiment.optim), config=experiment.train,
        optim=experiment.optim, image_shape=experiment.image_shape)
