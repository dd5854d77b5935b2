"""Waterbirds in the WILDS layout, read through the ``wilds`` package (docs/datasets.md).

On disk: ``<base>/waterbirds_v1.0/`` with ``RELEASE_v1.0.txt``, ``metadata.csv`` (columns
``img_filename, y, split, place`` and usually ``img_id, place_filename``) and the images at
``waterbirds_v1.0/<img_filename>``. Labels: y 0 landbird / 1 waterbird; attribute a = place,
0 land / 1 water; group ``g = 2·y + a`` (WILDS' CombinatorialGrouper over (background, y)).

This module also holds the small helpers shared by the two WILDS-layout adapters (this one and
:mod:`robustbench_fvae.data.celeba`): importing wilds quietly and turning its failures into
one-line :class:`DatasetError` messages.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from robustbench_fvae.data.base import SPLITS, DatasetError, Group

# (paths, y, a) of one split: list of image paths, int64 arrays of shape (N,).
SplitArrays = tuple[list[Path], np.ndarray, np.ndarray]

FOLDER = "waterbirds_v1.0"
MARKER = "RELEASE_v1.0.txt"
METADATA = "metadata.csv"
REQUIRED_COLUMNS = ("img_filename", "y", "split", "place")
CLASS_NAMES = ("landbird", "waterbird")
ATTRIBUTE_NAMES = ("land", "water")
N_GROUPS = 4
GROUPS = tuple(
    Group(g=2 * y + a, y=y, a=a, name=f"{CLASS_NAMES[y]}/{ATTRIBUTE_NAMES[a]}")
    for y in range(2)
    for a in range(2)
)
# WILDS split codes in metadata.csv / list_eval_partition.csv.
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
# Group sizes of the released dataset (Sagawa et al. 2020; WILDS v1.0). Val/test backgrounds are
# balanced within each class, so their groups come in equal pairs.
REAL_COUNTS = {
    "train": {0: 3498, 1: 184, 2: 56, 3: 1057},
    "val": {0: 467, 1: 466, 2: 133, 3: 133},
    "test": {0: 2255, 1: 2255, 2: 642, 3: 642},
}


def group_index(y: np.ndarray, a: np.ndarray) -> np.ndarray:
    """WILDS numbering: ``g = 2·y + place``."""
    return 2 * np.asarray(y, dtype=np.int64) + np.asarray(a, dtype=np.int64)


# ---------------------------------------------------------------- shared WILDS-layout helpers


def import_wilds_class(module: str, cls: str) -> type:
    """Import a wilds dataset class without wilds' PyPI version-check thread."""
    # wilds.version does `from outdated import check_outdated` in a try block and starts a
    # thread that queries PyPI; a None entry makes that import fail, so no thread, no network.
    sys.modules.setdefault("outdated", None)
    return getattr(importlib.import_module(module), cls)


def csv_columns(path: Path) -> list[str]:
    """Column names of a CSV file (reads the header only)."""
    return [str(c) for c in pd.read_csv(path, nrows=0).columns]


def missing_columns_problem(path: Path, required: tuple[str, ...]) -> str | None:
    """A one-line problem if ``path`` (an existing CSV) lacks required columns, else None."""
    try:
        cols = csv_columns(path)
    except (OSError, ValueError) as err:  # pandas parser errors are ValueErrors
        return f"cannot read {path}: {err}"
    missing = [c for c in required if c not in cols]
    if missing:
        return f"{path} lacks column(s) {', '.join(missing)} (has: {', '.join(cols)})"
    return None


def value_problem(path: Path, column: str, values: pd.Series, allowed: set[int]) -> str | None:
    """A one-line problem if a CSV column holds anything outside ``allowed``, else None."""
    numeric = pd.to_numeric(values, errors="coerce")
    bad = values[numeric.isna() | ~numeric.isin(sorted(allowed))]
    if len(bad):
        shown = ", ".join(repr(v) for v in pd.unique(bad)[:5])
        return (
            f"{path} column {column} has {len(bad)} value(s) outside {sorted(allowed)}, "
            f"e.g. {shown}"
        )
    return None


class _WritableValuesFrame(pd.DataFrame):
    """A DataFrame whose ``.values`` is a writable copy.

    wilds 2.0.0's CelebADataset writes into ``DataFrame.values`` (``attrs[attrs == -1] = 0``).
    With pandas >= 3 (copy-on-write) ``.values`` of a single-block frame is a read-only view, and
    a CSV as large as the real CelebA one (202,599 rows × 41 columns) is parsed into one block,
    so wilds fails with "assignment destination is read-only". Small files happen to work.
    """

    @property
    def _constructor(self):
        return _WritableValuesFrame

    @property
    def values(self) -> np.ndarray:
        return np.array(super().values, copy=True)


class _PandasForWilds:
    """Stands in for ``pandas`` inside a wilds dataset module: only ``read_csv`` differs."""

    def __getattr__(self, attr: str):
        return getattr(pd, attr)

    @staticmethod
    def read_csv(*args, **kwargs) -> pd.DataFrame:
        return _WritableValuesFrame(pd.read_csv(*args, **kwargs))


@contextlib.contextmanager
def wilds_compat(cls: type):
    """Run wilds dataset code of ``cls`` with pandas-3-safe CSV frames and without its warning."""
    module = sys.modules[cls.__module__]
    saved = getattr(module, "pd", None)
    module.pd = _PandasForWilds()
    try:
        with warnings.catch_warnings():
            # torch warns about pandas' read-only arrays; harmless (wilds only reads them).
            warnings.filterwarnings("ignore", message=".*non-writable.*")
            yield
    finally:
        module.pd = saved


def build_wilds(cls: type, base: Path, name: str, hint: str):
    """Construct a wilds dataset from ``base`` (already checked) with ``download=False``.

    Any failure inside wilds (malformed CSV, mismatched lengths) becomes a one-line DatasetError.
    """
    try:
        with wilds_compat(cls):
            return cls(root_dir=str(base), download=False)
    except (OSError, ValueError, KeyError, IndexError, AssertionError, TypeError) as err:
        # wilds' consistency checks are bare asserts (e.g. CSVs of different lengths).
        detail = str(err) or "inconsistent files (e.g. CSVs with different numbers of rows)"
        raise DatasetError(
            f"{name}: wilds could not read {base}: {type(err).__name__}: {detail}; check the "
            f"folder with `python data_prep/verify.py {name} --root DIR`, or {hint}"
        ) from err


def split_arrays(
    data_dir: Path,
    files: np.ndarray,
    y: np.ndarray,
    a: np.ndarray,
    split: np.ndarray,
    name: str,
) -> dict[str, SplitArrays]:
    """Cut whole-dataset arrays into train/val/test (WILDS codes 0/1/2), paths under data_dir."""
    out: dict[str, SplitArrays] = {}
    for s in SPLITS:
        idx = np.flatnonzero(split == SPLIT_CODES[s])
        if idx.size == 0:
            raise DatasetError(
                f"{name}: split '{s}' of {data_dir} is empty (no rows with split code "
                f"{SPLIT_CODES[s]}); check the folder with `python data_prep/verify.py {name} "
                f"--root DIR`"
            )
        out[s] = ([data_dir / str(files[i]) for i in idx], y[idx].copy(), a[idx].copy())
    return out


def check_binary(name: str, what: str, values: np.ndarray, where: Path, allowed=(0, 1)) -> None:
    """Raise a DatasetError when label/attribute/split values leave their range."""
    bad = np.setdiff1d(np.unique(values), np.asarray(allowed))
    if bad.size:
        raise DatasetError(
            f"{name}: {where} has {what} values {bad.tolist()[:5]} outside {list(allowed)}; "
            f"check the folder with `python data_prep/verify.py {name} --root DIR`"
        )


# ---------------------------------------------------------------- Waterbirds


def layout_problems(base: Path) -> list[str]:
    """Cheap structural problems of ``<base>/waterbirds_v1.0`` (no image access)."""
    folder = base / FOLDER
    if not folder.is_dir():
        return [f"missing folder {folder}"]
    problems = []
    if not (folder / MARKER).is_file():
        problems.append(f"missing {folder / MARKER} (the WILDS release marker)")
    meta = folder / METADATA
    if not meta.is_file():
        problems.append(f"missing {meta}")
    else:
        problem = missing_columns_problem(meta, REQUIRED_COLUMNS)
        if problem:
            problems.append(problem)
    return problems


def content_problems(base: Path) -> list[str]:
    """Value-level problems of metadata.csv (assumes ``layout_problems`` found none)."""
    meta = base / FOLDER / METADATA
    df = pd.read_csv(meta)
    problems = [
        p
        for p in (
            value_problem(meta, "y", df["y"], {0, 1}),
            value_problem(meta, "place", df["place"], {0, 1}),
            value_problem(meta, "split", df["split"], {0, 1, 2}),
        )
        if p
    ]
    dup = df["img_filename"][df["img_filename"].duplicated()]
    if len(dup):
        problems.append(f"{meta} lists {len(dup)} image(s) twice, e.g. {dup.iloc[0]}")
    return problems


def read_wilds_arrays(
    base: Path, name: str, hint: str, *, problems: list[str], wilds_class: tuple[str, str],
    attribute: str, label_files: tuple[tuple[str, str], ...], image_dir: str = "",
) -> dict[str, SplitArrays]:
    """Per split ``(paths, y, a)`` read through a wilds dataset class (CSVs only, no images).

    ``problems`` (the adapter's ``layout_problems``) are raised first as one DatasetError: asked
    about a folder it cannot read, wilds would start a download. ``attribute`` is the wilds
    metadata field that is ``a``; ``label_files`` names, for y, a and the split code in turn, the
    column and the file (relative to wilds' data_dir) that error messages point to.
    """
    if problems:
        raise DatasetError(f"{name}: {'; '.join(problems)}; {hint}")
    ds = build_wilds(import_wilds_class(*wilds_class), base, name, hint)
    y = ds._y_array.numpy().astype(np.int64)
    a = ds._metadata_array[:, list(ds.metadata_fields).index(attribute)].numpy().astype(np.int64)
    split = np.asarray(ds._split_array)
    data_dir = Path(ds.data_dir)
    for (column, file), values, allowed in zip(label_files, (y, a, split),
                                               ((0, 1), (0, 1), (0, 1, 2))):
        check_binary(name, column, values, data_dir / file, allowed=allowed)
    return split_arrays(data_dir / image_dir, np.asarray(ds._input_array), y, a, split, name)


def read_arrays(base: Path, name: str, hint: str) -> dict[str, SplitArrays]:
    """Per split ``(paths, y, a)`` read through wilds' WaterbirdsDataset."""
    return read_wilds_arrays(
        base, name, hint, problems=layout_problems(base),
        wilds_class=("wilds.datasets.waterbirds_dataset", "WaterbirdsDataset"),
        attribute="background",
        label_files=(("y", METADATA), ("place", METADATA), ("split", METADATA)))


# ---------------------------------------------------------------- downloading through wilds


def probe_url(url: str, timeout: float = 20.0) -> None:
    """Raise RuntimeError if the host of ``url`` cannot be reached at all (offline, DNS, refused).

    Any HTTP answer, even an error status, counts as reachable: the real download decides then.
    """
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            pass
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise RuntimeError(f"cannot reach {urllib.parse.urlsplit(url).netloc}: {reason}") from err


def wilds_download(module: str, cls_name: str, staging: Path, folder: str) -> Path:
    """Download a WILDS dataset with ``download=True`` into ``staging/<folder>``; return it.

    Raises RuntimeError with wilds' own failure reason: offline, wilds prints the download error,
    carries on, and only then fails on the missing CSV, which alone would hide the cause.
    """
    cls = import_wilds_class(module, cls_name)
    url = cls._versions_dict["1.0"]["download_url"]
    # Fail fast and quietly when offline, before wilds starts printing progress bars.
    probe_url(url)
    print(f"downloading {folder} through wilds from {url} (this can take a while)", flush=True)
    # wilds' own messages are kept back: on failure they advise deleting files we delete anyway.
    captured = io.StringIO()
    try:
        with wilds_compat(cls), contextlib.redirect_stdout(captured):
            cls(root_dir=str(staging), download=True)
    except Exception as err:  # noqa: BLE001 - any failure inside wilds means "not downloaded"
        lines = captured.getvalue().splitlines()
        reported = [ln for ln in lines if ln.strip().startswith("Exception:")]
        cause = (
            reported[-1].split(":", 1)[1].strip() if reported else f"{type(err).__name__}: {err}"
        )
        raise RuntimeError(cause) from err
    target = staging / folder
    # wilds recognises a complete download by this marker; keep the folder recognisable.
    (target / MARKER).touch(exist_ok=True)
    return target


def download_into(staging: Path) -> list[Path]:
    """Download Waterbirds (CodaLab bundle, via wilds) into ``staging``; return the new folders."""
    return [
        wilds_download("wilds.datasets.waterbirds_dataset", "WaterbirdsDataset", staging, FOLDER)
    ]
