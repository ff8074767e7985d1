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
