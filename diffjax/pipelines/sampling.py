"""`diffjax.sample`: a `DiffusionModel` -> images, with every pipeline of the OpenAI line.

    images = diffjax.sample(model, jax.random.PRNGKey(0), 16, labels=3, guidance_scale=3.0)

One call covers class-conditional sampling with classifier guidance (ADM-G: `classifier=`),
classifier-free guidance (`guidance_scale`: labels dropped to the null label, or GLIDE's empty
caption), GLIDE text -> 64 px -> 256 px (`prompts=`, `upsampler=`), ADM super-resolution (ADM-G + U:
`upsampler=` a super-resolution bundle, or `low_res=` given to one), inpainting by replacement with
RePaint's resampling (`image=`, `mask=`; an inpainting model also sees them), ILVR (`reference=`,
`down_factor=`), GLIDE's CLIP guidance (`clip=`), autoguidance by a weaker bundle (`autoguidance=`)
and any further guidance transform (`guidance=`; docs/guidance.md). The loop is one jit-compiled
`lax.scan` per shape (diffjax.core.samplers.sample): scales, eta, labels, masks and weights are
traced, so changing them never recompiles. Images come back as uint8 [N, H, W, C].
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffjax import images as images_lib
from diffjax import tokenizer as tokenizer_lib
from diffjax.bundle import DiffusionModel
from diffjax.conditioning import ClassLabel
from diffjax.core import guidance as G
from diffjax.core import guidance_methods as GM
from diffjax.core import samplers as SM
from diffjax.core.timegrid import TimeGrid
from diffjax.models import clip as clip_lib

DEFAULT_SAMPLER = "ddim"


@dataclasses.dataclass(frozen=True)
class _Network:
    """The denoiser as the sampler calls it: module.apply(variables, x, t, **kwargs) with only
    the keyword arguments the network takes (guidance may carry others, e.g. classifier labels).
    Hashable, so jit treats it as one static function per module."""

    module: Any
    inputs: tuple

    def __call__(self, variables, x, t, **kwargs):
        return self.module.apply(variables, x, t, **{k: kwargs[k] for k in self.inputs})


@flax.struct.dataclass
class ClassifierGuidance(G.Transform):
    """Classifier guidance (Dhariwal & Nichol 2021, Alg. 1-2) by a noisy-classifier bundle:
    g = scale * grad_x log softmax(classifier(x_t, t))[labels], t the guided model's original
    timestep (as guided-diffusion's classifier_sample). The classifier's weights and the labels
    are traced."""

    scale: Any
    variables: Any
    labels: Any
    module: Any = flax.struct.field(pytree_node=False)

    def log_prob(self, x, t, **model_kwargs):
        logits = self.module.apply(self.variables, x, t).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return jnp.take_along_axis(logp, self.labels[:, None], axis=-1)[:, 0]

    def score(self, c):
        return G.log_density_gradient(self.log_prob, self.scale, c)


def _request_batch(value, start: int, stop: int, n: int):
    """Rows [start, stop) of a per-sample request value ([n, ...]); a single value or one row is
    shared by every sample."""
    if value is None or isinstance(value, (str, int, float)):
        return value
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
        return list(value[start:stop]) if len(value) == n and n > 1 else list(value)
    array = np.asarray(value)
    if array.ndim >= 1 and array.shape[0] == n and n > 1:
        return array[start:stop]
    return array


def _num_samples(num_samples, request: dict) -> int:
    if num_samples is not None:
        if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
            raise ValueError(f"num_samples={num_samples!r} must be a positive integer")
        return int(num_samples)
    sizes = [len(v) for v in request.values()
             if isinstance(v, (list, tuple, np.ndarray)) and np.ndim(v) >= 1]
    return max(sizes, default=1)


def _check_scale(name: str, value):
    if value is None:
        return None
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name}={value} must be a finite number")
    return value


def sample(
    model: DiffusionModel,
    key,
    num_samples: int | None = None,
    *,
    sampler: str | SM.Sampler | None = None,
    steps: int | str | TimeGrid | None = None,
    guidance_scale: float | None = None,
    guidance: G.Transform | Callable | None = None,
    labels=None,
    prompts: str | Sequence[str] | None = None,
    tokenizer: str | None = None,
    low_res=None,
    image=None,
    mask=None,
    jump_length: int = 1,
    resample_count: int = 1,
    reference=None,
    down_factor: int = 4,
    classifier: DiffusionModel | None = None,
    classifier_scale: float | None = None,
    clip=None,
    clip_scale: float | None = None,
    clip_tokenizer=None,
    autoguidance: DiffusionModel | None = None,
    autoguidance_scale: float | None = None,
    eta: float = 0.0,
    clip_denoised: bool | None = None,
    noise_scale: float | None = None,
    batch_size: int | None = None,
    upsampler: DiffusionModel | None = None,
    upsampler_steps: int | str | TimeGrid | None = None,
    progress: bool = False,
    return_info: bool = False,
):
    """Draw `num_samples` images from `model`; returns uint8 [N, H, W, C] (C kept for 1-channel
    models), or with return_info (images, {"labels": [N] or None, "base": the images before
    the upsampler or None}).

    sampler: "ddpm" | "ddim" | "dpm++2m" | "heun" | ... or an instance (default: the model's, else
        "ddim"); eta: DDIM's eta. steps: the time grid, a step count, a respacing string ("ddim25",
        "250") or a TimeGrid (default: the model's, else every step).
    guidance_scale: classifier-free guidance (1 = the conditional model, 0 the unconditional one);
        needs a model trained with conditioning dropout (default: the model's, else none).
    labels: an int or [N] class labels (default random); prompts: a caption or [N] captions
        (GLIDE); tokenizer: its vocabulary folder if the model does not know it; low_res:
        [N, h, w, C] images a super-resolution model upsamples.
    image, mask: inpainting: the known image [N or 1, H, W, C] (uint8, or float in [-1, 1]) and a
        mask [N or 1, H, W, 1] (1 = keep), resized to the model; every x0 prediction keeps the
        known pixels; jump_length / resample_count > 1: RePaint's resampling.
    reference, down_factor: ILVR (Choi et al. 2021) towards reference images [N or 1, H, W, C].
    classifier, classifier_scale: classifier guidance by a noisy-classifier bundle (labels are
        its targets; an unconditional model is guided towards random ones, as ADM-G).
    clip, clip_scale: GLIDE's CLIP guidance (Nichol et al. 2021) of a text model toward its
        prompts: clip = (NoisedCLIP module, its variables), clip_scale its grad_scale (the
        clip_guided notebook's 3.0); clip_tokenizer: a CLIPTokenizer or its
        bpe_simple_vocab_16e6.txt.gz (default: the installed glide-text2im's).
    autoguidance, autoguidance_scale: autoguidance (Karras et al. 2024) by a weaker bundle of the
        same kind (same diffusion, prediction and conditioning): D = D_weak + w (D - D_weak).
    guidance: any further transform (`diffjax.core.guidance`, `guidance_methods`), chained after
        these; or a function of the unconditional model_kwargs returning one, for the
        classifier-free family: `guidance=lambda null: GM.cfg_plus_plus(0.6, null)`.
    upsampler: a super-resolution bundle run on the samples (GLIDE's 64 -> 256, ADM-U), with the
        same labels / prompts; upsampler_steps its grid (default its own).
    batch_size: images per compiled call (default all); noise_scale: x_T = noise_scale N(0, I).
    """
    if not isinstance(model, DiffusionModel) or model.kind != "diffusion":
        raise ValueError(f"diffjax.sample needs a diffusion DiffusionModel (diffjax.load(...)), "
                         f"got {type(model).__name__}"
                         f"{'' if not isinstance(model, DiffusionModel) else ' of kind ' + model.kind}")
    request = {k: v for k, v in dict(labels=labels, prompts=prompts, tokenizer=tokenizer,
                                     low_res=low_res, image=image, mask=mask).items()
               if v is not None}
    if isinstance(request.get("prompts"), str):
        request["prompts"] = [request["prompts"]]
    n = _num_samples(num_samples, {k: v for k, v in request.items() if k != "tokenizer"})
    defaults = model.sampling
    # A saved default scale applies only where it can: a model trained without conditioning
    # dropout has no unconditional branch (an explicit scale is still refused, by null_kwargs).
    default_scale = defaults.get("guidance_scale") if model.conditioning.droppable else None
    scale = _check_scale("guidance_scale", guidance_scale if guidance_scale is not None
                         else default_scale)
    clf_scale = _check_scale("classifier_scale", classifier_scale if classifier_scale is not None
                             else defaults.get("classifier_scale", 1.0))
    eta = _check_scale("eta", eta)
    sampler = sampler or defaults.get("sampler") or DEFAULT_SAMPLER
    if isinstance(sampler, str):
        sampler = SM.get_sampler(sampler, **({"eta": eta} if sampler == "ddim" else {}))
    elif eta:
        raise ValueError("eta= applies to the 'ddim' sampler by name; pass samplers.DDIM(eta=...)")
    schedule = model.spec.schedule(steps if steps is not None else defaults.get("grid"))
    clip_x0 = defaults.get("clip_denoised", True) if clip_denoised is None else clip_denoised
    noise = noise_scale if noise_scale is not None else defaults.get("noise_scale", 1.0)
    batch = n if batch_size is None else batch_size
    if batch < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    module, variables = model.module, model.variables()
    shape_hw = model.image_shape
    clip_scale = _check_scale("clip_scale", clip_scale if clip_scale is not None else 3.0)
    clip_tokenizer = _clip_tokenizer(clip, clip_tokenizer)
    ag_scale = _autoguidance_scale(model, autoguidance, autoguidance_scale)
    out, out_labels = [], []
    start = time.perf_counter()
    for i, first in enumerate(range(0, n, batch)):
        b = min(batch, n - first)
        k_cond, k_sample = jax.random.split(jax.random.fold_in(key, i))
        part = {k: _request_batch(v, first, first + b, n) for k, v in request.items()}
        transforms = []
        if "image" in part or "mask" in part:  # first: it resizes them for the network too
            transforms.append(_inpainting(part, b, shape_hw, jump_length, resample_count))
        kwargs = model.conditioning.sampling_kwargs(part, b, k_cond, (module, variables))
        if scale is not None:
            transforms.append(G.classifier_free(
                scale, model.conditioning.null_kwargs((module, variables), part),
                mean_channels=shape_hw[-1]))
        batch_labels = kwargs.get("y")
        if classifier is not None:
            if batch_labels is None:
                classes = classifier.network["out_channels"]
                batch_labels = ClassLabel(classes).labels(part, b, k_cond)
            transforms.append(ClassifierGuidance(jnp.asarray(clf_scale, jnp.float32),
                                                 classifier.variables(),
                                                 jnp.asarray(batch_labels, jnp.int32),
                                                 classifier.module))
        if reference is not None:
            ref = images_lib.resize(_request_batch(reference, first, first + b, n), shape_hw[0])
            transforms.append(G.ilvr(jnp.broadcast_to(ref, (b,) + ref.shape[1:]), down_factor))
        if clip is not None:
            transforms.append(_clip_guidance(clip, part, clip_scale, clip_tokenizer))
        if autoguidance is not None:
            if "text_emb" in kwargs:
                raise ValueError("autoguidance= with a text model: the weak model would need its own "
                                 "caption embedding; use guidance_methods.autoguidance directly")
            weak = (_Network(autoguidance.module, tuple(sorted(kwargs))), autoguidance.variables())
            transforms.append(GM.autoguidance(weak, ag_scale, mean_channels=shape_hw[-1]))
        if callable(guidance) and not isinstance(guidance, G.Transform):
            transforms.append(guidance(model.conditioning.null_kwargs((module, variables), part)))
        elif guidance is not None:
            transforms.append(guidance)
        x = SM.sample(k_sample, (_Network(module, tuple(sorted(kwargs))), variables), schedule,
                      (b,) + shape_hw, sampler=sampler, guidance=G.chain(*transforms),
                      config=model.spec.config, model_kwargs=kwargs, clip_denoised=clip_x0,
                      noise_scale=noise, progress=progress)
        out.append(images_lib.to_uint8(x))
        if batch_labels is not None:
            out_labels.append(np.asarray(batch_labels))
        if progress and n > batch:
            print(f"batch {i + 1}: {first + b} of {n} samples, {time.perf_counter() - start:.1f} s",
                  file=sys.stderr, flush=True)
    images = np.concatenate(out)
    labels_out = np.concatenate(out_labels) if out_labels else None
    base = None
    if upsampler is not None:
        base = images
        up_request = {k: v for k, v in request.items() if k in ("prompts", "tokenizer")}
        if labels_out is not None and upsampler.conditioning.get(ClassLabel) is not None:
            up_request["labels"] = labels_out
        images = sample(upsampler, jax.random.fold_in(key, n + 1), n, low_res=images,
                        steps=upsampler_steps, batch_size=batch_size, progress=progress,
                        image=_upsampled_inpaint(image, upsampler),
                        mask=_upsampled_mask(mask, model, upsampler),
                        **up_request)
    return (images, {"labels": labels_out, "base": base}) if return_info else images


def _clip_tokenizer(clip, tokenizer):
    """The CLIP tokenizer of clip=: given, a path, or the installed glide-text2im's vocabulary."""
    if clip is None or isinstance(tokenizer, tokenizer_lib.CLIPTokenizer):
        return tokenizer
    if not (isinstance(clip, tuple) and len(clip) == 2 and isinstance(clip[0], clip_lib.NoisedCLIP)):
        raise ValueError(f"clip= takes (NoisedCLIP module, variables), got {type(clip).__name__}: "
                         "e.g. compat.glide_clip.create_clip_model() and load_clip_state_dict")
    path = tokenizer if tokenizer is not None else (
        tokenizer_lib.glide_tokenizer_dir() / "bpe_simple_vocab_16e6.txt.gz")
    loaded = tokenizer_lib.load_tokenizer(path)
    if not isinstance(loaded, tokenizer_lib.CLIPTokenizer):
        raise ValueError(f"clip_tokenizer={tokenizer!r} is not CLIP's bpe_simple_vocab*.txt(.gz)")
    return loaded


def _clip_guidance(clip, part: dict, scale, tokenizer):
    """GLIDE's CLIP guidance toward the request's prompts."""
    if "prompts" not in part:
        raise ValueError("clip= guides toward captions: pass prompts=")
    module, clip_variables = clip
    return clip_lib.clip_guidance(module, clip_variables, list(part["prompts"]), scale,
                                  tokenizer=tokenizer)


def _autoguidance_scale(model: DiffusionModel, weak: DiffusionModel | None, scale):
    """autoguidance_scale, with the weak bundle checked against the main one."""
    if weak is None:
        if scale is not None:
            raise ValueError("autoguidance_scale= needs autoguidance= (the weak model)")
        return None
    if scale is None:
        raise ValueError("autoguidance= needs autoguidance_scale= (w; 1 is the main model alone)")
    if not isinstance(weak, DiffusionModel) or weak.kind != "diffusion":
        raise ValueError(f"autoguidance= takes a diffusion DiffusionModel, got {type(weak).__name__}")
    mine, theirs = model.spec, weak.spec
    same = (weak.image_shape == model.image_shape and theirs.prediction == mine.prediction
            and theirs.rescale_timesteps == mine.rescale_timesteps
            and np.allclose(theirs.training_betas(), mine.training_betas())
            and weak.conditioning.inputs == model.conditioning.inputs)
    if not same:
        raise ValueError(f"autoguidance= needs a weak model of the same kind as the main one (image "
                         f"shape, training chain, prediction, timesteps, conditioning): main "
                         f"{model.describe()}, weak {weak.describe()}")
    return _check_scale("autoguidance_scale", scale)


def _inpainting(part: dict, batch: int, shape_hw, jump_length, resample_count) -> G.Inpaint:
    """The replacement transform of an inpainting request, resized to the model."""
    if "image" not in part or "mask" not in part:
        raise ValueError("inpainting needs both image= and mask= (mask 1 = keep)")
    size = shape_hw[0]
    known = images_lib.resize(part["image"], size)
    mask = jnp.asarray(images_lib.resize_mask(part["mask"], size))
    known = jnp.broadcast_to(known, (batch,) + known.shape[1:])
    mask = jnp.broadcast_to(mask, (batch,) + mask.shape[1:])
    part["image"], part["mask"] = known, mask  # what an inpainting network sees, too
    # Replacement on x_t as well only with resampling (RePaint); GLIDE's notebook uses x0 only.
    return G.inpaint(mask, known, on_x0=True, on_xt=resample_count > 1, jump_length=jump_length,
                     resample_count=resample_count)


def _upsampled_inpaint(image, upsampler):
    return None if image is None else images_lib.resize(image, upsampler.image_shape[0])


def _upsampled_mask(mask, base, upsampler):
    """The base-size mask upsampled with nearest (GLIDE's notebook gives the mask at 64 px)."""
    if mask is None:
        return None
    base_mask = images_lib.resize_mask(mask, base.image_shape[0])
    return images_lib.resize_mask(base_mask, upsampler.image_shape[0])
