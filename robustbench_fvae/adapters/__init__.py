"""Adapter layers (nn.Module level only): LoRA, FVAE-LoRA and its ablations, and their injection
into timm Vision Transformers. Knows nothing of data or training."""

from .fvae import LOSS_PARTS, FVAEAdapter, FVAEObjective, GaussianDecoder, GaussianEncoder
from .inject import (
    AdaptedLinear,
    AdapterError,
    adapted_layers,
    collect_aux_loss,
    count_parameters,
    inject_adapters,
    merge_adapters,
    record_latents,
    set_eval_fusion,
    unmerge_adapters,
)
from .lora import LoRAAdapter
from .update import LayerUpdate

__all__ = [
    "LOSS_PARTS", "AdaptedLinear", "AdapterError", "FVAEAdapter", "FVAEObjective",
    "GaussianDecoder", "GaussianEncoder", "LayerUpdate", "LoRAAdapter", "adapted_layers",
    "collect_aux_loss",
    "count_parameters", "inject_adapters", "merge_adapters", "record_latents", "set_eval_fusion",
    "unmerge_adapters",
]
