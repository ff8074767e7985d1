"""GLIDE's text-conditional UNets (Nichol et al. 2021, openai/glide-text2im `text2im_model.py`, `xf.py`).

A transformer encodes the caption tokens [B, text_ctx]; its last token, projected to
4 * model_channels, is added to the timestep embedding (`xf_proj`), and all its tokens, projected by a
1x1 conv in every attention block (`encoder_kv`), are extra keys and values that each image position
attends to. The UNet itself is the ADM UNet of `diffjax.models.unet` (GLIDE's `unet.py` is
guided-diffusion's with the legacy head order and no class labels).

    Text2ImUNet                 x                                  (the 64x64 base model)
    InpaintText2ImUNet          x, inpaint_image * inpaint_mask, inpaint_mask
    SuperResText2ImUNet         x, bilinear(low_res)               (the 64 -> 256 upsampler)
    SuperResInpaintText2ImUNet  x, inpaint_image * inpaint_mask, inpaint_mask, bilinear(low_res)

(concatenated on channels in that order before the first conv, as glide-text2im does). Images are NHWC;
`in_channels` is the image's channel count (3), as glide-text2im's constructors take it.

`model.apply(variables, x, t, tokens=..., mask=..., [low_res=...], [inpaint_image=..., inpaint_mask=...])`
returns [B, H, W, out_channels]; `model.apply(variables, tokens, mask, method="get_text_emb")` returns
{"xf_proj": [B, 4 * model_channels], "xf_out": [B, text_ctx, xf_width]} (tokens before channels, unlike
glide-text2im's [B, xf_width, text_ctx]); that dict can be passed back as `text_emb=` to skip the
transformer, e.g. to encode a prompt once per sampling run.

Compute dtype: as the ADM UNet (`dtype` for the torso, float32 timestep embedding and output head);
the transformer runs in `dtype` with float32 LayerNorm, as glide-text2im's fp16 mode.
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from diffjax.models.layers import linear, qkv_attention, resize_bilinear_torch, default_precision
from diffjax.models.unet import UNetModel


class LayerNorm32(nn.Module):
    """glide_text2im.xf.LayerNorm: torch's LayerNorm (eps 1e-5, biased two-pass variance) computed in
    float32 and cast back to the input dtype. x: [..., C] -> same shape."""
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        h = x.astype(jnp.float32)
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        return ((h - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias).astype(x.dtype)


class MultiheadAttention(nn.Module):
    """glide_text2im.xf.MultiheadAttention: c_proj(attention(c_qkv(x))) over all tokens, no mask.
    c_qkv's output is split as (heads, 3, c) per token, the legacy head order. x: [B, L, W] -> same."""
    heads: int
    dtype: Any = jnp.float32
    precision: Any = None
    attention_impl: str = "einsum"  # diffjax.models.layers.ATTENTION_IMPLS

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        if width % self.heads:
            raise ValueError(f"xf_heads={self.heads} does not divide xf_width={width}: choose a "
                             f"divisor of {width}")
        qkv = linear(3 * width, width, dtype=self.dtype, precision=self.precision, name="c_qkv")(x)
        h = qkv_attention(qkv, self.heads, legacy=True,
                          precision=default_precision(self.dtype, self.precision),
                          impl=self.attention_impl)
        return linear(width, width, dtype=self.dtype, precision=self.precision, name="c_proj")(h)


class MLP(nn.Module):
    """glide_text2im.xf.MLP: c_proj(GELU(c_fc(x))), 4x hidden width, exact (erf) GELU as nn.GELU."""
    dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        h = linear(4 * width, width, dtype=self.dtype, precision=self.precision, name="c_fc")(x)
        h = nn.gelu(h, approximate=False)
        return linear(width, 4 * width, dtype=self.dtype, precision=self.precision, name="c_proj")(h)


class ResidualAttentionBlock(nn.Module):
    """glide_text2im.xf.ResidualAttentionBlock (CLIP's pre-LayerNorm block):
    x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)). x: [B, L, W] -> [B, L, W]."""
    heads: int
    dtype: Any = jnp.float32
    precision: Any = None
    attention_impl: str = "einsum"  # diffjax.models.layers.ATTENTION_IMPLS

    @nn.compact
    def __call__(self, x):
        x = x + MultiheadAttention(self.heads, self.dtype, self.precision, self.attention_impl,
                                   name="attn")(
            LayerNorm32(name="ln_1")(x))
        return x + MLP(self.dtype, self.precision, name="mlp")(LayerNorm32(name="ln_2")(x))


class Transformer(nn.Module):
    """glide_text2im.xf.Transformer: `layers` residual attention blocks (`resblocks_i`).
    x: [B, L, W] -> [B, L, W]."""
    layers: int
    heads: int
    dtype: Any = jnp.float32
    precision: Any = None
    attention_impl: str = "einsum"  # diffjax.models.layers.ATTENTION_IMPLS

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x = ResidualAttentionBlock(self.heads, self.dtype, self.precision, self.attention_impl,
                                       name=f"resblocks_{i}")(x)
        return x


# state_dict() order of Text2ImUNet: its own parameters, then the UNet's modules, then the text ones.
_TORCH_TOP_ORDER = {"positional_embedding": 0, "padding_embedding": 1, "transformer": 3,
                    "final_ln": 4, "token_embedding": 5, "transformer_proj": 6}  # UNet modules: 2
_TORCH_BLOCK_ORDER = {"attn": 0, "ln_1": 1, "mlp": 2, "ln_2": 3}


class Text2ImUNet(UNetModel):
    """glide_text2im.text2im_model.Text2ImUNet: the ADM UNet conditioned on caption tokens.

    Fields: the UNet's (no `num_classes`, no `use_new_attention_order`: GLIDE has neither) plus
    `text_ctx` (tokens per caption), `xf_width`, `xf_layers`, `xf_heads`, `xf_final_ln`,
    `xf_padding` (a learned embedding replaces the token + position embedding where mask is False),
    `n_vocab` (the tokenizer's vocabulary size; 50257 for the released models). xf_width=0 gives a
    UNet without text conditioning, as the reference. `cache_text_emb` is accepted and has no effect
    (pass `text_emb=` instead).

    `__call__(x, timesteps, tokens=None, mask=None, *, text_emb=None, train=False)`:
    x [B, H, W, in_channels], timesteps [B], tokens [B, text_ctx] int, mask [B, text_ctx] bool (True
    for real tokens; required when xf_padding) -> [B, H, W, out_channels] float32. Subclasses add
    `low_res` and / or `inpaint_image`, `inpaint_mask` keywords.
    """
    text_ctx: int = 128
    xf_width: int = 512
    xf_layers: int = 16
    xf_heads: int = 8
    xf_final_ln: bool = True
    xf_padding: bool = False
    n_vocab: int = 50257
    cache_text_emb: bool = False

    _super_res: ClassVar[bool] = False
    _inpaint: ClassVar[bool] = False

    # PyTorch names the `_<index>` -> `.<index>` rule of diffjax.compat cannot spell.
    torch_key_renames: ClassVar[tuple] = ((r"\.ln\.(\d+)\.", r".ln_\1."),)

    def _validate(self):
        super()._validate()
        name = type(self).__name__
        if self.num_classes is not None:
            raise ValueError(f"{name}: num_classes={self.num_classes!r}: glide-text2im's text "
                             f"models take no class labels; use num_classes=None")
        if self.use_new_attention_order:
            raise ValueError(f"{name}: use_new_attention_order=True: GLIDE's UNet uses the legacy "
                             f"head order only")
        for field in ("text_ctx", "n_vocab"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {field}={value!r} must be a positive int")
        if self.xf_width:
            if self.xf_heads < 1 or self.xf_width % self.xf_heads:
                raise ValueError(f"{name}: xf_heads={self.xf_heads} does not divide xf_width="
                                 f"{self.xf_width}: choose a divisor of {self.xf_width}")
            if self.xf_layers < 0:
                raise ValueError(f"{name}: xf_layers={self.xf_layers} must be >= 0")

    def _encoder_channels(self) -> Optional[int]:
        return self.xf_width or None

    def setup(self):
        # The text encoder is built in setup so that get_text_emb can run on its own (method=...).
        if not self.xf_width:
            return
        self.transformer = Transformer(self.xf_layers, self.xf_heads, self.dtype, self.precision,
                                       self.attention_impl)
        self.final_ln = LayerNorm32() if self.xf_final_ln else None
        self.token_embedding = nn.Embed(self.n_vocab, self.xf_width, param_dtype=jnp.float32,
                                        embedding_init=nn.initializers.normal(1.0))
        # th.empty in the reference (filled by training); CLIP initialises these N(0, 0.01^2).
        shape = (self.text_ctx, self.xf_width)
        self.positional_embedding = self.param("positional_embedding",
                                               nn.initializers.normal(0.01), shape, jnp.float32)
        if self.xf_padding:
            self.padding_embedding = self.param("padding_embedding", nn.initializers.normal(0.01),
                                                shape, jnp.float32)
        self.transformer_proj = linear(4 * self.model_channels, self.xf_width,
                                       precision=self.precision)

    def get_text_emb(self, tokens, mask=None):
        """glide-text2im's get_text_emb. tokens [B, text_ctx] int, mask [B, text_ctx] bool ->
        {"xf_proj": [B, 4 * model_channels] float32, "xf_out": [B, text_ctx, xf_width] (dtype)}.

        xf = transformer(token_emb + pos_emb, or padding_emb where mask is False), final LayerNorm,
        xf_proj = transformer_proj(xf[:, -1]): the LAST position, which is padding for short
        captions; GLIDE was trained that way."""
        if not self.xf_width:
            raise ValueError(f"{type(self).__name__} with xf_width=0 has no text encoder")
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[1] != self.text_ctx:
            raise ValueError(f"tokens must be [B, text_ctx={self.text_ctx}] ints, got shape "
                             f"{tokens.shape} (pad with diffjax.tokenizer's padded_tokens_and_mask)")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
        xf_in = self.token_embedding(tokens) + self.positional_embedding[None]
        if self.xf_padding:
            if mask is None:
                raise ValueError(f"{type(self).__name__} with xf_padding=True needs mask "
                                 f"[B, {self.text_ctx}] bool (True for real tokens)")
            mask = jnp.asarray(mask)
            if mask.shape != tokens.shape:
                raise ValueError(f"mask must have the tokens' shape {tokens.shape}, got {mask.shape}")
            xf_in = jnp.where(mask.astype(bool)[..., None], xf_in, self.padding_embedding[None])
        xf_out = self.transformer(xf_in.astype(self.dtype))
        if self.final_ln is not None:
            xf_out = self.final_ln(xf_out)
        xf_proj = self.transformer_proj(xf_out[:, -1].astype(jnp.float32))
        return {"xf_proj": xf_proj, "xf_out": xf_out}

    @nn.compact
    def __call__(self, x, timesteps, tokens=None, mask=None, low_res=None, inpaint_image=None,
                 inpaint_mask=None, *, text_emb=None, train: bool = False):
        name = type(self).__name__
        self._check_input(x, self.in_channels)
        if not self._super_res and low_res is not None:
            raise ValueError(f"{name} takes no low_res: use SuperResText2ImUNet")
        if not self._inpaint and (inpaint_image is not None or inpaint_mask is not None):
            raise ValueError(f"{name} takes no inpaint_image / inpaint_mask: use InpaintText2ImUNet")
        parts = [x]
        if self._inpaint:  # glide-text2im: zeros when not given (nothing known)
            image = jnp.zeros_like(x) if inpaint_image is None else jnp.asarray(inpaint_image)
            known = (jnp.zeros(x.shape[:-1] + (1,), x.dtype) if inpaint_mask is None
                     else jnp.asarray(inpaint_mask))
            if image.shape != x.shape:
                raise ValueError(f"inpaint_image must have x's shape {x.shape}, got {image.shape}")
            if known.shape != x.shape[:-1] + (1,):
                raise ValueError(f"inpaint_mask must be [B, H, W, 1] = {x.shape[:-1] + (1,)} "
                                 f"(1 where the pixel is known), got {known.shape}")
            known = known.astype(x.dtype)
            parts += [image.astype(x.dtype) * known, known]
        if self._super_res:
            if low_res is None:
                raise ValueError(f"{name} needs low_res=[B, h, w, {self.in_channels}], the image "
                                 f"to upsample")
            self._check_input(low_res, self.in_channels)
            parts.append(resize_bilinear_torch(low_res, x.shape[1:3]).astype(x.dtype))
        h = jnp.concatenate(parts, axis=-1) if len(parts) > 1 else x

        xf_proj = xf_out = None
        if self.xf_width:
            if text_emb is None:
                if tokens is None:
                    raise ValueError(f"{name} needs tokens=[B, {self.text_ctx}] (and mask=...) or "
                                     f"text_emb=get_text_emb(...)")
                text_emb = self.get_text_emb(tokens, mask)
            xf_proj, xf_out = text_emb["xf_proj"], text_emb["xf_out"]
            if xf_proj.shape[0] != x.shape[0] or xf_out.shape[0] != x.shape[0]:
                raise ValueError(f"the text batch ({xf_proj.shape[0]}) differs from the image batch "
                                 f"({x.shape[0]}): give one caption per image")
        return self._unet(h, timesteps, None, train, extra_emb=xf_proj, encoder_out=xf_out)

    def example_inputs(self, batch_size: int = 1):
        args, _ = super().example_inputs(batch_size)
        kwargs = {"tokens": jnp.zeros((batch_size, self.text_ctx), jnp.int32),
                  "mask": jnp.ones((batch_size, self.text_ctx), bool)}
        if self._super_res:
            kwargs["low_res"] = args[0]
        return args, kwargs

    @staticmethod
    def torch_key_rank(key: str) -> tuple:
        """Sort key giving PyTorch's state_dict() order (the module's own parameters, the UNet, then
        transformer, final_ln, token_embedding, transformer_proj; ln_1 after attn in a block)."""
        parts = key.split(".")
        top = _TORCH_TOP_ORDER.get(parts[0], 2)
        if parts[0] == "transformer":
            return (top, int(parts[2]), _TORCH_BLOCK_ORDER[parts[3]])
        return (top,)


class InpaintText2ImUNet(Text2ImUNet):
    """glide_text2im InpaintText2ImUNet: Text2ImUNet on [x, inpaint_image * inpaint_mask,
    inpaint_mask] (2 * in_channels + 1 input channels). inpaint_image [B, H, W, C], inpaint_mask
    [B, H, W, 1] (1 = known); both default to zeros."""
    _inpaint: ClassVar[bool] = True


class SuperResText2ImUNet(Text2ImUNet):
    """glide_text2im SuperResText2ImUNet: Text2ImUNet on [x, bilinear(low_res)] (2 * in_channels
    input channels); low_res [B, h, w, C] is resized with F.interpolate(mode='bilinear',
    align_corners=False) semantics."""
    _super_res: ClassVar[bool] = True


class SuperResInpaintText2ImUNet(Text2ImUNet):
    """glide_text2im SuperResInpaintText2ImUnet: Text2ImUNet on [x, inpaint_image * inpaint_mask,
    inpaint_mask, bilinear(low_res)] (3 * in_channels + 1 input channels)."""
    _super_res: ClassVar[bool] = True
    _inpaint: ClassVar[bool] = True


__all__ = ["Text2ImUNet", "InpaintText2ImUNet", "SuperResText2ImUNet", "SuperResInpaintText2ImUNet",
           "Transformer", "ResidualAttentionBlock", "MultiheadAttention", "MLP", "LayerNorm32"]
