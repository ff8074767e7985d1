"""The compatibility reader: directories diffjax wrote before the model bundle, as bundles.

Three formats, each read once into a `DiffusionModel` (nothing is written back):
* a converted checkpoint (`python -m diffjax convert` until the bundle): an orbax PyTree of
  {"params": ...} whose custom metadata "config" is the guided-diffusion / GLIDE preset;
* a training workdir (`python -m diffjax train` until the bundle): config.json (guided-diffusion
  diffusion flags, train.conditioning / num_classes / label_dropout / small_size /
  caption_dropout / inpaint) and checkpoints/<step>/state (the TrainState: params, ema, ...);
* a feature-classifier workdir: config.json, classifier.msgpack (flax serialization),
  metrics.json and reference_train.npz.
The old vocabulary is guided-diffusion's, so this module speaks it through diffjax.compat.
"""
from __future__ import annotations

import json
import pathlib

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffjax import tokenizer as tokenizer_lib
from diffjax.bundle import DiffusionModel, ema_name
from diffjax.compat import gd_models
from diffjax.compat import glide_text2im as GT
from diffjax.compat.native import bundle_parts, spec_from_flags
from diffjax.conditioning import ClassLabel, Conditioning, Inpaint, LowRes, Text
from diffjax.io import store
from diffjax.io.checkpoints import CheckpointConfig, CheckpointManager
from diffjax.io.convert import build_model
from diffjax.models.feature_classifier import FeatureClassifier
from diffjax.models.registry import network_config


def is_converted(path) -> bool:
    metadata = store.bundle_metadata(path)
    return bool(metadata) and "config" in metadata and store.METADATA_KEY not in metadata


def is_workdir(path) -> bool:
    """An old training workdir: config.json and checkpoints whose newest step has no "model"
    item (this version's runs store the model's description in every checkpoint)."""
    path = pathlib.Path(path)
    if not ((path / "config.json").is_file() and (path / "checkpoints").is_dir()):
        return False
    steps = [int(p.name) for p in (path / "checkpoints").iterdir() if p.name.isdigit()]
    return bool(steps) and not (path / "checkpoints" / str(max(steps)) / "model").exists()


def is_feature_classifier(path) -> bool:
    path = pathlib.Path(path)
    return (path / "classifier.msgpack").is_file() and (path / "config.json").is_file()


def read_converted(path) -> DiffusionModel:
    path = pathlib.Path(path).absolute()
    config = ml_collections.ConfigDict(store.bundle_metadata(path)["config"])
    module = build_model(config)
    parts = bundle_parts(config, module)
    source = dict(config.get("source", {}))
    parts["provenance"] = {**parts["provenance"], **source, "legacy": str(path),
                           "preset": config.to_dict()}
    variables = store.restore_tree(path)
    return DiffusionModel(weights={"params": variables["params"]}, **parts)


def _resolutions_to_rates(resolutions, image_size: int) -> tuple:
    if isinstance(resolutions, str):
        resolutions = [int(r) for r in resolutions.split(",") if r.strip()]
    return tuple(image_size // int(r) for r in resolutions)


def _old_workdir_parts(config) -> dict:
    """network config, spec, conditioning and image shape of an old experiment config."""
    data, train = dict(config.data), dict(config.train)
    size, channels = int(data.get("image_size", 32)), int(data.get("channels", 1))
    flags = dict(config.get("diffusion", {}))
    conditioning = train.get("conditioning", "none")
    learn_sigma = bool(flags.get("learn_sigma", conditioning == "text"))
    if conditioning == "text":
        flags = {"learn_sigma": True, **flags,
                 "noise_schedule": flags.get("noise_schedule", "squaredcos_cap_v2")}
    spec, _ = spec_from_flags(flags)
    model = dict(config.get("model", {}))
    kinds, small = [], int(train.get("small_size", 0))
    num_classes = int(train.get("num_classes", 0))
    if train.get("task", "diffusion") == "classifier":
        rates = _resolutions_to_rates(model.pop("attention_resolutions", ()), size)
        module = gd_models.build("EncoderUNetModel", image_size=size, in_channels=channels,
                                 out_channels=num_classes, attention_resolutions=rates, **model)
        return dict(kind="classifier", network=network_config(module), spec=spec,
                    conditioning=Conditioning(), image_shape=(size, size, channels))
    if conditioning in ("class", "classifier_free"):
        kinds.append(ClassLabel(num_classes, float(train.get("label_dropout", 0.0))))
    if conditioning == "text":
        kinds.append(Text(text_ctx=int(data.get("text_ctx", 128)),
                          tokenizer=data.get("tokenizer", ""),
                          dropout=float(train.get("caption_dropout", 0.0))))
        if train.get("inpaint"):
            kinds.append(Inpaint())
    if small:
        kinds.append(LowRes(small, quantize=conditioning == "text"))
    cond = Conditioning(tuple(kinds))
    if conditioning == "text":
        n_vocab = tokenizer_lib.load(data.get("tokenizer", "")).n_vocab
        module = GT.create_model(image_size=size, inpaint=bool(train.get("inpaint")),
                                 super_res=bool(small), use_fp16=False,
                                 text_ctx=int(data.get("text_ctx", 128)), n_vocab=n_vocab, **model)
        module = module.clone(out_channels=6 if learn_sigma else 3)
    else:
        rates = _resolutions_to_rates(model.pop("attention_resolutions", ()), size)
        module = gd_models.build(cond.denoiser_class().__name__, image_size=size,
                                 in_channels=channels, attention_resolutions=rates,
                                 out_channels=spec.output_channels(channels),
                                 **cond.network_fields(), **model)
    return dict(kind="diffusion", network=network_config(module), spec=spec,
                conditioning=cond, image_shape=(size, size, channels))


def read_workdir(path, step: int | None = None) -> DiffusionModel:
    """The newest (or `step`'s) checkpoint of an old training workdir; all its weights (params
    and every EMA), sampling with the first EMA as the old sample CLI did by default."""
    path = pathlib.Path(path).absolute()
    config = ml_collections.ConfigDict(json.loads((path / "config.json").read_text()))
    parts = _old_workdir_parts(config)
    manager = CheckpointManager(path / "checkpoints", CheckpointConfig(async_save=False),
                                read_only=True)
    try:
        found = manager.latest_step() if step is None else step
        restored = manager.restore(None, found) if found is not None else None
    finally:
        manager.close()
    if restored is None:
        raise FileNotFoundError(f"{path}/checkpoints holds no checkpoint yet: train first")
    state, _ = restored
    rates = tuple(config.train.get("ema_rates", (0.9999,)))
    weights = {"params": state["params"]}
    weights.update({ema_name(r): e for r, e in zip(rates, state.get("ema", ()))})
    ev = dict(config.get("eval", {}))
    sampling = {"grid": ev.get("respacing", "ddim50"), "sampler": ev.get("sampler", "ddim"),
                "guidance_scale": ev.get("guidance_scale", 1.0)}
    use = ema_name(rates[0]) if rates else "params"
    return DiffusionModel(weights=weights, use=use, sampling=sampling,
                          provenance={"name": path.name, "legacy": str(path), "step": int(found)},
                          extra={"data": dict(config.data)}, **parts)


def read_feature_classifier(path) -> DiffusionModel:
    path = pathlib.Path(path).absolute()
    config = json.loads((path / "config.json").read_text())
    data = dict(config.get("data", {}))
    size, channels = int(data.get("image_size", 32)), int(data.get("channels", 1))
    module = FeatureClassifier(num_classes=int(config["train"]["num_classes"]),
                               **{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in config.get("model", {}).items()})
    template = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                              jnp.zeros((1, size, size, channels)))
    template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
    variables = flax.serialization.from_bytes(template, (path / "classifier.msgpack").read_bytes())
    metrics = json.loads((path / "metrics.json").read_text()) if (path / "metrics.json").is_file() else {}
    arrays = {}
    if (path / "reference_train.npz").is_file():
        with np.load(path / "reference_train.npz") as ref:
            arrays = {"reference_mu": ref["mu"], "reference_sigma": ref["sigma"]}
    return DiffusionModel(network=network_config(module), weights={"params": variables["params"]},
                          kind="feature_classifier", image_shape=(size, size, channels),
                          provenance={"name": path.name, "legacy": str(path)},
                          extra={"data": data, "metrics": metrics}, arrays=arrays)


def read(path) -> DiffusionModel | None:
    """The bundle of an old-format directory, or None when `path` is none of them."""
    if is_converted(path):
        return read_converted(path)
    if is_workdir(path):
        return read_workdir(path)
    if is_feature_classifier(path):
        return read_feature_classifier(path)
    return None
