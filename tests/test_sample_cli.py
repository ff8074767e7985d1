"""`python -m diffjax.sample` on a checkpoint converted from a real guided-diffusion .pt file."""
import numpy as np
import pytest

from diffjax import convert
from diffjax import sample as sample_cli
from tests._util import PARITY, require

FLAGS = ("--image_size 32 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2,2 "
         "--learn_sigma True --class_cond True --attention_resolutions 16,8 --num_heads 2 "
         "--use_scale_shift_norm True --resblock_updown True --diffusion_steps 1000 "
         "--noise_schedule cosine")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    pt = require(PARITY / "pt" / "unet_cond32.pt")
    out = tmp_path_factory.mktemp("ckpt") / "unet"
    convert.main(["--pt", str(pt), "--flags", FLAGS, "--num_classes", "10", "--out", str(out)])
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
