"""`DiffusionModel`: the one thing that is saved, loaded, trained, converted and sampled.

A bundle is a network config (`diffjax.models.registry`), its weights (named parameter trees: the
trained "params" and each EMA, "ema_0.9999"; `use` names the ones that sample), the
`DiffusionSpec`, the `Conditioning`, the image shape, default sampling settings and provenance
(where the weights came from). Noisy classifiers (kind "classifier") and feature classifiers
(kind "feature_classifier") are bundles too, with no spec. `diffjax.save` / `diffjax.load`
(diffjax.io) store one as a single orbax checkpoint whose JSON metadata is `description()`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax

from diffjax.conditioning import Conditioning
from diffjax.core import fields
from diffjax.core.spec import DiffusionSpec
from diffjax.models.registry import build_network

FORMAT = "diffjax.DiffusionModel"
VERSION = 1
KINDS = ("diffusion", "classifier", "feature_classifier")
# Default sampling settings a bundle may carry (a preset's, or a training run's eval section).
SAMPLING_KEYS = ("grid", "sampler", "guidance_scale", "eta", "clip_denoised", "noise_scale",
                 "classifier_scale")


def ema_name(rate: float) -> str:
    return f"ema_{rate:g}"


@dataclasses.dataclass(frozen=True)
class DiffusionModel:
    """network: {"class": ..., fields}; weights: {name: params tree}; use: the name that
    `params` / `variables()` return; image_shape: (H, W, C) of the images the network sees."""

    network: Mapping[str, Any]
    weights: Mapping[str, Any]
    spec: DiffusionSpec | None = None
    conditioning: Conditioning = Conditioning()
    image_shape: tuple = ()
    use: str = "params"
    kind: str = "diffusion"
    sampling: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    provenance: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    arrays: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        fields.check_choice("DiffusionModel.kind", self.kind, KINDS)
        if self.use not in self.weights:
            raise ValueError(f"DiffusionModel.use={self.use!r} names no weights: it holds "
                             f"{sorted(self.weights)}")
        if self.kind == "diffusion" and self.spec is None:
            raise ValueError("a diffusion bundle needs a DiffusionSpec")
        fields.check_keys("DiffusionModel.sampling", self.sampling, SAMPLING_KEYS)
        object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))

    @functools.cached_property
    def module(self):
        """The Flax module of `network`."""
        return build_network(self.network)

    @property
    def params(self):
        return self.weights[self.use]

    def variables(self) -> dict:
        return {"params": self.params}

    def apply(self, *args, **kwargs):
        """module.apply(variables(), *args, **kwargs)."""
        return self.module.apply(self.variables(), *args, **kwargs)

    @property
    def ema_names(self) -> list[str]:
        return [n for n in self.weights if n.startswith("ema_")]

    def using(self, which) -> "DiffusionModel":
        """The same bundle sampling with other weights: a name ("params", "ema_0.9999"), "ema"
        (the first EMA), an EMA index (0, 1, ...) or -1 for the trained (non-EMA) parameters."""
        emas = self.ema_names
        if which == -1 or which == "raw":
            name = "params"
        elif which == "ema" and emas:
            name = emas[0]
        elif isinstance(which, int) and not isinstance(which, bool):
            if not 0 <= which < len(emas):
                raise ValueError(f"ema_index={which}: this model keeps {len(emas)} EMA(s) "
                                 f"({emas}); choose 0..{len(emas) - 1}, or -1 for the raw "
                                 f"parameters")
            name = emas[which]
        else:
            name = which
        if name not in self.weights:
            raise ValueError(f"weights {which!r} are not in this model: it holds "
                             f"{sorted(self.weights)}")
        return dataclasses.replace(self, use=name)

    def replace(self, **changes) -> "DiffusionModel":
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.params))

    def describe(self) -> str:
        name = self.provenance.get("name") or self.network.get("class")
        spec = (f", {self.spec.num_steps}-step {self.spec.beta_schedule} chain predicting "
                f"{self.spec.prediction}" if self.spec else "")
        return (f"{name}: {self.kind}, {self.network.get('class')} "
                f"{self.num_params / 1e6:.2f} M params ({self.use}), "
                f"{'x'.join(map(str, self.image_shape))}, {self.conditioning.describe()}{spec}")

    # Storage ----------------------------------------------------------------------------------
    def description(self) -> dict:
        """Everything but the arrays, as JSON (what a checkpoint's metadata holds)."""
        return {"format": FORMAT, "version": VERSION, "kind": self.kind,
                "network": dict(self.network),
                "spec": None if self.spec is None else self.spec.to_dict(),
                "conditioning": self.conditioning.to_list(),
                "image_shape": list(self.image_shape), "use": self.use,
                "weights": list(self.weights), "arrays": list(self.arrays),
                "sampling": dict(self.sampling), "provenance": dict(self.provenance),
                "extra": dict(self.extra)}

    @classmethod
    def from_description(cls, description: Mapping, weights: Mapping,
                         arrays: Mapping | None = None) -> "DiffusionModel":
        d = dict(description)
        if d.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} description (format {d.get('format')!r})")
        if int(d.get("version", 0)) > VERSION:
            raise ValueError(f"this bundle was written by a newer diffjax (format version "
                             f"{d['version']} > {VERSION}): upgrade diffjax to read it")
        return cls(network=d["network"], weights=dict(weights),
                   spec=None if d.get("spec") is None else DiffusionSpec.from_dict(d["spec"]),
                   conditioning=Conditioning.from_list(d.get("conditioning")),
                   image_shape=tuple(d.get("image_shape", ())), use=d.get("use", "params"),
                   kind=d.get("kind", "diffusion"), sampling=d.get("sampling", {}),
                   provenance=d.get("provenance", {}), extra=d.get("extra", {}),
                   arrays=dict(arrays or {}))
