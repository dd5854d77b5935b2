"""``lora``: LoRA (Hu et al., 2022) on slices of the fused qkv or whole Linear layers, ``ΔW x =
(α/r)·B A x``; the code ``probe`` reads is ``A x``.

Ours and peft's LoRA differ in what they target: ours adapts the q, k and v *slices* of timm's
fused ``qkv`` Linear separately (a rank-r update per slice, as the released FVAE-LoRA code does),
peft adapts the whole ``qkv`` output with one rank-r update. Slices map exactly onto peft's form:
the slices S of one layer are one peft LoRA of rank ``r·|S|`` whose A stacks the slices' A and
whose B is block-diagonal (each slice's B in its rows and columns), with ``lora_alpha`` scaled by
``|S|`` so that the scaling ``α/r`` is unchanged. :func:`lora_as_peft` writes a run in that form,
so every LoRA run also reloads in plain ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

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


def lora_as_peft(model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Our trained LoRA in peft's LoRA form: the ``LoraConfig`` fields (target modules, a rank and
    alpha per module) and the ``adapter_model.safetensors`` tensors (the classifier head as
    ``modules_to_save``). Dropout is a training-time setting and kept as is."""
    import torch

    from robustbench_fvae.adapters.inject import AdaptedLinear

    prefix = "base_model.model."
    tensors, ranks, alphas, dropout = {}, {}, {}, 0.0
    for name, layer in model.named_modules():
        if not isinstance(layer, AdaptedLinear) or not layer.adapters:
            continue
        keys = list(layer.adapters)
        first = layer.adapters[keys[0]]
        if any(layer.adapters[k].scaling != first.scaling for k in keys):
            raise ValueError(f"{name}: slices with different scalings do not map onto one "
                             "peft LoRA")
        a = torch.cat([layer.adapters[k].lora_A.detach() for k in keys])
        b = torch.zeros(layer.base.out_features, a.shape[0], dtype=a.dtype)
        col = 0
        for k in keys:  # each slice's B in its own rows (output slice) and columns (its rank)
            adapter, (start, stop) = layer.adapters[k], layer.slices[k]
            b[start:stop, col:col + adapter.rank] = adapter.lora_B.detach()
            col += adapter.rank
        ranks[name], alphas[name] = a.shape[0], first.scaling * a.shape[0]
        if isinstance(first.dropout, torch.nn.Dropout):
            dropout = first.dropout.p
        tensors[f"{prefix}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{prefix}{name}.lora_B.weight"] = b.contiguous()
    head_name = next(n for n, m in model.named_modules() if m is model.get_classifier())
    for pname, p in model.get_classifier().named_parameters():
        tensors[f"{prefix}{head_name}.{pname}"] = p.detach().contiguous()
    rank = min(ranks.values())
    config = {"r": rank, "lora_alpha": alphas[min(ranks, key=ranks.get)],
              "lora_dropout": dropout, "target_modules": sorted(ranks),
              "rank_pattern": {n: r for n, r in ranks.items() if r != rank},
              "alpha_pattern": {n: a for n, a in alphas.items()},
              "modules_to_save": [head_name]}
    return config, {k: v.cpu() for k, v in tensors.items()}


def save_lora_as_peft(model: nn.Module, folder: str) -> None:
    """``adapter_config.json`` and ``adapter_model.safetensors`` of :func:`lora_as_peft`, as
    peft's ``save_pretrained`` writes them (the config through peft's own ``LoraConfig``)."""
    import peft
    from safetensors.torch import save_file

    fields, tensors = lora_as_peft(model)
    config = peft.LoraConfig(**fields)
    config.save_pretrained(folder)
    save_file(tensors, str(Path(folder) / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    # Say where the tensors came from, beside what peft reads (it ignores unknown files).
    (Path(folder) / "README.md").write_text(
        "Our LoRA (robustbench_fvae/methods/lora.py) in peft's LoRA form: load it with "
        "peft.PeftModel.from_pretrained on the run's backbone with a head of the run's size.\n")


register_method(Method(
    name="lora", label="LoRA", summary="LoRA on the targets (ours: per-slice on the fused qkv)",
    trains="adapters", default_lr=5e-3, prepare=_prepare, search_space=ADAPTER_LR_SPACE,
    codes=("lora",), accepts=("rank", "targets", "lora_alpha", "lora_dropout"),
    save_pretrained=save_lora_as_peft,
))
