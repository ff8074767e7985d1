"""diffjax.cpu_flags: a flag set is chosen explicitly before JAX starts, a late choice is an error
that says so, a flag the user set wins, and the networks still match guided-diffusion's golden
outputs under the "onednn" set (the parity tests, run in a process that chose it)."""
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


def test_the_networks_match_the_golden_outputs_under_the_onednn_set(parity_dir):
    """The forward and guidance-gradient parity tests in a process that chose "onednn"."""
    code = ("import sys; from diffjax import cpu_flags; cpu_flags.use('onednn'); import pytest; "
            "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/test_models.py', '-k', "
            "'forward_matches_reference or guidance_gradient_matches_reference']))")
    run = _python(code, DIFFJAX_SHARED=str(parity_dir.parent))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-500:]
