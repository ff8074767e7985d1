"""python -m diffjax.evaluate --ref REF.npz --samples SAMPLES.npz --inception WEIGHTS

Prints the table of openai/guided-diffusion's evaluations/evaluator.py (Inception Score, FID, sFID,
Precision, Recall); progress goes to stderr. WEIGHTS is pytorch-fid's
pt_inception-2015-12-05-6726825d.pth (or an .npz of its state_dict).

--preprocess adm_tf (default) feeds the network as GD's evaluator feeds the 2015 TF graph (TF1
bilinear resize without half-pixel centres, (x - 128) / 128), so that numbers are comparable with
GD's reference batches and papers; --preprocess pytorch_fid reproduces pytorch-fid instead.
"""
from __future__ import annotations

import argparse
import sys

from diffjax.evaluate import inception, metrics


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m diffjax.evaluate",
        description="Inception Score, FID, sFID, precision and recall as GD's evaluator.",
    )
    p.add_argument(
        "--ref", help="reference batch npz (arr_0 uint8 NHWC; optional mu/sigma/mu_s/sigma_s)"
    )
    p.add_argument("--samples", help="sample batch npz (arr_0 uint8 NHWC)")
    p.add_argument(
        "--inception",
        help=f"pytorch-fid's {inception.WEIGHTS_FILE} (from {inception.WEIGHTS_URL})",
    )
    p.add_argument(
        "--preprocess",
        choices=inception.PREPROCESSING,
        default="adm_tf",
        help="adm_tf: as GD's TF graph (TF1 resize, (x-128)/128), comparable with GD's reference "
        "statistics; pytorch_fid: as pytorch-fid (half-pixel resize, 2x-1)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--bpd", action="store_true", help="bits/dim of a checkpoint (not yet available)"
    )
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.bpd:
        raise SystemExit(
            "--bpd is not yet available: it needs diffjax's trained-checkpoint format "
            "(diffjax.train), which does not exist yet"
        )
    if not args.ref or not args.samples:
        raise SystemExit("--ref REF.npz and --samples SAMPLES.npz are both required")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    try:
        module, variables = inception.load_fid_inception(
            args.inception, preprocess=args.preprocess
        )
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"--inception: {e}") from None
    results = metrics.evaluate(
        args.ref,
        args.samples,
        module,
        variables,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        log=log,
    )
    na = "n/a (the reference batch stores no arr_0 images)"
    for label, key in (
        ("Inception Score", "inception_score"),
        ("FID", "fid"),
        ("sFID", "sfid"),
        ("Precision", "precision"),
        ("Recall", "recall"),
    ):
        value = results[key]
        print(f"{label}: {na if value is None else value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
