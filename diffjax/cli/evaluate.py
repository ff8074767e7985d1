"""`python -m diffjax evaluate`: three modes.

GD's evaluator (Inception Score, FID, sFID, Precision, Recall; its table, progress to stderr):

    python -m diffjax evaluate --ref REF.npz --samples SAMPLES.npz --inception WEIGHTS

  WEIGHTS is pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or an .npz of its state_dict).
  --preprocess adm_tf (default) feeds the network as GD's evaluator feeds the 2015 TF graph (TF1
  bilinear resize without half-pixel centres, (x - 128) / 128), so that numbers are comparable
  with GD's reference batches and papers; --preprocess pytorch_fid reproduces pytorch-fid.

Classifier-feature metrics (no Inception needed; see diffjax/pipelines/evaluation/classifier.py):

    python -m diffjax evaluate --classifier CLASSIFIER_WORKDIR --samples SAMPLES.npz [--ref REF.npz]

  the Fréchet distance between the classifier's features of the samples and of the reference
  (default: the classifier's training split) and the accuracy of class-conditional samples
  (arr_1 labels) under the classifier.

Bits/dim of a checkpoint over a dataset split (see diffjax/pipelines/evaluation/bpd.py):

    python -m diffjax evaluate --bpd --checkpoint WORKDIR_OR_CONVERTED [--split test]
        [--num-images 100] [--estimator exact|mc] [--t-per-image 4] [--ema 0]
"""
from __future__ import annotations

import argparse
import sys
import time

from diffjax.cli import common
from diffjax.pipelines.evaluation import bpd, classifier, inception, metrics


def _parser() -> argparse.ArgumentParser:
    p = common.parser("evaluate", "Inception Score, FID, sFID, precision and recall as GD's "
                      "evaluator; classifier-feature metrics (--classifier); bits/dim (--bpd).")
    p.add_argument(
        "--ref", help="reference batch npz (arr_0 uint8 NHWC; optional mu/sigma/mu_s/sigma_s)"
    )
    p.add_argument("--samples", help="sample batch npz (arr_0 uint8 NHWC, arr_1 labels)")
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
    common.flag(p, "batch_size", type=int, default=None,
                   help="images per jitted call (default 64; --bpd: 16 images)")
    common.flag(p, "no_progress", action="store_true")
    c = p.add_argument_group("classifier-feature metrics")
    c.add_argument("--classifier", help="a feature classifier: a workdir of python -m diffjax "
                   "feature-classifier")
    b = p.add_argument_group("bits/dim")
    b.add_argument("--bpd", action="store_true", help="bits/dim of --checkpoint on --split")
    b.add_argument("--checkpoint", "--model", dest="checkpoint", help="a model: a training run "
                   "directory, a saved or converted model, or a pretrained name")
    b.add_argument("--split", default="test")
    common.flag(b, "num_images", type=int, default=100)
    b.add_argument("--estimator", choices=bpd.ESTIMATORS, default="exact",
                   help="exact: every timestep (GD's calc_bpd_loop); mc: the trainer's unbiased "
                   "Monte-Carlo estimate over t (--t_per_image timesteps per image, the decoder "
                   "term exact); mc_uniform: the original code's (t uniform over all T steps)")
    common.flag(b, "t_per_image", type=int, default=4)
    b.add_argument("--ema", type=int, default=None,
                   help="which EMA of a workdir (index into train.ema_rates); -1: raw parameters")
    b.add_argument("--seed", type=int, default=0, help="picks the images and the noise")
    common.flag(b, "data_source", help="data.source of the images (required for a converted "
                   "checkpoint: 'folder', 'fashion_mnist', 'tfds:NAME')")
    common.flag(b, "data_path", help="data.path (an image folder, IDX folder or tfds data_dir)")
    return p


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def _fmt(value, missing):
    return missing if value is None else value


def _gd_table(args) -> int:
    if not args.ref or not args.samples:
        raise SystemExit("--ref REF.npz and --samples SAMPLES.npz are both required (or "
                         "--classifier DIR --samples SAMPLES.npz, or --bpd --checkpoint DIR)")
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
        batch_size=args.batch_size or 64,
        progress=not args.no_progress,
        log=_log,
    )
    na = "n/a (the reference batch stores no arr_0 images)"
    for label, key in (
        ("Inception Score", "inception_score"),
        ("FID", "fid"),
        ("sFID", "sfid"),
        ("Precision", "precision"),
        ("Recall", "recall"),
    ):
        print(f"{label}: {_fmt(results[key], na)}")
    return 0


def _classifier_metrics(args) -> int:
    if not args.samples:
        raise SystemExit("--classifier needs --samples SAMPLES.npz (arr_0 uint8 NHWC, arr_1 "
                         "labels), as python -m diffjax sample writes")
    try:
        results = classifier.evaluate_samples(args.classifier, args.samples, args.ref,
                                              batch_size=args.batch_size or 256,
                                              progress=not args.no_progress)
    except FileNotFoundError as e:
        raise SystemExit(f"--classifier: {e}") from None
    print(f"{classifier.FD_NAME}: {results['frechet_distance']}")
    print(f"{classifier.ACCURACY_NAME}: "
          f"{_fmt(results['accuracy'], 'n/a (the samples store no arr_1 labels)')}")
    test_acc = results["classifier_test_accuracy"]
    _log(f"{results['num_samples']} samples vs reference: {results['reference']}; the "
         f"classifier's own test accuracy: {_fmt(test_acc, 'unknown')}")
    return 0


def _bpd(args) -> int:
    if not args.checkpoint:
        raise SystemExit("--bpd needs --checkpoint: a training run directory or a saved or "
                         "converted model")
    data = {k: v for k, v in (("source", args.data_source), ("path", args.data_path)) if v}
    try:
        model = bpd.load_for_bpd(args.checkpoint, args.ema, data)
    except FileNotFoundError as e:
        raise SystemExit(f"--checkpoint: {e}") from None
    _log(f"bits/dim of {model.description} on {args.num_images} {args.split} images "
         f"({args.estimator}) ...")
    start = time.perf_counter()
    result = bpd.bits_per_dim(model, args.split, args.num_images, args.estimator,
                              args.t_per_image, args.batch_size or 16, args.seed)
    how = {"exact": f"every one of {result['timesteps']} timesteps",
           "mc": f"Monte-Carlo over t, {args.t_per_image} timesteps per image",
           "mc_uniform": f"Monte-Carlo over all T steps, {args.t_per_image} per image"}[args.estimator]
    print(f"bits/dim: {result['bpd']:.6f} +- {result['stderr']:.6f} (standard error over "
          f"{result['num_images']} {args.split} images; {how}; "
          f"{time.perf_counter() - start:.1f} s)")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.bpd:
        return _bpd(args)
    if args.classifier:
        return _classifier_metrics(args)
    return _gd_table(args)


