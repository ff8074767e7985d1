"""FID Inception-v3 against pytorch-fid's own network (random weights, ../shared/parity
inception_fid_random.npz) and the resize conventions against hand-computed interpolation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.pipelines.evaluation import inception
from diffjax.pipelines.evaluation.metrics import FeatureExtractor
from tests._util import nchw_to_nhwc, rel_err

TOL = 5e-5  # |port - ref| <= TOL * max|ref|, the tolerance of the golden file's README


@pytest.fixture(scope="module")
def fid_net(golden):
    g = golden("inception_fid_random")
    module, variables = inception.load_fid_inception(g.state_dict())
    apply = jax.jit(lambda v, x: module.apply(v, x, mutable=["intermediates"]))
    return g, module, variables, apply


def _outputs(apply, variables, images):
    out, state = apply(variables, images)
    inter = {k: v[0] for k, v in state["intermediates"].items()}
    return {**out, **inter}


def test_parity_x64_every_output(fid_net):
    g, _, variables, apply = fid_net
    got = _outputs(apply, variables, nchw_to_nhwc(g["in.x64"]))
    keys = g.keys("out.x64.")
    assert len(keys) == 9
    for key in keys:
        ref = nchw_to_nhwc(g[key])
        port = np.asarray(got[key.split(".")[-1]])[: len(ref)]  # blocks store items [0, 1]
        assert port.shape == ref.shape, key
        assert rel_err(port, ref) <= TOL, (key, rel_err(port, ref))


def test_parity_x299_through_sharded_extractor(fid_net):
    """299x299 uint8 images through the jit-sharded, padded extraction path (4 CPU devices)."""
    g, module, variables, _ = fid_net
    images = np.round(nchw_to_nhwc(g["in.x299"]) * 255).astype(np.uint8)
    extractor = FeatureExtractor(module, variables, batch_size=6)  # 8 on 4 devices: 4 pad rows
    assert extractor.batch_size == 8
    got = extractor(images)
    for name in ("pool3", "logits", "logits_nobias", "spatial"):
        ref = g[f"out.x299.{name}"]
        assert got[name].shape == ref.shape
        assert rel_err(got[name], ref) <= TOL, (name, rel_err(got[name], ref))


def test_adm_tf_normalisation_matches_recorded_sensitivity(fid_net):
    """At 299x299 both resizes are the identity, so adm_tf differs from pytorch-fid only by
    (u - 128) / 128 vs 2u/255 - 1; the golden file records what that does to pool3 in torch."""
    g, _, variables, _ = fid_net
    module = inception.FIDInceptionV3(preprocess="adm_tf")
    pool3 = jax.jit(module.apply)(variables, nchw_to_nhwc(g["in.x299"]))["pool3"]
    expected = g.config["sensitivity"]["x299"]["(u-128)/128"]["pool3"]
    assert abs(rel_err(pool3, g["out.x299.pool3"]) - expected) < 2e-5


def test_state_dict_check_lists_every_problem(golden):
    sd = dict(golden("inception_fid_random").state_dict())
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}  # not required
    inception.variables_from_state_dict(sd)
    del sd["Mixed_7c.branch_pool.bn.running_var"]
    sd["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
    sd["fc.weight"] = np.zeros((1000, 2048), np.float32)
    with pytest.raises(ValueError) as e:
        inception.variables_from_state_dict(sd)
    msg = str(e.value)
    assert "Mixed_7c.branch_pool.bn.running_var" in msg
    assert "AuxLogits.fc.weight" in msg
    assert "fc.weight: got (1000, 2048), expected (1008, 2048)" in msg


def test_missing_weights_say_where_they_come_from(tmp_path):
    for source in (None, tmp_path / "nope.pth"):
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            inception.load_fid_inception(source)
        assert inception.WEIGHTS_URL in str(e.value)


def test_bilinear_matrices_by_hand():
    # TF1 ResizeBilinear (no half-pixel centres): src = dst * in/out, right neighbour clamped.
    np.testing.assert_allclose(
        inception.bilinear_matrix(2, 4, half_pixel_centers=False),
        [[1, 0], [0.5, 0.5], [0, 1], [0, 1]],
    )
    np.testing.assert_allclose(
        inception.bilinear_matrix(4, 2, half_pixel_centers=False), [[1, 0, 0, 0], [0, 0, 1, 0]]
    )
    # PyTorch align_corners=False: src = (dst + 0.5) * in/out - 0.5, clamped at 0.
    np.testing.assert_allclose(
        inception.bilinear_matrix(2, 4, half_pixel_centers=True),
        [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]],
    )
    np.testing.assert_allclose(
        inception.bilinear_matrix(4, 2, half_pixel_centers=True),
        [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]],
    )


@pytest.mark.parametrize("size_in", [5, 64, 400])
def test_half_pixel_resize_equals_jax_image_resize(size_in):
    x = jax.random.uniform(jax.random.key(size_in), (2, size_in, size_in + 3, 3))
    ours = inception.resize_bilinear(x, 299, half_pixel_centers=True)
    ref = jax.image.resize(x, (2, 299, 299, 3), "bilinear", antialias=False)
    # jax.image.resize computes sample positions and weights in float32 (ulp(400) = 3e-5: errors
    # up to 3e-5 against a float64 resize here); ours builds them in float64 (errors ~1.5e-7).
    np.testing.assert_allclose(ours, ref, atol=5e-5)


def test_rejects_nchw_and_unknown_preprocessing():
    with pytest.raises(ValueError, match="NHWC"):
        inception.FIDInceptionV3().init(jax.random.key(0), jnp.zeros((1, 3, 64, 64)))
    with pytest.raises(ValueError, match="adm_tf"):
        inception.load_fid_inception({}, preprocess="tf")


def test_pth_path_is_read_with_the_safe_reader(golden, tmp_path, monkeypatch):
    from diffjax.io import torch_pt

    path = tmp_path / inception.WEIGHTS_FILE
    path.write_bytes(b"stand-in")
    seen = []

    def fake_read_pt(p, **kw):
        seen.append(str(p))
        return golden("inception_fid_random").state_dict()

    monkeypatch.setattr(torch_pt, "read_pt", fake_read_pt)
    module, variables = inception.load_fid_inception(path, preprocess="adm_tf")
    assert seen == [str(path)] and module.preprocess == "adm_tf"
    assert variables["params"]["fc"]["kernel"].shape == (2048, 1008)
