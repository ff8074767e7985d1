"""Directories written before the model bundle load through the one compatibility reader: the
weights bit for bit (the truth: sha256 digests the old code computed when it wrote them, see
tests/data/legacy/README.md), and the spec, conditioning and network the old config described."""
import hashlib
import json
import pathlib

import jax
import numpy as np
import pytest

import diffjax
from diffjax.conditioning import ClassLabel, Text
from diffjax.io.torch_mapping import variables_to_state_dict

LEGACY = pathlib.Path(__file__).resolve().parent / "data" / "legacy"
DIGESTS = json.loads((LEGACY / "digests.json").read_text())


def digest(arrays: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(np.ascontiguousarray(np.asarray(arrays[k], np.float32)).tobytes())
    return h.hexdigest()


def flat(tree) -> dict:
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_converted_guided_diffusion_checkpoint():
    model = diffjax.load(LEGACY / "converted_adm")
    assert digest(variables_to_state_dict(model.module, model.variables())) == \
        DIGESTS["converted_adm"]["sha256"]
    assert model.spec == diffjax.DiffusionSpec("cosine", 50, variance="learned_range")
    assert model.conditioning.get(ClassLabel).num_classes == 3
    assert model.sampling["grid"] == "10" and model.image_shape == (8, 8, 3)
    assert model.provenance["preset"]["model"]["num_channels"] == 32


def test_converted_glide_checkpoint():
    model = diffjax.load(LEGACY / "converted_glide")
    assert digest(variables_to_state_dict(model.module, model.variables())) == \
        DIGESTS["converted_glide"]["sha256"]
    assert model.network["class"] == "Text2ImUNet" and model.network["n_vocab"] == 20
    assert model.conditioning.get(Text).text_ctx == 4
    assert model.spec.beta_schedule == "cosine" and model.spec.variance == "learned_range"
    assert model.sampling["guidance_scale"] == 3.0 and model.sampling["grid"] == "100"


def test_training_workdir():
    model = diffjax.load(LEGACY / "workdir", ema=1)
    assert model.use == "ema_0.999" and sorted(model.weights) == ["ema_0.9", "ema_0.999", "params"]
    assert digest(flat(model.params)) == DIGESTS["workdir_ema1"]["sha256"]
    labels = model.conditioning.get(ClassLabel)
    assert labels.num_classes == 10 and labels.null_label == 10  # trained with label dropout
    assert model.spec == diffjax.DiffusionSpec("cosine", 20, variance="learned_range")
    assert model.extra["data"]["image_size"] == 8 and model.provenance["step"] == 2
    # and it samples, with its run's eval settings as defaults
    images = diffjax.sample(model, jax.random.PRNGKey(0), 2, labels=3, guidance_scale=2.0)
    assert images.shape == (2, 8, 8, 1) and images.dtype == np.uint8


def test_feature_classifier_workdir():
    model = diffjax.load(LEGACY / "feature_classifier")
    assert model.kind == "feature_classifier"
    assert digest(flat({"params": model.params})) == DIGESTS["feature_classifier"]["sha256"]
    assert model.arrays["reference_sigma"].shape == (8, 8)


def test_a_bundle_round_trips_and_detects_damage(tmp_path):
    model = diffjax.load(LEGACY / "converted_adm")
    path = diffjax.save(model, tmp_path / "bundle")
    again = diffjax.load(path)
    assert again.description() == model.description()
    jax.tree.map(np.testing.assert_array_equal, again.weights, model.weights)
    # flip one byte of the largest array file: the checksum names the damage
    files = sorted((p for p in path.rglob("*") if p.is_file() and "ocdbt.process_0/d" in str(p)),
                   key=lambda p: p.stat().st_size)
    data = bytearray(files[-1].read_bytes())
    data[len(data) // 2] ^= 0x10
    files[-1].write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum|damaged|corrupt|decode|zstd|crc"):
        diffjax.load(path)
