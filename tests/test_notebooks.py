"""The notebooks run top to bottom, offline, as a user runs them (nbclient, a real kernel), on
tiny random-weight models saved under the pretrained names they load (a temporary
$DIFFJAX_HOME); and the repository holds them with their outputs stripped.

Their `parameters` cell is overridden papermill's way (a cell injected after it) for fewer steps,
and a check cell appended to each asserts what the notebook shows against what it must be:
classifier-free guidance at w = 0 is the unconditional model (the empty caption), and the
notebook's hand-written colour energy draws what diffjax's universal guidance draws with the same
loss and scale. (Whether the energy moves a random-weight model's colours towards the target is
not asserted: that rests on a trained denoiser's Jacobian.)"""
import base64
import io
import os
import pathlib

import nbformat
import numpy as np
import pytest
from PIL import Image

from tests._util import REPO, write_tiny_pretrained

nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = REPO / "notebooks"
SIZE = 16  # the tiny models' resolution: compiling, not sampling, is then what takes the time

# name -> (parameter overrides, the check cell appended at the end)
CASES = {
    "quickstart.ipynb": ("STEPS = 3\nLABELS = [207, 360]\n", f"""
assert images.shape == more.shape == (2, {SIZE}, {SIZE}, 3) and images.dtype == np.uint8
assert not np.array_equal(images, more)  # another seed and other labels: other images
assert pathlib.Path("samples.png").is_file()
"""),
    "guidance.ipynb": ("STEPS = 3\nNUM_SAMPLES = 2\nSCALES = [0.0, 3.0]\n", """
from diffjax.core import guidance_methods as GM

unconditional = diffjax.sample(model, key, NUM_SAMPLES, prompts="", guidance_scale=1.0,
                               sampler="ddim", steps=STEPS)   # w = 1 on the empty caption: D_u
assert np.abs(sweep[0.0].astype(int) - unconditional).max() <= 1
assert not np.array_equal(sweep[0.0], sweep[3.0])
assert np.array_equal(sweep[3.0], plain)               # same key, same scale: the same images
# The hand-written energy is universal guidance: diffjax's own transform, given the same loss
# and scale, draws the same images; and it changed them.
loss = lambda x0, colour: 0.5 * x0.shape[1] * x0.shape[2] * jnp.sum(
    (x0.mean(axis=(1, 2)) - colour) ** 2, axis=-1)
snr_scale = G.scale_fn(lambda c, s: s * c.abar / (1 - c.abar), s=STRENGTH)
library = draw(guidance_scale=3.0,
               guidance=GM.universal(loss, snr_scale, params=jnp.asarray(COLOUR, jnp.float32)))
assert np.abs(guided.astype(int) - library).max() <= 1
assert np.abs(guided.astype(int) - plain).mean() > 1
"""),
}


def _cell(source, tag):
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = [tag]
    return cell


def _prepared(name: str):
    """The notebook with its parameters overridden after the `parameters` cell and the check
    cell appended."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    overrides, check = CASES[name]
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name} needs one cell tagged 'parameters'"
    nb.cells.insert(tagged[0] + 1, _cell(overrides, "injected-parameters"))
    nb.cells.append(_cell("import pathlib\nimport numpy as np\n" + check, "test-check"))
    return nb


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return write_tiny_pretrained(tmp_path_factory.mktemp("diffjax_home"),
                                 names=("adm-imagenet64-cond", "glide-base"), size=SIZE,
                                 num_res_blocks=0)


def _images(cell):
    """The PNG images a code cell displayed, as PIL images."""
    return [Image.open(io.BytesIO(base64.b64decode(out["data"]["image/png"])))
            for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]


@pytest.mark.parametrize("name", sorted(CASES))
def test_notebook_runs_top_to_bottom(name, home, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFJAX_HOME", str(home))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    # XLA's optimisation passes are most of each compile and buy nothing on 16-pixel images:
    # skipping them makes the kernel's compiles about a third cheaper.
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    nb = _prepared(name)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)  # every cell ran (none skipped)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    shown = [image for c in code for image in _images(c)]
    assert shown, f"{name} displayed no image"
    for image in shown:  # each sample enlarged to at least 128 px
        assert image.width >= 128 and image.height >= 128


@pytest.mark.parametrize("name", sorted(CASES))
def test_notebook_is_stripped_and_opens_in_colab(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), \
        f"{name} holds outputs: strip them (jupyter nbconvert --clear-output --inplace)"
    assert nb.metadata["kernelspec"]["name"] == "python3"
    # Installing is Colab's business only: the first code cell is guarded, and no other installs.
    installs = [c for c in code if "pip install" in c.source]
    assert installs == [code[0]] and 'if "google.colab" in sys.modules:' in code[0].source


def test_every_notebook_is_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(CASES)
