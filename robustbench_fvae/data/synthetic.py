"""Offline replicas of Waterbirds, CelebA and SpuCoAnimals, written in the *real* on-disk layouts.

``build_replica(name, root)`` writes under ``<root>/synth/`` exactly what the real-data adapters
(and the ``wilds`` package itself) read:

==================  =====================================================================
synth-waterbirds    ``synth/waterbirds_v1.0/`` (RELEASE_v1.0.txt, metadata.csv, class folders)
synth-celeba        ``synth/celebA_v1.0/`` (RELEASE_v1.0.txt, list_attr_celeba.csv with the 40
                    CelebA attribute columns, list_eval_partition.csv, img_align_celeba/)
synth-animals       ``synth/spuco_birds/<split>/{landbirds,waterbirds}/{land,water}/`` and
                    ``synth/spuco_dogs/<split>/{small_dogs,big_dogs}/{indoor,outdoor}/``
==================  =====================================================================

Each replica folder (for synth-animals: both ``spuco_birds`` and ``spuco_dogs``, with the same
content) holds ``SYNTHETIC.json``: name, seed, image size, scale, spurious strength, per-split
group counts (WILDS numbering: Waterbirds/CelebA ``g = 2y + a``, Animals ``g = 4y + a``), the
counterfactual test images and the builder version.

**Spurious strength** ρ (:func:`resolve_strength`): the fraction of each class's *training* images
on its majority background; val and test keep their fixed, less correlated design at every ρ. The
default is the real dataset's own (Waterbirds 0.95, CelebA 0.943 = the share of blond training
faces that are female, SpuCoAnimals 0.952 = 10000/10500) and gives exactly :data:`COUNTS`. The
default replica lives directly under ``<root>/synth/``; another ρ under
``<root>/synth/rho-<ρ>/`` (:func:`replica_dir`), in the same layouts. CelebA's not-blond class,
which the real data keeps almost balanced (51.7 % female), keeps that lean in proportion to
``ρ − ½`` (:data:`SPECS` ``lean``), so ρ = ½ means no correlation at all for the two binary
replicas. In synth-animals at ρ = ½ each class is split evenly between its two backgrounds;
birds still never appear indoors/outdoors nor dogs on land/water (8 of 16 groups, as SpuCo).

**Counterfactual test images** (the paper's ``x_core`` / ``x_spurious``): every test image
``<folder>/<path>`` also exists as ``<folder>/counterfactual/core_only/<path>`` (the same
silhouette, placement and fill on a flat neutral grey, see
:func:`~robustbench_fvae.data.silhouettes.neutral_background`) and
``<folder>/counterfactual/background_only/<path>`` (the same background, no silhouette) and
``<folder>/counterfactual/background_swapped/<path>`` (the same silhouette, placement and fill
on a fresh background of the class's other background family: an in-distribution
counterfactual), with the labels ``(y, a)`` of the original. The real-data readers never look
into ``counterfactual/``.

What an image shows (64×64 RGB PNG): an animal-mnist silhouette (the **core** cue ``y``: needs
shape) on a background family (the **spurious** cue ``a``: a global colour/texture statistic that
is learnable at a glance), with nuisance variation (silhouette flip/scale/rotation/position,
background crop/tint/contrast, foreground colour, pixel noise). Stand-ins:

* synth-waterbirds: landbird = Bird silhouettes, waterbird = Horse silhouettes; land = earthy
  green/brown grass-gravel crops, water = blue horizontally-stretched crops (ripples).
* synth-celeba: not blond = Dog, blond = Cat (the hardest silhouette pair for a linear model on
  pixels, as hair colour is the subtle cue next to the global "Male" look); female = light warm
  studio backdrop, male = dark cool backdrop; foreground in mid tones so it shows on both.
* synth-animals: landbird = Bird, waterbird = Horse, small dog = Cat, big dog = Dog; land/water as
  above, indoor = warm brick or the coffee photo, outdoor = sky above a grass horizon.

Group sizes mirror the real datasets, scaled down so a CPU epoch takes seconds (see
:data:`COUNTS`); silhouette instances are disjoint between train, val and test. Every image is a
pure function of ``(seed, replica, split, group, index)``: building twice with the same seed
gives byte-identical files. Builds go to a temporary folder under ``<root>/synth/`` and are
renamed into place at the end, so a killed build never leaves a half-written replica.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..record.io import exclusive_lock
from ..replica_defaults import REPLICA_DEFAULT_STRENGTH
from .base import SPLITS, DatasetError
from .silhouettes import (
    background_swapped_scene,
    compose,
    counterfactual_scenes,
    instance_pools,
    load_silhouettes,
    scene_parts,
)

# Bumped whenever the pictures or tables change; a replica of an older version is rebuilt.
# 3: spurious strength in the manifest, counterfactual test images.
# 4: silhouettes reserved for the offline backbone's source task left out of every split.
# 5: validation and test splits at the real datasets' group sizes or larger (every group >= 130
#    validation and >= 600 test images), background-swapped test twins. Training images and the
#    first val/test images of each group are byte-identical to version 4's.
BUILDER_VERSION = 5
IMAGE_SIZE = 64
SYNTH_DIR = "synth"
MARKER = "SYNTHETIC.json"
# Counterfactual test images: <folder>/counterfactual/<kind>/<the test image's path in folder>.
COUNTERFACTUAL_DIR = "counterfactual"
COUNTERFACTUAL_KINDS = ("core_only", "background_only", "background_swapped")
STRENGTH_RANGE = (0.5, 1.0)
REPLICAS = ("synth-waterbirds", "synth-celeba", "synth-animals")
# Nuisance ranges of the foreground: object box side as a fraction of the image, and rotation.
SILHOUETTE_SCALE = (0.5, 0.85)
MAX_ROTATION = 15.0

# The 40 CelebA attribute columns, in the order of the released list_attr_celeba.csv.
CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
)

# Group sizes at scale 1, by split and group index g. Training mirrors the real training split at
# CPU size; validation and test are large enough to resolve worst-group accuracy (every group has
# at least 130 validation and 600 test images: the real Waterbirds minority groups' sizes, whose
# binomial 95 % half-width at WG 0.8 is about ±3 points), so they cost evaluation time, not
# training time.
# Waterbirds (g = 2y + place): the real train split (3498/184/56/1057) scaled to 2,000 images;
# val and test are the real splits' own group sizes (467/466/133/133 and 2255/2255/642/642:
# the real class ratio with backgrounds balanced within each class).
# CelebA (g = 2·blond + male): the real train proportions (71629/66874/22880/1387) at 2,500
# images. Real val/test (8535/8276/2874/182 and 9767/7535/2480/180) are too large to evaluate
# every CPU epoch at their proportions with a 600-image rare group, so the blond groups are
# floored at 130 (val) and 600 (test) images and the not-blond groups keep the real ratios to
# blond-female (val 8535:8276:2874, test 9767:7535:2480).
# Animals (g = 4y + a): SpuCo's train ratio (10000/500 per folder) at 400/20; validation at
# SpuCo's majority size (500) with minorities floored at 130 (SpuCo has 25); test balanced like
# SpuCo's (500/500), at 600 per group.
COUNTS: dict[str, dict[str, dict[int, int]]] = {
    "synth-waterbirds": {
        "train": {0: 1459, 1: 77, 2: 23, 3: 441},
        "val": {0: 467, 1: 466, 2: 133, 3: 133},
        "test": {0: 2255, 1: 2255, 2: 642, 3: 642},
    },
    "synth-celeba": {
        "train": {0: 1100, 1: 1027, 2: 351, 3: 21},
        "val": {0: 386, 1: 374, 2: 130, 3: 130},
        "test": {0: 2363, 1: 1823, 2: 600, 3: 600},
    },
    "synth-animals": {
        "train": {0: 400, 1: 20, 4: 20, 5: 400, 10: 400, 11: 20, 14: 20, 15: 400},
        "val": {0: 500, 1: 130, 4: 130, 5: 500, 10: 500, 11: 130, 14: 130, 15: 500},
        "test": {0: 600, 1: 600, 4: 600, 5: 600, 10: 600, 11: 600, 14: 600, 15: 600},
    },
}


class ReplicaError(DatasetError):
    """A replica cannot be built or an existing folder is in the way (one-line message)."""


@dataclass(frozen=True)
class ReplicaSpec:
    """How one replica maps labels to pictures and where it lives under ``<root>/synth/``."""

    name: str
    folders: tuple[str, ...]  # top-level folders under synth/ written by this replica
    class_names: tuple[str, ...]  # y
    attribute_names: tuple[str, ...]  # a
    foreground: tuple[str, ...]  # silhouette class per y
    background: tuple[str, ...]  # background family per a
    tone: str  # foreground tone (see silhouettes.foreground_fill)
    group_stride: int  # g = stride·y + a
    default_strength: float  # the real dataset's spurious strength (ρ of COUNTS["train"])
    majority: tuple[int, ...]  # majority background a of each class y in training
    # Per class: majority share = ½ + lean·(ρ − ½); 1 for a class the real data correlates.
    lean: tuple[float, ...]

    def group(self, y: int, a: int) -> int:
        return self.group_stride * y + a

    def ya(self, g: int) -> tuple[int, int]:
        return divmod(g, self.group_stride)

    def swapped_attribute(self, y: int, a: int) -> int:
        """The other background of class ``y`` (every replica class has exactly two): what a
        background-swapped twin of a ``(y, a)`` image shows."""
        pair = sorted({self.ya(g)[1] for g in COUNTS[self.name]["train"]
                       if self.ya(g)[0] == y})
        assert len(pair) == 2 and a in pair, (self.name, y, a, pair)
        return pair[1] if a == pair[0] else pair[0]


SPECS: dict[str, ReplicaSpec] = {
    "synth-waterbirds": ReplicaSpec(
        name="synth-waterbirds",
        folders=("waterbirds_v1.0",),
        class_names=("landbird", "waterbird"),
        attribute_names=("land", "water"),
        foreground=("Bird", "Horse"),
        background=("land", "water"),
        tone="dark",
        group_stride=2,
        default_strength=REPLICA_DEFAULT_STRENGTH["synth-waterbirds"],
        majority=(0, 1),
        lean=(1.0, 1.0),
    ),
    "synth-celeba": ReplicaSpec(
        name="synth-celeba",
        folders=("celebA_v1.0",),
        class_names=("not_blond", "blond"),
        attribute_names=("female", "male"),
        foreground=("Dog", "Cat"),
        background=("light", "dark"),
        tone="mid",
        group_stride=2,
        default_strength=REPLICA_DEFAULT_STRENGTH["synth-celeba"],
        # Real CelebA train: not-blond faces are 71629 of 138503 female (0.517), a lean of
        # (0.517 − ½)/(0.943 − ½) of blond's (0.943: 22880 of 24267 blond faces are female).
        majority=(0, 0),
        lean=((71629 / 138503 - 0.5) / (0.943 - 0.5), 1.0),
    ),
    "synth-animals": ReplicaSpec(
        name="synth-animals",
        folders=("spuco_birds", "spuco_dogs"),
        class_names=("landbird", "waterbird", "small_dog", "big_dog"),
        attribute_names=("land", "water", "indoor", "outdoor"),
        foreground=("Bird", "Horse", "Cat", "Dog"),
        background=("land", "water", "indoor", "outdoor"),
        tone="dark",
        group_stride=4,
        default_strength=REPLICA_DEFAULT_STRENGTH["synth-animals"],
        majority=(0, 1, 2, 3),
        lean=(1.0, 1.0, 1.0, 1.0),
    ),
}


def _spec(name: str) -> ReplicaSpec:
    if name not in SPECS:
        raise ReplicaError(f"unknown replica {name!r}; expected one of {', '.join(REPLICAS)}")
    return SPECS[name]


def default_strength(name: str) -> float:
    """The replica's default spurious strength ρ: the real dataset's own."""
    return _spec(name).default_strength


def resolve_strength(name: str, strength: float | None) -> float:
    """ρ as a float: ``None`` → :func:`default_strength`; outside [0.5, 1] is a ReplicaError."""
    if strength is None:
        return default_strength(name)
    try:
        rho = float(strength)
    except (TypeError, ValueError):
        raise ReplicaError(
            f"spurious strength must be a number in [0.5, 1], got {strength!r}") from None
    lo, hi = STRENGTH_RANGE
    if not lo <= rho <= hi:  # also refuses NaN
        raise ReplicaError(
            f"spurious strength must be in [{lo}, {hi}] (the fraction of each class's training "
            f"images on its majority background), got {strength}")
    return rho


def train_counts(name: str, strength: float | None = None) -> dict[int, int]:
    """Training images per group index at scale 1 and spurious strength ρ.

    Each class keeps its size in :data:`COUNTS`; ``round(share·n_y)`` of its images go to its
    majority background, the rest to its one minority background, with
    ``share = ½ + lean_y·(ρ − ½)``. At the default ρ this is exactly ``COUNTS[name]["train"]``.
    """
    spec = _spec(name)
    rho = resolve_strength(name, strength)
    base = COUNTS[name]["train"]
    out: dict[int, int] = {}
    for y in range(len(spec.class_names)):
        groups = sorted(g for g in base if spec.ya(g)[0] == y)
        major = spec.group(y, spec.majority[y])
        minor = [g for g in groups if g != major]
        assert len(minor) == 1, (name, y, groups)  # every replica class has two backgrounds
        n = sum(base[g] for g in groups)
        share = 0.5 + spec.lean[y] * (rho - 0.5)
        # Round half up (not Python's half-to-even) so counts are easy to reproduce by hand.
        out[major] = int(np.floor(share * n + 0.5))
        out[minor[0]] = n - out[major]
    return dict(sorted(out.items()))


def replica_counts(
    name: str, scale: float = 1.0, strength: float | None = None
) -> dict[str, dict[int, int]]:
    """Images per split and group index at ``scale`` and spurious strength ``strength`` (each
    group keeps ≥ 1 image, except a training group that ρ = 1 empties)."""
    _spec(name)
    if not scale > 0:
        raise ReplicaError(f"scale must be a positive number, got {scale}")
    full = {split: dict(groups) for split, groups in COUNTS[name].items()}
    full["train"] = train_counts(name, strength)
    return {
        split: {g: max(1, int(round(n * scale))) if n else 0 for g, n in groups.items()}
        for split, groups in full.items()
    }


def synth_root(root: str | Path) -> Path:
    """The folder that holds all replicas: ``<root>/synth`` (pass it to the real-data readers)."""
    return Path(root) / SYNTH_DIR


def strength_folder(name: str, strength: float | None) -> str | None:
    """Subfolder of ``<root>/synth`` for a non-default ρ (``rho-0.75``); None for the default."""
    rho = resolve_strength(name, strength)
    return None if rho == default_strength(name) else f"rho-{rho!r}"


def replica_dir(name: str, root: str | Path, strength: float | None = None) -> Path:
    """The folder holding the replica's layout folders: ``<root>/synth`` for the default ρ,
    ``<root>/synth/rho-<ρ>`` otherwise (pass it to the real-data readers)."""
    sub = strength_folder(name, strength)
    return synth_root(root) if sub is None else synth_root(root) / sub


def replica_folders(name: str, root: str | Path, strength: float | None = None) -> list[Path]:
    """The top-level folder(s) a replica occupies (e.g. ``<root>/synth/waterbirds_v1.0``)."""
    return [replica_dir(name, root, strength) / f for f in _spec(name).folders]


def counterfactual_path(folder: str | Path, image: str | Path, kind: str) -> Path:
    """Where the ``kind`` twin of test image ``image`` (a path inside replica folder ``folder``)
    lives: ``<folder>/counterfactual/<kind>/<image relative to folder>``."""
    if kind not in COUNTERFACTUAL_KINDS:
        raise ValueError(f"unknown counterfactual kind {kind!r}; expected one of "
                         f"{', '.join(COUNTERFACTUAL_KINDS)}")
    folder = Path(os.path.abspath(folder))
    rel = Path(os.path.abspath(image)).relative_to(folder)
    return folder / COUNTERFACTUAL_DIR / kind / rel


def read_manifest(folder: str | Path) -> dict | None:
    """The ``SYNTHETIC.json`` of a replica folder, or None if absent or unreadable."""
    path = Path(folder) / MARKER
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_built(name: str, root: str | Path, strength: float | None = None) -> bool:
    """True if every folder of the replica exists with a ``SYNTHETIC.json`` of this builder
    version (older replicas show different pictures and are rebuilt)."""
    manifests = [read_manifest(f) for f in replica_folders(name, root, strength)]
    return all(m is not None and m.get("builder_version") == BUILDER_VERSION for m in manifests)


def stale_manifest(name: str, root: str | Path, strength: float | None = None) -> dict | None:
    """The ``SYNTHETIC.json`` of a replica folder written by another builder version (its
    pictures differ from what this version draws), or None when no folder is stale."""
    for folder in replica_folders(name, root, strength):
        manifest = read_manifest(folder)
        if manifest is not None and manifest.get("builder_version") not in (None, BUILDER_VERSION):
            return manifest
    return None


# --------------------------------------------------------------------------------- the build


@dataclass(frozen=True)
class _Item:
    split: str
    g: int
    k: int  # index within (split, g)
    y: int
    a: int


def _items(spec: ReplicaSpec, counts: dict[str, dict[int, int]]) -> list[_Item]:
    items = []
    for split in SPLITS:
        for g in sorted(counts[split]):
            y, a = spec.ya(g)
            items.extend(_Item(split, g, k, y, a) for k in range(counts[split][g]))
    return items


def _render(
    spec: ReplicaSpec, item: _Item, seed: int, size: int, pools: dict[tuple[str, str], np.ndarray]
) -> list[np.ndarray]:
    """One image, uint8 (size, size, 3): a pure function of (seed, replica, split, g, k); for a
    test item also its twins in the order of :data:`COUNTERFACTUAL_KINDS` (core-only and
    background-only from a second generator, background-swapped from a third, each independent
    of the image's own, so neither the image nor an older kind of twin changes when a kind is
    added)."""
    images, _ = load_silhouettes()
    key = [seed, REPLICAS.index(spec.name), SPLITS.index(item.split), item.g, item.k]
    rng = np.random.default_rng(key)
    pool = pools[(spec.foreground[item.y], item.split)]
    silhouette = images[pool[int(rng.integers(len(pool)))]]
    parts = scene_parts(rng, silhouette, spec.background[item.a], size=size, tone=spec.tone,
                        scale=SILHOUETTE_SCALE, max_rotation=MAX_ROTATION)
    out = [compose(rng, *parts)]
    if item.split == "test":
        out.extend(counterfactual_scenes(np.random.default_rng(key + [1]), parts))
        swapped = spec.background[spec.swapped_attribute(item.y, item.a)]
        out.append(background_swapped_scene(np.random.default_rng(key + [2]), parts, swapped))
    return out


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # PIL writes no timestamp into PNGs: same pixels -> same bytes.
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _relative_path(spec: ReplicaSpec, item: _Item, serial: int) -> str:
    """Path of one image relative to the synth root, in the real dataset's layout."""
    if spec.name == "synth-waterbirds":
        folder = ("001.Landbird", "002.Waterbird")[item.y]
        return f"waterbirds_v1.0/{folder}/{folder[4:]}_{serial:05d}.png"
    if spec.name == "synth-celeba":
        return f"celebA_v1.0/img_align_celeba/{serial:06d}.png"
    if item.y < 2:
        top, cls = "spuco_birds", ("landbirds", "waterbirds")[item.y]
    else:
        top, cls = "spuco_dogs", ("small_dogs", "big_dogs")[item.y - 2]
    bg = spec.attribute_names[item.a]
    return f"{top}/{item.split}/{cls}/{bg}/{item.split}_{item.g:02d}_{item.k:05d}.png"


def _write_tables(spec: ReplicaSpec, staging: Path, rows: list[tuple[_Item, str, int]]) -> None:
    """The metadata files of the WILDS layouts (Animals has none: labels are folder names)."""
    split_code = {"train": 0, "val": 1, "test": 2}
    if spec.name == "synth-waterbirds":
        folder = staging / "waterbirds_v1.0"
        lines = ["img_id,img_filename,y,split,place,place_filename"]
        for item, rel, serial in rows:
            place = spec.attribute_names[item.a]
            lines.append(
                f"{serial},{rel.split('/', 1)[1]},{item.y},{split_code[item.split]},{item.a},"
                f"/{place[0]}/{place}/{serial:05d}.png"
            )
        (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
        (folder / "RELEASE_v1.0.txt").write_text("synthetic replica of waterbirds v1.0\n")
    elif spec.name == "synth-celeba":
        folder = staging / "celebA_v1.0"
        blond, male = CELEBA_ATTRIBUTES.index("Blond_Hair"), CELEBA_ATTRIBUTES.index("Male")
        attr_lines = ["image_id," + ",".join(CELEBA_ATTRIBUTES)]
        part_lines = ["image_id,partition"]
        for item, rel, _ in rows:
            # Attributes the replica does not model are -1 ("absent") for every image.
            values = [-1] * len(CELEBA_ATTRIBUTES)
            values[blond] = 1 if item.y == 1 else -1
            values[male] = 1 if item.a == 1 else -1
            image_id = rel.rsplit("/", 1)[1]
            attr_lines.append(image_id + "," + ",".join(str(v) for v in values))
            part_lines.append(f"{image_id},{split_code[item.split]}")
        (folder / "list_attr_celeba.csv").write_text("\n".join(attr_lines) + "\n")
        (folder / "list_eval_partition.csv").write_text("\n".join(part_lines) + "\n")
        (folder / "RELEASE_v1.0.txt").write_text("synthetic replica of celebA v1.0\n")


def _manifest(
    spec: ReplicaSpec, seed: int, size: int, scale: float, counts: dict[str, dict[int, int]],
    strength: float,
) -> dict:
    train = counts["train"]
    shares = {}
    for y, cls in enumerate(spec.class_names):
        n = sum(c for g, c in train.items() if spec.ya(g)[0] == y)
        shares[cls] = round(train[spec.group(y, spec.majority[y])] / n, 6) if n else None
    return {
        "name": spec.name,
        "seed": int(seed),
        "image_size": int(size),
        "scale": float(scale),
        "spurious_strength": float(strength),
        "spurious_strength_meaning": (
            "fraction of each class's training images on its majority background (val/test "
            "keep their fixed design)"),
        "train_majority_share": shares,
        "counterfactual": {
            "layout": f"<folder>/{COUNTERFACTUAL_DIR}/<kind>/<path of the test image in folder>",
            "kinds": {
                "core_only": "the test image's silhouette, placement and fill on flat neutral "
                             "grey (0.8, or 0.2 behind light objects)",
                "background_only": "the test image's background with no silhouette",
                "background_swapped": "the test image's silhouette, placement and fill on a "
                                      "fresh background of the class's other background "
                                      "family (labels y, a stay the original's)",
            },
            "split": "test",
            "images_per_kind": int(sum(counts["test"].values())),
        },
        "split_group_counts": {
            split: {str(g): int(n) for g, n in sorted(counts[split].items())} for split in SPLITS
        },
        "builder_version": BUILDER_VERSION,
        "folders": list(spec.folders),
        "group_index": f"g = {spec.group_stride}*y + a",
        "groups": {
            str(g): f"{spec.class_names[spec.ya(g)[0]]}/{spec.attribute_names[spec.ya(g)[1]]}"
            for g in sorted(counts["train"])
        },
        "foreground_silhouettes": dict(zip(spec.class_names, spec.foreground)),
        "background_families": dict(zip(spec.attribute_names, spec.background)),
    }


def build_replica(
    name: str,
    root: str | Path,
    seed: int = 0,
    force: bool = False,
    *,
    scale: float = 1.0,
    image_size: int = IMAGE_SIZE,
    progress: bool = True,
    strength: float | None = None,
) -> Path:
    """Build one replica and return its folder (:func:`replica_dir`: ``<root>/synth``, or
    ``<root>/synth/rho-<ρ>`` for a non-default ``strength``), the folder to give the real-data
    readers, e.g. ``WaterbirdsDataset(root_dir=<root>/synth)``.

    If the replica exists already (all its folders carry a ``SYNTHETIC.json`` of the current
    :data:`BUILDER_VERSION`) nothing is done unless ``force``. ``scale`` multiplies every group
    size of :data:`COUNTS` (tests use small scales); ``strength`` is the spurious strength ρ
    (None: the real dataset's). One process: the three full-size replicas take well under a
    minute on 2 CPU cores.
    """
    from ..progress import progress_bar

    spec = _spec(name)
    rho = resolve_strength(name, strength)
    counts = replica_counts(name, scale, rho)
    if int(image_size) < 16:
        raise ReplicaError(f"image_size must be at least 16 pixels, got {image_size}")
    out = replica_dir(name, root, rho)
    out.mkdir(parents=True, exist_ok=True)
    # Parallel sweep jobs build a replica once.
    with exclusive_lock(out / f".{name}.lock"):
        targets = replica_folders(name, root, rho)
        if not force:
            if is_built(name, root, rho):
                return out
            versions = [(read_manifest(p) or {}).get("builder_version") for p in targets]
            stale = [p for p, v in zip(targets, versions) if v not in (None, BUILDER_VERSION)]
            if stale and progress:
                print(f"{name}: {stale[0]} was built by an older replica builder; rebuilding")
            foreign = [p for p in targets if p.exists() and read_manifest(p) is None]
            if foreign:
                raise ReplicaError(
                    f"{foreign[0]} exists but has no {MARKER} (not a replica, or a broken one); "
                    f"move it away or rebuild with `python data_prep/build_synthetic.py --root "
                    f"{root} --only {name}"
                    + ("" if strength_folder(name, rho) is None else f" --spurious-strength {rho}")
                    + " --force`"
                )
        _clean_stale_staging(out, name)
        staging = Path(tempfile.mkdtemp(prefix=f".building-{name}-{os.getpid()}-", dir=out))
        try:
            pools = {}
            for cls in set(spec.foreground):
                train_pool, val_pool, test_pool = instance_pools(cls, seed)
                pools.update(
                    {(cls, "train"): train_pool, (cls, "val"): val_pool, (cls, "test"): test_pool}
                )
            items = _items(spec, counts)
            rows = [(item, _relative_path(spec, item, serial), serial)
                    for serial, item in enumerate(items, start=1)]
            for item, rel, _ in progress_bar(rows, desc=f"building {name}", unit="img",
                                             disable=not progress):
                pictures = _render(spec, item, seed, int(image_size), pools)
                _save_png(pictures[0], staging / rel)
                top, inside = rel.split("/", 1)
                for kind, picture in zip(COUNTERFACTUAL_KINDS, pictures[1:]):
                    _save_png(picture, staging / top / COUNTERFACTUAL_DIR / kind / inside)
            for folder in spec.folders:
                (staging / folder).mkdir(parents=True, exist_ok=True)
            _write_tables(spec, staging, rows)
            manifest = json.dumps(_manifest(spec, seed, image_size, scale, counts, rho), indent=2)
            for folder in spec.folders:
                (staging / folder / MARKER).write_text(manifest + "\n")
            _swap_into_place(staging, spec.folders, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return out


def _swap_into_place(staging: Path, folders: tuple[str, ...], out: Path) -> None:
    """Rename each finished folder into ``out``, replacing an old copy (moved aside first)."""
    trash = staging / ".old"
    trash.mkdir()
    for folder in folders:
        target = out / folder
        if target.exists():
            target.rename(trash / folder)
        (staging / folder).rename(target)


def _clean_stale_staging(out: Path, name: str) -> None:
    """Remove staging folders left by killed builds (their process is gone)."""
    for path in out.glob(f".building-{name}-*"):
        try:
            pid = int(path.name[len(f".building-{name}-") :].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def build_all(
    root: str | Path,
    seed: int = 0,
    force: bool = False,
    only: list[str] | None = None,
    *,
    scale: float = 1.0,
    progress: bool = True,
    strength: float | None = None,
) -> Path:
    """Build every replica (or those in ``only``) at spurious strength ``strength`` (None: each
    replica's default); returns ``<root>/synth``."""
    names = list(only) if only else list(REPLICAS)
    for name in names:
        resolve_strength(name, strength)
    for name in names:
        build_replica(name, root, seed, force, scale=scale, progress=progress, strength=strength)
    return synth_root(root)


def split_group_counts_on_disk(
    name: str, root: str | Path, strength: float | None = None
) -> dict[str, dict[int, int]]:
    """Count a built replica's images per split and group from its files and tables (no wilds):
    the independent check of ``SYNTHETIC.json`` used by tests and the build CLI."""
    import pandas as pd

    spec = _spec(name)
    base = replica_dir(name, root, strength)
    counts: dict[str, dict[int, int]] = {s: {} for s in SPLITS}

    def add(split: str, g: int, n: int = 1) -> None:
        counts[split][g] = counts[split].get(g, 0) + n

    if name == "synth-waterbirds":
        meta = pd.read_csv(base / "waterbirds_v1.0" / "metadata.csv")
        for split_code, y, place, rel in meta[["split", "y", "place", "img_filename"]].itertuples(
            index=False
        ):
            if (base / "waterbirds_v1.0" / rel).is_file():
                add(SPLITS[split_code], spec.group(y, place))
    elif name == "synth-celeba":
        folder = base / "celebA_v1.0"
        attrs = pd.read_csv(folder / "list_attr_celeba.csv")
        parts = pd.read_csv(folder / "list_eval_partition.csv")
        for image_id, blond, male, split_code in zip(
            attrs["image_id"], attrs["Blond_Hair"], attrs["Male"], parts["partition"]
        ):
            if (folder / "img_align_celeba" / image_id).is_file():
                add(SPLITS[split_code], spec.group(int(blond == 1), int(male == 1)))
    else:
        layout = {
            "spuco_birds": (("landbirds", "waterbirds"), ("land", "water"), 0, 0),
            "spuco_dogs": (("small_dogs", "big_dogs"), ("indoor", "outdoor"), 2, 2),
        }
        for top, (classes, backgrounds, y0, a0) in layout.items():
            for split in SPLITS:
                for yi, cls in enumerate(classes):
                    for ai, bg in enumerate(backgrounds):
                        n = len(list((base / top / split / cls / bg).glob("*.png")))
                        if n:
                            add(split, spec.group(y0 + yi, a0 + ai), n)
    return {s: dict(sorted(c.items())) for s, c in counts.items()}
