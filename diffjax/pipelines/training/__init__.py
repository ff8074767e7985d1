"""Training as a package, one job per module: `config` (the experiment config, validated),
`optim` (AdamW, its schedule, the EMA), `state` (the train state and its one construction path),
`step` (the pure train step and its compilation over the mesh), `finetune` (initial parameters
from a loaded model), `metrics` (console, metrics.jsonl, TensorBoard) and `loop` (the run)."""
from diffjax.pipelines.training.config import EvalConfig, Experiment, TrainConfig, experiment_from_config
from diffjax.pipelines.training.loop import (
    TrainingDiverged, experiment_and_trainer, model_from_state, train_and_evaluate,
    trainer_from_config)
from diffjax.pipelines.training.optim import OptimConfig, ema_decay, ema_update, lr_schedule, make_optimizer
from diffjax.pipelines.training.state import TrainState
from diffjax.pipelines.training.step import Trainer, build_trainer, compile_steps

__all__ = ["EvalConfig", "Experiment", "TrainConfig", "experiment_from_config", "TrainingDiverged",
           "experiment_and_trainer", "model_from_state", "train_and_evaluate", "trainer_from_config",
           "OptimConfig", "ema_decay", "ema_update", "lr_schedule", "make_optimizer", "TrainState",
           "Trainer", "build_trainer", "compile_steps"]
