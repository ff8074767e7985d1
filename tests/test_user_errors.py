"""Careless input, as a user hits it on the command line: every case exits non-zero with one
`error:` line that names the value and the fix (never a traceback, never exit 0 with garbage),
and writes nothing (no output file, no workdir).

The commands run through `python -m diffjax`'s entry point (diffjax.cli.main) in this process, to
spare an interpreter start per case; test_a_real_process_* run the same in subprocesses."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from PIL import Image

import diffjax
from diffjax import data as data_lib
from diffjax.bundle import DiffusionModel
from diffjax.cli import common
from diffjax.cli import main as cli_main
from diffjax.conditioning import ClassLabel, Conditioning
from diffjax.io.checkpoints import CheckpointConfig, CheckpointManager
from diffjax.models.registry import NETWORKS, network_config
from diffjax.pipelines.training.config import config_keys, experiment_from_config
from tests._util import REPO, write_class_images


def _subprocess(*argv, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-m", "diffjax", *argv], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    return run.returncode, run.stderr


@pytest.fixture
def cli(capsys, monkeypatch):
    """`python -m diffjax ARGV` in `cwd`, in this process: (exit status, stderr)."""
    def run(*argv, cwd):
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        try:
            rc = cli_main(list(argv))
        except SystemExit as exit_:  # argparse's refusals
            rc = exit_.code
        return rc, capsys.readouterr().err
    return run


def _refused(rc, stderr, *fragments):
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    assert rc != 0 and "Traceback" not in stderr, stderr[-2000:]
    assert last.startswith("error: "), stderr[-2000:]
    for fragment in fragments:
        assert fragment in last, (fragment, last)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 4-class classifier-free model, 8x8 RGB, random weights."""
    root = tmp_path_factory.mktemp("user_errors")
    module = NETWORKS["UNetModel"](image_size=8, in_channels=3, out_channels=6, num_classes=5,
                                   model_channels=32, num_res_blocks=1, channel_mult=(1,),
                                   attention_resolutions=(), num_heads=1)
    args, kwargs = module.example_inputs(1)
    params = jax.jit(module.init)(jax.random.PRNGKey(0), *args, **kwargs)["params"]
    model = DiffusionModel(network=network_config(module), weights={"params": params},
                           spec=diffjax.DiffusionSpec("cosine", 100, variance="learned_range"),
                           conditioning=Conditioning((ClassLabel(4, dropout=0.1),)),
                           image_shape=(8, 8, 3))
    diffjax.save(model, root / "model")
    return root


@pytest.mark.parametrize("flags,named", [
    (["--guidance_scale", "nan"], "guidance_scale=nan"),
    (["--classifier_scale", "inf"], "classifier_scale=inf"),
    (["--eta", "nan"], "eta=nan"),
    (["--labels", "4"], "[0, 4)"),  # >= the model's classes: not the null label
    (["--labels", "-1"], "[0, 4)"),
    (["--num_samples", "0"], "--num_samples 0"),
    (["--batch_size", "0"], "batch_size=0"),
    (["--steps", "ddim5x"], "ddim5x"),
    (["--sampler", "dpm++2"], "dpm++2"),
])
def test_sample_refuses_bad_values_and_writes_nothing(cli, model_dir, flags, named):
    rc, err = cli("sample", "--model", "model", "--num_samples", "2", "--steps", "3",
                   "--no_progress", "--out", "out.npz", *flags, cwd=model_dir)
    if flags[0] == "--sampler":  # argparse's own refusal: usage, then "error: argument ..."
        assert rc == 2 and "invalid choice: 'dpm++2'" in err, err
    else:
        _refused(rc, err, named)
    assert not list(model_dir.glob("out*"))


def _config(path, images, **sections):
    text = textwrap.dedent(f"""
        import ml_collections

        def get_config():
            c = ml_collections.ConfigDict()
            c.data = dict(source="folder", path={str(images)!r}, image_size=8, channels=3)
            c.model = dict(model_channels=32, num_res_blocks=0, channel_mult=(1,),
                           attention_resolutions=(), num_heads=1)
            c.diffusion = dict(beta_schedule="cosine", num_steps=100)
            c.conditioning = {{"class": dict(num_classes=2)}}
            c.train = dict(batch_size=4, total_steps=2)
            c.eval = dict(per_class=0, bpd_images=0)
    """)
    for name, value in sections.items():
        text += f"    c.{name} = {value!r}\n"
    path.write_text(text + "    return c\n")
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """8 images of 2 classes (guided-diffusion's class-from-filename convention)."""
    return write_class_images(tmp_path_factory.mktemp("images"), 8, 2)


@pytest.mark.parametrize("overrides,named", [
    (["--config.optim.lr=nan"], "optim.lr=nan"),
    (["--config.optim.lr=-1"], "optim.lr=-1"),
    (["--config.eval.sampler=ddimm"], "did you mean 'ddim'"),
    (["--config.diffusion.lear_sigma=True"], "'lear_sigma'"),
    (["--config.train.batch_size=0"], "batch_size"),
    (["--config.data.source=fashion_mnist", "--config.data.path=EMPTY"], "data.path="),
    (["--config.train.fsdp=3"], "fsdp=3"),  # more than the devices: named, with the fix
])
def test_train_refuses_bad_config_values_before_any_work(cli, tmp_path, images, overrides,
                                                          named):
    (tmp_path / "EMPTY").mkdir()
    config = _config(tmp_path / "config.py", images)
    overrides = [o.replace("EMPTY", str(tmp_path / "EMPTY")) for o in overrides]
    rc, err = cli("train", "--config", str(config), "--workdir", "run", *overrides, cwd=tmp_path)
    _refused(rc, err, named)
    if "data.path=" in named:  # found when the data is opened: the run directory is empty
        assert not list((tmp_path / "run").glob("checkpoints/*"))
    else:
        assert not (tmp_path / "run").exists()


def test_train_refuses_unknown_keys_in_the_config_file(cli, tmp_path, images):
    config = _config(tmp_path / "config.py", images,
                     diffusion=dict(beta_schedule="cosine", lear_sigma=True))
    rc, err = cli("train", "--config", str(config), "--workdir", "run", cwd=tmp_path)
    _refused(rc, err, "'lear_sigma'", "learn")
    assert not (tmp_path / "run").exists()


def test_labels_beyond_num_classes_stop_training(cli, tmp_path, images):
    """The images have 2 classes; num_classes=1 would read label 1 as the null label."""
    config = _config(tmp_path / "config.py", images)
    rc, err = cli("train", "--config", str(config), "--workdir", "run",
                   "--config.conditioning.class.num_classes=1", cwd=tmp_path)
    _refused(rc, err, "label 1", "num_classes")
    assert not list((tmp_path / "run").glob("checkpoints/*/"))


def test_resuming_with_another_model_is_refused_and_keeps_the_run(cli, tmp_path, images):
    """A workdir whose checkpoint holds a 32-channel model, resumed with model_channels=64: the
    differences are named and neither the checkpoint nor config.json changes."""
    config = _config(tmp_path / "config.py", images)
    experiment = experiment_from_config(common.load_config_file(str(config)))
    run = tmp_path / "run"
    ckpts = CheckpointManager(run / "checkpoints", CheckpointConfig(async_save=False))
    ckpts.save(1, {"w": np.zeros(3, np.float32)}, {}, experiment.description(), force=True)
    ckpts.close()
    (run / "config.json").write_text("{\"the\": \"run's own\"}")
    rc, err = cli("train", "--config", str(config), "--workdir", "run",
                   "--config.model.model_channels=64", cwd=tmp_path)
    _refused(rc, err, "model_channels: 32 -> 64", "config.json")
    assert json.loads((run / "config.json").read_text()) == {"the": "run's own"}
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1"]


def test_overrides_set_schema_fields_the_file_left_out_and_replace_tuples(tmp_path, images):
    config = common.load_config_file(str(_config(tmp_path / "config.py", images)))
    out = common.apply_overrides(config, ["--config.model.channel_mult=(1,2)",
                                          "--config.model.channel_mult=(1,)",
                                          "--config.train.fsdp=1", "--config.eval.sampler=ddpm"],
                                 config_keys)
    assert out.model.channel_mult == (1,) and out.train.fsdp == 1 and out.eval.sampler == "ddpm"
    with pytest.raises(ValueError, match="'fsdpp'.*did you mean 'fsdp'"):
        common.apply_overrides(config, ["--config.train.fsdpp=2"], config_keys)


def test_a_truncated_image_is_named(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(tmp_path / "a_0.png")
    whole = (tmp_path / "a_0.png").read_bytes()
    (tmp_path / "a_1.png").write_bytes(whole[:len(whole) // 2])
    source = data_lib.ImageFolderSource(str(tmp_path))
    assert source[0]["image"].shape == (64, 64, 3)
    with pytest.raises(data_lib.ImageReadError, match=r"a_1\.png: not a readable image"):
        source[1]


def test_tfds_offline_fails_at_once_and_writes_nothing(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(data_lib, "_reachable", lambda host, timeout_s=5.0: False)
    config = data_lib.DataConfig(source="tfds:mnist", path=str(tmp_path / "tfds"), image_size=8)
    with pytest.raises(FileNotFoundError, match="'mnist' is not prepared.*tfds build mnist"):
        data_lib.make_source(config, "train")
    assert not (tmp_path / "tfds").exists()


def test_a_real_process_refuses_with_one_line(tmp_path, model_dir, images):
    """The same contract from a fresh interpreter: exit status 2, one `error:` line, nothing
    written, for a sampling value and a training config value."""
    rc, err = _subprocess("sample", "--model", "model", "--guidance_scale", "nan",
                          "--no_progress", "--out", "out.npz", cwd=model_dir)
    _refused(rc, err, "guidance_scale=nan")
    assert rc == 2 and not list(model_dir.glob("out*"))
    config = _config(tmp_path / "config.py", images)
    rc, err = _subprocess("train", "--config", str(config), "--workdir", "run",
                          "--config.optim.lr=inf", cwd=tmp_path)
    _refused(rc, err, "optim.lr=inf")
    assert rc == 2 and not (tmp_path / "run").exists()
