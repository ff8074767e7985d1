"""jax.grad through every sampler's loop, with sqrt(N) checkpointing: the gradient with respect to
the initial noise, a continuous conditioning, the guidance scale and the model's parameters
against central finite differences in float64; checkpointing changes no number; and the memory
of the compiled gradient grows as sqrt(N) with it, as N without."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.core import diffusion as D
from diffjax.core import guidance as G
from diffjax.core import samplers as SM
from diffjax.core import schedules as S
from tests.test_inversion import float64_schedule
from tests._util import samplers_quick_first

# x0-prediction through tanh: bounded samples, so that the loss is smooth on the scale of h.
CONFIG = D.DiffusionConfig(mean_type="start_x", var_type="fixed_small")
INPUTS = ("x_T", "cond", "scale", "variables")


def apply(v, x, t, cond):
    """A per-pixel MLP [B, H, W, C] -> [B, H, W, C] with a timestep and conditioning [B, E] input."""
    shift = cond @ v["wc"] + v["temb"] * (t.astype(x.dtype) / 1000.0)[:, None]
    h = jnp.tanh(x @ v["w1"] + v["b1"] + shift[:, None, None, :])
    return jnp.tanh(h @ v["w2"] + 0.5 * x)


def problem(dtype, batch=2, size=3, channels=2, hidden=8, embed=3):
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    def normal(key, shape, scale):
        return scale * jax.random.normal(key, shape, dtype)

    variables = {"w1": normal(keys[0], (channels, hidden), 0.7), "b1": normal(keys[1], (hidden,), 0.1),
                 "wc": normal(keys[2], (embed, hidden), 0.5), "temb": normal(keys[3], (hidden,), 1.0),
                 "w2": normal(keys[4], (hidden, channels), 0.5)}
    inputs = {"x_T": normal(keys[5], (batch, size, size, channels), 1.0),
              "cond": normal(keys[6], (batch, embed), 0.5), "scale": jnp.asarray(2.5, dtype),
              "variables": variables}
    return inputs, normal(keys[7], (batch, size, size, channels), 1.0)


def loss_fn(sampler, sched, target, checkpointing=True, guidance=None):
    def loss(inputs):
        # ClassifierFree itself: G.classifier_free casts the scale to float32.
        cfg = G.ClassifierFree(inputs["scale"], {"cond": jnp.zeros_like(inputs["cond"][:1])},
                               target.shape[-1])
        out = SM.sample(jax.random.PRNGKey(1), (apply, inputs["variables"]), sched, target.shape,
                        sampler=sampler, guidance=G.chain(cfg, guidance), config=CONFIG,
                        model_kwargs={"cond": inputs["cond"]}, clip_denoised=False,
                        x_T=inputs["x_T"], gradient_checkpointing=checkpointing)
        return jnp.sum(out * target)

    return loss


def directional_derivatives(loss, grads, inputs, name, key, h=1e-5):
    """(<grad, d>, (L(p + h d) - L(p - h d)) / 2h) along a random direction d of inputs[name]."""
    leaves, tree = jax.tree.flatten(inputs[name])
    keys = jax.random.split(key, len(leaves))
    direction = tree.unflatten([jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves)])
    moved = [{**inputs, name: jax.tree.map(lambda a, d, s=s: a + s * d, inputs[name], direction)}
             for s in (h, -h)]
    exact = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads[name]), jax.tree.leaves(direction)))
    return float(exact), float((loss(moved[0]) - loss(moved[1])) / (2 * h))


@pytest.mark.parametrize("sampler", samplers_quick_first(sorted(SM.SAMPLERS)))
def test_gradient_through_the_checkpointed_loop_matches_finite_differences(sampler):
    """7 steps: segments of 3, 3 and a shorter last one. Batch 4: sharded over the 4 test devices."""
    with jax.enable_x64(True):
        inputs, target = problem(jnp.float64, batch=4)
        loss = loss_fn(sampler, float64_schedule("cosine", 7), target)
        grads, loss = jax.jit(jax.grad(loss))(inputs), jax.jit(loss)
        for i, name in enumerate(INPUTS):
            exact, fd = directional_derivatives(loss, grads, inputs, name,
                                                jax.random.PRNGKey(10 + i))
            assert abs(fd) > 1e-3, (name, fd)
            # The finite difference's own floor: float64 rounding amplified ~2e4x at the last
            # cosine step (x0 = x / sqrt(abar) - ...), and more by the multistep extrapolations
            # (iPNDM's Adams-Bashforth weights): ~1e-12 absolute / 2h.
            assert abs(exact - fd) < 3e-6 * abs(fd), (name, exact, fd)


def test_checkpointing_changes_no_number():
    """Forward: the same samples and intermediates, here on RePaint's up-and-down walk (26 steps:
    four segments of 6 and one of 2); backward: the same gradient."""
    inputs, target = problem(jnp.float32)
    sched = S.make_schedule("cosine", 1000, "10")
    mask = jnp.zeros(target.shape[:-1] + (1,)).at[:, :, :1].set(1.0)
    repaint = G.inpaint(mask, 0.5 * target, jump_length=2, resample_count=2)
    run = {}
    for checkpointing in (False, True):
        run[checkpointing] = SM.sample(
            jax.random.PRNGKey(2), (apply, inputs["variables"]), sched, target.shape,
            sampler="ddpm", guidance=repaint, config=CONFIG, model_kwargs={"cond": inputs["cond"]},
            x_T=inputs["x_T"], return_intermediates=True, gradient_checkpointing=checkpointing)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), *run.values())
    assert run[True][1]["sample"].shape[0] == len(G.repaint_levels(10, 2, 2))
    grads = [jax.jit(jax.grad(loss_fn("dpm++2m", sched, target, c)))(inputs) for c in (False, True)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *grads)


def test_checkpointed_gradient_memory_grows_as_the_square_root_of_the_steps():
    """Compiled, not run: XLA's temporary memory for 16 and 64 steps (4 and 8 segments)."""
    inputs, target = problem(jnp.float32, batch=2, size=16, channels=3, hidden=64)

    def temp(steps, checkpointing):
        loss = loss_fn("ddim", S.make_schedule("cosine", 1000, str(steps)), target, checkpointing)
        compiled = jax.jit(jax.grad(loss)).lower(inputs).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    plain = temp(64, False) / temp(16, False)
    checkpointed = temp(64, True) / temp(16, True)
    assert 3.5 < plain < 4.5 and checkpointed < 2.5, (plain, checkpointed)


def test_checkpoint_segments_are_checked():
    sched = S.make_schedule("linear", 1000, "4")
    ctx = SM.Context(sched, {}, False, G.chain(), CONFIG, lambda x, t: jnp.tanh(x))
    for bad in (0, "log", True):
        with pytest.raises(ValueError, match="checkpoint_segments="):
            SM.sample_loop(ctx, SM.DDIM(), jnp.zeros((1, 2, 2, 1)), jax.random.PRNGKey(0),
                           checkpoint_segments=bad)
    # more segments than steps: one step each
    out = SM.sample_loop(ctx, SM.DDIM(), jnp.ones((1, 2, 2, 1)), jax.random.PRNGKey(0),
                         checkpoint_segments=9)
    np.testing.assert_array_equal(out, SM.sample_loop(ctx, SM.DDIM(), jnp.ones((1, 2, 2, 1)),
                                                      jax.random.PRNGKey(0)))
