"""Conditioning: what a model is conditioned on, as a protocol with one registry.

A `Conditioning` is a tuple of kinds; each kind owns everything about its inputs:

* how a training batch provides them (`batch_keys`, checked on the host by `check_batch`),
* how the network consumes them (`inputs`: the denoiser inputs it fills, `network_fields`: the
  network settings it implies, `model_kwargs`: batch -> the network's keyword arguments),
* how it is dropped for classifier-free guidance (`dropout` in training; `null_kwargs`: the
  unconditional branch when sampling),
* how a sampling request asks for it (`request_keys`, `sampling_kwargs`) and how the command line
  does (`add_arguments`, `request_from_args`).

Kinds: "class" (a class label, with a null label for classifier-free guidance when trained with
label dropout), "text" (GLIDE's caption tokens), "low_res" (the image a super-resolution model
upsamples), "inpaint" (GLIDE's inpainting inputs: the known image and its mask). No kind: an
unconditional model. This module is the only place that knows the kinds: everything else asks a
`Conditioning`. A new kind is one class here, registered in KINDS.

Why one module of ~600 lines: because the protocol and every kind belong together (the promise is
that nothing outside this file knows the kinds), and each kind is only ~60 lines.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import tokenizer as tokenizer_lib
from diffjax.core import fields
from diffjax.models.registry import denoiser_class


# --------------------------------------------------------------------------- shared maths


def area_downsample(x, size: int):
    """Average-pool x [B, H, W, C] to [B, size, size, C] (F.interpolate(mode="area") for an
    integer factor: guided-diffusion's super-resolution low-res input)."""
    b, h, w, c = x.shape
    if h % size or w % size:
        raise ValueError(f"low_res size={size} must divide the image size {h}x{w}")
    return x.reshape(b, size, h // size, size, w // size, c).mean(axis=(2, 4))


def quantize_8bit(x):
    """GLIDE's low-resolution input: x [-1, 1] rounded to the 256 levels of an 8-bit image,
    ((x + 1) * 127.5).round() / 127.5 - 1 (round half to even, as torch.round)."""
    return jnp.round((jnp.asarray(x, jnp.float32) + 1) * 127.5) / 127.5 - 1


def drop_captions(key, tokens, mask, rate, pad_token: int):
    """Caption dropout for classifier-free training (GLIDE: 20 %): each row of tokens [B, L] /
    mask [B, L] becomes the empty caption (all pad_token, mask False) with probability `rate`.
    -> (tokens, mask, dropped [B] bool)"""
    dropped = jax.random.uniform(key, tokens.shape[:1]) < rate
    tokens = jnp.where(dropped[:, None], jnp.asarray(pad_token, tokens.dtype), tokens)
    mask = jnp.where(dropped[:, None], False, mask)
    return tokens, mask, dropped


def random_inpaint_masks(key, batch: int, size: int, *, min_frac=0.1, max_frac=0.75,
                         max_boxes: int = 3):
    """Random training masks [batch, size, size, 1] float32, 1 = known, 0 = to fill in (the GLIDE
    paper fine-tunes its inpainting model on "random regions of training examples erased"; the
    exact distribution was not released). Each mask erases the union of 1..max_boxes axis-aligned
    rectangles whose sides are uniform in [min_frac, max_frac] of the image side, anywhere in it;
    a quarter of the examples erase everything outside one rectangle instead (outpainting)."""
    k_n, k_box, k_out = jax.random.split(key, 3)
    n = jax.random.randint(k_n, (batch,), 1, max_boxes + 1)
    u = jax.random.uniform(k_box, (batch, max_boxes, 4))
    lo, hi = min_frac * size, max_frac * size
    h = jnp.floor(lo + u[..., 0] * (hi - lo + 1))
    w = jnp.floor(lo + u[..., 1] * (hi - lo + 1))
    top = jnp.floor(u[..., 2] * (size - h + 1))
    left = jnp.floor(u[..., 3] * (size - w + 1))
    pix = jnp.arange(size, dtype=jnp.float32)
    rows = (pix >= top[..., None]) & (pix < (top + h)[..., None])     # [B, K, S]
    cols = (pix >= left[..., None]) & (pix < (left + w)[..., None])
    boxes = rows[..., :, None] & cols[..., None, :]                   # [B, K, S, S]
    boxes = boxes & (jnp.arange(max_boxes) < n[:, None])[..., None, None]
    erased = jnp.any(boxes, axis=1)
    outpaint = jax.random.uniform(k_out, (batch,)) < 0.25
    erased = jnp.where(outpaint[:, None, None], ~boxes[:, 0], erased)
    return (~erased).astype(jnp.float32)[..., None]


def empty_caption(text_ctx: int, pad_token: int):
    """The unconditional caption: text_ctx padding tokens, mask all False (glide-text2im's
    padded_tokens_and_mask([], text_ctx)). -> (tokens [1, text_ctx] int32, mask [1, text_ctx])"""
    return jnp.full((1, text_ctx), pad_token, jnp.int32), jnp.zeros((1, text_ctx), bool)


def _text_emb_impl(variables, tokens, mask, module):
    return module.apply(variables, tokens, mask, method="get_text_emb")


_text_emb = jax.jit(_text_emb_impl, static_argnames=("module",))


def text_embedding(model, tokens, mask) -> dict:
    """A caption's transformer outputs, computed once per sampling request: {"xf_proj":
    [B, 4 model_channels], "xf_out": [B, text_ctx, xf_width]} (the network's `text_emb`).
    `model` is (module, variables)."""
    module, variables = model
    return _text_emb(variables, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, bool),
                     module=module)


def inpaint_inputs(image, mask) -> dict:
    """The inpainting network's inputs: inpaint_image = image * mask [B, H, W, C] and
    inpaint_mask [B, H, W, 1] (1 = known)."""
    return {"inpaint_image": image * mask, "inpaint_mask": mask}


def _batch_of(value, batch: int, what: str):
    """value [1 or batch, ...] -> [batch, ...]."""
    value = jnp.asarray(value)
    if value.shape[0] not in (1, batch):
        raise ValueError(f"{value.shape[0]} {what} for a batch of {batch}: give one, or one per "
                         f"image")
    return jnp.broadcast_to(value, (batch,) + value.shape[1:])


# --------------------------------------------------------------------------- the protocol


class Kind:
    """One kind of conditioning (see the module docstring). Subclasses are frozen dataclasses
    whose fields are the kind's settings."""

    name: ClassVar[str]
    inputs: ClassVar[frozenset] = frozenset()     # denoiser inputs it fills
    batch_keys: ClassVar[tuple] = ()              # what a training batch must hold
    request_keys: ClassVar[tuple] = ()            # what a sampling request may give
    self_contained: ClassVar[bool] = True         # samples without an input (a grid can be drawn)

    def network_fields(self) -> dict:
        """Network settings this kind implies (e.g. the label embedding's rows)."""
        return {}

    def check_batch(self, batch: Mapping[str, np.ndarray]) -> None:
        """Host-side validation of a training batch (before it reaches a compiled step)."""
        missing = [k for k in self.batch_keys if k not in batch]
        if missing:
            raise ValueError(f"conditioning {self.name!r} needs batches with {list(self.batch_keys)}"
                             f" (missing {missing}; the batch has {sorted(batch)})")

    def model_kwargs(self, batch: Mapping, key=None) -> dict:
        """The network's keyword arguments for a training / evaluation batch; with a key, the
        kind's dropout for classifier-free training is applied."""
        return {}

    @property
    def droppable(self) -> bool:
        """Whether the model has an unconditional branch for classifier-free guidance."""
        return False

    def null_kwargs(self, model, request: Mapping) -> dict:
        """The unconditional branch's keyword arguments (a leading batch dim of 1 broadcasts);
        `model` is (module, variables), `request` the sampling request."""
        raise ValueError(f"conditioning {self.name!r} of this model has no unconditional branch: "
                         f"classifier-free guidance needs a model trained with its dropout")

    def sampling_kwargs(self, request: Mapping, batch: int, key, model) -> dict:
        """The network's keyword arguments for sampling `batch` images from a request
        (`request_keys`); `model` is (module, variables)."""
        return {}

    def grid(self, per_class: int, prompts: tuple) -> tuple | None:
        """(row labels, sampling request) of a preview grid with `per_class` samples per row,
        or None when this kind does not decide the rows."""
        return None

    def describe(self) -> str:
        return self.name

    def to_dict(self) -> dict:
        return {"kind": self.name, **fields.to_dict(self)}

    # Command line ------------------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser) -> None:
        """Options of `diffjax sample` that fill this kind's request keys."""

    @classmethod
    def request_from_args(cls, args) -> dict:
        return {}


@dataclasses.dataclass(frozen=True)
class ClassLabel(Kind):
    """A class label y in [0, num_classes). Trained with `dropout` > 0, labels are replaced by the
    null label num_classes with that probability (classifier-free guidance, Ho & Salimans 2021),
    and the embedding has num_classes + 1 rows."""

    num_classes: int
    dropout: float = 0.0

    name: ClassVar[str] = "class"
    inputs: ClassVar[frozenset] = frozenset({"y"})
    batch_keys: ClassVar[tuple] = ("label",)
    request_keys: ClassVar[tuple] = ("labels",)

    def __post_init__(self):
        if not isinstance(self.num_classes, (int, np.integer)) or self.num_classes < 1:
            raise ValueError(f"conditioning.class.num_classes={self.num_classes!r} must be a "
                             f"positive integer (e.g. 10 for Fashion-MNIST)")
        fields.check_finite("conditioning.class.dropout", self.dropout, low=0.0, high=1.0,
                            high_open=True)

    @property
    def null_label(self) -> int | None:
        return self.num_classes if self.dropout > 0 else None

    @property
    def droppable(self) -> bool:
        return self.null_label is not None

    def network_fields(self) -> dict:
        return {"num_classes": self.num_classes + self.droppable}

    def check_batch(self, batch) -> None:
        super().check_batch(batch)
        labels = np.asarray(batch["label"])
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            bad = labels[(labels < 0) | (labels >= self.num_classes)]
            raise ValueError(f"the data has label {int(bad[0])}, outside [0, num_classes="
                             f"{self.num_classes}): set conditioning.class.num_classes to the "
                             f"dataset's number of classes")

    def model_kwargs(self, batch, key=None) -> dict:
        y = jnp.asarray(batch["label"]).astype(jnp.int32)
        if key is not None and self.dropout:
            y = jnp.where(jax.random.uniform(key, y.shape) < self.dropout, self.num_classes, y)
        return {"y": y}

    def null_kwargs(self, model, request) -> dict:
        if not self.droppable:
            super().null_kwargs(model, request)
        return {"y": jnp.full((1,), self.null_label, jnp.int32)}

    def labels(self, request: Mapping, batch: int, key) -> jnp.ndarray:
        """[batch] int32: the request's labels (one for all, or one each), else random ones."""
        labels = request.get("labels")
        if labels is None:
            return jax.random.randint(key, (batch,), 0, self.num_classes)
        labels = np.atleast_1d(np.asarray(labels))
        if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"labels {labels.tolist()[:8]} must be integers in [0, "
                             f"{self.num_classes}) for this model of {self.num_classes} classes")
        return _batch_of(labels.astype(np.int32), batch, "labels")

    def sampling_kwargs(self, request, batch, key, model) -> dict:
        return {"y": self.labels(request, batch, key)}

    def grid(self, per_class, prompts):
        labels = np.repeat(np.arange(self.num_classes, dtype=np.int32), per_class)
        return list(range(self.num_classes)), {"labels": labels}

    def describe(self) -> str:
        null = f", null label {self.null_label}" if self.droppable else ""
        return f"class ({self.num_classes} classes{null})"

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--labels", "--class_label", dest="labels",
                            help="class labels: one for every sample, or a comma list of one per "
                            "sample (default: random)")

    @classmethod
    def request_from_args(cls, args) -> dict:
        if args.labels is None:
            return {}
        try:
            return {"labels": [int(v) for v in str(args.labels).split(",") if v.strip()]}
        except ValueError:
            raise ValueError(f"--labels {args.labels!r}: give integers, e.g. --labels 3 or "
                             f"--labels 0,1,2,3") from None


@dataclasses.dataclass(frozen=True)
class Text(Kind):
    """A caption: GLIDE's tokens [text_ctx] and mask [text_ctx] (True for real tokens), from the
    tokenizer `tokenizer` (glide-text2im's GPT-2 BPE folder, or "bytes"; "" = the installed
    glide-text2im's). Trained with `dropout` > 0 (GLIDE: 0.2), captions are replaced by the
    empty caption, which is then the unconditional branch of classifier-free guidance."""

    text_ctx: int = 128
    tokenizer: str = ""
    dropout: float = 0.0

    name: ClassVar[str] = "text"
    inputs: ClassVar[frozenset] = frozenset({"text"})
    batch_keys: ClassVar[tuple] = ("tokens", "mask")
    request_keys: ClassVar[tuple] = ("prompts", "tokenizer")

    def __post_init__(self):
        if not isinstance(self.text_ctx, (int, np.integer)) or self.text_ctx < 1:
            raise ValueError(f"conditioning.text.text_ctx={self.text_ctx!r} must be >= 1 (GLIDE: "
                             f"128)")
        fields.check_finite("conditioning.text.dropout", self.dropout, low=0.0, high=1.0,
                            high_open=True)

    def load_tokenizer(self, override: str | None = None):
        spec = override or self.tokenizer
        if not spec:
            try:
                spec = str(tokenizer_lib.glide_tokenizer_dir())
            except FileNotFoundError:
                raise FileNotFoundError(
                    "GLIDE needs its tokenizer's vocabulary: pass the folder glide_text2im/"
                    "tokenizer/ of the glide-text2im package (it holds encoder.json.gz and "
                    "vocab.bpe.gz, the GPT-2 BPE of the released models, beside "
                    "bpe_simple_vocab_16e6.txt.gz), e.g. from a clone of "
                    "https://github.com/openai/glide-text2im") from None
        return tokenizer_lib.load(spec)

    def network_fields(self) -> dict:
        return {"text_ctx": self.text_ctx}

    def model_kwargs(self, batch, key=None) -> dict:
        tokens = jnp.asarray(batch["tokens"]).astype(jnp.int32)
        mask = jnp.asarray(batch["mask"]).astype(bool)
        if key is not None and self.dropout:
            tokens, mask, _ = drop_captions(key, tokens, mask, self.dropout, self.pad_token)
        return {"tokens": tokens, "mask": mask}

    @property
    def droppable(self) -> bool:
        return True  # the empty caption; the released GLIDE models were trained with it

    @property
    def pad_token(self) -> int:
        """The empty caption's padding: the tokenizer's end token."""
        return self.load_tokenizer().end_token

    def null_kwargs(self, model, request) -> dict:
        tokenizer = self.load_tokenizer(request.get("tokenizer"))
        return {"text_emb": text_embedding(model, *empty_caption(self.text_ctx,
                                                                  tokenizer.end_token))}

    def sampling_kwargs(self, request, batch, key, model) -> dict:
        prompts = request.get("prompts")
        if prompts is None:
            raise ValueError("this model draws captions: pass --prompt '...' (in Python: "
                             "prompts=['...'])")
        tokenizer = self.load_tokenizer(request.get("tokenizer"))
        tokenizer_lib.check_vocabulary(tokenizer, getattr(model[0], "n_vocab", None),
                                       type(model[0]).__name__)
        tokens, mask = tokenizer_lib.tokens_and_mask(tokenizer, prompts, self.text_ctx)
        tokens, mask = _batch_of(tokens, batch, "prompts"), _batch_of(mask, batch, "prompts")
        # The caption's transformer runs once per request, not once per step.
        return {"text_emb": text_embedding(model, tokens, mask)}

    def grid(self, per_class, prompts):
        prompts = list(prompts) or [""]
        return prompts, {"prompts": [p for p in prompts for _ in range(per_class)]}

    def describe(self) -> str:
        return f"text ({self.text_ctx} tokens)"

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--prompt", help="the caption to draw ('' = unconditional)")
        parser.add_argument("--tokenizer", "--bpe", dest="tokenizer",
                            help="GLIDE's tokenizer folder (glide_text2im/tokenizer/ with "
                            "encoder.json.gz and vocab.bpe.gz) or 'bytes' (default: the model's, "
                            "else the installed glide-text2im's)")

    @classmethod
    def request_from_args(cls, args) -> dict:
        request = {}
        if args.prompt is not None:
            request["prompts"] = [args.prompt]
        if args.tokenizer:
            request["tokenizer"] = args.tokenizer
        return request


@dataclasses.dataclass(frozen=True)
class LowRes(Kind):
    """The image a super-resolution model upsamples, [B, size, size, C] in [-1, 1]: in training
    the batch area-downsampled to `size` (guided-diffusion's super_res_train), quantised to 8 bits
    when `quantize` (GLIDE samples its upsampler from 8-bit base samples)."""

    size: int
    quantize: bool = False

    name: ClassVar[str] = "low_res"
    inputs: ClassVar[frozenset] = frozenset({"low_res"})
    self_contained: ClassVar[bool] = False
    batch_keys: ClassVar[tuple] = ("image",)
    request_keys: ClassVar[tuple] = ("low_res",)

    def __post_init__(self):
        if not isinstance(self.size, (int, np.integer)) or self.size < 1:
            raise ValueError(f"conditioning.low_res.size={self.size!r} must be a positive integer "
                             f"(the low-resolution side, e.g. 64)")

    def _prepare(self, low_res):
        low_res = jnp.asarray(low_res, jnp.float32)
        return quantize_8bit(low_res) if self.quantize else low_res

    def model_kwargs(self, batch, key=None) -> dict:
        image = jnp.asarray(batch["image"]).astype(jnp.float32)
        return {"low_res": self._prepare(area_downsample(image, self.size))}

    def sampling_kwargs(self, request, batch, key, model) -> dict:
        low_res = request.get("low_res")
        if low_res is None:
            raise ValueError(f"a super-resolution model upsamples an image: pass low_res= "
                             f"[B, {self.size}, {self.size}, C] in [-1, 1] or uint8 (command line: "
                             f"--low_res samples.npz)")
        low_res = np.asarray(low_res)
        if low_res.dtype == np.uint8:
            low_res = low_res.astype(np.float32) / 127.5 - 1
        if low_res.ndim != 4:
            raise ValueError(f"low_res has shape {low_res.shape}: give images [B, h, w, C] (this "
                             f"model was trained on {self.size}x{self.size} ones; the network "
                             f"resizes any size bilinearly)")
        return {"low_res": self._prepare(_batch_of(low_res, batch, "low-resolution images"))}

    def describe(self) -> str:
        return f"low_res ({self.size}x{self.size})"

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--low_res", help="an npz of the images to upsample (arr_0 uint8 "
                            "NHWC, e.g. a base model's samples; arr_1 its labels, used for a "
                            "class-conditional upsampler unless --labels is given)")

    @classmethod
    def request_from_args(cls, args) -> dict:
        if not args.low_res:
            return {}
        with np.load(args.low_res) as f:
            request = {"low_res": f["arr_0"]}
            if "arr_1" in f.files and getattr(args, "labels", None) is None:
                request["labels"] = f["arr_1"]
        return request


@dataclasses.dataclass(frozen=True)
class Inpaint(Kind):
    """GLIDE's inpainting inputs: the known image times the mask [B, H, W, C] and the mask
    [B, H, W, 1] (1 = known). Training erases random rectangles (`random_inpaint_masks`)."""

    name: ClassVar[str] = "inpaint"
    inputs: ClassVar[frozenset] = frozenset({"inpaint"})
    batch_keys: ClassVar[tuple] = ("image",)
    request_keys: ClassVar[tuple] = ("image", "mask")

    def model_kwargs(self, batch, key=None) -> dict:
        image = jnp.asarray(batch["image"]).astype(jnp.float32)
        key = jax.random.PRNGKey(0) if key is None else key
        masks = random_inpaint_masks(key, image.shape[0], image.shape[1])
        return inpaint_inputs(image, masks)

    def sampling_kwargs(self, request, batch, key, model) -> dict:
        image, mask = request.get("image"), request.get("mask")
        if image is None or mask is None:
            # Nothing known: the inpainting model as a text-to-image one.
            size = model[0].image_size
            image = jnp.zeros((batch, size, size, model[0].in_channels), jnp.float32)
            mask = jnp.zeros((batch, size, size, 1), jnp.float32)
        return inpaint_inputs(_batch_of(image, batch, "images"), _batch_of(mask, batch, "masks"))


KINDS = {cls.name: cls for cls in (ClassLabel, Text, LowRes, Inpaint)}


def _kind_from(name: str, settings) -> Kind:
    if name not in KINDS:
        raise ValueError(f"unknown conditioning kind {name!r}{fields.closest(name, KINDS)}: "
                         f"choose from {sorted(KINDS)} (none: an empty section)")
    return fields.from_dict(KINDS[name], settings, f"conditioning.{name}")


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """The kinds a model is conditioned on (empty: unconditional), in a canonical order."""

    kinds: tuple = ()

    def __post_init__(self):
        names = [k.name for k in self.kinds]
        if len(set(names)) != len(names):
            raise ValueError(f"conditioning lists a kind twice: {names}")
        order = list(KINDS)
        object.__setattr__(self, "kinds", tuple(sorted(self.kinds, key=lambda k: order.index(k.name))))
        denoiser_class(self.inputs)  # a combination some network takes

    @classmethod
    def from_config(cls, section: Mapping | None) -> "Conditioning":
        """From a config section {kind: settings}, e.g. {"class": {"num_classes": 10,
        "dropout": 0.1}}; {} or None: unconditional."""
        section = dict(section.to_dict() if hasattr(section, "to_dict") else section or {})
        return cls(tuple(_kind_from(name, settings) for name, settings in section.items()))

    def to_config(self) -> dict:
        return {k.name: fields.to_dict(k) for k in self.kinds}

    def get(self, cls: type) -> Kind | None:
        """The kind of class `cls` (e.g. ClassLabel) if the model has it."""
        return next((k for k in self.kinds if isinstance(k, cls)), None)

    @property
    def inputs(self) -> frozenset:
        return frozenset().union(*(k.inputs for k in self.kinds))

    def denoiser_class(self) -> type:
        return denoiser_class(self.inputs)

    def network_fields(self) -> dict:
        out = {}
        for kind in self.kinds:
            out.update(kind.network_fields())
        return out

    def check_batch(self, batch: Mapping) -> None:
        for kind in self.kinds:
            kind.check_batch(batch)

    def model_kwargs(self, batch: Mapping, key=None) -> dict:
        """The network's keyword arguments for a batch; with a key, each kind's dropout."""
        if key is None:
            keys = [None] * len(self.kinds)
        else:  # one kind uses the key itself
            keys = [key] if len(self.kinds) == 1 else jax.random.split(key, len(self.kinds))
        out = {}
        for kind, k in zip(self.kinds, keys):
            out.update(kind.model_kwargs(batch, k))
        return out

    @property
    def droppable(self) -> bool:
        """Whether classifier-free guidance applies: some kind has an unconditional branch."""
        return any(k.droppable for k in self.kinds)

    def null_kwargs(self, model, request: Mapping | None = None) -> dict:
        """The unconditional branch of classifier-free guidance: the droppable kinds replaced by
        their null inputs, the others (a low-res image, an inpainting mask) kept."""
        if not self.droppable:
            raise ValueError(f"classifier-free guidance needs a model with an unconditional "
                             f"branch; this one ({self.describe()}) was trained without "
                             f"conditioning dropout")
        out = {}
        for kind in self.kinds:
            if kind.droppable:
                out.update(kind.null_kwargs(model, request or {}))
        return out

    @property
    def request_keys(self) -> tuple:
        return tuple(key for kind in self.kinds for key in kind.request_keys)

    def sampling_kwargs(self, request: Mapping, batch: int, key, model) -> dict:
        """The network's keyword arguments for `batch` samples of a request."""
        keys = jax.random.split(key, max(len(self.kinds), 1))
        out = {}
        for kind, k in zip(self.kinds, keys):
            out.update(kind.sampling_kwargs(request, batch, k, model))
        return out

    @property
    def self_contained(self) -> bool:
        """Whether samples can be drawn without inputs (a super-resolution model needs images)."""
        return all(k.self_contained for k in self.kinds)

    @property
    def batch_keys(self) -> frozenset:
        return frozenset(key for kind in self.kinds for key in kind.batch_keys)

    def grid(self, per_class: int, rows: int, prompts: tuple = ()) -> tuple:
        """(row labels or None, sampling request, number of samples) of a preview grid: a row per
        class or prompt, per_class columns; `rows` rows of an unconditional model."""
        for kind in self.kinds:
            found = kind.grid(per_class, prompts)
            if found is not None:
                labels, request = found
                return labels, request, len(labels) * per_class
        return None, {}, rows * per_class

    def describe(self) -> str:
        return " + ".join(k.describe() for k in self.kinds) or "unconditional"

    def to_list(self) -> list:
        return [k.to_dict() for k in self.kinds]

    @classmethod
    def from_list(cls, items) -> "Conditioning":
        kinds = []
        for item in items or ():
            item = dict(item)
            kinds.append(_kind_from(item.pop("kind", None), item))
        return cls(tuple(kinds))


def add_arguments(parser) -> None:
    """Every kind's sampling options, in one argument group of `parser`."""
    group = parser.add_argument_group("conditioning (what the model is conditioned on)")
    for cls in KINDS.values():
        cls.add_arguments(group)


def request_from_args(args) -> dict:
    """The sampling request the command line's conditioning options describe."""
    request = {}
    for cls in KINDS.values():
        request.update(cls.request_from_args(args))
    return request
