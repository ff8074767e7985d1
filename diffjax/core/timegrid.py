"""Time grids: where a sampler stops, separate from the training chain.

A model is trained on a chain of T timesteps (its `DiffusionSpec`); a sampler visits a subset of
them. `TimeGrid` says which, and `DiffusionSpec.schedule(grid)` turns the kept steps into the
respaced chain every sampler runs on (betas re-derived from alpha-bar ratios, Nichol & Dhariwal
2021 sec. 4), so a grid never changes the model, only the stops.

Kinds: "all" (every training step), "uniform" (N steps evenly spread over [0, T-1], rounded as
guided-diffusion's "N"), "respacing" (any guided-diffusion / GLIDE respacing string: "250",
"10,15,20", "ddim25", "fast27").
"""
from __future__ import annotations

import dataclasses

import numpy as np

from diffjax.core import fields
from diffjax.core.schedules import space_timesteps

KINDS = ("all", "uniform", "respacing")


@dataclasses.dataclass(frozen=True)
class TimeGrid:
    """Which timesteps of a T-step chain a sampler visits. Build with `TimeGrid.parse(...)` or
    directly: TimeGrid("uniform", steps=50), TimeGrid("respacing", respacing="ddim25")."""

    kind: str = "all"
    steps: int = 0
    respacing: str = ""

    def __post_init__(self):
        fields.check_choice("TimeGrid.kind", self.kind, KINDS)
        if self.kind == "uniform" and (not isinstance(self.steps, (int, np.integer))
                                       or self.steps < 1):
            raise ValueError(f"TimeGrid('uniform', steps={self.steps!r}): steps must be a "
                             f"positive integer")
        if self.kind == "respacing" and not str(self.respacing).strip():
            raise ValueError("TimeGrid('respacing') needs a respacing string such as '250', "
                             "'10,15,20', 'ddim25' or 'fast27'")

    @classmethod
    def parse(cls, value) -> "TimeGrid":
        """A grid from a TimeGrid, None / "" (every step), a step count (uniform) or a respacing
        string ("250", "10,15,20", "ddim25", "fast27")."""
        if isinstance(value, TimeGrid):
            return value
        if value is None or (isinstance(value, str) and not value.strip()):
            return cls()
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return cls("uniform", steps=int(value))
        if isinstance(value, str):
            return cls("respacing", respacing=value.strip())
        raise ValueError(f"time grid {value!r}: give a step count, a respacing string such as "
                         f"'ddim25', or a TimeGrid")

    def timesteps(self, num_timesteps: int) -> np.ndarray:
        """The kept timesteps of a chain of `num_timesteps`, sorted: int64 [K]."""
        if self.kind == "all":
            kept = range(num_timesteps)
        elif self.kind == "uniform":
            kept = space_timesteps(num_timesteps, [self.steps])
        else:
            kept = space_timesteps(num_timesteps, self.respacing)
        return np.asarray(sorted(kept), np.int64)

    def describe(self) -> str:
        return {"all": "every step", "uniform": f"{self.steps} uniform steps",
                "respacing": f"respacing {self.respacing!r}"}[self.kind]
