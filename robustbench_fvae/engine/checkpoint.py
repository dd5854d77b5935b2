"""Checkpoints of a run in training: the trainable state, the optimiser and schedule, every
rank's RNG, and the SIGTERM flag that turns preemption into a checkpoint (docs/design.md)."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

CHECKPOINT_FILE = "checkpoint.pt"


WEIGHTS_FILE = "adapter.safetensors"


# A method's adapters in another library's own format (peft's save_pretrained), beside WEIGHTS_FILE.
PRETRAINED_DIR = "peft"


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss); the last good checkpoint is kept."""


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was written and the run can be relaunched to resume."""


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
