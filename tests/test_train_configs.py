"""Every training config builds, and the recipes that reproduce a released OpenAI checkpoint build
exactly that checkpoint's architecture (same parameter shapes as the preset parsed from the
README's flags by configs/pretrained.py)."""
import importlib.util
import pathlib

import jax
import numpy as np
import pytest

from diffjax.conditioning import ClassLabel
from diffjax.pipelines import training as T
from diffjax.compat import gd_models
from tests._util import REPO

# Not diffjax.train configs: the presets table, and the evaluation classifier's recipe (read by
# diffjax.pipelines.evaluation.classifier; checked by test_feature_classifier_config_builds).
NOT_TRAIN = ("pretrained.py", "feature_classifier_fashion_mnist.py")
CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.py") if p.name not in NOT_TRAIN)
# training config -> the released checkpoint whose architecture it trains
SAME_AS = {"cifar10.py": "cifar10_uncond_50M_500K", "imagenet64_cond.py": "64x64_diffusion",
           "classifier.py": "64x64_classifier", "upsampler.py": "64_256_upsampler",
           "lsun.py": "lsun_bedroom"}


def load(name, *args):
    spec = importlib.util.spec_from_file_location(f"configs.{name[:-3]}", REPO / "configs" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def param_shapes(trainer):
    args, kwargs = trainer.module.example_inputs(1)
    variables = jax.eval_shape(lambda: trainer.module.init(jax.random.PRNGKey(0), *args, **kwargs))
    return {"/".join(str(k.key) for k in path): leaf.shape
            for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]}


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds(name):
    config = load(name)
    config.train.compute_dtype = "float32"
    trainer, data_cfg, _ = T.trainer_from_config(config)
    assert trainer.image_shape == (data_cfg.image_size, data_cfg.image_size, data_cfg.channels)
    if name in SAME_AS:
        preset = gd_models_preset(SAME_AS[name])
        want = gd_models.state_dict_shapes(preset)
        got = gd_models.state_dict_shapes(trainer.module)
        if trainer.conditioning.droppable:
            pytest.fail("a released-checkpoint recipe must not add a null label")
        assert got == want


def gd_models_preset(name):
    """The module of a released checkpoint, built by its factory from its parsed README flags."""
    try:
        from diffjax.compat import gd_presets
        preset = gd_presets.get_config(name)
    except ImportError:  # older layout: the presets lived in configs/pretrained.py
        preset = load("pretrained.py", name)
    return getattr(gd_models, preset.factory)(num_classes=preset.num_classes, **preset.model)


def test_default_is_a_small_classifier_free_unet():
    """The bundled default: a ~1.1 M-parameter class-conditional UNet with a null label."""
    trainer, data_cfg, _ = T.trainer_from_config(load("default.py"))
    assert trainer.conditioning.get(ClassLabel).droppable  # classifier-free: a null label
    assert trainer.module.num_classes == 11
    n = sum(int(np.prod(s)) for s in param_shapes(trainer).values())
    assert 0.8e6 < n < 1.6e6


def test_feature_classifier_config_builds():
    from diffjax.pipelines.evaluation import classifier

    train, data, module, optim = classifier._configs(load("feature_classifier_fashion_mnist.py"))
    assert data.image_size == 32 and data.channels == 1 and module.num_classes == 10
    variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0),
                                                   np.zeros((1, 32, 32, 1), np.float32)))
    assert variables["params"]


def test_a_model_trained_without_label_dropout_samples_with_its_saved_defaults():
    """The end-of-run grid of guided-diffusion's recipe (class-conditional, no label dropout)
    failed: eval.guidance_scale (default 1.0) was saved as the bundle's sampling default, and
    sample() then asked the model for an unconditional branch it does not have. Such a run now
    saves no scale, an older bundle's saved scale is ignored, and an explicit one is refused."""
    import diffjax
    from diffjax.pipelines.training.config import experiment_from_config
    from tests._util import TINY, tiny_bundle
    from tests.test_train import tiny_config

    plain = experiment_from_config(tiny_config(conditioning="class", label_dropout=0.0))
    assert "guidance_scale" not in plain.description()["sampling"]
    dropout = experiment_from_config(tiny_config(conditioning="classifier_free",
                                                 label_dropout=0.1))
    assert dropout.description()["sampling"]["guidance_scale"] == 1.0

    old = tiny_bundle("UNetModel", conditioning=[ClassLabel(3)], size=8, out_channels=6,
                      num_classes=3, sampling={"guidance_scale": 1.0, "grid": "2"}, **TINY)
    images = diffjax.sample(old, jax.random.PRNGKey(0), 2, labels=[0, 2])
    assert images.shape == (2, 8, 8, 3)
    with pytest.raises(ValueError, match="trained without conditioning dropout"):
        diffjax.sample(old, jax.random.PRNGKey(0), 2, labels=[0, 2], guidance_scale=2.0)
