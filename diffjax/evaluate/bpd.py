"""Bits/dim of a diffusion checkpoint over a dataset split (`python -m diffjax.evaluate --bpd`).

The negative log-likelihood bound L = L_prior + L_0 + sum_{t>=1} L_t (Ho et al. 2020 eq. 5) in
bits per dimension, per image, two ways:

* "exact": GD's calc_bpd_loop, one model call per timestep (all T terms; each L_t with one draw
  of x_t). The noise of image i comes from fold_in(key, i), so a result does not depend on the
  batch size. Costs T forward passes per image.
* "mc": the trainer's `estimate_bpd`, an unbiased Monte-Carlo estimate over t (L_0 and L_prior
  exact, `t_per_image` uniform draws of t >= 1): T / (t_per_image + 1) times cheaper, noisier.

What is evaluated: a `python -m diffjax.train` workdir (its config.json and the latest
checkpoint in checkpoints/; EMA `ema_index`, -1 for the raw parameters), or a
`python -m diffjax.convert` directory (its preset; the data config must then be given). Both go
through `diffjax.train.trainer_from_config`, the one place that turns a config into a model, its
diffusion and its conditioning. Class-conditional models are scored with the true labels (the
conditional model of a classifier-free one).
"""
from __future__ import annotations

import dataclasses
import os
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffjax import data as data_lib
from diffjax.core import diffusion as D

ESTIMATORS = ("exact", "mc")


def _in_float32(trainer):
    """The trainer with its module computing in float32 (a bound summed over T terms should not
    carry bfloat16 rounding; trainers use bfloat16 on accelerators)."""
    if getattr(trainer.module, "dtype", jnp.float32) == jnp.float32:
        return trainer
    return dataclasses.replace(trainer, module=trainer.module.clone(dtype=jnp.float32))


@dataclasses.dataclass
class ScoredModel:
    """What bits/dim needs: the Trainer (module, schedule, diffusion, conditioning), the
    parameters to score, the data config and a description of where they came from."""

    trainer: object
    params: dict
    data: data_lib.DataConfig
    description: str


def _is_workdir(path: pathlib.Path) -> bool:
    return (path / "config.json").is_file() and (path / "checkpoints").is_dir()


def load_workdir(workdir, ema_index: int = 0, step: int | None = None) -> ScoredModel:
    """A `python -m diffjax.train` workdir's checkpoint (diffjax.train.load_workdir)."""
    from diffjax import train as train_lib

    trainer, params, data_cfg, description = train_lib.load_workdir(workdir, ema_index, step)
    return ScoredModel(_in_float32(trainer), params, data_cfg, description)


def load_converted_for_bpd(directory, data: dict) -> ScoredModel:
    """A `python -m diffjax.convert` checkpoint, with `data` (DataConfig fields: source, path,
    ...) saying which images to score; image size from the preset, RGB, GD's centre crop."""
    from diffjax import train as train_lib
    from diffjax.convert import load_converted

    _, _, preset = load_converted(directory)  # for its flags; trainer_from_config loads again
    if preset.get("kind", "diffusion") != "diffusion":
        raise ValueError(f"{directory} holds a {preset.kind} model: bits/dim needs a diffusion "
                         f"model (a super-resolution one needs its low-resolution inputs)")
    class_cond = bool(preset.model.get("class_cond", False))
    config = ml_collections.ConfigDict()
    config.init_from = os.fspath(directory)
    config.data = dict(dict(image_size=int(preset.model.image_size), channels=3,
                            resize="center_crop", random_flip=False), **data)
    config.model = {}
    config.diffusion = {}
    config.optim = {}
    config.train = dict(task="diffusion", conditioning="class" if class_cond else "none",
                        num_classes=int(preset.get("num_classes", 1000)) if class_cond else 0,
                        ema_rates=())
    trainer, data_cfg, params = train_lib.trainer_from_config(config)
    return ScoredModel(_in_float32(trainer), params, data_cfg,
                       f"{directory} ({preset.get('name', '')})")


def load_for_bpd(path, ema_index: int = 0, data: dict | None = None) -> ScoredModel:
    """A training workdir or a converted checkpoint (see the module docstring). `data` overrides
    DataConfig fields of a workdir (e.g. {"path": ...} on another machine) and is required for a
    converted checkpoint (at least {"source": ...})."""
    path = pathlib.Path(path)
    if _is_workdir(path):
        model = load_workdir(path, ema_index)
        if data:
            model.data = dataclasses.replace(model.data, **data)
        return model
    if not path.is_dir():
        raise FileNotFoundError(f"--checkpoint {os.fspath(path)!r} does not exist: give a "
                                f"diffjax.train workdir or a diffjax.convert directory")
    if not data or not data.get("source"):
        raise ValueError(f"{os.fspath(path)!r} is not a diffjax.train workdir (no config.json "
                         f"and checkpoints/), so it must be a converted checkpoint, which does "
                         f"not say what data it models: pass --data-source (e.g. "
                         f"'folder' with --data-path, or 'tfds:imagenet2012')")
    return load_converted_for_bpd(path, data)


def _model_kwargs(trainer, x0, y):
    """The conditioning the trainer feeds: true labels, the low-resolution input."""
    from diffjax import train as train_lib

    kwargs = {}
    if trainer.config.conditioning != "none":
        kwargs["y"] = y
    if trainer.config.small_size:
        kwargs["low_res"] = train_lib.area_downsample(x0, trainer.config.small_size)
    return kwargs


def exact_bpd(trainer, params, images, labels, key, batch: int = 16):
    """The full bound of each image, [N] bits/dim (GD's calc_bpd_loop): images [N, H, W, C] in
    [-1, 1], labels [N]; the noise of image i is drawn from fold_in(key, i). Images go through
    in chunks of `batch` (the last padded: one compilation)."""
    sched, dcfg, module = trainer.schedule, trainer.diffusion, trainer.module

    def one(x0, y, k):
        x0, y = x0[None], y[None]
        kwargs = _model_kwargs(trainer, x0, y)

        def model_fn(x_t, t):
            return module.apply({"params": params}, x_t, t, **kwargs)

        return D.calc_bpd_loop(sched, dcfg, model_fn, x0, k)["total_bpd"][0]

    chunk = jax.jit(jax.vmap(one))
    images, labels = np.asarray(images, np.float32), np.asarray(labels, np.int32)
    n = len(images)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))
    out = []
    for i in range(0, n, batch):
        take = np.arange(i, i + batch) % n  # the last chunk padded with repeats, then dropped
        out.append(np.asarray(chunk(images[take], labels[take], keys[take]))[: min(batch, n - i)])
    return np.concatenate(out)


def bits_per_dim(model: ScoredModel, split: str = "test", num_images: int = 100,
                 estimator: str = "exact", t_per_image: int = 4, batch: int = 16,
                 seed: int = 0) -> dict:
    """Bits/dim of `num_images` images of `split` (drawn without replacement with `seed`):
    {"bpd": mean, "stderr": std (ddof 1) / sqrt(N), "per_image": [N], ...}."""
    from diffjax import train as train_lib

    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r}: choose one of {ESTIMATORS}")
    if num_images < 2:
        raise ValueError(f"num_images={num_images}: a standard error needs at least 2 images")
    test = data_lib.eval_arrays(model.data, split, num_images, seed)
    key = jax.random.PRNGKey(seed)
    if estimator == "exact":
        per_image = exact_bpd(model.trainer, model.params, test["image"], test["label"], key,
                              batch)
    else:
        # estimate_bpd's batch counts model calls: t_per_image + 1 per image.
        per_image = train_lib.estimate_bpd(model.trainer, model.params, test["image"],
                                           test["label"], key, t_per_image,
                                           batch * (t_per_image + 1))
    per_image = np.asarray(per_image, np.float64)
    return {"bpd": float(per_image.mean()),
            "stderr": float(per_image.std(ddof=1) / np.sqrt(len(per_image))),
            "per_image": per_image, "num_images": len(per_image), "split": split,
            "estimator": estimator, "timesteps": model.trainer.schedule.num_timesteps}
