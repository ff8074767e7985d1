"""`python -m diffjax COMMAND ...` (also the `diffjax` console script): one entry point, one flag
style (see diffjax.cli.common), every option in `COMMAND --help`.

    train               train (and resume) a model from a config file
    sample              sample a model to an npz and a PNG grid
    evaluate            FID family, classifier-feature metrics, bits/dim
    convert             a released PyTorch checkpoint -> a saved diffjax model
    pretrained          list / download the released checkpoints by name
    feature-classifier  train the classifier of the classifier-feature metrics
    check               the diffusion core against a closed-form denoiser
"""
from __future__ import annotations

import sys

from absl import logging

from diffjax import hugepages
from diffjax.cli import check, common, convert, evaluate, feature_classifier, pretrained, sample
from diffjax.cli import train
from diffjax.core.fields import closest

TRAINING_COMMANDS = ("train", "feature-classifier")  # their XLA:CPU flag default differs
COMMANDS = {"train": train, "sample": sample, "evaluate": evaluate, "convert": convert,
            "pretrained": pretrained, "feature-classifier": feature_classifier, "check": check}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}{closest(command, COMMANDS)}; commands: "
              f"{', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if "--hugepages" in rest:
        hugepages.reexec()  # glibc reads its malloc tunables only when a process starts
    logging.set_verbosity(logging.ERROR)  # orbax logs every save and read-only open
    training = command in TRAINING_COMMANDS
    status = common.run(lambda argv: common.process_options(argv, training), rest)  # before JAX
    return status or common.run(COMMANDS[command].main, rest)
