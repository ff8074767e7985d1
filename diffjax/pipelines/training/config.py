"""The experiment config: the one place that reads an ml_collections ConfigDict for training.

Sections (every key is checked: an unknown or misspelled one is an error naming the closest):

    data          diffjax.data.DataConfig (source, path, image_size, channels, captions, ...)
    model         the network's own fields (diffjax.models; attention_resolutions are resolutions,
                  e.g. (16, 8), converted to downsample rates here); the class, image size,
                  channels, output channels, label rows and text vocabulary follow from the other
                  sections and are not given here
    diffusion     DiffusionSpec (beta_schedule, num_steps, prediction, variance, loss, ...)
    conditioning  {kind: settings} of diffjax.conditioning ({} = unconditional), e.g.
                  {"class": {"num_classes": 10, "dropout": 0.1}}; for task="classifier" the class
                  kind names the labels the classifier predicts
    train         TrainConfig; optim: OptimConfig; checkpoint: CheckpointConfig; eval: EvalConfig
    log_every, init_from (a model to fine-tune: anything diffjax.load reads)
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from diffjax import data as data_lib
from diffjax import tokenizer as tokenizer_lib
from diffjax.bundle import DiffusionModel
from diffjax.conditioning import KINDS, ClassLabel, Conditioning, Text
from diffjax.core import fields
from diffjax.core import samplers as SM
from diffjax.core import timestep_sampling
from diffjax.core.spec import DiffusionSpec
from diffjax.core.timegrid import TimeGrid
from diffjax.io.checkpoints import CheckpointConfig
from diffjax.models.classifier import EncoderUNetModel
from diffjax.models.registry import build_network, network_config, network_fields
from diffjax.pipelines.training.optim import OptimConfig

TASKS = ("diffusion", "classifier")
SECTIONS = ("data", "model", "diffusion", "conditioning", "train", "optim", "checkpoint", "eval",
            "log_every", "init_from")
# Network fields that the other sections decide.
DERIVED_FIELDS = ("image_size", "in_channels", "out_channels", "num_classes", "n_vocab",
                  "text_ctx", "dtype", "use_checkpoint")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What one step does. batch_size is GLOBAL (split over all devices and processes);
    microbatch > 0 accumulates gradients over batch_size / microbatch chunks (GD's --microbatch);
    ema_rates: one EMA of the parameters per rate, decay min(rate, (1 + n) / (10 + n)) at update n
    when ema_warmup; compute_dtype "auto" is bfloat16 on GPU / TPU and float32 on CPU (parameters
    and optimizer state are float32 either way); max_bad_steps: consecutive non-finite steps that
    stop the run; peak_tflops: one device's peak TFLOP/s in the compute dtype, against which the
    model FLOP utilisation `mfu` is logged (0: the datasheet value of a known device,
    metrics.PEAK_TFLOPS; no `mfu` for an unknown one)."""

    task: str = "diffusion"
    batch_size: int = 32
    microbatch: int = 0
    total_steps: int = 1000
    steps_per_dispatch: int = 1
    ema_rates: tuple = (0.9999,)
    ema_warmup: bool = True
    compute_dtype: str = "auto"
    remat: bool = False
    fsdp: int = 1
    max_bad_steps: int = 20
    schedule_sampler: str = "uniform"
    seed: int = 0
    peak_tflops: float = 0.0

    def __post_init__(self):
        fields.check_choice("train.task", self.task, TASKS)
        for name in ("batch_size", "total_steps", "steps_per_dispatch", "fsdp", "max_bad_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"train.{name}={value!r} must be a positive integer")
        if not isinstance(self.microbatch, int) or self.microbatch < 0:
            raise ValueError(f"train.microbatch={self.microbatch!r} must be an integer >= 0")
        if self.microbatch and self.batch_size % self.microbatch:
            raise ValueError(f"train.microbatch={self.microbatch} does not divide train.batch_size="
                             f"{self.batch_size}: choose a divisor, or 0 for no accumulation")
        if self.total_steps % self.steps_per_dispatch:
            raise ValueError(f"train.steps_per_dispatch={self.steps_per_dispatch} must divide "
                             f"train.total_steps={self.total_steps}")
        for rate in self.ema_rates:
            fields.check_finite("train.ema_rates", rate, low=0.0, high=1.0, high_open=True)
        fields.check_choice("train.compute_dtype", self.compute_dtype,
                            ("auto", "float32", "bfloat16"))
        fields.check_choice("train.schedule_sampler", self.schedule_sampler,
                            timestep_sampling.SAMPLER_NAMES)
        fields.check_finite("train.peak_tflops", self.peak_tflops, low=0.0)

    @property
    def num_microbatches(self) -> int:
        return self.batch_size // self.microbatch if self.microbatch else 1

    def resolved_dtype(self):
        if self.compute_dtype == "auto":
            return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
        return jnp.dtype(self.compute_dtype)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """After training: a sample grid (per_class columns per class, or rows x per_class images for
    an unconditional model; per_class=0: no samples, no bits/dim) drawn with `sampler` over
    the time grid `respacing`, classifier-free guidance `guidance_scale` (1 = the conditional
    model); bits/dim by a Monte-Carlo estimate of the variational bound on `bpd_images` test
    images x `bpd_t_per_image` uniform timesteps (plus the exact decoder term);
    ema_index: which EMA rate samples (-1: the raw parameters); prompts: text-conditional models
    draw one row of per_class samples per prompt."""

    per_class: int = 8
    rows: int = 8
    sampler: str = "ddim"
    respacing: str = "ddim50"
    guidance_scale: float = 1.0
    ema_index: int = 0
    sample_every: int = 0
    bpd_images: int = 0
    bpd_t_per_image: int = 4
    bpd_split: str = "test"
    batch: int = 200
    seed: int = 0
    prompts: tuple = ()

    def __post_init__(self):
        fields.check_choice("eval.sampler", self.sampler, SM.SAMPLERS)
        fields.check_finite("eval.guidance_scale", self.guidance_scale)
        for name in ("per_class", "rows", "sample_every", "bpd_images", "bpd_t_per_image", "batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"eval.{name}={value!r} must be an integer >= 0")
        TimeGrid.parse(self.respacing or None).timesteps(10_000)  # a malformed grid fails now


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A validated experiment config: the model half (network config, spec, conditioning) and
    the training half (data, train, optim, checkpoint, eval)."""

    data: data_lib.DataConfig
    network: dict
    spec: DiffusionSpec
    conditioning: Conditioning
    train: TrainConfig
    optim: OptimConfig
    checkpoint: CheckpointConfig
    eval: EvalConfig
    log_every: int
    init_from: str
    init_model: Any = None  # the DiffusionModel of init_from, loaded by the caller

    @property
    def image_shape(self) -> tuple:
        return (self.data.image_size, self.data.image_size, self.data.channels)

    def description(self) -> dict:
        """The bundle description of the model being trained (weights named as the trainer
        keeps them: the parameters and one EMA per rate)."""
        names = ["params"] + [f"ema_{r:g}" for r in self.train.ema_rates]
        model = DiffusionModel(
            network=self.network, weights={n: {} for n in names}, spec=self.spec,
            conditioning=self.conditioning, image_shape=self.image_shape,
            use=names[1 + self.eval.ema_index] if 0 <= self.eval.ema_index < len(names) - 1
            else "params",
            kind="classifier" if self.train.task == "classifier" else "diffusion",
            sampling={"grid": self.eval.respacing or None, "sampler": self.eval.sampler,
                      "guidance_scale": self.eval.guidance_scale
                      if self.conditioning.droppable else None}
            if self.train.task == "diffusion" else {},
            provenance={"trained_with": "diffjax.train"}, extra={"data": dataclasses.asdict(self.data)})
        description = model.description()
        description["sampling"] = {k: v for k, v in description["sampling"].items() if v is not None}
        return description


def _resolutions_to_rates(resolutions, image_size: int) -> tuple:
    if isinstance(resolutions, str):
        resolutions = [int(r) for r in resolutions.split(",") if r.strip()]
    resolutions = tuple(int(r) for r in resolutions)
    bad = [r for r in resolutions if r < 1 or image_size % r]
    if bad:
        raise ValueError(f"model.attention_resolutions={resolutions}: {bad} do not divide "
                         f"image_size={image_size}; give resolutions such as {image_size // 4}")
    return tuple(image_size // r for r in resolutions)


def _text_settings(section: dict, data: data_lib.DataConfig) -> dict:
    """The text kind's settings, its tokenizer and context taken from the data section (which
    tokenizes the captions) unless given, and then they must agree."""
    text = dict(section.get("text") or {})
    for name, value in (("tokenizer", data.tokenizer), ("text_ctx", data.text_ctx)):
        if name in text and text[name] != value:
            raise ValueError(f"conditioning.text.{name}={text[name]!r} differs from data.{name}="
                             f"{value!r}: the data pipeline tokenizes with data.{name}; set them "
                             f"equal or leave conditioning.text.{name} out")
        text[name] = value
    if not data.captions:
        raise ValueError("conditioning 'text' needs captions: set data.captions (the caption "
                         "feature, 'txt' for an image folder with .txt files) and data.tokenizer")
    return text


def _network_class(task: str, cond: Conditioning):
    """The network a task trains: the noisy classifier, or the denoiser the conditioning needs."""
    return EncoderUNetModel if task == "classifier" else cond.denoiser_class()


def _network(model_section: dict, task: str, cond: Conditioning, spec: DiffusionSpec,
             data: data_lib.DataConfig, train: TrainConfig) -> dict:
    """The network config of the `model` section and what the other sections decide."""
    flags = dict(model_section)
    derived = sorted(set(flags) & set(DERIVED_FIELDS))
    if derived:
        raise ValueError(f"model.{derived[0]} is decided by the other sections (data, "
                         f"diffusion, conditioning, train): remove it from the model section")
    flags["attention_resolutions"] = _resolutions_to_rates(flags.get("attention_resolutions", ()),
                                                           data.image_size)
    common = dict(image_size=data.image_size, in_channels=data.channels,
                  dtype=train.resolved_dtype(), use_checkpoint=train.remat)
    if task == "classifier":
        labels = cond.get(ClassLabel)
        if labels is None or len(cond.kinds) != 1:
            raise ValueError("train.task='classifier' predicts class labels: set conditioning = "
                             "{'class': {'num_classes': N}} (and nothing else)")
        extra = dict(out_channels=labels.num_classes)
    else:
        extra = dict(out_channels=spec.output_channels(data.channels), **cond.network_fields())
        text = cond.get(Text)
        if text is not None:
            extra["n_vocab"] = tokenizer_lib.load(text.tokenizer).n_vocab
    cls = _network_class(task, cond)
    fields.check_keys(f"model (a {cls.__name__})", flags, network_fields(cls))
    return network_config(cls(**common, **extra, **flags))


def config_keys(path: tuple[str, ...], config: ml_collections.ConfigDict) -> list[str] | None:
    """The keys the schema accepts at `path` of a training config (() is the top level), or None
    where it does not say (free-form values). Lets `--config.train.fsdp=2` set a field that the
    config file left at its default."""
    settings = {("train",): TrainConfig, ("data",): data_lib.DataConfig, ("optim",): OptimConfig,
                ("checkpoint",): CheckpointConfig, ("eval",): EvalConfig,
                ("diffusion",): DiffusionSpec}
    if path == ():
        return list(SECTIONS)
    if path in settings:
        return fields.names(settings[path])
    if path == ("conditioning",):
        return list(KINDS)
    if len(path) == 2 and path[0] == "conditioning" and path[1] in KINDS:
        return fields.names(KINDS[path[1]])
    if path == ("model",):
        cls = _network_class((config.get("train") or {}).get("task", "diffusion"),
                             Conditioning.from_config(dict(config.get("conditioning") or {})))
        return [name for name in network_fields(cls) if name not in DERIVED_FIELDS]
    return None


def experiment_from_config(config: ml_collections.ConfigDict, init_model=None) -> Experiment:
    """Validate every section of `config` and build the experiment. `init_model`: the loaded
    DiffusionModel of config.init_from (its network and spec then replace the config's)."""
    fields.check_keys("the config", config.keys(), SECTIONS)
    train = fields.from_dict(TrainConfig, config.get("train", {}), "train")
    data = fields.from_dict(data_lib.DataConfig, config.get("data", {}), "data")
    section = dict(config.get("conditioning") or {})
    if "text" in section:
        section["text"] = _text_settings(section, data)
    cond = Conditioning.from_config(section)
    if cond.get(Text) is None and data.captions:
        raise ValueError(f"data.captions={data.captions!r} is set but the model is not "
                         f"conditioned on text: add conditioning.text (e.g. {{'dropout': 0.2}})")
    optim = fields.from_dict(OptimConfig, config.get("optim", {}), "optim",
                             total_steps=train.total_steps)
    checkpoint = fields.from_dict(CheckpointConfig, config.get("checkpoint", {}), "checkpoint")
    if checkpoint.every % train.steps_per_dispatch:
        raise ValueError(f"checkpoint.every={checkpoint.every} must be a multiple of "
                         f"train.steps_per_dispatch={train.steps_per_dispatch}")
    ev = fields.from_dict(EvalConfig, config.get("eval", {}), "eval")
    if not -1 <= ev.ema_index < max(len(train.ema_rates), 1):
        raise ValueError(f"eval.ema_index={ev.ema_index}: train.ema_rates has "
                         f"{len(train.ema_rates)} rate(s); choose 0..{len(train.ema_rates) - 1} "
                         f"or -1 for the raw parameters")
    log_every = int(config.get("log_every", 100))
    if init_model is not None:
        for name in ("model", "diffusion"):
            if config.get(name):
                raise ValueError(f"init_from={config.init_from!r} brings its own network and "
                                 f"diffusion: leave the {name} section empty")
        spec = init_model.spec
        if not section:
            cond = init_model.conditioning
        network = dict(init_model.network, dtype=jnp.dtype(train.resolved_dtype()).name,
                       use_checkpoint=train.remat)
        target = cond.denoiser_class().__name__
        if network["class"] != target:  # e.g. GLIDE text2im -> inpainting (finetune.py)
            network["class"] = target
        network = network_config(build_network(network))
    else:
        spec = DiffusionSpec.from_dict(config.get("diffusion", {}))
        network = _network(dict(config.get("model") or {}), train.task, cond, spec, data, train)
    return Experiment(data=data, network=network, spec=spec, conditioning=cond, train=train,
                      optim=optim, checkpoint=checkpoint, eval=ev, log_every=log_every,
                      init_from=str(config.get("init_from") or ""), init_model=init_model)
