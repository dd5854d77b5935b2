"""Putting a dataset in place: download it, or stage the user's folder (``--manual``), verify it
in a staging folder under the data root, and only then move it into place; replicas are built.

Used by ``data_prep/download.py``. It sits above the registry and the verifier (it imports both,
neither imports it), so the registry stays a plain table of names and layouts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from robustbench_fvae.data import celeba
from robustbench_fvae.data.base import DatasetError
from robustbench_fvae.data.registry import DatasetSpec, GroupCounts, ensure_replica, get_spec
from robustbench_fvae.data.verify import VerifyReport, verify_dataset


class DownloadError(DatasetError):
    """A download failed; nothing was left under the data root. The message gives the manual way."""


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
) -> VerifyReport:
    """Put dataset ``name`` under ``root`` and verify it; return the final VerifyReport.

    Real datasets are downloaded (wilds for Waterbirds/CelebA, the SpuCo tarballs for Animals), or
    taken from ``manual`` (symlinked, or copied with ``copy=True``), into a staging folder under
    ``root``, verified there, and only then moved into place: a failure leaves nothing behind.
    ``synth-*`` names run the replica builder with ``seed``. ``expected`` overrides the group
    counts checked (see :func:`~robustbench_fvae.data.verify.verify_dataset`).
    """
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
