"""Building blocks of the ADM UNet (Dhariwal & Nichol 2021, openai/guided-diffusion `unet.py`, `nn.py`).

Layout: images are NHWC `[B, H, W, C]`, attention tokens `[B, T, C]` with `T = H * W` in row-major
order (the order of PyTorch's `x.reshape(b, c, -1)`). Parameters are always float32; `dtype` is the
compute dtype of convolutions, dense layers and attention (float32 or bfloat16). GroupNorm statistics
and the softmax are always computed in float32, as guided-diffusion does under fp16.

Submodule names spell guided-diffusion's PyTorch module path with `_` before each index
(`in_layers_2` is `in_layers.2`), so the state-dict mapping in `diffjax.compat.gd_models` is a
mechanical rename plus an axis permutation per parameter kind. Parameters are created in the order
PyTorch registers them, which is the order of `state_dict()`.

Initialisation follows PyTorch's defaults (conv / linear weights and biases U(-1/sqrt(fan_in),
1/sqrt(fan_in)), GroupNorm (1, 0), embeddings N(0, 1)) and guided-diffusion's `zero_module` for the
output convolution of each residual branch, so freshly built models train like the original.

Two kernel choices are module fields, threaded from the model down to every block like `precision`
(they change how values are computed, never the parameters):
* `conv_algorithm` (CONV_ALGORITHMS): stride-1 3x3 float32 convolutions of at least 16x16 pixels run
  as XLA's convolution ("direct") or Winograd F(2x2, 3x3) ("winograd"); "auto" (the default) takes
  Winograd for the forward value of wide layers on the CPU (diffjax.models.winograd);
* `attention_impl` (ATTENTION_IMPLS): guided-diffusion's einsum attention (the default) or
  `jax.nn.dot_product_attention` (XLA, or cuDNN flash attention on NVIDIA GPUs).

A nearest-neighbour upsampling followed by a convolution (Upsample, and ResBlock with `up`) runs
as `upsampled_conv`: four 2x2 convolutions of the small input, one per output phase, 2.25x fewer
products than convolving the upsampled image (same parameters, same values to float32 rounding).

Precision: `precision=None` means `lax.Precision.HIGHEST` for float32 compute (no silent TF32 /
bf16-pass matmuls on GPU or TPU; on CPU it costs nothing) and the backend default for bfloat16.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax import lax

from diffjax.models.normalization import group_norm
from diffjax.models.winograd import check_choice, conv_general_dilated, is_same_nhwc

Dtype = Any
Precision = Any

GROUPS = 32  # guided_diffusion.nn.normalization: GroupNorm32(32, channels)


def default_precision(dtype: Dtype, precision: Precision = None) -> Precision:
    """The matmul/conv precision used for `dtype` when the caller gave none (see module docstring)."""
    if precision is not None:
        return precision
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def timestep_embedding(timesteps, dim: int, max_period: float = 10000):
    """Sinusoidal timestep embedding of guided_diffusion.nn.timestep_embedding.

    emb[:, i] = cos(t * f_i), emb[:, half + i] = sin(t * f_i), f_i = exp(-ln(max_period) * i / half),
    half = dim // 2; an odd `dim` gets a trailing zero column. Computed in float32 in the reference's
    operation order. timesteps: [B] int or float (fractional allowed) -> [B, dim] float32.
    """
    half = dim // 2
    freqs = jnp.exp(jnp.float32(-math.log(max_period)) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(timesteps).astype(jnp.float32)[:, None] * freqs[None]
    embedding = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        embedding = jnp.concatenate([embedding, jnp.zeros_like(embedding[:, :1])], axis=-1)
    return embedding


# --- PyTorch-default initialisers -------------------------------------------------------------

torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
"""kaiming_uniform_(a=sqrt(5)) of nn.Conv*/nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""


def torch_bias_init(fan_in: int):
    """nn.Conv*/nn.Linear bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def conv(features: int, in_features: int, kernel_size: int = 3, *, ndim: int = 2, stride: int = 1,
         zero_init: bool = False, dtype: Dtype = jnp.float32, precision: Precision = None,
         algorithm: str = "direct", upsample: bool = False,
         name: Optional[str] = None) -> nn.Conv:
    """A PyTorch-equivalent `conv_nd(ndim, in, features, k, stride, padding=k // 2)`.

    ndim=1 is guided-diffusion's 1x1 `conv_nd(1, ...)` over tokens `[B, T, C]`; its Flax kernel is
    `[1, in, out]` (PyTorch `[out, in, 1]`). `zero_init` is guided-diffusion's `zero_module`.
    `algorithm`: CONV_ALGORITHMS (3x3 convolutions only; the parameters do not depend on it).
    `upsample`: the layer takes x [B, H, W, C] and returns the convolution of upsample_nearest(x),
    [B, 2H, 2W, features] (`upsampled_conv`; 1x1 and 3x3, stride 1), with the same parameters.
    """
    fan_in = in_features * kernel_size ** ndim
    pad = kernel_size // 2
    conv_fn = upsampled_conv if upsample else conv_general_dilated
    return nn.Conv(
        features, (kernel_size,) * ndim, strides=stride, padding=((pad, pad),) * ndim,
        dtype=dtype, param_dtype=jnp.float32, precision=default_precision(dtype, precision),
        kernel_init=nn.initializers.zeros if zero_init else torch_kernel_init,
        bias_init=nn.initializers.zeros if zero_init else torch_bias_init(fan_in),
        conv_general_dilated=functools.partial(conv_fn, algorithm=algorithm), name=name)


def linear(features: int, in_features: int, *, dtype: Dtype = jnp.float32,
           precision: Precision = None, name: Optional[str] = None) -> nn.Dense:
    """A PyTorch-equivalent `nn.Linear(in, features)` (Flax kernel `[in, out]`)."""
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32,
                    precision=default_precision(dtype, precision), kernel_init=torch_kernel_init,
                    bias_init=torch_bias_init(in_features), name=name)


# --- normalisation and resampling --------------------------------------------------------------

class GroupNorm32(nn.Module):
    """GroupNorm(32 groups, eps 1e-5) computed in float32 and cast back to the input dtype.

    Statistics run over the spatial / token axes and the channels of each group, with the biased
    variance (two-pass, not E[x^2] - E[x]^2), as torch.nn.GroupNorm. x: [B, ..., C] -> same shape.
    """
    num_groups: int = GROUPS
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm32 got {c} channels, which is not a multiple of "
                             f"{self.num_groups} groups: use channel counts divisible by {self.num_groups}")
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        return group_norm(x.astype(jnp.float32), scale, bias, self.num_groups,
                          self.epsilon).astype(x.dtype)


def upsample_nearest(x):
    """F.interpolate(scale_factor=2, mode='nearest'): [B, H, W, C] -> [B, 2H, 2W, C]."""
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, 2 * h, 2 * w, c)


def _merge_taps(kernel, axis: int, phase: int):
    """The 3 taps of a 3x3 kernel along `axis` (0: rows, 1: columns) as the 2 that a nearest-
    upsampled input's output `phase` sees: phase 0 reads pixels (i - 1, i, i) -> taps
    [k0, k1 + k2]; phase 1 reads (i, i, i + 1) -> [k0 + k1, k2]."""
    k0, k1, k2 = (lax.index_in_dim(kernel, i, axis, keepdims=False) for i in range(3))
    return jnp.stack([k0, k1 + k2] if phase == 0 else [k0 + k1, k2], axis=axis)


def upsampled_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, precision=None, *,
                   algorithm: str = "direct"):
    """conv(upsample_nearest(lhs), rhs) for a stride-1 'same' NHWC convolution, computed on lhs
    [B, H, W, C] -> [B, 2H, 2W, O] (the signature of lax.conv_general_dilated, for nn.Conv).

    1x1: upsample(conv(lhs)), 4x fewer products. 3x3 (pad 1): output pixel (2i + a, 2j + b) reads
    input rows (i - 1, i, i) for a = 0 and (i, i, i + 1) for a = 1 (columns alike), so each of the
    4 phases (a, b) is a 2x2 convolution of lhs with the kernel's taps summed accordingly
    (`_merge_taps`): 16 products per input pixel and output channel instead of 36, in the forward
    and in both gradients. Equal to the upsample-then-convolve to float32 rounding (the summed
    taps round once more); the interleave of the phases is one pass over the output.
    """
    if rhs.shape[:2] not in ((1, 1), (3, 3)) or not is_same_nhwc(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count):
        raise ValueError(f"upsampled_conv takes stride-1 'same' 1x1 or 3x3 NHWC convolutions; got "
                         f"kernel {rhs.shape}, strides {window_strides}, padding {padding}")
    conv = functools.partial(conv_general_dilated, window_strides=(1, 1),
                             dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision,
                             algorithm=algorithm)
    if rhs.shape[0] == 1:
        return upsample_nearest(conv(lhs, rhs, padding=((0, 0), (0, 0))))
    phases = []
    for a in (0, 1):
        rows = _merge_taps(rhs, 0, a)
        for b in (0, 1):
            phases.append(conv(lhs, _merge_taps(rows, 1, b),
                               padding=((1 - a, a), (1 - b, b))))            # [B, H, W, O] each
    n, h, w, _ = lhs.shape
    out = jnp.stack(phases).reshape((2, 2, n, h, w, -1))                     # [a, b, B, H, W, O]
    return jnp.transpose(out, (2, 3, 0, 4, 1, 5)).reshape(n, 2 * h, 2 * w, -1)


def avg_pool2(x):
    """nn.AvgPool2d(kernel_size=2, stride=2) (odd sizes floor): [B, H, W, C] -> [B, H//2, W//2, C]."""
    return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")


def resize_bilinear_torch(x, size):
    """F.interpolate(x, size, mode='bilinear', align_corners=False, antialias=False) in NHWC.

    Per axis: src = max((dst + 0.5) * in / out - 0.5, 0), i0 = floor(src), i1 = min(i0 + 1, in - 1),
    out = (1 - (src - i0)) * x[i0] + (src - i0) * x[i1] (half-pixel centres, edge clamp, no
    anti-aliasing when shrinking). x: [B, h, w, C], size (H, W) -> [B, H, W, C] in x's dtype.
    """
    def axis_weights(n_in, n_out):
        src = jnp.maximum((jnp.arange(n_out, dtype=jnp.float32) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), n_in - 1)
        i1 = jnp.minimum(i0 + 1, n_in - 1)
        frac = src - i0.astype(jnp.float32)
        return i0, i1, frac

    out_h, out_w = size
    y0, y1, fy = axis_weights(x.shape[1], out_h)
    x0, x1, fx = axis_weights(x.shape[2], out_w)
    h = x.astype(jnp.float32)
    rows = (1.0 - fy)[None, :, None, None] * h[:, y0] + fy[None, :, None, None] * h[:, y1]
    out = (1.0 - fx)[None, None, :, None] * rows[:, :, x0] + fx[None, None, :, None] * rows[:, :, x1]
    return out.astype(x.dtype)


class Upsample(nn.Module):
    """guided_diffusion.unet.Upsample: nearest x2, then an optional 3x3 conv ('conv')."""
    use_conv: bool
    out_channels: Optional[int] = None
    dtype: Dtype = jnp.float32
    precision: Precision = None
    conv_algorithm: str = "auto"

    @nn.compact
    def __call__(self, x):
        if not self.use_conv:
            return upsample_nearest(x)
        return conv(self.out_channels or x.shape[-1], x.shape[-1], 3, dtype=self.dtype,
                    precision=self.precision, algorithm=self.conv_algorithm, upsample=True,
                    name="conv")(x)


class Downsample(nn.Module):
    """guided_diffusion.unet.Downsample: a stride-2 3x3 conv ('op') or 2x2 average pooling."""
    use_conv: bool
    out_channels: Optional[int] = None
    dtype: Dtype = jnp.float32
    precision: Precision = None
    conv_algorithm: str = "auto"

    @nn.compact
    def __call__(self, x):
        out_channels = self.out_channels or x.shape[-1]
        if self.use_conv:
            return conv(out_channels, x.shape[-1], 3, stride=2, dtype=self.dtype,
                        precision=self.precision, algorithm=self.conv_algorithm, name="op")(x)
        if out_channels != x.shape[-1]:
            raise ValueError(f"Downsample without a conv cannot change channels "
                             f"({x.shape[-1]} -> {out_channels}): set use_conv=True")
        return avg_pool2(x)


# --- residual block ----------------------------------------------------------------------------

class ResBlock(nn.Module):
    """guided_diffusion.unet.ResBlock: a residual block conditioned on the timestep embedding.

    h = conv(SiLU(GN(x))) (BigGAN-style: x and h resampled between the SiLU and the conv when `up` /
    `down`); e = Linear(SiLU(emb)); scale-shift norm (AdaGN): h = GN(h) * (1 + scale) + shift with
    [scale, shift] = e, else h = GN(h + e); h = zero-init conv(Dropout(SiLU(h)));
    out = skip(x) + h, skip = identity, 1x1 conv, or 3x3 conv (`use_conv`) when channels change.
    The embedding projection runs in float32 (guided-diffusion's fp16 mode only converts convs).

    x: [B, H, W, C], emb: [B, E] -> [B, H', W', out_channels]. Dropout draws from the 'dropout' rng
    when `deterministic` is False.
    """
    out_channels: Optional[int] = None
    dropout: float = 0.0
    use_conv: bool = False
    use_scale_shift_norm: bool = False
    up: bool = False
    down: bool = False
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    precision: Precision = None
    conv_algorithm: str = "auto"

    @nn.compact
    def __call__(self, x, emb):
        channels = x.shape[-1]
        out_ch = self.out_channels or channels
        h = nn.silu(GroupNorm32(name="in_layers_0")(x))
        if self.down:
            h, x = avg_pool2(h), avg_pool2(x)
        # `up`: the convolutions take the upsampling (`upsampled_conv`, the same values).
        h = conv(out_ch, channels, 3, dtype=self.dtype, precision=self.precision,
                 algorithm=self.conv_algorithm, upsample=self.up, name="in_layers_2")(h)

        emb_ch = 2 * out_ch if self.use_scale_shift_norm else out_ch
        emb_out = linear(emb_ch, emb.shape[-1], precision=self.precision,
                         name="emb_layers_1")(nn.silu(emb)).astype(h.dtype)[:, None, None, :]
        out_norm = GroupNorm32(name="out_layers_0")
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = out_norm(h) * (1 + scale) + shift
        else:
            h = out_norm(h + emb_out)
        h = nn.Dropout(self.dropout, deterministic=self.deterministic)(nn.silu(h))
        h = conv(out_ch, out_ch, 3, zero_init=True, dtype=self.dtype, precision=self.precision,
                 algorithm=self.conv_algorithm, name="out_layers_3")(h)

        if out_ch != channels:
            x = conv(out_ch, channels, 3 if self.use_conv else 1, dtype=self.dtype,
                     precision=self.precision, algorithm=self.conv_algorithm,
                     upsample=self.up, name="skip_connection")(x)
        elif self.up:
            x = upsample_nearest(x)
        return x + h


# --- attention ---------------------------------------------------------------------------------

def attention_heads(channels: int, num_heads: int, num_head_channels: int) -> int:
    """Number of heads of an attention block over `channels` (GD: num_head_channels wins if != -1)."""
    if num_head_channels == -1:
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"num_heads={num_heads} does not divide the {channels} channels of an "
                             f"attention block: choose a divisor of {channels}, or set num_head_channels")
        return num_heads
    if num_head_channels < 1 or channels % num_head_channels:
        raise ValueError(f"num_head_channels={num_head_channels} does not divide the {channels} "
                         f"channels of an attention block: choose a divisor of {channels}, or -1 to "
                         f"use num_heads")
    return channels // num_head_channels


ATTENTION_IMPLS = ("einsum", "xla", "cudnn", "auto")
"""Values of the `attention_impl` field: "einsum" (guided-diffusion's operation order: q and k each
scaled by c^(-1/4), float32 softmax; the default), "xla" / "cudnn" (`jax.nn.dot_product_attention`
with that implementation: logits scaled by c^(-1/2), float32 softmax; "cudnn" is cuDNN's flash
attention, NVIDIA GPUs with bfloat16 / float16 compute and head widths of at most 128, a multiple of
8) or "auto" (cudnn where it applies, einsum elsewhere). All agree to float rounding."""


def _attention_implementation(impl: str, dtype, head_channels: int) -> str:
    """The implementation `impl` resolves to for q of `dtype` with `head_channels` per head."""
    check_choice("attention_impl", impl, ATTENTION_IMPLS)
    flash_ok = (jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
                and head_channels <= 128 and head_channels % 8 == 0)
    if impl == "auto":
        return "cudnn" if flash_ok and jax.default_backend() == "gpu" else "einsum"
    if impl == "cudnn" and not flash_ok:
        raise ValueError(f"attention_impl='cudnn' (cuDNN flash attention) needs bfloat16 or float16 "
                         f"compute and a head width <= 128 that is a multiple of 8, got "
                         f"{jnp.dtype(dtype).name} and {head_channels}: use dtype=bfloat16, "
                         f"other heads, or attention_impl='auto'")
    return impl


def qkv_attention(qkv, num_heads: int, *, legacy: bool, precision: Precision = None, encoder_kv=None,
                  impl: str = "einsum"):
    """Multi-head dot-product attention over packed q, k, v (GD's QKVAttentionLegacy / QKVAttention).

    qkv: [B, T, 3 * H * c]. The channel axis is split as (H, 3, c) in the legacy order (heads first,
    QKVAttentionLegacy) and as (3, H, c) in the new order (QKVAttention). Both scale q and k by
    c^(-1/4) before the product (as GD, for fp16 range), take the softmax in float32 and return
    [B, T, H * c] with head-major channels.

    encoder_kv: optional [B, S, 2 * H * c] extra keys and values (GLIDE's text tokens, split as
    (H, 2, c) legacy / (2, H, c) new order) that every query also attends to, placed before the
    T own keys as glide-text2im's QKVAttention concatenates them.

    impl: ATTENTION_IMPLS; "xla" and "cudnn" call `jax.nn.dot_product_attention` on the same
    [B, T, H, c] q, k, v (`precision` HIGHEST is kept with the default-precision context, as it
    takes no precision argument).
    """
    b, t, width = qkv.shape
    ch = width // (3 * num_heads)
    if legacy:
        q, k, v = jnp.moveaxis(qkv.reshape(b, t, num_heads, 3, ch), 3, 0)
    else:
        q, k, v = jnp.moveaxis(qkv.reshape(b, t, 3, num_heads, ch), 2, 0)
    if encoder_kv is not None:
        s = encoder_kv.shape[1]
        if encoder_kv.shape[-1] != 2 * num_heads * ch:
            raise ValueError(f"encoder_kv has {encoder_kv.shape[-1]} channels, expected "
                             f"2 * {num_heads} heads * {ch} = {2 * num_heads * ch}")
        if legacy:
            ek, ev = jnp.moveaxis(encoder_kv.reshape(b, s, num_heads, 2, ch), 3, 0)
        else:
            ek, ev = jnp.moveaxis(encoder_kv.reshape(b, s, 2, num_heads, ch), 2, 0)
        k = jnp.concatenate([ek.astype(k.dtype), k], axis=1)
        v = jnp.concatenate([ev.astype(v.dtype), v], axis=1)
    impl = _attention_implementation(impl, q.dtype, ch)
    if impl != "einsum":
        with jax.default_matmul_precision(_precision_name(precision)):
            out = jax.nn.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(ch),
                                               implementation=impl)
        return out.reshape(b, t, num_heads * ch)
    scale = 1.0 / math.sqrt(math.sqrt(ch))
    weight = jnp.einsum("bthc,bshc->bhts", q * scale, k * scale, precision=precision)
    weight = jax.nn.softmax(weight.astype(jnp.float32), axis=-1).astype(weight.dtype)
    out = jnp.einsum("bhts,bshc->bthc", weight, v, precision=precision)
    return out.reshape(b, t, num_heads * ch)


def _precision_name(precision: Precision) -> Optional[str]:
    """jax.default_matmul_precision's name of a lax.Precision (None: the backend default)."""
    if precision is None:
        return None
    return {lax.Precision.DEFAULT: "bfloat16", lax.Precision.HIGH: "tensorfloat32",
            lax.Precision.HIGHEST: "float32"}[lax.Precision(precision)]


class AttentionBlock(nn.Module):
    """guided_diffusion.unet.AttentionBlock: x + proj_out(attention(qkv(GN(x)))) over all positions.

    With `encoder_channels` set (glide-text2im's AttentionBlock), a 1x1 conv `encoder_kv` maps the
    encoder tokens [B, S, encoder_channels] to extra keys and values that every position also
    attends to; `encoder_out` is then required. x: [B, H, W, C] -> [B, H, W, C].

    guided-diffusion always gradient-checkpoints this block, whatever `use_checkpoint` says (a known
    bug, openai/guided-diffusion #62 / #114); diffjax applies `nn.remat` only when asked. This
    changes memory and backward time, never values.
    """
    num_heads: int = 1
    num_head_channels: int = -1
    use_new_attention_order: bool = False
    encoder_channels: Optional[int] = None
    dtype: Dtype = jnp.float32
    precision: Precision = None
    conv_algorithm: str = "auto"
    attention_impl: str = "einsum"

    @nn.compact
    def __call__(self, x, encoder_out=None):
        b, hh, ww, c = x.shape
        heads = attention_heads(c, self.num_heads, self.num_head_channels)
        tokens = x.reshape(b, hh * ww, c)
        qkv = conv(3 * c, c, 1, ndim=1, dtype=self.dtype, precision=self.precision,
                   algorithm=self.conv_algorithm, name="qkv")(GroupNorm32(name="norm")(tokens))
        encoder_kv = None
        if self.encoder_channels is not None:
            if encoder_out is None or encoder_out.shape[-1] != self.encoder_channels:
                got = None if encoder_out is None else encoder_out.shape
                raise ValueError(f"AttentionBlock with encoder_channels={self.encoder_channels} needs "
                                 f"encoder_out [B, S, {self.encoder_channels}], got {got}")
            encoder_kv = conv(2 * c, self.encoder_channels, 1, ndim=1, dtype=self.dtype,
                              precision=self.precision, algorithm=self.conv_algorithm,
                              name="encoder_kv")(encoder_out.astype(self.dtype))
        elif encoder_out is not None:
            raise ValueError("AttentionBlock got encoder_out but was built without encoder_channels")
        h = qkv_attention(qkv, heads, legacy=not self.use_new_attention_order,
                          precision=default_precision(self.dtype, self.precision),
                          encoder_kv=encoder_kv, impl=self.attention_impl)
        h = conv(c, c, 1, ndim=1, zero_init=True, dtype=self.dtype, precision=self.precision,
                 algorithm=self.conv_algorithm, name="proj_out")(h)
        return (tokens + h).reshape(b, hh, ww, c)


class AttentionPool2d(nn.Module):
    """guided_diffusion.unet.AttentionPool2d (from CLIP): attention-pooled logits of a feature map.

    Tokens are the spatial mean followed by every position, plus a learned positional embedding
    (stored as PyTorch's `[C, HW + 1]`); the mean token's attention output, projected by c_proj, is
    the result. Always the new head order (QKVAttention), as guided-diffusion.
    x: [B, S, S, C] with S = spacial_dim -> [B, output_dim or C].
    """
    spacial_dim: int
    num_head_channels: int
    output_dim: Optional[int] = None
    dtype: Dtype = jnp.float32
    precision: Precision = None
    conv_algorithm: str = "auto"
    attention_impl: str = "einsum"

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        if (hh, ww) != (self.spacial_dim, self.spacial_dim):
            raise ValueError(f"AttentionPool2d was built for {self.spacial_dim}x{self.spacial_dim} "
                             f"features but got {hh}x{ww}: feed images of the model's image_size")
        heads = attention_heads(c, 1, self.num_head_channels)
        pos = self.param("positional_embedding",
                         lambda key, shape: jax.random.normal(key, shape) / math.sqrt(c),
                         (c, hh * ww + 1))
        tokens = x.reshape(b, hh * ww, c)
        tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
        tokens = tokens + pos.T.astype(tokens.dtype)[None]
        qkv = conv(3 * c, c, 1, ndim=1, dtype=self.dtype, precision=self.precision,
                   algorithm=self.conv_algorithm, name="qkv_proj")(tokens)
        h = qkv_attention(qkv, heads, legacy=False,
                          precision=default_precision(self.dtype, self.precision),
                          impl=self.attention_impl)
        h = conv(self.output_dim or c, c, 1, ndim=1, dtype=self.dtype, precision=self.precision,
                 algorithm=self.conv_algorithm, name="c_proj")(h)
        return h[:, 0]
