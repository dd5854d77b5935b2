"""The six methods as model set-ups: which parameters train, how the loss is formed.

``lora``, ``fvae``, ``vae2lat``, ``bvae2lat`` inject adapters into a frozen backbone; ``full``
trains every parameter and ``linear`` only the new head — the two reference points between which
the adapters sit. Every method trains a new classifier head.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import collect_aux_loss, inject_adapters
from .config import ADAPTER_METHODS, FVAE_FAMILY, METHODS, ConfigError, RunConfig

# Default learning rates of the released code (AdamW): adapters and head-only 5e-3, full 1e-4.
DEFAULT_LR = {"full": 1e-4}
DEFAULT_ADAPTER_LR = 5e-3


def default_lr(method: str) -> float:
    return DEFAULT_LR.get(method, DEFAULT_ADAPTER_LR)


def prepare_model(model: nn.Module, cfg: RunConfig) -> list[str]:
    """Set up ``model`` (a timm ViT whose head already has the right number of classes) for
    ``cfg.method``: inject adapters and/or (un)freeze parameters. Returns adapted layer names."""
    method = cfg.method
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if method in ADAPTER_METHODS:
        return inject_adapters(model, method, cfg.adapter)
    model.requires_grad_(method == "full")
    model.get_classifier().requires_grad_(True)
    return []


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
    FVAE family: ``λ_task·task + λ_fvae·mean_over_adapted_layers(ℓ)`` (paper Eq. 6 as released);
    other methods: the task loss.
    """
    ce = nn.functional.cross_entropy(logits.float(), y)
    parts = {"ce": ce}
    if task is None:
        task = ce
    else:
        parts["task"] = task
    if cfg.method not in FVAE_FAMILY:
        return task, parts
    aux, aux_parts = collect_aux_loss(model, per_layer=True)
    if aux is None:
        raise RuntimeError("FVAE method ran no adapter in training mode; call model.train()")
    parts.update(aux_parts)
    parts["aux"] = aux
    return cfg.adapter.lambda_task * task + cfg.adapter.lambda_fvae * aux.float(), parts
