"""The trainer: LR-schedule and EMA maths against closed forms, the sharded step against one device
(8 CPU devices, in a subprocess), gradient accumulation against the full batch, non-finite steps
skipped and the run stopped, and what each training mode feeds the model."""
import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffjax import conditioning as C
from diffjax import parallel
from diffjax.core import diffusion as D
from diffjax.pipelines import training as T
from diffjax.pipelines.evaluation import bpd
from diffjax.pipelines.training import state as state_lib
from tests._util import REPO


def tiny_config(conditioning="class", num_classes=3, label_dropout=0.0, small_size=0, **train):
    """A UNet of one 32-channel level on 8x8 grayscale images: compiles in seconds.
    conditioning "none" | "class" | "classifier_free" (labels dropped to the null label with
    probability label_dropout), small_size > 0: a super-resolution model."""
    c = ml_collections.ConfigDict()
    c.data = dict(source="fashion_mnist", image_size=8, channels=1)
    c.model = dict(model_channels=32, num_res_blocks=0, channel_mult=(1,), attention_resolutions=(),
                   num_heads=1)
    c.diffusion = dict(beta_schedule="cosine", num_steps=100, variance="learned_range")
    c.conditioning = {}
    if conditioning != "none" or train.get("task") == "classifier":
        c.conditioning["class"] = dict(num_classes=num_classes, dropout=label_dropout)
    if small_size:
        c.conditioning["low_res"] = dict(size=small_size)
    c.train = dict(dict(task="diffusion", batch_size=8, total_steps=10, ema_rates=(0.9, 0.99)),
                   **train)
    c.optim = dict(lr=1e-3, warmup_steps=2, schedule="cosine")
    return c


@pytest.fixture(scope="module")
def class_cond():
    """(trainer, jitted train_step) of tiny_config(), compiled once for the tests that share it."""
    trainer, _, _ = T.trainer_from_config(tiny_config())
    return trainer, jax.jit(trainer.train_step)


def toy_batch(n=8, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.uniform(-1, 1, (n, size, size, 1)).astype(np.float32),
            "label": rng.integers(0, 3, n).astype(np.int32)}


# --------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_lr_schedule_matches_closed_form(schedule):
    cfg = T.OptimConfig(lr=2e-3, warmup_steps=10, schedule=schedule, end_factor=0.1,
                        total_steps=110)
    lr = T.lr_schedule(cfg)
    for n in [0, 4, 9, 10, 35, 60, 109, 110, 500]:
        if n < 10:
            want = 2e-3 * (n + 1) / 10
        else:
            p = min((n - 10) / 100, 1.0)
            want = {"constant": 2e-3,
                    "cosine": 2e-4 + (2e-3 - 2e-4) * (1 + math.cos(math.pi * p)) / 2,
                    "linear": 2e-3 - (2e-3 - 2e-4) * p}[schedule]
        assert float(lr(n)) == pytest.approx(want, rel=1e-6), n


def test_optimizer_uses_the_schedule_as_torch_adamw():
    """First AdamW update of a parameter with gradient g is -lr(0) * sign(g) (bias-corrected
    m / sqrt(v) = g / |g|) minus the decoupled decay lr * wd * p (torch.optim.AdamW)."""
    cfg = T.OptimConfig(lr=1e-2, warmup_steps=4, weight_decay=0.5, grad_clip=0, eps=0.0)
    opt = T.make_optimizer(cfg)
    p = {"w": jnp.array([1.0, -2.0])}
    g = {"w": jnp.array([0.3, 0.7])}
    updates, _ = opt.update(g, opt.init(p), p)
    lr0 = 1e-2 * 1 / 4
    np.testing.assert_allclose(updates["w"], -lr0 * np.sign([0.3, 0.7]) - lr0 * 0.5 * np.array([1.0, -2.0]),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_matches_closed_form(warmup):
    """Constant parameters p and EMA starting at e0: e_N = p + (e0 - p) prod_n d_n, with
    prod_n (1 + n)/(10 + n) = 9! N! / (N + 9)! = 1 / C(N + 9, 9) under warm-up, rate^N without."""
    rate, steps = 0.999, 300
    e = {"a": jnp.full((3,), 5.0)}
    p = {"a": jnp.full((3,), 1.0)}
    for n in range(steps):
        e = T.ema_update(e, p, T.ema_decay(rate, n, warmup))
    left = 1 / math.comb(steps + 9, 9) if warmup else rate ** steps
    np.testing.assert_allclose(e["a"], 1.0 + 4.0 * left, rtol=1e-5, atol=1e-6)
    # Warm-up ends where (1 + n) / (10 + n) reaches the rate.
    assert float(T.ema_decay(0.999, 10_000, True)) == pytest.approx(0.999)
    assert float(T.ema_decay(0.999, 10, True)) == pytest.approx(11 / 20)


def test_ema_in_train_step_follows_the_params(class_cond):
    """Every rate's EMA after one step is d * params_0 + (1 - d) * params_1, d = min(rate, 1/10)."""
    trainer, step = class_cond
    state = trainer.init(jax.random.PRNGKey(0))
    p0 = state.params
    new, _ = step(state, toy_batch())
    for ema, rate in zip(new.ema, (0.9, 0.99)):
        d = min(rate, 1 / 10)
        jax.tree.map(lambda e, a, b: np.testing.assert_allclose(e, d * a + (1 - d) * b, rtol=1e-5,
                                                                atol=1e-7), ema, p0, new.params)


def test_area_downsample_is_block_mean():
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    want = x.reshape(2, 2, 4, 2, 4, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(C.area_downsample(jnp.asarray(x), 2), want, rtol=1e-6)
    with pytest.raises(ValueError, match="size=3"):
        C.area_downsample(jnp.asarray(x), 3)


# --------------------------------------------------------------------------- the step


def test_first_step_loss_is_the_noise_energy():
    """The UNet's output conv is zero-initialised: the first eps prediction is 0, so the MSE term
    is mean(noise^2) of the step's own noise (drawn from fold_in(rng, 0))."""
    trainer, _, _ = T.trainer_from_config(tiny_config(conditioning="none", num_classes=0))
    state = trainer.init(jax.random.PRNGKey(3))
    batch = toy_batch()
    _, metrics = jax.jit(trainer.train_step)(state, batch)
    key = jax.random.fold_in(state.rng, 0)
    _, key_noise, _, _ = jax.random.split(key, 4)
    noise = jax.random.normal(key_noise, batch["image"].shape)
    assert float(metrics["mse"]) == pytest.approx(float(jnp.mean(noise ** 2)), rel=1e-5)


def test_classifier_first_loss_is_log_num_classes():
    """The 'adaptive' pool's output conv is zero-initialised: logits 0, cross-entropy log K."""
    c = tiny_config(task="classifier", conditioning="none")
    c.model = dict(model_channels=32, num_res_blocks=1, channel_mult=(1,), attention_resolutions=(),
                   pool="adaptive")
    trainer, _, _ = T.trainer_from_config(c)
    state = trainer.init(jax.random.PRNGKey(0))
    _, metrics = jax.jit(trainer.train_step)(state, toy_batch())
    assert float(metrics["loss"]) == pytest.approx(math.log(3), rel=1e-6)
    assert 0.0 <= float(metrics["acc@1"]) <= 1.0


def test_classifier_free_label_dropout_uses_the_null_label():
    trainer, _, _ = T.trainer_from_config(tiny_config(conditioning="classifier_free",
                                                      label_dropout=0.3))
    assert trainer.module.num_classes == 4  # 3 classes + the null label
    labels = jnp.asarray(np.random.default_rng(0).integers(0, 3, 20000), jnp.int32)
    y = trainer._model_kwargs({"label": labels, "image": jnp.zeros((20000, 1, 1, 1))},
                              jax.random.PRNGKey(0))["y"]
    dropped = np.asarray(y == 3)
    assert abs(dropped.mean() - 0.3) < 0.015
    np.testing.assert_array_equal(np.asarray(y)[~dropped], np.asarray(labels)[~dropped])


def test_super_resolution_step_feeds_the_area_downsampled_batch():
    trainer, _, _ = T.trainer_from_config(tiny_config(conditioning="none", num_classes=0,
                                                      small_size=4))
    batch = toy_batch()
    kwargs = trainer._model_kwargs({k: jnp.asarray(v) for k, v in batch.items()}, None)
    np.testing.assert_allclose(kwargs["low_res"],
                               batch["image"].reshape(8, 4, 2, 4, 2, 1).mean(axis=(2, 4)), rtol=1e-6)
    state = trainer.init(jax.random.PRNGKey(0))
    new, metrics = jax.jit(trainer.train_step)(state, batch)
    assert np.isfinite(float(metrics["loss"])) and int(new.step) == 1


@pytest.mark.parametrize("algorithm", ["auto", "winograd"])
def test_training_runs_auto_convolutions_direct(monkeypatch, algorithm):
    """conv_algorithm "auto" (Winograd forward values of wide layers on the CPU) trains with
    direct convolutions, where Winograd did not pay; an explicit "winograd" is obeyed. Counted
    while the step is traced, on 16 px layers of 128 channels (where "auto" samples with
    Winograd)."""
    from diffjax.models import winograd
    calls = []
    real = winograd.conv3x3_winograd
    monkeypatch.setattr(winograd, "conv3x3_winograd", lambda *a, **k: calls.append(1) or real(*a, **k))
    c = tiny_config(conditioning="none", num_classes=0)
    c.data.image_size = 16
    c.model.model_channels = winograd.WINOGRAD_MIN_CHANNELS
    c.model.conv_algorithm = algorithm
    trainer, _, _ = T.trainer_from_config(c)
    assert trainer.module.conv_algorithm == algorithm
    state = jax.eval_shape(trainer.init, jax.random.PRNGKey(0))
    batch = {"image": jax.ShapeDtypeStruct((8, 16, 16, 1), jnp.float32),
             "label": jax.ShapeDtypeStruct((8,), jnp.int32)}
    calls.clear()  # init's forward (shapes only) may take either
    jax.eval_shape(trainer.train_step, state, batch)
    assert bool(calls) == (algorithm == "winograd")


def test_microbatches_accumulate_to_the_full_batch_gradient(class_cond):
    full, full_step = class_cond
    micro, _, _ = T.trainer_from_config(tiny_config(microbatch=2))
    state = full.init(jax.random.PRNGKey(0))
    batch = toy_batch()
    a, ma = full_step(state, batch)
    b, mb = jax.jit(micro.train_step)(state, batch)
    assert float(ma["objective"]) == pytest.approx(float(mb["objective"]), rel=1e-5)
    assert float(ma["grad_norm"]) == pytest.approx(float(mb["grad_norm"]), rel=1e-4)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
                 a.params, b.params)


def test_nonfinite_step_changes_nothing_but_the_counters(class_cond):
    trainer, step = class_cond
    state = trainer.init(jax.random.PRNGKey(0))
    bad = toy_batch()
    bad["image"][0, 0, 0, 0] = np.nan
    new, metrics = step(state, bad)
    assert not bool(metrics["finite"])
    assert (int(new.step), int(new.bad_steps), int(new.skipped)) == (1, 1, 1)
    for name in ("params", "ema", "opt_state", "sampler_state"):
        jax.tree.map(np.testing.assert_array_equal, getattr(new, name), getattr(state, name))
    again, _ = step(new, toy_batch())
    assert (int(again.bad_steps), int(again.skipped)) == (0, 1)


def test_a_step_to_non_finite_weights_is_skipped():
    """Finite loss and gradient, non-finite new weights: Adam with eps = 0 divides 0 by 0 for the
    embedding rows of the classes missing from the batch. The step is skipped like a NaN loss."""
    config = tiny_config()
    config.optim = dict(lr=1e-3, eps=0.0)
    trainer, _, _ = T.trainer_from_config(config)
    state = trainer.init(jax.random.PRNGKey(0))
    batch = toy_batch()
    batch["label"][:] = 0
    new, metrics = jax.jit(trainer.train_step)(state, batch)
    assert np.isfinite(float(metrics["objective"])) and np.isfinite(float(metrics["grad_norm"]))
    assert not bool(metrics["finite"])
    assert (int(new.bad_steps), int(new.skipped)) == (1, 1)
    jax.tree.map(np.testing.assert_array_equal, new.params, state.params)


@pytest.mark.slow  # a run with a checkpoint then 20 non-finite steps: ~30 s on 2 cores
def test_run_stops_after_max_bad_steps_and_keeps_the_last_checkpoint(tmp_path):
    """lr 1e30: the first update sends the weights to ~1e30, every later forward pass overflows;
    after max_bad_steps skipped steps the run stops, and the checkpoints hold finite weights."""
    c = tiny_config(total_steps=40, max_bad_steps=3, num_classes=10)  # Fashion-MNIST's classes
    c.data = dict(source="fashion_mnist", image_size=32, channels=1)
    c.optim = dict(lr=1e30, grad_clip=0.0)
    c.checkpoint = dict(every=1, keep=2, async_save=False)
    c.eval = dict(per_class=0)
    c.log_every = 1
    with pytest.raises(T.TrainingDiverged, match="consecutive steps"):
        T.train_and_evaluate(c, tmp_path)
    from diffjax.io.checkpoints import CheckpointManager

    manager = CheckpointManager(tmp_path / "checkpoints")
    steps = manager.all_steps()
    assert steps and max(steps) < 40
    state, _ = manager.restore(None)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


# --------------------------------------------------------------------------- sharding

_SHARDED_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import numpy as np
    sys.path.insert(0, {repo!r})
    from tests.test_train import tiny_config, toy_batch
    from diffjax import parallel
    from diffjax.pipelines import training as T
    from diffjax.pipelines.training import state as state_lib

    trainer, _, _ = T.trainer_from_config(tiny_config(batch_size=16))
    batches = [{{k: v[None] for k, v in b.items()}} for b in (toy_batch(16), toy_batch(16, seed=1))]
    out = {{}}
    for name, devices, fsdp in (("one", jax.devices()[:1], 1), ("data8", jax.devices(), 1),
                                ("data4_fsdp2", jax.devices(), 2)):
        mesh = parallel.make_mesh(fsdp, devices)
        state, sh = state_lib.create_state(trainer.init, mesh, jax.random.PRNGKey(0), fsdp_min_size=0)
        step = T.compile_steps(trainer, mesh, sh)
        losses = []
        for batch in batches:
            state, metrics = step(state, parallel.host_to_global(batch, parallel.batch_sharding(mesh, 1)))
            losses += np.asarray(metrics["loss"]).tolist() + np.asarray(metrics["grad_norm"]).tolist()
        leaf = jax.tree.leaves(state.params)[0]
        out[name] = dict(loss=losses,
                         params=[np.asarray(x).ravel().tolist() for x in jax.tree.leaves(state.params)],
                         ema=[np.asarray(x).ravel().tolist() for x in jax.tree.leaves(state.ema)],
                         devices=len(leaf.sharding.device_set),
                         sharded=any(len(x.sharding.spec) and any(x.sharding.spec)
                                     for x in jax.tree.leaves(state.params)))
    print(json.dumps(out))
""")


@pytest.mark.slow  # a subprocess with 8 devices compiling two steps: ~75 s on 2 cores
def test_sharded_step_matches_one_device_on_8_cpus():
    """2 steps on 1 device, on 8 devices (data=8) and on 8 devices with fsdp=2: same losses, grad
    norms and parameters to float tolerance (only the order of the batch reductions differs; Adam
    divides by sqrt(v) + eps, so parameters whose gradients are ~eps (the zero-initialised output
    conv) move by O(lr) on reduction-order noise: atol is 1 % of lr)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT.format(repo=str(REPO))],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    one = out["one"]
    assert out["data8"]["devices"] == 8 and out["data4_fsdp2"]["sharded"]
    for name in ("data8", "data4_fsdp2"):
        np.testing.assert_allclose(out[name]["loss"], one["loss"], rtol=1e-5)
        for key in ("params", "ema"):
            for a, b in zip(out[name][key], one[key]):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_mesh_and_batch_errors_name_the_fix():
    with pytest.raises(ValueError, match="fsdp=3 does not divide the 4 devices"):
        parallel.make_mesh(3)
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by the 4 devices"):
        parallel.local_batch_size(6, parallel.make_mesh(1))
    with pytest.raises(ValueError, match="microbatch=3 does not divide"):
        T.TrainConfig(batch_size=8, microbatch=3)
    with pytest.raises(ValueError, match="unknown TrainConfig setting"):
        T.trainer_from_config(tiny_config(batchsize=8))


def test_fsdp_spec_splits_the_largest_divisible_axis():
    assert parallel.fsdp_spec((3, 3, 64, 128), 4, min_size=0) == jax.sharding.PartitionSpec(
        None, None, None, "fsdp")
    assert parallel.fsdp_spec((3, 3, 64, 126), 4, min_size=0) == jax.sharding.PartitionSpec(
        None, None, "fsdp", None)
    assert parallel.fsdp_spec((128,), 4) == jax.sharding.PartitionSpec()  # small: replicated


# --------------------------------------------------------------------------- logging


def _network_config(module):
    from diffjax.models.registry import network_config

    return network_config(module)


def _crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), bit by bit: the TFRecord framing's checksum, written independently."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_crc32c_known_value():
    assert _crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720 B.4)


def test_metric_writer_writes_jsonl_and_an_event_file(tmp_path):
    from diffjax.pipelines.training.metrics import MetricWriter

    writer = MetricWriter(tmp_path, console=False)
    writer.write_scalars(5, {"loss": 0.5})
    writer.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 5, "loss": 0.5}
    data = next((tmp_path / "tensorboard").iterdir()).read_bytes()
    # TFRecord framing: length, masked crc of the length, data, masked crc of the data.
    length = int.from_bytes(data[:8], "little")
    assert int.from_bytes(data[8:12], "little") == _masked_crc(data[:8])
    assert b"brain.Event:2" in data[12:12 + length]
    assert b"loss" in data[12 + length + 4:]


def test_fine_tuning_starts_from_the_converted_weights(tmp_path):
    """init_from: the saved model's network and weights replace the config's model, its
    diffusion replaces the config's (its sampling grid is not the training chain)."""
    import diffjax

    source, _, _ = T.trainer_from_config(tiny_config(conditioning="none", num_classes=0))
    weights = source.init(jax.random.PRNGKey(42)).params
    spec = diffjax.DiffusionSpec("linear", 50, variance="learned_range")
    saved = diffjax.DiffusionModel(
        network=_network_config(source.module), weights={"params": weights}, spec=spec,
        image_shape=(8, 8, 1), sampling={"grid": "25"})
    diffjax.save(saved, tmp_path / "model")
    c = tiny_config(conditioning="none", num_classes=0)
    c.model, c.diffusion = {}, {}
    c.init_from = str(tmp_path / "model")
    trainer, _, params = T.trainer_from_config(c)
    assert trainer.schedule.num_timesteps == 50 and trainer.schedule.original_num_steps == 50
    state = trainer.init(jax.random.PRNGKey(0), params=params)
    jax.tree.map(np.testing.assert_array_equal, state.params, weights)
    jax.tree.map(np.testing.assert_array_equal, state.ema[0], weights)
    new, metrics = jax.jit(trainer.train_step)(state, toy_batch())
    assert np.isfinite(float(metrics["loss"])) and int(new.step) == 1


def test_bpd_estimate_is_the_variational_bound():
    """The Monte-Carlo bits/dim (exact L_0, sampled L_t) agrees with GD's calc_bpd_loop, which
    sums every term, on a 10-step chain. Both draw x_t at random: the means over 16 images are
    compared (a T vs T - 1 slip or a missing term would be off by >= 3 %)."""
    c = tiny_config(conditioning="none", num_classes=0)
    c.diffusion = dict(beta_schedule="cosine", num_steps=10, variance="learned_range")
    experiment, trainer, _ = T.experiment_and_trainer(c)
    params = trainer.init(jax.random.PRNGKey(0)).params
    # Perturb the zero-initialised output conv so that the variance head matters.
    params = jax.tree.map(lambda p: p + 0.01 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), params)
    x = jnp.asarray(toy_batch(16)["image"])
    model = T.model_from_state(experiment, trainer.init(jax.random.PRNGKey(0))).replace(
        weights={"params": params}, use="params")
    estimate = bpd.estimate_bpd(model, x, jnp.zeros(16, jnp.int32), jax.random.PRNGKey(1),
                                t_per_image=400, batch=4000)

    def model_fn(x_t, t):
        return trainer.module.apply({"params": params}, x_t, t)

    loop = jax.jit(lambda x, k: D.calc_bpd_loop(trainer.schedule, trainer.diffusion, model_fn, x, k))
    exact = np.mean([loop(x, jax.random.PRNGKey(k))["total_bpd"] for k in range(8)], axis=0)
    assert float(np.mean(estimate)) == pytest.approx(float(np.mean(exact)), rel=0.012)
