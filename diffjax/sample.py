"""`diffjax.sample(...)` for notebooks and `python -m diffjax.sample` on the command line.

This module is callable: `diffjax.sample(key, model, schedule, shape, ...)` is
`diffjax.core.samplers.sample` (see its docstring). A package attribute and a submodule cannot share
the name `sample` otherwise: importing the command-line module would replace the function.

Command line: sample a checkpoint and write guided-diffusion's npz layout (`arr_0` uint8 NHWC,
`arr_1` labels of a class-conditional model) and a PNG grid next to it. The checkpoint is one
written by `python -m diffjax.convert` (its preset travels with it) or the latest of a
`python -m diffjax.train` run (--workdir; its own sampler and respacing by default):

    python -m diffjax.sample --checkpoint DIR [--config configs/pretrained.py:64x64_diffusion]
        --num_samples 16 --batch_size 8 [--sampler ddim --steps 25]
        [--classifier DIR --classifier_scale 1.0] [--cfg_scale 3.0] [--out samples.npz]
    python -m diffjax.sample --workdir runs/default [--ema 0] --cfg_scale 2 --num_samples 100

GLIDE checkpoints (`python -m diffjax.convert --preset base|upsample|base-inpaint|upsample-inpaint`)
sample text-to-image with classifier-free guidance, optionally upsampled and inpainted:

    python -m diffjax.sample --checkpoint ckpt/glide_base --prompt "an oil painting of a corgi"
        --bpe path/to/glide_text2im/tokenizer [--cfg_scale 3] [--upsampler ckpt/glide_upsample]
        [--image photo.png --mask mask.png] (inpainting: mask white = keep, black = fill in)
"""
from __future__ import annotations

from diffjax import hugepages

if __name__ == "__main__":
    hugepages.reexec()  # first: glibc reads its malloc tunables only when a process starts

import argparse
import importlib.util
import pathlib
import sys
import time
import types

import numpy as np

from diffjax.core.samplers import SAMPLERS
from diffjax.core.samplers import sample as _sample
from diffjax import tokenizer as tokenizer_lib


def load_config(spec: str):
    """`path/to/config.py[:arg]` -> its get_config(arg), as ml_collections' config_flags reads it."""
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--config {spec!r}: no such file {file}")
    module_spec = importlib.util.spec_from_file_location(f"_diffjax_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def diffusion_from_config(config, respacing: str | None = None):
    """The compat GaussianDiffusion of a preset's `diffusion` flags, optionally respaced anew."""
    from diffjax.compat import guided_diffusion as gd
    from diffjax.compat.gd_presets import diffusion_kwargs

    kwargs = diffusion_kwargs(config)
    if respacing is not None:
        kwargs["timestep_respacing"] = respacing
    return gd.create_gaussian_diffusion(**kwargs)


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m diffjax.sample", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a directory written by diffjax.convert")
    src.add_argument("--workdir", help="a diffjax.train workdir (its latest checkpoint)")
    p.add_argument("--ema", type=int, default=0,
                   help="--workdir: which EMA of the run's ema_rates (-1: the raw parameters)")
    p.add_argument("--config", help="path.py[:name] whose get_config overrides the checkpoint's")
    p.add_argument("--num_samples", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--sampler", choices=sorted(SAMPLERS),
                   help="default ddim (GLIDE: ddpm for the base model, as its notebooks)")
    p.add_argument("--steps", type=int, help="respace to this many evenly spaced steps")
    p.add_argument("--timestep_respacing", help="GD's respacing string instead of --steps")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM's eta")
    p.add_argument("--classifier", help="a converted noisy classifier for classifier guidance")
    p.add_argument("--classifier_scale", type=float, default=1.0)
    p.add_argument("--cfg_scale", type=float, help="classifier-free guidance scale")
    p.add_argument("--null_label", type=int, help="the unconditional label (default num_classes)")
    p.add_argument("--class_label", type=int, help="sample this class only (default: random)")
    p.add_argument("--no_clip", action="store_true", help="do not clip x0 predictions to [-1, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="npz path (default samples_NxHxWxC.npz in the current directory)")
    p.add_argument("--no_progress", action="store_true")
    _glide_args(p)
    return p.parse_args(argv)


def main(argv=None) -> pathlib.Path:
    import jax
    import jax.numpy as jnp

    from diffjax.core import guidance as G
    from diffjax import images
    from diffjax.convert import load_converted

    args = _parse_args(argv)
    respacing = args.timestep_respacing or (str(args.steps) if args.steps else None)
    if args.workdir:
        if args.config or args.prompt is not None or args.upsampler or args.image or args.mask:
            raise ValueError("--config / --prompt / --upsampler / --image / --mask are for "
                             "converted checkpoints (--checkpoint); a --workdir brings its own "
                             "config.json")
        module, variables, gd, shape, class_cond, num_classes = _from_workdir(args, respacing)
    else:
        module, variables, config = load_converted(args.checkpoint)
        if args.config:
            config = load_config(args.config)
        if _is_glide(config):
            return main_glide(args, module, variables, config)
        if args.prompt is not None or args.upsampler or args.image or args.mask:
            raise ValueError("--prompt / --upsampler / --image / --mask are for GLIDE checkpoints "
                             "(python -m diffjax.convert --preset base ...); "
                             f"{args.checkpoint} holds {config.get('name', 'another model')}")
        if config.get("kind", "diffusion") != "diffusion":
            raise ValueError(
                f"--checkpoint {args.checkpoint} holds a {config.kind} model; sample a diffusion "
                "model (super-resolution sampling needs low-resolution inputs: not in this "
                "command yet)")
        gd = diffusion_from_config(config, respacing)
        size = config.model.image_size
        shape = (args.batch_size, size, size, 3)
        class_cond = bool(config.model.get("class_cond", False))
        num_classes = int(config.get("num_classes", 1000))

    # Labels go to the model only if it is class-conditional; a classifier always gets them (as
    # GD's classifier_sample, which guides unconditional models with random target classes).
    def apply(v, x, t, y=None):
        return module.apply(v, x, t, y=y if class_cond else None)

    transforms = []
    if args.classifier:
        clf, clf_vars, _ = load_converted(args.classifier)
        transforms.append(G.classifier(lambda x, t: clf.apply(clf_vars, x, t), args.classifier_scale))
    if args.cfg_scale is not None:
        if not class_cond:
            raise ValueError("--cfg_scale needs a class-conditional model (its null label is the "
                             "unconditional branch)")
        null = num_classes if args.null_label is None else args.null_label
        rows = getattr(module, "num_classes", None)
        if rows is not None and null >= rows:
            raise ValueError(
                f"--null_label {null} is not a label of this model ({rows} classes): classifier-"
                "free guidance needs a model trained with label dropout and a null class")
        transforms.append(G.classifier_free(args.cfg_scale, {"y": jnp.full((1,), null)},
                                            mean_channels=shape[-1]))
    guidance = G.chain(*transforms)

    key = jax.random.PRNGKey(args.seed)
    batches, labels = [], []
    start = time.perf_counter()
    for i in range(-(-args.num_samples // args.batch_size)):
        k_label, k_sample = jax.random.split(jax.random.fold_in(key, i))
        kwargs = {}
        if class_cond or args.classifier:
            y = (jnp.full((args.batch_size,), args.class_label) if args.class_label is not None
                 else jax.random.randint(k_label, (args.batch_size,), 0, num_classes))
            kwargs["y"] = y
            labels.append(np.asarray(y))
        x = _sample(k_sample, (apply, variables), gd.schedule, shape, sampler=args.sampler or "ddim",
                    guidance=guidance, config=gd.config, model_kwargs=kwargs,
                    clip_denoised=not args.no_clip, progress=not args.no_progress)
        batches.append(images.to_uint8(x))
        print(f"batch {i + 1}: {len(batches) * args.batch_size} samples, "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    arr = np.concatenate(batches)[: args.num_samples]
    out = pathlib.Path(args.out or f"samples_{'x'.join(map(str, arr.shape))}.npz")
    out.parent.mkdir(parents=True, exist_ok=True)
    if labels:
        np.savez(out, arr, np.concatenate(labels)[: args.num_samples])
    else:
        np.savez(out, arr)
    png = out.with_suffix(".png")
    images.grid(arr).save(png)
    print(f"wrote {out} ({arr.shape[0]} samples) and {png}")
    return out


def _from_workdir(args, respacing):
    """(module, variables, diffusion, batch shape, class-conditional?, num_classes) of the latest
    checkpoint of a diffjax.train workdir; respacing None keeps the run's eval respacing."""
    from diffjax import train as train_lib

    trainer, params, _, description = train_lib.load_workdir(args.workdir, args.ema)
    cfg = trainer.config
    if cfg.task != "diffusion" or cfg.small_size or cfg.conditioning == "text":
        raise ValueError(f"--workdir {args.workdir} trained a {cfg.task} model (conditioning "
                         f"{cfg.conditioning!r}, small_size {cfg.small_size}): this command samples "
                         "unconditional and class-conditional diffusion runs; convert text or "
                         "super-resolution runs' weights, or sample them in Python")
    # Unless told otherwise, sample as the run's own end-of-training grid did.
    run_eval = train_lib.dataclass_from(train_lib.EvalConfig,
                                        train_lib.load_config_json(args.workdir).get("eval", {}))
    respacing = run_eval.respacing if respacing is None else respacing
    args.sampler = args.sampler or run_eval.sampler
    gd = trainer.sampling_diffusion(respacing)
    print(f"sampling {description}, {gd.schedule.num_timesteps} steps", file=sys.stderr)
    class_cond = cfg.conditioning in ("class", "classifier_free")
    return (trainer.module, {"params": params}, gd, (args.batch_size,) + trainer.image_shape,
            class_cond, cfg.num_classes)


# --------------------------------------------------------------------------- GLIDE


def _glide_args(p):
    g = p.add_argument_group("GLIDE (text-to-image checkpoints)")
    g.add_argument("--prompt", help="the caption to draw ('' = unconditional)")
    g.add_argument("--bpe", help="GLIDE's tokenizer: the folder glide_text2im/tokenizer/ of the "
                   "glide-text2im package (encoder.json.gz + vocab.bpe.gz); default: the installed "
                   "package's; 'bytes' for byte-level models trained with diffjax")
    g.add_argument("--upsampler", help="a converted GLIDE upsampler (preset upsample / "
                   "upsample-inpaint) for the second stage (64 -> 256)")
    g.add_argument("--upsample_temp", type=float, default=None,
                   help="scale of the upsampler's initial noise (default 0.997, as GLIDE)")
    g.add_argument("--upsample_respacing", default=None,
                   help="the upsampler's respacing (default its preset's: fast27)")
    g.add_argument("--image", help="inpainting: the image to complete (PNG/JPEG, any size)")
    g.add_argument("--mask", help="inpainting: a mask image, WHITE = keep, BLACK = fill in "
                   "(resized nearest to 64x64, then to 256 for the upsampler)")
    g.add_argument("--jump_length", type=int, default=1, help="RePaint: levels per jump")
    g.add_argument("--resample_count", type=int, default=1,
                   help="RePaint: resamplings per jump (1 = GLIDE's plain replacement)")


def _is_glide(config) -> bool:
    return config.get("family") == "glide-text2im"


def _load_glide_tokenizer(spec):
    from diffjax import text2im
    from diffjax.tokenizer import glide_tokenizer_dir

    if spec is None:
        try:
            spec = str(glide_tokenizer_dir())
        except FileNotFoundError:
            raise FileNotFoundError(
                "GLIDE needs its tokenizer's vocabulary: pass --bpe with the folder "
                "glide_text2im/tokenizer/ of the glide-text2im package (it holds encoder.json.gz "
                "and vocab.bpe.gz, the GPT-2 BPE of the released models, beside "
                "bpe_simple_vocab_16e6.txt.gz), e.g. from a clone of "
                "https://github.com/openai/glide-text2im") from None
    return tokenizer_lib.load(spec)


def _read_png(path, mode: str, what: str) -> np.ndarray:
    from PIL import Image

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--{what} {path}: no such file")
    with Image.open(path) as im:
        return np.asarray(im.convert(mode))


def main_glide(args, module, variables, config) -> pathlib.Path:
    """Text-to-image (and inpainting, and 64 -> 256 upsampling) with a GLIDE checkpoint."""
    import jax

    from diffjax import images, text2im
    from diffjax.convert import load_converted
    from diffjax.tokenizer import tokens_and_mask

    if config.get("kind") == "super_resolution":
        raise ValueError(f"--checkpoint {args.checkpoint} is a GLIDE upsampler: pass the base "
                         f"model as --checkpoint and this one as --upsampler")
    if args.prompt is None:
        raise ValueError("a GLIDE checkpoint samples a caption: pass --prompt \"...\"")
    tokenizer = _load_glide_tokenizer(args.bpe)
    tokenizer_lib.check_vocabulary(tokenizer, getattr(module, 'n_vocab', None), type(module).__name__)
    sampling = dict(config.get("sampling", {}))
    respacing = args.timestep_respacing or (str(args.steps) if args.steps else
                                            sampling.get("timestep_respacing", "100"))
    base = text2im.Stage(module, variables, text2im.glide_diffusion(config.diffusion, respacing))
    tokens, mask = tokens_and_mask(tokenizer, args.prompt, module.text_ctx)
    up = up_tokens = up_mask = None
    if args.upsampler:
        up_module, up_vars, up_config = load_converted(args.upsampler)
        if not _is_glide(up_config) or up_config.get("kind") != "super_resolution":
            raise ValueError(f"--upsampler {args.upsampler} is not a GLIDE upsampler (convert one "
                             f"with --preset upsample or upsample-inpaint)")
        tokenizer_lib.check_vocabulary(tokenizer, getattr(up_module, 'n_vocab', None), type(up_module).__name__)
        up_respacing = args.upsample_respacing or dict(up_config.get("sampling", {})).get(
            "timestep_respacing", "fast27")
        up = text2im.Stage(up_module, up_vars,
                           text2im.glide_diffusion(up_config.diffusion, up_respacing))
        up_tokens, up_mask = tokens_and_mask(tokenizer, args.prompt, up_module.text_ctx)
    image = image_mask = None
    if args.image or args.mask:
        if not (args.image and args.mask):
            raise ValueError("inpainting needs both --image and --mask (mask white = keep)")
        image = _read_png(args.image, "RGB", "image").astype(np.float32)[None] / 127.5 - 1
        image_mask = (_read_png(args.mask, "L", "mask") > 127).astype(np.float32)[None, ..., None]
    cfg_scale = args.cfg_scale if args.cfg_scale is not None else sampling.get("guidance_scale", 3.0)
    temp = args.upsample_temp if args.upsample_temp is not None else text2im.UPSAMPLE_TEMP

    key = jax.random.PRNGKey(args.seed)
    lows, highs = [], []
    start = time.perf_counter()
    for i in range(-(-args.num_samples // args.batch_size)):
        low, high = text2im.text2im(
            jax.random.fold_in(key, i), base, tokens, mask, batch_size=args.batch_size,
            pad_token=tokenizer.end_token, cfg_scale=cfg_scale, upsampler=up,
            upsample_tokens=up_tokens, upsample_mask=up_mask, upsample_temp=temp, image=image,
            image_mask=image_mask, jump_length=args.jump_length,
            resample_count=args.resample_count, base_sampler=args.sampler or "ddpm",
            progress=not args.no_progress)
        lows.append(images.to_uint8(low))
        if high is not None:
            highs.append(images.to_uint8(high))
        print(f"batch {i + 1}: {len(lows) * args.batch_size} samples, "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    low = np.concatenate(lows)[: args.num_samples]
    arr = np.concatenate(highs)[: args.num_samples] if highs else low
    out = pathlib.Path(args.out or f"samples_{'x'.join(map(str, arr.shape))}.npz")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, arr)
    images.grid(arr).save(out.with_suffix(".png"))
    if highs:  # the 64x64 stage too
        np.savez(out.with_name(out.stem + "_base.npz"), low)
    print(f"wrote {out} ({arr.shape[0]} samples of {args.prompt!r}) and {out.with_suffix('.png')}")
    return out


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return _sample(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    main()
