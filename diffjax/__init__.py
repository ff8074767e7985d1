"""diffjax: OpenAI's diffusion models (DDPM, improved DDPM, ADM, GLIDE) in JAX + Flax.

    import diffjax, jax
    model = diffjax.load("adm-imagenet64-cond")          # or a saved model, a run, a .pt + preset
    images = diffjax.sample(model, jax.random.PRNGKey(0), 4, labels=207, guidance_scale=None)
    diffjax.show(images)                                 # a grid, in a notebook

The functional core (`diffjax.core`: DiffusionSpec, schedules, time grids, the diffusion maths,
samplers, guidance) is pure functions over explicit arrays and keys; models are Flax Linen
modules (`diffjax.models`); a `DiffusionModel` bundles a network, its weights, its spec and its
conditioning, and is what is saved, loaded, trained, converted and sampled.
`diffjax.compat.guided_diffusion` speaks openai/guided-diffusion's vocabulary on top of that core.
On CPU, `diffjax.cpu_flags.use("onednn")` first thing makes sampling faster (see cpu_flags).
"""
from diffjax import cpu_flags  # diffjax.cpu_flags.use(...) before the first JAX computation
from diffjax.bundle import DiffusionModel
from diffjax.conditioning import Conditioning
from diffjax.core.spec import DiffusionSpec
from diffjax.core.timegrid import TimeGrid
from diffjax.images import show
from diffjax.io.loading import load
from diffjax.io.store import save
from diffjax.pipelines.sampling import sample

__version__ = "0.2.0"

__all__ = ["DiffusionModel", "Conditioning", "DiffusionSpec", "TimeGrid", "load", "save", "sample",
           "show", "cpu_flags", "__version__"]
