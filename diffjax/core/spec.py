"""`DiffusionSpec`: what a diffusion is, in the library's own words.

The spec is the one description of a diffusion that configs, checkpoints (the model bundle) and the
API use: its beta schedule (a name or explicit betas) and number of training steps, what the network
predicts, how the reverse variance is chosen, and the training loss. It is frozen and hashable
(static under jit). `spec.schedule(grid)` gives the float32 tables a sampler runs on, respaced to a
`TimeGrid`; `spec.config` the static parameterisation the maths in `diffjax.core.diffusion` reads.

Vocabulary (papers' names):
  prediction  "eps" (Ho et al. 2020) | "x0" | "v" (Salimans & Ho 2022) | "xprev" (the posterior
              mean itself)
  variance    "fixed_small" (posterior variance) | "fixed_large" (beta_t) | "learned" (log
              variance) | "learned_range" (Nichol & Dhariwal 2021 eq. 15)
  loss        "mse" (L_simple; with a learned variance the hybrid loss L_simple + L_vlb on a
              stop-gradient mean, Nichol & Dhariwal sec. 3.1; "hybrid" is accepted for it) | "kl"
              (the variational bound term L_t)
  rescale_loss          mse: L_vlb x T/1000 (improved-diffusion's RESCALED_MSE); kl: x T
  rescale_timesteps     the network sees t * 1000 / T as a float (improved-diffusion)
guided-diffusion's flags map onto a spec in `diffjax.compat` (one place).
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import numpy as np

from diffjax.core import fields
from diffjax.core import schedules as S
from diffjax.core.diffusion import DiffusionConfig
from diffjax.core.timegrid import TimeGrid

BETA_SCHEDULES = ("linear", "cosine", "custom")
PREDICTIONS = {"eps": "epsilon", "x0": "start_x", "v": "v", "xprev": "previous_x"}
VARIANCES = ("fixed_small", "fixed_large", "learned", "learned_range")
LOSSES = ("mse", "hybrid", "kl")
# guided-diffusion's diffusion flags and the spec setting that replaces each (for error messages;
# the mapping itself lives in diffjax.compat).
GD_FLAGS = {
    "learn_sigma": "variance='learned_range' (or 'fixed_small' / 'fixed_large')",
    "sigma_small": "variance='fixed_small'",
    "noise_schedule": "beta_schedule",
    "diffusion_steps": "num_steps",
    "predict_xstart": "prediction='x0'",
    "predict_v": "prediction='v'",
    "use_kl": "loss='kl'",
    "rescale_learned_sigmas": "loss='mse' with rescale_loss=True",
    "timestep_respacing": "a sampling TimeGrid (python -m diffjax sample --steps ddim25)",
}


@dataclasses.dataclass(frozen=True)
class DiffusionSpec:
    """A diffusion: beta schedule ("linear", "cosine", or "custom" with `betas`), `num_steps`
    training steps, and the parameterisation (module docstring)."""

    beta_schedule: str = "linear"
    num_steps: int = 1000
    betas: tuple | None = None
    prediction: str = "eps"
    variance: str = "fixed_large"
    loss: str = "mse"
    rescale_loss: bool = False
    rescale_timesteps: bool = False

    def __post_init__(self):
        fields.check_choice("diffusion.beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        fields.check_choice("diffusion.prediction", self.prediction, PREDICTIONS)
        fields.check_choice("diffusion.variance", self.variance, VARIANCES)
        fields.check_choice("diffusion.loss", self.loss, LOSSES)
        if not isinstance(self.num_steps, (int, np.integer)) or isinstance(self.num_steps, bool) \
                or self.num_steps < 1:
            raise ValueError(f"diffusion.num_steps={self.num_steps!r} must be a positive integer "
                             f"(the training chain's length, e.g. 1000)")
        if (self.beta_schedule == "custom") != (self.betas is not None):
            raise ValueError("diffusion.betas are given exactly when diffusion.beta_schedule is "
                             "'custom': set both, or neither")
        if self.betas is not None:
            betas = tuple(float(b) for b in np.asarray(self.betas, np.float64).reshape(-1))
            S.respace_betas(np.asarray(betas), [0])  # validates (0, 1]
            if len(betas) != self.num_steps:
                raise ValueError(f"diffusion.betas has {len(betas)} values but num_steps="
                                 f"{self.num_steps}: make them equal")
            object.__setattr__(self, "betas", betas)
        if self.loss == "hybrid" and not self.learned_variance:
            raise ValueError(f"diffusion.loss='hybrid' trains a learned variance, but variance="
                             f"{self.variance!r}: use variance='learned_range', or loss='mse'")

    @property
    def learned_variance(self) -> bool:
        return self.variance in ("learned", "learned_range")

    @property
    def config(self) -> DiffusionConfig:
        """The static parameterisation of `diffjax.core.diffusion`."""
        loss = "kl" if self.loss == "kl" else "mse"
        return DiffusionConfig(mean_type=PREDICTIONS[self.prediction], var_type=self.variance,
                               loss_type=f"rescaled_{loss}" if self.rescale_loss else loss,
                               rescale_timesteps=self.rescale_timesteps)

    def training_betas(self) -> np.ndarray:
        """The betas [num_steps] float64 of the training chain."""
        if self.betas is not None:
            return np.asarray(self.betas, np.float64)
        return S.get_named_beta_schedule(self.beta_schedule, self.num_steps)

    def schedule(self, grid: Any = None) -> S.Schedule:
        """The tables a sampler (or the trainer, grid None) runs on: the training chain respaced
        to `grid` (a TimeGrid, step count or respacing string; None keeps every step)."""
        betas = self.training_betas()
        kept = TimeGrid.parse(grid).timesteps(len(betas))
        new_betas, timestep_map = S.respace_betas(betas, kept)
        return S.Schedule.from_betas(new_betas, timestep_map, len(betas))

    def output_channels(self, channels: int) -> int:
        """Channels the network outputs for images of `channels` channels."""
        return 2 * channels if self.learned_variance else channels

    def to_dict(self) -> dict:
        return fields.to_dict(self)

    @classmethod
    def from_dict(cls, values, where: str = "diffusion") -> "DiffusionSpec":
        """A spec from a dict (a config section, a checkpoint's metadata); unknown keys are an
        error naming the closest valid key, and guided-diffusion's flag names the native setting
        that replaces them."""
        given = dict(values.to_dict() if hasattr(values, "to_dict") else values or {})
        for name in set(given) - set(fields.names(cls)):
            flag = difflib.get_close_matches(name, GD_FLAGS, n=1, cutoff=0.75)
            if flag:
                raise ValueError(f"unknown DiffusionSpec setting in {where}: {name!r} (did you "
                                 f"mean guided-diffusion's {flag[0]!r}? here it is "
                                 f"{GD_FLAGS[flag[0]]})")
        return fields.from_dict(cls, given, where)
