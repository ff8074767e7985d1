"""`python -m diffjax evaluate --bpd` on a workdir trained here for two steps: the exact mode
reports the mean and standard error of GD's bound assembled here image by image from the raw
checkpoint, and the Monte-Carlo mode agrees with it statistically."""
import json
import re

import jax
import ml_collections
import numpy as np
import pytest

from diffjax import data as data_lib
from diffjax.core import diffusion as D
from diffjax.pipelines import training as T
from diffjax.io.checkpoints import CheckpointManager
from diffjax.cli import evaluate as cli
from diffjax.pipelines.evaluation import bpd

@pytest.fixture(scope="module")
def workdir(tiny_workdir):
    return tiny_workdir


def _reported(capsys, *argv):
    assert cli.main([*map(str, argv)]) == 0
    line = capsys.readouterr().out.strip()
    mean, stderr = re.match(r"bits/dim: (\S+) \+- (\S+) ", line).groups()
    return float(mean), float(stderr), line


def _bound_by_hand(workdir, num, ema_index, seed=0):
    """Per image: restore the checkpoint as a raw tree, take EMA `ema_index`, and run GD's
    calc_bpd_loop on that image alone with the conditional label and key fold_in(seed, i)."""
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    trainer, data_cfg, _ = T.trainer_from_config(config)
    manager = CheckpointManager(workdir / "checkpoints")
    state, _ = manager.restore(None)
    manager.close()
    params = state["ema"][ema_index] if ema_index >= 0 else state["params"]
    test = data_lib.eval_arrays(data_cfg, "test", num, seed)
    key = jax.random.PRNGKey(seed)

    @jax.jit
    def bound(x, y, k):
        def model_fn(x_t, t):
            return trainer.module.apply({"params": params}, x_t, t, y=y)

        return D.calc_bpd_loop(trainer.schedule, trainer.diffusion, model_fn, x, k)["total_bpd"][0]

    return np.asarray([float(bound(test["image"][i:i + 1], test["label"][i:i + 1],
                                   jax.random.fold_in(key, i))) for i in range(num)])


@pytest.mark.slow  # the exact bound by the CLI and again image by image: ~40 s on 2 cores
def test_exact_bpd_is_the_bound_of_each_image(workdir, capsys):
    n = 5  # batches of 2: the last one padded; EMA 1 (the second rate), not the default 0
    mean, stderr, line = _reported(capsys, "--bpd", "--checkpoint", workdir, "--num-images", n,
                                   "--batch-size", 2, "--ema", 1)
    expected = _bound_by_hand(workdir, n, 1)
    assert mean == pytest.approx(expected.mean(), rel=1e-5)
    assert stderr == pytest.approx(expected.std(ddof=1) / np.sqrt(n), rel=1e-4)
    assert "every one of 10 timesteps" in line and "5 test images" in line


@pytest.mark.slow
def test_monte_carlo_estimate_agrees_with_the_exact_bound(workdir):
    """Both are unbiased estimates of each image's bound: their per-image differences have
    mean 0 (|mean| within 4 standard errors)."""
    model = bpd.load_for_bpd(workdir)
    exact = bpd.bits_per_dim(model, num_images=12, estimator="exact", batch=12)
    mc = bpd.bits_per_dim(model, num_images=12, estimator="mc", t_per_image=32, batch=12)
    diff = exact["per_image"] - mc["per_image"]
    assert abs(diff.mean()) <= 4 * diff.std(ddof=1) / np.sqrt(len(diff)) + 1e-6
    assert mc["bpd"] == pytest.approx(exact["bpd"], rel=0.05)
    assert 0.5 < exact["bpd"] < 30  # an untrained model of 8-bit images


def test_bpd_errors_name_the_fix(workdir, tmp_path):
    with pytest.raises(SystemExit, match="--checkpoint"):
        cli.main(["--bpd"])
    with pytest.raises(ValueError, match="ema_index=2.*choose 0..1"):
        cli.main(["--bpd", "--checkpoint", str(workdir), "--ema", "2"])
    with pytest.raises(ValueError, match="--data-source"):
        cli.main(["--bpd", "--checkpoint", str(tmp_path)])
    with pytest.raises(SystemExit, match="does not exist"):
        cli.main(["--bpd", "--checkpoint", str(tmp_path / "nowhere")])
