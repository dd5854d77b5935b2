"""Drawing one replica's files: each image and its counterfactual twins (a pure function of the
seed and the image's key), its path in the real dataset's layout, and the metadata tables of
the WILDS layouts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .base import SPLITS
from .replica_specs import REPLICAS, ReplicaSpec
from .silhouettes import (
    background_swapped_scene,
    compose,
    counterfactual_scenes,
    load_silhouettes,
    scene_parts,
)

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
