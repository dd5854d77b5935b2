"""The update of a layer adapted by another library, as an adapter module of ours."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class LayerUpdate(nn.Module):
    """``layer(x) − base(x)``: what an adapted ``layer`` adds to its frozen ``base``, for a
    method whose update has no low-rank code of its own (``latents`` is empty).

    ``layer`` is held outside the module tree, so that the base layer it contains is not owned
    twice; ``parameters`` (the method's own, not the base's) are registered here by reference,
    so a displacement over this module's parameters is the method's. ``rank``: the width of the
    random control that probes set beside the module input.
    """

    kind = "update"

    def __init__(self, layer: Callable[[torch.Tensor], torch.Tensor], base: nn.Module,
                 parameters: dict[str, nn.Parameter], rank: int = 16) -> None:
        super().__init__()
        object.__setattr__(self, "layer", layer)
        object.__setattr__(self, "base", base)
        for name, parameter in parameters.items():
            self.register_parameter(name.replace(".", "__"), parameter)
        self.rank = rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x) - self.base(x)

    def latents(self, x: torch.Tensor, sigma: bool = False) -> dict[str, torch.Tensor]:
        return {}
