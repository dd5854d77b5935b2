"""Augmentation recipes (paper / standard / flip / none) and their evaluation transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from robustbench_fvae.data.transforms import (
    AUGMENT_RECIPES,
    CenterCropShortSide,
    make_transforms,
)

MEAN = STD = (0.5, 0.5, 0.5)


def _image(w: int = 64, h: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _crop(transform) -> T.RandomResizedCrop | None:
    found = [t for t in transform.transforms if isinstance(t, T.RandomResizedCrop)]
    return found[0] if found else None


@pytest.mark.parametrize("family", [None, "waterbirds", "synth-celeba", "animals"])
def test_none_is_deterministic_and_equals_the_eval_transform(family):
    train, eval_ = make_transforms(32, MEAN, STD, augment="none", family=family)
    img = _image(48, 60)
    torch.manual_seed(0)
    first = train(img)
    torch.manual_seed(123)
    assert torch.equal(first, train(img)) and torch.equal(first, eval_(img))
    assert first.shape == (3, 32, 32)


def test_flip_only_mirrors_the_eval_image():
    train, eval_ = make_transforms(32, MEAN, STD, augment="flip", family="waterbirds")
    img = _image()
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        out = train(img)
        if torch.equal(out, eval_(img)):
            seen.add("same")
        else:
            assert torch.equal(out, eval_(img).flip(-1))
            seen.add("flipped")
    assert seen == {"same", "flipped"}


@pytest.mark.parametrize("family", ["waterbirds", "synth-waterbirds", "animals"])
def test_standard_crops_keep_at_least_70_percent_of_the_area(family):
    train, _ = make_transforms(32, MEAN, STD, augment="standard", family=family)
    crop = _crop(train)
    assert crop is not None and crop.scale == (0.7, 1.0)
    assert crop.ratio == pytest.approx((3 / 4, 4 / 3))
    img = _image(64, 64)
    torch.manual_seed(0)
    areas = []
    for _ in range(500):
        _, _, h, w = T.RandomResizedCrop.get_params(img, crop.scale, crop.ratio)
        areas.append(h * w / 64**2)
    # Integer rounding of the box side can lose a little under 0.7.
    assert min(areas) >= 0.7 - 2 * 64 / 64**2 and max(areas) <= 1.0
    # The paper's recipe crops down to 8 % of the area.
    paper = _crop(make_transforms(32, MEAN, STD, augment="paper", family=family)[0])
    assert paper.scale == (0.08, 1.0)


def test_standard_celeba_centre_crops_the_face_square_then_resizes():
    """CelebA (178x218): the centre 178x178 square is kept, top and bottom 20 rows go."""
    pixels = np.full((218, 178, 3), 128, np.uint8)
    pixels[:20] = (255, 0, 0)  # a red band that the centre crop removes
    pixels[-20:] = (255, 0, 0)
    img = Image.fromarray(pixels)
    train, eval_ = make_transforms(32, (0, 0, 0), (1, 1, 1), augment="standard",
                                   family="celeba")
    assert _crop(train) is None  # no random crop for CelebA
    for out in (eval_(img), train(img)):
        assert out.shape == (3, 32, 32)
        assert float(out[0].max() - out[1].max()) < 0.05  # no red left anywhere
    assert CenterCropShortSide()(img).size == (178, 178)


def test_eval_conventions_per_recipe():
    img = _image(80, 40)  # a wide image tells square resizing from short-side resizing
    _, paper = make_transforms(32, MEAN, STD, augment="paper", family="waterbirds")
    _, water = make_transforms(32, MEAN, STD, augment="standard", family="waterbirds")
    _, animals = make_transforms(32, MEAN, STD, augment="standard", family="animals")
    assert torch.equal(paper(img), animals(img))  # short side to 36, centre crop 32
    assert not torch.equal(paper(img), water(img))  # GroupDRO: squash to 36x36, centre crop
    assert isinstance(water.transforms[0], T.Resize) and water.transforms[0].size == (36, 36)


def test_unknown_recipe_or_family_is_one_line():
    with pytest.raises(ValueError, match="unknown augmentation recipe 'crop'; expected one of "
                       + ", ".join(AUGMENT_RECIPES)):
        make_transforms(32, MEAN, STD, augment="crop")
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        make_transforms(32, MEAN, STD, augment="standard", family="mnist")
