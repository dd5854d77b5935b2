"""Image transforms: the ViT fine-tuning recipe used by the paper (ImageNet-style).

Train: RandomResizedCrop + horizontal flip; eval: resize the short side to ``size·256/224`` then
centre-crop ``size``. Both end in ToTensor + Normalize, giving float tensors of shape
(3, image_size, image_size). ``mean``/``std`` must match the backbone's pretraining statistics
(timm's ``pretrained_cfg['mean'/'std']``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torchvision import transforms as T


def make_transforms(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_scale: tuple[float, float] = (0.08, 1.0),
) -> tuple[Callable, Callable]:
    """Return ``(train_transform, eval_transform)`` mapping a PIL RGB image to a (3, S, S) tensor.

    ``crop_scale`` is RandomResizedCrop's area range (torchvision's default, the ImageNet recipe).
    """
    if int(image_size) < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {list(mean)} and {list(std)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std values must be positive, got {list(std)}")
    size = int(image_size)
    normalize = T.Normalize(mean=[float(m) for m in mean], std=[float(s) for s in std])
    train = T.Compose(
        [
            T.RandomResizedCrop(size, scale=tuple(crop_scale)),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            normalize,
        ]
    )
    # 256/224: the classic ratio between resize and crop of the ImageNet evaluation protocol.
    eval_ = T.Compose(
        [
            T.Resize(int(size * 256 / 224)),
            T.CenterCrop(size),
            T.ToTensor(),
            normalize,
        ]
    )
    return train, eval_
