"""`python -m diffjax check`: the diffusion core on a model whose answer is known in closed form.

For data that is a set of K images, the best possible x0-predictor is the posterior mean E[x0 | x_t] = sum_k softmax_k(-|x_t - sqrt(abar) x_k|^2 / (2 (1 - abar))) x_k.
Its variational bound (GD's calc_bpd_loop, one jit-compiled lax.scan) is printed for several
schedules next to the floor log2(K) / D bits per dimension that a model which has memorised the
K images cannot beat; the gap is what the finite chain and the fixed variances cost.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.cli import common
from diffjax.core import diffusion as D
from diffjax.core import schedules as S


def posterior_mean_denoiser(sched: S.Schedule, data: jnp.ndarray):
    """The exact E[x0 | x_t] for x0 uniform over `data` [K, H, W, C], as a model_fn that takes the
    ORIGINAL timestep (what D.model_timesteps passes) and predicts x0."""
    # The model receives original timesteps: alpha-bar of the kept steps, indexed by those.
    abar_of_original = jnp.zeros(sched.original_num_steps).at[sched.timestep_map].set(
        sched.alphas_cumprod)
    flat = data.reshape(data.shape[0], -1)

    def model_fn(x_t, t_original):
        abar = abar_of_original[t_original][:, None, None]
        xt = x_t.reshape(x_t.shape[0], 1, -1)
        logits = -jnp.sum((xt - jnp.sqrt(abar) * flat[None]) ** 2, -1) / (2 * (1 - abar[..., 0]))
        weights = jax.nn.softmax(logits, axis=-1)
        return (weights @ flat).reshape(x_t.shape)

    return model_fn


def main(argv=None) -> None:
    parser = common.parser("check", __doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16, help="K, the number of data images")
    parser.add_argument("--size", type=int, default=8, help="images are size x size x 1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    key_data, key_loop = jax.random.split(jax.random.PRNGKey(args.seed))
    # Smooth random "images" on the 8-bit grid of [-1, 1].
    raw = jax.random.normal(key_data, (args.images, args.size // 2, args.size // 2, 1))
    data = jnp.round((jnp.tanh(jax.image.resize(
        raw, (args.images, args.size, args.size, 1), "linear")) + 1) * 127.5) / 127.5 - 1
    dims = args.size * args.size
    floor = np.log2(args.images) / dims

    print(f"diffjax on {jax.devices()[0].platform}: "
          f"bits/dim of the exact denoiser of K={args.images} images of {args.size}x{args.size}")
    print(f"floor log2(K)/D = {floor:.4f} bits/dim\n")
    print(f"{'schedule':<10}{'T':>6}{'respacing':>11}{'abar_T':>12}{'prior':>10}"
          f"{'L_0':>9}{'sum L_t':>10}{'bits/dim':>10}{'seconds':>9}")
    cfg = D.DiffusionConfig(mean_type="start_x", var_type="fixed_small")
    for name, steps, respacing in (
        ("linear", 1000, None), ("cosine", 1000, None), ("cosine", 4000, None),
        ("cosine", 1000, "100"), ("cosine", 1000, "ddim25"),
    ):
        sched = S.make_schedule(name, steps, respacing)
        fn = posterior_mean_denoiser(sched, data)
        loop = jax.jit(lambda x, k, s=sched, f=fn: D.calc_bpd_loop(s, cfg, f, x, k))
        start = time.perf_counter()
        out = jax.block_until_ready(loop(data, key_loop))
        seconds = time.perf_counter() - start
        vb = np.asarray(out["vb"])
        print(f"{name:<10}{steps:>6}{respacing or '-':>11}{float(sched.alphas_cumprod[-1]):>12.2e}"
              f"{float(out['prior_bpd'].mean()):>10.4f}{vb[:, 0].mean():>9.4f}"
              f"{vb[:, 1:].sum(1).mean():>10.4f}{float(out['total_bpd'].mean()):>10.4f}"
              f"{seconds:>9.2f}")
