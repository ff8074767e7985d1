"""`python -m diffjax sample --model NAME_OR_PATH [...]`: samples of a model as guided-diffusion's
npz (`arr_0` uint8 NHWC, `arr_1` the labels of a class-conditional or classifier-guided run) and a
PNG grid beside it, each image shown at least 128 px.

    python -m diffjax sample --model adm-imagenet64-cond --classifier adm-imagenet64-classifier \\
        --classifier_scale 1 --num_samples 16 --steps 250
    python -m diffjax sample --model runs/default --guidance_scale 2 --labels 5 --num_samples 8
    python -m diffjax sample --model glide-base --upsampler glide-upsample --prompt "a corgi"
    python -m diffjax sample --model glide-base --prompt "a corgi" --clip_text clip_text_enc.pt \
        --clip_image clip_image_enc.pt --clip_scale 3
    python -m diffjax sample --model adm-upsampler-64-256 --low_res samples_64.npz
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import numpy as np

from diffjax import conditioning as conditioning_lib
from diffjax import images as images_lib
from diffjax.cli import common
from diffjax.compat import glide_clip
from diffjax.conditioning import ClassLabel, Conditioning
from diffjax.core.samplers import SAMPLERS
from diffjax.io.loading import load
from diffjax.pipelines.sampling import sample


def build_parser():
    p = common.parser("sample", __doc__.split("\n\n")[0])
    src = p.add_argument_group("the model")
    common.flag(src, "model", help="a pretrained name, a saved model, a training run directory, or "
                "a .pt file with --preset")
    src.add_argument("--checkpoint", "--workdir", dest="model", help=argparse.SUPPRESS)
    common.flag(src, "preset", help="the preset of a .pt file (python -m diffjax pretrained list)")
    common.flag(src, "ema", type=int, default=None, help="which EMA of a training run samples "
                "(an index into its ema_rates; -1: the raw parameters; default: the run's)")
    s = p.add_argument_group("sampling")
    common.flag(s, "num_samples", type=int, default=16)
    common.flag(s, "batch_size", type=int, default=None, help="images per compiled call "
                "(default: all)")
    common.flag(s, "sampler", choices=sorted(SAMPLERS), help="default: the model's (else ddim)")
    common.flag(s, "steps", help="the time grid: a step count or a respacing string such as "
                "ddim25 or 250 (default: the model's)")
    s.add_argument("--timestep_respacing", dest="steps", help=argparse.SUPPRESS)
    common.flag(s, "eta", type=float, default=0.0, help="DDIM's eta")
    common.flag(s, "guidance_scale", type=float, default=None,
                help="classifier-free guidance scale (1: the conditional model)")
    s.add_argument("--cfg_scale", dest="guidance_scale", type=float, help=argparse.SUPPRESS)
    common.flag(s, "null_label", type=int, default=None, help="the unconditional label of a "
                "converted classifier-free model whose null label the preset does not know")
    common.flag(s, "classifier", help="a noisy classifier (name or path) for classifier guidance")
    common.flag(s, "classifier_scale", type=float, default=None)
    common.flag(s, "no_clip", action="store_true", help="do not clip x0 predictions to [-1, 1]")
    common.flag(s, "clip_text", help="CLIP guidance of a GLIDE text model toward --prompt: "
                "glide-text2im's clip_text_enc.pt (with --clip_image)")
    common.flag(s, "clip_image", help="CLIP guidance: glide-text2im's clip_image_enc.pt")
    common.flag(s, "clip_scale", type=float, default=None, help="CLIP guidance's grad_scale "
                "(default 3, glide-text2im's clip_guided notebook)")
    common.flag(s, "clip_config", help="CLIP guidance: a JSON of the fields of glide-text2im's "
                "clip/config.yaml (default: the released model's)")
    common.flag(s, "clip_vocab", help="CLIP guidance: bpe_simple_vocab_16e6.txt.gz (default: the "
                "installed glide-text2im's)")
    common.flag(s, "seed", type=int, default=0)
    conditioning_lib.add_arguments(p)
    e = p.add_argument_group("inpainting, ILVR, upsampling")
    common.flag(e, "image", help="inpainting: the image to complete (PNG/JPEG, any size)")
    common.flag(e, "mask", help="inpainting: a mask image, WHITE = keep, BLACK = fill in")
    common.flag(e, "jump_length", type=int, default=1, help="RePaint: levels per jump")
    common.flag(e, "resample_count", type=int, default=1,
                help="RePaint: resamplings per jump (1 = plain replacement)")
    common.flag(e, "reference", help="ILVR: the reference image(s), a PNG or an npz arr_0")
    common.flag(e, "down_factor", type=int, default=4, help="ILVR: the low-pass factor N")
    common.flag(e, "upsampler", help="a super-resolution model (name or path) run on the samples "
                "(GLIDE 64 -> 256, ADM-U)")
    common.flag(e, "upsampler_steps", help="the upsampler's time grid (default: its own)")
    e.add_argument("--upsample_respacing", dest="upsampler_steps", help=argparse.SUPPRESS)
    o = p.add_argument_group("output")
    common.flag(o, "out", help="npz path (default samples_NxHxWxC.npz in the current directory)")
    common.flag(o, "no_progress", action="store_true")
    common.flag(o, "hugepages", action="store_true",
                help="restart with glibc's hugetlb malloc tunable (faster XLA CPU scratch memory)")
    return p


def _grid_size(value):
    return None if value is None else (int(value) if str(value).isdigit() else value)


def _with_null_label(model, null_label: int | None):
    """The model with an explicit null label for classifier-free guidance (checked)."""
    labels = model.conditioning.get(ClassLabel)
    rows = model.network.get("num_classes")
    null = (labels.null_label if labels is not None and labels.droppable else
            labels.num_classes if labels is not None else None)
    null = null if null_label is None else null_label
    if labels is None or rows is None or null is None or not 0 <= null < rows:
        raise ValueError(
            f"--null_label {null} is not a label of this model ({rows} classes): classifier-free "
            f"guidance needs a model trained with label dropout and a null class")
    if labels.droppable and null == labels.null_label:
        return model
    kinds = tuple(ClassLabel(null, dropout=labels.dropout or 0.1) if k is labels else k
                  for k in model.conditioning.kinds)
    return model.replace(conditioning=Conditioning(kinds))


def _clip(args):
    """(NoisedCLIP, variables) of --clip_text / --clip_image (.pt files), or None."""
    if not (args.clip_text or args.clip_image):
        return None
    if not (args.clip_text and args.clip_image):
        raise ValueError("CLIP guidance needs both --clip_text and --clip_image (glide-text2im's "
                         "clip_text_enc.pt and clip_image_enc.pt)")
    config = json.loads(pathlib.Path(args.clip_config).read_text()) if args.clip_config else None
    clip = glide_clip.create_clip_model(config)
    return clip.module, glide_clip.load_clip_state_dict(clip, args.clip_text, args.clip_image)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.model:
        raise ValueError("--model is required: a pretrained name (python -m diffjax pretrained "
                         "list), a saved model, a training run directory, or a .pt with --preset")
    if args.num_samples < 1:
        raise ValueError(f"--num_samples {args.num_samples}: give a positive number of samples")
    model = load(args.model, ema=args.ema, preset=args.preset, progress=not args.no_progress)
    if model.kind != "diffusion":
        raise ValueError(f"--model {args.model} holds a {model.kind} model: sample a diffusion "
                         f"model (pass a classifier as --classifier)")
    if args.guidance_scale is not None and model.conditioning.get(ClassLabel) is not None:
        model = _with_null_label(model, args.null_label)
    request = conditioning_lib.request_from_args(args)
    if bool(args.image) != bool(args.mask):
        raise ValueError("inpainting needs both --image and --mask (mask white = keep)")
    if args.image:
        request["image"] = images_lib.read_image(args.image, model.image_shape[-1])[None]
        request["mask"] = (images_lib.read_image(args.mask, 1) > 127).astype(np.float32)[None]
    reference = None
    if args.reference:
        reference = (np.load(args.reference)["arr_0"] if args.reference.endswith(".npz") else
                     images_lib.read_image(args.reference, model.image_shape[-1])[None])
    classifier = load(args.classifier, progress=not args.no_progress) if args.classifier else None
    if classifier is not None and classifier.kind != "classifier":
        raise ValueError(f"--classifier {args.classifier} holds a {classifier.kind} model, not a "
                         f"noisy classifier")
    upsampler = load(args.upsampler, progress=not args.no_progress) if args.upsampler else None
    clip = _clip(args)
    print(f"sampling {model.describe()}", file=sys.stderr)
    arr, info = sample(
        model, jax.random.PRNGKey(args.seed), args.num_samples, sampler=args.sampler,
        steps=_grid_size(args.steps), guidance_scale=args.guidance_scale, eta=args.eta,
        classifier=classifier, classifier_scale=args.classifier_scale, clip=clip,
        clip_scale=args.clip_scale, clip_tokenizer=args.clip_vocab,
        clip_denoised=False if args.no_clip else None, batch_size=args.batch_size,
        jump_length=args.jump_length, resample_count=args.resample_count, reference=reference,
        down_factor=args.down_factor, upsampler=upsampler,
        upsampler_steps=_grid_size(args.upsampler_steps), progress=not args.no_progress,
        return_info=True, **request)
    out = pathlib.Path(args.out or f"samples_{'x'.join(map(str, arr.shape))}.npz")
    out.parent.mkdir(parents=True, exist_ok=True)
    labels = info["labels"]
    np.savez(out, arr, labels) if labels is not None else np.savez(out, arr)
    png = out.with_suffix(".png")
    images_lib.show(arr).save(png)
    written = [out, png]
    if info["base"] is not None:  # the stage before the upsampler too
        base = out.with_name(out.stem + "_base.npz")
        np.savez(base, info["base"])
        written.append(base)
    print(f"wrote {arr.shape[0]} samples: " + ", ".join(map(str, written)))
    return 0
