"""Shipped image material for the offline replicas and the offline backbone, and scene rendering.

Two sources, both installed with ordinary packages and readable without a network:

* **animal-mnist 0.4** silhouettes: 10,000 white-on-black 28×28 uint8 images, 1,000 per class
  (:data:`SILHOUETTE_CLASSES`). The package's own loader imports tensorflow, so the two gzip
  pickles are read directly from its folder; the package is never imported.
* **scikit-image** textures and photos (``skimage.data``): the ones bundled in the wheel
  (:data:`TEXTURE_SOURCES`); the others need pooch and a network, and are never touched.

A scene is a 64×64 (any ``size``) RGB float image in [0, 1]: a background of a named
*family* (:data:`FAMILIES`) with one silhouette pasted on it. Every random choice is drawn from the
``numpy.random.Generator`` passed in, so a scene is a pure function of its generator's seed.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from .base import DatasetError

SILHOUETTE_CLASSES = (
    "Bear", "Bird", "Cat", "Cow", "Dog", "Elephant", "Giraffe", "Horse", "Sheep", "Zebra",
)
# The replicas draw foregrounds only from these classes; the offline backbone pretrains on the
# other six, so the replicas' classes are new to it, as the real classes are new to ImageNet-21k
# features in the sense that matters here (no label overlap with the source task).
REPLICA_CLASSES = ("Bird", "Cat", "Dog", "Horse")
PRETRAIN_CLASSES = tuple(c for c in SILHOUETTE_CLASSES if c not in REPLICA_CLASSES)

_DATA_FILE = "animal_data_version_3.gz"
_LABEL_FILE = "animal_label_version_3.gz"
_INSTALL_HINT = "pip install --no-deps animal-mnist==0.4"


class SilhouetteDataError(DatasetError):
    """The animal-mnist data files are missing or malformed (one-line message with the fix)."""


def animal_mnist_dir() -> Path:
    """Folder holding the two animal-mnist gzip pickles, found without importing the package."""
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise SilhouetteDataError(
            f"the animal-mnist silhouettes are not installed; run `{_INSTALL_HINT}`"
        )
    for location in spec.submodule_search_locations:
        folder = Path(location) / "data" / "Animal_MNIST"
        if (folder / _DATA_FILE).is_file() and (folder / _LABEL_FILE).is_file():
            return folder
    raise SilhouetteDataError(
        f"animal-mnist is installed at {list(spec.submodule_search_locations)} but "
        f"data/Animal_MNIST/{_DATA_FILE} or {_LABEL_FILE} is missing; "
        f"reinstall with `{_INSTALL_HINT} --force-reinstall`"
    )


@lru_cache(maxsize=1)
def load_silhouettes() -> tuple[np.ndarray, np.ndarray]:
    """All silhouettes: ``images`` uint8 (10000, 28, 28), white object on black; ``labels`` int64
    (10000,) indexing :data:`SILHOUETTE_CLASSES`. Read-only arrays (cached)."""
    folder = animal_mnist_dir()
    try:
        # These are the package's own data files (MIT-licensed), read as plain numpy pickles.
        with gzip.open(folder / _DATA_FILE, "rb") as f:
            images = np.asarray(pickle.load(f), dtype=np.uint8)
        with gzip.open(folder / _LABEL_FILE, "rb") as f:
            labels = np.asarray(pickle.load(f)).astype(np.int64).ravel()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as err:
        raise SilhouetteDataError(
            f"cannot read the animal-mnist files in {folder}: {err}; "
            f"reinstall with `{_INSTALL_HINT} --force-reinstall`"
        ) from err
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise SilhouetteDataError(
            f"unexpected animal-mnist arrays in {folder}: images {images.shape}, labels "
            f"{labels.shape} (expected (N, 28, 28) and (N,)); reinstall with `{_INSTALL_HINT}`"
        )
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def class_index(name: str) -> int:
    """Index of a silhouette class name in :data:`SILHOUETTE_CLASSES`."""
    try:
        return SILHOUETTE_CLASSES.index(name)
    except ValueError:
        raise ValueError(
            f"unknown silhouette class {name!r}; expected one of {', '.join(SILHOUETTE_CLASSES)}"
        ) from None


# Silhouettes of each replica class kept for the offline backbone's source task (pretrain.py)
# and never used by a replica split: the backbone must have seen the concepts, not the test
# instances (as ImageNet-21k holds birds but not Waterbirds' test images).
RESERVED_PER_CLASS = 150
_RESERVE_SEED = 271828  # fixed: the reserved set must not depend on any run or replica seed


def reserved_source_instances(class_name: str) -> np.ndarray:
    """The animal-mnist indices of one *replica* class kept for the source task: int64
    (:data:`RESERVED_PER_CLASS`,), a fixed seeded choice independent of every other seed.
    The replica builder must exclude exactly these from its train/val/test pools."""
    if class_name not in REPLICA_CLASSES:
        raise ValueError(f"{class_name!r} is not a replica class ({', '.join(REPLICA_CLASSES)}); "
                         "the other classes are all source-only")
    _, labels = load_silhouettes()
    idx = np.flatnonzero(labels == class_index(class_name))
    rng = np.random.default_rng([_RESERVE_SEED, class_index(class_name)])
    return np.sort(idx[rng.permutation(len(idx))[:RESERVED_PER_CLASS]])


def instance_pools(
    class_name: str, seed: int, fractions: tuple[float, ...] = (0.6, 0.15, 0.25)
) -> list[np.ndarray]:
    """Split one class's silhouette indices into disjoint pools (e.g. train/val/test).

    Returns one int64 index array per fraction, into the arrays of :func:`load_silhouettes`.
    The split is a seeded permutation, so the same ``seed`` gives the same pools. For a replica
    class the silhouettes reserved for the backbone's source task are left out of every pool.
    """
    _, labels = load_silhouettes()
    idx = np.flatnonzero(labels == class_index(class_name))
    if class_name in REPLICA_CLASSES:
        idx = np.setdiff1d(idx, reserved_source_instances(class_name))
    rng = np.random.default_rng([seed, 7919, class_index(class_name)])
    idx = idx[rng.permutation(len(idx))]
    bounds = np.round(np.cumsum((0.0,) + tuple(fractions)) / sum(fractions) * len(idx)).astype(int)
    return [idx[bounds[i]: bounds[i + 1]] for i in range(len(fractions))]


# --------------------------------------------------------------------------- textures and photos

# skimage.data images that ship inside the wheel (checked offline). Grayscale ones are tinted.
TEXTURE_SOURCES = (
    "grass", "gravel", "brick", "moon", "camera", "coins", "clock", "page", "text", "cell",
    "coffee", "rocket", "astronaut", "hubble_deep_field", "immunohistochemistry", "retina",
)
# Photos that contain an animal of a replica class (chelsea/cat are cats; horse is a horse
# silhouette) are left out on purpose: a background must never show the core cue.


@cache
def load_texture(name: str) -> np.ndarray:
    """One skimage image as float32 in [0, 1]: (H, W) for grayscale, (H, W, 3) for colour."""
    if name not in TEXTURE_SOURCES:
        raise ValueError(f"unknown texture {name!r}; expected one of {', '.join(TEXTURE_SOURCES)}")
    import skimage.data  # imported lazily: only the builders need it

    try:
        img = np.asarray(getattr(skimage.data, name)())
    except Exception as err:  # pooch/network errors differ between skimage versions
        raise DatasetError(
            f"skimage.data.{name}() failed ({type(err).__name__}: {err}); it should ship inside "
            "the scikit-image wheel: reinstall with `pip install --force-reinstall scikit-image`"
        ) from err
    if img.ndim == 3:
        img = img[..., :3]
    out = img.astype(np.float32) / (255.0 if img.dtype == np.uint8 else max(float(img.max()), 1.0))
    out.setflags(write=False)
    return out


def _gray(name: str) -> np.ndarray:
    img = load_texture(name)
    return img if img.ndim == 2 else img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def random_crop(
    rng: np.random.Generator, img: np.ndarray, out_hw: tuple[int, int], crop_h: int, aspect: float
) -> np.ndarray:
    """A random ``crop_h × (crop_h·aspect)`` window of ``img`` resized to ``out_hw`` (float32)."""
    h, w = img.shape[:2]
    ch = int(min(crop_h, h))
    cw = int(min(round(crop_h * aspect), w))
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    patch = img[top: top + ch, left: left + cw]
    # PIL float mode 'F' resizes single channels without quantising to 8 bits.
    if patch.ndim == 2:
        return np.asarray(
            Image.fromarray(patch).resize(out_hw[::-1], Image.BILINEAR, reducing_gap=2.0)
        )
    return np.stack([random_crop_channel(patch[..., c], out_hw) for c in range(3)], axis=-1)


def random_crop_channel(channel: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    return np.asarray(
        Image.fromarray(np.ascontiguousarray(channel)).resize(
            out_hw[::-1], Image.BILINEAR, reducing_gap=2.0
        )
    )


def _contrast(rng: np.random.Generator, t: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Normalise a grayscale patch to zero mean / unit spread, then give it a random contrast."""
    t = t - t.mean()
    t = t / (t.std() + 1e-3)
    return t * float(rng.uniform(lo, hi))


def _jitter_colour(rng: np.random.Generator, rgb: tuple[float, float, float], amount: float):
    return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3), 0.0, 1.0)


# Background families. Each is deliberately recognisable "at a glance" (a global colour/texture
# statistic), while the foreground class needs shape: that is what makes the family a spurious
# cue that ERM prefers. Colours are RGB in [0, 1].
_LAND_TINTS = ((0.42, 0.52, 0.24), (0.55, 0.45, 0.28), (0.50, 0.52, 0.30), (0.60, 0.50, 0.35))
_WATER_TINTS = ((0.20, 0.42, 0.72), (0.18, 0.52, 0.66), (0.28, 0.45, 0.80), (0.15, 0.35, 0.60))
_INDOOR_TINTS = ((0.72, 0.38, 0.28), (0.80, 0.55, 0.35), (0.75, 0.66, 0.50), (0.62, 0.30, 0.25))
_GRASS_TINTS = ((0.30, 0.60, 0.22), (0.38, 0.66, 0.28), (0.25, 0.52, 0.20))
_LIGHT_TINTS = ((0.93, 0.84, 0.74), (0.95, 0.80, 0.78), (0.90, 0.88, 0.70), (0.96, 0.90, 0.82))
_DARK_TINTS = ((0.22, 0.26, 0.33), (0.18, 0.22, 0.26), (0.26, 0.28, 0.30), (0.20, 0.24, 0.36))

FAMILIES = ("land", "water", "indoor", "outdoor", "light", "dark", "random")


def render_background(rng: np.random.Generator, family: str, size: int = 64) -> np.ndarray:
    """A background of one family, float32 (size, size, 3) in [0, 1].

    land: grass/gravel/moon crops in earthy green-brown tints; water: horizontally stretched
    crops (ripples) in blue tints; indoor: brick or the coffee photo in warm tints; outdoor: a sky
    gradient above a green grass horizon; light / dark: bright warm vs dark cool studio backdrops
    (the CelebA stand-in for the spurious attribute); random: any shipped texture or photo with a
    random tint (the offline backbone's uninformative backgrounds).
    """
    hw = (size, size)
    crop = int(rng.integers(128, 384))
    if family == "land":
        t = _contrast(rng, random_crop(rng, _gray(str(rng.choice(["grass", "gravel", "moon"]))),
                                       hw, crop, 1.0), 0.10, 0.18)
        tint = _jitter_colour(rng, _LAND_TINTS[int(rng.integers(len(_LAND_TINTS)))], 0.06)
        img = tint * (1.0 + t[..., None])
    elif family == "water":
        # A wide crop squeezed into a square reads as horizontal ripples.
        src = _gray(str(rng.choice(["grass", "gravel", "moon"])))
        t = _contrast(rng, random_crop(rng, src, hw, crop // 3, 3.0), 0.08, 0.16)
        tint = _jitter_colour(rng, _WATER_TINTS[int(rng.integers(len(_WATER_TINTS)))], 0.06)
        img = tint * (1.0 + t[..., None])
    elif family == "indoor":
        if rng.random() < 0.7:
            t = _contrast(rng, random_crop(rng, _gray("brick"), hw, crop, 1.0), 0.10, 0.18)
            tint = _jitter_colour(rng, _INDOOR_TINTS[int(rng.integers(len(_INDOOR_TINTS)))], 0.06)
            img = tint * (1.0 + t[..., None])
        else:
            img = random_crop(rng, load_texture("coffee"), hw, min(crop, 300), 1.0)
            img = img * _jitter_colour(rng, (1.0, 0.85, 0.7), 0.08)
    elif family == "outdoor":
        horizon = int(rng.integers(size * 5 // 16, size * 9 // 16))
        rows = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
        sky_top = _jitter_colour(rng, (0.45, 0.65, 0.92), 0.06)
        sky_low = _jitter_colour(rng, (0.78, 0.88, 0.98), 0.05)
        sky = np.broadcast_to(sky_top * (1 - rows) + sky_low * rows, (size, size, 3))
        t = _contrast(rng, random_crop(rng, _gray("grass"), hw, crop, 1.0), 0.10, 0.20)
        tint = _jitter_colour(rng, _GRASS_TINTS[int(rng.integers(len(_GRASS_TINTS)))], 0.06)
        ground = tint * (1.0 + t[..., None])
        img = np.where(np.arange(size)[:, None, None] < horizon, sky, ground)
    elif family in ("light", "dark"):
        tints = _LIGHT_TINTS if family == "light" else _DARK_TINTS
        src = _gray(str(rng.choice(["gravel", "brick", "moon", "grass"])))
        t = _contrast(rng, random_crop(rng, src, hw, crop, 1.0), 0.03, 0.08)
        tint = _jitter_colour(rng, tints[int(rng.integers(len(tints)))], 0.05)
        # A soft vignette, as in a portrait backdrop.
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) - 0.5
        vignette = 1.0 - float(rng.uniform(0.1, 0.3)) * (xx**2 + yy**2)
        img = tint * (1.0 + t[..., None]) * vignette[..., None]
    elif family == "random":
        return random_background(rng, size)[0]
    else:
        raise ValueError(f"unknown background family {family!r}; expected one of {FAMILIES}")
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def random_background(
    rng: np.random.Generator, size: int = 64, contrast: tuple[float, float] = (0.05, 0.35)
) -> tuple[np.ndarray, int]:
    """Any shipped texture or photo, randomly cropped (square or stretched) and randomly tinted:
    float32 (size, size, 3) in [0, 1], and the index of its source in :data:`TEXTURE_SOURCES`
    (the offline backbone's auxiliary texture label). ``contrast``: range of the texture's
    relative contrast when tinted."""
    source = int(rng.integers(len(TEXTURE_SOURCES)))
    src = load_texture(TEXTURE_SOURCES[source])
    crop = int(rng.integers(128, 384))
    aspect = float(rng.choice([1.0, 1.0, 0.5, 2.0, 3.0]))
    patch = random_crop(rng, src, (size, size), max(8, int(crop / np.sqrt(aspect))), aspect)
    if patch.ndim == 2 or rng.random() < 0.5:
        gray = patch if patch.ndim == 2 else patch.mean(-1)
        t = _contrast(rng, gray, *contrast)
        img = rng.uniform(0.1, 0.95, 3).astype(np.float32) * (1.0 + t[..., None])
    else:
        # A colour photo, toned down towards its mean by the same contrast factor.
        keep = float(rng.uniform(*contrast)) / 0.35
        img = patch.mean((0, 1)) + keep * (patch - patch.mean((0, 1)))
        img = img * rng.uniform(0.6, 1.2, 3).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32), source


def silhouette_alpha(
    rng: np.random.Generator,
    silhouette: np.ndarray,
    size: int = 64,
    scale: tuple[float, float] = (0.42, 0.70),
    max_rotation: float = 20.0,
) -> np.ndarray:
    """Place one 28×28 silhouette on a ``size``×``size`` canvas: float32 alpha (size, size) in
    [0, 1]. Nuisances: horizontal flip, scale (box side as a fraction of ``size``), rotation in
    ±``max_rotation`` degrees, and position (the object stays fully inside the canvas)."""
    sil = Image.fromarray(np.ascontiguousarray(silhouette))
    if rng.random() < 0.5:
        sil = sil.transpose(Image.FLIP_LEFT_RIGHT)
    side = max(8, int(round(size * rng.uniform(*scale))))
    sil = sil.resize((side, side), Image.BILINEAR)
    sil = sil.rotate(float(rng.uniform(-max_rotation, max_rotation)), Image.BILINEAR, expand=True)
    arr = np.asarray(sil, dtype=np.float32) / 255.0
    # Trim the empty border so the object (not its square box) is what stays inside the canvas.
    rows, cols = np.flatnonzero(arr.max(1) > 0.1), np.flatnonzero(arr.max(0) > 0.1)
    if len(rows) and len(cols):
        arr = arr[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
    arr = arr[:size, :size]
    h, w = arr.shape
    top = int(rng.integers(0, size - h + 1))
    left = int(rng.integers(0, size - w + 1))
    alpha = np.zeros((size, size), np.float32)
    alpha[top: top + h, left: left + w] = arr
    return alpha


def foreground_fill(rng: np.random.Generator, size: int, tone: str) -> np.ndarray:
    """The object's colour field, float32 (size, size, 3): a random colour of the given tone
    (``dark``, ``mid``, ``light`` or ``any``) with a mild texture. Never depends on a label."""
    if tone == "dark":
        value, sat = rng.uniform(0.08, 0.32), rng.uniform(0.0, 0.6)
    elif tone == "mid":
        value, sat = rng.uniform(0.40, 0.62), rng.uniform(0.0, 0.6)
    elif tone == "light":
        value, sat = rng.uniform(0.70, 0.98), rng.uniform(0.0, 0.8)
    elif tone == "any":
        value, sat = rng.uniform(0.05, 0.95), rng.uniform(0.0, 1.0)
    else:
        raise ValueError(f"unknown foreground tone {tone!r}; expected dark, mid, light or any")
    hue = rng.uniform(0.0, 1.0)
    # HSV → RGB for one colour (cheap closed form, avoids importing colorsys per pixel).
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6.0) % 6.0
    rgb = value - value * sat * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    texture = _contrast(rng, random_crop(rng, _gray("gravel"), (size, size), 160, 1.0), 0.03, 0.08)
    return (rgb.astype(np.float32) * (1.0 + texture[..., None])).astype(np.float32)


def compose(
    rng: np.random.Generator,
    background: np.ndarray,
    alpha: np.ndarray,
    fill: np.ndarray,
    noise: tuple[float, float] = (0.01, 0.03),
) -> np.ndarray:
    """Alpha-blend the object onto the background, add mild Gaussian pixel noise, and quantise:
    uint8 (size, size, 3)."""
    a = alpha[..., None]
    img = background * (1.0 - a) + fill * a
    img = img + np.float32(rng.uniform(*noise)) * rng.standard_normal(img.shape, dtype=np.float32)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def scene_parts(
    rng: np.random.Generator,
    silhouette: np.ndarray,
    family: str,
    *,
    size: int = 64,
    tone: str = "dark",
    scale: tuple[float, float] = (0.42, 0.70),
    max_rotation: float = 20.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three layers of a scene, drawn from ``rng`` in the order :func:`render_scene` uses:
    ``(background (size, size, 3), alpha (size, size), fill (size, size, 3))``, float32 in [0, 1].
    ``compose(rng, *parts)`` with the same generator then gives exactly :func:`render_scene`."""
    background = render_background(rng, family, size)
    alpha = silhouette_alpha(rng, silhouette, size, scale, max_rotation)
    return background, alpha, foreground_fill(rng, size, tone)


def render_scene(
    rng: np.random.Generator,
    silhouette: np.ndarray,
    family: str,
    *,
    size: int = 64,
    tone: str = "dark",
    scale: tuple[float, float] = (0.42, 0.70),
    max_rotation: float = 20.0,
) -> np.ndarray:
    """A ``family`` background with ``silhouette`` pasted on it: uint8 (size, size, 3)."""
    parts = scene_parts(rng, silhouette, family, size=size, tone=tone, scale=scale,
                        max_rotation=max_rotation)
    return compose(rng, *parts)


# Grey levels of the core-only images' neutral backdrop (see neutral_background).
NEUTRAL_LIGHT, NEUTRAL_DARK = 0.8, 0.2


def neutral_background(fill: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The backdrop of a *core-only* image: flat, untinted, untextured grey, float32
    (size, size, 3). Light grey (0.8) behind objects darker than mid-grey, dark grey (0.2)
    otherwise, so the silhouette always shows. The object's fill never depends on a label, so
    neither does this backdrop: it carries no information about ``y`` or ``a``."""
    weight = alpha.sum()
    luminance = float(
        (fill @ np.array([0.299, 0.587, 0.114], np.float32) * alpha).sum() / max(weight, 1e-6)
    )
    level = NEUTRAL_LIGHT if luminance < 0.5 else NEUTRAL_DARK
    return np.full(fill.shape, level, np.float32)


def counterfactual_scenes(
    rng: np.random.Generator, parts: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """The paper's ``x_core`` and ``x_spurious`` of one scene, uint8 (size, size, 3) each:
    *core-only* = the same silhouette, placement and fill on :func:`neutral_background`;
    *background-only* = the same background with no silhouette. Both get fresh pixel noise from
    ``rng`` (pass a generator independent of the scene's, so the scene itself is unchanged)."""
    background, alpha, fill = parts
    core = compose(rng, neutral_background(fill, alpha), alpha, fill)
    empty = np.zeros_like(alpha)
    return core, compose(rng, background, empty, fill)


def background_swapped_scene(
    rng: np.random.Generator, parts: tuple[np.ndarray, np.ndarray, np.ndarray], family: str
) -> np.ndarray:
    """The *background-swapped* twin of one scene, uint8 (size, size, 3): the same silhouette,
    placement and fill on a fresh background of ``family`` (the other background of the
    object's class), drawn from ``rng`` as any background of that family is, with fresh pixel
    noise. An in-distribution counterfactual, unlike the flat grey of the core-only twin."""
    _, alpha, fill = parts
    return compose(rng, render_background(rng, family, alpha.shape[0]), alpha, fill)
