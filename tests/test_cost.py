"""bench/cost.py and the training loop's MFU: XLA's FLOP count against hand counts of a convolution
stack's multiply-adds (forward, and backward = the input and weight gradients), the memory model
against a compile at a third batch, the sampling step holding exactly one network evaluation, the
train step's count invariant under microbatching and multi-step dispatch, the datasheet peaks,
and the script's last line."""
import importlib.util
import math
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import parallel
from diffjax.pipelines import training as T
from diffjax.pipelines.training import loop, metrics
from diffjax.pipelines.training.state import state_shardings
from tests._util import REPO
from tests.test_train import tiny_config

_spec = importlib.util.spec_from_file_location("bench_cost", REPO / "bench" / "cost.py")
cost = sys.modules["bench_cost"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cost)

# A 1-level ADM UNet on 8x8 RGB images (guided-diffusion flags): compiles in a minute.
TINY_FLAGS = ("--image_size 8 --num_channels 32 --num_res_blocks 1 --channel_mult 1 "
              "--attention_resolutions 8 --num_heads 1 --learn_sigma True --diffusion_steps 100")


class ConvStack(nn.Module):
    """3x3 'SAME' convolutions without bias, widths `widths`."""

    widths: tuple = (8, 16)

    @nn.compact
    def __call__(self, x):
        for width in self.widths:
            x = nn.Conv(width, (3, 3), padding="SAME", use_bias=False)(x)
        return x


def conv_macs(batch, size, c_in, c_out, k=3):
    """Multiply-adds of a k x k 'SAME' convolution on [batch, size, size, c_in]: every output
    position times the kernel taps that fall inside the image (XLA counts no zero padding)."""
    half = k // 2
    taps = sum(min(i + half, size - 1) - max(i - half, 0) + 1 for i in range(size))  # per axis
    return batch * taps * taps * c_in * c_out


def _conv_stack(batch, size=8, c_in=3, widths=(8, 16)):
    module = ConvStack(widths)
    x = jax.ShapeDtypeStruct((batch, size, size, c_in), jnp.float32)
    params = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
    macs = [conv_macs(batch, size, a, b) for a, b in zip((c_in,) + widths, widths)]
    return module, params, x, macs


def test_forward_flops_are_twice_the_multiply_adds():
    module, params, x, macs = _conv_stack(batch=2)
    c = cost.analyse(lambda: jax.jit(module.apply).lower(params, x))
    assert c.flops == 2 * sum(macs)
    assert c.flops_per_device == 2 * sum(macs)


def test_backward_flops_are_the_input_and_weight_gradients():
    """d/d(params, x) of sum(f(x)^2): the forward, then per convolution its input gradient and
    its weight gradient, each as many multiply-adds as the forward; plus the loss's square, sum
    and doubling (3 flops per output element)."""
    module, params, x, macs = _conv_stack(batch=2)

    def loss(p, x):
        return jnp.sum(module.apply(p, x) ** 2)

    c = cost.analyse(lambda: jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x))
    outputs = 2 * 8 * 8 * 16
    assert 2 * 3 * sum(macs) <= c.flops <= 2 * 3 * sum(macs) + 3 * outputs


def test_memory_is_linear_in_the_batch_and_the_fit_predicts_a_third_batch():
    """An SGD step of the conv stack at batch 8 and 16 fixes fixed + b * per_image; the compile at
    batch 40 lands on that line (within 2 % + 64 KiB: buffer alignment), and largest_batch
    solves it."""
    def step_at(batch):
        module, params, x, _ = _conv_stack(batch, size=16, widths=(32, 32, 32))

        def sgd(p, x):
            grads = jax.grad(lambda p: jnp.sum(module.apply(p, x) ** 2))(p)
            return jax.tree.map(lambda a, g: a - 1e-3 * g, p, grads)

        return cost.analyse(lambda: jax.jit(sgd, donate_argnums=0).lower(params, x)).peak_bytes

    fixed, per_image = cost.fit_memory(8, step_at(8), 16, step_at(16))
    assert per_image > 0 and fixed > 0
    predicted, measured = fixed + 40 * per_image, step_at(40)
    assert abs(predicted - measured) <= 0.02 * measured + 2**16, (predicted, measured)
    # The activations of one image: at least its input and the three 32-channel outputs.
    assert per_image >= 4 * 16 * 16 * (3 + 3 * 32)
    capacity = fixed + 100.5 * per_image
    assert cost.largest_batch(fixed, per_image, capacity, devices=1) == 100
    assert cost.largest_batch(fixed, per_image, capacity, devices=4) == 400
    assert cost.largest_batch(fixed, per_image, fixed + 0.5 * per_image, devices=2) == 0


@pytest.fixture(scope="module")
def tiny_model():
    return cost.preset_model(flags=TINY_FLAGS)


def test_the_sampling_step_is_one_network_evaluation(tiny_model):
    """The DDIM step's count is the network's forward count plus an update of a few dozen flops
    per pixel (the posterior maths and the x0 clipping), independent of the network."""
    batch = 4
    module = tiny_model.module
    (x, t), kwargs = jax.eval_shape(lambda: module.example_inputs(batch))
    variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *module.example_inputs(1)[0]))
    forward = metrics.program_flops(jax.jit(module.apply).lower(variables, x, t, **kwargs))
    mesh = parallel.make_mesh(1, jax.devices()[:1])
    step = metrics.program_flops(cost.lower_sample_step(tiny_model, mesh, batch))
    pixels = batch * 8 * 8 * 3
    assert forward < step <= forward + 100 * pixels, (forward, step)


def test_the_train_step_costs_three_forward_passes(tiny_model):
    """Forward + backward (input and weight gradients: twice the forward's multiply-adds), less
    the first convolution's input gradient (x_t needs none); the optimizer and the EMA add
    O(params), ~40 flops a parameter here."""
    batch = 8
    module = tiny_model.module
    (x, t), _ = jax.eval_shape(lambda: module.example_inputs(batch))
    variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *module.example_inputs(1)[0]))
    forward = metrics.program_flops(jax.jit(module.apply).lower(variables, x, t))
    n_params = sum(math.prod(p.shape) for p in jax.tree.leaves(variables))
    trainer = cost.preset_trainer(tiny_model, batch)
    mesh = parallel.make_mesh(1, jax.devices()[:1])
    train = metrics.program_flops(cost.lower_train_step(trainer, mesh, batch))
    ratio = (train - 40 * n_params) / forward
    assert 2.7 <= ratio <= 3.2, ratio


def _step_flops(**train):
    trainer, _, _ = T.trainer_from_config(tiny_config(**train))
    mesh = parallel.make_mesh(1, jax.devices()[:1])
    abstract, shardings = state_shardings(trainer.init, mesh, jax.random.PRNGKey(0))
    s = trainer.config.steps_per_dispatch
    batches = {"image": jax.ShapeDtypeStruct((s, 8, 8, 8, 1), jnp.float32),
               "label": jax.ShapeDtypeStruct((s, 8), jnp.int32)}
    lowered = T.compile_steps(trainer, mesh, shardings).lower(abstract, batches)
    return loop.flop_accounting(trainer, mesh, shardings, abstract, batches, lowered)


def test_the_logged_flops_per_step_do_not_depend_on_how_the_step_is_dispatched():
    """Gradient accumulation over 4 microbatches of 2 images and 2 steps per dispatch do the same arithmetic
    per step as one step on the whole batch (XLA would count the rolled microbatch loop's body
    once, a quarter of the forward and backward passes)."""
    plain, peak = _step_flops(peak_tflops=100.0)
    assert peak == 100e12
    assert _step_flops(peak_tflops=100.0, steps_per_dispatch=2, total_steps=10)[0] == plain
    assert _step_flops(peak_tflops=100.0, microbatch=2)[0] == plain
    assert _step_flops() is None  # a CPU has no datasheet peak: no MFU


def test_a_backend_without_a_lowered_count_gets_the_count_of_a_cpu_lowering(monkeypatch):
    """XLA:GPU answers no cost analysis of a lowered program: the step is then lowered again for
    one CPU device, which must count what the native lowering counts (here the native backend is
    a CPU made to look like a GPU whose lowerings report nothing)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # traced as for a GPU: direct convs
    plain = _step_flops(peak_tflops=100.0)[0]
    native = metrics.program_flops
    seen = []

    def gpu_like(stage):  # the first lowering is the GPU's, the second the CPU's
        seen.append(stage)
        return native(stage) if len(seen) > 1 else None

    monkeypatch.setattr(metrics, "program_flops", gpu_like)
    assert _step_flops(peak_tflops=100.0)[0] == plain
    assert len(seen) == 2  # the native lowering, then the CPU one
    devices = jax.devices

    def no_cpu(backend=None):  # JAX_PLATFORMS=cuda: the CPU backend is not there
        if backend == "cpu":
            raise RuntimeError("Unknown backend cpu")
        return devices(backend)

    monkeypatch.setattr(jax, "devices", no_cpu)
    seen.clear()
    assert _step_flops(peak_tflops=100.0) is None  # no CPU backend: no count, no MFU


class _Writer:
    def __init__(self):
        self.rows = []

    def write_scalars(self, step, scalars):
        self.rows.append(dict(scalars))


def test_the_logger_writes_mfu_when_the_flop_rate_is_known():
    trainer, _, _ = T.trainer_from_config(tiny_config())
    writer = _Writer()
    logger = loop._Logger(writer, trainer, log_every=1, images_per_step=8)
    row = {"objective": [1.0], "grad_norm": [1.0], "finite": [True], "bad_steps": [0],
           "lr": [1e-3], "loss": [1.0], "loss_quartile_sum": [[1.0, 0, 0, 0]],
           "loss_quartile_count": [[1.0, 0, 0, 0]]}
    logger.start_clock(0)
    logger.add(0, {k: np.asarray(v) for k, v in row.items()})
    assert "mfu" not in writer.rows[-1]
    logger.flop_rate = (3e12, 100e12, 2)  # FLOPs per step, peak per device, devices
    logger.add(1, {k: np.asarray(v) for k, v in row.items()})
    scalars = writer.rows[-1]
    assert scalars["mfu"] == pytest.approx(3e12 * scalars["steps_per_s"] / 200e12)


def test_datasheet_peaks_and_mfu():
    assert metrics.peak_flops("NVIDIA H100 80GB HBM3", jnp.bfloat16) == 989e12
    assert metrics.peak_flops("NVIDIA H200", "bfloat16") == 989e12
    assert metrics.peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert metrics.peak_flops("NVIDIA A100-SXM4-80GB", "float32") == 156e12
    assert metrics.peak_flops("TPU v5 lite", "bfloat16") == 197e12
    assert metrics.peak_flops("TPU v5", "bfloat16") == 459e12
    assert metrics.peak_flops("TPU v4", "bfloat16") == 275e12
    assert metrics.peak_flops("Tesla V100-SXM2-16GB", "bfloat16") is None  # no bfloat16 units
    assert metrics.peak_flops("cpu", "float32") is None
    # 400 TFLOP in 1 s on 2 devices of 400 TFLOP/s: half the peak.
    assert metrics.mfu(400e12, 1.0, 400e12, 2) == 0.5


def test_train_config_checks_the_peak():
    with pytest.raises(ValueError, match="peak_tflops"):
        T.TrainConfig(peak_tflops=-1.0)


LINE = re.compile(r"cost: (\S+) train GFLOP/image (\S+) sample-step GFLOP/image (\S+) "
                  r"peak GiB/device (\S+)")


def test_the_script_turns_the_analyses_into_its_table_and_last_line(monkeypatch, capsys):
    """main() on the tiny model over the 4 test devices, XLA's analyses replaced by stated ones
    (the compiles take a minute here; the slow test below runs them): a train step of 3 GFLOP per
    image and 1 + b/2 GiB per device at b images per device, a sampling step of 1 GFLOP per image.
    By hand at global batch 8 (2 per device): 3 and 1 GFLOP/image, 2 GiB; fixed 1 GiB + 0.5 GiB
    per image, so 0.75 x 16 GiB holds (12 - 1) / 0.5 = 22 images per device, 88 on 4; MFU of
    8 x 3 GFLOP in 0.5 s on 4 devices of 1 TFLOP/s: 1.2 %."""
    def fake(lower):
        mesh, batch = lower.args[1:3]
        train = lower.func is cost.lower_train_step
        return cost.Cost(flops=(3e9 if train else 1e9) * batch, flops_per_device=None,
                         peak_bytes=int((1 + batch / mesh.size / 2) * cost.GIB), compile_s=0.0)

    assert jax.device_count() == 4  # tests/conftest.py
    monkeypatch.setattr(cost, "analyse", fake)
    out = cost.main(["--flags", TINY_FLAGS, "--batch", "8", "--variants", "main",
                     "--step-time", "0.5", "--peak-tflops", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert LINE.fullmatch(lines[-1]).groups() == ("flags", "3.000", "1.000", "2.000")
    assert re.search(r"^plain\s+2\.00\s+1\.00\s+512\.0\s+88 / ", "\n".join(lines), re.M)
    assert out["programs"]["plain"]["fits"][16] == 88
    assert out["mfu"] == pytest.approx(0.012)


@pytest.mark.slow
def test_the_script_prints_the_cost_line():
    """The script end to end on 2 host devices (main program only): its last line parses, the
    train step costs about three sampling steps, and the MFU it implies is the FLOPs over the
    time and the peak."""
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "cost.py"), "--flags", TINY_FLAGS, "--batch", "4",
         "--devices", "2", "--variants", "main", "--step-time", "0.5", "--peak-tflops", "0.001"],
        capture_output=True, text=True, cwd=REPO, timeout=900,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    m = LINE.fullmatch(last)
    assert m and m.group(1) == "flags", last
    train, sample, peak = map(float, m.groups()[1:])
    assert 2.5 <= train / sample <= 4.0 and peak > 0
    mfu = float(re.search(r"MFU (\S+) %", out.stdout).group(1)) / 100
    assert mfu == pytest.approx(train * 1e9 * 4 / 0.5 / (2 * 1e9), rel=2e-3)
    assert re.search(r"^plain\s+\d", out.stdout, re.M)
