"""diffjax.models.convolution: lax's convolution, the same values and derivatives, with an input
gradient that XLA:CPU keeps in its fast form inside loops (why: the module docstring)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from diffjax.compat import gd_models
from diffjax.models import convolution
from tests._util import rel_err

HI = lax.Precision.HIGHEST

# (input shape, kernel shape, strides, padding, dimension numbers): the kinds diffjax's models run.
NHWC = ("NHWC", "HWIO", "NHWC")
CASES = {
    "3x3": ((2, 8, 8, 4), (3, 3, 4, 6), (1, 1), ((1, 1), (1, 1)), NHWC),
    "3x3 stride 2": ((2, 8, 8, 4), (3, 3, 4, 6), (2, 2), ((1, 1), (1, 1)), NHWC),
    "1x1 over tokens": ((2, 10, 4), (1, 4, 12), (1,), ((0, 0),), ("NWC", "WIO", "NWC")),
    "patches": ((2, 8, 8, 3), (4, 4, 3, 5), (4, 4), "VALID", NHWC),
    "NCHW": ((2, 4, 8, 8), (6, 4, 3, 3), (1, 1), ((1, 1), (1, 1)), ("NCHW", "OIHW", "NCHW")),
}


def _both(case):
    """(x, w, r, ours, lax's), r a random cotangent of the output's shape."""
    x_shape, w_shape, strides, padding, dn = CASES[case]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)

    def ours(x, w):
        return convolution.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn,
                                                precision=HI)

    def theirs(x, w):
        return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn, precision=HI)

    r = jnp.asarray(rng.standard_normal(theirs(x, w).shape), jnp.float32)
    return x, w, r, ours, theirs


@pytest.mark.parametrize("case", sorted(CASES))
def test_values_and_derivatives_are_lax_s(case):
    """Values, reverse mode (both arguments), forward mode, and a second-order product: equal to
    lax's own autodiff of its convolution (an independent derivation, JAX's transpose rules)."""
    x, w, r, ours, theirs = _both(case)
    assert np.array_equal(ours(x, w), theirs(x, w))
    for got, want in zip(jax.grad(lambda x, w: jnp.sum(ours(x, w) * r), (0, 1))(x, w),
                         jax.grad(lambda x, w: jnp.sum(theirs(x, w) * r), (0, 1))(x, w)):
        assert rel_err(got, want) <= 1e-6
    tangents = (jnp.cos(x), jnp.sin(w))
    assert rel_err(jax.jvp(ours, (x, w), tangents)[1], jax.jvp(theirs, (x, w), tangents)[1]) <= 1e-6

    def hvp(conv):  # d/dx <grad_x sum(tanh(conv)), x>: reverse over reverse through the rule
        g = jax.grad(lambda x: jnp.sum(jnp.tanh(conv(x, w))))
        return jax.grad(lambda x: jnp.vdot(g(x), x))(x)

    assert rel_err(hvp(ours), hvp(theirs)) <= 1e-5


def _all_labels(compiled_text):
    """Every convolution's dim_labels in compiled HLO ('b01f_01io->b01f', ...)."""
    return re.findall(r" convolution\(.*?dim_labels=(\w+_\w+->\w+)", compiled_text)


cpu_only = pytest.mark.skipif(jax.default_backend() != "cpu",
                              reason="the kernel layout that matters is XLA:CPU's")


@cpu_only
@pytest.mark.parametrize("case", ["3x3", "3x3 stride 2", "1x1 over tokens"])
@pytest.mark.parametrize("wrt", ["input", "weights"])
def test_gradients_inside_a_loop_are_canonical_convolutions(case, wrt):
    """XLA:CPU only rewrites non-canonical convolutions (lax's transpose rules emit `01oi` kernels
    for the input gradient, `f01b_i01o->01bf` for the weight gradient) into its fast form in the
    entry computation; inside a loop body they run as a naive loop nest. Ours must compile to the
    canonical `b01f_01io->b01f` there (a 1x1 one may become a dot: no convolution left at all),
    and compute what lax's does."""
    x, w, r, ours, theirs = _both(case)

    def loop(conv):
        if wrt == "input":
            step = jax.grad(lambda x: jnp.sum(jnp.tanh(conv(x, w)) * r))
            return jax.jit(lambda x: lax.fori_loop(0, 2, lambda i, x: x - 0.1 * step(x), x)), x
        step = jax.grad(lambda w: jnp.sum(jnp.tanh(conv(x, w)) * r))
        return jax.jit(lambda w: lax.fori_loop(0, 2, lambda i, w: w - 0.1 * step(w), w)), w

    (f, arg), (g, _) = loop(ours), loop(theirs)
    labels = _all_labels(f.lower(arg).compile().as_text())
    assert all(re.fullmatch(r"b(0?1?)f_\1io->b\1f", k) for k in labels), labels
    assert len(labels) == 2 or case.startswith("1x1"), labels
    assert rel_err(f(arg), g(arg)) <= 1e-6


@cpu_only
def test_classifier_guidance_gradient_in_a_loop_has_only_canonical_convolutions():
    """Every convolution of an ADM noisy classifier goes through the hook: its input gradient
    inside a loop (what classifier guidance in a sampler compiles) has only canonical kernels."""
    clf = gd_models.build("EncoderUNetModel", image_size=8, in_channels=3, model_channels=32,
                          out_channels=4, num_res_blocks=1, attention_resolutions=(2,),
                          channel_mult=(1, 2), num_head_channels=16, use_scale_shift_norm=True,
                          resblock_updown=True, pool="attention")
    x = jnp.zeros((2, 8, 8, 3))
    t = jnp.array([3, 7])
    variables = clf.init(jax.random.PRNGKey(0), x, t)
    step = jax.grad(lambda x: jnp.sum(jax.nn.log_softmax(clf.apply(variables, x, t))[:, 0]))
    loop = jax.jit(lambda x: lax.fori_loop(0, 2, lambda i, x: x + step(x), x))
    labels = _all_labels(loop.lower(x).compile().as_text())
    assert labels and all(re.fullmatch(r"b(0?1?)f_\1io->b\1f", k) for k in labels), labels
