"""CelebA (blond hair vs gender) in the WILDS/Kaggle layout, read through ``wilds`` (docs/datasets.md).

On disk: ``<base>/celebA_v1.0/`` with ``RELEASE_v1.0.txt``, ``list_attr_celeba.csv`` (``image_id``
+ attribute columns in {-1, 1}, of which ``Blond_Hair`` and ``Male`` are used),
``list_eval_partition.csv`` (``image_id, partition`` with 0/1/2 = train/val/test, in the same row
order: wilds aligns the two files by row) and the images at ``img_align_celeba/<image_id>``.
Labels: y = Blond_Hair (0 not blond / 1 blond); attribute a = Male (0 female / 1 male);
group ``g = 2·y + a`` (WILDS' CombinatorialGrouper over (male, y)); group 3, blond male, is rare.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from robustbench_fvae.data.base import Group
from robustbench_fvae.data.waterbirds import (
    SplitArrays,
    missing_columns_problem,
    read_wilds_arrays,
    value_problem,
    wilds_download,
)

FOLDER = "celebA_v1.0"
MARKER = "RELEASE_v1.0.txt"
ATTR_CSV = "list_attr_celeba.csv"
PARTITION_CSV = "list_eval_partition.csv"
IMAGE_DIR = "img_align_celeba"
ATTR_COLUMNS = ("image_id", "Blond_Hair", "Male")
PARTITION_COLUMNS = ("image_id", "partition")
CLASS_NAMES = ("not_blond", "blond")
ATTRIBUTE_NAMES = ("female", "male")
N_GROUPS = 4
GROUPS = tuple(
    Group(g=2 * y + a, y=y, a=a, name=f"{CLASS_NAMES[y]}/{ATTRIBUTE_NAMES[a]}")
    for y in range(2)
    for a in range(2)
)
# Group sizes of the official split (Sagawa et al. 2020), identical in WILDS v1.0.
REAL_COUNTS = {
    "train": {0: 71629, 1: 66874, 2: 22880, 3: 1387},
    "val": {0: 8535, 1: 8276, 2: 2874, 3: 182},
    "test": {0: 9767, 1: 7535, 2: 2480, 3: 180},
}


def group_index(y: np.ndarray, a: np.ndarray) -> np.ndarray:
    """WILDS numbering: ``g = 2·blond + male``."""
    return 2 * np.asarray(y, dtype=np.int64) + np.asarray(a, dtype=np.int64)


def layout_problems(base: Path) -> list[str]:
    """Cheap structural problems of ``<base>/celebA_v1.0`` (CSV headers only, no images)."""
    folder = base / FOLDER
    if not folder.is_dir():
        return [f"missing folder {folder}"]
    problems = []
    if not (folder / MARKER).is_file():
        problems.append(f"missing {folder / MARKER} (the WILDS release marker)")
    for csv, required in ((ATTR_CSV, ATTR_COLUMNS), (PARTITION_CSV, PARTITION_COLUMNS)):
        if not (folder / csv).is_file():
            problems.append(f"missing {folder / csv}")
            continue
        problem = missing_columns_problem(folder / csv, required)
        if problem:
            problems.append(problem)
    if not (folder / IMAGE_DIR).is_dir():
        problems.append(f"missing image folder {folder / IMAGE_DIR}")
    return problems


def content_problems(base: Path) -> list[str]:
    """Value-level problems of the two CSVs (assumes ``layout_problems`` found none)."""
    folder = base / FOLDER
    attrs = pd.read_csv(folder / ATTR_CSV, usecols=list(ATTR_COLUMNS))
    part = pd.read_csv(folder / PARTITION_CSV, usecols=list(PARTITION_COLUMNS))
    # wilds maps -1 -> 0, so a 0/1-coded file reads the same; anything else is corrupt.
    problems = [
        p
        for p in (
            value_problem(folder / ATTR_CSV, "Blond_Hair", attrs["Blond_Hair"], {-1, 0, 1}),
            value_problem(folder / ATTR_CSV, "Male", attrs["Male"], {-1, 0, 1}),
            value_problem(folder / PARTITION_CSV, "partition", part["partition"], {0, 1, 2}),
        )
        if p
    ]
    if len(attrs) != len(part):
        problems.append(
            f"{folder / ATTR_CSV} has {len(attrs)} rows but {folder / PARTITION_CSV} has "
            f"{len(part)}; wilds pairs them row by row"
        )
    else:
        differ = np.flatnonzero(
            attrs["image_id"].astype(str).values != part["image_id"].astype(str).values
        )
        if differ.size:
            i = int(differ[0])
            problems.append(
                f"{folder / ATTR_CSV} and {folder / PARTITION_CSV} list images in a different "
                f"order ({differ.size} rows differ, first at row {i}: "
                f"{attrs['image_id'].iloc[i]} vs {part['image_id'].iloc[i]}); "
                "wilds pairs them by row"
            )
    dup = attrs["image_id"][attrs["image_id"].duplicated()]
    if len(dup):
        problems.append(f"{folder / ATTR_CSV} lists {len(dup)} image(s) twice, e.g. {dup.iloc[0]}")
    return problems


def read_arrays(base: Path, name: str, hint: str) -> dict[str, SplitArrays]:
    """Per split ``(paths, y, a)`` read through wilds' CelebADataset."""
    return read_wilds_arrays(
        base, name, hint, problems=layout_problems(base),
        wilds_class=("wilds.datasets.celebA_dataset", "CelebADataset"), attribute="male",
        label_files=(("Blond_Hair", ATTR_CSV), ("Male", ATTR_CSV), ("partition", PARTITION_CSV)),
        image_dir=IMAGE_DIR)


def download_into(staging: Path) -> list[Path]:
    """Download CelebA (1.3 GB CodaLab bundle, via wilds) into ``staging``; return the folder."""
    return [wilds_download("wilds.datasets.celebA_dataset", "CelebADataset", staging, FOLDER)]
