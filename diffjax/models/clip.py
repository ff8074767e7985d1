"""GLIDE's noise-aware CLIP and its guidance (Nichol et al. 2021, "CLIP guidance";
openai/glide-text2im `clip/`).

A CLIP (Radford et al. 2021) whose image encoder sees noised images x_t and their timestep t, so
that its gradient is meaningful all along a sampling chain. CLIP guidance shifts the sampler's mean
by the gradient of the image-caption similarity (GLIDE's CLIP guidance):

    mu'(x_t | c) = mu(x_t | c) + s * Sigma(x_t | c) * grad_x (f(x_t, t) . g(c))

with f, g the normalised image and text embeddings; glide-text2im multiplies the dot product by
exp(logit_scale) = 100 (`NoisedCLIP.similarity`). `clip_guidance` is that gradient as a
`diffjax.core.guidance` transform, usable with every sampler.

    TextEncoder   tokens [B, max_text_len] int, text_len [B] -> z_t [B, n_embd] (not normalised)
    ImageEncoder  x [B, S, S, 3] on the 0..255 scale, t [B] int -> z_i [B, n_embd] (not normalised)
    NoisedCLIP    both, plus the normalised embeddings and the similarity; variables
                  {"params": {"text_encoder": ..., "image_encoder": ...}}

Both encoders are pre-LayerNorm transformers of `n_head * n_head_state` width: blocks
x + f_c(attn(ln(x))), x + f_2(gelu(f_1(ln(x)))) (exact GELU, LayerNorm eps 1e-5, f_k without bias).
The text attention is causal and the text embedding is read at position text_len - 1 (padding is
0 and inert, as the attention never looks ahead). The image tokens are t's learned embedding
w_t[t] followed by the p x p patches in row-major order, attending to each other fully; the
image embedding is read at token 0.

Submodules and leaves follow glide-text2im's state dict (`blocks.block_0.f_attn.f_q.w` is
('block_0', 'f_attn', 'f_q', 'kernel') transposed): `torch_leaves` / `torch_key_renames` give the
mapping `diffjax.compat.gd_models` uses to load `clip_text_enc.pt` / `clip_image_enc.pt`.
Parameters and compute are float32 (the reference's dtype).
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.core import guidance as G
from diffjax.models import convolution
from diffjax.models.glide import LayerNorm32
from diffjax.models.layers import default_precision

# CLIP's channel statistics of its training images, on the 0..255 scale (Radford et al. 2021).
IMAGE_CHANNEL_MEANS = (122.77093945, 116.74601272, 104.09373519)
IMAGE_CHANNEL_STDS = (68.50053285, 66.63215831, 70.32316309)

# glide-text2im's clip/config.yaml: the released noised CLIP (clip_text_enc.pt / clip_image_enc.pt).
RELEASED_CONFIG = dict(image_size=64, patch_size=4, n_embd=512, n_head_image=12,
                       n_head_state_image=64, n_xf_blocks_image=12, n_head_text=8,
                       n_head_state_text=64, n_xf_blocks_text=12, max_text_len=77, n_vocab=65536,
                       n_timesteps=1000, logit_scale=100.0)


def _affine(features: int, std: float, precision, *, use_bias: bool = True, name: str):
    """glide's Affine(n_in, features): x @ w + b, w ~ N(0, std^2), b = 0 (Flax kernel [in, out])."""
    return nn.Dense(features, use_bias=use_bias, param_dtype=jnp.float32,
                    precision=default_precision(jnp.float32, precision),
                    kernel_init=nn.initializers.normal(std), bias_init=nn.initializers.zeros,
                    name=name)


class AttentionResblock(nn.Module):
    """x + f_c(softmax(q k^T / sqrt(d) [+ causal mask]) v), q, k, v = f_q, f_k, f_v of ln(x), in
    n_head heads of d = width / n_head channels. x: [B, L, width] -> same.

    q and k are each scaled by d^(-1/4) before the product, as the reference does; masked keys get
    -1e10 (the reference's bias), so their weight is exactly 0."""
    n_head: int
    n_resblocks: int  # 2 * blocks: only the initial scale of f_c
    causal: bool
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        b, n, width = x.shape
        d = width // self.n_head
        h = LayerNorm32(name="ln")(x)
        std = 1 / math.sqrt(width)
        q, k, v = (_affine(width, std, self.precision, use_bias=name != "f_k", name=name)(h)
                   .reshape(b, n, self.n_head, d) for name in ("f_q", "f_k", "f_v"))
        scale = math.sqrt(1 / math.sqrt(d))
        precision = default_precision(jnp.float32, self.precision)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k * scale, precision=precision)
        if self.causal:
            logits = jnp.where(jnp.tril(jnp.ones((n, n), bool)), logits, jnp.float32(-1e10))
        weights = jax.nn.softmax(logits, axis=-1)
        r = jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=precision).reshape(b, n, width)
        f_c_std = 1 / math.sqrt(width * self.n_resblocks ** 2)
        return x + _affine(width, f_c_std, self.precision, name="f_c")(r)


class MLPResblock(nn.Module):
    """x + f_2(gelu(f_1(ln(x)))), 4x hidden width, exact (erf) GELU. x: [B, L, W] -> same."""
    n_resblocks: int
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        h = LayerNorm32(name="ln")(x)
        h = _affine(4 * width, math.sqrt(2 / (4 * width)), self.precision, name="f_1")(h)
        h = nn.gelu(h, approximate=False)
        std = 1 / math.sqrt(width * self.n_resblocks ** 2)
        return x + _affine(width, std, self.precision, name="f_2")(h)


class TransformerBlock(nn.Module):
    """f_mlp(f_attn(x)). x: [B, L, W] -> same."""
    n_head: int
    n_resblocks: int
    causal: bool
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        x = AttentionResblock(self.n_head, self.n_resblocks, self.causal, self.precision,
                              name="f_attn")(x)
        return MLPResblock(self.n_resblocks, self.precision, name="f_mlp")(x)


class FeatureExtractor(nn.Module):
    """The output head: f(ln(h)), f without bias. h: [B, n_state] (the pooled token) -> [B, n_embd]."""
    n_embd: int
    precision: Any = None

    @nn.compact
    def __call__(self, h):
        std = math.sqrt(2 / (h.shape[-1] + self.n_embd))  # Affine's default scale
        return _affine(self.n_embd, std, self.precision, use_bias=False, name="f")(
            LayerNorm32(name="ln")(h))


class _Encoder(nn.Module):
    """The state-dict mapping both encoders share (see diffjax.compat.gd_models._param_layout)."""

    torch_leaves: ClassVar[dict] = {
        ("kernel", 2): ("w", (1, 0)),        # Affine.w [out, in]
        ("bias", 1): ("b", (0,)),            # Affine.b and LayerNorm.b
        ("scale", 1): ("g", (0,)),           # LayerNorm.g
        ("w_voc", 2): ("w_voc", (0, 1)),
        ("w_pos", 2): ("w_pos", (0, 1)),
        ("w_t", 2): ("w_t", (0, 1)),
        ("patch_proj", 4): ("patch_proj", (3, 2, 0, 1)),  # HWIO -> OIHW
    }
    # The reference keeps its modules in an nn.ModuleDict `blocks` named input, block_<i>, output,
    # and its MLP layers are f_1, f_2 (the `_<index>` -> `.<index>` rule would give f.1, f.2).
    torch_key_renames: ClassVar[tuple] = ((r"^block\.(\d+)\.", r"blocks.block_\1."),
                                          (r"^(input|output)\.", r"blocks.\1."),
                                          (r"\.f\.(\d)\.", r".f_\1."))

    def _transformer(self, h, n_blocks: int, n_head: int, causal: bool):
        for i in range(n_blocks):
            h = TransformerBlock(n_head, 2 * n_blocks, causal, self.precision,
                                 name=f"block_{i}")(h)
        return h


def _check_heads(name: str, n_head: int, n_head_state: int) -> None:
    if n_head < 1 or n_head_state < 1:
        raise ValueError(f"{name}: n_head={n_head} and n_head_state={n_head_state} must be >= 1 "
                         f"(the width is n_head * n_head_state)")


class TextEncoder(_Encoder):
    """glide_text2im.clip.encoders.TextEncoder: width n_head * n_head_state.

    `__call__(tokens, text_len)`: tokens [B, max_text_len] int (CLIPTokenizer.padded_tokens_and_len:
    start, ids, end, 0 padding), text_len [B] int (start and end included) -> [B, n_embd] float32,
    the unnormalised embedding. Token and position embeddings are summed with no LayerNorm."""
    n_vocab: int
    max_text_len: int
    n_embd: int
    n_head: int
    n_xf_blocks: int
    n_head_state: int = 64
    precision: Any = None

    def __post_init__(self):
        _check_heads("TextEncoder", self.n_head, self.n_head_state)
        super().__post_init__()

    @nn.compact
    def __call__(self, tokens, text_len):
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[1] != self.max_text_len:
            raise ValueError(f"tokens must be [B, max_text_len={self.max_text_len}] ints, got shape "
                             f"{tokens.shape} (pad with CLIPTokenizer.padded_tokens_and_len)")
        width = self.n_head * self.n_head_state
        embed = _TextEmbedding(self.n_vocab, self.max_text_len, width, name="input")
        h = self._transformer(embed(tokens), self.n_xf_blocks, self.n_head, causal=True)
        last = jnp.asarray(text_len, jnp.int32) - 1
        return FeatureExtractor(self.n_embd, self.precision, name="output")(
            h[jnp.arange(h.shape[0]), last])

    def example_inputs(self, batch_size: int = 1):
        return (jnp.zeros((batch_size, self.max_text_len), jnp.int32),
                jnp.full((batch_size,), 2, jnp.int32)), {}


class _TextEmbedding(nn.Module):
    """w_voc[tokens] + w_pos. tokens [B, L] -> [B, L, width]."""
    n_vocab: int
    max_text_len: int
    width: int

    @nn.compact
    def __call__(self, tokens):
        w_voc = self.param("w_voc", nn.initializers.normal(0.02), (self.n_vocab, self.width),
                           jnp.float32)
        w_pos = self.param("w_pos", nn.initializers.normal(0.01), (self.max_text_len, self.width),
                           jnp.float32)
        return jnp.take(w_voc, tokens, axis=0) + w_pos[None]


class ImageEncoder(_Encoder):
    """glide_text2im.clip.encoders.ImageEncoder with timestep embeddings (the noised CLIP): width
    n_head * n_head_state, (image_size / patch_size)^2 + 1 tokens.

    `__call__(x, t)`: x [B, image_size, image_size, 3] on the 0..255 scale (NoisedCLIP passes
    (x_t + 1) * 127.5), t [B] int original timesteps in [0, n_timesteps) -> [B, n_embd] float32,
    the unnormalised embedding. t indexes an embedding table: it is not clamped or checked inside
    jit, so give the original (not respaced) index."""
    image_size: int
    patch_size: int
    n_embd: int
    n_head: int
    n_xf_blocks: int
    n_head_state: int = 64
    n_timesteps: int = 1000
    precision: Any = None

    def __post_init__(self):
        _check_heads("ImageEncoder", self.n_head, self.n_head_state)
        if self.patch_size < 1 or self.image_size % self.patch_size:
            raise ValueError(f"ImageEncoder: patch_size={self.patch_size} does not divide "
                             f"image_size={self.image_size}")
        if self.n_timesteps < 1:
            raise ValueError(f"ImageEncoder: n_timesteps={self.n_timesteps}: the noised CLIP embeds "
                             f"its timestep (1000 for GLIDE's); a CLIP of clean images is not "
                             f"supported")
        super().__post_init__()

    @nn.compact
    def __call__(self, x, t):
        x = jnp.asarray(x, jnp.float32)
        want = (self.image_size, self.image_size, 3)
        if x.ndim != 4 or x.shape[1:] != want:
            raise ValueError(f"x must be NHWC [B, {', '.join(map(str, want))}], got shape {x.shape}")
        t = jnp.asarray(t)
        if t.shape != x.shape[:1]:
            raise ValueError(f"t must be [B={x.shape[0]}] timesteps, got shape {t.shape}")
        width = self.n_head * self.n_head_state
        embed = _ImageEmbedding(self.image_size, self.patch_size, width, self.n_timesteps,
                                self.precision, name="input")
        h = self._transformer(embed(x, t), self.n_xf_blocks, self.n_head, causal=False)
        return FeatureExtractor(self.n_embd, self.precision, name="output")(h[:, 0])

    def example_inputs(self, batch_size: int = 1):
        return (jnp.zeros((batch_size, self.image_size, self.image_size, 3), jnp.float32),
                jnp.zeros((batch_size,), jnp.int32)), {}


class _ImageEmbedding(nn.Module):
    """LayerNorm([w_t[t]; patches((x - mean) / std)] + w_pos): the patches are a stride-p
    convolution without bias, flattened row-major. x [B, S, S, 3], t [B] -> [B, 1 + (S/p)^2, width].
    Parameters are created in the reference's registration order (w_t, patch_proj, w_pos, ln)."""
    image_size: int
    patch_size: int
    width: int
    n_timesteps: int
    precision: Any = None

    @nn.compact
    def __call__(self, x, t):
        p, n = self.patch_size, self.image_size // self.patch_size
        w_t = self.param("w_t", nn.initializers.normal(1 / math.sqrt(self.width)),
                         (self.n_timesteps, self.width), jnp.float32)
        patch_proj = self.param("patch_proj",
                                nn.initializers.normal(math.sqrt(2 / (self.width * p * p))),
                                (p, p, 3, self.width), jnp.float32)
        w_pos = self.param("w_pos", nn.initializers.normal(1 / math.sqrt(self.width)),
                           (1 + n * n, self.width), jnp.float32)
        x = (x - jnp.asarray(IMAGE_CHANNEL_MEANS, jnp.float32)) / jnp.asarray(IMAGE_CHANNEL_STDS,
                                                                              jnp.float32)
        patches = convolution.conv_general_dilated(
            x, patch_proj, (p, p), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=default_precision(jnp.float32, self.precision))
        patches = patches.reshape(x.shape[0], n * n, self.width)
        h = jnp.concatenate([jnp.take(w_t, t, axis=0)[:, None], patches], axis=1) + w_pos[None]
        return LayerNorm32(name="ln")(h)


def _normalise(z):
    """z / (||z|| + 1e-12), glide-text2im's normalisation of both embeddings. [B, E] -> [B, E]."""
    return z / (jnp.linalg.norm(z, axis=-1, keepdims=True) + 1e-12)


class NoisedCLIP(nn.Module):
    """Both encoders and the logit scale (glide_text2im.clip.model_creation.CLIPModel).

    `logit_scale` is the config value (100); the similarity is multiplied by
    exp(float32(log logit_scale)) = 100.0000076, the reference's float32 factor. `__call__(x_t, t,
    tokens, text_len)` is `similarity` with the text embedded on the fly (used by `init`)."""
    text_encoder: TextEncoder
    image_encoder: ImageEncoder
    logit_scale: float = 100.0

    def __post_init__(self):
        if self.text_encoder.n_embd != self.image_encoder.n_embd:
            raise ValueError(f"NoisedCLIP: text n_embd={self.text_encoder.n_embd} differs from "
                             f"image n_embd={self.image_encoder.n_embd}: the embeddings must share "
                             f"one space")
        super().__post_init__()

    @property
    def exp_logit_scale(self) -> np.float32:
        """exp(logit_scale parameter) as the reference computes it: the float32 exp of float32
        log(logit_scale) (correctly rounded here)."""
        return np.float32(np.exp(np.float64(np.float32(np.log(self.logit_scale)))))

    def text_embeddings(self, tokens, text_len):
        """g(c): tokens [B, max_text_len], text_len [B] -> [B, n_embd], unit norm."""
        return _normalise(self.text_encoder(tokens, text_len))

    def image_embeddings(self, x_t, t):
        """f(x_t, t): x_t [B, S, S, 3] in the sampler's scale (about [-1, 1], not clipped), t [B]
        original timesteps -> [B, n_embd], unit norm. The encoder sees (x_t + 1) * 127.5."""
        return _normalise(self.image_encoder((jnp.asarray(x_t, jnp.float32) + 1) * 127.5, t))

    def similarity(self, x_t, t, text_emb):
        """exp(logit_scale) * f(x_t, t) . g(c) per image: [B]. text_emb [B or 1, n_embd] (one
        caption broadcasts to every image)."""
        image_emb = self.image_embeddings(x_t, t)
        if text_emb.ndim != 2 or text_emb.shape[0] not in (1, image_emb.shape[0]):
            raise ValueError(f"text_emb must be [1 or B={image_emb.shape[0]}, n_embd], got shape "
                             f"{text_emb.shape}: give one caption, or one per image")
        return self.exp_logit_scale * jnp.sum(text_emb * image_emb, axis=-1)

    def __call__(self, x_t, t, tokens, text_len):
        return self.similarity(x_t, t, self.text_embeddings(tokens, text_len))

    def example_inputs(self, batch_size: int = 1):
        (x, t), _ = self.image_encoder.example_inputs(batch_size)
        (tokens, text_len), _ = self.text_encoder.example_inputs(batch_size)
        return (x, t, tokens, text_len), {}


def noised_clip(*, image_size=64, patch_size=4, n_embd=512, n_head_image=12, n_head_state_image=64,
                n_xf_blocks_image=12, n_head_text=8, n_head_state_text=64, n_xf_blocks_text=12,
                max_text_len=77, n_vocab=65536, n_timesteps=1000, logit_scale=100.0,
                precision=None) -> NoisedCLIP:
    """A NoisedCLIP from the fields of glide-text2im's clip/config.yaml; the defaults are the
    released model's (RELEASED_CONFIG)."""
    text = TextEncoder(n_vocab=n_vocab, max_text_len=max_text_len, n_embd=n_embd,
                       n_head=n_head_text, n_xf_blocks=n_xf_blocks_text,
                       n_head_state=n_head_state_text, precision=precision)
    image = ImageEncoder(image_size=image_size, patch_size=patch_size, n_embd=n_embd,
                         n_head=n_head_image, n_xf_blocks=n_xf_blocks_image,
                         n_head_state=n_head_state_image, n_timesteps=n_timesteps,
                         precision=precision)
    return NoisedCLIP(text, image, float(logit_scale))


def tokenize(tokenizer, prompts: Sequence[str], max_text_len: int):
    """Captions -> (tokens [B, max_text_len] int32, text_len [B] int32) with a CLIP tokenizer
    (`diffjax.tokenizer.CLIPTokenizer`: `encode`, `padded_tokens_and_len`), as CLIPModel's
    encode_prompts: start + ids[:max_text_len - 2] + end, 0 padding."""
    if isinstance(prompts, str):
        raise TypeError(f"prompts must be a list of captions, got the string {prompts!r}: "
                        f"wrap it in a list")
    rows = [tokenizer.padded_tokens_and_len(tokenizer.encode(p), max_text_len) for p in prompts]
    if not rows:
        raise ValueError("no prompts given: pass one caption, or one per image")
    tokens, lens = zip(*rows)
    return np.asarray(tokens, np.int32), np.asarray(lens, np.int32)


@flax.struct.dataclass
class CLIPGuidance(G.Transform):
    """Noised-CLIP guidance (GLIDE) as a guidance transform:
    g = scale * grad_x sum_b exp(logit_scale) f(x_t, t)_b . g(c)_b, a score term
    (`diffjax.core.guidance.log_density_gradient`): the samplers apply it as the classifier
    gradient (mean + Sigma g for the ancestral sampler, as glide-text2im's clip_guided notebook).

    The caption embedding, the image encoder's variables and the scale are traced (a new prompt or
    scale does not recompile a sampling loop, and the weights are not baked into it); `clip` is
    static. Build with `clip_guidance`."""
    scale: Any
    text_emb: Any          # [1 or B, n_embd], unit norm
    image_variables: Any   # {"params": {"image_encoder": ...}}
    clip: NoisedCLIP = flax.struct.field(pytree_node=False)

    def log_density(self, x, t, **model_kwargs):
        """exp(logit_scale) f(x_t, t) . g(c): [B]; t the original timesteps (GLIDE samples with
        rescale_timesteps off, so the model's t is the integer index); model_kwargs are ignored."""
        t = jnp.round(jnp.asarray(t)).astype(jnp.int32)
        return self.clip.apply(self.image_variables, x, t, self.text_emb,
                               method=NoisedCLIP.similarity)

    def score(self, c):
        return G.log_density_gradient(self.log_density, self.scale, c)


def clip_guidance(clip: NoisedCLIP, variables, prompts, scale=1.0, *, tokenizer=None) -> CLIPGuidance:
    """The guidance transform of `clip` toward `prompts`.

    prompts: a list of captions (one, broadcast to every image, or one per image; needs `tokenizer`,
    a `diffjax.tokenizer.CLIPTokenizer`) or a pair (tokens [B, max_text_len], text_len [B]).
    variables: the NoisedCLIP's {"params": {"text_encoder": ..., "image_encoder": ...}}.
    scale: glide-text2im's grad_scale (the clip_guided notebook uses 3.0; a number or a
    `guidance.ScaleFn`). The captions are embedded once, here."""
    if isinstance(prompts, tuple) and len(prompts) == 2 and not isinstance(prompts[0], str):
        tokens, text_len = prompts
    elif tokenizer is None:
        raise ValueError("clip_guidance got captions but no tokenizer: pass tokenizer="
                         "diffjax.tokenizer.load_tokenizer('<glide_text2im/tokenizer>/"
                         "bpe_simple_vocab_16e6.txt.gz'), or prompts=(tokens, text_len)")
    else:
        tokens, text_len = tokenize(tokenizer, prompts, clip.text_encoder.max_text_len)
    text_emb = clip.apply(variables, tokens, text_len, method=NoisedCLIP.text_embeddings)
    # Only the image encoder runs while sampling; the vocabulary table stays out of the loop.
    image_variables = {"params": {"image_encoder": variables["params"]["image_encoder"]}}
    return CLIPGuidance(G.as_scale(scale), text_emb, image_variables, clip)


__all__ = ["NoisedCLIP", "TextEncoder", "ImageEncoder", "CLIPGuidance", "clip_guidance",
           "noised_clip", "tokenize", "RELEASED_CONFIG", "IMAGE_CHANNEL_MEANS",
           "IMAGE_CHANNEL_STDS"]
