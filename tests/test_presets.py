"""configs/pretrained.py against ../shared/presets: every released checkpoint's flags, diffusion and
exact state-dict layout (keys in order, shapes) as the original code builds them."""

import json
import pathlib
import re
import shlex

import pytest

from diffjax.compat import gd_presets as pretrained
from diffjax.compat import gd_models
from tests._util import PRESETS, require
from tests._util import first_quick

SPECS = sorted(p.stem for p in PRESETS.glob("*.json")) if PRESETS.exists() else []


def _spec(name):
    return json.loads(require(PRESETS / f"{name}.json").read_text())


def _readme_flags(spec) -> str:
    """The README's flag string: the command with its $VARIABLES substituted (improved-diffusion's
    README has no sampling command: its MODEL_FLAGS and DIFFUSION_FLAGS)."""
    variables = spec["source"]["readme_variables"]
    command = spec["source"].get("readme_command")
    if command is None:
        return " ".join(variables[k] for k in ("MODEL_FLAGS", "DIFFUSION_FLAGS") if k in variables)
    command = re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], command)
    tokens = shlex.split(command)
    return shlex.join(tokens[2:])  # drop "python script.py"


def _script(spec) -> str:
    return pathlib.PurePath(spec["script"]).stem


def test_one_preset_per_released_checkpoint():
    require(PRESETS)
    assert SPECS, f"no preset JSON found in {PRESETS}"
    assert sorted(pretrained.PRESETS) == SPECS


@pytest.mark.parametrize("name", SPECS)
def test_readme_flag_string_parses_to_the_scripts_args(name):
    spec = _spec(name)
    parsed = pretrained.parse_flags(
        _readme_flags(spec), family=spec["family"], script=_script(spec)
    )
    assert parsed == spec["args"]


@pytest.mark.parametrize("name", SPECS)
def test_preset_flags_diffusion_and_class(name):
    spec = _spec(name)
    config = pretrained.get_config(name)
    assert (
        pretrained.parse_flags(config.flags, family=spec["family"], script=_script(spec))
        == spec["args"]
    )
    assert config.model_class == spec["constructor"]["class"].rsplit(".", 1)[-1]
    assert config.url == spec["url"] and config.checkpoint == spec["checkpoint"]
    assert {k: config.diffusion[k] for k in spec["diffusion_flags"]} == spec["diffusion_flags"]
    assert config.diffusion.sigma_small == spec["diffusion_flags"].get("sigma_small", False)
    model_flags = (
        spec.get("classifier_flags") if spec["kind"] == "classifier" else spec["model_flags"]
    )
    if model_flags:  # the flags the JSON calls the model's, all given to the factory
        assert {k: config.model[k] for k in model_flags} == model_flags


@pytest.mark.parametrize("name", first_quick(SPECS))
def test_preset_builds_the_exact_state_dict_layout(name):
    spec = _spec(name)
    config = pretrained.get_config(name)
    module = getattr(gd_models, config.factory)(num_classes=config.num_classes, **config.model)
    shapes = gd_models.state_dict_shapes(module)
    assert [(k, list(s)) for k, s in shapes.items()] == [
        (k, s) for k, s, _ in spec["state_dict"]["tensors"]
    ]


def test_parser_errors_name_the_flag_and_the_fix():
    with pytest.raises(ValueError, match="--num_chanels .*did you mean --num_channels"):
        pretrained.parse_flags("--num_chanels 64")
    with pytest.raises(ValueError, match="--class_cond 'maybe': expected a boolean"):
        pretrained.parse_flags("--class_cond maybe")
    with pytest.raises(ValueError, match="--num_res_blocks needs a value"):
        pretrained.parse_flags("--num_res_blocks")
    with pytest.raises(
        ValueError, match="no preset '64x64_difusion': did you mean 64x64_diffusion"
    ):
        pretrained.get_config("64x64_difusion")
    # --flag=value works too, and improved-diffusion has no num_head_channels flag
    assert pretrained.parse_flags("--num_channels=64")["num_channels"] == 64
    with pytest.raises(ValueError, match="not a flag of improved-diffusion"):
        pretrained.parse_flags("--num_head_channels 64", family=pretrained.ID)


def test_diffusion_kwargs_are_create_gaussian_diffusions():
    kwargs = pretrained.diffusion_kwargs(pretrained.get_config("imagenet64_uncond_100M_1500K"))
    assert kwargs == dict(
        steps=4000,
        learn_sigma=True,
        sigma_small=False,
        noise_schedule="cosine",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=True,
        rescale_learned_sigmas=True,
    )
