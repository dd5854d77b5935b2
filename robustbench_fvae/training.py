"""One benchmark run: train, evaluate every epoch, select, and write the run record
(docs/design.md).

Reproducibility: the data order of epoch ``e`` is a permutation seeded by ``(seed, e)`` and every
training image's augmentation by ``(seed, e, index)``, independent of loader workers; the model's
own randomness (dropout, FVAE samples) comes from the global torch RNG, whose state (every rank's,
under data parallelism) is saved in every checkpoint, and which nothing else draws from: the data
loaders have generators of their own. A run resumed from any checkpoint, at an epoch end or in the
middle of an epoch, therefore continues exactly where it stopped, and on CPU ends with the same
numbers as an uninterrupted run.

Epochs are counted from 1 in the records and on the console (epoch 1 = the evaluation after the
first pass over the training data); ``_Trainer.epoch`` counts the epochs already completed.

Fault injection for tests: with ``RBF_FAULT_KILL_AFTER_STEP=N`` in the environment the run sends
itself SIGKILL right after optimisation step N (after that step's checkpoint, if one is due), a
kill at an exactly known point; never set it otherwise.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import nn

from .adapters import count_parameters
from .algorithms import (
    GROUP_LABELS_IN_TRAINING,
    JTT_ERROR_FILE,
    jtt_defaults,
    make_algorithm,
    validate_algorithm,
)
from .backbones import (
    backbone_data_config,
    backbone_digest,
    create_backbone,
    default_backbone,
)
from .config import (
    SELECTION_RULES,
    ConfigError,
    RunConfig,
)
from .data import (
    check_data_recipe,
    data_defaults,
    get_spec,
    is_replica,
    load_splits,
    make_transforms,
)
from .data.base import GroupSplit
from .distributed import SINGLE_PROCESS, Distributed, init_distributed
from .methods import get_method, validate_method
from .methods.setup import parameter_groups, prepare_model, training_loss
from .metrics import (
    EmptyGroupError,
    constant_predictor,
    counterfactual_record,
    evaluate_split,
)
from .progress import progress_bar
from .record import schema, store, view
from .record.io import (
    RecordError,
    RecordNotFoundError,
    append_jsonl,
    read_json,
    write_bytes_atomic,
    write_folder_atomic,
    write_json_atomic,
    write_jsonl_atomic,
)
from .selection import RULES, select_epoch, should_stop_all, stopping_epoch
from .stem_cache import StemCacheError, cached_splits, counterfactual_inputs, resolve_stem_cache

CHECKPOINT_FILE = "checkpoint.pt"
# Fault injection for the resume tests (see the module docstring); -1: off.
_FAULT_KILL_AFTER_STEP = int(os.environ.get("RBF_FAULT_KILL_AFTER_STEP", "-1"))
WEIGHTS_FILE = "adapter.safetensors"
# A method's adapters in another library's own format (peft's save_pretrained), beside WEIGHTS_FILE.
PRETRAINED_DIR = "peft"
LOSS_KEYS = ("loss", "ce", "task", "aux", "R", "K1", "K2", "G", "orth")

# CPU-sized defaults for the offline replicas; the released code's for real data.
SYNTH_DEFAULTS = {"epochs": 5, "batch_size": 64, "eval_batch_size": 256}
REAL_DEFAULTS = {"epochs": 50, "batch_size": 64, "eval_batch_size": 64}


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss); the last good checkpoint is kept."""


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was written and the run can be relaunched to resume."""


def dataset_defaults(dataset: str) -> dict[str, int | float | str | None]:
    """What a None training setting becomes: CPU-sized numbers for the replicas, the released
    code's for real data, plus the data recipe (``augment``, ``spurious_strength``) of
    :func:`robustbench_fvae.data.data_defaults`."""
    try:
        recipe = data_defaults(dataset)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return {**(SYNTH_DEFAULTS if is_replica(dataset) else REAL_DEFAULTS), **recipe}


def resolve_config(cfg: RunConfig) -> RunConfig:
    """Fill dataset- and method-dependent defaults and check every setting; returns a copy.

    The run hash is taken over this resolved config, so an explicit default and an omitted one
    name the same run.
    """
    cfg = RunConfig.from_dict(cfg.to_dict())
    method = validate_method(cfg.method, cfg.adapter)
    if cfg.train.select not in SELECTION_RULES:
        raise ConfigError(f"unknown selection rule {cfg.train.select!r}; "
                          f"accepted: {', '.join(SELECTION_RULES)}")
    t = cfg.train
    for key, value in dataset_defaults(cfg.dataset).items():
        if getattr(t, key) is None:
            setattr(t, key, value)
    try:
        t.augment, t.spurious_strength = check_data_recipe(cfg.dataset, t.augment,
                                                           t.spurious_strength)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if t.lr is None:
        t.lr = method.default_lr
    if cfg.backbone is None:
        cfg.backbone = default_backbone(cfg.dataset)
    try:
        cfg.stem_cache = resolve_stem_cache(cfg.stem_cache, cfg.dataset, cfg.backbone, t.augment)
    except StemCacheError as err:
        raise ConfigError(str(err)) from None
    # The hash covers what the weights and the replica were built from (docs/backbones.md).
    for key, value in built_versions(cfg).items():
        if getattr(cfg, key) not in (None, value):
            raise ConfigError(f"{key} {getattr(cfg, key)!r} was asked for, but this machine's "
                              f"is {value!r}; drop the setting to run with it")
        setattr(cfg, key, value)
    for key in ("epochs", "batch_size", "eval_batch_size"):
        if getattr(t, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(t, key)}")
    if not (t.lr > 0 and math.isfinite(t.lr)):
        raise ConfigError(f"lr must be a positive number, got {t.lr}")
    if not 0 <= t.warmup_frac < 1:
        raise ConfigError(f"warmup_frac must be in [0, 1), got {t.warmup_frac}")
    if t.weight_decay < 0 or t.grad_clip < 0 or t.patience < 0:
        raise ConfigError("weight_decay, grad_clip and patience must be >= 0")
    if t.algorithm == "jtt":
        epochs, upweight = jtt_defaults(cfg.dataset)
        t.jtt_epochs = epochs if t.jtt_epochs is None else t.jtt_epochs
        t.jtt_upweight = upweight if t.jtt_upweight is None else t.jtt_upweight
    validate_algorithm(t)
    if cfg.device not in ("auto", "cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise ConfigError(f"unknown device {cfg.device!r}; expected auto, cpu, cuda or cuda:N")
    return cfg


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; "
                          "use --device cpu")
    return torch.device(name)


# ---------------------------------------------------------------- data


class SeededAugmentation(torch.utils.data.Dataset):
    """A training split read by ``(position, index)`` keys: item ``index`` at ``position`` of
    epoch ``e``'s order, its random augmentation seeded by ``(seed, e, position)`` — the same in
    any worker, after any resume, and different for two visits of one image (resampling, JTT).
    Yields ``(image, y, g)``."""

    def __init__(self, split: GroupSplit, seed: int) -> None:
        self.split, self.seed, self.epoch = split, seed, 0

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int]):
        position, index = key
        seed = np.random.SeedSequence([self.seed, self.epoch, int(position)]).generate_state(1)[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            image, y, _ = self.split[index]
        return image, y, int(self.split.g[index])


def make_loader(dataset, indices: list[int], batch_size: int, workers: int,
                device: torch.device, seed: int = 0) -> torch.utils.data.DataLoader:
    """A loader over ``indices`` in that order. It has its own generator (seeded by ``seed``):
    a DataLoader without one draws its base seed from the global RNG each time it is iterated,
    which would shift the model's dropout stream when a resumed run builds a mid-epoch loader."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=indices, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=False,
        generator=torch.Generator().manual_seed(int(seed)),
    )


# ---------------------------------------------------------------- checkpoints


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    unknown = [n for n in state if n not in params]
    if missing or unknown:
        raise TrainingError(f"saved weights do not fit this model (missing {missing[:3]}, "
                            f"unexpected {unknown[:3]}); was the run's config changed?")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def save_checkpoint(path: Path, model, optimizer, scheduler, state: dict) -> None:
    payload = {
        "model": trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        **state,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def linear_warmup_decay(total_steps: int, warmup_frac: float) -> Callable[[int], float]:
    """LR multiplier per step: linear warm-up over ``warmup_frac`` of the steps, then linear decay
    to zero (the released schedule)."""
    warmup = int(total_steps * warmup_frac)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


@contextlib.contextmanager
def sigterm_flag() -> Iterator[dict[str, bool]]:
    """Turn SIGTERM (Slurm preemption) into a flag the loop checks between steps."""
    flag = {"stop": False}

    def handler(signum, frame):
        flag["stop"] = True

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------- evaluation


@torch.inference_mode()
def predict(model: nn.Module, split: GroupSplit, batch_size: int, workers: int,
            device: torch.device, dist: Distributed = SINGLE_PROCESS
            ) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (N, K) float32 and predictions (N,) for a whole split, in order.

    Under data parallelism each rank predicts its shard and the rows are gathered back into
    dataset order on every rank.
    """
    model.eval()
    indices = dist.shard(list(range(len(split))))
    probs = [torch.zeros(0, split.num_classes)]
    for images, _, _ in make_loader(split, indices, batch_size, workers, device):
        with autocast(device):
            logits = model(images.to(device, non_blocking=True))
        probs.append(torch.softmax(logits.float(), dim=-1).cpu())
    prob = dist.gather_rows(indices, torch.cat(probs).numpy(), len(split))
    return prob, prob.argmax(1)


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def evaluate(model, split: GroupSplit, batch_size: int, workers: int, device: torch.device,
             dist: Distributed = SINGLE_PROCESS) -> tuple[dict, np.ndarray, np.ndarray]:
    prob, pred = predict(model, split, batch_size, workers, device, dist)
    metrics = evaluate_split(split.y, split.a, split.g, pred, prob, split.groups,
                             split.train_group_counts)
    return metrics, prob, pred


# ---------------------------------------------------------------- the run


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict
    skipped: bool = False


def build_model_and_data(cfg: RunConfig, device: torch.device, progress: bool = False,
                         log: Callable[[str], None] | None = None):
    """The prepared model and the three splits (transforms set from the backbone). With
    ``cfg.stem_cache == "on"`` the splits yield the frozen stem's cached output and the model
    takes it (stem_cache.py; ``progress``, ``log``: a bar and a line when features are computed
    the first time)."""
    splits = load_splits(cfg.dataset, cfg.data_root,
                         spurious_strength=cfg.train.spurious_strength)
    model = create_backbone(cfg.backbone, splits["train"].num_classes, weights=cfg.weights,
                            data_root=cfg.data_root)
    adapted = prepare_model(model, cfg)
    model.to(device)
    dc = backbone_data_config(model)
    train_tf, eval_tf = make_transforms(dc.image_size, dc.mean, dc.std,
                                        augment=cfg.train.augment, family=cfg.dataset)
    splits["train"].transform = train_tf
    splits["val"].transform = splits["test"].transform = eval_tf
    if cfg.stem_cache == "on":
        folder = get_spec(cfg.dataset).data_dir(cfg.data_root, cfg.train.spurious_strength)
        splits = cached_splits(model, cfg.dataset, folder, splits, progress=progress, log=log)
    return model, splits, adapted


def evaluate_counterfactual(model: nn.Module, cfg: RunConfig, test: GroupSplit, weights: Path,
                            batch_size: int, workers: int, device: torch.device,
                            dist: Distributed = SINGLE_PROCESS) -> dict | None:
    """Core-only accuracy, background reliance and background-swapped accuracy
    (metrics.counterfactual_metrics) of the selected epoch's weights (``weights``) on the
    replica's counterfactual test images; None for a real dataset or a replica without them (a
    hand-made test fixture). The model keeps the selected weights afterwards."""
    if not is_replica(cfg.dataset):
        return None
    try:
        twins = counterfactual_inputs(cfg.dataset, cfg.data_root, test,
                                      cfg.train.spurious_strength)
    except FileNotFoundError:  # DatasetError: no counterfactual images in this replica
        return None
    dist.barrier()  # rank 0 wrote the selected weights
    load_trainable_state(model, load_file(str(weights)))
    probs = {kind: predict(model, twin, batch_size, workers, device, dist)[0]
             for kind, twin in twins.items()}
    return counterfactual_record(twins, probs, test.attribute_names)


def check_eval_groups(splits: dict[str, GroupSplit]) -> None:
    for name in ("val", "test"):
        counts = splits[name].group_counts()
        empty = [g.name for g in splits[name].groups if counts[g.g] == 0]
        if empty:
            raise EmptyGroupError(
                f"{splits[name].dataset_name} {name} split has no sample in group(s) {empty}: "
                "worst-group accuracy is undefined; check the data with data_prep/verify.py")


def _print(message: str) -> None:
    print(message, flush=True)  # flushed: a log file or a pipe sees each line when it happens


def run(cfg: RunConfig, *, force: bool = False, progress: bool = True,
        log: Callable[[str], None] = _print, wait: bool = False) -> RunResult:
    """Train and evaluate one run; write its record under ``cfg.out``. Idempotent: a finished
    run is not redone unless ``force``; an unfinished one resumes from its checkpoint.

    One process trains a run directory at a time: while another live process holds it, this
    raises :class:`store.RunInUseError` naming that process, or with ``wait`` waits for it to
    end (then finds the run done, or resumes it).
    """
    cfg = resolve_config(cfg)
    if cfg.threads is not None:
        if cfg.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {cfg.threads}")
        torch.set_num_threads(cfg.threads)
    dist, device_name = init_distributed(cfg.device)
    if not dist.is_main:
        progress, log = False, _silent
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
    trainer = _Trainer(cfg, model, splits, device, workers, rdir, progress, log, dist,
                       error_set=error_set)
    trainer.fit()
    return trainer.finish(params)


def jtt_stage1_config(cfg: RunConfig) -> RunConfig:
    """JTT's identification run: ERM with the same settings for ``jtt_epochs`` epochs, no early
    stopping (JTT uses the model at the end of its T epochs). An ordinary run record."""
    stage1 = RunConfig.from_dict(cfg.to_dict())
    t = stage1.train
    t.epochs, t.patience, t.algorithm = cfg.train.jtt_epochs, 0, "erm"
    t.jtt_epochs = t.jtt_upweight = None
    return stage1


def _jtt_error_set(cfg: RunConfig, rdir: Path, dist: Distributed, device: torch.device,
                   workers: int, progress: bool, log: Callable[[str], None]) -> list[int]:
    """JTT's error set: the training images that stage 1's final model misclassifies (eval
    transform). Computed once and kept in ``rdir/jtt_error_set.json``; a resumed run reads it."""
    path = rdir / JTT_ERROR_FILE
    if not path.is_file():
        stage1 = jtt_stage1_config(cfg)
        log(f"JTT stage 1: ERM for {stage1.train.epochs} epoch(s)")
        first = run(stage1, progress=progress, log=log, wait=True)
        with torch.random.fork_rng(devices=[]):
            model, splits, _ = build_model_and_data(resolve_config(stage1), device)
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


def _silent(_message: str) -> None:
    pass


class _Trainer:
    """The epoch loop of one run, with its checkpoints and records."""

    def __init__(self, cfg, model, splits, device, workers, rdir, progress, log,
                 dist: Distributed, error_set: list[int] | None = None) -> None:
        self.cfg, self.model, self.splits, self.device = cfg, model, splits, device
        self.workers, self.rdir, self.progress, self.log = workers, rdir, progress, log
        self.dist = dist
        t = cfg.train
        # DDP: gradients are averaged over ranks; evaluation uses the plain module.
        self.train_model = model if not dist.enabled else nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        self.train_set = SeededAugmentation(splits["train"], t.seed)
        train = splits["train"]
        self.algorithm = make_algorithm(t, train.g, train.train_group_counts, dist,
                                        error_set=lambda: error_set or [])
        # With K processes each epoch drops < K samples so that every rank takes as many steps.
        length = self.algorithm.epoch_length()
        self.epoch_size = length - length % dist.world_size
        self.steps_per_epoch = math.ceil(self.epoch_size / t.batch_size)
        self.optimizer = torch.optim.AdamW(parameter_groups(model, t.weight_decay), lr=t.lr,
                                           eps=1e-8)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, linear_warmup_decay(t.epochs * self.steps_per_epoch, t.warmup_frac))
        self.method = get_method(cfg.method)
        if self.method.start_training is not None:
            self.method.start_training(model, t.epochs * self.steps_per_epoch)
        self.history: list[dict] = []
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.sums: dict[str, float] = {}
        self.train_time = 0.0
        self.checkpoint = rdir / CHECKPOINT_FILE
        if self.checkpoint.is_file():
            self._resume()

    # -- checkpointing
    def _state(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step, "sums": dict(self.sums),
                "history": self.history, "train_time": self.train_time,
                "algorithm": self.algorithm.state_dict(),
                "method": self.method.state(self.model) if self.method.state else {}}

    def _save(self) -> None:
        # Every rank's RNG state (dropout differs per rank), gathered to rank 0 which writes.
        cuda = self.device.type == "cuda"
        rng = self.dist.gather_objects(
            (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if cuda else None))
        if self.dist.is_main:
            save_checkpoint(self.checkpoint, self.model, self.optimizer, self.scheduler,
                            {**self._state(), "rng_cpu_ranks": [r[0] for r in rng],
                             "rng_cuda_ranks": [r[1] for r in rng] if cuda else [],
                             "record_version": schema.RECORD_VERSION})

    def _resume(self) -> None:
        ckpt = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        load_trainable_state(self.model, ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        ranks = ckpt.get("rng_cpu_ranks") or [ckpt["rng_cpu"]]
        if len(ranks) != self.dist.world_size:
            raise TrainingError(f"the checkpoint in {self.rdir} was written by {len(ranks)} "
                                f"process(es); resume it with as many, not "
                                f"{self.dist.world_size}")
        torch.set_rng_state(ranks[self.dist.rank])
        cuda_ranks = ckpt.get("rng_cuda_ranks") or []
        if self.device.type == "cuda" and len(cuda_ranks) == self.dist.world_size:
            torch.cuda.set_rng_state(cuda_ranks[self.dist.rank], self.device)
        elif ckpt["rng_cuda"] and torch.cuda.is_available() and self.dist.world_size == 1:
            torch.cuda.set_rng_state_all(ckpt["rng_cuda"])
        self.epoch, self.step_in_epoch = ckpt["epoch"], ckpt["step_in_epoch"]
        self.global_step, self.sums = ckpt["global_step"], ckpt["sums"]
        self.history, self.train_time = ckpt["history"], ckpt["train_time"]
        self.algorithm.load_state_dict(ckpt.get("algorithm", {}))
        if self.method.load_state is not None and ckpt.get("method"):
            self.method.load_state(self.model, ckpt["method"])
        if int(ckpt.get("record_version", 1)) < 2:
            self.history, _ = schema.epochs_from_one(self.history)
        # history.jsonl may hold a line written after this checkpoint: rewrite it from the
        # checkpoint so no evaluation is listed twice.
        if self.dist.is_main:
            write_jsonl_atomic(self.rdir / schema.HISTORY_FILE, self.history)
        self.log(f"resuming from checkpoint: epoch {self.epoch + 1}, step {self.step_in_epoch} "
                 f"of {self.steps_per_epoch}")

    # -- training
    def fit(self) -> None:
        t = self.cfg.train
        with sigterm_flag() as flag:
            while self.epoch < t.epochs:
                # Stop only when every rule's patience is spent, so that no rule's selection
                # comes from a history another rule cut short.
                if self.history and should_stop_all(self.history, t.patience):
                    self.log(f"early stop: no improvement of {' or '.join(RULES)} in "
                             f"{t.patience} epochs")
                    break
                self._train_epoch(flag)
                self._end_epoch()

    def _train_epoch(self, flag: dict[str, bool]) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.train_set.epoch = self.epoch
        order = list(enumerate(self.algorithm.epoch_order(self.epoch)[:self.epoch_size]))
        # Rank r takes every K-th image of the remaining order, b/K per step: the union of the
        # ranks' step s is exactly the single-process batch s.
        shard = self.dist.shard(order[self.step_in_epoch * t.batch_size:])
        loader = make_loader(self.train_set, shard, t.batch_size // self.dist.world_size,
                             self.workers, self.device, seed=t.seed * 1_000_003 + self.epoch)
        self.model.train()
        bar = progress_bar(loader, total=self.steps_per_epoch, initial=self.step_in_epoch,
                   desc=f"epoch {self.epoch + 1}/{t.epochs}", disable=not self.progress,
                   leave=False, dynamic_ncols=True)
        start = time.perf_counter()
        for images, y, g in bar:
            images = images.to(self.device, non_blocking=True)
            y, g = y.to(self.device, non_blocking=True), g.to(self.device, non_blocking=True)
            with autocast(self.device):
                logits = self.train_model(images)
            task = self.algorithm.task_loss(logits, y, g)
            loss, parts = training_loss(self.model, logits, y, cfg, task=task)
            # One device-to-host copy for all logged values (not one sync per value).
            logged = torch.stack([v.detach().float() for v in (loss, *parts.values())]).tolist()
            values = dict(zip(("loss", *parts), logged))
            if not all(math.isfinite(v) for v in values.values()):
                raise TrainingError(self._nonfinite_message("loss", values))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad],
                t.grad_clip if t.grad_clip > 0 else float("inf"))
            if not torch.isfinite(grad_norm):
                raise TrainingError(self._nonfinite_message("gradient norm", values))
            self.optimizer.step()
            self.scheduler.step()
            self.global_step += 1
            if self.method.after_step is not None:
                self.method.after_step(self.model, self.global_step)
            self.step_in_epoch += 1
            for k, v in values.items():
                self.sums[k] = self.sums.get(k, 0.0) + v
            # refresh=False: shown at the bar's next redraw, which progress_bar throttles in logs
            bar.set_postfix({k: f"{values[k]:.3g}" for k in ("ce", "R", "K1", "K2", "G")
                             if k in values}, refresh=False)
            if self.dist.any(flag["stop"]):
                self.train_time += time.perf_counter() - start
                self._save()
                raise Preempted(f"SIGTERM: checkpoint written at epoch {self.epoch + 1}, step "
                                f"{self.step_in_epoch}; relaunch the same command to resume")
            if cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0:
                self.train_time += time.perf_counter() - start
                start = time.perf_counter()
                self._save()
            if self.global_step == _FAULT_KILL_AFTER_STEP:
                os.kill(os.getpid(), signal.SIGKILL)
        bar.close()
        self.train_time += time.perf_counter() - start

    def _nonfinite_message(self, what: str, values: dict[str, float]) -> str:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        return (f"non-finite {what} at epoch {self.epoch + 1}, step {self.step_in_epoch + 1} "
                f"({shown}); stopped, last good checkpoint kept in {self.rdir}; "
                "try a lower --lr or check the data")

    def _end_epoch(self) -> None:
        t = self.cfg.train
        n = max(1, self.step_in_epoch)
        record = {"epoch": self.epoch + 1, "step": self.global_step,
                  "lr": self.scheduler.get_last_lr()[0],
                  "train": {k: self.sums[k] / n for k in LOSS_KEYS if k in self.sums}}
        layers: dict[str, dict[str, float]] = {}
        for key, total in self.sums.items():
            if "@" in key:  # a layer's FVAE loss part, "<part>@<layer>"
                part, layer = key.split("@", 1)
                layers.setdefault(layer, {})[part] = total / n
        if layers:
            record["train_layers"] = layers
        outputs = {}
        for split in ("val", "test"):
            metrics, prob, pred = evaluate(self.model, self.splits[split], t.eval_batch_size,
                                           self.workers, self.device, self.dist)
            record[split] = metrics
            outputs[split] = (prob, pred)
        record["alarms"] = [f"constant predictor on {s}" for s, (_, pred) in outputs.items()
                            if constant_predictor(pred)]
        summary = self.algorithm.summary()
        if summary:
            record["algorithm"] = summary
        self.history.append(record)
        if self.dist.is_main:
            append_jsonl(self.rdir / schema.HISTORY_FILE, record)
        val, test = record["val"], record["test"]
        self.log(f"epoch {self.epoch + 1}/{t.epochs}: train CE {record['train'].get('ce', 0):.4f}"
                 f" | val WG {val['worst_group_acc']:.3f} avg {val['avg_acc']:.3f}"
                 f" | test WG {test['worst_group_acc']:.3f} avg {test['avg_acc']:.3f}"
                 + (f" | ALARM: {'; '.join(record['alarms'])}" if record["alarms"] else ""))
        if select_epoch(self.history, t.select, t.patience)["epoch"] == self.epoch + 1 and \
                self.dist.is_main:
            self._write_selected(outputs)
        self.epoch += 1
        self.step_in_epoch, self.sums = 0, {}
        self._save()

    def _write_selected(self, outputs) -> None:
        for split, (prob, pred) in outputs.items():
            s = self.splits[split]
            schema.write_predictions_csv(schema.predictions_path(self.rdir, split),
                                         np.arange(len(s)), s.y, s.a, s.g, pred, prob)
        # Bytes written atomically by record.io (fsync, rename, the umask's permissions), not
        # save_file, which creates the file readable by its owner only.
        write_bytes_atomic(self.rdir / WEIGHTS_FILE, save_safetensors(
            trainable_state(self.model),
            metadata={"epoch": str(self.epoch + 1), "method": self.cfg.method}))
        if self.method.save_pretrained is not None:
            write_folder_atomic(self.rdir / PRETRAINED_DIR,
                                lambda folder: self.method.save_pretrained(self.model, folder))

    def finish(self, params: dict[str, int]) -> dict:
        t = self.cfg.train
        rule = t.select
        # Each rule selects within the history early stopping on it alone would have made.
        chosen = select_epoch(self.history, rule, t.patience)
        others = {}
        for other in SELECTION_RULES:
            if other != rule:
                rec = select_epoch(self.history, other, t.patience)
                others[other] = {"selected_epoch": rec["epoch"], "val": rec["val"],
                                 "test": rec["test"]}
        metrics = {
            "selection": rule,
            "selection_description": RULES[rule].description,
            "selected_epoch": chosen["epoch"],
            "val": chosen["val"],
            "test": chosen["test"],
            "params": params,
            "other_selections": others,
            "alarms": chosen.get("alarms", []),
            "epochs_run": len(self.history),
            "early_stopping": {"patience": t.patience, "stopped_after_epoch": {
                r: stopping_epoch(self.history, r, t.patience) for r in SELECTION_RULES}},
            "algorithm": {"name": t.algorithm, **self.algorithm.summary(),
                          "group_labels_in_training": GROUP_LABELS_IN_TRAINING[t.algorithm]},
            "train_time_s": round(self.train_time, 2),
        }
        counterfactual = evaluate_counterfactual(
            self.model, self.cfg, self.splits["test"], self.rdir / WEIGHTS_FILE,
            self.cfg.train.eval_batch_size, self.workers, self.device, self.dist)
        if counterfactual is not None:
            metrics["counterfactual"] = counterfactual
        return metrics  # written to metrics.json by store.run_job


def built_versions(cfg: RunConfig) -> dict[str, str | int | None]:
    """What this checkout builds for ``cfg``: ``backbone_digest`` (backbones.backbone_digest) and
    ``replica_version`` (the replica builder's version for ``synth-*``, else None); both are run
    hash inputs."""
    from .data.synthetic import BUILDER_VERSION

    return {"backbone_digest": backbone_digest(cfg.backbone, cfg.weights),
            "replica_version": BUILDER_VERSION if is_replica(cfg.dataset) else None}


def check_rebuildable(cfg: RunConfig, git_commit: str | None = None) -> None:
    """Raise :class:`RecordError` when this checkout would rebuild a different backbone or
    replica than the one a finished run trained on: its adapter weights would then load into the
    wrong model and every number derived from them (probes, DFR) would be silently wrong.

    Compares the run's recorded ``backbone_digest`` and ``replica_version`` with
    :func:`built_versions`; a record without them (older than both) is refused too, since it
    cannot be checked.
    """
    where = f"commit {git_commit[:12]}" if git_commit else "the code it was trained with"
    for key, current in built_versions(cfg).items():
        recorded = getattr(cfg, key)
        if recorded is None and current is not None:
            raise RecordError(
                f"this run's record has no {key} (it predates it), so its model cannot be "
                f"rebuilt safely with this checkout; rerun it, or check out {where}")
        if recorded != current:
            raise RecordError(
                f"this run trained on {key} {recorded!r}, but this checkout builds {current!r}; "
                f"its weights would load into a different model: rerun it, or check out {where}")


def load_trained_model(run_dir: str | Path, device: str = "cpu"):
    """The trained model of a finished run (selected epoch's weights), its config and splits.

    Refuses (:func:`check_rebuildable`) when this checkout would rebuild another backbone or
    replica than the run trained on.

    Returns ``(model, cfg, splits)`` with eval-mode model and transforms set on the splits.
    """
    record = view.load_run(run_dir)
    weights = Path(run_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise RecordNotFoundError(f"{weights} not found: the run has not selected an "
                                  "epoch yet (run it to completion first)")
    cfg = record.run_config
    check_rebuildable(cfg, record.config.get("environment", {}).get("git_commit"))
    model, splits, _ = build_model_and_data(cfg, torch.device(device))
    load_trainable_state(model, load_file(str(weights)))
    model.eval()
    return model, cfg, splits


def load_initial_model(run_dir: str | Path, device: str = "cpu") -> nn.Module:
    """The model of a run as it was before its first step: rebuilt from the run's config with
    its seed, exactly as the run built it (``torch.manual_seed(seed)`` then
    :func:`build_model_and_data`), in eval mode. For the parameters' displacement and the
    probes' initialisation control."""
    record = view.load_run(run_dir)
    cfg = record.run_config
    check_rebuildable(cfg, record.config.get("environment", {}).get("git_commit"))
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(cfg.train.seed)
        model, _, _ = build_model_and_data(cfg, torch.device(device))
    finally:
        torch.random.set_rng_state(state)
    model.eval()
    return model
