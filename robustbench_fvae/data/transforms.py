"""Image transforms: named augmentation recipes and the evaluation transform that goes with each.

Every transform maps a PIL RGB image to a float tensor of shape (3, image_size, image_size),
ending in ToTensor + Normalize with the backbone's pretraining ``mean``/``std`` (timm's
``pretrained_cfg['mean'/'std']``). A *recipe* (``--augment``) names the training transform:

=========  ============================================================================
paper      the released FVAE-LoRA code's (ImageNet-style): RandomResizedCrop(scale (0.08, 1),
           ratio (3/4, 4/3)) + horizontal flip. At 8 % of the area a crop often holds
           background only, labelled with the animal's class.
standard   the spurious-correlation literature's (GroupDRO's ``--augment_data`` code):
           Waterbirds / Animals RandomResizedCrop(scale (0.7, 1), ratio (3/4, 4/3)) + flip;
           CelebA centre crop to the short side, resize, flip (the preprocessing GroupDRO
           and SubpopBench evaluate CelebA with, plus a flip).
flip       the evaluation transform + horizontal flip: never removes any pixel of the object.
none       the evaluation transform itself: deterministic.
=========  ============================================================================

The evaluation transform follows the recipe's convention (:func:`eval_transform`): ``paper``
uses the ImageNet protocol of the released code and timm (resize the short side to
``size·256/224``, centre-crop ``size``); the others use the dataset's own convention in that
literature — Waterbirds: resize to a ``size·256/224`` square, centre-crop ``size`` (GroupDRO,
SubpopBench); CelebA: centre-crop the short side (178 px of 178×218), resize to ``size``
(GroupDRO, SubpopBench); Animals: resize the short side to ``size·256/224``, centre-crop (SpuCo).

Defaults (``config.resolve.dataset_defaults``): real datasets ``paper`` (Table 5 of the paper is
reproduced with its released recipe); replicas ``flip`` — a replica's nuisances (object position,
scale, rotation, flip; background crop and tint) are already rendered into every image, and on
a 64 px replica a crop can cut off most of the silhouette while the background, the spurious
cue, survives any crop (see docs/datasets.md for the measurement).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from PIL import Image

AUGMENT_RECIPES = ("paper", "standard", "flip", "none")
FAMILIES = ("waterbirds", "celeba", "animals")
# RandomResizedCrop area ranges of the recipes that crop.
PAPER_SCALE = (0.08, 1.0)
STANDARD_SCALE = (0.7, 1.0)
STANDARD_RATIO = (3 / 4, 4 / 3)


class CenterCropShortSide:
    """Centre-crop the largest square (side = the image's short side); a picklable class so that
    loader workers can use it."""

    def __call__(self, image: Image.Image) -> Image.Image:
        from torchvision.transforms import functional

        return functional.center_crop(image, [min(image.size)] * 2)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def family_of(dataset: str) -> str:
    """The layout family of a dataset name: ``synth-celeba`` → ``celeba``."""
    family = dataset.removeprefix("synth-")
    if family not in FAMILIES:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(FAMILIES)} "
                         "or their synth-* replicas")
    return family


def check_recipe(augment: str) -> str:
    """``augment`` if it names a recipe, else a one-line ValueError listing them."""
    if augment not in AUGMENT_RECIPES:
        raise ValueError(f"unknown augmentation recipe {augment!r}; expected one of "
                         f"{', '.join(AUGMENT_RECIPES)}")
    return augment


def _geometry_eval(size: int, augment: str, family: str | None) -> list[Callable]:
    """The resize/crop steps of the evaluation transform (see the module docstring)."""
    from torchvision import transforms as T  # here: the package imports without torch
    resized = int(size * 256 / 224)  # the classic ImageNet ratio between resize and crop
    if augment == "paper" or family is None or family == "animals":
        return [T.Resize(resized), T.CenterCrop(size)]
    if family == "waterbirds":
        return [T.Resize((resized, resized)), T.CenterCrop(size)]
    return [CenterCropShortSide(), T.Resize((size, size))]


def make_transforms(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: str | None = "paper",
    family: str | None = None,
) -> tuple[Callable, Callable]:
    """Return ``(train_transform, eval_transform)`` mapping a PIL RGB image to a (3, S, S) tensor.

    ``augment`` is a recipe of :data:`AUGMENT_RECIPES` (None means ``paper``: run records written
    before recipes existed were trained with it); ``family`` (waterbirds, celeba, animals, or a
    dataset name such as ``synth-celeba``) picks the dataset's convention for the recipes other
    than ``paper`` (None: the ImageNet one).
    """
    augment = "paper" if augment is None else augment
    if int(image_size) < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {list(mean)} and {list(std)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std values must be positive, got {list(std)}")
    check_recipe(augment)
    family = None if family is None else family_of(family)
    from torchvision import transforms as T  # here: the package imports without torch
    size = int(image_size)
    tail = [T.ToTensor(), T.Normalize(mean=[float(m) for m in mean], std=[float(s) for s in std])]
    geometry = _geometry_eval(size, augment, family)
    if augment == "paper":
        train = [T.RandomResizedCrop(size, scale=PAPER_SCALE), T.RandomHorizontalFlip()]
    elif augment == "standard" and family != "celeba":
        train = [T.RandomResizedCrop(size, scale=STANDARD_SCALE, ratio=STANDARD_RATIO),
                 T.RandomHorizontalFlip()]
    elif augment in ("standard", "flip"):
        train = [*geometry, T.RandomHorizontalFlip()]
    else:  # none
        train = list(geometry)
    return T.Compose(train + tail), T.Compose(geometry + tail)


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float],
                   augment: str | None = "paper", family: str | None = None) -> Callable:
    """The evaluation transform of a recipe (the second item of :func:`make_transforms`).

    Conventions: ``paper`` (or no ``family``) — the ImageNet protocol of the released code and
    timm: resize the short side to ``size·256/224``, centre-crop ``size``. Otherwise the
    dataset's own in the spurious-correlation literature: Waterbirds — resize to a
    ``size·256/224`` square, centre-crop ``size`` (GroupDRO ``get_transform_cub``,
    SubpopBench); CelebA — centre-crop the short side (178 px of 178×218), resize to ``size``
    (GroupDRO ``get_transform_celebA``, SubpopBench); Animals — short side to ``size·256/224``,
    centre-crop (SpuCo's Resize(256) + CenterCrop(224)). Deterministic; (3, size, size) output.
    """
    return make_transforms(image_size, mean, std, augment, family)[1]
