"""Dataset registry: names → on-disk layouts and readers; loading splits; downloading.

Real datasets live directly under the data root (``<root>/waterbirds_v1.0/``,
``<root>/celebA_v1.0/``, ``<root>/spuco_birds/`` + ``<root>/spuco_dogs/``). The offline replicas
``synth-*`` live under ``<root>/synth/`` in the very same layouts and are read by the very same
adapters; each replica folder also holds a ``SYNTHETIC.json`` written by the replica builder
(:func:`robustbench_fvae.data.synthetic.build_replica`) with its seed and per-split group counts.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from robustbench_fvae.data import animals, celeba, waterbirds
from robustbench_fvae.data.base import SPLITS, DatasetError, Group, GroupSplit

SYNTH_DIR = "synth"
SYNTH_INFO = "SYNTHETIC.json"

# split -> {group index -> number of images}
GroupCounts = dict[str, dict[int, int]]


class DownloadError(DatasetError):
    """A download failed; nothing was left under the data root. The message gives the manual way."""


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the registry knows about one dataset name.

    ``adapter`` is the layout module (waterbirds / celeba / animals) providing ``layout_problems``,
    ``content_problems``, ``read_arrays``, ``group_index`` and ``download_into``.
    ``real_counts`` are the released dataset's per-split group counts (None for replicas, whose
    expected counts come from their ``SYNTHETIC.json``).
    """

    name: str
    family: str
    synthetic: bool
    adapter: ModuleType
    folders: tuple[str, ...]
    class_names: tuple[str, ...]
    attribute_names: tuple[str, ...]
    groups: tuple[Group, ...]
    n_groups: int
    group_index: Callable[[np.ndarray, np.ndarray], np.ndarray]
    real_counts: Mapping[str, Mapping[int, int]] | None
    manual_hint: str

    def data_dir(self, root: str | Path) -> Path:
        """The folder that holds this dataset's layout folders: ``root`` or ``root/synth``."""
        root = Path(root).expanduser()
        return root / SYNTH_DIR if self.synthetic else root

    def folder_paths(self, root: str | Path) -> list[Path]:
        """The top-level dataset folders under ``root`` (two for Animals)."""
        return [self.data_dir(root) / f for f in self.folders]

    def fix_hint(self, root: str | Path) -> str:
        """The command that puts this dataset in place, for error messages."""
        if self.synthetic:
            return (
                f"build it with `python data_prep/build_synthetic.py --root {root}` "
                f"(or `python data_prep/download.py {self.name} --root {root}`)"
            )
        return (
            f"get it with `python data_prep/download.py {self.name} --root {root}` "
            f"(with the files already on disk, add `--manual PATH`)"
        )

    def read(self, root: str | Path, hint: str | None = None):
        """Per split ``(paths, y, a)`` arrays (no image is opened)."""
        return self.adapter.read_arrays(self.data_dir(root), self.name, hint or self.fix_hint(root))


_MANUAL_HINTS = {
    "waterbirds": (
        "download waterbirds_v1.0.tar.gz from https://wilds.stanford.edu/downloads (CodaLab bundle "
        "0x505056d5cdea4e4eaa0e242cbfe2daa4) on a machine with internet, unpack it, then run "
        "`python data_prep/download.py waterbirds --root {root} --manual UNPACKED_DIR`"
    ),
    "celeba": (
        "download celebA_v1.0.tar.gz from https://wilds.stanford.edu/downloads (CodaLab bundle "
        "0xfe55077f5cd541f985ebf9ec50473293) or the Kaggle 'celeba-dataset' files "
        "(list_attr_celeba.csv, list_eval_partition.csv, img_align_celeba/), unpack them into one "
        "folder, then run `python data_prep/download.py celeba --root {root} --manual DIR`"
    ),
    "animals": (
        "fetch the SpuCo tarballs "
        + " and ".join(animals.DOWNLOAD_URLS.values())
        + " in a browser, unpack both into one folder (giving spuco_birds/ and spuco_dogs/), then "
        "run `python data_prep/download.py animals --root {root} --manual DIR`"
    ),
}


def _spec(name: str, family: str, adapter: ModuleType, synthetic: bool) -> DatasetSpec:
    folders = tuple(animals.FOLDERS) if family == "animals" else (adapter.FOLDER,)
    return DatasetSpec(
        name=name,
        family=family,
        synthetic=synthetic,
        adapter=adapter,
        folders=folders,
        class_names=tuple(adapter.CLASS_NAMES),
        attribute_names=tuple(adapter.ATTRIBUTE_NAMES),
        groups=tuple(adapter.GROUPS),
        n_groups=int(adapter.N_GROUPS),
        group_index=adapter.group_index,
        real_counts=None if synthetic else adapter.REAL_COUNTS,
        manual_hint=_MANUAL_HINTS[family],
    )


_FAMILIES = {"waterbirds": waterbirds, "celeba": celeba, "animals": animals}

REGISTRY: dict[str, DatasetSpec] = {}
for _family, _adapter in _FAMILIES.items():
    REGISTRY[_family] = _spec(_family, _family, _adapter, synthetic=False)
for _family, _adapter in _FAMILIES.items():
    REGISTRY[f"synth-{_family}"] = _spec(f"synth-{_family}", _family, _adapter, synthetic=True)


def dataset_names() -> list[str]:
    """All accepted dataset names."""
    return list(REGISTRY)


def get_spec(name: str) -> DatasetSpec:
    """The spec of ``name``; unknown names raise ValueError listing the accepted ones."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown dataset {name!r}; accepted: {', '.join(dataset_names())}"
        ) from None


# ---------------------------------------------------------------- replicas


def replica_info(name: str, root: str | Path) -> dict | None:
    """The merged ``SYNTHETIC.json`` of a replica, or None when any folder lacks one.

    Returns ``{"name", "seed", "split_group_counts": {split: {g: n}}}`` with int group keys. For
    Animals the two folders' files are merged (each may hold its own or all groups; equal values
    for a group listed twice are required).
    """
    spec = get_spec(name)
    infos = []
    for folder in spec.folder_paths(root):
        path = folder / SYNTH_INFO
        if not path.is_file():
            return None
        try:
            info = json.loads(path.read_text())
            counts = {
                str(split): {int(g): int(n) for g, n in per.items()}
                for split, per in info["split_group_counts"].items()
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise DatasetError(
                f"{name}: {path} is unreadable or lacks split_group_counts ({err}); rebuild the "
                f"replica: {spec.fix_hint(root)}"
            ) from err
        infos.append((path, info, counts))
    merged: GroupCounts = {}
    for path, _, counts in infos:
        for split, per in counts.items():
            into = merged.setdefault(split, {})
            for g, n in per.items():
                if into.get(g, n) != n:
                    raise DatasetError(
                        f"{name}: {path} gives group {g} of {split} {n} images, another "
                        f"{SYNTH_INFO} gives {into[g]}; rebuild the replica: {spec.fix_hint(root)}"
                    )
                into[g] = n
    first = infos[0][1]
    return {"name": first.get("name"), "seed": first.get("seed"), "split_group_counts": merged}


def ensure_replica(name: str, root: str | Path, build_missing: bool = True, seed: int = 0) -> None:
    """Make sure the replica ``name`` exists under ``<root>/synth``, building it if allowed."""
    from robustbench_fvae.data.synthetic import build_replica, stale_manifest

    spec = get_spec(name)
    stale = stale_manifest(name, root)
    if replica_info(name, root) is not None and stale is None:
        return
    where = ", ".join(str(p) for p in spec.folder_paths(root))
    if not build_missing:
        why = ("built by an older replica builder" if stale else f"{SYNTH_INFO} missing")
        raise DatasetError(f"{name}: no usable replica at {where} ({why}); {spec.fix_hint(root)}")
    # A stale replica is rebuilt as it was made (seed, scale), with this builder's pictures.
    seed, scale = (int(stale.get("seed", seed)), float(stale.get("scale", 1.0))) if stale \
        else (seed, 1.0)
    build_replica(name, Path(root).expanduser(), seed=seed, scale=scale)
    if replica_info(name, root) is None:
        raise DatasetError(
            f"{name}: the replica builder finished but {where} still lacks {SYNTH_INFO}; "
            f"delete {spec.data_dir(root)} and rebuild: {spec.fix_hint(root)}"
        )


# ---------------------------------------------------------------- loading


def load_splits(
    name: str,
    root: str | Path,
    train_transform: Callable | None = None,
    eval_transform: Callable | None = None,
    build_missing: bool = True,
) -> dict[str, GroupSplit]:
    """Load ``{"train", "val", "test"}`` GroupSplits of dataset ``name`` from data root ``root``.

    The train split gets ``train_transform``, val and test get ``eval_transform``. Only paths and
    labels are read here (images are opened lazily by ``GroupSplit.__getitem__``). A missing real
    dataset raises DatasetError with the download command (never a silent download); a missing
    replica is built when ``build_missing`` is true.
    """
    spec = get_spec(name)
    root = Path(root).expanduser()
    if spec.synthetic:
        ensure_replica(name, root, build_missing=build_missing)
    arrays = spec.read(root)
    g = {s: spec.group_index(arrays[s][1], arrays[s][2]) for s in SPLITS}
    populated = {grp.g for grp in spec.groups}
    for s in SPLITS:
        stray = sorted(set(np.unique(g[s]).tolist()) - populated)
        if stray:
            raise DatasetError(
                f"{name}: split {s} has samples in group(s) {stray}, outside the dataset's groups "
                f"{sorted(populated)}; check it with "
                f"`python data_prep/verify.py {name} --root {root}`"
            )
    train_counts = np.bincount(g["train"], minlength=spec.n_groups)
    return {
        s: GroupSplit(
            dataset_name=name,
            split=s,
            paths=arrays[s][0],
            y=arrays[s][1],
            a=arrays[s][2],
            g=g[s],
            class_names=list(spec.class_names),
            attribute_names=list(spec.attribute_names),
            groups=list(spec.groups),
            n_groups=spec.n_groups,
            train_group_counts=train_counts,
            transform=train_transform if s == "train" else eval_transform,
        )
        for s in SPLITS
    }


# ---------------------------------------------------------------- download / manual placement


def _find_source(spec: DatasetSpec, source: Path) -> dict[str, Path]:
    """Map each dataset folder name to the folder of ``source`` that holds its content."""
    found: dict[str, Path] = {}
    if spec.family == "animals":
        for top in spec.folders:
            for cand in (source / top, source if source.name == top else None):
                if cand is not None and (cand / "train").is_dir():
                    found[top] = cand
                    break
        expected = "spuco_birds/ and spuco_dogs/ (each with train/ val/ test/)"
    else:
        key = "metadata.csv" if spec.family == "waterbirds" else celeba.ATTR_CSV
        for cand in (source, source / spec.folders[0]):
            if (cand / key).is_file():
                found[spec.folders[0]] = cand
                break
        expected = f"{key} (the folder itself or a {spec.folders[0]}/ inside it)"
    if not found:
        raise DatasetError(f"{spec.name}: --manual {source} holds no {expected}")
    return found


def _place_wilds_folder(src: Path, dest: Path, copy: bool, marker: str) -> None:
    """Stage a WILDS-layout folder: copy it, or mirror it with one symlink per entry.

    Mirroring lets us add the release marker wilds needs without writing into the user's folder.
    """
    dest.mkdir()
    for entry in sorted(src.iterdir()):
        target = entry
        # The Kaggle CelebA archive nests the images one level deeper:
        # img_align_celeba/img_align_celeba/*.jpg.
        nested = entry / entry.name
        if entry.name == celeba.IMAGE_DIR and nested.is_dir() and not any(entry.glob("*.jpg")):
            target = nested
        if copy:
            if target.is_dir():
                shutil.copytree(target, dest / entry.name)
            else:
                shutil.copy2(target, dest / entry.name)
        else:
            (dest / entry.name).symlink_to(target.resolve(), target_is_directory=target.is_dir())
    if not (dest / marker).exists():
        (dest / marker).write_text("placed by robustbench_fvae data_prep/download.py --manual\n")


def _stage_manual(
    spec: DatasetSpec, source: Path, staging: Path, wanted: list[str], copy: bool
) -> dict[str, Path]:
    """Put the ``wanted`` folders from a user folder into ``staging``; return name → source."""
    source = source.expanduser().resolve()
    if not source.is_dir():
        raise DatasetError(f"{spec.name}: --manual {source} is not a folder")
    found = _find_source(spec, source)
    missing = [w for w in wanted if w not in found]
    if missing:
        raise DatasetError(
            f"{spec.name}: --manual {source} lacks {', '.join(missing)}; it should contain "
            f"{', '.join(spec.folders)}"
        )
    for top in wanted:
        src = found[top]
        if spec.family == "animals":
            if copy:
                shutil.copytree(src, staging / top)
            else:
                (staging / top).symlink_to(src, target_is_directory=True)
        else:
            _place_wilds_folder(src, staging / top, copy, spec.adapter.MARKER)
    return {top: found[top] for top in wanted}


def _relabel(lines: list[str], mapping: dict[Path, Path]) -> list[str]:
    """Show staged paths as the user's paths in messages (the staging folder is deleted)."""
    out = []
    for line in lines:
        for staged, shown in mapping.items():
            line = line.replace(str(staged), str(shown))
        out.append(line)
    return out


def download_dataset(
    name: str,
    root: str | Path,
    manual: str | Path | None = None,
    copy: bool = False,
    seed: int = 0,
    expected: GroupCounts | None = None,
    log: Callable[[str], None] = print,
):
    """Put dataset ``name`` under ``root`` and verify it; return the final VerifyReport.

    Real datasets are downloaded (wilds for Waterbirds/CelebA, the SpuCo tarballs for Animals), or
    taken from ``manual`` (symlinked, or copied with ``copy=True``), into a staging folder under
    ``root``, verified there, and only then moved into place: a failure leaves nothing behind.
    ``synth-*`` names run the replica builder with ``seed``. ``expected`` overrides the group
    counts checked (see :func:`~robustbench_fvae.data.verify.verify_dataset`).
    """
    from robustbench_fvae.data.verify import verify_dataset

    spec = get_spec(name)
    root = Path(root).expanduser().resolve()
    if spec.synthetic:
        if manual is not None:
            raise ValueError(f"{name} is built locally, not downloaded: drop --manual")
        root.mkdir(parents=True, exist_ok=True)
        ensure_replica(name, root, build_missing=True, seed=seed)
        return verify_dataset(name, root, expected=expected)

    root.mkdir(parents=True, exist_ok=True)
    targets = spec.folder_paths(root)
    for t in targets:
        # An empty folder is what a failed wilds download leaves behind: safe to clear.
        if t.is_dir() and not t.is_symlink() and not any(t.iterdir()):
            t.rmdir()
    present = [t for t in targets if t.exists() or t.is_symlink()]
    missing = [t for t in targets if t not in present]
    if not missing:
        report = verify_dataset(name, root, expected=expected)
        if report.ok:
            log(f"{name} is already in place under {root}")
            return report
        raise DatasetError(
            f"{name}: {', '.join(str(p) for p in present)} already exist(s) but fail(s) "
            f"verification ({report.problems[0]}); move it away, then rerun this command"
        )

    staging = Path(tempfile.mkdtemp(prefix=f".staging-{name}-", dir=root))
    try:
        wanted = [t.name for t in missing]
        if manual is not None:
            sources = _stage_manual(spec, Path(manual), staging, wanted, copy)
            shown = {staging / k: v for k, v in sources.items()}
            what = f"the folder given with --manual ({Path(manual).expanduser()})"
        else:
            try:
                if spec.family == "animals":
                    spec.adapter.download_into(staging, tuple(wanted))
                else:
                    spec.adapter.download_into(staging)
            except Exception as err:  # noqa: BLE001 - every failure gets the same clear message
                reason = str(err) or type(err).__name__
                raise DownloadError(
                    f"{name}: download failed ({reason}); nothing was kept "
                    f"under {root}. Manual alternative: {spec.manual_hint.format(root=root)}"
                ) from err
            shown = {staging / w: Path("<downloaded>") / w for w in wanted}
            what = "the downloaded data"
        for t in present:  # let verification see the complete dataset
            (staging / t.name).symlink_to(t.resolve(), target_is_directory=True)
        report = verify_dataset(name, staging, expected=expected)
        if not report.ok:
            problems = _relabel(report.problems, shown)
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise DatasetError(
                f"{name}: {what} fails verification: {'; '.join(problems[:3])}{more}; nothing was "
                f"placed under {root}"
            )
        for t in missing:
            os.replace(staging / t.name, t)
        log(f"{name} placed under {root}: {', '.join(str(t) for t in missing)}")
    finally:
        # rmtree unlinks symlinks without following them: the user's files are never touched.
        shutil.rmtree(staging, ignore_errors=True)
    return verify_dataset(name, root, expected=expected)
