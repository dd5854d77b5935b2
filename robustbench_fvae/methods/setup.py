"""A registered method applied to a model: set-up, optimiser groups, and the training loss.

Imports torch; the registry (robustbench_fvae/methods/registry.py) does not.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from robustbench_fvae.adapters import inject_adapters
from robustbench_fvae.config import AdapterConfig, ConfigError, RunConfig

from .registry import get_method, validate_method


def inject_slices(model: nn.Module,
                  make_adapter: Callable[[AdapterConfig, int, int], nn.Module],
                  cfg: AdapterConfig, num_classes: int | None = None) -> list[str]:
    """Inject one ``make_adapter(cfg, in_features, out_features)`` per target slice of
    ``cfg.targets`` (robustbench_fvae/adapters/inject.py); returns the adapted layer names."""
    return inject_adapters(model, partial(make_adapter, cfg), cfg.targets,
                           num_classes=num_classes)


def inject_method(model: nn.Module, method: str, cfg: AdapterConfig,
                  num_classes: int | None = None) -> list[str]:
    """Freeze ``model`` and give it ``method``'s adapters with settings ``cfg`` (and, with
    ``num_classes``, a new head): the set-up of :func:`prepare_model` without a run config."""
    spec = validate_method(method, cfg)
    if not spec.has_adapters:
        raise ConfigError(f"method {method!r} has no adapters")
    if num_classes is not None:
        model.reset_classifier(num_classes)
    return spec.prepare(model, RunConfig(method=method, adapter=cfg))


def prepare_model(model: nn.Module, cfg: RunConfig) -> list[str]:
    """Set up ``model`` (a timm ViT whose head already has the right number of classes) for
    ``cfg.method``: inject adapters and/or (un)freeze parameters. Returns adapted layer names."""
    return validate_method(cfg.method, cfg.adapter).prepare(model, cfg)


def classifier_head(model: nn.Module) -> nn.Module:
    """The layer that is the model's trained classifier head: timm's ``get_classifier()``, or,
    where peft wrapped it as a ``modules_to_save`` copy, that active copy."""
    head = model.get_classifier()
    copies = getattr(head, "modules_to_save", None)
    if isinstance(copies, nn.ModuleDict) and copies:
        active = getattr(head, "active_adapters", None) or list(copies)
        return copies[active[0]]
    return head


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices; none on biases, norms and 1-D scales (released)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def training_loss(model: nn.Module, logits: torch.Tensor, y: torch.Tensor, cfg: RunConfig,
                  task: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The method's loss for one batch and its logged parts (CE, and R, K1, K2, G when present:
    their means over layers, and each layer's as ``"<part>@<layer>"``).

    ``task``: the training algorithm's task loss (robustbench_fvae/algorithms.py; None: the mean
    cross-entropy of ERM), logged as ``task`` when given; ``ce`` is always the plain mean CE.
    The method's ``loss`` hook, if any, forms the loss from the task loss (the FVAE family:
    robustbench_fvae/methods/fvae.py); otherwise the loss is the task loss.
    """
    ce = nn.functional.cross_entropy(logits.float(), y)
    parts = {"ce": ce}
    if task is None:
        task = ce
    else:
        parts["task"] = task
    method = get_method(cfg.method)
    if method.loss is None:
        return task, parts
    loss, extra = method.loss(model, task, cfg)
    parts.update(extra)
    return loss, parts
