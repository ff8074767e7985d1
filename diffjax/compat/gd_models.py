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

import os
import re
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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
_DIFFJAX_KWARGS = ("dtype", "precision")  # diffjax-only extras


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


# --- the state-dict mapping (the one place) -----------------------------------------------------

# (Flax leaf name, ndim) -> (PyTorch leaf name, permutation taking the Flax array to PyTorch's).
_LEAVES = {
    ("kernel", 4): ("weight", (3, 2, 0, 1)),   # Conv2d: HWIO -> OIHW
    ("kernel", 3): ("weight", (2, 1, 0)),      # 1x1 Conv1d (qkv, proj_out, ...): [1, I, O] -> [O, I, 1]
    ("kernel", 2): ("weight", (1, 0)),         # Linear: [in, out] -> [out, in]
    ("bias", 1): ("bias", (0,)),
    ("scale", 1): ("weight", (0,)),            # GroupNorm
    ("embedding", 2): ("weight", (0, 1)),      # nn.Embedding, same layout
    ("positional_embedding", 2): ("positional_embedding", (0, 1)),  # AttentionPool2d [C, HW+1]
    ("padding_embedding", 2): ("padding_embedding", (0, 1)),        # GLIDE text [ctx, width]
}


class _Param(NamedTuple):
    key: str                    # PyTorch state-dict key
    path: tuple[str, ...]       # path in variables["params"]
    perm: tuple[int, ...]       # Flax -> PyTorch axes
    torch_shape: tuple[int, ...]


def _torch_key(path: tuple[str, ...], leaf_shape: tuple[int, ...],
               leaves: Mapping = _LEAVES) -> tuple[str, tuple[int, ...]]:
    name, perm = leaves[(path[-1], len(leaf_shape))]
    modules = [re.sub(r"_(\d+)", r".\1", p) for p in path[:-1]]
    return ".".join(modules + [name]), perm


def _param_layout(module) -> list[_Param]:
    """Every parameter of `module`, in PyTorch state_dict() order, from an abstract init.

    The modules create their parameters in PyTorch's registration order, and Flax keeps creation
    order inside `init` (jax.eval_shape's output would be key-sorted, so the order is read while
    tracing). Rematerialisation does not change parameters, so it is switched off here.
    """
    if not hasattr(module, "example_inputs"):
        raise ValueError(f"expected a diffjax UNetModel / SuperResModel / EncoderUNetModel (or a "
                         f"GLIDE model or noised-CLIP encoder), got "
                         f"{type(module).__name__}")
    no_remat = {"use_checkpoint": False} if hasattr(module, "use_checkpoint") else {}
    plain = module.clone(parent=None, **no_remat)
    args, kwargs = plain.example_inputs(1)
    # Models whose parameters are not named as the ADM ones (glide's CLIP: Affine `w`, LayerNorm
    # `g`) give their own (leaf name, ndim) entries on top of _LEAVES.
    leaves = {**_LEAVES, **getattr(plain, "torch_leaves", {})}
    layout: list[_Param] = []

    def walk(tree, path):
        for k, v in tree.items():
            if isinstance(v, Mapping):
                walk(v, path + (k,))
            else:
                key, perm = _torch_key(path + (k,), v.shape, leaves)
                layout.append(_Param(key, path + (k,), perm, tuple(v.shape[i] for i in perm)))

    def init():
        variables = plain.init(jax.random.key(0), *args, **kwargs)
        walk(variables["params"], ())
        return variables

    jax.eval_shape(init)
    # Models whose PyTorch names the `_<index>` rule cannot spell (GLIDE's `ln_1`) list regex
    # renames; models whose state_dict() order differs from Flax's creation order give a sort key.
    renames = getattr(plain, "torch_key_renames", ())
    if renames:
        def rename(key):
            for pattern, repl in renames:
                key = re.sub(pattern, repl, key)
            return key
        layout = [p._replace(key=rename(p.key)) for p in layout]
    rank = getattr(plain, "torch_key_rank", None)
    if rank is not None:
        layout = sorted(layout, key=lambda p: rank(p.key))  # stable: ties keep creation order
    return layout


def state_dict_shapes(module) -> dict[str, tuple[int, ...]]:
    """PyTorch key -> PyTorch shape for every parameter, in state_dict() order. Allocates nothing."""
    return {p.key: p.torch_shape for p in _param_layout(module)}


def _shape_str(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, if the caller has torch
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def load_state_dict(module, state_dict_or_path, *, dtype=jnp.float32) -> dict:
    """PyTorch state dict (mapping key -> array, or a .pt path) -> Flax variables {"params": ...}.

    Strict: missing keys, unexpected keys and shape mismatches are collected and raised together in
    one ValueError. Each value of the mapping is read exactly once and converted right away, so a
    lazy mapping that loads tensors on access keeps peak memory near one copy of the weights.
    Parameters are cast to `dtype` (float32 unless asked otherwise). A path is streamed through
    `diffjax.checkpoints.torch_pt.open_pt` (no torch, no pickled code executed, one tensor in
    memory at a time besides the result).
    """
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        from diffjax.checkpoints.torch_pt import open_pt

        with open_pt(state_dict_or_path) as lazy:
            return load_state_dict(module, lazy, dtype=dtype)
    state_dict = state_dict_or_path
    layout = _param_layout(module)
    expected = {p.key for p in layout}
    given = list(state_dict.keys())
    given_set = set(given)
    unexpected = [k for k in given if k not in expected]
    missing, mismatched = [], []
    params: dict[str, Any] = {}
    for p in layout:
        if p.key not in given_set:
            missing.append(f"{p.key} {_shape_str(p.torch_shape)}")
            continue
        array = _to_numpy(state_dict[p.key])
        if tuple(array.shape) != p.torch_shape:
            mismatched.append(f"{p.key}: checkpoint {_shape_str(array.shape)}, model "
                              f"{_shape_str(p.torch_shape)}")
            continue
        node = params
        for name in p.path[:-1]:
            node = node.setdefault(name, {})
        # jnp.array copies: the result never aliases the reader's buffers.
        node[p.path[-1]] = jnp.array(np.transpose(array, np.argsort(p.perm)), dtype=dtype)
        del array
    if missing or unexpected or mismatched:
        lines = [f"state dict does not match {type(module).__name__}: {len(missing)} missing, "
                 f"{len(unexpected)} unexpected, {len(mismatched)} mis-shaped tensor(s) (check the "
                 f"model flags: they must be those the checkpoint was trained with)"]
        lines += [f"  missing: {m}" for m in missing]
        lines += [f"  unexpected: {u}" for u in unexpected]
        lines += [f"  shape mismatch: {s}" for s in mismatched]
        raise ValueError("\n".join(lines))
    return {"params": params}


def variables_to_state_dict(module, variables) -> dict[str, np.ndarray]:
    """Flax variables (or their "params") -> PyTorch state dict: numpy arrays in PyTorch layout
    (OIHW convs, [out, in] linears) and state_dict() order, in the parameters' dtype."""
    params = variables["params"] if "params" in variables else variables
    out = {}
    for p in _param_layout(module):
        node = params
        for name in p.path:
            node = node[name]
        out[p.key] = np.ascontiguousarray(np.transpose(np.asarray(node), p.perm))
    return out


__all__ = [
    "NUM_CLASSES", "MODEL_CLASSES", "build", "create_model", "sr_create_model", "create_classifier",
    "diffusion_defaults", "model_and_diffusion_defaults", "sr_model_and_diffusion_defaults",
    "classifier_defaults", "classifier_and_diffusion_defaults",
    "load_state_dict", "state_dict_shapes", "variables_to_state_dict",
]
