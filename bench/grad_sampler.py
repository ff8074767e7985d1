"""Memory of jax.grad through a sampling loop, with and without sqrt(N) checkpointing, and a
finite-difference check of that gradient.

    python bench/grad_sampler.py [--steps 16 64 256] [--sampler ddim] [--batch 4] [--size 16]
        [--width 32] [--fd-steps 16]

The loss is sum(x_0 * target) of samples from `diffjax.core.samplers.sample` with classifier-free
guidance; it is differentiated with respect to the initial noise x_T, a continuous conditioning
vector, the guidance scale and the model's parameters (a small Flax conv net). For each N the
gradient is compiled (`jax.jit(jax.grad(loss)).lower(...).compile()`) and XLA's
`memory_analysis().temp_size_in_bytes` is read: nothing is run. The plain loop keeps every step's
residuals (memory ~ N); the checkpointed one keeps ~sqrt(N) carries and one segment's residuals
(~ sqrt(N): 4x from 16 to 256 steps, plus what does not grow).

The finite-difference check runs in float64 at --fd-steps steps for every sampler in the registry:
the relative error of the directional derivative along a random direction, per input, against
central differences with h = 1e-5 (truncation ~h^2, rounding ~1e-16 / h). The last line is

    grad_sampler: memory growth 16->256 steps checkpointed <x>x plain <y>x; finite-difference relative error <e>

(the growth between the first and last --steps; e the largest error over samplers and inputs).
"""
from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.core import diffusion as D
from diffjax.core import guidance as G
from diffjax.core import samplers as SM
from diffjax.core import schedules as S

# An x0-predicting net with a tanh output keeps every sample bounded (an untrained eps-net's error
# is amplified by 1 / sqrt(abar) ~ 1e4 at the first cosine steps, and so is the curvature).
CONFIG = D.DiffusionConfig(mean_type="start_x", var_type="fixed_small")
INPUTS = ("x_T", "cond", "scale", "params")


class X0Net(nn.Module):
    """Three 3x3 convolutions, a timestep and a conditioning vector added to the hidden ones; the
    x0 prediction is tanh of the last."""

    width: int
    channels: int

    @nn.compact
    def __call__(self, x, t, cond):
        emb = jnp.concatenate([jnp.sin(t[:, None] / 300.0 * jnp.arange(1, 5)), cond], axis=-1)
        h = nn.Conv(self.width, (3, 3))(x) + nn.Dense(self.width)(emb)[:, None, None, :]
        h = nn.Conv(self.width, (3, 3))(nn.silu(h))
        return jnp.tanh(nn.Conv(self.channels, (3, 3))(nn.silu(h)) + 0.5 * x)


def schedule(steps: int, dtype=jnp.float32) -> S.Schedule:
    """The cosine schedule respaced to `steps`, its tables in `dtype` (float64 for the check)."""
    timestep_map = np.asarray(S.make_schedule("cosine", 1000, str(steps)).timestep_map)
    betas, _ = S.respace_betas(S.get_named_beta_schedule("cosine", 1000), timestep_map)
    tables = {k: jnp.asarray(v, dtype) for k, v in S.schedule_tables(betas).items()}
    return S.Schedule(**tables, timestep_map=jnp.asarray(timestep_map, jnp.int32),
                      original_num_steps=1000)


def problem(batch: int, size: int, width: int, dtype):
    """(module, inputs {x_T, cond, scale, params}, target) with fixed seeds."""
    module = X0Net(width, 3)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    x_T = jax.random.normal(keys[0], (batch, size, size, 3), dtype)
    cond = 0.5 * jax.random.normal(keys[1], (batch, 8), dtype)
    params = module.init(keys[2], x_T, jnp.zeros(batch), cond)
    inputs = {"x_T": x_T, "cond": cond, "scale": jnp.asarray(3.0, dtype),
              "params": jax.tree.map(lambda a: a.astype(dtype), params)}
    return module, inputs, jax.random.normal(keys[3], x_T.shape, dtype)


def loss_fn(module, sched, target, sampler: str, checkpointing: bool):
    def loss(inputs):
        # ClassifierFree itself rather than G.classifier_free, which casts the scale to float32.
        guidance = G.ClassifierFree(inputs["scale"], {"cond": jnp.zeros_like(inputs["cond"][:1])}, 3)
        out = SM.sample(jax.random.PRNGKey(1), (module, inputs["params"]), sched,
                        inputs["x_T"].shape, sampler=sampler, guidance=guidance, config=CONFIG,
                        model_kwargs={"cond": inputs["cond"]}, clip_denoised=False,
                        x_T=inputs["x_T"], gradient_checkpointing=checkpointing)
        return jnp.sum(out * target)

    return loss


def temp_bytes(steps: int, sampler: str, checkpointing: bool, args) -> int:
    module, inputs, target = problem(args.batch, args.size, args.width, jnp.float32)
    grad = jax.jit(jax.grad(loss_fn(module, schedule(steps), target, sampler, checkpointing)))
    return grad.lower(inputs).compile().memory_analysis().temp_size_in_bytes


def directional_derivatives(loss, grads, inputs, name, key, h):
    """(<grad, d>, (L(p + h d) - L(p - h d)) / 2h) along a random direction d of inputs[name]."""
    leaves, tree = jax.tree.flatten(inputs[name])
    keys = jax.random.split(key, len(leaves))
    direction = tree.unflatten([jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves)])
    moved = [{**inputs, name: jax.tree.map(lambda a, d, s=s: a + s * d, inputs[name], direction)}
             for s in (h, -h)]
    exact = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads[name]), jax.tree.leaves(direction)))
    return float(exact), float((loss(moved[0]) - loss(moved[1])) / (2 * h))


def finite_difference_errors(sampler: str, steps: int, h: float = 1e-5) -> dict:
    """{input: |<grad, d> - FD| / |FD|} in float64, d a random direction."""
    with jax.enable_x64(True):
        module, inputs, target = problem(2, 8, 16, jnp.float64)
        loss = loss_fn(module, schedule(steps, jnp.float64), target, sampler, True)
        grads, loss = jax.jit(jax.grad(loss))(inputs), jax.jit(loss)
        errors = {}
        for i, name in enumerate(INPUTS):
            exact, fd = directional_derivatives(loss, grads, inputs, name,
                                                jax.random.PRNGKey(10 + i), h)
            errors[name] = abs(exact - fd) / abs(fd)
        return errors


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--sampler", default="ddim", choices=sorted(SM.SAMPLERS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--fd-steps", type=int, default=16)
    args = p.parse_args(argv)

    print(f"jax.grad of sum(x_0 * target) through {args.sampler} (classifier-free guidance) on "
          f"{jax.devices()[0].platform}; batch {args.batch}, {args.size}x{args.size}x3, conv width "
          f"{args.width}; XLA temp memory of the compiled gradient")
    print(f"{'steps':>6} {'plain MiB':>11} {'checkpointed MiB':>17} {'segments':>9}")
    memory = {}
    for steps in args.steps:
        memory[steps] = (temp_bytes(steps, args.sampler, False, args),
                         temp_bytes(steps, args.sampler, True, args))
        print(f"{steps:>6} {memory[steps][0] / 2**20:>11.2f} {memory[steps][1] / 2**20:>17.2f} "
              f"{SM._num_segments('sqrt', steps):>9}")
    first, last = args.steps[0], args.steps[-1]
    plain = memory[last][0] / memory[first][0]
    checkpointed = memory[last][1] / memory[first][1]

    print(f"finite differences, float64, {args.fd_steps} steps, checkpointed loop "
          f"(relative error of the directional derivative):")
    worst = 0.0
    for sampler in SM.SAMPLERS:
        errors = finite_difference_errors(sampler, args.fd_steps)
        worst = max(worst, *errors.values())
        print(f"  {sampler:>8}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    print(f"grad_sampler: memory growth {first}->{last} steps checkpointed {checkpointed:.1f}x "
          f"plain {plain:.1f}x; finite-difference relative error {worst:.1e}")


if __name__ == "__main__":
    main()
