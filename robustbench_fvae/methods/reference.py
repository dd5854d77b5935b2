"""The two reference points between which the adapters sit: ``full`` fine-tuning (every
parameter trains) and ``linear`` (only the new head trains)."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from .registry import Method, register_method

if TYPE_CHECKING:
    from torch import nn

    from robustbench_fvae.config import RunConfig


def _prepare(train_all: bool, model: nn.Module, cfg: RunConfig) -> list[str]:
    model.requires_grad_(train_all)
    model.get_classifier().requires_grad_(True)
    return []


register_method(Method(
    name="full", label="Full fine-tuning", summary="every parameter trains (lr default 1e-4)",
    trains="all", default_lr=1e-4, prepare=partial(_prepare, True),
    # Full fine-tuning moves every weight: a range two decades below the adapters'.
    search_space={"lr": {"log_uniform": [3.0e-5, 3.0e-4]}},
))
register_method(Method(
    name="linear", label="Linear probe", summary="only the new classifier head trains",
    trains="head", default_lr=5e-3, prepare=partial(_prepare, False),
    # A linear head on frozen features tolerates larger steps.
    search_space={"lr": {"log_uniform": [1.0e-3, 3.0e-2]}},
))
