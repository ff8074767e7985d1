"""Time grids: where a sampler stops, separate from the training chain.

A model is trained on a chain of T timesteps (its `DiffusionSpec`); a sampler visits a subset of
them. `TimeGrid` says which, and `DiffusionSpec.schedule(grid)` turns the kept steps into the
respaced chain every sampler runs on (betas re-derived from alpha-bar ratios, Nichol & Dhariwal
2021 sec. 4), so a grid never changes the model, only the stops.

Kinds:
  "all"        every training step
  "uniform"    N steps evenly spread over [0, T-1], rounded as guided-diffusion's "N"
  "respacing"  any guided-diffusion / GLIDE respacing string: "250", "10,15,20", "ddim25", "fast27"
  "quadratic"  t_i = c i^2, the DDIM paper's quadratic spacing (Song et al. 2021, app. D.2),
               with c = (T-1) / (N-1)^2 so that it ends at T-1 like "uniform"
  "logsnr"     N stops uniform in lambda = log(alpha / sigma) from lambda_{T-1} to lambda_0, the
               spacing DPM-Solver recommends (Lu et al. 2022, sec. 3.3 / 5)
  "karras"     EDM's sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho with
               sigma = sqrt((1 - abar) / abar), s_max = sigma_{T-1}, s_min = sigma_0 (Karras et
               al. 2022, eq. 5; rho = 7 by default, rho = 1 is uniform in sigma)

The models are discrete-time (trained on integer timesteps), so a continuous target is mapped to
the training timestep nearest to it in the grid's own variable (t, lambda or sigma). Near the clean
end, where lambda and sigma move fastest, two targets can land on the same timestep: a collision
moves the noisier stop up to the next free timestep (and if that runs past T-1 the stops are pushed
back down from the top), so the grid keeps exactly N distinct, sorted stops whenever N <= T.
The noisy end can crowd too: guided-diffusion's cosine chain clips its last beta to 0.999, so its
last step alone spans lambda -6.46 to -9.92 (T = 1000), and a few-step "logsnr" grid puts several
stops on t >= 980 (docs/steps_quality.md measures what that does to DPM-Solver++(2M)).

"logsnr" and "karras" need the chain's betas: `grid.timesteps(betas)`, or bind them once with
`TimeGrid("logsnr", steps=20, betas=spec.training_betas())` so that `spec.schedule(grid)` (which
passes only T) works too.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from diffjax.core import fields
from diffjax.core.schedules import respace_betas, space_timesteps, vp_marginals

KINDS = ("all", "uniform", "respacing", "quadratic", "logsnr", "karras")
COUNTED = ("uniform", "quadratic", "logsnr", "karras")  # kinds that take `steps`
NEEDS_BETAS = ("logsnr", "karras")
# "logsnr20" and friends in `TimeGrid.parse`, next to guided-diffusion's "ddim25".
_PREFIXES = ("quadratic", "logsnr", "karras")


@dataclasses.dataclass(frozen=True)
class TimeGrid:
    """Which timesteps of a T-step chain a sampler visits. Build with `TimeGrid.parse(...)` or
    directly: TimeGrid("uniform", steps=50), TimeGrid("respacing", respacing="ddim25"),
    TimeGrid("karras", steps=18, rho=7.0, betas=spec.training_betas())."""

    kind: str = "all"
    steps: int = 0
    respacing: str = ""
    rho: float = 7.0
    betas: tuple | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self):
        fields.check_choice("TimeGrid.kind", self.kind, KINDS)
        if self.kind in COUNTED and (not isinstance(self.steps, (int, np.integer))
                                     or isinstance(self.steps, bool) or self.steps < 1):
            raise ValueError(f"TimeGrid({self.kind!r}, steps={self.steps!r}): steps must be a "
                             f"positive integer")
        if self.kind == "respacing" and not str(self.respacing).strip():
            raise ValueError("TimeGrid('respacing') needs a respacing string such as '250', "
                             "'10,15,20', 'ddim25' or 'fast27'")
        fields.check_finite("TimeGrid.rho", self.rho, low=0, low_open=True)
        if self.betas is not None:
            respace_betas(self.betas, [0])  # validates: 1-D, in (0, 1]
            object.__setattr__(self, "betas", tuple(float(b) for b in np.asarray(self.betas)))

    @classmethod
    def parse(cls, value) -> "TimeGrid":
        """A grid from a TimeGrid, None / "" (every step), a step count (uniform), "quadraticN" /
        "logsnrN" / "karrasN", or a respacing string ("250", "10,15,20", "ddim25", "fast27")."""
        if isinstance(value, TimeGrid):
            return value
        if value is None or (isinstance(value, str) and not value.strip()):
            return cls()
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return cls("uniform", steps=int(value))
        if isinstance(value, str):
            text = value.strip()
            for kind in _PREFIXES:
                if text.startswith(kind):
                    count = text[len(kind):]
                    if not count.isdigit():
                        raise ValueError(f"time grid {value!r}: expected a step count after "
                                         f"{kind!r}, e.g. '{kind}20'")
                    return cls(kind, steps=int(count))
            return cls("respacing", respacing=text)
        raise ValueError(f"time grid {value!r}: give a step count, a respacing string such as "
                         f"'ddim25', 'logsnr20', or a TimeGrid")

    def timesteps(self, chain) -> np.ndarray:
        """The kept timesteps, sorted: int64 [K]. `chain` is the training chain's length T, or its
        betas [T] (which "logsnr" and "karras" need unless the grid holds them)."""
        betas = self._chain_betas(chain)
        num = len(betas) if betas is not None else int(chain)
        if self.kind == "all":
            return np.arange(num, dtype=np.int64)
        if self.kind == "uniform":
            return np.asarray(sorted(space_timesteps(num, [self.steps])), np.int64)
        if self.kind == "respacing":
            return np.asarray(sorted(space_timesteps(num, self.respacing)), np.int64)
        if self.steps > num:
            raise ValueError(f"TimeGrid({self.kind!r}, steps={self.steps}): a chain of {num} "
                             f"steps has at most {num} stops")
        # From the noisy end to the clean end: one step is the noisiest stop alone.
        fraction = np.linspace(0.0, 1.0, self.steps)
        if self.kind == "quadratic":
            values, targets = np.arange(num, dtype=np.float64), (num - 1) * (1 - fraction) ** 2
        elif self.kind == "logsnr":
            _, _, values = vp_marginals(np.cumprod(1 - betas))
            targets = values[-1] + fraction * (values[0] - values[-1])
        else:
            alpha, sigma, _ = vp_marginals(np.cumprod(1 - betas))
            values = sigma / alpha
            s_max, s_min = values[-1] ** (1 / self.rho), values[0] ** (1 / self.rho)
            targets = (s_max + fraction * (s_min - s_max)) ** self.rho
        return _distinct(_nearest(values, targets), num)

    def _chain_betas(self, chain):
        if isinstance(chain, (int, np.integer)) and not isinstance(chain, bool):
            if self.betas is not None and len(self.betas) != chain:
                raise ValueError(f"{self.describe()}: the grid holds the betas of a "
                                 f"{len(self.betas)}-step chain, not of {chain} steps")
            if self.betas is None and self.kind in NEEDS_BETAS:
                raise ValueError(
                    f"TimeGrid({self.kind!r}) places stops by the chain's noise levels and needs "
                    f"its betas: grid.timesteps(betas), or TimeGrid({self.kind!r}, steps="
                    f"{self.steps}, betas=spec.training_betas()) for spec.schedule(grid)")
            return None if self.betas is None else np.asarray(self.betas, np.float64)
        respace_betas(chain, [0])  # validates: 1-D, in (0, 1]
        return np.asarray(chain, np.float64)

    def describe(self) -> str:
        return {"all": "every step", "uniform": f"{self.steps} uniform steps",
                "respacing": f"respacing {self.respacing!r}",
                "quadratic": f"{self.steps} quadratic steps",
                "logsnr": f"{self.steps} steps uniform in log-SNR",
                "karras": f"{self.steps} Karras steps (rho={self.rho:g})"}[self.kind]


def _nearest(values: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """For each target, the index of the nearest entry of the monotone `values` [T]."""
    increasing = values[-1] >= values[0]
    v, x = (values, targets) if increasing else (-values, -targets)
    right = np.clip(np.searchsorted(v, x), 1, len(v) - 1)
    left = right - 1
    pick = np.where(np.abs(v[right] - x) < np.abs(x - v[left]), right, left)
    return pick if len(v) > 1 else np.zeros_like(pick)


def _distinct(kept: np.ndarray, num: int) -> np.ndarray:
    """Sorted, distinct timesteps in [0, num), as many as given (len(kept) <= num): a repeat moves
    up to the next free timestep, then anything past num - 1 is pushed back down from the top."""
    kept = np.sort(np.asarray(kept, np.int64))
    for i in range(1, len(kept)):
        kept[i] = max(kept[i], kept[i - 1] + 1)
    kept[-1] = min(kept[-1], num - 1)
    for i in range(len(kept) - 2, -1, -1):
        kept[i] = min(kept[i], kept[i + 1] - 1)
    return kept
