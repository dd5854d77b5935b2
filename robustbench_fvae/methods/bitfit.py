"""``bitfit``: BitFit (Ben Zaken, Ravfogel & Goldberg, ACL 2022) — only the bias terms of the
backbone train, with the new classifier head; every weight matrix stays frozen.

On a timm ViT these are the biases of the attention's ``qkv`` and ``proj``, of the MLP's ``fc1``
and ``fc2``, and of the LayerNorms (the patch embedding's too, where it has one). The whole
method is this file: it registers itself, and nothing else in the package names it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .registry import Method, register_method

if TYPE_CHECKING:
    from torch import nn

    from robustbench_fvae.config import RunConfig


def _prepare(model: nn.Module, cfg: RunConfig) -> list[str]:
    """Freeze every parameter but the biases (and the head); returns no adapted layers."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.rsplit(".", 1)[-1] == "bias")
    model.get_classifier().requires_grad_(True)
    return []


register_method(Method(
    name="bitfit", label="BitFit", summary="only the backbone's bias terms (and the head) train",
    trains="biases", default_lr=5e-3, prepare=_prepare,
    # Biases alone move the features little per step: the linear probe's range, which
    # tolerates larger steps than the adapters'.
    search_space={"lr": {"log_uniform": [1.0e-3, 3.0e-2]}},
))
