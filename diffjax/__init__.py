"""diffjax: OpenAI's diffusion models (DDPM, improved DDPM, ADM, GLIDE) in JAX + Flax.

The core is functional: a `Schedule` is a frozen pytree of arrays (`diffjax.schedules`), the
diffusion maths are pure functions over it (`diffjax.diffusion`), and timestep samplers keep their
state explicitly (`diffjax.timestep_sampling`). `diffjax.compat.guided_diffusion` speaks
openai/guided-diffusion's vocabulary on top of that core.
"""

__version__ = "0.1.0"

from diffjax import sample  # noqa: E402,F401  (a callable module: diffjax.sample(key, model, ...))
