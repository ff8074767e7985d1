"""Metrics against pytorch-fid's Fréchet distances (../shared/parity inception_fid_random.npz)
and closed forms; the CLI end to end with a tiny stand-in feature network."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.cli import evaluate as cli
from diffjax.pipelines.evaluation import inception, metrics


# --------------------------------------------------------------------------------------------
# Fréchet distance and statistics


def test_frechet_distance_reproduces_pytorch_fid(golden):
    g = golden("inception_fid_random")
    a, b = g["fd.feat1"].astype(np.float64), g["fd.feat2"].astype(np.float64)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)  # rank 499 < 2048
    value = metrics.frechet_distance(g["fd.mu1"], s1, g["fd.mu2"], s2)
    assert abs(value - g["fd.value"]) <= 1e-6 * abs(g["fd.value"])
    shifted = metrics.frechet_distance(g["fd.mu1"], s1, g["fd.mu1"] + g["fd.shift"], s1)
    assert abs(shifted - g["fd.value_shift_only"]) <= 1e-6 * g["fd.value_shift_only"]
    # Exact answer |shift|^2 = 128; pytorch-fid's sqrtm is off by 1.3e-4 (9.9e-7 relative).
    assert abs(shifted - 128.0) <= 1e-9 * 128.0


def test_statistics_match_numpy_and_golden(golden):
    g = golden("inception_fid_random")
    stats = metrics.feature_statistics(g["fd.feat1"])
    np.testing.assert_allclose(stats.mu, g["fd.mu1"], rtol=0, atol=1e-14)
    assert stats.sigma.dtype == np.float64
    np.testing.assert_allclose(np.trace(stats.sigma), g["fd.trace_sigma1"], rtol=1e-13)


def test_running_statistics_chunked_without_cancellation():
    rng = np.random.default_rng(0)
    # A large common offset: E[xx^T] - mu mu^T would lose ~8 digits here.
    x = 1e4 + rng.normal(size=(1000, 7)) @ rng.normal(size=(7, 7))
    running = metrics.RunningStatistics(chunk_rows=64)
    for chunk in np.array_split(x.astype(np.float32), [3, 100, 101, 640]):
        running.update(chunk)
    stats = running.result()
    x32 = x.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(stats.mu, x32.mean(0), rtol=1e-13)
    np.testing.assert_allclose(stats.sigma, np.cov(x32, rowvar=False), rtol=1e-9, atol=1e-12)


def _random_rotation(rng, d):
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def test_frechet_distance_closed_form_commuting_and_singular():
    """Covariances sharing eigenvectors: FD = |mu1-mu2|^2 + sum (sqrt(l1) - sqrt(l2))^2,
    including zero eigenvalues (singular covariances)."""
    rng = np.random.default_rng(1)
    d = 64
    q = _random_rotation(rng, d)
    l1, l2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    l1[:20], l2[10:30] = 0, 0
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = (q * l1) @ q.T, (q * l2) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    diag = metrics.frechet_distance(mu1, np.diag(l1), mu2, np.diag(l2))
    assert diag == pytest.approx(expected, rel=1e-10)
    # 1-D: (m1 - m2)^2 + (sd1 - sd2)^2
    assert metrics.frechet_distance(1.0, 4.0, -2.0, 9.0) == pytest.approx(9 + 1, rel=1e-12)


def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(50, 200)) ** 2  # fewer samples than dimensions: rank 49
    stats = metrics.feature_statistics(feats)
    assert abs(stats.frechet_distance(stats)) <= 1e-10 * np.trace(stats.sigma)


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="2048"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --------------------------------------------------------------------------------------------
# Inception Score


def test_inception_score_closed_forms():
    c = 10
    assert metrics.inception_score_from_probs(np.full((100, c), 1 / c)) == pytest.approx(1.0)
    confident = np.eye(c)[np.arange(100) % c]  # one-hot, every class equally often
    assert metrics.inception_score_from_probs(confident) == pytest.approx(c)
    assert metrics.inception_score(100.0 * confident) == pytest.approx(c, rel=1e-9)
    # GD's splits of 5000: one split all class 0 (IS 1), one balanced over 4 classes (IS 4).
    split_a = np.eye(4)[np.zeros(5000, int)]
    split_b = np.eye(4)[np.arange(5000) % 4]
    both = np.concatenate([split_a, split_b])
    assert metrics.inception_score_from_probs(both) == pytest.approx(2.5)


# --------------------------------------------------------------------------------------------
# Precision and recall


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.float32])
def test_manifold_radii_by_hand(dtype):
    # Points 0, 1, 2, 3, 10 on a line: squared distance to the 3rd nearest other point.
    x = np.array([[0, 0], [1, 0], [2, 0], [3, 0], [10, 0]], np.float32)
    for batch in (2, 10000):
        radii = metrics.manifold_radii(x, k=3, batch_size=batch, dtype=dtype)
        np.testing.assert_array_equal(radii, [9, 4, 4, 9, 81])


def test_float16_distances_fall_back_to_float32_on_overflow():
    rng = np.random.default_rng(3)
    x = (500 + 10 * rng.normal(size=(20, 16))).astype(np.float32)  # |x|^2 ~ 4e6 > float16 max
    d16 = metrics.pairwise_sq_distances(x, x, jnp.float16)
    d64 = ((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1)
    assert np.isfinite(d16).all()
    # |u|^2 - 2 u.v + |v|^2 in float32 at |x|^2 ~ 4e6 (ulp 0.25-0.5): errors of a few units.
    np.testing.assert_allclose(d16, d64, atol=4.0)


def _cloud(rng, n, centre):
    return (centre + rng.normal(size=(n, 8))).astype(np.float32)


@pytest.mark.parametrize("batch", [7, 10000])
def test_precision_recall_on_point_clouds(batch):
    rng = np.random.default_rng(4)
    a, b = _cloud(rng, 40, 0.0), _cloud(rng, 40, 100.0)
    assert metrics.precision_recall(a, a, batch_size=batch) == (1.0, 1.0)
    assert metrics.precision_recall(a, b, batch_size=batch) == (0.0, 0.0)
    # Samples cover half of a two-cluster reference: all samples are real, half the data is missed.
    precision, recall = metrics.precision_recall(np.concatenate([a, b]), a, batch_size=batch)
    assert (precision, recall) == (1.0, 0.5)


# --------------------------------------------------------------------------------------------
# Extraction, files and the CLI, with a tiny stand-in for the Inception network


class TinyFeatures(nn.Module):
    """Same output dict as FIDInceptionV3, from per-channel statistics of the image."""

    @nn.compact
    def __call__(self, images):
        x = images.astype(jnp.float32)
        pool3 = jnp.concatenate([x.mean((1, 2)), x.max((1, 2))], axis=-1)  # [B, 6]
        logits = nn.Dense(5, name="fc")(pool3)
        spatial = x[:, ::8, ::8, :].reshape(len(x), -1)
        return {
            "pool3": pool3,
            "logits": logits,
            "logits_nobias": logits - self.variables["params"]["fc"]["bias"],
            "spatial": spatial,
        }


def _tiny():
    module = TinyFeatures()
    return module, module.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


def _images(n, seed, size=16):
    rng = np.random.default_rng(seed)
    colour = rng.uniform(0, 200, size=(n, 1, 1, 3))  # well separated per image
    return np.clip(colour + rng.uniform(0, 40, size=(n, size, size, 3)), 0, 255).astype(np.uint8)


def test_sharded_padded_extraction_equals_unbatched_apply():
    module, variables = _tiny()
    images = _images(11, 5)
    extractor = metrics.FeatureExtractor(module, variables, batch_size=3)
    n_dev = len(jax.local_devices())  # 4 CPU devices in the test suite
    assert extractor.batch_size % n_dev == 0 and extractor.batch_size - n_dev < 3
    acts = extractor.activations(iter([images[:5], images[5:]]), progress=False)
    ref = module.apply(variables, images.astype(np.float32) / 255)
    # float32 reductions may run in another order once sharded
    np.testing.assert_allclose(acts.pool3, ref["pool3"], rtol=1e-5)
    np.testing.assert_allclose(acts.logits_nobias, ref["logits_nobias"], rtol=1e-5, atol=1e-6)
    spatial = np.asarray(ref["spatial"], np.float64)
    np.testing.assert_allclose(
        acts.spatial_stats.sigma, np.cov(spatial, rowvar=False), rtol=1e-5, atol=1e-8
    )


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_streaming(tmp_path, save):
    images = _images(10, 6)
    path = tmp_path / "s.npz"
    save(path, arr_0=images, arr_1=np.arange(10))
    assert metrics.npz_array_info(path) == (images.shape, np.uint8)
    chunks = list(metrics.iter_npz_array(path, "arr_0", batch_size=4))
    assert [len(c) for c in chunks] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(chunks), images)
    with pytest.raises(KeyError, match="arr_0"):
        list(metrics.iter_npz_array(path, "images"))


@pytest.fixture
def tiny_cli(monkeypatch):
    module, variables = _tiny()
    monkeypatch.setattr(inception, "load_fid_inception", lambda source, **kw: (module, variables))
    return module, variables


def test_cli_prints_gd_table(tmp_path, tiny_cli, capsys):
    images = _images(12, 7)
    np.savez(tmp_path / "ref.npz", arr_0=images)
    np.savez(tmp_path / "samples.npz", arr_0=images, arr_1=np.zeros(12, int))
    argv = ["--ref", str(tmp_path / "ref.npz"), "--samples", str(tmp_path / "samples.npz"),
            "--inception", "unused", "--batch-size", "5", "--no-progress"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    labels = [line.split(":")[0] for line in lines]
    assert labels == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    values = dict((k, float(line.split(": ")[1])) for k, line in zip(labels, lines))
    # Samples identical to the reference.
    assert abs(values["FID"]) < 1e-9 and abs(values["sFID"]) < 1e-9
    assert values["Precision"] == 1.0 and values["Recall"] == 1.0
    assert 1.0 <= values["Inception Score"] <= 5.0


def test_cli_with_stored_reference_statistics(tmp_path, tiny_cli, capsys):
    """A reference batch that stores only mu/sigma/mu_s/sigma_s: GD's statistics are used as is."""
    module, variables = tiny_cli
    ref = metrics.compute_activations(module, variables, _images(12, 8), progress=False)
    np.savez(tmp_path / "ref.npz", mu=ref.stats.mu, sigma=ref.stats.sigma,
             mu_s=ref.spatial_stats.mu, sigma_s=ref.spatial_stats.sigma)
    np.savez(tmp_path / "samples.npz", arr_0=_images(12, 8))
    argv = ["--ref", str(tmp_path / "ref.npz"), "--samples", str(tmp_path / "samples.npz"),
            "--inception", "unused", "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "FID: " in out and "Precision: n/a" in out
    fid = float(out.split("FID: ")[1].split()[0])
    assert abs(fid) < 1e-9


def test_saved_reference_batch_has_gd_keys_and_statistics(tmp_path):
    module, variables = _tiny()
    images = _images(9, 10)
    extractor = metrics.FeatureExtractor(module, variables, batch_size=4)
    metrics.save_reference_batch(tmp_path / "ref.npz", images, extractor, progress=False)
    with np.load(tmp_path / "ref.npz") as f:
        assert sorted(f.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
        np.testing.assert_array_equal(f["arr_0"], images)
        ref = module.apply(variables, images.astype(np.float32) / 255)
        pool3 = np.asarray(ref["pool3"], np.float64)
        np.testing.assert_allclose(f["mu"], pool3.mean(0), rtol=1e-5)
        np.testing.assert_allclose(f["sigma"], np.cov(pool3, rowvar=False), rtol=1e-4, atol=1e-8)
        assert f["sigma_s"].shape == (ref["spatial"].shape[1],) * 2


def test_cli_refuses_float_images(tmp_path, tiny_cli):
    np.savez(tmp_path / "ref.npz", arr_0=_images(12, 9).astype(np.float32) / 255)
    with pytest.raises(ValueError, match="uint8"):
        cli.main(["--ref", str(tmp_path / "ref.npz"), "--samples", str(tmp_path / "ref.npz"),
                  "--inception", "unused", "--no-progress"])


def test_cli_errors(tmp_path):
    with pytest.raises(SystemExit, match="--checkpoint"):
        cli.main(["--bpd"])
    with pytest.raises(SystemExit, match="pytorch-fid"):
        cli.main(["--ref", "r.npz", "--samples", "s.npz"])
