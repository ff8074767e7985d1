"""Every Python snippet of README.md runs as written, offline: the pretrained names it loads are
tiny random-weight models of the same kinds (conditioning, resolution, spec) put in a temporary
cache ($DIFFJAX_HOME), so the snippets exercise the real load / sample / upsample code paths."""
import pathlib
import re

import jax
import pytest

import diffjax
from diffjax.bundle import DiffusionModel
from diffjax.conditioning import ClassLabel, Conditioning, LowRes, Text
from diffjax.models.registry import NETWORKS, network_config
from tests._tiny_glide import write_vocab

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
TINY = dict(model_channels=32, num_res_blocks=1, channel_mult=(1, 1), attention_resolutions=(),
            num_heads=1)


def _random(network: dict, seed: int):
    """Random weights for a network config (the output convolution is zero at init: perturbed
    so that samples depend on the inputs)."""
    module = NETWORKS[network["class"]](**{k: v for k, v in network.items() if k != "class"})
    args, kwargs = module.example_inputs(1)
    params = jax.jit(module.init)(jax.random.PRNGKey(seed), *args, **kwargs)["params"]
    return jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.PRNGKey(seed), p.shape),
                        params)


def _bundle(cls, *, kind="diffusion", conditioning=(), size=64, spec=True, sampling=None, **fields):
    module = NETWORKS[cls](image_size=size, in_channels=3, **fields)
    network = network_config(module)
    return DiffusionModel(
        network=network, weights={"params": _random(network, len(cls) + size)},
        spec=diffjax.DiffusionSpec("cosine", 1000, variance="learned_range") if spec else None,
        conditioning=Conditioning(tuple(conditioning)), image_shape=(size, size, 3), kind=kind,
        sampling=sampling or {})


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    home = tmp_path_factory.mktemp("diffjax_home")
    vocab = str(write_vocab(home / "tokenizer"))
    n_vocab = diffjax.tokenizer.load(vocab).n_vocab
    glide = dict(TINY, text_ctx=8, n_vocab=n_vocab, xf_width=32, xf_layers=1, xf_heads=2,
                 xf_padding=True)
    models = {
        "adm-imagenet64-cond": _bundle("UNetModel", out_channels=6, num_classes=1000,
                                       conditioning=[ClassLabel(1000)], **TINY),
        "adm-imagenet64-classifier": _bundle("EncoderUNetModel", kind="classifier",
                                             out_channels=1000, pool="adaptive", **TINY),
        "adm-upsampler-64-256": _bundle("SuperResModel", size=256, out_channels=6,
                                        num_classes=1000,
                                        conditioning=[ClassLabel(1000), LowRes(64)], **TINY),
        "glide-base": _bundle("Text2ImUNet", out_channels=6,
                              conditioning=[Text(8, tokenizer=vocab)],
                              sampling={"sampler": "ddpm", "guidance_scale": 3.0}, **glide),
        "glide-upsample": _bundle("SuperResText2ImUNet", size=256, out_channels=6,
                                  conditioning=[Text(8, tokenizer=vocab), LowRes(64, True)],
                                  sampling={"sampler": "ddim", "noise_scale": 0.997,
                                            "grid": "fast27"}, **glide),
    }
    for name, model in models.items():
        diffjax.save(model, home / name)
    return home


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index, cache, monkeypatch, capsys):
    monkeypatch.setenv("DIFFJAX_HOME", str(cache))
    exec(compile(SNIPPETS[index], f"README.md snippet {index}", "exec"), {"__name__": "__readme__"})


def test_readme_has_snippets_and_no_shared_paths():
    assert len(SNIPPETS) >= 4
    assert "../shared" not in README.read_text()
