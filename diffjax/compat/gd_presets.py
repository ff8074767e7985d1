"""Presets for OpenAI's released diffusion checkpoints (guided-diffusion and improved-diffusion).

One preset per released `.pt` file. Each is the README's own flag string, parsed the way that
repository's sampling script parses it (same defaults), then split into

* `model`: the keyword arguments of guided-diffusion's factory named by `factory`
  (`create_model`, `sr_create_model` or `create_classifier`; improved-diffusion's models are built
  by guided-diffusion's factories with the same flags, which give the same state-dict layout),
  plus `model_class` and `num_classes`;
* `diffusion`: the diffusion flags (`learn_sigma, diffusion_steps, noise_schedule,
  timestep_respacing, use_kl, predict_xstart, rescale_timesteps, rescale_learned_sigmas,
  sigma_small`), as create_model_and_diffusion takes them (`diffusion_kwargs` renames them for
  create_gaussian_diffusion);
* `sampling`: the sampling script's remaining flags (batch size, classifier scale, paths).

Use with ml_collections: `--config configs/pretrained.py:64x64_diffusion` (that file re-exports
this module's `get_config`), or `get_config("64x64_diffusion")`. `parse_flags` / `config_from_flags` accept any GD / ID flag
string ("--attention_resolutions 32,16,8 --class_cond True ...").
"""

from __future__ import annotations

import difflib
import shlex

import ml_collections

from diffjax.compat import gd_models

GD, ID = "guided-diffusion", "improved-diffusion"
_URL = "https://openaipublic.blob.core.windows.net/diffusion/"

# name -> (family, sampling script, kind, URL below _URL, the README's flags verbatim:
# MODEL_FLAGS, DIFFUSION_FLAGS and SAMPLE_FLAGS, then the command's own flags).
_GD_256 = (
    "--attention_resolutions 32,16,8 --class_cond {cond} --diffusion_steps 1000 {dropout}--image_size 256 "
    "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
    "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True "
    "--batch_size 4 --num_samples 100 --timestep_respacing 250"
)
_GD_64 = (
    "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 --image_size 64 "
    "--learn_sigma True --noise_schedule cosine --num_channels 192 --num_head_channels 64 --num_res_blocks 3 "
    "--resblock_updown True --use_new_attention_order True --use_fp16 True --use_scale_shift_norm True "
    "--batch_size 4 --num_samples 100 --timestep_respacing 250 --classifier_scale 1.0 "
    "--classifier_path models/64x64_classifier.pt --classifier_depth 4 --model_path models/64x64_diffusion.pt"
)
_GD_128 = (
    "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 128 "
    "--learn_sigma True --noise_schedule linear --num_channels 256 --num_heads 4 --num_res_blocks 2 "
    "--resblock_updown True --use_fp16 True --use_scale_shift_norm True --batch_size 4 --num_samples 100 "
    "--timestep_respacing 250 --classifier_scale 0.5 --classifier_path models/128x128_classifier.pt "
    "--model_path models/128x128_diffusion.pt"
)
_GD_256_GUIDED = (
    _GD_256.format(cond="True", dropout="") + " --classifier_scale 1.0 "
    "--classifier_path models/256x256_classifier.pt --model_path models/256x256_diffusion.pt"
)
_GD_512 = (
    "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 512 "
    "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 "
    "--resblock_updown True --use_fp16 False --use_scale_shift_norm True --batch_size 4 --num_samples 100 "
    "--timestep_respacing 250 --classifier_scale 4.0 --classifier_path models/512x512_classifier.pt "
    "--model_path models/512x512_diffusion.pt"
)
_LSUN = _GD_256.format(cond="False", dropout="--dropout {} ") + " --model_path models/{}.pt"
_ID_IMAGENET64 = "--image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True --diffusion_steps 4000 --noise_schedule cosine"
_ID_CIFAR10 = (
    "--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3 "
    "--diffusion_steps 4000 --noise_schedule cosine"
)
_ID_LSUN = (
    "--image_size 256 --num_channels 128 --num_res_blocks 2 --num_heads 1 --learn_sigma True "
    "--use_scale_shift_norm False --attention_resolutions 16 --diffusion_steps 1000 --noise_schedule linear "
    "--rescale_learned_sigmas False --rescale_timesteps False"
)

PRESETS = {
    "64x64_diffusion": (
        GD,
        "classifier_sample",
        "diffusion",
        "jul-2021/64x64_diffusion.pt",
        _GD_64,
    ),
    "64x64_classifier": (
        GD,
        "classifier_sample",
        "classifier",
        "jul-2021/64x64_classifier.pt",
        _GD_64,
    ),
    "128x128_diffusion": (
        GD,
        "classifier_sample",
        "diffusion",
        "jul-2021/128x128_diffusion.pt",
        _GD_128,
    ),
    "128x128_classifier": (
        GD,
        "classifier_sample",
        "classifier",
        "jul-2021/128x128_classifier.pt",
        _GD_128,
    ),
    "256x256_diffusion": (
        GD,
        "classifier_sample",
        "diffusion",
        "jul-2021/256x256_diffusion.pt",
        _GD_256_GUIDED,
    ),
    "256x256_diffusion_uncond": (
        GD,
        "classifier_sample",
        "diffusion",
        "jul-2021/256x256_diffusion_uncond.pt",
        _GD_256.format(cond="False", dropout="") + " --classifier_scale 10.0 --classifier_path "
        "models/256x256_classifier.pt --model_path models/256x256_diffusion_uncond.pt",
    ),
    "256x256_classifier": (
        GD,
        "classifier_sample",
        "classifier",
        "jul-2021/256x256_classifier.pt",
        _GD_256_GUIDED,
    ),
    "512x512_diffusion": (
        GD,
        "classifier_sample",
        "diffusion",
        "jul-2021/512x512_diffusion.pt",
        _GD_512,
    ),
    "512x512_classifier": (
        GD,
        "classifier_sample",
        "classifier",
        "jul-2021/512x512_classifier.pt",
        _GD_512,
    ),
    "64_256_upsampler": (
        GD,
        "super_res_sample",
        "super_resolution",
        "jul-2021/64_256_upsampler.pt",
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --large_size 256  --small_size 64 "
        "--learn_sigma True --noise_schedule linear --num_channels 192 --num_heads 4 --num_res_blocks 2 "
        "--resblock_updown True --use_fp16 True --use_scale_shift_norm True --batch_size 4 --num_samples 100 "
        "--timestep_respacing 250 --model_path models/64_256_upsampler.pt --base_samples 64_samples.npz",
    ),
    "128_512_upsampler": (
        GD,
        "super_res_sample",
        "super_resolution",
        "jul-2021/128_512_upsampler.pt",
        "--attention_resolutions 32,16 --class_cond True --diffusion_steps 1000 --large_size 512 --small_size 128 "
        "--learn_sigma True --noise_schedule linear --num_channels 192 --num_head_channels 64 --num_res_blocks 2 "
        "--resblock_updown True --use_fp16 True --use_scale_shift_norm True --batch_size 4 --num_samples 100 "
        "--timestep_respacing 250 --model_path models/128_512_upsampler.pt --base_samples 128_samples.npz",
    ),
    # The README shows lsun_bedroom.pt and says the other two LSUN checkpoints work the same way.
    "lsun_bedroom": (
        GD,
        "image_sample",
        "diffusion",
        "jul-2021/lsun_bedroom.pt",
        _LSUN.format("0.1", "lsun_bedroom"),
    ),
    "lsun_cat": (
        GD,
        "image_sample",
        "diffusion",
        "jul-2021/lsun_cat.pt",
        _LSUN.format("0.1", "lsun_bedroom"),
    ),
    "lsun_horse": (
        GD,
        "image_sample",
        "diffusion",
        "jul-2021/lsun_horse.pt",
        _LSUN.format("0.1", "lsun_bedroom"),
    ),
    "lsun_horse_nodropout": (
        GD,
        "image_sample",
        "diffusion",
        "jul-2021/lsun_horse_nodropout.pt",
        _LSUN.format("0.0", "lsun_horse_nodropout"),
    ),
    "imagenet64_uncond_100M_1500K": (
        ID,
        "image_sample",
        "diffusion",
        "march-2021/imagenet64_uncond_100M_1500K.pt",
        _ID_IMAGENET64,
    ),
    "imagenet64_uncond_vlb_100M_1500K": (
        ID,
        "image_sample",
        "diffusion",
        "march-2021/imagenet64_uncond_vlb_100M_1500K.pt",
        _ID_IMAGENET64 + " --use_kl True",
    ),
    "cifar10_uncond_50M_500K": (
        ID,
        "image_sample",
        "diffusion",
        "march-2021/cifar10_uncond_50M_500K.pt",
        _ID_CIFAR10,
    ),
    "cifar10_uncond_vlb_50M_500K": (
        ID,
        "image_sample",
        "diffusion",
        "march-2021/cifar10_uncond_vlb_50M_500K.pt",
        _ID_CIFAR10 + " --use_kl True",
    ),
    "imagenet64_cond_270M_250K": (
        ID,
        "image_sample",
        "diffusion",
        "march-2021/imagenet64_cond_270M_250K.pt",
        "--image_size 64 --num_channels 192 --num_res_blocks 3 --learn_sigma True --class_cond True "
        "--diffusion_steps 4000 --noise_schedule cosine --rescale_learned_sigmas False --rescale_timesteps False",
    ),
    # The README gives no size flags: super_res_sample.py's defaults (large 256, small 64) apply.
    "upsample_cond_500K": (
        ID,
        "super_res_sample",
        "super_resolution",
        "march-2021/upsample_cond_500K.pt",
        "--num_channels 192 --num_res_blocks 2 --learn_sigma True --class_cond True --diffusion_steps 4000 "
        "--noise_schedule linear --rescale_learned_sigmas False --rescale_timesteps False",
    ),
    "lsun_uncond_100M_1200K_bs128": (
        ID,
        "image_sample",
        "diffusion",
        "march-2021/lsun_uncond_100M_1200K_bs128.pt",
        _ID_LSUN,
    ),
    # The README repeats --use_scale_shift_norm False among this model's diffusion flags.
    "lsun_uncond_100M_2400K_bs64": (
        ID,
        "image_sample",
        "diffusion",
        "march-2021/lsun_uncond_100M_2400K_bs64.pt",
        _ID_LSUN + " --use_scale_shift_norm False",
    ),
}

# --------------------------------------------------------------------------- flag defaults


def _id_model_and_diffusion_defaults() -> dict:
    """improved_diffusion.script_util.model_and_diffusion_defaults(): no head-channel, up/down or
    attention-order flags, and rescale_timesteps / rescale_learned_sigmas default to True."""
    return dict(
        image_size=64,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        attention_resolutions="16,8",
        dropout=0.0,
        learn_sigma=False,
        sigma_small=False,
        class_cond=False,
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=True,
        rescale_learned_sigmas=True,
        use_checkpoint=False,
        use_scale_shift_norm=True,
    )


def _id_sr_defaults() -> dict:
    """improved_diffusion's sr_model_and_diffusion_defaults(): no image_size, no sigma_small."""
    res = {
        k: v
        for k, v in _id_model_and_diffusion_defaults().items()
        if k not in ("image_size", "sigma_small")
    }
    return dict(res, large_size=256, small_size=64)


_SAMPLE_DEFAULTS = dict(
    clip_denoised=True, num_samples=10000, batch_size=16, use_ddim=False, model_path=""
)
_SCRIPT_DEFAULTS = {  # (family, script) -> the script's create_argparser() defaults
    (GD, "image_sample"): lambda: {**_SAMPLE_DEFAULTS, **gd_models.model_and_diffusion_defaults()},
    (GD, "classifier_sample"): lambda: {
        **_SAMPLE_DEFAULTS,
        "classifier_path": "",
        "classifier_scale": 1.0,
        **gd_models.model_and_diffusion_defaults(),
        **gd_models.classifier_defaults(),
    },
    (GD, "super_res_sample"): lambda: {
        **_SAMPLE_DEFAULTS,
        "base_samples": "",
        **gd_models.sr_model_and_diffusion_defaults(),
    },
    (ID, "image_sample"): lambda: {**_SAMPLE_DEFAULTS, **_id_model_and_diffusion_defaults()},
    (ID, "super_res_sample"): lambda: {**_SAMPLE_DEFAULTS, "base_samples": "", **_id_sr_defaults()},
}

# guided-diffusion's factory signatures: which parsed flags each factory takes.
_UNET_FLAGS = tuple(
    "num_channels num_res_blocks learn_sigma class_cond use_checkpoint attention_resolutions "
    "num_heads num_head_channels num_heads_upsample use_scale_shift_norm dropout resblock_updown "
    "use_fp16".split()
)
_FACTORIES = {  # kind -> (factory, model class, flags it takes)
    "diffusion": (
        "create_model",
        "UNetModel",
        ("image_size", "channel_mult", "use_new_attention_order") + _UNET_FLAGS,
    ),
    "super_resolution": (
        "sr_create_model",
        "SuperResModel",
        ("large_size", "small_size") + _UNET_FLAGS,
    ),
    "classifier": ("create_classifier", "EncoderUNetModel", tuple(gd_models.classifier_defaults())),
}
_ANY_MODEL_FLAG = {flag for _, _, names in _FACTORIES.values() for flag in names}
_DEFAULT_SCRIPT = {
    "diffusion": "image_sample",
    "super_resolution": "super_res_sample",
    "classifier": "classifier_sample",
}
DIFFUSION_FLAGS = tuple(
    "learn_sigma diffusion_steps noise_schedule timestep_respacing use_kl predict_xstart "
    "rescale_timesteps rescale_learned_sigmas sigma_small".split()
)


def _str2bool(value: str) -> bool:
    """guided_diffusion.script_util.str2bool."""
    lowered = value.lower()
    if lowered in ("yes", "true", "t", "y", "1"):
        return True
    if lowered in ("no", "false", "f", "n", "0"):
        return False
    raise ValueError(value)


_TYPE_NAMES = {bool: "boolean (True / False)", int: "integer", float: "number", str: "string"}


def parse_flags(flags: str, *, family: str = GD, script: str = "image_sample") -> dict:
    """A GD / ID flag string -> every argument of that sampling script (its defaults filled in).

    `family`: "guided-diffusion" or "improved-diffusion" (their defaults differ);
    `script`: "image_sample", "classifier_sample" or "super_res_sample". Values are typed like
    the defaults (argparse with the scripts' `add_dict_to_argparser`); a repeated flag keeps its
    last value, as argparse does.
    """
    if (family, script) not in _SCRIPT_DEFAULTS:
        raise ValueError(
            f"no {script}.py in {family}: choose from "
            f"{sorted(f'{f}/{s}' for f, s in _SCRIPT_DEFAULTS)}"
        )
    args = _SCRIPT_DEFAULTS[(family, script)]()
    tokens = shlex.split(flags)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise ValueError(
                f"unexpected {token!r} in the flag string: flags look like '--num_channels 256'"
            )
        name, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens):
                raise ValueError(f"--{name} needs a value")
            value, i = tokens[i + 1], i + 1
        i += 1
        if name not in args:
            close = difflib.get_close_matches(name, list(args), n=3)
            hint = f"did you mean {', '.join('--' + c for c in close)}? " if close else ""
            raise ValueError(
                f"--{name} is not a flag of {family}'s {script}.py: {hint}"
                f"valid flags are {', '.join(sorted(args))}"
            )
        default = args[name]
        try:
            args[name] = _str2bool(value) if isinstance(default, bool) else type(default)(value)
        except ValueError:
            raise ValueError(
                f"--{name} {value!r}: expected a {_TYPE_NAMES[type(default)]}"
            ) from None
    return args


def config_from_flags(
    flags: str,
    *,
    kind: str = "diffusion",
    family: str = GD,
    script: str | None = None,
    name: str = "custom",
    num_classes: int = gd_models.NUM_CLASSES,
) -> ml_collections.ConfigDict:
    """A preset-shaped config from a flag string. `kind`: "diffusion" (UNetModel),
    "super_resolution" (SuperResModel) or "classifier" (EncoderUNetModel)."""
    if kind not in _FACTORIES:
        raise ValueError(f"kind={kind!r}: choose from {sorted(_FACTORIES)}")
    script = script or _DEFAULT_SCRIPT[kind]
    args = parse_flags(flags, family=family, script=script)
    factory, model_class, model_flags = _FACTORIES[kind]
    diffusion = {
        k: args.get(k, False) for k in DIFFUSION_FLAGS
    }  # sigma_small: GD has no flag, False
    return ml_collections.ConfigDict(
        dict(
            name=name,
            family=family,
            kind=kind,
            script=script,
            flags=flags,
            model_class=model_class,
            factory=factory,
            num_classes=num_classes,
            model={k: args[k] for k in model_flags if k in args},
            diffusion=diffusion,
            # What is left: batch size, paths, classifier scale (the other model's flags are dropped).
            sampling={
                k: v
                for k, v in args.items()
                if k not in _ANY_MODEL_FLAG and k not in DIFFUSION_FLAGS
            },
        )
    )


def get_config(name: str | None = None) -> ml_collections.ConfigDict:
    """The preset of a released checkpoint (`configs/pretrained.py:NAME` on the command line)."""
    if name not in PRESETS:
        close = difflib.get_close_matches(str(name), list(PRESETS), n=3)
        raise ValueError(
            f"no preset {name!r}{': did you mean ' + ', '.join(close) + '?' if close else ''} "
            f"Presets: {', '.join(PRESETS)}"
        )
    family, script, kind, url, flags = PRESETS[name]
    config = config_from_flags(flags, kind=kind, family=family, script=script, name=name)
    config.checkpoint = url.rsplit("/", 1)[-1]
    config.url = _URL + url
    return config


def diffusion_kwargs(config) -> dict:
    """create_gaussian_diffusion's keyword arguments from a config's diffusion flags."""
    d = dict(config.diffusion)
    return dict(steps=d.pop("diffusion_steps"), **d)
