"""`python -m diffjax feature-classifier --config configs/feature_classifier_fashion_mnist.py
--workdir DIR`: train the classifier whose features give the classifier-feature metrics
(`python -m diffjax evaluate --classifier DIR --samples samples.npz`)."""
from __future__ import annotations

import json
import sys

from diffjax.cli import common
from diffjax.pipelines.evaluation.classifier import train_classifier


def build_parser():
    p = common.parser("feature-classifier", __doc__.split("\n\n")[0], training=True)
    common.flag(p, "config", required=True,
                help="path.py[:arg], e.g. configs/feature_classifier_fashion_mnist.py")
    common.flag(p, "workdir", required=True, help="where the classifier is saved")
    common.flag(p, "steps", type=int, help="override train.total_steps")
    return p


def main(argv=None) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    config = common.apply_overrides(common.load_config_file(args.config), overrides)
    if args.steps is not None:
        config.train.total_steps = args.steps

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    classifier = train_classifier(config, args.workdir, log=log, progress=True)
    print(json.dumps(classifier.metrics))
    return 0
