"""Bits/dim of a diffusion model over a dataset split (`diffjax evaluate --bpd`).

The negative log-likelihood bound L = L_prior + L_0 + sum_{t>=1} L_t (Ho et al. 2020 eq. 5) in
bits per dimension, per image, by three estimators:

* "exact": GD's calc_bpd_loop, one model call per timestep (all T terms; each L_t with one draw
  of x_t). The noise of image i comes from fold_in(key, i), so a result does not depend on the
  batch size. Costs T forward passes per image.
* "mc": an unbiased Monte-Carlo estimate over t with the decoder term exact: L_prior + L_0 +
  (T - 1) mean_k L_{t_k}, t_k ~ U{1..T-1}: T / (t_per_image + 1) times cheaper than "exact".
* "mc_uniform": the original code's estimate, t uniform over all T steps with the decoder term
  sampled like the others: L_prior + T mean_k L_{t_k}, t_k ~ U{0..T-1} (TARGETS.md's recipe). Same
  expectation; the rare decoder draws, weighted by T, make it much noisier.

The model is a `DiffusionModel` (computing in float32: a bound summed over T terms should not
carry bfloat16 rounding); conditional models are scored with the true labels (the conditional
model of a classifier-free one) and super-resolution models with the image's own low-res input.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import data as data_lib
from diffjax.bundle import DiffusionModel
from diffjax.core import diffusion as D
from diffjax.core import fields
from diffjax.io.loading import load

ESTIMATORS = ("exact", "mc", "mc_uniform")
MODEL_DIR = "model"  # where a training run exports its model


def _float32(model: DiffusionModel) -> DiffusionModel:
    network = dict(model.network)
    if network.get("dtype", "float32") == "float32":
        return model
    return model.replace(network=dict(network, dtype="float32"))


def _kwargs(model: DiffusionModel, x0, y) -> dict:
    if not model.conditioning.batch_keys <= {"image", "label"}:
        raise ValueError(f"bits/dim scores images and labels; a model conditioned on "
                         f"{model.conditioning.describe()} needs more inputs per image")
    return model.conditioning.model_kwargs({"image": x0, "label": y})


def exact_bpd(model: DiffusionModel, images, labels, key, batch: int = 16):
    """The full bound of each image, [N] bits/dim (GD's calc_bpd_loop): images [N, H, W, C] in
    [-1, 1], labels [N]; the noise of image i is drawn from fold_in(key, i). Images go through
    in chunks of `batch` (the last padded: one compilation)."""
    model = _float32(model)
    sched, dcfg, module, params = model.spec.schedule(), model.spec.config, model.module, model.params

    def one(x0, y, k):
        x0, y = x0[None], y[None]
        kwargs = _kwargs(model, x0, y)

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


def estimate_bpd(model: DiffusionModel, images, labels, key, t_per_image: int, batch: int,
                 uniform: bool = False):
    """Bits/dim of each image [N] by Monte-Carlo over t (module docstring): with the decoder
    term exact (uniform=False: L_prior + L_0 + (T - 1) mean_k L_{t_k}, t_k ~ U{1..T-1}, drawn with
    probability 1/T and weighted by T it would dominate the variance), or the original code's
    t ~ U{0..T-1} for every term (uniform=True: L_prior + T mean_k L_{t_k}). `batch` counts
    model calls per compiled chunk."""
    model = _float32(model)
    sched, dcfg, module = model.spec.schedule(), model.spec.config, model.module
    num_t = sched.num_timesteps

    def terms(params, x, t, noise, y):
        x_t = D.q_sample(sched, x, t, noise)
        out = module.apply({"params": params}, x_t, D.model_timesteps(sched, dcfg, t),
                           **_kwargs(model, x, y))
        return D.vb_terms_bpd(sched, dcfg, out, x, x_t, t)["output"]

    @jax.jit
    def chunk_bpd(params, x0, y, key):
        k_t, k_noise, k_zero = jax.random.split(key, 3)
        x = jnp.repeat(x0, t_per_image, axis=0)
        t = jax.random.randint(k_t, (x.shape[0],), 0 if uniform else 1, num_t)
        sampled = terms(params, x, t, jax.random.normal(k_noise, x.shape), jnp.repeat(y, t_per_image))
        mean_t = sampled.reshape(-1, t_per_image).mean(axis=1)
        if uniform:
            return num_t * mean_t + D.prior_bpd(sched, x0)
        decoder = terms(params, x0, jnp.zeros((x0.shape[0],), jnp.int32),
                        jax.random.normal(k_zero, x0.shape), y)
        return decoder + (num_t - 1) * mean_t + D.prior_bpd(sched, x0)

    per = max(batch // (t_per_image + (0 if uniform else 1)), 1)
    results = []
    for i in range(0, len(images), per):
        results.append(np.asarray(chunk_bpd(model.params, images[i:i + per], labels[i:i + per],
                                            jax.random.fold_in(key, i))))
    return np.concatenate(results)


@dataclasses.dataclass
class ScoredModel:
    """What bits/dim needs: the model, the data config of its images and a description."""

    model: DiffusionModel
    data: data_lib.DataConfig
    description: str


def load_for_bpd(path, ema_index: int = 0, data: dict | None = None) -> ScoredModel:
    """A model (anything diffjax.load reads) with the data it models: a training run knows its
    data (overridable by `data`, e.g. {"path": ...} on another machine); other models need at
    least {"source": ...} (then RGB, GD's centre crop, the model's image size)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {os.fspath(path)!r} does not exist: give a "
                                f"training run directory or a saved or converted model")
    run = (path / "checkpoints").is_dir() or (path / MODEL_DIR).is_dir()
    if not run and not (data or {}).get("source"):  # only training runs know their data
        raise ValueError(f"{os.fspath(path)!r} is not a training run, so it does not say what "
                         f"data it models: pass --data-source (e.g. 'folder' with --data-path, "
                         f"or 'tfds:imagenet2012')")
    model = load(path, ema=ema_index)
    if model.kind != "diffusion":
        raise ValueError(f"{path} holds a {model.kind} model: bits/dim needs a diffusion model")
    known = dict(model.extra.get("data") or {})
    if not known and not (data or {}).get("source"):
        raise ValueError(f"{os.fspath(path)!r} does not say what data it models: pass "
                         f"--data-source (e.g. 'folder' with --data-path, or "
                         f"'tfds:imagenet2012')")
    if not known:
        size = model.image_shape[0]
        known = dict(image_size=size, channels=model.image_shape[-1], resize="center_crop")
    data_cfg = fields.from_dict(data_lib.DataConfig, {**known, "random_flip": False, **(data or {})},
                                "data")
    return ScoredModel(model, data_cfg, f"{path} ({model.describe()})")


def bits_per_dim(model: ScoredModel, split: str = "test", num_images: int = 100,
                 estimator: str = "exact", t_per_image: int = 4, batch: int = 16,
                 seed: int = 0) -> dict:
    """Bits/dim of `num_images` images of `split` (drawn without replacement with `seed`):
    {"bpd": mean, "stderr": std (ddof 1) / sqrt(N), "per_image": [N], ...}."""
    fields.check_choice("estimator", estimator, ESTIMATORS)
    if num_images < 2:
        raise ValueError(f"num_images={num_images}: a standard error needs at least 2 images")
    test = data_lib.eval_arrays(model.data, split, num_images, seed)
    key = jax.random.PRNGKey(seed)
    if estimator == "exact":
        per_image = exact_bpd(model.model, test["image"], test["label"], key, batch)
    else:
        per_image = estimate_bpd(model.model, test["image"], test["label"], key, t_per_image,
                                 batch * (t_per_image + 1), uniform=estimator == "mc_uniform")
    per_image = np.asarray(per_image, np.float64)
    return {"bpd": float(per_image.mean()),
            "stderr": float(per_image.std(ddof=1) / np.sqrt(len(per_image))),
            "per_image": per_image, "num_images": len(per_image), "split": split,
            "estimator": estimator, "timesteps": model.model.spec.num_steps}
