"""Fine-tuning from a released-format checkpoint, end to end with no stand-ins: the real
unet_cond32.pt of ../shared/parity is converted by `diffjax.convert`, the trainer starts from it
(`init_from`) and trains on real Fashion-MNIST. The truth for "starts from the converted weights"
is the original PyTorch model's own output on the golden inputs."""

import json

import jax
import ml_collections
import numpy as np
import pytest

import types

from diffjax.cli import convert as convert_cli
from diffjax.io import convert as convert_lib
from diffjax.io.loading import load_converted

# The conversion's library half, its reader and its command line.
C = types.SimpleNamespace(convert=convert_lib.convert, build_model=convert_lib.build_model,
                          load_converted=load_converted, main=convert_cli.main)
from diffjax import data as data_lib
from diffjax.pipelines import training as T
from diffjax.compat import gd_presets
from tests._util import PARITY, nchw_to_nhwc, rel_err, require


def _fashion_mnist_or_skip():
    try:
        data_lib.fashion_mnist("test")
    except (FileNotFoundError, OSError) as err:
        pytest.skip(f"Fashion-MNIST is not on this machine ({err}); install dataset-fashion-mnist")


@pytest.fixture(scope="module")
def converted(tmp_path_factory, golden):
    g = golden("unet_cond32")
    flags = " ".join(f"--{k} {v}" for k, v in g.config["factory_kwargs"].items())
    config = gd_presets.config_from_flags(flags + " --diffusion_steps 100 --noise_schedule cosine",
                                          num_classes=10, name="unet_cond32")
    out = tmp_path_factory.mktemp("finetune") / "unet_cond32"
    return C.convert(require(PARITY / "pt" / "unet_cond32.pt"), config, out, progress=False)


def finetune_config(init_from, **train):
    c = ml_collections.ConfigDict()
    c.data = dict(source="fashion_mnist", image_size=32, channels=3)  # the model takes RGB
    c.model = dict()  # the converted model's
    c.diffusion = dict()  # the converted model's
    c.conditioning = {"class": dict(num_classes=10)}
    c.train = dict(dict(task="diffusion", batch_size=4, total_steps=2, ema_rates=(0.99,)), **train)
    c.optim = dict(lr=1e-4, warmup_steps=0, schedule="constant")
    c.checkpoint = dict(every=2, keep=1, async_save=False)
    c.eval = dict(per_class=0)
    c.log_every = 1
    c.init_from = str(init_from)
    return c


def test_trainer_starts_from_the_pytorch_model(converted, golden):
    """The trainer's module with its initial (and initial EMA) parameters computes what the
    original PyTorch model computes; its diffusion comes from the converted flags."""
    g = golden("unet_cond32")
    trainer, _, params = T.trainer_from_config(finetune_config(converted))
    assert trainer.schedule.num_timesteps == 100 and trainer.diffusion.var_type.startswith("learned")
    state = trainer.init(jax.random.PRNGKey(0), params=params)
    x, t, y = nchw_to_nhwc(g["in.x"]), g["in.t"], g["in.y"]
    for p in (state.params, state.ema[0]):
        out = trainer.module.apply({"params": p}, x, t, y)
        assert rel_err(out, nchw_to_nhwc(g["out"])) <= 1e-5


@pytest.mark.slow  # ~1 min of compilation on a 2-core CPU
def test_finetune_run_trains_and_checkpoints(converted, tmp_path):
    """`train_and_evaluate` with init_from on real data: finite losses, parameters moved away
    from the converted ones, and the checkpoint of the last step restores them."""
    _fashion_mnist_or_skip()
    final = T.train_and_evaluate(finetune_config(converted), tmp_path)
    assert final["steps"] == 2 and final["skipped_steps"] == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(np.isfinite(losses))

    module, variables, _ = C.load_converted(converted)
    trainer, _, params = T.trainer_from_config(finetune_config(converted))
    from diffjax.io import checkpoints as manager

    abstract = jax.eval_shape(lambda: trainer.init(jax.random.PRNGKey(0), params=params))
    ckpts = manager.CheckpointManager(tmp_path / "checkpoints",
                                      manager.CheckpointConfig(async_save=False))
    state, _ = ckpts.restore(abstract)
    ckpts.close()
    assert int(state.step) == 2
    moved = [float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
             zip(jax.tree.leaves(state.params), jax.tree.leaves(variables["params"]))]
    assert max(moved) > 0
