"""MATLAB-style bicubic resizing (`imresize`), as one weight matrix per axis.

The official ILVR code (Choi et al. 2021) builds its low-pass filter phi_N from a port of MATLAB's
`imresize` (Shocher's `Resizer`). Per axis, resizing length L to M (scale s = M / L):

* output pixel j (0-based) is centred at input coordinate c_j = (j + 0.5) / s - 0.5, so that the
  outer edges of the first and last pixels line up;
* its weights are k(c_j - i) over the integer input positions i, divided by their sum; k is the
  cubic convolution kernel of Keys (1981) with a = -0.5, support [-2, 2]. With antialiasing and
  s < 1 the kernel is stretched to s k(s u) (support [-2/s, 2/s]), a low-pass filter at the new
  Nyquist rate; upscaling never stretches it;
* positions outside [0, L) are then reflected about the edges, half-sample symmetric
  (-1 -> 0, -2 -> 1, L -> L - 1: MATLAB's 'symmetric' padding), so a border pixel also collects
  the weights of its mirror images. The weights are normalised before the reflection.

`jax.image.resize` (and PIL) use the same kernel and stretching but drop the taps outside the
image and renormalise the rest, which changes every output pixel whose support crosses an edge:
within 2/s input pixels of it.

The matrices are numpy constants of the (static) shapes, so a resize is two matmuls: jit- and
grad-friendly, and exact in float32 up to rounding.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def cubic(u):
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's 'bicubic'), zero beyond |u| = 2."""
    a = np.abs(u)
    near = (1.5 * a - 2.5) * a * a + 1
    far = ((-0.5 * a + 2.5) * a - 4) * a + 2
    return np.where(a <= 1, near, np.where(a < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def resize_weights(in_length: int, out_length: int, antialias: bool = True) -> np.ndarray:
    """[out_length, in_length] float64 matrix W of MATLAB's bicubic imresize along one axis
    (see the module docstring): resized = W @ signal. Rows sum to 1. Read-only (cached)."""
    if in_length < 1 or out_length < 1:
        raise ValueError(f"resize lengths must be >= 1, got {in_length} -> {out_length}")
    scale = out_length / in_length
    stretch = scale if antialias and scale < 1 else 1.0
    radius = 2.0 / stretch
    centres = (np.arange(out_length) + 0.5) / scale - 0.5
    # Every integer within `radius` of a centre (a few more, of weight zero, are harmless).
    taps = np.floor(centres - radius).astype(np.int64)[:, None] + np.arange(int(np.ceil(2 * radius)) + 2)
    weights = cubic(stretch * (centres[:, None] - taps))
    weights /= weights.sum(axis=1, keepdims=True)
    period = 2 * in_length
    folded = np.mod(taps, period)
    folded = np.where(folded < in_length, folded, period - 1 - folded)
    matrix = np.zeros((out_length, in_length))
    np.add.at(matrix, (np.broadcast_to(np.arange(out_length)[:, None], taps.shape), folded), weights)
    matrix.setflags(write=False)
    return matrix


def imresize(x, size, *, antialias: bool = True):
    """Resize images x [B, H, W, C] to [B, h, w, C], size = (h, w), with MATLAB's bicubic
    `imresize` (antialiased when downscaling). Computed in float32 (float64 for float64 input) at
    full matmul precision (TPU / TF32 defaults would round the weights to ~1e-3)."""
    _, height, width, _ = x.shape
    h, w = size
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    rows = jnp.asarray(resize_weights(height, h, antialias), dtype)
    cols = jnp.asarray(resize_weights(width, w, antialias), dtype)
    highest = jax.lax.Precision.HIGHEST
    x = jnp.einsum("ih,bhwc->biwc", rows, x.astype(dtype), precision=highest)
    return jnp.einsum("jw,biwc->bijc", cols, x, precision=highest)
