"""``lora``: LoRA (Hu et al., 2022) on slices of the fused qkv or whole Linear layers, ``ΔW x =
(α/r)·B A x``; the code ``probe`` reads is ``A x``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .registry import Method, register_method
from .search import ADAPTER_LR_SPACE

if TYPE_CHECKING:
    from torch import nn

    from robustbench_fvae.config import AdapterConfig, RunConfig


def make_lora(cfg: AdapterConfig, in_features: int, out_features: int) -> nn.Module:
    from robustbench_fvae.adapters import LoRAAdapter

    return LoRAAdapter(in_features, out_features, cfg.rank, cfg.lora_alpha, cfg.lora_dropout)


def _prepare(model: nn.Module, cfg: RunConfig) -> list[str]:
    from .setup import inject_slices

    return inject_slices(model, make_lora, cfg.adapter)


register_method(Method(
    name="lora", label="LoRA", summary="LoRA on the targets (ours: per-slice on the fused qkv)",
    trains="adapters", default_lr=5e-3, prepare=_prepare, search_space=ADAPTER_LR_SPACE,
    codes=("lora",), accepts=("rank", "targets", "lora_alpha", "lora_dropout"),
))
