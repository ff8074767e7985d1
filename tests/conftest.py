"""Test-suite setup: several CPU devices so multi-device code paths are exercised on CPU,
and fixtures for the golden vectors in ../shared/parity (see tests/_util.py)."""
import os

# Must run before JAX initialises its backend.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)

import pytest  # noqa: E402

from tests._util import PARITY, PRESETS, Golden, require  # noqa: E402


@pytest.fixture(scope="session")
def parity_dir():
    return require(PARITY)


@pytest.fixture(scope="session")
def presets_dir():
    return require(PRESETS)


@pytest.fixture(scope="session")
def golden():
    """golden('diffusion') -> Golden for ../shared/parity/diffusion.npz (cached per session)."""
    cache = {}

    def load(name):
        if name not in cache:
            cache[name] = Golden(require(PARITY / f"{name}.npz"))
        return cache[name]

    return load


# A classifier-free-guided run of 2 steps on real Fashion-MNIST (10-step chain, 2 EMAs): what the
# workdir readers (evaluate --bpd, sample --workdir) are tested on.
TINY_WORKDIR_CONFIG = dict(
    data=dict(source="fashion_mnist", image_size=32, channels=1, resize="pad", seed=1),
    model=dict(model_channels=32, num_res_blocks=0, channel_mult=(1, 1), attention_resolutions=(),
               num_heads=1),
    diffusion=dict(beta_schedule="cosine", num_steps=10, variance="learned_range"),
    conditioning={"class": dict(num_classes=10, dropout=0.2)},
    train=dict(task="diffusion", batch_size=4, total_steps=2, ema_rates=(0.9, 0.999), seed=3),
    optim=dict(lr=1e-3, warmup_steps=1),
    checkpoint=dict(every=2, keep=1, async_save=False),
    eval=dict(per_class=0, sampler="ddpm", respacing="5"),
    log_every=1,
)


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
    """The workdir of TINY_WORKDIR_CONFIG, trained once per session."""
    import ml_collections

    from diffjax import data as data_lib
    from diffjax.pipelines import training as T

    try:
        data_lib.fashion_mnist("train")
    except (FileNotFoundError, OSError) as err:
        pytest.skip(f"real Fashion-MNIST is absent ({err}): apt-get install dataset-fashion-mnist")
    path = tmp_path_factory.mktemp("tiny_workdir")
    T.train_and_evaluate(ml_collections.ConfigDict(TINY_WORKDIR_CONFIG), path)
    return path
