"""Shared helpers for the tests: golden-file access, the parity error metric, and a cache
($DIFFJAX_HOME) of tiny random-weight models under the pretrained names."""
import json
import os
import pathlib

import jax
import numpy as np
import pytest

import diffjax
from diffjax.bundle import DiffusionModel
from diffjax.conditioning import ClassLabel, Conditioning, LowRes, Text
from diffjax.models.registry import NETWORKS, network_config
from tests._tiny_glide import write_vocab

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("DIFFJAX_SHARED", REPO.parent / "shared"))
PARITY = SHARED / "parity"
PRESETS = SHARED / "presets"


def require(path: pathlib.Path) -> pathlib.Path:
    if not path.exists():
        pytest.skip(f"golden data {path} is absent (set DIFFJAX_SHARED to the shared/ folder)")
    return path


class Golden:
    """An npz of golden vectors with its parsed `__config__`."""

    def __init__(self, path):
        self.path = path
        self.npz = np.load(path)
        self.config = json.loads(str(self.npz["__config__"]))

    def __getitem__(self, key):
        return self.npz[key]

    def __contains__(self, key):
        return key in self.npz.files

    def keys(self, prefix=""):
        return [k for k in self.npz.files if k.startswith(prefix)]

    def state_dict(self):
        return {k: self.npz[k] for k in self.config["state_dict_keys"]}


def nchw_to_nhwc(a):
    """Golden files are NCHW; diffjax is NHWC."""
    a = np.asarray(a)
    return np.moveaxis(a, -3, -1) if a.ndim >= 4 else a


def rel_err(a, b):
    """max|a-b| / max|b|: the parity metric of compat_guided_diffusion.md."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# --------------------------------------------------------------------------- tiny pretrained names

TINY = dict(model_channels=32, num_res_blocks=1, channel_mult=(1, 1), attention_resolutions=(),
            num_heads=1)


def write_class_images(folder, count: int, classes: int) -> pathlib.Path:
    """`count` random 8x8 RGB PNGs in `folder`, image i of class i mod `classes` by
    guided-diffusion's file-name prefix convention (c{class}_{i}.png). -> folder"""
    from PIL import Image

    folder = pathlib.Path(folder)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(
            folder / f"c{i % classes}_{i}.png")
    return folder


def random_weights(network: dict, seed: int):
    """Random weights for a network config, drawn on the host from the parameter shapes (no init
    to compile: that took most of a minute per model on a busy 2-core machine): normals of std
    0.02, norm scales 1, biases 0 (so that samples depend on every input)."""
    module = NETWORKS[network["class"]](**{k: v for k, v in network.items() if k != "class"})
    args, kwargs = module.example_inputs(1)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *args, **kwargs)["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = getattr(path[-1], "key", None)
        if name in ("scale", "bias"):
            return np.full(leaf.shape, 1.0 if name == "scale" else 0.0, leaf.dtype)
        return (0.02 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def tiny_bundle(cls, *, kind="diffusion", conditioning=(), size=64, spec=True, sampling=None,
                **fields) -> DiffusionModel:
    module = NETWORKS[cls](image_size=size, in_channels=3, **fields)
    network = network_config(module)
    return DiffusionModel(
        network=network, weights={"params": random_weights(network, len(cls) + size)},
        spec=diffjax.DiffusionSpec("cosine", 1000, variance="learned_range") if spec else None,
        conditioning=Conditioning(tuple(conditioning)), image_shape=(size, size, 3), kind=kind,
        sampling=sampling or {})


TINY_PRETRAINED = ("adm-imagenet64-cond", "adm-imagenet64-classifier", "adm-upsampler-64-256",
                   "glide-base", "glide-upsample")


def write_tiny_pretrained(home, names=TINY_PRETRAINED, size: int = 64,
                          num_res_blocks: int = 1) -> pathlib.Path:
    """Tiny random-weight models of the kinds the pretrained `names` are (conditioning, spec,
    sampling defaults; base models `size` px, upsamplers 4x; `num_res_blocks` per level: 0
    compiles fastest), saved in `home` under those names, with a tiny GLIDE vocabulary in
    home/tokenizer. -> home"""
    home = pathlib.Path(home)
    vocab = str(write_vocab(home / "tokenizer"))
    n_vocab = diffjax.tokenizer.load(vocab).n_vocab
    tiny = dict(TINY, num_res_blocks=num_res_blocks)
    glide = dict(tiny, text_ctx=8, n_vocab=n_vocab, xf_width=32, xf_layers=1, xf_heads=2,
                 xf_padding=True)
    up = 4 * size
    makers = {
        "adm-imagenet64-cond": lambda: tiny_bundle(
            "UNetModel", size=size, out_channels=6, num_classes=1000,
            conditioning=[ClassLabel(1000)], **tiny),
        "adm-imagenet64-classifier": lambda: tiny_bundle(
            "EncoderUNetModel", size=size, kind="classifier", out_channels=1000, pool="adaptive",
            **tiny),
        "adm-upsampler-64-256": lambda: tiny_bundle(
            "SuperResModel", size=up, out_channels=6, num_classes=1000,
            conditioning=[ClassLabel(1000), LowRes(size)], **tiny),
        "glide-base": lambda: tiny_bundle(
            "Text2ImUNet", size=size, out_channels=6, conditioning=[Text(8, tokenizer=vocab)],
            sampling={"sampler": "ddpm", "guidance_scale": 3.0}, **glide),
        "glide-upsample": lambda: tiny_bundle(
            "SuperResText2ImUNet", size=up, out_channels=6,
            conditioning=[Text(8, tokenizer=vocab), LowRes(size, True)],
            sampling={"sampler": "ddim", "noise_scale": 0.997, "grid": "fast27"}, **glide),
    }
    for name in names:
        diffjax.save(makers[name](), home / name)
    return home


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A $DIFFJAX_HOME holding every tiny pretrained name (64 px bases, no residual blocks: the
    fastest compile) for a test module."""
    return write_tiny_pretrained(tmp_path_factory.mktemp("diffjax_home"), num_res_blocks=0)


# The samplers every sampler-parametrized test runs in the default suite; the others run under
# `-m slow` (each adds a compile of a whole loop: the default suite stays under its 15 minutes).
QUICK_SAMPLERS = ("ddpm", "ddim", "dpm++2m")


def samplers_quick_first(names) -> list:
    """`names` as pytest params, those outside QUICK_SAMPLERS marked slow."""
    return [name if name in QUICK_SAMPLERS else pytest.param(name, marks=pytest.mark.slow)
            for name in names]


def first_quick(items, n: int = 3) -> list:
    """`items` as pytest params, all after the first `n` marked slow (families over every released
    preset: the default suite checks a few, `-m slow` all)."""
    return [item if i < n else pytest.param(item, marks=pytest.mark.slow)
            for i, item in enumerate(items)]
