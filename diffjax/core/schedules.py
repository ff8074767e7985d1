"""Noise schedules and timestep respacing.

A `Schedule` is a frozen pytree of float32 device arrays indexed by (respaced) timestep. Every
table is computed on the host in float64 first, exactly as openai/guided-diffusion (GD) computes
its numpy attributes, and only then cast to float32: GD gathers its float64 tables and casts the
gathered values to float32 (`_extract_into_tensor`), which is the same number.

Sources: linear schedule (Ho et al. 2020, extended to any T by GD); cosine schedule (Nichol &
Dhariwal 2021, eq. 17, with beta capped at 0.999); respacing (Nichol & Dhariwal 2021, sec. 4:
betas of the kept steps re-derived from ratios of alpha-bar); the continuous-time view
(`vp_marginals`: alpha_t, sigma_t, lambda_t, as Kingma et al. 2021 and Lu et al. 2022 write them).
"""
from __future__ import annotations

import math
import re
from typing import Callable, Iterable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "cosine")

# The float64 tables of a GaussianDiffusion, in GD's attribute names, plus the derived tables GD
# builds in float64 inside its methods (so that the float32 values we gather are the same).
TABLE_NAMES = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "alphas_cumprod_next",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
DERIVED_TABLE_NAMES = (
    "one_minus_alphas_cumprod",  # q(x_t | x_0) variance
    "log_betas",  # upper end of the learned-range interpolation
    "fixed_large_variance",  # [posterior_variance[1], betas[1:]]
    "fixed_large_log_variance",
    "recip_posterior_mean_coef1",  # x0 from x_{t-1}
    "posterior_mean_coef2_over_coef1",
)


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """The betas [T] float64 of a named schedule: "linear" or "cosine" (as GD)."""
    _check_num_timesteps(num_timesteps)
    if name == "linear":
        # Ho et al.'s 1e-4..0.02 for T=1000, stretched so the schedule has the same shape for any T.
        scale = 1000 / num_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":
        return betas_for_alpha_bar(
            num_timesteps, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        )
    raise ValueError(
        f"unknown beta schedule {name!r}: choose one of {', '.join(map(repr, BETA_SCHEDULES))}, "
        "or pass an array of betas"
    )


def betas_for_alpha_bar(
    num_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Betas [T] float64 discretising a continuous alpha-bar(s), s in [0, 1]:
    beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta)."""
    _check_num_timesteps(num_timesteps)
    betas = [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return np.array(betas, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> set[int]:
    """The set of original timesteps kept by a respacing, with GD's exact semantics.

    `section_counts`:
      * "N" or [N] - N steps spread evenly (rounded with Python's round, as GD) over all T steps;
      * "a,b,c" / [a, b, c] - T is cut into len(...) equal sections (the first T % n one longer)
        and section i keeps its count of evenly spread steps, both ends included;
      * "ddimN" - the integer stride of the DDIM paper that gives exactly N steps;
      * "fast27" - GLIDE's 27-step schedule for its upsampler: "10,10,3,2,2" with the last step
        T-1 replaced by T-3 (fewer DDIM artifacts from the noisiest steps).
    Raises ValueError for counts that cannot be satisfied.
    """
    _check_num_timesteps(num_timesteps)
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            desired = _parse_count(spec[len("ddim"):], section_counts)
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            achievable = sorted({len(range(0, num_timesteps, s)) for s in range(1, num_timesteps)})
            raise ValueError(
                f"timestep_respacing={section_counts!r}: no integer stride gives exactly {desired} "
                f"of {num_timesteps} steps; DDIM step counts possible for {num_timesteps} steps "
                f"include {_summarise(achievable)}; or use a plain count such as '{desired}'"
            )
        if spec.startswith("fast"):
            if spec != "fast27":
                raise ValueError(
                    f"timestep_respacing={section_counts!r}: GLIDE defines only 'fast27'; "
                    "use 'fast27', a count 'N', sections 'a,b,c' or 'ddimN'"
                )
            steps = space_timesteps(num_timesteps, "10,10,3,2,2")
            steps.remove(num_timesteps - 1)
            steps.add(num_timesteps - 3)
            return steps
        parts = spec.split(",")
        if not spec or any(not re.fullmatch(r"\s*\d+\s*", p) for p in parts):
            raise ValueError(
                f"timestep_respacing={section_counts!r} is not understood: use 'N', 'a,b,c', "
                "'ddimN' or 'fast27' (or '' for no respacing)"
            )
        counts = [int(p) for p in parts]
    elif isinstance(section_counts, (int, np.integer)):
        counts = [int(section_counts)]
    else:
        counts = [int(c) for c in section_counts]
    if not counts:
        raise ValueError("timestep_respacing has no section counts: use e.g. '250' or '10,15,20'")

    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count < 1 or count > size:
            raise ValueError(
                f"timestep_respacing={section_counts!r}: section {i} spans {size} of the "
                f"{num_timesteps} steps and cannot hold {count} steps (each section needs between "
                f"1 and {size} steps)"
            )
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))  # Python's round (half to even), as GD
            position += stride
        start += size
    return set(kept)


def respace_betas(betas: np.ndarray, use_timesteps: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
    """Betas of the sub-chain that keeps `use_timesteps`: beta'_k = 1 - abar[t_k] / abar[t_{k-1}].

    Returns (betas' [K] float64, timestep_map [K] int64: respaced index -> original timestep).
    """
    betas = _validate_betas(betas)
    keep = set(int(t) for t in use_timesteps)
    bad = sorted(t for t in keep if not 0 <= t < len(betas))
    if bad:
        raise ValueError(f"timesteps {bad[:5]} are outside [0, {len(betas)})")
    alphas_cumprod = np.cumprod(1.0 - betas)
    timestep_map = np.array(sorted(keep), dtype=np.int64)
    kept = alphas_cumprod[timestep_map]
    previous = np.append(1.0, kept[:-1])
    return 1 - kept / previous, timestep_map


def schedule_tables(betas: np.ndarray) -> dict[str, np.ndarray]:
    """All float64 tables of a diffusion with these betas [T]: GD's attributes (TABLE_NAMES) and
    the derived tables its methods compute in float64 (DERIVED_TABLE_NAMES)."""
    betas = _validate_betas(betas)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    # The posterior variance is 0 at t=0: its log is clipped by repeating the t=1 value.
    # (A 1-step chain has no t=1; GD would fail there, we keep the t=0 value.)
    first = posterior_variance[1] if len(betas) > 1 else posterior_variance[0]
    with np.errstate(divide="ignore"):
        posterior_log_variance_clipped = np.log(np.append(first, posterior_variance[1:]))
    coef1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
    coef2 = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)
    fixed_large = np.append(first, betas[1:])
    return {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "alphas_cumprod_next": np.append(ac[1:], 0.0),
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_log_variance_clipped,
        "posterior_mean_coef1": coef1,
        "posterior_mean_coef2": coef2,
        "one_minus_alphas_cumprod": 1.0 - ac,
        "log_betas": np.log(betas),
        "fixed_large_variance": fixed_large,
        "fixed_large_log_variance": np.log(fixed_large),
        "recip_posterior_mean_coef1": 1.0 / coef1,
        "posterior_mean_coef2_over_coef1": coef2 / coef1,
    }


def vp_marginals(alphas_cumprod):
    """The continuous-time view of a discrete chain: x_t = alpha_t x_0 + sigma_t eps with

        alpha_t = sqrt(abar_t),  sigma_t = sqrt(1 - abar_t),  lambda_t = log(alpha_t / sigma_t),

    the variance-preserving SDE's marginals (Song et al. 2021) and the half log-SNR lambda that
    DPM-Solver (Lu et al. 2022) integrates in; EDM's noise level (Karras et al. 2022) is
    sigma_t / alpha_t = exp(-lambda_t). The chain's timesteps are samples of these curves: the
    models here are trained on integer timesteps only, so solvers and time grids evaluate them at
    training timesteps and never in between.

    alphas_cumprod: [...] in (0, 1]. A jax array gives jax arrays (traced inside a sampler), anything
    else float64 numpy (grids on the host). lambda = +inf where abar = 1 (the data).
    Returns (alpha, sigma, lambda), each shaped like alphas_cumprod."""
    if isinstance(alphas_cumprod, jax.Array):
        abar = alphas_cumprod
        log_snr = jnp.log(abar) - jnp.log1p(-abar)
        return jnp.sqrt(abar), jnp.sqrt(1 - abar), 0.5 * log_snr
    abar = np.asarray(alphas_cumprod, np.float64)
    with np.errstate(divide="ignore"):
        log_snr = np.log(abar) - np.log1p(-abar)
    return np.sqrt(abar), np.sqrt(1 - abar), 0.5 * log_snr


@flax.struct.dataclass
class Schedule:
    """A diffusion's tables as float32 arrays [T], T = number of (respaced) steps.

    Index every table with the respaced timestep t in [0, T). `timestep_map[t]` is the original
    timestep the model was trained on; `original_num_steps` (static) is the length of the chain
    before respacing. Build with `make_schedule` or `Schedule.from_betas`.
    """

    betas: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    alphas_cumprod_prev: jnp.ndarray
    alphas_cumprod_next: jnp.ndarray
    sqrt_alphas_cumprod: jnp.ndarray
    sqrt_one_minus_alphas_cumprod: jnp.ndarray
    log_one_minus_alphas_cumprod: jnp.ndarray
    sqrt_recip_alphas_cumprod: jnp.ndarray
    sqrt_recipm1_alphas_cumprod: jnp.ndarray
    posterior_variance: jnp.ndarray
    posterior_log_variance_clipped: jnp.ndarray
    posterior_mean_coef1: jnp.ndarray
    posterior_mean_coef2: jnp.ndarray
    one_minus_alphas_cumprod: jnp.ndarray
    log_betas: jnp.ndarray
    fixed_large_variance: jnp.ndarray
    fixed_large_log_variance: jnp.ndarray
    recip_posterior_mean_coef1: jnp.ndarray
    posterior_mean_coef2_over_coef1: jnp.ndarray
    timestep_map: jnp.ndarray  # [T] int32
    original_num_steps: int = flax.struct.field(pytree_node=False)

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @classmethod
    def from_betas(cls, betas, timestep_map=None, original_num_steps=None) -> "Schedule":
        """A Schedule of these betas [T]; `timestep_map` defaults to the identity."""
        tables = schedule_tables(betas)
        num = len(tables["betas"])
        if timestep_map is None:
            timestep_map = np.arange(num)
        timestep_map = np.asarray(timestep_map)
        if timestep_map.shape != (num,):
            raise ValueError(f"timestep_map has shape {timestep_map.shape}, expected ({num},)")
        return cls(
            **{k: jnp.asarray(v, dtype=jnp.float32) for k, v in tables.items()},
            timestep_map=jnp.asarray(timestep_map, dtype=jnp.int32),
            original_num_steps=int(original_num_steps if original_num_steps is not None else num),
        )


def make_schedule(
    beta_schedule: str | Sequence[float] | np.ndarray = "linear",
    num_timesteps: int = 1000,
    respacing: str | int | Sequence[int] | None = None,
) -> Schedule:
    """A Schedule from a schedule name ("linear", "cosine") or a user-given beta array [T], optionally
    respaced ("250", "10,15,20", "ddim25", "fast27"; None or "" keeps every step).

    >>> s = make_schedule("cosine", 1000, "ddim25"); s.num_timesteps, int(s.timestep_map[1])
    (25, 40)
    """
    if isinstance(beta_schedule, str):
        betas = get_named_beta_schedule(beta_schedule, num_timesteps)
    else:
        betas = _validate_betas(beta_schedule)
    if respacing is None or (isinstance(respacing, str) and not respacing.strip()):
        respacing = [len(betas)]
    # Like GD (which always wraps its diffusion in SpacedDiffusion), even "keep every step" re-derives
    # the betas from alpha-bar ratios: they move by float64 rounding only, and every table is then
    # bit-identical to GD's.
    new_betas, timestep_map = respace_betas(betas, space_timesteps(len(betas), respacing))
    return Schedule.from_betas(new_betas, timestep_map, original_num_steps=len(betas))


def _validate_betas(betas) -> np.ndarray:
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size == 0:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    bad = np.flatnonzero(~((betas > 0) & (betas <= 1)))
    if bad.size:
        raise ValueError(
            f"betas must lie in (0, 1]: betas[{bad[0]}] = {float(betas[bad[0]])} "
            f"({bad.size} value(s) outside)"
        )
    return betas


def _check_num_timesteps(num_timesteps) -> None:
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")


def _parse_count(text: str, spec) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(
            f"timestep_respacing={spec!r}: expected a positive step count after the prefix, "
            "e.g. 'ddim25'"
        )
    return int(text)


def _summarise(values: list[int]) -> str:
    if len(values) <= 12:
        return ", ".join(map(str, values))
    return ", ".join(map(str, values[:6])) + ", ..., " + ", ".join(map(str, values[-4:]))
