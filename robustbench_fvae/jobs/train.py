"""The training job: one run's lifecycle through record.store.run_job, with JTT's stage 1 as a
run of its own."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..adapters import count_parameters
from ..algorithms import JTT_ERROR_FILE
from ..config import ConfigError, RunConfig
from ..config.resolve import jtt_stage1_config, resolve_config
from ..distributed import Distributed, init_distributed
from ..engine.checkpoint import CHECKPOINT_FILE, load_trainable_state
from ..engine.evaluate import check_eval_groups, predict
from ..engine.loop import Trainer, silent
from ..engine.model import build_model_and_data, resolve_device
from ..progress import print_line
from ..record import schema, store
from ..record.io import read_json, write_json_atomic


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict
    skipped: bool = False


def run(cfg: RunConfig, *, force: bool = False, progress: bool = True,
        log: Callable[[str], None] = print_line, wait: bool = False) -> RunResult:
    """Train and evaluate one run; write its record under ``cfg.out``. Idempotent: a finished
    run is not redone unless ``force``; an unfinished one resumes from its checkpoint.

    One process trains a run directory at a time: while another live process holds it, this
    raises :class:`store.RunInUseError` naming that process, or with ``wait`` waits for it to
    end (then finds the run done, or resumes it).
    """
    cfg = resolve_config(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    dist, device_name = init_distributed(cfg.device)
    if not dist.is_main:
        progress, log = False, silent
    if cfg.train.batch_size % dist.world_size:
        raise ConfigError(f"batch_size {cfg.train.batch_size} must be divisible by the "
                          f"{dist.world_size} data-parallel processes")
    rdir = store.run_dir(cfg.out, cfg)
    job = store.run_job(rdir, lambda: _run_held(cfg, rdir, dist, device_name, progress, log),
                        force=force, wait=wait, log=log, ranks=dist)
    return RunResult(job.run_dir, job.metrics, skipped=job.skipped)


def _run_held(cfg: RunConfig, rdir: Path, dist: Distributed, device_name: str, progress: bool,
              log: Callable[[str], None]) -> dict:
    """The body of :func:`run` (see store.run_job): with the run directory held by this process,
    train (or resume) the run, write its files but metrics.json and ``done``, return its
    metrics."""
    device = resolve_device(device_name)
    workers = cfg.num_workers if cfg.num_workers is not None else (
        0 if device.type == "cpu" else min(8, os.cpu_count() or 1))
    error_set = None
    if cfg.train.algorithm == "jtt":
        error_set = _jtt_error_set(cfg, rdir, dist, device, workers, progress, log)
    torch.manual_seed(cfg.train.seed)
    model, splits, adapted = build_model_and_data(cfg, device, progress=progress, log=log)
    check_eval_groups(splits)
    if dist.is_main:
        rdir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(rdir / schema.CONFIG_FILE, schema.config_record(
            cfg, schema.dataset_info_dict(splits["train"]),
            schema.environment_info(device=f"{device} x{dist.world_size}"
                                    if dist.enabled else str(device))))
    dist.barrier()
    params = count_parameters(model)
    log(f"{cfg.method} on {cfg.dataset} with {cfg.backbone}: {params['trainable']:,} trainable, "
        f"{params['inference']:,} inference-time added parameters, "
        f"{len(adapted)} adapted layers; device {device}"
        + (f" x {dist.world_size} processes" if dist.enabled else "") + f"; run {rdir}")
    trainer = Trainer(cfg, model, splits, device, workers, rdir, progress, log, dist,
                       error_set=error_set)
    trainer.fit()
    return trainer.finish(params)


def _jtt_error_set(cfg: RunConfig, rdir: Path, dist: Distributed, device: torch.device,
                   workers: int, progress: bool, log: Callable[[str], None]) -> list[int]:
    """JTT's error set: the training images that stage 1's final model misclassifies (eval
    transform). Computed once and kept in ``rdir/jtt_error_set.json``; a resumed run reads it."""
    path = rdir / JTT_ERROR_FILE
    if not path.is_file():
        stage1 = resolve_config(jtt_stage1_config(cfg))
        log(f"JTT stage 1: ERM for {stage1.train.epochs} epoch(s)")
        first = run(stage1, progress=progress, log=log, wait=True)
        with torch.random.fork_rng(devices=[]):
            model, splits, _ = build_model_and_data(stage1, device)
        ckpt = torch.load(first.run_dir / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        load_trainable_state(model, ckpt["model"])  # the final epoch's model, not the selected
        train = splits["train"]
        train.transform = splits["val"].transform
        _, pred = predict(model, train, cfg.train.eval_batch_size, workers, device, dist)
        errors = np.flatnonzero(pred != train.y)
        per_group = {grp.name: int(np.sum(train.g[errors] == grp.g)) for grp in train.groups}
        if dist.is_main:
            rdir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, {
                "stage1_run": str(first.run_dir), "stage1_hash": first.run_dir.name,
                "n_train": len(train), "n_errors": len(errors), "errors_per_group": per_group,
                "error_set": [int(i) for i in errors]})
        dist.barrier()
        log(f"JTT error set: {len(errors)} of {len(train)} training images ({per_group})")
    info = read_json(path)
    return [int(i) for i in info["error_set"]]
