"""`python -m diffjax sample` on a checkpoint converted from a real guided-diffusion .pt file."""
import json

import ml_collections
import numpy as np
import pytest

from diffjax import tokenizer as tokenizer_lib
from diffjax.cli import convert as convert_cli
from diffjax.cli import sample as sample_cli
from diffjax.io import convert
from tests._util import PARITY, require
from tests.test_torch_pt import state_dict_file

FLAGS = ("--image_size 32 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2,2 "
         "--learn_sigma True --class_cond True --attention_resolutions 16,8 --num_heads 2 "
         "--use_scale_shift_norm True --resblock_updown True --diffusion_steps 1000 "
         "--noise_schedule cosine")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    pt = require(PARITY / "pt" / "unet_cond32.pt")
    out = tmp_path_factory.mktemp("ckpt") / "unet"
    convert_cli.main(["--pt", str(pt), "--flags", FLAGS, "--num_classes", "10", "--out", str(out)])
    return out


def test_writes_gd_npz_layout_and_a_grid(checkpoint, tmp_path):
    out = tmp_path / "s.npz"
    args = ["--checkpoint", str(checkpoint), "--num_samples", "5", "--batch_size", "4",
            "--steps", "4", "--out", str(out), "--no_progress"]
    sample_cli.main(args)
    f = np.load(out)
    assert sorted(f.files) == ["arr_0", "arr_1"]
    assert f["arr_0"].shape == (5, 32, 32, 3) and f["arr_0"].dtype == np.uint8
    assert f["arr_1"].shape == (5,) and f["arr_1"].min() >= 0 and f["arr_1"].max() < 10
    assert out.with_suffix(".png").stat().st_size > 0
    # the same seed gives the same samples; another gives others
    sample_cli.main(args + ["--out", str(tmp_path / "again.npz")])
    np.testing.assert_array_equal(np.load(tmp_path / "again.npz")["arr_0"], f["arr_0"])
    sample_cli.main(args + ["--out", str(tmp_path / "other.npz"), "--seed", "1"])
    assert np.any(np.load(tmp_path / "other.npz")["arr_0"] != f["arr_0"])


def test_fixed_class_and_samplers(checkpoint, tmp_path):
    for sampler in ("ddpm", "heun"):
        out = tmp_path / f"{sampler}.npz"
        sample_cli.main(["--checkpoint", str(checkpoint), "--num_samples", "2", "--batch_size", "2",
                         "--steps", "3", "--sampler", sampler, "--class_label", "7",
                         "--out", str(out), "--no_progress"])
        np.testing.assert_array_equal(np.load(out)["arr_1"], [7, 7])


def test_classifier_free_guidance_needs_a_null_class(checkpoint):
    with pytest.raises(ValueError, match="--null_label 10 is not a label of this model"):
        sample_cli.main(["--checkpoint", str(checkpoint), "--cfg_scale", "3", "--no_progress"])


# --------------------------------------------------------------------------- GLIDE


def test_workdir_samples_the_runs_ema_with_its_schedule(tiny_workdir, tmp_path):
    """--workdir: the CLI's samples are diffjax.sample's with the EMA parameters restored here
    from the raw checkpoint tree, the run's 10-step chain respaced to its eval respacing (5), its
    ancestral sampler, and classifier-free guidance against the null label 10."""
    import jax
    import jax.numpy as jnp

    import diffjax
    from diffjax import images
    from diffjax.core import guidance as G
    from diffjax.core import samplers
    from diffjax.io.checkpoints import CheckpointManager
    from diffjax.pipelines import training as T

    out = tmp_path / "w.npz"
    sample_cli.main(["--workdir", str(tiny_workdir), "--ema", "1", "--num_samples", "3",
                     "--batch_size", "3", "--class_label", "4", "--cfg_scale", "2.5", "--seed",
                     "5", "--out", str(out), "--no_progress"])
    got = np.load(out)
    assert got["arr_0"].shape == (3, 32, 32, 1) and list(got["arr_1"]) == [4, 4, 4]

    config = ml_collections.ConfigDict(json.loads((tiny_workdir / "config.json").read_text()))
    trainer, _, _ = T.trainer_from_config(config)
    manager = CheckpointManager(tiny_workdir / "checkpoints")
    state, _ = manager.restore(None)
    manager.close()
    sched = diffjax.core.schedules.make_schedule("cosine", 10, "5")
    assert sched.num_timesteps == 5
    guidance = G.classifier_free(2.5, {"y": jnp.full((1,), 10)}, mean_channels=1)
    _, k_sample = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(5), 0))
    want = samplers.sample(k_sample, (trainer.module, {"params": state["ema"][1]}), sched,
                          (3, 32, 32, 1), sampler="ddpm", guidance=guidance,
                          config=trainer.diffusion, model_kwargs={"y": jnp.full((3,), 4)})
    np.testing.assert_array_equal(got["arr_0"], images.to_uint8(want))


def _glide_checkpoint(tmp, preset, vocab_size, **flags):
    """A tiny random GLIDE model of `preset`'s class, saved as a .pt (with the tests' torch-free
    writer: torch is optional) and converted."""
    import jax

    from diffjax.compat import glide_presets
    from diffjax.compat import glide_text2im as GT
    from tests._tiny_glide import TINY_FLAGS

    config = glide_presets.get_config(preset)
    config.model.update({**TINY_FLAGS, "text_ctx": 4, "use_fp16": False, **flags})
    config.n_vocab = vocab_size
    module = glide_presets.build_model(config)
    args, kwargs = module.example_inputs(1)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, **kwargs))
    # random weights everywhere (the output conv starts at zero in a fresh init, which would make
    # every caption and guidance scale give the same samples); no init to compile
    rng = np.random.default_rng(len(preset))
    variables = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), shapes)
    pt = state_dict_file(tmp / f"{preset}.pt", GT.variables_to_state_dict(module, variables))
    return convert.convert(pt, config, tmp / preset, progress=False)


@pytest.fixture(scope="module")
def glide(tmp_path_factory):
    from tests._tiny_glide import write_vocab

    tmp = tmp_path_factory.mktemp("glide")
    vocab = write_vocab(tmp / "tokenizer")
    n_vocab = tokenizer_lib.load(str(vocab)).n_vocab
    return dict(
        vocab=vocab,
        base=_glide_checkpoint(tmp, "base", n_vocab, image_size=16),
        up=_glide_checkpoint(tmp, "upsample", n_vocab, image_size=32, channel_mult="1,2,2"),
        inpaint=_glide_checkpoint(tmp, "base-inpaint", n_vocab, image_size=16),
    )


@pytest.mark.slow  # 64 px then 256 px: ~20 s on 2 cores
def test_glide_text_to_image_then_upsample(glide, tmp_path):
    out = tmp_path / "corgi.npz"
    common = ["--checkpoint", str(glide["base"]), "--prompt", "a corgi painting", "--bpe",
              str(glide["vocab"]), "--num_samples", "2", "--batch_size", "2", "--steps", "3",
              "--no_progress"]
    sample_cli.main(common + ["--upsampler", str(glide["up"]), "--upsample_respacing", "4",
                              "--out", str(out)])
    f = np.load(out)
    assert f["arr_0"].shape == (2, 32, 32, 3) and f["arr_0"].dtype == np.uint8
    assert np.load(tmp_path / "corgi_base.npz")["arr_0"].shape == (2, 16, 16, 3)
    assert out.with_suffix(".png").stat().st_size > 0
    # the guidance scale reaches the samples; the same seed repeats them
    sample_cli.main(common + ["--cfg_scale", "0", "--out", str(tmp_path / "a.npz")])
    sample_cli.main(common + ["--cfg_scale", "0", "--out", str(tmp_path / "b.npz")])
    sample_cli.main(common + ["--cfg_scale", "8", "--out", str(tmp_path / "c.npz")])
    a, b, c = (np.load(tmp_path / f"{n}.npz")["arr_0"] for n in "abc")
    np.testing.assert_array_equal(a, b)
    assert np.any(a != c)


def test_glide_inpainting_keeps_the_known_region(glide, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    mask[:, :9] = 255  # keep the left 9 columns
    Image.fromarray(image).save(tmp_path / "image.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "filled.npz"
    sample_cli.main(["--checkpoint", str(glide["inpaint"]), "--prompt", "red square", "--bpe",
                     str(glide["vocab"]), "--image", str(tmp_path / "image.png"), "--mask",
                     str(tmp_path / "mask.png"), "--num_samples", "2", "--batch_size", "2",
                     "--steps", "3", "--out", str(out), "--no_progress"])
    arr = np.load(out)["arr_0"]
    # the last x0 prediction is projected onto the known pixels: kept up to uint8 rounding
    assert np.abs(arr[:, :, :9].astype(int) - image[None, :, :9]).max() <= 1
    assert np.any(arr[:, :, 9:] != image[None, :, 9:])


def test_glide_cli_errors_name_the_fix(glide, tmp_path):
    base = ["--checkpoint", str(glide["base"]), "--no_progress", "--steps", "2"]
    with pytest.raises(ValueError, match="pass --prompt"):
        sample_cli.main(base + ["--bpe", str(glide["vocab"])])
    with pytest.raises(FileNotFoundError, match="glide_text2im/tokenizer/"):
        sample_cli.main(base + ["--prompt", "x", "--bpe", str(tmp_path / "nothing")])
    with pytest.raises(ValueError, match="n_vocab"):
        sample_cli.main(base + ["--prompt", "x", "--bpe", "bytes"])
    with pytest.raises(ValueError, match="needs both --image and --mask"):
        sample_cli.main(base + ["--prompt", "x", "--bpe", str(glide["vocab"]), "--mask", "m.png"])
