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
from pathlib import Path

from ..record.io import exclusive_lock
from .base import SPLITS
# The recipes and the drawing live in their own modules; their public names are importable from
# here as well (CELEBA_ATTRIBUTES, COUNTS, SPECS, … are re-exported).
from .replica_render import (  # noqa: F401
    CELEBA_ATTRIBUTES,
    MAX_ROTATION,
    SILHOUETTE_SCALE,
    _items,
    _relative_path,
    _render,
    _save_png,
    _write_tables,
)
from .replica_specs import (  # noqa: F401
    COUNTS,
    REPLICAS,
    SPECS,
    STRENGTH_RANGE,
    ReplicaError,
    ReplicaSpec,
    _spec,
    default_strength,
    replica_counts,
    resolve_strength,
    train_counts,
)
from .silhouettes import instance_pools

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
