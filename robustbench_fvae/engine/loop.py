"""The epoch loop of one run: optimise, evaluate every epoch, stop early, checkpoint and resume
exactly, handle preemption (docs/design.md).

Reproducibility: the data order of epoch ``e`` is a permutation seeded by ``(seed, e)`` and every
training image's augmentation by ``(seed, e, index)``, independent of loader workers; the model's
own randomness (dropout, FVAE samples) comes from the global torch RNG, whose state (every rank's,
under data parallelism) is saved in every checkpoint, and which nothing else draws from: the data
loaders have generators of their own. A run resumed from any checkpoint, at an epoch end or in the
middle of an epoch, therefore continues exactly where it stopped, and on CPU ends with the same
numbers as an uninterrupted run.

Epochs are counted from 1 in the records and on the console (epoch 1 = the evaluation after the
first pass over the training data); ``Trainer.epoch`` counts the epochs already completed.

Fault injection for tests: with ``RBF_FAULT_KILL_AFTER_STEP=N`` in the environment the run sends
itself SIGKILL right after optimisation step N (after that step's checkpoint, if one is due), a
kill at an exactly known point; never set it otherwise.
"""

from __future__ import annotations

import math
import os
import signal
import time

import numpy as np
import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from ..algorithms import (
    GROUP_LABELS_IN_TRAINING,
    make_algorithm,
)
from ..config import (
    SELECTION_RULES,
)
from ..distributed import Distributed
from ..methods import get_method
from ..methods.setup import parameter_groups, training_loss
from ..metrics import (
    constant_predictor,
)
from ..progress import progress_bar
from ..record import schema
from ..record.io import (
    append_jsonl,
    write_bytes_atomic,
    write_folder_atomic,
    write_jsonl_atomic,
)
from ..selection import RULES, select_epoch, should_stop_all, stopping_epoch
from .checkpoint import (
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
from .evaluate import SeededAugmentation, autocast, evaluate, evaluate_counterfactual, make_loader

# Fault injection for the resume tests (see the module docstring); -1: off.
_FAULT_KILL_AFTER_STEP = int(os.environ.get("RBF_FAULT_KILL_AFTER_STEP", "-1"))


LOSS_KEYS = ("loss", "ce", "task", "aux", "R", "K1", "K2", "G", "orth")


def silent(_message: str) -> None:
    pass


class Trainer:
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
