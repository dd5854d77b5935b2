"""One benchmark run, as it was imported before the engine and the jobs got their own modules:
the names below keep working for a release (tests and notebooks import them).

The config's resolution: :mod:`robustbench_fvae.config.resolve`; the model:
:mod:`robustbench_fvae.engine.model`; data loading and evaluation:
:mod:`robustbench_fvae.engine.evaluate`; checkpoints: :mod:`robustbench_fvae.engine.checkpoint`;
the epoch loop: :mod:`robustbench_fvae.engine.loop`; the training job (``run``):
:mod:`robustbench_fvae.jobs.train` (docs/design.md).
"""

from __future__ import annotations

from .config import REAL_DEFAULTS, SYNTH_DEFAULTS
from .config.resolve import built_versions, dataset_defaults, jtt_stage1_config, resolve_config
from .engine.checkpoint import (
    CHECKPOINT_FILE,
    PRETRAINED_DIR,
    WEIGHTS_FILE,
    Preempted,
    TrainingError,
    linear_warmup_decay,
    load_trainable_state,
    save_checkpoint,
    sigterm_flag,
    trainable_state,
)
from .engine.evaluate import (
    SeededAugmentation,
    autocast,
    check_eval_groups,
    evaluate,
    evaluate_counterfactual,
    make_loader,
    predict,
)
from .engine.loop import LOSS_KEYS, Trainer
from .engine.model import (
    build_model_and_data,
    check_rebuildable,
    load_initial_model,
    load_trained_model,
    resolve_device,
)
from .jobs.train import RunResult, run

__all__ = [
    "CHECKPOINT_FILE", "LOSS_KEYS", "PRETRAINED_DIR", "REAL_DEFAULTS", "SYNTH_DEFAULTS",
    "WEIGHTS_FILE", "Preempted", "RunResult", "SeededAugmentation", "Trainer", "TrainingError",
    "autocast", "build_model_and_data", "built_versions", "check_eval_groups",
    "check_rebuildable", "dataset_defaults", "evaluate", "evaluate_counterfactual",
    "jtt_stage1_config", "linear_warmup_decay", "load_initial_model", "load_trainable_state",
    "load_trained_model", "make_loader", "predict", "resolve_config", "resolve_device", "run",
    "save_checkpoint", "sigterm_flag", "trainable_state",
]
