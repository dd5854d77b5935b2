"""Animals = SpuCoAnimals (Joshi et al.), read straight from its folders (docs/datasets.md).

On disk::

    <base>/spuco_birds/<split>/{landbirds,waterbirds}/{land,water}/*.{jpg,jpeg,png}
    <base>/spuco_dogs/<split>/{small_dogs,big_dogs}/{indoor,outdoor}/*.{jpg,jpeg,png}

with split in train/val/test. Labels follow spuco: y 0 landbird, 1 waterbird, 2 small dog,
3 big dog; spurious attribute a 0 land, 1 water, 2 indoor, 3 outdoor; group ``g = 4·y + a``, so 8
of the 16 indices are populated (birds never appear indoors, dogs never on water). Files are taken
in sorted order within each folder, folders in group order, so indices are deterministic.

The ``spuco`` package is not used: it re-seeds global RNGs on construction and forces a 224 crop.
"""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
import urllib.request
from pathlib import Path

import numpy as np

from robustbench_fvae.data.base import SPLITS, DatasetError, Group

# (paths, y, a) of one split: list of image paths, int64 arrays of shape (N,).
SplitArrays = tuple[list[Path], np.ndarray, np.ndarray]

BIRDS = "spuco_birds"
DOGS = "spuco_dogs"
FOLDERS = (BIRDS, DOGS)
CLASS_NAMES = ("landbird", "waterbird", "small_dog", "big_dog")
ATTRIBUTE_NAMES = ("land", "water", "indoor", "outdoor")
# (top folder, class folder, y, ((attribute folder, a), ...)) in group order.
LAYOUT = (
    (BIRDS, "landbirds", 0, (("land", 0), ("water", 1))),
    (BIRDS, "waterbirds", 1, (("land", 0), ("water", 1))),
    (DOGS, "small_dogs", 2, (("indoor", 2), ("outdoor", 3))),
    (DOGS, "big_dogs", 3, (("indoor", 2), ("outdoor", 3))),
)
N_GROUPS = 16
GROUPS = tuple(
    Group(g=4 * y + a, y=y, a=a, name=f"{CLASS_NAMES[y]}/{ATTRIBUTE_NAMES[a]}")
    for _, _, y, attrs in LAYOUT
    for _, a in attrs
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# spuco 2.0.3 asserts these per-folder file counts; the majority pairing is y == a.
_MAJORITY = {"train": 10000, "val": 500, "test": 500}
_MINORITY = {"train": 500, "val": 25, "test": 500}
REAL_COUNTS = {
    s: {grp.g: (_MAJORITY[s] if grp.y == grp.a else _MINORITY[s]) for grp in GROUPS} for s in SPLITS
}
# The public tarballs that spuco downloads (each holds all three splits under its top folder).
DOWNLOAD_URLS = {
    BIRDS: "https://ucla.box.com/shared/static/zrsx09ik7lqad1e389w06f1c4nbajo9z",
    DOGS: "https://ucla.box.com/shared/static/u3dkllvq7a2py4x443pqul295wwd549e",
}
DOWNLOAD_GIB = {BIRDS: 2.8, DOGS: 2.5}


def group_index(y: np.ndarray, a: np.ndarray) -> np.ndarray:
    """``g = 4·y + a`` over 4 classes × 4 backgrounds."""
    return 4 * np.asarray(y, dtype=np.int64) + np.asarray(a, dtype=np.int64)


def _leaf_dirs(base: Path, split: str):
    """Yield ``(folder, y, a)`` for the 8 image folders of one split, in group order."""
    for top, cls_dir, y, attrs in LAYOUT:
        for attr_dir, a in attrs:
            yield base / top / split / cls_dir / attr_dir, y, a


def list_images(folder: Path) -> list[Path]:
    """Image files (.jpg/.jpeg/.png, any case) directly inside ``folder``, sorted by name."""
    with os.scandir(folder) as it:
        names = [
            e.name
            for e in it
            if e.name.lower().endswith(IMAGE_SUFFIXES)
            and e.is_file()
            and not e.name.startswith(".")
        ]
    return [folder / n for n in sorted(names)]


def layout_problems(base: Path) -> list[str]:
    """Missing top, split, class or background folders (no file access beyond ``is_dir``)."""
    problems = []
    for top in FOLDERS:
        if not (base / top).is_dir():
            problems.append(f"missing folder {base / top}")
            continue
        for split in SPLITS:
            if not (base / top / split).is_dir():
                problems.append(f"missing folder {base / top / split}")
                continue
            for folder, _, _ in _leaf_dirs(base, split):
                if folder.is_relative_to(base / top) and not folder.is_dir():
                    problems.append(f"missing folder {folder}")
    return problems


def content_problems(base: Path) -> list[str]:
    """Nothing beyond the layout: labels come from folder names, checked by counts in verify."""
    return []


def check_layout(base: Path, name: str, hint: str) -> None:
    """Raise DatasetError naming every missing folder (first five) and the fix."""
    problems = layout_problems(base)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DatasetError(f"{name}: {'; '.join(problems[:5])}{more}; {hint}")


def read_arrays(base: Path, name: str, hint: str) -> dict[str, SplitArrays]:
    """Per split ``(paths, y, a)`` from the folder names (lists directories, opens no image)."""
    check_layout(base, name, hint)
    out: dict[str, SplitArrays] = {}
    for split in SPLITS:
        paths: list[Path] = []
        ys: list[int] = []
        as_: list[int] = []
        for folder, y, a in _leaf_dirs(base, split):
            files = list_images(folder)
            paths.extend(files)
            ys.extend([y] * len(files))
            as_.extend([a] * len(files))
        if not paths:
            raise DatasetError(
                f"{name}: split '{split}' under {base} holds no .jpg/.jpeg/.png images; check the "
                f"folders with `python data_prep/verify.py {name} --root DIR`, or {hint}"
            )
        out[split] = (paths, np.asarray(ys, dtype=np.int64), np.asarray(as_, dtype=np.int64))
    return out


# ---------------------------------------------------------------- download


def _fetch(url: str, dest: Path, label: str, timeout: float = 60.0) -> None:
    """Stream ``url`` to ``dest`` with a progress bar (to stderr)."""
    from ..progress import progress_bar

    with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with progress_bar(total=total, unit="B", unit_scale=True, desc=label, file=sys.stderr) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))


def download_into(staging: Path, folders: tuple[str, ...] = FOLDERS) -> list[Path]:
    """Download and unpack the SpuCo tarballs for ``folders`` into ``staging``; return them.

    Each tarball is deleted as soon as it is unpacked (they total about 5.3 GiB).
    """
    done = []
    for top in folders:
        archive = staging / f"{top}.tar.gz"
        print(
            f"downloading {top} (about {DOWNLOAD_GIB[top]} GiB) from {DOWNLOAD_URLS[top]}",
            flush=True,
        )
        _fetch(DOWNLOAD_URLS[top], archive, top)
        with tarfile.open(archive, "r:gz") as tar:
            # The "data" filter refuses absolute paths, links out of the tree and device files.
            tar.extractall(staging, filter="data")
        archive.unlink()
        if not (staging / top).is_dir():
            found = ", ".join(sorted(p.name for p in staging.iterdir())) or "nothing"
            shutil.rmtree(staging / top, ignore_errors=True)
            raise RuntimeError(
                f"the {top} archive did not contain a {top}/ folder (found: {found})"
            )
        done.append(staging / top)
    return done
