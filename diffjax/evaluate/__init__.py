"""Evaluation: Inception features, FID / sFID / IS / precision-recall (bits/dim: not yet).

`inception`: the FID Inception-v3 (pytorch-fid's port of the 2015 TF graph) in Flax, NHWC.
`metrics`: GD's evaluator (Fréchet distance, Inception Score, precision/recall, its npz formats).
`python -m diffjax.evaluate --ref REF.npz --samples SAMPLES.npz --inception WEIGHTS` prints GD's
table.
"""
from diffjax.evaluate.inception import FIDInceptionV3, load_fid_inception
from diffjax.evaluate.metrics import (
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
