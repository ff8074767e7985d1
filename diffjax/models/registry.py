"""Networks by name: a module's configuration as plain JSON, and back.

A network config is `{"class": "UNetModel", <the module's constructor fields>}` with dtypes and
precisions as strings, so that a model bundle stores it as JSON and rebuilds exactly the module
that was saved. `denoiser_class(inputs)` says which UNet takes a given set of conditioning inputs
(the conditioning registry asks, so that it never names a network class itself).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp
from jax import lax

from diffjax.core import fields
from diffjax.models.classifier import EncoderUNetModel
from diffjax.models.feature_classifier import FeatureClassifier
from diffjax.models.glide import (
    InpaintText2ImUNet, SuperResInpaintText2ImUNet, SuperResText2ImUNet, Text2ImUNet)
from diffjax.models.unet import SuperResModel, UNetModel

NETWORKS = {cls.__name__: cls for cls in (
    UNetModel, SuperResModel, EncoderUNetModel, Text2ImUNet, InpaintText2ImUNet,
    SuperResText2ImUNet, SuperResInpaintText2ImUNet, FeatureClassifier)}

# The conditioning inputs each denoiser takes (beyond x and t): "y" class labels, "text" caption
# tokens, "low_res" an image to upsample, "inpaint" a known image and its mask.
_DENOISER_INPUTS = {
    UNetModel: {frozenset(), frozenset({"y"})},
    SuperResModel: {frozenset({"low_res"}), frozenset({"low_res", "y"})},
    Text2ImUNet: {frozenset({"text"})},
    InpaintText2ImUNet: {frozenset({"text", "inpaint"})},
    SuperResText2ImUNet: {frozenset({"text", "low_res"})},
    SuperResInpaintText2ImUNet: {frozenset({"text", "inpaint", "low_res"})},
}


def denoiser_class(inputs) -> type:
    """The denoiser class that takes exactly these conditioning inputs."""
    inputs = frozenset(inputs)
    for cls, accepted in _DENOISER_INPUTS.items():
        if inputs in accepted:
            return cls
    raise ValueError(f"no denoiser takes the conditioning inputs {sorted(inputs)}: supported sets "
                     f"are {sorted(sorted(s) for v in _DENOISER_INPUTS.values() for s in v)}")


def _plain(value):
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, lax.Precision):
        return value.name.lower()
    return value


def network_fields(cls) -> list[str]:
    """The settings of a network class: its init fields but flax's own (parent, name)."""
    return fields.names(cls, exclude=("parent", "name"))


def network_config(module) -> dict:
    """{"class": name, field: value, ...} of a registered Flax module, JSON-ready."""
    name = type(module).__name__
    if NETWORKS.get(name) is not type(module):
        raise ValueError(f"{name} is not a registered network: choose from {sorted(NETWORKS)}")
    config = {"class": name}
    for f in dataclasses.fields(module):
        if not f.init or f.name in ("parent", "name"):
            continue
        value = getattr(module, f.name)
        if f.name == "dtype":
            value = jnp.dtype(value).name
        config[f.name] = _plain(value)
    return config


def build_network(config: Mapping[str, Any], **overrides):
    """The module of a network config; `overrides` replace fields (e.g. dtype, use_checkpoint).
    Unknown fields are an error naming the closest valid one."""
    config = {**dict(config), **overrides}
    name = config.pop("class", None)
    if name not in NETWORKS:
        raise ValueError(f"network class {name!r} is unknown{fields.closest(name, NETWORKS)}: "
                         f"choose from {sorted(NETWORKS)}")
    cls = NETWORKS[name]
    fields.check_keys(f"network {name}", config, network_fields(cls))
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    if isinstance(kwargs.get("dtype"), str):
        kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
    if isinstance(kwargs.get("precision"), str):
        kwargs["precision"] = lax.Precision[kwargs["precision"].upper()]
    return cls(**kwargs)
