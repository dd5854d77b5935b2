"""The replicas' recipes: which labels and backgrounds each one has, its group sizes per split
(:data:`COUNTS`) and how the spurious strength ρ moves its training images between backgrounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..replica_defaults import REPLICA_DEFAULT_STRENGTH
from .base import DatasetError

STRENGTH_RANGE = (0.5, 1.0)
REPLICAS = ("synth-waterbirds", "synth-celeba", "synth-animals")

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
        # Real CelebA train: 22880 of 24267 blond faces are female (0.943); not-blond faces are
        # 71629 of 138503 female (0.517), a lean of (0.517 − ½)/(0.943 − ½) of blond's.
        default_strength=REPLICA_DEFAULT_STRENGTH["synth-celeba"],
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
