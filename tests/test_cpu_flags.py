"""diffjax.cpu_flags: a flag set is chosen explicitly before JAX starts, a late choice is an error
that says so, a flag the user set wins, and the networks still match guided-diffusion's golden
outputs under the "onednn", "onednn_conv" and "onednn_ynn" sets (the parity tests, run in a process
that chose each); under the last two a convolution's weight gradient matches a float64 sum too."""
import os
import subprocess
import sys

import jax
import pytest

from diffjax import cpu_flags
from diffjax.cli import common
from tests._util import REPO


def _python(code: str, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    environ.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=environ, timeout=600, cwd=REPO)


def test_the_set_is_added_to_xla_flags_before_jax_starts_and_a_users_flag_wins():
    code = ("import os; from diffjax import cpu_flags; cpu_flags.use('onednn'); "
            "print(os.environ['XLA_FLAGS']); import jax.numpy as jnp; print(float(jnp.ones(3).sum()))")
    out = _python(code, XLA_FLAGS="--xla_cpu_use_xnnpack=true").stdout.split("\n")
    flags = out[0].split()
    assert flags[0] == "--xla_cpu_use_xnnpack=true"  # the user's own value, kept
    assert "--xla_cpu_use_xnnpack=false" not in flags
    assert {f for f in cpu_flags.FLAG_SETS["onednn"] if "xnnpack" not in f} <= set(flags)
    assert out[1] == "3.0"  # XLA accepted every flag


def test_a_choice_after_jax_started_is_refused_and_names_the_fix():
    jax.numpy.ones(1).block_until_ready()  # this process's backend has started
    assert cpu_flags.started()
    before = os.environ.get("XLA_FLAGS")
    with pytest.raises(RuntimeError, match="too late.*restart"):
        cpu_flags.use("onednn")
    assert os.environ.get("XLA_FLAGS") == before
    cpu_flags.use("xla")  # XLA's defaults add nothing: nothing to refuse
    with pytest.raises(ValueError, match="xla_cpu_flags='fast'.*onednn, xla"):
        cpu_flags.use("fast")


def test_the_command_line_applies_the_default_unless_told_and_never_silently_late():
    # In-process, after JAX started: no flag named, the running flags stay (no error) ...
    common.process_options(["--images", "4"])
    # ... a named set is refused, since it could no longer take effect.
    with pytest.raises(RuntimeError, match="too late"):
        common.process_options(["--xla_cpu_flags=onednn"])
    with pytest.raises(ValueError, match="'bogus'"):
        common.process_options(["--xla-cpu-flags", "bogus"])
    # A fresh process gets the default set from the command line alone.
    code = ("import os, sys; from diffjax.cli import common; common.process_options(sys.argv[1:]); "
            "print(os.environ.get('XLA_FLAGS', ''))")
    default = _python(code).stdout.split()
    assert default == list(cpu_flags.FLAG_SETS[cpu_flags.DEFAULT]) and default
    training = code.replace("sys.argv[1:]", "sys.argv[1:], training=True")
    assert _python(training).stdout.split() == list(cpu_flags.FLAG_SETS[cpu_flags.TRAINING_DEFAULT])
    code = code.replace("sys.argv[1:]", "['--xla_cpu_flags', 'xla']")
    assert _python(code).stdout.strip() == ""


def _choose(name: str) -> str:
    return f"from diffjax import cpu_flags; cpu_flags.use({name!r}); "


def _assert_parity_under(name: str, parity_dir) -> None:
    """The forward and guidance-gradient parity tests pass, none skipped, in a process that
    chose flag set `name`."""
    code = ("import sys; " + _choose(name) + "import pytest; "
            "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/test_models.py', '-k', "
            "'forward_matches_reference or guidance_gradient_matches_reference']))")
    run = _python(code, DIFFJAX_SHARED=str(parity_dir.parent))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-500:]


def test_the_networks_match_the_golden_outputs_under_the_onednn_set(parity_dir):
    """The forward and guidance-gradient parity tests in a process that chose "onednn"."""
    _assert_parity_under("onednn", parity_dir)


# A 3x3 convolution's input and weight gradients against float64 sums over the padded input.
_CONV_GRADIENTS = """
import numpy as np, jax, jax.numpy as jnp
from jax import lax
rng = np.random.default_rng(0)
x = rng.standard_normal((4, 16, 16, 32)).astype(np.float32)
w = (rng.standard_normal((3, 3, 32, 48)) * 0.1).astype(np.float32)
dy = rng.standard_normal((4, 16, 16, 48)).astype(np.float32)
conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
gx, gw = jax.jit(lambda x, w, dy: jax.vjp(conv, x, w)[1](dy))(x, w, dy)
xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
d = dy.astype(np.float64)
ref_w = np.stack([np.stack([np.einsum("nhwc,nhwd->cd", xp[:, i:i + 16, j:j + 16], d)
                            for j in range(3)]) for i in range(3)])
# dx[h, w] = sum_ij dy[h + 1 - i, w + 1 - j] W[i, j]^T
dp = np.pad(d, ((0, 0), (1, 1), (1, 1), (0, 0)))
ref_x = sum(np.einsum("nhwd,cd->nhwc", dp[:, 2 - i:18 - i, 2 - j:18 - j],
                      w[i, j].astype(np.float64)) for i in range(3) for j in range(3))
for got, ref in ((gw, ref_w), (gx, ref_x)):
    err = np.max(np.abs(np.asarray(got, np.float64) - ref)) / np.max(np.abs(ref))
    assert err < 1e-5, err
print("ok")
"""


@pytest.mark.parametrize("name", ["onednn_conv", "onednn_ynn"])
def test_the_networks_match_the_golden_outputs_under_the_training_sets(parity_dir, name):
    """The forward and guidance-gradient parity tests, and a convolution's weight and input
    gradients (what training adds) against float64, in a process that chose `name` ("onednn_ynn"
    is the training default)."""
    run = _python(_choose(name) + _CONV_GRADIENTS)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
    _assert_parity_under(name, parity_dir)
