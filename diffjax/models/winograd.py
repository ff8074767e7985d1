"""3x3 convolutions by Winograd's minimal filtering, F(2x2, 3x3) (Lavin & Gray 2016), for the CPU:
2.25x fewer multiplications than the direct convolution, the same parameters, results within
~1e-6 relative of float64. `conv_general_dilated` is the hook every conv of diffjax.models goes
through; `conv_algorithm` (a module field) decides per model."""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffjax.models import convolution

Precision = Any


CONV_ALGORITHMS = ("direct", "winograd", "auto")
"""Values of the `conv_algorithm` field: how stride-1 3x3 float32 convolutions run. "direct" (XLA's
convolution), "winograd" (`conv3x3_winograd` wherever it applies) or "auto", the default: Winograd
on the CPU backend for layers of at least WINOGRAD_MIN_CHANNELS channels, direct elsewhere (cuDNN
and the TPU compiler pick their own algorithms). Winograd gives the forward value only: derivatives
are the direct convolution's (`_winograd_value`), and training steps run "auto" as "direct"
(`Trainer`), where Winograd's forward did not pay (CIFAR-10 step 4.8-4.9 s direct, 5.0-5.2 s).

History: an earlier "auto" default (every >= 16 px layer, Winograd's own derivatives) was withdrawn
after two clean-clone CI runs each had one sampling test of a convolution-free toy model read a
stale or NaN result, never reproduced in isolation. A clean-clone CI run on 2026-12-04 with
Winograd forced on for every eligible layer, derivatives included, passed 693 tests; its one
failure was the test asserting that "direct" does not run Winograd."""

WINOGRAD_MIN_SIZE = 16
"""Below 16x16 pixels the transforms cost more than the 2.25x fewer multiplications save (measured on
a 2-core EPYC: 8 px 256->256 channels 11 ms direct, 15 ms Winograd; 16 px 46 ms vs 37 ms)."""

WINOGRAD_MIN_CHANNELS = 128
"""With "auto", only layers with at least this many input and output channels. Alone (2 cores,
oneDNN, huge pages) Winograd took 0.72-0.99x direct's time at 128-256 channels, 0.76-1.23x at 64
and 0.87-2.2x at 32; the CIFAR-10 ADM-like forward (batch 16) took 1.45 s direct, 1.30 s with
every >= 16 px layer, 1.09 s with >= 128 channels, 1.16 s with >= 256 (PyTorch: 1.18 s): its thin
first and last convolutions (3 -> 128, 128 -> 6 channels) lose most."""

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


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _winograd_value(lhs, rhs, static):
    """conv3x3_winograd's value with the direct convolution's derivatives
    (`convolution.conv_tangent`, `static` its static arguments). Differentiating Winograd's own
    transforms made training steps slower (CIFAR-10 5.27 s against 5.20 s direct; the default
    job's step, 32-64 channels, 0.55-0.59 s against 0.30-0.34 s)."""
    precision = static[5]  # the order of convolution.static_args
    return conv3x3_winograd(lhs, rhs, precision)


def _winograd_value_jvp(static, primals, tangents):
    out = _winograd_value(*primals, static)
    return out, convolution.conv_tangent(static, primals, tangents, out)


_winograd_value.defjvp(_winograd_value_jvp, symbolic_zeros=True)


def check_choice(field: str, value: str, choices) -> str:
    """`value` if it is one of `choices`, else a ValueError naming the field and the choices."""
    if value not in choices:
        raise ValueError(f"{field}={value!r} is not one of {choices}")
    return value


def is_same_nhwc(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count=1) -> bool:
    """Whether lax.conv_general_dilated's arguments describe a plain 2-D NHWC / HWIO convolution
    with stride 1, 'same' padding k // 2 on every side of a k x k kernel, no dilation or groups."""
    if lhs.ndim != 4 or rhs.shape[0] != rhs.shape[1] or feature_group_count != 1:
        return False
    pad = rhs.shape[0] // 2
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    return (not isinstance(padding, str)
            and [tuple(p) for p in padding] == [(pad, pad), (pad, pad)]
            and tuple(window_strides) == (1, 1)
            and all(d == 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
            and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc)


def _use_winograd(algorithm, lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                  dimension_numbers, feature_group_count) -> bool:
    check_choice("conv_algorithm", algorithm, CONV_ALGORITHMS)
    if algorithm == "direct" or (algorithm == "auto" and jax.default_backend() != "cpu"):
        return False
    return (rhs.shape[:2] == (3, 3)
            and is_same_nhwc(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                             dimension_numbers, feature_group_count)
            and lhs.dtype == rhs.dtype == jnp.float32
            and lhs.shape[1] % 2 == 0 and lhs.shape[2] % 2 == 0
            and min(lhs.shape[1:3]) >= WINOGRAD_MIN_SIZE
            and (algorithm == "winograd" or min(rhs.shape[2:]) >= WINOGRAD_MIN_CHANNELS))


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, *,
                         algorithm: str = "direct", **kwargs):
    """`convolution.conv_general_dilated` (lax's, with loop-friendly gradients), with the value of
    stride-1 3x3 float32 NHWC convolutions of at least WINOGRAD_MIN_SIZE pixels computed by
    `conv3x3_winograd` as `algorithm` (CONV_ALGORITHMS) says; derivatives stay direct."""
    if not kwargs and _use_winograd(algorithm, lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count):
        static = convolution.static_args(lhs, rhs, window_strides, padding, lhs_dilation,
                                         rhs_dilation, dimension_numbers, precision)
        return _winograd_value(lhs, rhs, static)
    return convolution.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                            rhs_dilation, dimension_numbers, feature_group_count,
                                            precision=precision, **kwargs)
