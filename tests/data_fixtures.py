"""Builders of tiny dataset folders in the exact real on-disk layouts (for tests).

Each builder writes a few dozen small RGB images with PIL plus the metadata files the real release
has, under ``base`` (a data root, or ``<root>/synth`` for a replica stand-in), and returns the
dataset folder. Counts are ``{split: {group index: n}}`` in the dataset's own group numbering.
Pass ``synthetic_name`` to also write the ``SYNTHETIC.json`` a replica carries.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}

WATERBIRDS_COUNTS = {
    "train": {0: 6, 1: 2, 2: 2, 3: 5},
    "val": {0: 2, 1: 2, 2: 2, 3: 2},
    "test": {0: 3, 1: 3, 2: 3, 3: 3},
}
CELEBA_COUNTS = {
    "train": {0: 6, 1: 5, 2: 3, 3: 1},
    "val": {0: 2, 1: 2, 2: 2, 3: 1},
    "test": {0: 2, 1: 2, 2: 2, 3: 2},
}
ANIMALS_COUNTS = {
    "train": {0: 4, 1: 1, 4: 1, 5: 4, 10: 4, 11: 1, 14: 1, 15: 4},
    "val": {g: 1 for g in (0, 1, 4, 5, 10, 11, 14, 15)},
    "test": {g: 2 for g in (0, 1, 4, 5, 10, 11, 14, 15)},
}


def write_image(path: Path, rng: np.random.Generator, size: tuple[int, int] = (12, 10)) -> None:
    """A small random RGB image; the format follows the suffix (.jpg/.jpeg/.png)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.fromarray(pixels).save(path, format=fmt)


def _rows(counts: dict[str, dict[int, int]], rng: np.random.Generator) -> list[tuple[str, int]]:
    """(split, g) for every image, shuffled so that splits and groups interleave as in real CSVs."""
    rows = [(s, g) for s, per in counts.items() for g, n in per.items() for _ in range(n)]
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


def _synthetic_json(folder: Path, name: str, counts: dict[str, dict[int, int]]) -> None:
    info = {
        "name": name,
        "seed": 0,
        "split_group_counts": {s: {str(g): n for g, n in per.items()} for s, per in counts.items()},
    }
    (folder / "SYNTHETIC.json").write_text(json.dumps(info, indent=1))


def make_waterbirds(
    base: Path,
    counts: dict[str, dict[int, int]] = WATERBIRDS_COUNTS,
    seed: int = 0,
    synthetic_name: str | None = None,
    marker: bool = True,
) -> Path:
    """``<base>/waterbirds_v1.0`` with metadata.csv (WILDS columns) and class-folder images."""
    rng = np.random.default_rng(seed)
    folder = Path(base) / "waterbirds_v1.0"
    folder.mkdir(parents=True, exist_ok=True)
    species = {0: "017.Cardinal", 1: "001.Black_footed_Albatross"}
    places = {0: "/b/bamboo_forest", 1: "/o/ocean"}
    lines = ["img_id,img_filename,y,split,place,place_filename"]
    for i, (split, g) in enumerate(_rows(counts, rng), start=1):
        y, place = divmod(g, 2)
        rel = f"{species[y]}/{species[y].split('.')[1]}_{i:04d}_{g}.jpg"
        write_image(folder / rel, rng)
        lines.append(f"{i},{rel},{y},{SPLIT_CODES[split]},{place},{places[place]}/{i:08d}.jpg")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    if marker:
        (folder / "RELEASE_v1.0.txt").write_text("")
    if synthetic_name:
        _synthetic_json(folder, synthetic_name, counts)
    return folder


def make_celeba(
    base: Path,
    counts: dict[str, dict[int, int]] = CELEBA_COUNTS,
    seed: int = 0,
    synthetic_name: str | None = None,
) -> Path:
    """``<base>/celebA_v1.0`` in the Kaggle CSV layout (attributes in {-1, 1})."""
    rng = np.random.default_rng(seed)
    folder = Path(base) / "celebA_v1.0"
    (folder / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    attr_names = ["5_o_Clock_Shadow", "Blond_Hair", "Male", "Smiling", "Young"]
    attrs = ["image_id," + ",".join(attr_names)]
    parts = ["image_id,partition"]
    for i, (split, g) in enumerate(_rows(counts, rng), start=1):
        blond, male = divmod(g, 2)
        image_id = f"{i:06d}.jpg"
        write_image(folder / "img_align_celeba" / image_id, rng, size=(9, 11))
        values = {
            "Blond_Hair": 2 * blond - 1,
            "Male": 2 * male - 1,
            **{n: int(rng.choice([-1, 1])) for n in ("5_o_Clock_Shadow", "Smiling", "Young")},
        }
        attrs.append(image_id + "," + ",".join(str(values[n]) for n in attr_names))
        parts.append(f"{image_id},{SPLIT_CODES[split]}")
    (folder / "list_attr_celeba.csv").write_text("\n".join(attrs) + "\n")
    (folder / "list_eval_partition.csv").write_text("\n".join(parts) + "\n")
    (folder / "RELEASE_v1.0.txt").write_text("")
    if synthetic_name:
        _synthetic_json(folder, synthetic_name, counts)
    return folder


ANIMAL_DIRS = {  # g -> (top folder, class folder, background folder)
    0: ("spuco_birds", "landbirds", "land"),
    1: ("spuco_birds", "landbirds", "water"),
    4: ("spuco_birds", "waterbirds", "land"),
    5: ("spuco_birds", "waterbirds", "water"),
    10: ("spuco_dogs", "small_dogs", "indoor"),
    11: ("spuco_dogs", "small_dogs", "outdoor"),
    14: ("spuco_dogs", "big_dogs", "indoor"),
    15: ("spuco_dogs", "big_dogs", "outdoor"),
}


def make_animals(
    base: Path,
    counts: dict[str, dict[int, int]] = ANIMALS_COUNTS,
    seed: int = 0,
    synthetic_name: str | None = None,
) -> Path:
    """``<base>/spuco_birds`` and ``<base>/spuco_dogs`` in the SpuCo folder layout; returns base.

    Files cycle through .jpg/.JPEG/.png; one folder also gets a text file and a hidden file that
    readers must ignore. With ``synthetic_name`` each top folder gets a SYNTHETIC.json with the
    counts of its own groups.
    """
    rng = np.random.default_rng(seed)
    base = Path(base)
    suffixes = (".jpg", ".JPEG", ".png")
    k = 0
    for split in ("train", "val", "test"):
        for g, (top, cls_dir, bg) in ANIMAL_DIRS.items():
            folder = base / top / split / cls_dir / bg
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(counts.get(split, {}).get(g, 0)):
                write_image(folder / f"img_{(j * 7919) % 1000:03d}_{j}{suffixes[k % 3]}", rng)
                k += 1
    (base / "spuco_birds" / "train" / "landbirds" / "land" / "notes.txt").write_text("not an image")
    (base / "spuco_birds" / "train" / "landbirds" / "land" / ".hidden.jpg").write_bytes(b"")
    if synthetic_name:
        for top in ("spuco_birds", "spuco_dogs"):
            own = {
                s: {g: n for g, n in per.items() if ANIMAL_DIRS[g][0] == top}
                for s, per in counts.items()
            }
            _synthetic_json(base / top, synthetic_name, own)
    return base


def make_celeba_csvs(base: Path, n_rows: int, seed: int = 0) -> Path:
    """``<base>/celebA_v1.0`` with full-width CSVs (40 attributes) of ``n_rows`` rows, no images.

    For reading tests at realistic CSV size: loading reads only the CSVs (images stay unopened).
    """
    import pandas as pd

    rng = np.random.default_rng(seed)
    folder = Path(base) / "celebA_v1.0"
    (folder / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    ids = [f"{i:06d}.jpg" for i in range(1, n_rows + 1)]
    attrs = {f"Attr_{k:02d}": rng.choice([-1, 1], n_rows) for k in range(38)}
    attrs["Blond_Hair"] = rng.choice([-1, 1], n_rows, p=[0.85, 0.15])
    attrs["Male"] = rng.choice([-1, 1], n_rows)
    pd.DataFrame({"image_id": ids, **attrs}).to_csv(folder / "list_attr_celeba.csv", index=False)
    partition = rng.choice([0, 1, 2], n_rows, p=[0.8, 0.1, 0.1])
    pd.DataFrame({"image_id": ids, "partition": partition}).to_csv(
        folder / "list_eval_partition.csv", index=False
    )
    (folder / "RELEASE_v1.0.txt").write_text("")
    return folder
