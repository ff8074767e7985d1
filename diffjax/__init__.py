"""diffjax: OpenAI's diffusion models (DDPM, improved DDPM, ADM, GLIDE) in JAX + Flax.

The core is functional: a `Schedule` is a frozen pytree of arrays (`diffjax.core.schedules`), the
diffusion maths are pure functions over it (`diffjax.core.diffusion`), and timestep samplers keep their
state explicitly (`diffjax.core.timestep_sampling`). `diffjax.compat.guided_diffusion` speaks
openai/guided-diffusion's vocabulary on top of that core.
"""

__version__ = "0.1.0"


def __getattr__(name):
    # `diffjax.sample` is a callable module (the notebook function and the CLI); imported lazily so
    # that `python -m diffjax.sample` does not find it imported already.
    if name == "sample":
        import importlib

        return importlib.import_module("diffjax.sample")
    raise AttributeError(f"module 'diffjax' has no attribute {name!r}")
