"""The ADM UNet and its super-resolution variant (openai/guided-diffusion `unet.py`), in Flax Linen.

Both are pure modules: `model.apply(variables, x, t, y=None, train=False)`, x NHWC, dropout from the
'dropout' rng when `train=True`. The constructor arguments are guided-diffusion's (keyword use is
assumed; `attention_resolutions` are downsample rates, e.g. (2, 4) for 16 and 8 on a 32 px model).
`dims` and `use_fp16` are handled by `diffjax.compat.gd_models.build` (2-D only; use_fp16 -> bfloat16
compute dtype). `image_size` is optional here: the UNet's parameters do not depend on it
(improved-diffusion's constructor does not even take it).

Compute dtype (`dtype`): float32 or bfloat16 for the torso (input, middle and output blocks), as
guided-diffusion's `convert_to_fp16` converts only those; the timestep / class embedding and the
output head run in float32, parameters are float32, GroupNorm statistics and softmax are float32.
`use_checkpoint=True` wraps every ResBlock and AttentionBlock in `nn.remat` (same values, less
activation memory in the backward pass).

Kernels (`diffjax.models.layers`): `conv_algorithm` (CONV_ALGORITHMS: "direct", "winograd", "auto")
and `attention_impl` (ATTENTION_IMPLS: "einsum", "xla", "cudnn", "auto") reach every convolution and
attention of the model; they change how values are computed (to float rounding), never parameters.
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional, Sequence

import jax.numpy as jnp
import flax.linen as nn

from diffjax.models.winograd import CONV_ALGORITHMS
from diffjax.models.layers import (
    ATTENTION_IMPLS, GROUPS, AttentionBlock, Downsample, GroupNorm32, ResBlock,
    Upsample, attention_heads, check_choice, conv, linear, resize_bilinear_torch,
    timestep_embedding)

_COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


class ADMTrunk(nn.Module):
    """Fields, validation and the encoder half shared by UNetModel and EncoderUNetModel.

    Block names follow guided-diffusion's module paths (`input_blocks_3_0` = `input_blocks.3.0`).
    """
    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_resolutions: Sequence[int]
    image_size: Optional[int] = None
    dropout: float = 0.0
    channel_mult: Sequence[float] = (1, 2, 4, 8)
    conv_resample: bool = True
    use_checkpoint: bool = False
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    dtype: Any = jnp.float32
    precision: Any = None
    conv_algorithm: str = "auto"
    attention_impl: str = "einsum"

    _has_decoder: ClassVar[bool] = False  # whether num_heads_upsample is used

    def __post_init__(self):
        self._validate()
        super().__post_init__()

    # -- static structure ------------------------------------------------------------------------

    def level_channels(self) -> list[int]:
        """Channels of each resolution level: int(mult * model_channels), as guided-diffusion."""
        return [int(m * self.model_channels) for m in self.channel_mult]

    def downsample_rates(self) -> list[int]:
        """The downsample rate of each level: 1, 2, 4, ... (the valid attention_resolutions)."""
        return [2 ** level for level in range(len(self.channel_mult))]

    def _validate(self):
        name = type(self).__name__
        for field in ("in_channels", "model_channels", "out_channels"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {field}={value!r} must be a positive int")
        if not isinstance(self.num_res_blocks, int) or self.num_res_blocks < 0:
            raise ValueError(f"{name}: num_res_blocks={self.num_res_blocks!r} must be an int >= 0")
        if not self.channel_mult or any(m <= 0 for m in self.channel_mult):
            raise ValueError(f"{name}: channel_mult={tuple(self.channel_mult)!r} must be a non-empty "
                             f"sequence of positive multipliers, e.g. (1, 2, 2, 2)")
        for level, ch in enumerate(self.level_channels()):
            if ch % GROUPS:
                raise ValueError(
                    f"{name}: model_channels={self.model_channels} with channel_mult="
                    f"{tuple(self.channel_mult)} gives {ch} channels at level {level}, not a multiple "
                    f"of the {GROUPS} GroupNorm groups: choose model_channels and channel_mult so "
                    f"that every int(mult * model_channels) is divisible by {GROUPS}")
        rates = self.downsample_rates()
        bad = [r for r in self.attention_resolutions if r not in rates]
        if bad:
            raise ValueError(
                f"{name}: attention_resolutions={tuple(self.attention_resolutions)!r} contains "
                f"{bad}, not a downsample rate of a model with channel_mult "
                f"{tuple(self.channel_mult)}: choose from {rates} (rates, i.e. image_size // "
                f"resolution; create_model takes resolutions)")
        head_counts = {self.num_heads, self._heads_upsample()} if self._has_decoder else {self.num_heads}
        for rate, ch in zip(rates, self.level_channels(), strict=True):
            if rate in self.attention_resolutions:
                for heads in sorted(head_counts):
                    try:
                        attention_heads(ch, heads, self.num_head_channels)
                    except ValueError as err:
                        raise ValueError(f"{name}: at downsample rate {rate}: {err}") from None
        # The middle block always has attention at the last level.
        try:
            attention_heads(self.level_channels()[-1], self.num_heads, self.num_head_channels)
        except ValueError as err:
            raise ValueError(f"{name}: in the middle block: {err}") from None
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{name}: dropout={self.dropout!r} must be in [0, 1)")
        if jnp.dtype(self.dtype).name not in _COMPUTE_DTYPES:
            raise ValueError(f"{name}: dtype={jnp.dtype(self.dtype).name} is not a compute dtype: "
                             f"choose from {_COMPUTE_DTYPES} (parameters are always float32)")
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 1):
            raise ValueError(f"{name}: image_size={self.image_size!r} must be a positive int or None")
        try:
            check_choice("conv_algorithm", self.conv_algorithm, CONV_ALGORITHMS)
            check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None

    def _kernels(self) -> dict:
        """The compute settings every block and convolution of the model takes."""
        return dict(dtype=self.dtype, precision=self.precision, conv_algorithm=self.conv_algorithm)

    def _encoder_channels(self) -> Optional[int]:
        """Channels of the tokens that attention blocks also attend to (GLIDE's text), or None."""
        return None

    def _heads_upsample(self) -> int:
        return self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample

    def example_inputs(self, batch_size: int = 1):
        """(args, kwargs) of a call on zeros, e.g. for `init` under `jax.eval_shape`; the images are
        image_size square when it is set, else the smallest size the model accepts."""
        size = self.image_size or 2 ** (len(self.channel_mult) - 1)
        return (jnp.zeros((batch_size, size, size, self.in_channels), jnp.float32),
                jnp.zeros((batch_size,), jnp.int32)), {}

    # -- shared pieces (called from the subclasses' compact __call__) -----------------------------

    def _blocks(self, train: bool):
        """ResBlock / AttentionBlock constructors with this model's settings (remat if asked)."""
        res_cls = nn.remat(ResBlock) if self.use_checkpoint else ResBlock
        attn_cls = nn.remat(AttentionBlock) if self.use_checkpoint else AttentionBlock

        def res(name, **kw):
            return res_cls(dropout=self.dropout, use_scale_shift_norm=self.use_scale_shift_norm,
                           deterministic=not train, name=name, **self._kernels(), **kw)

        def attn(name, num_heads):
            return attn_cls(num_heads=num_heads, num_head_channels=self.num_head_channels,
                            use_new_attention_order=self.use_new_attention_order,
                            encoder_channels=self._encoder_channels(),
                            attention_impl=self.attention_impl, name=name, **self._kernels())

        return res, attn

    def _time_embed(self, timesteps):
        """emb = Linear(SiLU(Linear(timestep_embedding(t, model_channels)))): [B] -> [B, 4 * mc]."""
        ted = 4 * self.model_channels
        emb = timestep_embedding(timesteps, self.model_channels)
        emb = linear(ted, self.model_channels, precision=self.precision, name="time_embed_0")(emb)
        return linear(ted, ted, precision=self.precision, name="time_embed_2")(nn.silu(emb))

    def _check_input(self, x, channels):
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"{type(self).__name__} expects NHWC input with {channels} channels, "
                             f"got shape {x.shape} (transpose NCHW arrays with x.transpose(0, 2, 3, 1))")
        factor = 2 ** (len(self.channel_mult) - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"{type(self).__name__} with {len(self.channel_mult)} levels downsamples "
                             f"{factor}x: height and width must be multiples of {factor}, got "
                             f"{x.shape[1]}x{x.shape[2]}")

    def _encode(self, x, emb, train: bool, encoder_out=None):
        """Input blocks and middle block. Returns (h, hs, ds): the middle output, every input
        block's output (the UNet's skip connections) and the final downsample rate.
        encoder_out: [B, S, encoder_channels] tokens for the attention blocks (GLIDE) or None."""
        res, attn = self._blocks(train)
        extra = () if encoder_out is None else (encoder_out,)
        chans = self.level_channels()
        h = x.astype(self.dtype)
        h = conv(chans[0], h.shape[-1], 3, dtype=self.dtype, precision=self.precision,
                 algorithm=self.conv_algorithm, name="input_blocks_0_0")(h)
        hs, ds, idx = [h], 1, 1
        for level, ch in enumerate(chans):
            for _ in range(self.num_res_blocks):
                h = res(f"input_blocks_{idx}_0", out_channels=ch)(h, emb)
                if ds in self.attention_resolutions:
                    h = attn(f"input_blocks_{idx}_1", self.num_heads)(h, *extra)
                hs.append(h)
                idx += 1
            if level != len(chans) - 1:
                if self.resblock_updown:
                    h = res(f"input_blocks_{idx}_0", out_channels=ch, down=True)(h, emb)
                else:
                    h = Downsample(self.conv_resample, ch, name=f"input_blocks_{idx}_0",
                                   **self._kernels())(h)
                hs.append(h)
                ds *= 2
                idx += 1
        h = res("middle_block_0")(h, emb)
        h = attn("middle_block_1", self.num_heads)(h, *extra)
        h = res("middle_block_2")(h, emb)
        return h, hs, ds


class UNetModel(ADMTrunk):
    """guided_diffusion.unet.UNetModel: the ADM denoiser.

    `__call__(x, timesteps, y=None, train=False)`: x [B, H, W, in_channels] (H, W divisible by
    2 ** (len(channel_mult) - 1)), timesteps [B] (int or float), y [B] int labels iff num_classes is
    set -> [B, H, W, out_channels] float32.
    """
    num_classes: Optional[int] = None

    _has_decoder: ClassVar[bool] = True

    def _validate(self):
        super()._validate()
        if self.num_classes is not None and (not isinstance(self.num_classes, int) or self.num_classes < 1):
            raise ValueError(f"{type(self).__name__}: num_classes={self.num_classes!r} must be a "
                             f"positive int, or None for an unconditional model")

    @nn.compact
    def __call__(self, x, timesteps, y=None, train: bool = False):
        self._check_input(x, self.in_channels)
        return self._unet(x, timesteps, y, train)

    def _unet(self, x, timesteps, y, train, extra_emb=None, encoder_out=None):
        """The UNet on prepared inputs; `extra_emb` [B, 4 * model_channels] is added to the
        timestep embedding and `encoder_out` [B, S, E] feeds every attention block (GLIDE's text
        conditioning, glide-text2im's Text2ImUNet.forward)."""
        if (y is not None) != (self.num_classes is not None):
            raise ValueError(f"{type(self).__name__} with num_classes={self.num_classes} "
                             f"{'needs' if y is None else 'takes no'} class labels y: pass y "
                             f"if and only if the model is class-conditional")
        emb = self._time_embed(timesteps)
        if self.num_classes is not None:
            if y.shape != (x.shape[0],):
                raise ValueError(f"y must have shape {(x.shape[0],)} (one label per image), got {y.shape}")
            emb = emb + nn.Embed(self.num_classes, emb.shape[-1], param_dtype=jnp.float32,
                                 embedding_init=nn.initializers.normal(1.0), name="label_emb")(y)

        if extra_emb is not None:
            emb = emb + extra_emb.astype(emb.dtype)

        h, hs, ds = self._encode(x, emb, train, encoder_out)
        res, attn = self._blocks(train)
        extra = () if encoder_out is None else (encoder_out,)
        idx = 0
        for level, ch in reversed(list(enumerate(self.level_channels()))):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = res(f"output_blocks_{idx}_0", out_channels=ch)(h, emb)
                j = 1
                if ds in self.attention_resolutions:
                    h = attn(f"output_blocks_{idx}_1", self._heads_upsample())(h, *extra)
                    j = 2
                if level and i == self.num_res_blocks:
                    if self.resblock_updown:
                        h = res(f"output_blocks_{idx}_{j}", out_channels=ch, up=True)(h, emb)
                    else:
                        h = Upsample(self.conv_resample, ch, name=f"output_blocks_{idx}_{j}",
                                     **self._kernels())(h)
                    ds //= 2
                idx += 1

        # The output head runs in float32, as in guided-diffusion (h.type(x.dtype) before self.out).
        h = nn.silu(GroupNorm32(name="out_0")(h.astype(jnp.float32)))
        return conv(self.out_channels, h.shape[-1], 3, zero_init=True, precision=self.precision,
                    algorithm=self.conv_algorithm, name="out_2")(h)

    def example_inputs(self, batch_size: int = 1):
        args, kwargs = super().example_inputs(batch_size)
        if self.num_classes is not None:
            kwargs["y"] = jnp.zeros((batch_size,), jnp.int32)
        return args, kwargs


class SuperResModel(UNetModel):
    """guided_diffusion.unet.SuperResModel: a UNet conditioned on a low-resolution image.

    `__call__(x, timesteps, low_res, y=None, train=False)`: low_res [B, h, w, in_channels] is resized
    to x's size with F.interpolate(mode='bilinear', align_corners=False) semantics and concatenated
    after x's channels, so the first conv sees 2 * in_channels channels (as the reference).
    """

    @nn.compact
    def __call__(self, x, timesteps, low_res=None, y=None, train: bool = False):
        self._check_input(x, self.in_channels)
        if low_res is None:
            raise ValueError("SuperResModel needs low_res=[B, h, w, in_channels], the image to upsample")
        self._check_input(low_res, self.in_channels)
        upsampled = resize_bilinear_torch(low_res, x.shape[1:3]).astype(x.dtype)
        return self._unet(jnp.concatenate([x, upsampled], axis=-1), timesteps, y, train)

    def example_inputs(self, batch_size: int = 1):
        args, kwargs = super().example_inputs(batch_size)
        return args, {"low_res": args[0], **kwargs}
