"""`python -m diffjax convert --pt FILE.pt --preset NAME --out DIR`: a released PyTorch
checkpoint -> a saved diffjax model (read without torch and without running pickled code).

    python -m diffjax convert --pt 64x64_diffusion.pt --preset 64x64_diffusion --out ckpt/adm64
    python -m diffjax convert --pt model.pt --flags "--image_size 64 --num_channels 128 ..." --out ckpt/x

--out is written beside itself and renamed into place when complete; --overwrite replaces only a
model diffjax wrote, never a directory holding the input.
"""
from __future__ import annotations

from diffjax.cli import common
from diffjax.compat import gd_models
from diffjax.io import convert


def build_parser():
    p = common.parser("convert", __doc__.split("\n\n")[0])
    common.flag(p, "pt", required=True, help="the PyTorch checkpoint (.pt)")
    which = p.add_mutually_exclusive_group(required=True)
    common.flag(which, "preset", help="a released checkpoint's preset (python -m diffjax "
                "pretrained list), e.g. 64x64_diffusion, or GLIDE's base, upsample, base-inpaint, "
                "upsample-inpaint")
    common.flag(which, "flags", help="a guided-diffusion flag string, as in its README")
    common.flag(p, "kind", default="diffusion",
                choices=["diffusion", "super_resolution", "classifier"],
                help="with --flags: UNetModel, SuperResModel or EncoderUNetModel")
    common.flag(p, "family", default="guided-diffusion",
                choices=["guided-diffusion", "improved-diffusion"],
                help="with --flags: whose defaults fill the flags not given")
    common.flag(p, "num_classes", type=int, default=gd_models.NUM_CLASSES,
                help="with --flags: classes of a class-conditional model or classifier")
    common.flag(p, "key", help="the state dict inside the .pt when it holds several (e.g. ema)")
    common.flag(p, "out", required=True, help="output directory")
    common.flag(p, "overwrite", action="store_true",
                help="replace --out (a model diffjax wrote) once the new one is complete")
    common.flag(p, "no_progress", action="store_true")
    return p


def main(argv=None) -> int:
    """Any failure is one `error:` line and a non-zero exit (SystemExit), never a traceback, and
    nothing is written."""
    args = build_parser().parse_args(argv)
    try:
        preset = convert.preset_config(args.preset, flags=args.flags, kind=args.kind,
                                       family=args.family, num_classes=args.num_classes)
        out = convert.convert(args.pt, preset, args.out, key=args.key, overwrite=args.overwrite,
                              progress=not args.no_progress)
    except Exception as err:  # noqa: BLE001 - the one-line contract of this command
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise SystemExit(f"error: {str(message) or type(err).__name__}") from None
    print(f"wrote {out} ({preset.model_class}, preset {preset.name})")
    return 0
