"""Evaluation: Inception features, FID / sFID / IS / precision-recall, classifier-feature metrics,
bits/dim.

`inception`: the FID Inception-v3 (pytorch-fid's port of the 2015 TF graph) in Flax, NHWC.
`metrics`: GD's evaluator (Fréchet distance, Inception Score, precision/recall, its npz formats).
`classifier`: a small clean classifier whose features give a Fréchet distance and whose
predictions give the accuracy of class-conditional samples (Fashion-MNIST default).
`bpd`: bits/dim of a training workdir or converted checkpoint (exact loop or Monte-Carlo).
`python -m diffjax evaluate --ref REF.npz --samples SAMPLES.npz --inception WEIGHTS` prints GD's
table; `--classifier DIR --samples SAMPLES.npz` and `--bpd --checkpoint DIR` the others.
"""
from diffjax.pipelines.evaluation.inception import FIDInceptionV3, load_fid_inception
from diffjax.pipelines.evaluation.metrics import (
    FeatureExtractor,
    FIDStatistics,
    evaluate,
    frechet_distance,
    inception_score,
    precision_recall,
)

__all__ = [
    "FIDInceptionV3",
    "FIDStatistics",
    "FeatureExtractor",
    "evaluate",
    "frechet_distance",
    "inception_score",
    "load_fid_inception",
    "precision_recall",
]
