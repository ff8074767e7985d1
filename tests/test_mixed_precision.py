"""Mixed precision: train.compute_dtype="bfloat16" runs the network in bfloat16 and keeps the
parameters, the EMA and the optimizer state in float32; a 30-step run of the bundled default model
(batch 8) then follows the float32 run's losses within bfloat16's unit roundoff u = 2^-8 (0.39 %).

Why so close: the output convolution stays float32 (guided-diffusion's use_fp16 keeps its `out`
block in float32) and sums 288 bfloat16-rounded features per output, whose independent rounding
errors average to ~u / sqrt(288) of the prediction; and the ADM output convolution starts at
zero, so the first step's prediction is exactly 0 in both runs and the first losses are equal.
Measured (2 cores, jax 0.10.2): at most 8e-4 relative over the 30 steps, 2e-4 in the mean of the
last 10; the bounds asserted are u for every step and for that mean."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import data as data_lib
from diffjax.cli.common import load_config_file
from diffjax.pipelines import training as T
from tests._util import REPO

pytestmark = pytest.mark.slow  # two compiles and 60 steps: ~2 min on 2 idle cores, 8 loaded
STEPS, BATCH = 30, 8
U = 2.0**-8


def _run(dtype: str, batches):
    config = load_config_file(str(REPO / "configs" / "default.py"))
    config.train.update(batch_size=BATCH, total_steps=STEPS, compute_dtype=dtype)
    trainer, _, _ = T.trainer_from_config(config)
    state = trainer.init(jax.random.PRNGKey(0))
    step = jax.jit(trainer.train_step)
    losses = []
    for i in range(STEPS):
        state, metrics = step(state, jax.tree.map(lambda x: x[i], batches))
        losses.append(float(metrics["loss"]))
        assert metrics["loss"].dtype == jnp.float32
    return trainer, state, np.array(losses)


@pytest.fixture(scope="module")
def runs():
    config = load_config_file(str(REPO / "configs" / "default.py"))
    data = data_lib.DataConfig(**config.data)
    batches = data_lib.make_iterator(data, BATCH).next(STEPS)
    return {dtype: _run(dtype, batches) for dtype in ("float32", "bfloat16")}


def _equations(jaxpr, name):
    """The equations of primitive `name` in `jaxpr` and, in program order, in the jaxprs its
    equations call (a convolution sits inside diffjax.models.convolution's custom_jvp call)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == name:
            yield eqn
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if isinstance(inner, jax.extend.core.Jaxpr):
                yield from _equations(inner, name)


def test_bfloat16_computes_in_bfloat16_and_keeps_float32_state(runs):
    for dtype, (trainer, state, _) in runs.items():
        assert jnp.dtype(trainer.module.dtype) == jnp.dtype(dtype)
        for tree in (state.params, state.ema, state.opt_state):
            for leaf in jax.tree.leaves(tree):
                if jnp.issubdtype(leaf.dtype, jnp.floating):
                    assert leaf.dtype == jnp.float32, (dtype, leaf.dtype)
    # Every convolution runs in bfloat16 but the output one, kept in float32 as guided-diffusion's
    # use_fp16 keeps its `out` block.
    trainer = runs["bfloat16"][0]
    args, kwargs = trainer.module.example_inputs(1)
    jaxpr = jax.make_jaxpr(lambda p: trainer.module.apply({"params": p}, *args, **kwargs))(
        runs["bfloat16"][1].params)
    convs = list(_equations(jaxpr.jaxpr, "conv_general_dilated"))
    assert [e.invars[0].aval.dtype for e in convs] == [jnp.bfloat16] * (len(convs) - 1) + [
        jnp.float32]


def test_bfloat16_losses_follow_float32(runs):
    f32, b16 = runs["float32"][2], runs["bfloat16"][2]
    print("float32 ", np.round(f32, 4), "\nbfloat16", np.round(b16, 4),
          "\nrelative", np.round(np.abs(b16 - f32) / f32, 4))
    assert np.all(np.isfinite(b16))
    assert not np.array_equal(f32, b16)  # the policy is active
    assert b16[0] == f32[0]  # the zero-initialised output convolution predicts 0 in both
    per_step = np.abs(b16 - f32) / f32
    assert per_step.max() <= U, per_step
    tail = abs(b16[-10:].mean() - f32[-10:].mean()) / f32[-10:].mean()
    assert tail <= U, tail
    # Both learn: the last 10 steps' loss is below the first 10 steps'.
    for losses in (f32, b16):
        assert losses[-10:].mean() < losses[:10].mean()
