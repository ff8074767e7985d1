"""The training loop behind `python -m diffjax train`: resume, dispatch, log, checkpoint, and the
end-of-run outputs (loss curve, sample grid, bits/dim, the exported model).

Multi-host (diffjax.distributed, launch/): the same command on every process of a TPU pod or GPU
cluster; each process feeds its rows of every global batch, process 0 writes metrics and images,
all write their checkpoint shards, and a preemption notice stops all at one agreed step. A
checkpoint is only written from finite parameters (the step never keeps a non-finite update), and
a resumed run starts from the newest checkpoint that verifies.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time

import jax
import ml_collections
import numpy as np

from diffjax import data as data_lib
from diffjax import images as images_lib
from diffjax import parallel
from diffjax import paths
from diffjax.bundle import DiffusionModel, ema_name
from diffjax.io import checkpoints as ckpt_lib
from diffjax.io import store
from diffjax.io.loading import load
from diffjax.pipelines import sampling
from diffjax.pipelines.evaluation.bpd import estimate_bpd
from diffjax.pipelines.training import finetune
from diffjax.pipelines.training import metrics as metrics_lib
from diffjax.pipelines.training.config import Experiment, experiment_from_config
from diffjax.pipelines.training.metrics import MetricWriter
from diffjax.pipelines.training.step import Trainer, build_trainer, compile_steps
from diffjax.pipelines.training.state import state_shardings


class TrainingDiverged(RuntimeError):
    """`max_bad_steps` consecutive steps had a non-finite loss, gradient or update."""


def experiment_and_trainer(config: ml_collections.ConfigDict):
    """(Experiment, Trainer, initial params or None) of a full experiment config."""
    init_model = load(config.init_from) if config.get("init_from") else None
    experiment = experiment_from_config(config, init_model)
    trainer = build_trainer(experiment)
    params = None if init_model is None else finetune.initial_params(trainer.module, init_model)
    return experiment, trainer, params


def trainer_from_config(config: ml_collections.ConfigDict):
    """(Trainer, DataConfig, initial params or None) of a full experiment config."""
    experiment, trainer, params = experiment_and_trainer(config)
    return trainer, experiment.data, params


def model_from_state(experiment: Experiment, state, use: str | None = None) -> DiffusionModel:
    """The DiffusionModel of a train state: its parameters and every EMA."""
    description = experiment.description()
    weights = {"params": state.params}
    weights.update({ema_name(r): e for r, e in zip(experiment.train.ema_rates, state.ema)})
    model = DiffusionModel.from_description(description, weights)
    return model.using(use) if use is not None else model


def step_flops(trainer: Trainer, mesh, state_sh, state, batches, lowered) -> float | None:
    """FLOPs of one train step over the whole global batch (every device's share), or None.

    The count is XLA's cost analysis of the step as written, before XLA's optimisations, read
    from `lowered` when that is one step on the whole batch. XLA counts a rolled loop's body once,
    so with several steps per dispatch (one rolled scan) or train.microbatch (a scan over chunks)
    the count is taken from one step of the same arithmetic on the whole batch at once (one more
    lowering, no compile). With train.remat the recomputed forward pass is counted
    too. XLA:GPU gives no cost analysis of a lowered program (jax 0.10-0.11), and its compiled
    count leaves out cuDNN's convolutions: there the same step (traced as for the GPU: direct
    convolutions, XLA's attention in place of cuDNN's) is lowered for one CPU device (abstract
    inputs, nothing compiled or run), which counts the same arithmetic."""
    tc = trainer.config
    one_step = tc.num_microbatches == 1 and tc.steps_per_dispatch == 1
    flops = metrics_lib.program_flops(lowered) if one_step and lowered is not None else None
    if flops:
        return flops
    whole = dataclasses.replace(trainer, config=dataclasses.replace(
        tc, microbatch=0, steps_per_dispatch=1))
    one = jax.tree.map(lambda b: jax.ShapeDtypeStruct((1,) + b.shape[1:], b.dtype), batches)
    if not one_step:
        flops = metrics_lib.program_flops(compile_steps(whole, mesh, state_sh).lower(state, one))
    if flops or jax.default_backend() == "cpu":
        return flops
    try:
        cpu = parallel.make_mesh(1, jax.devices("cpu")[:1])
    except RuntimeError:  # JAX_PLATFORMS leaves the CPU backend out
        return None
    if getattr(whole.module, "attention_impl", "einsum") in ("cudnn", "auto"):
        # cuDNN's attention has no CPU lowering; XLA's does the same matrix products.
        whole = dataclasses.replace(whole, module=whole.module.clone(attention_impl="xla"))
    abstract, cpu_sh = state_shardings(whole.init, cpu, jax.random.PRNGKey(0))
    on_cpu = lambda tree, sh: jax.tree.map(  # noqa: E731
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sh)
    one_sh = jax.tree.map(lambda _: parallel.batch_sharding(cpu, 1), one)
    return metrics_lib.program_flops(compile_steps(whole, cpu, cpu_sh).lower(
        on_cpu(abstract, cpu_sh), on_cpu(one, one_sh)))


def flop_accounting(trainer: Trainer, mesh, state_sh, state, batches,
                    lowered) -> tuple[float, float] | None:
    """(FLOPs of one step (`step_flops`), the peak FLOP/s of one device) for the logged MFU, or
    None when the peak (train.peak_tflops, else the device's datasheet value) or the count is
    unknown."""
    tc = trainer.config
    peak = tc.peak_tflops * 1e12 or metrics_lib.peak_flops(mesh.devices.flat[0].device_kind,
                                                            tc.resolved_dtype())
    if not peak or lowered is None:
        return None
    flops = step_flops(trainer, mesh, state_sh, state, batches, lowered)
    return (flops, peak) if flops else None


class _Logger:
    """Host-side bookkeeping of the step metrics: averages over each logging interval, the
    non-finite watchdog, and the run of losses for the final metrics. `flop_rate`: (FLOPs per
    step, peak FLOP/s per device, devices) when the MFU is logged."""

    def __init__(self, writer: MetricWriter, trainer: Trainer, log_every: int, images_per_step: int):
        self.writer, self.trainer = writer, trainer
        self.log_every, self.images_per_step = log_every, images_per_step
        self.sums, self.count, self.last_ok = {}, 0, {}
        self.losses = []  # (step, loss) of every finite step of this process's run
        self.clock, self.clock_step = None, None
        self.flop_rate = None

    def start_clock(self, step: int):
        self.clock, self.clock_step = time.perf_counter(), step

    def add(self, first_step: int, metrics: dict) -> None:
        """Metrics [S] of the S steps that started at first_step (host numpy)."""
        metrics = jax.device_get(metrics)
        for i in range(len(metrics["objective"])):
            step = first_step + i + 1
            row = {k: v[i] for k, v in metrics.items()}
            if int(row["bad_steps"]) >= self.trainer.config.max_bad_steps:
                raise TrainingDiverged(self._diagnostic(step, row))
            if row["finite"]:
                self.last_ok = row
                self.losses.append((step, float(row["loss"])))
            for k, v in row.items():
                self.sums[k] = self.sums.get(k, 0.0) + np.asarray(v, np.float64)
            self.count += 1
            if step % self.log_every == 0:
                self.flush(step)

    def flush(self, step: int) -> None:
        if not self.count:
            return
        s, n = self.sums, self.count
        scalars = {k: s[k] / n for k in s if k not in ("loss_quartile_sum", "loss_quartile_count",
                                                       "finite", "bad_steps")}
        for q in range(4):
            if s["loss_quartile_count"][q]:
                scalars[f"loss_q{q}"] = s["loss_quartile_sum"][q] / s["loss_quartile_count"][q]
        scalars["skipped_steps"] = n - s["finite"]
        if self.clock is not None and step > self.clock_step:
            seconds = time.perf_counter() - self.clock
            scalars["steps_per_s"] = (step - self.clock_step) / seconds
            scalars["images_per_s"] = scalars["steps_per_s"] * self.images_per_step
            if self.flop_rate is not None:
                scalars["mfu"] = metrics_lib.mfu(self.flop_rate[0], 1 / scalars["steps_per_s"],
                                                 *self.flop_rate[1:])
            self.start_clock(step)
        self.writer.write_scalars(step, scalars)
        self.sums, self.count = {}, 0

    def _diagnostic(self, step: int, row: dict) -> str:
        last = self.last_ok
        good = (f"the last finite step had loss {float(last['loss']):.4g}, grad norm "
                f"{float(last['grad_norm']):.4g}" if last else "no step was finite")
        return (f"training stopped at step {step}: {int(row['bad_steps'])} consecutive steps "
                f"(train.max_bad_steps={self.trainer.config.max_bad_steps}) had a non-finite loss, "
                f"gradient or update (now loss {float(row['loss'])}, grad norm "
                f"{float(row['grad_norm'])}, lr {float(row['lr']):.3g}); {good}. Skipped steps "
                f"change no parameter, so every checkpoint holds the last good weights and the "
                f"run stopped before saving this step; the latest checkpoint is intact. Try a "
                f"lower optim.lr, a longer optim.warmup_steps, optim.grad_clip > 0, a larger "
                f"optim.eps, or train.compute_dtype='float32'.")


def sample_grid(experiment: Experiment, model: DiffusionModel, key):
    """(images uint8 [N, H, W, C], row labels, columns) of the end-of-run grid: per_class
    samples of every class (classifier-free guidance eval.guidance_scale when the model has a
    null label), of every prompt, or rows x per_class unconditional samples."""
    ev = experiment.eval
    rows, request, n = model.conditioning.grid(ev.per_class, ev.rows, ev.prompts)
    scale = ev.guidance_scale if model.conditioning.droppable else None
    images = sampling.sample(model, key, n, sampler=ev.sampler, steps=ev.respacing or None,
                             guidance_scale=scale, **request)
    return images, rows, ev.per_class


def _write_grid(experiment, model, path, writer=None, step=0):
    images, rows, cols = sample_grid(experiment, model, jax.random.PRNGKey(experiment.eval.seed))
    names = data_lib.class_names(experiment.data)
    labels = [names[r] for r in rows] if rows is not None and names and \
        isinstance(rows[0], int) else rows
    if jax.process_index() == 0:
        grid = images_lib.show(images, cols, row_labels=labels)
        paths.write_with(path, grid.save)
        if writer is not None:
            writer.write_image(step, "samples", grid)
    return images


# What may change between a run and its resumption: how the step computes, not what it trains.
_RESUMABLE_CHANGES = ("dtype", "use_checkpoint", "attention_impl", "conv_algorithm")


def _check_resumable(ckpts, description: dict, workdir) -> None:
    """Refuse to resume a workdir whose checkpoints hold another model (network, diffusion,
    conditioning, image shape), naming every difference, before anything is restored or written."""
    saved = ckpts.model()
    if saved is None:
        return
    differences = []
    for section in ("kind", "network", "spec", "conditioning", "image_shape"):
        old, new = saved.get(section), description.get(section)
        if isinstance(old, dict) and isinstance(new, dict):
            differences += [f"{section}.{k}: {old.get(k)!r} -> {new.get(k)!r}"
                            for k in sorted(set(old) | set(new))
                            if k not in _RESUMABLE_CHANGES and old.get(k) != new.get(k)]
        elif old != new:
            differences.append(f"{section}: {old!r} -> {new!r}")
    if differences:
        raise ValueError(f"{workdir} holds checkpoints of another model than this config "
                         f"describes ({'; '.join(differences)}): resume with the run's own "
                         f"config ({workdir}/config.json) or train in another --workdir")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Train (resuming from workdir/checkpoints when it holds a checkpoint), then sample a grid,
    estimate bits/dim, export the model to workdir/model and write PNGs and metrics to
    `workdir`. Returns the final metrics."""
    wall_start = time.perf_counter()
    workdir = paths.as_path(workdir)  # local or gs://...: one code path (etils.epath)
    experiment, trainer, init_params = experiment_and_trainer(config)
    tc, eval_cfg, ckpt_cfg = experiment.train, experiment.eval, experiment.checkpoint
    mesh = parallel.make_mesh(tc.fsdp)
    parallel.local_batch_size(tc.batch_size, mesh)  # checks that every device gets a share
    workdir.mkdir(parents=True, exist_ok=True)  # only once the settings are known to be good
    ckpts = ckpt_lib.CheckpointManager(workdir / "checkpoints", ckpt_cfg)
    _check_resumable(ckpts, experiment.description(), workdir)
    if process0 := jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))

    key = jax.random.PRNGKey(tc.seed)
    init = functools.partial(trainer.init, params=init_params)
    abstract, state_sh = state_shardings(init, mesh, key)
    restored = ckpts.restore(jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh))
    if restored is None:
        state, data_state = jax.jit(init, out_shardings=state_sh)(key), None
    else:
        state, data_state = restored
    # Each process reads only its rows of every global batch (data.py: "Order").
    iterator = data_lib.make_iterator(experiment.data, tc.batch_size, data_state)
    step = int(state.step)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    batch_sh = parallel.batch_sharding(mesh, ndim_leading=1)
    description = experiment.description()
    conditioning = experiment.conditioning if tc.task == "diffusion" else None

    def next_batches():
        batches = iterator.next(tc.steps_per_dispatch)
        if conditioning is not None:
            conditioning.check_batch(batches)  # on the host, before a compiled step sees it
        return parallel.host_to_global(batches, batch_sh)

    writer = MetricWriter(workdir)
    logger = _Logger(writer, trainer, experiment.log_every, tc.batch_size)
    if process0:
        print(f"diffjax train: {type(trainer.module).__name__} {n_params / 1e6:.2f} M params, "
              f"{jax.device_count()} {jax.default_backend()} device(s) mesh {dict(mesh.shape)}, "
              f"global batch {tc.batch_size}, "
              f"{'resuming at step ' + str(step) if step else 'from scratch'} -> "
              f"{tc.total_steps} steps; workdir {workdir}", file=sys.stderr, flush=True)
        print("diffjax train: compiling the step ...", file=sys.stderr, flush=True)
    compile_start = time.perf_counter()
    batches = next_batches() if step < tc.total_steps else None
    lowered = compile_steps(trainer, mesh, state_sh).lower(state, batches) \
        if batches is not None else None
    compiled = lowered.compile() if lowered is not None else None
    compile_s = time.perf_counter() - compile_start
    accounting = flop_accounting(trainer, mesh, state_sh, state, batches, lowered)
    if accounting is not None:
        logger.flop_rate = (*accounting, mesh.size)
        _log(f"logging MFU against {accounting[1] / 1e12:g} TFLOP/s per device x {mesh.size}: "
             f"{accounting[0] / 1e12:.4g} TFLOP per step (XLA's cost analysis)")
    preempted = ckpt_lib.PreemptionFlag()
    pending = None
    from tqdm.auto import tqdm

    bar = tqdm(total=tc.total_steps, initial=step, disable=not process0, unit="step",
               dynamic_ncols=True, mininterval=2.0, desc="train")
    train_start = time.perf_counter()
    logger.start_clock(step)
    try:
        while step < tc.total_steps:
            state, metrics = compiled(state, batches)
            first, step = step, step + tc.steps_per_dispatch
            # The previous dispatch's metrics are read while this one runs (no device stall).
            if pending is not None:
                logger.add(*pending)
            pending = (first, metrics)
            bar.update(tc.steps_per_dispatch)
            # Every process calls reached() after every dispatch: with several processes it is
            # JAX's agreement on one step, so that all save the same one.
            stop = preempted.reached(step // tc.steps_per_dispatch)
            save = step % ckpt_cfg.every == 0 or step == tc.total_steps or stop
            if save:
                logger.add(*pending)  # a diverged run raises here, before anything is saved
                pending = None
                ckpts.save(step, state, iterator.get_state(), description, force=True)
            if stop:
                ckpts.wait()
                print(f"diffjax train: SIGTERM: saved step {step}, exiting; rerun the same "
                      f"command to resume", file=sys.stderr, flush=True)
                raise SystemExit(143)
            if eval_cfg.sample_every and step % eval_cfg.sample_every == 0 and tc.task == "diffusion":
                _write_grid(experiment, model_from_state(experiment, state, _use(eval_cfg)),
                            workdir / f"samples_{step:07d}.png", writer, step)
            if step < tc.total_steps:
                batches = next_batches()
        if pending is not None:
            logger.add(*pending)
        logger.flush(step)
    finally:
        bar.close()
        ckpts.close()
        preempted.close()
    train_s = time.perf_counter() - train_start
    final = {"steps": step, "params": int(n_params), "compile_s": compile_s, "train_s": train_s,
             "skipped_steps": int(state.skipped)}
    if logger.losses:
        tail = [l for _, l in logger.losses[-max(len(logger.losses) // 10, 1):]]
        final["final_loss"] = float(np.mean(tail))
    writer.flush(upload=True)  # _final_outputs reads metrics.jsonl back from the workdir
    final.update(_final_outputs(experiment, trainer, state, workdir, writer, step))
    final["wall_s"] = time.perf_counter() - wall_start
    writer.write_hparams(_flatten(config.to_dict()), final)
    writer.close()
    if process0:
        (workdir / "final_metrics.json").write_text(json.dumps(final, indent=1))
        print("diffjax train: " + json.dumps(final), file=sys.stderr, flush=True)
    return final


def _use(eval_cfg) -> str | int:
    return -1 if eval_cfg.ema_index < 0 else eval_cfg.ema_index


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(f"diffjax train: {message}", file=sys.stderr, flush=True)


def _final_outputs(experiment, trainer, state, workdir, writer, step) -> dict:
    """The loss-curve PNG, the exported model, the sample grid and the bits/dim estimates."""
    out, eval_cfg = {}, experiment.eval
    log = workdir / "metrics.jsonl"
    if jax.process_index() == 0 and log.exists():
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "loss" in r]
        rows = list({r["step"]: r for r in rows}.values())  # a resumed run may repeat steps
        if rows:
            paths.write_with(workdir / "loss_curve.png", functools.partial(
                images_lib.loss_curve, [r["step"] for r in rows], [r["loss"] for r in rows]))
    model = model_from_state(experiment, jax.tree.map(np.asarray, parallel.global_to_host(state)),
                             _use(eval_cfg))
    if jax.process_index() == 0 and not paths.is_remote(workdir):
        _log(f"exporting the model to {workdir / 'model'} ...")
        store.save(model, os.fspath(workdir / "model"), overwrite=True)
    if experiment.train.task != "diffusion" or not eval_cfg.per_class:
        return out
    if not model.conditioning.self_contained:
        return out  # e.g. a super-resolution model's grid needs low-resolution inputs
    start = time.perf_counter()
    _log(f"sampling the {eval_cfg.per_class}-column grid ({eval_cfg.sampler}, grid "
         f"{eval_cfg.respacing or 'all steps'}) ...")
    _write_grid(experiment, model, workdir / "samples.png", writer, step)
    out["sample_s"] = time.perf_counter() - start
    if eval_cfg.bpd_images and model.conditioning.batch_keys <= {"image", "label"}:
        start = time.perf_counter()
        _log(f"bits/dim on {eval_cfg.bpd_images} {eval_cfg.bpd_split} images ...")
        test = data_lib.eval_arrays(experiment.data, eval_cfg.bpd_split, eval_cfg.bpd_images)
        key = jax.random.PRNGKey(eval_cfg.seed + 1)
        for name, use in (("raw", -1), ("ema", _use(eval_cfg))):
            bpd = estimate_bpd(model.using(use), test["image"], test["label"], key,
                               eval_cfg.bpd_t_per_image, eval_cfg.batch)
            out[f"bpd_{name}"] = float(bpd.mean())
            out[f"bpd_{name}_stderr"] = float(bpd.std() / np.sqrt(len(bpd)))
        out["bpd_s"] = time.perf_counter() - start
    return out


__all__ = ["TrainingDiverged", "train_and_evaluate", "trainer_from_config", "flop_accounting",
           "experiment_and_trainer", "model_from_state", "sample_grid"]
