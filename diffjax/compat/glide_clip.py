"""glide-text2im's noised CLIP (`glide_text2im.clip`) in its own vocabulary, on top of
`diffjax.models.clip` (see ../shared/design/compat_guided_diffusion.md, "GLIDE noised CLIP").

* `create_clip_model(clip_config=None, tokenizer=None)`: a `CLIPModel` for the fields of
  glide-text2im's clip/config.yaml (None: the released model's).
* `load_clip_state_dict(clip, text_sd_or_path, image_sd_or_path) -> variables`: the layouts of
  `clip_text_enc.pt` / `clip_image_enc.pt` (keys without the `text_encoder.` / `image_encoder.`
  prefixes), strict, through diffjax's torch-free .pt reader.
* `clip.text_embeddings(variables, prompts)`, `clip.image_embeddings(variables, x_t, t)`,
  `clip.cond_fn(variables, prompts, grad_scale) -> fn(x_t, t, **kwargs)`: CLIPModel's methods with
  the variables explicit; images NHWC, t the original (not respaced) timesteps.
* `clip_tokenizer(path=None)`: CLIP's SimpleTokenizer (`encode`, `padded_tokens_and_len`).

cond_fn is `diffjax.models.clip.clip_guidance(...).grad`: the transform diffjax's samplers take.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import Any, Mapping

import jax
import numpy as np

from diffjax import tokenizer as T
from diffjax.compat import gd_models
from diffjax.models import clip as C

CLIP_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
RELEASED_CONFIG = dict(C.RELEASED_CONFIG, beta_schedule="squaredcos_cap_v2")


@functools.lru_cache(maxsize=4)
def _load_clip_tokenizer(path: pathlib.Path) -> T.CLIPTokenizer:
    return T.CLIPTokenizer.from_file(path)


def clip_tokenizer(path=None) -> T.CLIPTokenizer:
    """glide_text2im.tokenizer.simple_tokenizer.SimpleTokenizer (cached per file): `encode(text)`
    -> ids without start / end tokens, `padded_tokens_and_len(ids, text_ctx)` -> (tokens, length).

    path: bpe_simple_vocab_16e6.txt(.gz), or the folder holding it; None: the installed
    glide-text2im's (glide_text2im/tokenizer/)."""
    path = pathlib.Path(path) if path is not None else T.glide_tokenizer_dir()
    if path.is_dir():
        path = path / CLIP_VOCAB_FILE
    return _load_clip_tokenizer(path.resolve())


@functools.partial(jax.jit, static_argnames=("module", "method"))
def _apply(variables, *args, module, method):
    return module.apply(variables, *args, method=method)


@jax.jit
def _guidance_grad(transform, x, t):
    return transform.grad(x, t, {})


@dataclasses.dataclass(frozen=True, eq=False)
class CLIPModel:
    """glide_text2im.clip.model_creation.CLIPModel with explicit variables. `module` is the Flax
    `diffjax.models.clip.NoisedCLIP`; `text_encoder` / `image_encoder` its two encoders (what
    `load_clip_state_dict` maps the two .pt files onto)."""

    config: Mapping[str, Any]
    module: C.NoisedCLIP
    tokenizer: Any = None  # a CLIPTokenizer; None: clip_tokenizer() when first needed

    @property
    def text_encoder(self) -> C.TextEncoder:
        return self.module.text_encoder

    @property
    def image_encoder(self) -> C.ImageEncoder:
        return self.module.image_encoder

    def encode_prompts(self, prompts):
        """-> (tokens [B, max_text_len] int32, text_len [B] int32), as CLIPModel.encode_prompts."""
        tokenizer = self.tokenizer if self.tokenizer is not None else clip_tokenizer()
        return C.tokenize(tokenizer, prompts, self.text_encoder.max_text_len)

    def text_embeddings(self, variables, prompts):
        """[B, n_embd] unit-norm caption embeddings."""
        return _apply(variables, *self.encode_prompts(prompts), module=self.module,
                      method="text_embeddings")

    def image_embeddings(self, variables, x_t, t):
        """x_t [B, S, S, 3] (NHWC, as the sampler has it), t [B] original timesteps -> [B, n_embd]
        unit-norm image embeddings."""
        return _apply(variables, x_t, np.asarray(t, np.int32), module=self.module,
                      method="image_embeddings")

    def cond_fn(self, variables, prompts, grad_scale):
        """glide-text2im's cond_fn: `fn(x_t, t, grad_scale=grad_scale, **kwargs)` ->
        grad_x [exp(logit_scale) * sum(text_emb * image_emb(x_t, t))] * grad_scale, [B, S, S, 3].
        The prompts are embedded once, here; kwargs (the diffusion model's tokens / mask) are
        ignored. t must be the original timestep: a respaced sampler maps its index through its
        timestep_map first (glide's SpacedDiffusion does; diffjax's samplers do)."""
        guidance = C.clip_guidance(self.module, variables, self.encode_prompts(prompts), grad_scale)

        def cond_fn(x, t, grad_scale=grad_scale, **kwargs):
            transform = guidance.replace(scale=np.float32(grad_scale))
            return _guidance_grad(transform, x, np.asarray(t, np.int32))

        return cond_fn


def create_clip_model(clip_config: Mapping | None = None, tokenizer=None) -> CLIPModel:
    """glide_text2im.clip.model_creation.create_clip_model for a config dict (the contents of
    clip/config.yaml; missing fields take the released model's values, unknown ones are refused).
    `beta_schedule` is kept in `.config` only, as the reference does. tokenizer: a CLIPTokenizer,
    a path for `clip_tokenizer`, or None (the installed glide-text2im's, loaded when needed)."""
    config = dict(RELEASED_CONFIG)
    given = dict(clip_config or {})
    unknown = sorted(set(given) - set(config))
    if unknown:
        raise ValueError(f"create_clip_model: unknown clip_config field(s) {unknown}: the fields "
                         f"of glide-text2im's clip/config.yaml are {sorted(config)}")
    config.update(given)
    module = C.noised_clip(**{k: v for k, v in config.items() if k != "beta_schedule"})
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = clip_tokenizer(tokenizer)
    return CLIPModel(config, module, tokenizer)


def load_clip_state_dict(clip: CLIPModel, text_state_dict_or_path,
                         image_state_dict_or_path) -> dict:
    """clip_text_enc.pt and clip_image_enc.pt (state dicts or paths) -> NoisedCLIP variables
    {"params": {"text_encoder": ..., "image_encoder": ...}}. Strict per encoder: missing,
    unexpected or mis-shaped tensors are named in one ValueError."""
    module = clip.module if isinstance(clip, CLIPModel) else clip
    text = gd_models.load_state_dict(module.text_encoder, text_state_dict_or_path)
    image = gd_models.load_state_dict(module.image_encoder, image_state_dict_or_path)
    return {"params": {"text_encoder": text["params"], "image_encoder": image["params"]}}


__all__ = ["CLIPModel", "create_clip_model", "load_clip_state_dict", "clip_tokenizer",
           "RELEASED_CONFIG", "CLIP_VOCAB_FILE"]
