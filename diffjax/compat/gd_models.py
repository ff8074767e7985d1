"""guided-diffusion's model vocabulary on top of `diffjax.models`: factories and state-dict loading.

* `build(model_class, **model_kwargs)`: the reference constructors' keyword arguments
  (`guided_diffusion.unet.UNetModel / SuperResModel / EncoderUNetModel`, and improved-diffusion's,
  which are a subset).
* `create_model`, `sr_create_model`, `create_classifier`: `guided_diffusion.script_util`'s factories,
  same flag names and string formats, plus `num_classes` (the reference's module constant
  NUM_CLASSES = 1000). The `*_defaults()` dicts are the reference's.
* `load_state_dict(module, state_dict_or_path)`: PyTorch state dict -> Flax variables, strict.
* `state_dict_shapes(module)`: PyTorch key -> shape, in state_dict() order, without allocating;
  `variables_to_state_dict(module, variables)`: Flax variables -> PyTorch state dict.

`use_fp16=True` selects **bfloat16** compute (`dtype=jnp.bfloat16`) with float32 parameters and
float32 GroupNorm / softmax / embedding / output head. guided-diffusion uses float16 with dynamic loss
scaling instead; bfloat16 has float32's range, so it needs no loss scaling and is native on TPUs and
recent GPUs. It changes no parameter: the released checkpoints are float32 state dicts either way.

The key mapping lives in one place, `_param_layout`: a Flax parameter path spells the PyTorch module
path with `_` before each index (`('input_blocks_1_0', 'in_layers_2', 'kernel')` is
`input_blocks.1.0.in_layers.2.weight`), and `_LEAVES` gives the PyTorch name and axis permutation of
each parameter kind. Both directions and the shape listing are derived from it.
"""
from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp

from diffjax.io.torch_mapping import (  # noqa: F401  (the state-dict half, under GD's names)
    _param_layout, load_state_dict, state_dict_shapes, variables_to_state_dict)
from diffjax.models import EncoderUNetModel, SuperResModel, UNetModel

NUM_CLASSES = 1000

MODEL_CLASSES = {"UNetModel": UNetModel, "SuperResModel": SuperResModel,
                 "EncoderUNetModel": EncoderUNetModel}

# Constructor keywords of the reference classes (guided-diffusion; improved-diffusion's are a subset).
_UNET_KWARGS = ("image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks",
                "attention_resolutions", "dropout", "channel_mult", "conv_resample", "dims",
                "num_classes", "use_checkpoint", "use_fp16", "num_heads", "num_head_channels",
                "num_heads_upsample", "use_scale_shift_norm", "resblock_updown",
                "use_new_attention_order")
_GD_KWARGS = {
    "UNetModel": _UNET_KWARGS,
    "SuperResModel": _UNET_KWARGS,
    "EncoderUNetModel": tuple(k for k in _UNET_KWARGS if k != "num_classes") + ("pool",),
}
_DIFFJAX_KWARGS = ("dtype", "precision", "conv_algorithm", "attention_impl")  # diffjax-only extras


# --- defaults (guided_diffusion.script_util) ----------------------------------------------------

def diffusion_defaults() -> dict:
    """guided_diffusion.script_util.diffusion_defaults()."""
    return dict(learn_sigma=False, diffusion_steps=1000, noise_schedule="linear",
                timestep_respacing="", use_kl=False, predict_xstart=False,
                rescale_timesteps=False, rescale_learned_sigmas=False)


def model_and_diffusion_defaults() -> dict:
    """guided_diffusion.script_util.model_and_diffusion_defaults() (model flags + diffusion flags)."""
    return dict(image_size=64, num_channels=128, num_res_blocks=2, num_heads=4,
                num_heads_upsample=-1, num_head_channels=-1, attention_resolutions="16,8",
                channel_mult="", dropout=0.0, class_cond=False, use_checkpoint=False,
                use_scale_shift_norm=True, resblock_updown=False, use_fp16=False,
                use_new_attention_order=False, **diffusion_defaults())


def sr_model_and_diffusion_defaults() -> dict:
    """guided_diffusion.script_util.sr_model_and_diffusion_defaults()."""
    res = model_and_diffusion_defaults()
    for k in ("image_size", "channel_mult", "use_new_attention_order"):
        del res[k]
    return dict(large_size=256, small_size=64, **res)


def classifier_defaults() -> dict:
    """guided_diffusion.script_util.classifier_defaults()."""
    return dict(image_size=64, classifier_use_fp16=False, classifier_width=128,
                classifier_depth=2, classifier_attention_resolutions="32,16,8",
                classifier_use_scale_shift_norm=True, classifier_resblock_updown=True,
                classifier_pool="attention")


def classifier_and_diffusion_defaults() -> dict:
    """guided_diffusion.script_util.classifier_and_diffusion_defaults()."""
    return {**classifier_defaults(), **diffusion_defaults()}


# --- build and the factories --------------------------------------------------------------------

def build(model_class, **model_kwargs):
    """The diffjax module for a reference class and its exact constructor kwargs.

    model_class: "UNetModel", "SuperResModel" or "EncoderUNetModel" (a dotted name such as
    "guided_diffusion.unet.UNetModel" or "improved_diffusion.unet.UNetModel" is accepted).
    `dims` must be 2; `use_fp16=True` -> bfloat16 compute (module docstring). `dtype` / `precision`
    may be given directly (diffjax extras). Lists become tuples.
    """
    name = str(model_class).rsplit(".", 1)[-1]
    if name not in MODEL_CLASSES:
        raise ValueError(f"model_class={model_class!r} is not a guided-diffusion model class: choose "
                         f"from {sorted(MODEL_CLASSES)}")
    return construct(MODEL_CLASSES[name], name, _GD_KWARGS[name] + _DIFFJAX_KWARGS, model_kwargs)


def construct(cls, name: str, allowed, model_kwargs):
    """`cls(**model_kwargs)` after the reference-constructor conventions shared by every compat
    `build`: only `allowed` names, `dims` must be 2, `use_fp16=True` -> bfloat16 compute, lists
    become tuples, flag strings are refused."""
    unknown = sorted(set(model_kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"{name} has no constructor argument(s) {unknown}: valid names are "
                         f"{list(allowed)}")
    kw = dict(model_kwargs)
    dims = kw.pop("dims", 2)
    if dims != 2:
        raise ValueError(f"dims={dims!r} is not supported: diffjax's models are 2-D image models "
                         f"(NHWC); use dims=2")
    use_fp16 = bool(kw.pop("use_fp16", False))
    if use_fp16 and "dtype" not in kw:
        kw["dtype"] = jnp.bfloat16
    for key in ("attention_resolutions", "channel_mult"):
        if isinstance(kw.get(key), str):
            raise ValueError(f"{key}={kw[key]!r} is a flag string: the constructor takes a tuple, e.g. "
                             f"(1, 2, 2) (create_model / create_classifier parse flag strings)")
        if key in kw:
            kw[key] = tuple(kw[key])
    return cls(**kw)


def _check_flags(factory: str, flags: Mapping, allowed) -> None:
    unknown = sorted(set(flags) - set(allowed))
    if unknown:
        raise ValueError(f"{factory}() got unknown flag(s) {unknown}: valid flags are {sorted(set(allowed))}")


def _int_list(value, flag: str) -> list[int]:
    """'32,16,8' (GD's flag format) or a sequence of ints -> list of ints."""
    try:
        if isinstance(value, str):
            return [int(v) for v in value.split(",") if v.strip()]
        if isinstance(value, int):
            return [value]
        return [int(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"{flag}={value!r} is not a comma-separated list of ints, e.g. '32,16,8'") from None


def _default_channel_mult(image_size: int, table: Mapping[int, tuple], what: str) -> tuple:
    if image_size not in table:
        raise ValueError(f"unsupported {what}: {image_size} has no default channel_mult: choose from "
                         f"{sorted(table)} or pass channel_mult explicitly, e.g. '1,2,2,2'")
    return table[image_size]


def _attention_rates(resolutions, image_size: int, channel_mult, flag: str) -> tuple[int, ...]:
    """GD's flag parsing: resolutions ('32,16,8') -> downsample rates image_size // res, checked."""
    valid = [image_size // 2 ** i for i in range(len(channel_mult))]
    rates = []
    for res in _int_list(resolutions, flag):
        if res not in valid:
            raise ValueError(f"{flag}={res} is not a resolution of a {image_size}x{image_size} model "
                             f"with channel_mult {tuple(channel_mult)}: choose from "
                             f"{', '.join(map(str, valid))}")
        rates.append(image_size // res)
    return tuple(rates)


# create_model's channel_mult defaults: guided-diffusion's, plus improved-diffusion's 32 (CIFAR-10),
# for which guided-diffusion raises "unsupported image size".
_UNET_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4),
                      64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}
_SR_CHANNEL_MULT = {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)}
_CLASSIFIER_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4),
                            128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}

_CREATE_MODEL_DEFAULTS = dict(  # guided_diffusion.script_util.create_model's signature
    channel_mult="", learn_sigma=False, class_cond=False, use_checkpoint=False,
    attention_resolutions="16", num_heads=1, num_head_channels=-1, num_heads_upsample=-1,
    use_scale_shift_norm=False, dropout=0.0, resblock_updown=False, use_fp16=False,
    use_new_attention_order=False)
# Diffusion flags are accepted and ignored, so that a whole create_model_and_diffusion flag dict
# (or a preset's `args`) can be passed to the model factories.
_IGNORED = tuple(diffusion_defaults()) + ("sigma_small",)  # sigma_small: improved-diffusion


def create_model(image_size, num_channels, num_res_blocks, *, num_classes=NUM_CLASSES, **flags):
    """guided_diffusion.script_util.create_model -> UNetModel.

    Flags and defaults as the reference's signature (`channel_mult=""` -> per image_size default:
    512, 256, 128, 64, and improved-diffusion's 32; `attention_resolutions="16"` are resolutions);
    `num_classes` replaces the module constant NUM_CLASSES (used when class_cond). Diffusion flags
    other than learn_sigma are ignored.
    """
    _check_flags("create_model", flags, tuple(_CREATE_MODEL_DEFAULTS) + _IGNORED)
    f = {**_CREATE_MODEL_DEFAULTS, **{k: v for k, v in flags.items() if k in _CREATE_MODEL_DEFAULTS}}
    if f["channel_mult"] in ("", None, ()):
        channel_mult = _default_channel_mult(image_size, _UNET_CHANNEL_MULT, "image size")
    elif isinstance(f["channel_mult"], str):
        channel_mult = tuple(_int_list(f["channel_mult"], "channel_mult"))
    else:
        channel_mult = tuple(f["channel_mult"])
    return build(
        "UNetModel", image_size=image_size, in_channels=3, model_channels=num_channels,
        out_channels=6 if f["learn_sigma"] else 3, num_res_blocks=num_res_blocks,
        attention_resolutions=_attention_rates(f["attention_resolutions"], image_size, channel_mult,
                                               "attention_resolutions"),
        dropout=f["dropout"], channel_mult=channel_mult,
        num_classes=num_classes if f["class_cond"] else None, use_checkpoint=f["use_checkpoint"],
        use_fp16=f["use_fp16"], num_heads=f["num_heads"], num_head_channels=f["num_head_channels"],
        num_heads_upsample=f["num_heads_upsample"], use_scale_shift_norm=f["use_scale_shift_norm"],
        resblock_updown=f["resblock_updown"], use_new_attention_order=f["use_new_attention_order"])


def sr_create_model(*, num_classes=NUM_CLASSES, **flags):
    """guided_diffusion.script_util.sr_create_model -> SuperResModel.

    All flags are keywords with sr_model_and_diffusion_defaults() as defaults (large_size=256,
    small_size=64); channel_mult depends on large_size only (512, 256: (1,1,2,2,4,4); 64:
    (1,2,3,4)); attention_resolutions are relative to large_size.
    """
    defaults = {k: v for k, v in sr_model_and_diffusion_defaults().items() if k not in _IGNORED}
    defaults["learn_sigma"] = False
    _check_flags("sr_create_model", flags, tuple(defaults) + _IGNORED)
    f = {**defaults, **{k: v for k, v in flags.items() if k in defaults}}
    large = f["large_size"]
    channel_mult = _default_channel_mult(large, _SR_CHANNEL_MULT, "large size")
    return build(
        "SuperResModel", image_size=large, in_channels=3, model_channels=f["num_channels"],
        out_channels=6 if f["learn_sigma"] else 3, num_res_blocks=f["num_res_blocks"],
        attention_resolutions=_attention_rates(f["attention_resolutions"], large, channel_mult,
                                               "attention_resolutions"),
        dropout=f["dropout"], channel_mult=channel_mult,
        num_classes=num_classes if f["class_cond"] else None, use_checkpoint=f["use_checkpoint"],
        num_heads=f["num_heads"], num_head_channels=f["num_head_channels"],
        num_heads_upsample=f["num_heads_upsample"], use_scale_shift_norm=f["use_scale_shift_norm"],
        resblock_updown=f["resblock_updown"], use_fp16=f["use_fp16"])


def create_classifier(*, num_classes=NUM_CLASSES, **flags):
    """guided_diffusion.script_util.create_classifier -> EncoderUNetModel.

    Flags `image_size, classifier_use_fp16, classifier_width, classifier_depth,
    classifier_attention_resolutions, classifier_use_scale_shift_norm, classifier_resblock_updown,
    classifier_pool` with classifier_defaults() as defaults; `num_classes` replaces the reference's
    hard-coded 1000; heads are 64 channels wide (num_head_channels=64), as the reference.
    """
    defaults = classifier_defaults()
    _check_flags("create_classifier", flags, tuple(defaults) + _IGNORED)
    f = {**defaults, **{k: v for k, v in flags.items() if k in defaults}}
    size = f["image_size"]
    channel_mult = _default_channel_mult(size, _CLASSIFIER_CHANNEL_MULT, "image size")
    return build(
        "EncoderUNetModel", image_size=size, in_channels=3, model_channels=f["classifier_width"],
        out_channels=num_classes, num_res_blocks=f["classifier_depth"],
        attention_resolutions=_attention_rates(f["classifier_attention_resolutions"], size,
                                               channel_mult, "classifier_attention_resolutions"),
        channel_mult=channel_mult, use_fp16=f["classifier_use_fp16"], num_head_channels=64,
        use_scale_shift_norm=f["classifier_use_scale_shift_norm"],
        resblock_updown=f["classifier_resblock_updown"], pool=f["classifier_pool"])


__all__ = [
    "NUM_CLASSES", "MODEL_CLASSES", "build", "create_model", "sr_create_model", "create_classifier",
    "diffusion_defaults", "model_and_diffusion_defaults", "sr_model_and_diffusion_defaults",
    "classifier_defaults", "classifier_and_diffusion_defaults",
    "load_state_dict", "state_dict_shapes", "variables_to_state_dict",
]
