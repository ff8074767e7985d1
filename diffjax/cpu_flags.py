"""XLA:CPU flag sets for diffjax's networks, chosen explicitly per process (never read at import).

XLA reads XLA_FLAGS once, when its CPU backend starts (the first JAX computation or device query),
so a flag set must be chosen before that: the command line does it from `--xla_cpu_flags` (default
"onednn" for sampling and evaluation, "onednn_ynn" for training), a notebook or script calls
`diffjax.cpu_flags.use("onednn")` first.

* "onednn": convolutions and matrix products as oneDNN custom calls (not oneDNN's graph rewriter),
  and neither XNNPACK nor YNN fusions (their convolution paths were slower for these UNets).
  Outputs agree with "xla" to float32 rounding (the parity tests pass under both).
* "onednn_conv": convolutions through oneDNN by XLA's library-fusion path for individual
  convolutions (not the custom call), no YNN fusions; everything else XLA's own. XLA's YNN
  convolutions ran the default model's 32-64-channel layers at one core's speed: its train step
  (batch 8) took 236 ms with "xla", 229 ms with YNN off alone, 190 ms with this set (2 cores);
  the CIFAR-10 model's step was slower with it (4.9 s -> 5.8 s), so it is a choice, not a default.
* "onednn_ynn": "onednn"'s oneDNN custom calls, with YNN fusions kept for reductions only. Under
  "onednn" a training step's backward runs its channel reductions (group-norm and bias gradients)
  as XLA loop fusions: 2.39 s of a CIFAR-10 step's trace, against 0.38 s where YNN takes them.
  The training default: interleaved, huge pages, 2 cores, the CIFAR-10 step took 4.31 / 4.38 s
  against 4.80 / 4.71 s with "xla"; the default model's 160 / 165 ms against 205 / 204 ms; the
  default job's 229 / 235 ms against 266 / 258 ms with "onednn_conv". Same losses to float32
  rounding.
* "xla": XLA's own defaults (no flag added).

Measured side by side with guided-diffusion's PyTorch code on 2 cores: README, "Speed on CPU".
"""
from __future__ import annotations

import os

# oneDNN custom calls for convolutions and matrix products, XNNPACK off; each set adds its YNN choice.
_ONEDNN_CALLS = ("--xla_cpu_experimental_onednn_custom_call=true", "--xla_cpu_use_onednn=false",
                 "--xla_cpu_use_xnnpack=false")
FLAG_SETS = {
    "onednn": _ONEDNN_CALLS + ("--xla_cpu_experimental_ynn_fusion_type=",),
    "xla": (),
    "onednn_conv": ("--xla_cpu_experimental_onednn_fusion_type=individual_convolution",
                    "--xla_cpu_experimental_ynn_fusion_type="),
    "onednn_ynn": _ONEDNN_CALLS + ("--xla_cpu_experimental_ynn_fusion_type=reduce",),
}
DEFAULT = "onednn"  # sampling and evaluation: network forward passes
TRAINING_DEFAULT = "onednn_ynn"  # training: faster than "xla" and "onednn" (see above)


def default(training: bool = False) -> str:
    """The flag set the command line uses when none is named."""
    return TRAINING_DEFAULT if training else DEFAULT


def started() -> bool:
    """Whether JAX's backends have started (and read XLA_FLAGS)."""
    try:  # jax does not export this; without it the caller's word is taken
        from jax._src import xla_bridge
        return xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # pragma: no cover - a jax without the helper
        return False


def use(name: str = DEFAULT) -> None:
    """Add flag set `name` (FLAG_SETS) to XLA_FLAGS for this process's CPU backend. A flag the
    caller already set in XLA_FLAGS wins. Raises if JAX's backends have already started (the flags
    would be ignored silently)."""
    if name not in FLAG_SETS:
        raise ValueError(f"xla_cpu_flags={name!r}: choose one of {', '.join(FLAG_SETS)}")
    flags = FLAG_SETS[name]
    if not flags:
        return
    if started():
        raise RuntimeError(f"xla_cpu_flags={name!r} comes too late: JAX has already started its "
                           f"backends and read XLA_FLAGS. Choose the flags first (before any JAX "
                           f"computation), or restart the process / notebook kernel")
    current = os.environ.get("XLA_FLAGS", "").split()
    given = {f.split("=", 1)[0] for f in current}
    added = [f for f in flags if f.split("=", 1)[0] not in given]
    os.environ["XLA_FLAGS"] = " ".join(current + added)
