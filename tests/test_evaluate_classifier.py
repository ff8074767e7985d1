"""The classifier-feature metrics: a small classifier trained here on a few hundred real
Fashion-MNIST images beats chance clearly; its accuracy through the CLI on the test split equals
one computed directly from the IDX files; the Fréchet distance of a set with itself is 0 and on
real images equals the textbook formula with scipy's sqrtm."""
import gzip
import json
import pathlib

import jax
import numpy as np
import pytest
import scipy.linalg

from diffjax.cli import evaluate as cli
from diffjax.pipelines.evaluation import classifier as C
from diffjax.cli.common import load_config_file as load_config
from tests._util import REPO

FMNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")


def _idx(name):
    """An IDX file of the Debian package, parsed here (not with diffjax.data)."""
    with gzip.open(FMNIST / f"{name}.gz", "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


@pytest.fixture(scope="module")
def test_split():
    """Fashion-MNIST's test images padded to 32x32 with black (uint8 [10000, 32, 32, 1])."""
    if not (FMNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real Fashion-MNIST is absent from {FMNIST} (apt-get install "
                    f"dataset-fashion-mnist)")
    images = np.pad(_idx("t10k-images-idx3-ubyte"), ((0, 0), (2, 2), (2, 2)))[..., None]
    return images, _idx("t10k-labels-idx1-ubyte").astype(np.int64)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, test_split):
    """The recipe, cut to 40 steps of 16 images (640 training images seen)."""
    config = load_config(str(REPO / "configs" / "feature_classifier_fashion_mnist.py"))
    config.train.update(batch_size=16, total_steps=40, log_every=40, reference_images=512)
    config.optim.warmup_steps = 5
    workdir = tmp_path_factory.mktemp("classifier")
    C.train_classifier(config, workdir, log=lambda s: None)
    return workdir


def _direct_outputs(workdir, images):
    """The saved classifier applied to uint8 images without the extractor (no sharding or
    padding), in chunks of 1000."""
    clf = C.load_classifier(workdir)
    apply = jax.jit(clf.module.apply)
    chunks = [apply(clf.variables, images[i:i + 1000].astype(np.float32) / 255.0)
              for i in range(0, len(images), 1000)]
    return {k: np.concatenate([np.asarray(c[k]) for c in chunks]) for k in chunks[0]}


@pytest.fixture(scope="module")
def direct_logits(trained, test_split):
    return _direct_outputs(trained, test_split[0])["logits"]


def _cli(capsys, *argv):
    assert cli.main([*map(str, argv), "--no-progress"]) == 0
    out = capsys.readouterr().out
    return dict(line.split(": ", 1) for line in out.strip().splitlines())


def test_classifier_trained_on_a_few_hundred_images_beats_chance(trained, test_split,
                                                                 direct_logits):
    _, labels = test_split
    saved = json.loads((trained / "metrics.json").read_text())
    direct = float(np.mean(np.argmax(direct_logits, -1) == labels))
    assert direct > 0.45  # chance is 0.1
    assert saved["test_images"] == 10000
    assert saved["test_accuracy"] == pytest.approx(direct, abs=2e-4)  # float-order ties only


def test_cli_accuracy_of_labelled_real_images_is_the_test_accuracy(trained, test_split, tmp_path,
                                                                   capsys, direct_logits):
    images, labels = test_split
    np.savez(tmp_path / "test.npz", images, labels)
    out = _cli(capsys, "--classifier", trained, "--samples", tmp_path / "test.npz")
    direct = np.mean(np.argmax(direct_logits, -1) == labels)
    assert float(out[C.ACCURACY_NAME]) == pytest.approx(direct, abs=2e-4)
    # Labels shifted by one class: a classifier above chance now mostly disagrees.
    np.savez(tmp_path / "shifted.npz", images, (labels + 1) % 10)
    out = _cli(capsys, "--classifier", trained, "--samples", tmp_path / "shifted.npz")
    assert float(out[C.ACCURACY_NAME]) < 0.3


def test_frechet_distance_of_a_set_with_itself_is_zero(trained, test_split, tmp_path, capsys):
    images, labels = test_split
    np.savez(tmp_path / "s.npz", images[:300], labels[:300])
    out = _cli(capsys, "--classifier", trained, "--samples", tmp_path / "s.npz",
               "--ref", tmp_path / "s.npz")
    features = np.asarray(_direct_outputs(trained, images[:300])["features"], np.float64)
    # 0 up to rounding: an eigenvalue l of S is recovered as sqrt(l^2 + O(eps l_max^2)), off by
    # up to sqrt(eps) l_max = 1.5e-8 l_max when l is tiny (ReLU features have many such
    # directions): a tolerance of 1e-6 Tr(S), where real-vs-real distances are ~1e-2 Tr(S).
    assert abs(float(out[C.FD_NAME])) < 1e-6 * np.trace(np.cov(features, rowvar=False))


def test_frechet_distance_is_the_textbook_formula_on_the_penultimate_features(
        trained, test_split, tmp_path, capsys):
    """Two disjoint halves of real images: |mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) with
    scipy's sqrtm on features from a direct apply; unlabelled samples give no accuracy."""
    images, _ = test_split
    a, b = images[:600], images[600:1400]
    np.savez(tmp_path / "a.npz", a)
    np.savez(tmp_path / "b.npz", b)
    out = _cli(capsys, "--classifier", trained, "--samples", tmp_path / "a.npz",
               "--ref", tmp_path / "b.npz")
    fa, fb = (np.asarray(_direct_outputs(trained, x)["features"], np.float64) for x in (a, b))
    assert fa.shape[1] == C.load_classifier(trained).module.features
    s1, s2 = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    d = fa.mean(0) - fb.mean(0)
    expected = d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert float(out[C.FD_NAME]) == pytest.approx(expected, rel=1e-4)
    assert out[C.ACCURACY_NAME].startswith("n/a")


def test_real_images_are_closer_to_the_training_reference_than_noise(trained, test_split,
                                                                      tmp_path, capsys):
    images, labels = test_split
    np.savez(tmp_path / "real.npz", images[:500], labels[:500])
    noise = np.random.default_rng(0).integers(0, 256, images[:500].shape, dtype=np.uint8)
    np.savez(tmp_path / "noise.npz", noise, labels[:500])
    real = float(_cli(capsys, "--classifier", trained, "--samples", tmp_path / "real.npz")[C.FD_NAME])
    bad = float(_cli(capsys, "--classifier", trained, "--samples", tmp_path / "noise.npz")[C.FD_NAME])
    assert 0 < real < bad / 5


def test_errors_name_the_fix(trained, tmp_path):
    np.savez(tmp_path / "rgb.npz", np.zeros((4, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"uint8 \[N, 32, 32, 1\]"):
        cli.main(["--classifier", str(trained), "--samples", str(tmp_path / "rgb.npz")])
    np.savez(tmp_path / "inception_ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    np.savez(tmp_path / "ok.npz", np.zeros((4, 32, 32, 1), np.uint8))
    with pytest.raises(ValueError, match="arr_0 images instead"):
        cli.main(["--classifier", str(trained), "--samples", str(tmp_path / "ok.npz"),
                  "--ref", str(tmp_path / "inception_ref.npz")])
    with pytest.raises(SystemExit, match="diffjax feature-classifier --config"):
        cli.main(["--classifier", str(tmp_path / "nowhere"), "--samples", str(tmp_path / "ok.npz")])
    config = load_config(str(REPO / "configs" / "feature_classifier_fashion_mnist.py"))
    config.model.widths = (8, 8, 8, 8, 8, 8)
    with pytest.raises(ValueError, match="model.widths"):
        C.train_classifier(config)


def test_extractor_on_grayscale_is_sharded_and_padded_like_a_direct_apply(trained, test_split):
    images, _ = test_split
    clf = C.load_classifier(trained)
    extractor = clf.extractor(batch_size=6)
    assert extractor.batch_size % len(jax.local_devices()) == 0
    out = extractor.outputs(iter([images[:7], images[7:13]]), progress=False)
    direct = _direct_outputs(trained, images[:13])
    np.testing.assert_allclose(out["features"], direct["features"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["logits"], direct["logits"], rtol=1e-5, atol=1e-5)
