"""LoRA: a low-rank additive update of a frozen linear map (Hu et al., 2022)."""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRAAdapter(nn.Module):
    """The low-rank delta ``(α/r)·B A drop(x)`` of one adapted output slice.

    Shapes: ``x`` is (..., in_features); the delta is (..., out_features). ``A`` is (r, in),
    Kaiming-uniform as in PEFT; ``B`` is (out, r), zero, so the adapted layer equals its base at
    init.
    """

    kind = "lora"

    def __init__(
        self, in_features: int, out_features: int, rank: int = 16, alpha: float = 16.0,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``(α/r)·B A``, shape (out, in), that merging adds to the base."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def eval_factors(self) -> tuple[torch.Tensor, None, bool, torch.Tensor, None]:
        """The eval delta as ``W_out · act(W_in x + b_in) + b_out``: here ``W_in = A`` (r, in),
        no biases, no activation, ``W_out = (α/r)·B`` (out, r). Built from the live parameters
        (autograd-tracked); :class:`~.inject.AdaptedLinear` batches the slices of one layer."""
        return self.lora_A, None, False, self.lora_B * self.scaling, None

    def latents(self, x: torch.Tensor, sigma: bool = False) -> dict[str, torch.Tensor]:
        """The low-rank code ``A x`` (no dropout), shape (..., r), for latent analysis (``sigma``
        is accepted for symmetry with FVAE: a deterministic code has no posterior σ)."""
        return {"lora": x @ self.lora_A.t()}

    def inference_parameters(self) -> int:
        return self.lora_A.numel() + self.lora_B.numel()
