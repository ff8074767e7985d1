"""3x3 convolutions by Winograd's minimal filtering, F(2x2, 3x3) (Lavin & Gray 2016), for the CPU:
2.25x fewer multiplications than the direct convolution, the same parameters, results within
~1e-6 relative of float64. `conv_general_dilated` is the hook every conv of diffjax.models goes
through; `conv_algorithm` (a module field) decides per model."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffjax.models import convolution

Precision = Any


CONV_ALGORITHMS = ("direct", "winograd", "auto")
"""Values of the `conv_algorithm` field: how stride-1 3x3 float32 convolutions run. "direct" (XLA's
convolution, the default), "winograd" (`conv3x3_winograd` wherever it applies) or "auto" (winograd on
the CPU backend, direct elsewhere: cuDNN / the TPU compiler pick their own algorithms). Opt-in for
now: with "auto" as the default, two clean-clone CI runs each had one unrelated sampling test read a
stale or NaN result (a toy model without convolutions, after the parity tests had run Winograd
graphs), which never reproduced in isolation; until that is understood the faster path is not the
default."""

WINOGRAD_MIN_SIZE = 16
"""Below 16x16 pixels the transforms cost more than the 2.25x fewer multiplications save (measured on
a 2-core EPYC: 8 px 256->256 channels 11 ms direct, 15 ms Winograd; 16 px 46 ms vs 37 ms)."""

# F(2x2, 3x3) of Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2016), eq. 7-8:
# Y = A^T [(G g G^T) * (B^T d B)] A for each 4x4 input tile d (stride 2) and 3x3 filter g. Its
# interpolation points 0, 1, -1 make B and A pure +-1 additions, so the only rounding beyond the
# direct convolution's is in G's halves: float32 results stay within ~1e-6 relative of float64.
_WINOGRAD_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]], np.float32)


def _winograd_bt(d0, d1, d2, d3):
    """B^T applied along one axis of a 4-tap tile: rows of [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]]."""
    return d0 - d2, d1 + d2, d2 - d1, d1 - d3


def _winograd_at(m0, m1, m2, m3):
    """A^T applied along one axis: rows of [[1,1,1,0],[0,1,-1,-1]]."""
    return m0 + m1 + m2, m1 - m2 - m3


def conv3x3_winograd(x, kernel, precision: Precision = None):
    """'SAME' stride-1 3x3 convolution by Winograd F(2x2, 3x3), without bias.

    x: [B, H, W, C] with even H and W; kernel: [3, 3, C, O] (HWIO) -> [B, H, W, O]. Equal to
    `lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)))` up to float rounding, with 16
    instead of 36 multiplications per 2x2 output tile; the 16 products are one batched matmul
    [16, B*H/2*W/2, C] x [16, C, O], which XLA's CPU dot runs near peak. Differentiable (all
    linear ops), so training's backward pass gets the same saving.
    """
    b, h, w, c = x.shape
    if h % 2 or w % 2 or kernel.shape[:2] != (3, 3):
        raise ValueError(f"conv3x3_winograd needs even H, W and a 3x3 kernel, got x {x.shape} and "
                         f"kernel {kernel.shape}: use lax.conv_general_dilated for these")
    th, tw = h // 2, w // 2
    # Pad to 2*(th+1) rows so pixel pairs become an axis: tile (t, s) covers padded rows
    # 2t..2t+3 = pairs t and t+1, i.e. contiguous slices instead of strided gathers.
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(b, th + 1, 2, tw + 1, 2, c)
    rows = _winograd_bt(xp[:, :th, 0], xp[:, :th, 1], xp[:, 1:, 0], xp[:, 1:, 1])
    v = [vab for r in rows
         for vab in _winograd_bt(r[:, :, :tw, 0], r[:, :, :tw, 1], r[:, :, 1:, 0], r[:, :, 1:, 1])]
    v = jnp.stack(v).reshape(16, b * th * tw, c)
    g = jnp.asarray(_WINOGRAD_G, kernel.dtype)
    u = jnp.einsum("ai,ijco,bj->abco", g, kernel, g, precision=lax.Precision.HIGHEST).reshape(16, c, -1)
    m = lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))), precision=precision)
    m = m.reshape(4, 4, b, th, tw, -1)
    y_rows = _winograd_at(m[0], m[1], m[2], m[3])                     # 2 x [4, b, th, tw, O]
    y = [jnp.stack(_winograd_at(r[0], r[1], r[2], r[3]), axis=3) for r in y_rows]  # [b, th, tw, 2, O]
    return jnp.stack(y, axis=2).reshape(b, h, w, -1)                  # [b, th, 2, tw, 2, O]


def check_choice(field: str, value: str, choices) -> str:
    """`value` if it is one of `choices`, else a ValueError naming the field and the choices."""
    if value not in choices:
        raise ValueError(f"{field}={value!r} is not one of {choices}")
    return value


def _use_winograd(algorithm, lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                  dimension_numbers, feature_group_count) -> bool:
    check_choice("conv_algorithm", algorithm, CONV_ALGORITHMS)
    if algorithm == "direct" or (algorithm == "auto" and jax.default_backend() != "cpu"):
        return False
    if lhs.ndim != 4 or rhs.shape[:2] != (3, 3) or feature_group_count != 1:
        return False
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    return (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc
            and tuple(window_strides) == (1, 1) and [tuple(p) for p in padding] == [(1, 1), (1, 1)]
            and all(d == 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
            and lhs.dtype == rhs.dtype == jnp.float32
            and lhs.shape[1] % 2 == 0 and lhs.shape[2] % 2 == 0
            and min(lhs.shape[1:3]) >= WINOGRAD_MIN_SIZE)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, *,
                         algorithm: str = "direct", **kwargs):
    """`convolution.conv_general_dilated` (lax's, with loop-friendly gradients), with
    stride-1 3x3 float32 NHWC convolutions of at least WINOGRAD_MIN_SIZE pixels routed to
    `conv3x3_winograd` as `algorithm` (CONV_ALGORITHMS) says."""
    if not kwargs and _use_winograd(algorithm, lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count):
        return conv3x3_winograd(lhs, rhs, precision)
    return convolution.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                            rhs_dilation, dimension_numbers, feature_group_count,
                                            precision=precision, **kwargs)
