"""Classifier-feature metrics for small datasets with no Inception network at hand (the bundled
Fashion-MNIST default): a small CNN trained on the clean data provides

* the Fréchet distance between the Gaussians of its penultimate features on samples and on real
  images (FID's formula, Heusel et al. 2017, on this classifier's features instead of
  Inception's pool3: not comparable with FID numbers, hence its own name), and
* the accuracy of class-conditional samples: how often the classifier assigns a sample the class
  it was generated for.

    python -m diffjax feature-classifier --config configs/feature_classifier_fashion_mnist.py \
        --workdir runs/fmnist_classifier
    python -m diffjax evaluate --classifier runs/fmnist_classifier --samples samples.npz

A classifier workdir holds `config.json` (the recipe), `metrics.json` (test accuracy) and `model/`,
the classifier as a model bundle (kind "feature_classifier") whose arrays are the float64 mean and
covariance of the features of the whole training split, the default reference of the distance.
Samples are GD's npz layout, as `python -m diffjax sample` writes it: `arr_0` uint8
[N, H, W, C] and, for class-conditional samples, `arr_1` their labels [N].

The classifier sees exactly what the samples are: uint8 images of the diffusion model's data
config (size, channels, padding), divided by 255. It is trained without noise; the
noise-conditioned classifiers used for guidance (task="classifier" in diffjax.train) are a
different thing.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from diffjax import data as data_lib
from diffjax.bundle import DiffusionModel
from diffjax.core import fields
from diffjax.io import store
from diffjax.io.loading import load
from diffjax.models.feature_classifier import FeatureClassifier
from diffjax.models.registry import network_config
from diffjax.pipelines.evaluation import metrics
from diffjax.pipelines.training.optim import OptimConfig, make_optimizer

MODEL_DIR = "model"  # the bundle inside a classifier workdir
FD_NAME = "Fréchet distance on classifier features"
ACCURACY_NAME = "Classifier accuracy of class-conditional samples"


@dataclasses.dataclass(frozen=True)
class ClassifierTrainConfig:
    """batch_size images per step for total_steps steps; test_images: how many test images the
    final accuracy is measured on (the whole Fashion-MNIST test split is 10000);
    reference_images: how many training images the saved reference statistics use (0: all)."""

    num_classes: int = 10
    batch_size: int = 64
    total_steps: int = 1500
    test_images: int = 10000
    reference_images: int = 0
    log_every: int = 250
    seed: int = 0


@dataclasses.dataclass
class Classifier:
    """A trained feature classifier: its module and variables, the data config its inputs follow,
    and its metrics (test accuracy)."""

    module: FeatureClassifier
    variables: dict
    data: data_lib.DataConfig
    metrics: dict
    arrays: dict = dataclasses.field(default_factory=dict)  # the reference statistics

    def extractor(self, batch_size: int = 256, devices=None) -> metrics.FeatureExtractor:
        """A sharded, jit-compiled extractor: uint8 [B, H, W, C] -> {"features", "logits"}."""
        return metrics.FeatureExtractor(self.module, self.variables, batch_size, devices,
                                        channels=self.data.channels)


def _configs(config: ml_collections.ConfigDict):
    fields.check_keys("the feature-classifier config", config.keys(),
                      ("data", "model", "train", "optim"))
    train = fields.from_dict(ClassifierTrainConfig, config.train, "train")
    data = fields.from_dict(data_lib.DataConfig, config.data, "data")
    module = fields.from_dict(FeatureClassifier, config.get("model", {}), "model",
                              num_classes=train.num_classes)
    optim = fields.from_dict(OptimConfig, config.get("optim", {}), "optim",
                             total_steps=train.total_steps)
    side = data.image_size // 2 ** len(module.widths)
    if side * 2 ** len(module.widths) != data.image_size or side == 0:
        raise ValueError(f"model.widths={module.widths} halves the image {len(module.widths)} "
                         f"times, which does not divide data.image_size={data.image_size}: use "
                         f"fewer widths or an image size divisible by {2 ** len(module.widths)}")
    return train, data, module, optim


def real_images(data: data_lib.DataConfig, split: str, num: int | None = None, seed: int = 0):
    """(images uint8 [N, S, S, C], labels [N]) of a split, shaped as the data config shapes
    training images (no flips): `num` drawn without replacement with `seed`, or all."""
    if num is None:
        num = len(data_lib.make_source(data, split))
    arrays = data_lib.eval_arrays(data, split, num, seed)
    # The exact inverse of data.to_model_range (x / 127.5 - 1): rounding, not truncation.
    images = np.round((arrays["image"] + 1.0) * 127.5).astype(np.uint8)
    return images, arrays["label"]


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose arg-max logit is the label."""
    return float(np.mean(np.argmax(logits, axis=-1) == np.asarray(labels)))


def train_classifier(config: ml_collections.ConfigDict, workdir=None,
                     log: Callable[[str], None] = print, progress: bool = False) -> Classifier:
    """Train the feature classifier of `config` (cross-entropy, the optimizer of diffjax.train),
    measure its test accuracy, and, with a workdir, save it there with the statistics of the
    training split's features (the metric's default reference)."""
    train, data, module, optim = _configs(config)
    key = jax.random.PRNGKey(train.seed)
    size = (1, data.image_size, data.image_size, data.channels)
    variables = jax.jit(module.init)(key, jnp.zeros(size))
    optimizer = make_optimizer(optim)
    opt_state = optimizer.init(variables)

    @jax.jit
    def step(variables, opt_state, images, labels):
        def loss_fn(v):
            logits = module.apply(v, (images + 1.0) / 2.0)["logits"]  # data: [-1, 1]
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, jnp.mean(jnp.argmax(logits, -1) == labels)

        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables)
        updates, opt_state = optimizer.update(grads, opt_state, variables)
        return optax.apply_updates(variables, updates), opt_state, loss, acc

    iterator = data_lib.make_iterator(data, train.batch_size)
    start, window = time.perf_counter(), []
    for i in range(train.total_steps):
        batch = iterator.next()
        variables, opt_state, loss, acc = step(variables, opt_state, batch["image"],
                                               batch["label"])
        window.append((loss, acc))
        if (i + 1) % train.log_every == 0 or i + 1 == train.total_steps:
            loss, acc = np.mean(jax.device_get(window), axis=0)
            log(f"step {i + 1}/{train.total_steps}: loss {loss:.4f}, train accuracy {acc:.4f} "
                f"({time.perf_counter() - start:.0f} s)")
            window = []
    train_s = time.perf_counter() - start
    classifier = Classifier(module, variables, data, {})
    extractor = classifier.extractor()
    images, labels = real_images(data, "test", train.test_images)
    out = extractor.outputs(images, progress=progress, desc="test")
    classifier.metrics = {"test_accuracy": accuracy(out["logits"], labels),
                          "test_images": len(labels), "steps": train.total_steps,
                          "train_s": train_s}
    log(f"test accuracy {classifier.metrics['test_accuracy']:.4f} on {len(labels)} images")
    if workdir is not None:
        save_classifier(classifier, config, workdir, train.reference_images or None, extractor,
                        progress)
    return classifier


def save_classifier(classifier: Classifier, config, workdir, reference_images: int | None = None,
                    extractor=None, progress=False):
    """Save the classifier as a model bundle in workdir/model (kind "feature_classifier": its
    data config and metrics in the metadata, the float64 mean and covariance of the features of
    `reference_images` training images (None: all) as its arrays), with config.json and
    metrics.json beside it."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    extractor = extractor or classifier.extractor()
    images, _ = real_images(classifier.data, "train", reference_images)
    stats = feature_statistics(extractor, images, progress=progress, desc="train split")
    data = classifier.data
    model = DiffusionModel(
        network=network_config(classifier.module), weights={"params": classifier.variables["params"]},
        kind="feature_classifier", image_shape=(data.image_size, data.image_size, data.channels),
        provenance={"trained_with": "diffjax feature-classifier"},
        extra={"data": dataclasses.asdict(data), "metrics": classifier.metrics},
        arrays={"reference_mu": stats.mu, "reference_sigma": stats.sigma})
    store.save(model, workdir / MODEL_DIR, overwrite=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))
    (workdir / "metrics.json").write_text(json.dumps(classifier.metrics, indent=1))


def load_classifier(path) -> Classifier:
    """The feature classifier of a `train_classifier` workdir, a saved bundle, or a workdir of the
    earlier format (classifier.msgpack)."""
    path = pathlib.Path(path)
    if (path / MODEL_DIR).is_dir():
        path = path / MODEL_DIR
    if not path.exists():
        raise FileNotFoundError(
            f"{os.fspath(path)!r} does not exist: train a feature classifier with python -m "
            f"diffjax feature-classifier --config configs/feature_classifier_fashion_mnist.py "
            f"--workdir {os.fspath(path)}")
    model = load(path)
    if model.kind != "feature_classifier":
        raise ValueError(f"{os.fspath(path)!r} holds a {model.kind} model, not a feature "
                         f"classifier (python -m diffjax feature-classifier trains one)")
    data = fields.from_dict(data_lib.DataConfig, model.extra.get("data", {}), "data")
    return Classifier(model.module, model.variables(), data,
                      dict(model.extra.get("metrics", {})), dict(model.arrays))


def feature_statistics(extractor: metrics.FeatureExtractor, images, total=None, progress=False,
                       desc="features") -> metrics.FIDStatistics:
    """float64 mean and covariance of the classifier features of `images` (streamed)."""
    running = metrics.RunningStatistics()
    for out in extractor.batches(images, total, progress, desc):
        running.update(out["features"])
    return running.result()


def _check_images(path, shape, dtype, data: data_lib.DataConfig) -> None:
    want = (data.image_size, data.image_size, data.channels)
    if dtype != np.uint8 or len(shape) != 4 or tuple(shape[1:]) != want:
        raise ValueError(
            f"{os.fspath(path)!r}: arr_0 is {dtype} {list(shape)}, but this classifier scores "
            f"uint8 [N, {want[0]}, {want[1]}, {want[2]}] images (its data config: image_size="
            f"{data.image_size}, channels={data.channels}, resize={data.resize!r}); write samples "
            f"of the model trained on that data, as python -m diffjax sample does")


def reference_statistics(classifier: Classifier, extractor, ref=None,
                         progress=False) -> tuple[metrics.FIDStatistics, str]:
    """(statistics, description) of the reference: a GD-layout npz `ref` (arr_0 images, or
    precomputed mu / sigma of these classifier features), else the classifier's own
    training-split statistics."""
    if ref is None:
        if "reference_mu" not in classifier.arrays:
            raise FileNotFoundError(
                "no reference: pass --ref REF.npz (arr_0 uint8 images) or use a classifier "
                "saved with its training-split statistics (train_classifier writes them)")
        return (metrics.FIDStatistics(np.asarray(classifier.arrays["reference_mu"], np.float64),
                                      np.asarray(classifier.arrays["reference_sigma"], np.float64)),
                "training split")
    keys = metrics.npz_keys(ref)
    if "mu" in keys and "sigma" in keys:
        with np.load(ref) as f:
            mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
        if mu.shape != (classifier.module.features,):
            raise ValueError(
                f"{os.fspath(ref)!r} stores mu of shape {mu.shape}, not statistics of this "
                f"classifier's {classifier.module.features} features (an Inception reference "
                f"batch?): pass a batch with arr_0 images instead")
        return metrics.FIDStatistics(mu, sigma), os.path.basename(os.fspath(ref))
    shape, dtype = metrics.npz_array_info(ref, "arr_0")
    _check_images(ref, shape, dtype, classifier.data)
    stats = feature_statistics(extractor, metrics.iter_npz_array(ref, "arr_0", 1024), shape[0],
                               progress, "reference")
    return stats, f"{os.fspath(ref)} ({shape[0]} images)"


def evaluate_samples(classifier_path, samples_path, ref=None, batch_size: int = 256,
                     progress: bool = True) -> dict:
    """The classifier-feature metrics of a GD sample batch: {"frechet_distance", "accuracy"
    (None without arr_1 labels), "num_samples", "reference", "classifier_test_accuracy"}."""
    classifier = load_classifier(classifier_path)
    extractor = classifier.extractor(batch_size)
    ref_stats, ref_name = reference_statistics(classifier, extractor, ref, progress)
    shape, dtype = metrics.npz_array_info(samples_path, "arr_0")
    _check_images(samples_path, shape, dtype, classifier.data)
    labels = None
    if "arr_1" in metrics.npz_keys(samples_path):
        with np.load(samples_path) as f:
            labels = np.asarray(f["arr_1"]).reshape(-1)
        if len(labels) != shape[0]:
            raise ValueError(f"{os.fspath(samples_path)!r}: arr_1 holds {len(labels)} labels for "
                             f"{shape[0]} images; GD's layout has one label per image")
    running, logits = metrics.RunningStatistics(), []
    for out in extractor.batches(metrics.iter_npz_array(samples_path, "arr_0", 1024), shape[0],
                                 progress, "samples"):
        running.update(out["features"])
        logits.append(out["logits"])
    logits = np.concatenate(logits)
    return {
        "frechet_distance": running.result().frechet_distance(ref_stats),
        "accuracy": None if labels is None else accuracy(logits, labels),
        "num_samples": int(shape[0]),
        "reference": ref_name,
        "classifier_test_accuracy": classifier.metrics.get("test_accuracy"),
    }
