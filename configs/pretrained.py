"""ml_collections presets of OpenAI's released checkpoints: `--config configs/pretrained.py:NAME`.

The table and the guided-diffusion / improved-diffusion flag parser live in
`diffjax.compat.gd_presets` (so that `python -m diffjax convert --preset NAME` works from an
installed package too); see there for the fields of a preset.
"""
from diffjax.compat.gd_presets import PRESETS, get_config  # noqa: F401
