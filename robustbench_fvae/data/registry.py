"""Dataset registry: names → on-disk layouts and readers; loading splits.

Real datasets live directly under the data root (``<root>/waterbirds_v1.0/``,
``<root>/celebA_v1.0/``, ``<root>/spuco_birds/`` + ``<root>/spuco_dogs/``). The offline replicas
``synth-*`` live under ``<root>/synth/`` in the very same layouts and are read by the very same
adapters; each replica folder also holds a ``SYNTHETIC.json`` written by the replica builder
(:func:`robustbench_fvae.data.synthetic.build_replica`) with its seed, spurious strength and
per-split group counts. A replica at a non-default spurious strength ρ lives under
``<root>/synth/rho-<ρ>/`` (one replica per name, ρ and seed; built on first use).

Counterfactual test images of a replica (core-only and background-only twins of every test
image, the paper's ``x_core`` / ``x_spurious``) are loaded with :func:`counterfactual_splits`.
Checking a dataset on disk is :mod:`~robustbench_fvae.data.verify`, putting one in place
:mod:`~robustbench_fvae.data.download`; both import this module, never the other way round.
"""

from __future__ import annotations

import json
import os
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

    def data_dir(self, root: str | Path, strength: float | None = None) -> Path:
        """The folder that holds this dataset's layout folders: ``root``, or for a replica
        ``root/synth`` (``root/synth/rho-<ρ>`` at a non-default spurious strength ρ)."""
        root = Path(root).expanduser()
        if not self.synthetic:
            check_strength(self.name, strength)
            return root
        from robustbench_fvae.data.synthetic import replica_dir

        return replica_dir(self.name, root, strength)

    def folder_paths(self, root: str | Path, strength: float | None = None) -> list[Path]:
        """The top-level dataset folders under ``root`` (two for Animals)."""
        return [self.data_dir(root, strength) / f for f in self.folders]

    def fix_hint(self, root: str | Path, strength: float | None = None) -> str:
        """The command that puts this dataset in place, for error messages."""
        if self.synthetic:
            return f"build it with `{self.build_command(root, strength)}`"
        return (
            f"get it with `python data_prep/download.py {self.name} --root {root}` "
            f"(with the files already on disk, add `--manual PATH`)"
        )

    def build_command(self, root: str | Path, strength: float | None = None,
                      force: bool = False) -> str:
        """The shell command that builds this replica (synthetic names only)."""
        from robustbench_fvae.data.synthetic import strength_folder

        rho = "" if strength_folder(self.name, strength) is None else \
            f" --spurious-strength {float(strength)}"
        return (f"python data_prep/build_synthetic.py --root {root} --only {self.name}{rho}"
                + (" --force" if force else ""))

    def read(self, root: str | Path, hint: str | None = None, strength: float | None = None):
        """Per split ``(paths, y, a)`` arrays (no image is opened)."""
        return self.adapter.read_arrays(self.data_dir(root, strength), self.name,
                                        hint or self.fix_hint(root, strength))


# Default augmentation recipe per kind of dataset (data/transforms.py explains why).
REAL_AUGMENT = "paper"
SYNTH_AUGMENT = "flip"


def data_defaults(name: str) -> dict[str, str | float | None]:
    """The data recipe a run of ``name`` gets by default: ``{"augment", "spurious_strength"}``
    (``paper`` and None for real datasets; ``flip`` and the real dataset's own ρ for replicas)."""
    spec = get_spec(name)
    if not spec.synthetic:
        return {"augment": REAL_AUGMENT, "spurious_strength": None}
    from robustbench_fvae.data.synthetic import default_strength

    return {"augment": SYNTH_AUGMENT, "spurious_strength": default_strength(name)}


def check_data_recipe(
    name: str, augment: str | None, strength: float | None
) -> tuple[str, float | None]:
    """``(augment, strength)`` with None filled from :func:`data_defaults` and checked; a bad
    value is a one-line ValueError (a real dataset refuses any spurious strength)."""
    from robustbench_fvae.data.synthetic import ReplicaError, resolve_strength
    from robustbench_fvae.data.transforms import check_recipe

    defaults = data_defaults(name)
    check_strength(name, strength)
    augment = check_recipe(defaults["augment"] if augment is None else augment)
    if not get_spec(name).synthetic:
        return augment, None
    try:
        return augment, resolve_strength(name, strength)
    except ReplicaError as err:
        raise ValueError(str(err)) from None


def check_strength(name: str, strength: float | None) -> None:
    """Refuse a spurious strength for a real dataset (its correlation is what was collected)."""
    if strength is not None and not is_replica(name):
        raise ValueError(
            f"--spurious-strength applies to the offline replicas only (synth-*), not to {name}, "
            f"whose correlation is fixed by the released data; drop it or use synth-{name}")


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


def is_replica(name: object) -> bool:
    """Whether ``name`` is a registered offline replica (``synth-*``); False for real datasets
    and for names the registry does not know (callers that need a known name use get_spec)."""
    try:
        return REGISTRY[name].synthetic
    except (KeyError, TypeError):
        return False


# ---------------------------------------------------------------- replicas


def replica_info(name: str, root: str | Path, strength: float | None = None) -> dict | None:
    """The merged ``SYNTHETIC.json`` of a replica, or None when any folder lacks one.

    Returns ``{"name", "seed", "spurious_strength", "counterfactual", "split_group_counts":
    {split: {g: n}}}`` with int group keys; ``spurious_strength`` and ``counterfactual`` are None
    for a replica whose manifest does not state them (hand-made fixtures). For Animals the two
    folders' files are merged (each may hold its own or all groups; equal values for a group
    listed twice are required).
    """
    spec = get_spec(name)
    infos = []
    for folder in spec.folder_paths(root, strength):
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
                f"replica: {spec.fix_hint(root, strength)}"
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
                        f"{SYNTH_INFO} gives {into[g]}; rebuild the replica: "
                        f"{spec.fix_hint(root, strength)}"
                    )
                into[g] = n
    first = infos[0][1]
    return {"name": first.get("name"), "seed": first.get("seed"),
            "spurious_strength": first.get("spurious_strength"),
            "counterfactual": first.get("counterfactual"), "split_group_counts": merged}


def ensure_replica(
    name: str,
    root: str | Path,
    build_missing: bool = True,
    seed: int = 0,
    strength: float | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Make sure the replica ``name`` at spurious strength ``strength`` (None: its default)
    exists under ``<root>/synth``, building it if allowed (and saying where through ``log``)."""
    from robustbench_fvae.data.synthetic import (
        build_replica,
        resolve_strength,
        stale_manifest,
        strength_folder,
    )

    spec = get_spec(name)
    rho = resolve_strength(name, strength)
    stale = stale_manifest(name, root, rho)
    info = replica_info(name, root, rho)
    where = ", ".join(str(p) for p in spec.folder_paths(root, rho))
    if info is not None and stale is None:
        # A hand-made replica may not state ρ; one that does must be the ρ asked for.
        found = info.get("spurious_strength")
        if found is not None and float(found) != rho:
            raise DatasetError(
                f"{name}: the replica at {where} has spurious strength {found}, not {rho}; move "
                f"it away and rebuild: {spec.fix_hint(root, rho)}")
        return
    if not build_missing:
        why = ("built by an older replica builder" if stale else f"{SYNTH_INFO} missing")
        raise DatasetError(f"{name}: no usable replica at {where} ({why}); "
                           f"{spec.fix_hint(root, rho)}")
    # A stale replica is rebuilt as it was made (seed, scale), with this builder's pictures.
    seed, scale = (int(stale.get("seed", seed)), float(stale.get("scale", 1.0))) if stale \
        else (seed, 1.0)
    what = "rebuilding the stale replica" if stale else "building the replica (once)"
    log(f"{name}: {what} with spurious strength {rho} and seed {seed} in "
        f"{spec.data_dir(root, rho)}")
    kwargs = {} if strength_folder(name, rho) is None else {"strength": rho}
    build_replica(name, Path(root).expanduser(), seed=seed, scale=scale, **kwargs)
    if replica_info(name, root, rho) is None:
        raise DatasetError(
            f"{name}: the replica builder finished but {where} still lacks {SYNTH_INFO}; "
            f"delete {spec.data_dir(root, rho)} and rebuild: {spec.fix_hint(root, rho)}"
        )


# ---------------------------------------------------------------- loading


def load_splits(
    name: str,
    root: str | Path,
    train_transform: Callable | None = None,
    eval_transform: Callable | None = None,
    build_missing: bool = True,
    spurious_strength: float | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, GroupSplit]:
    """Load ``{"train", "val", "test"}`` GroupSplits of dataset ``name`` from data root ``root``.

    The train split gets ``train_transform``, val and test get ``eval_transform``. Only paths and
    labels are read here (images are opened lazily by ``GroupSplit.__getitem__``). A missing real
    dataset raises DatasetError with the download command (never a silent download); a missing
    replica is built when ``build_missing`` is true (``log`` says where).
    ``spurious_strength`` picks a replica's ρ (None: its default); a real dataset refuses it.
    """
    spec = get_spec(name)
    root = Path(root).expanduser()
    check_strength(name, spurious_strength)
    if spec.synthetic:
        ensure_replica(name, root, build_missing=build_missing, strength=spurious_strength,
                       log=log)
    arrays = spec.read(root, strength=spurious_strength)
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


def counterfactual_splits(
    name: str,
    root: str | Path,
    transform: Callable | None = None,
    spurious_strength: float | None = None,
) -> dict[str, GroupSplit]:
    """The twins of a replica's test split: core-only and background-only (the paper's
    ``x_core`` / ``x_spurious``) and background-swapped (the object on its class's other
    background): ``{"core_only": GroupSplit, "background_only": GroupSplit,
    "background_swapped": GroupSplit}``.

    All are in the order of ``load_splits(name, root)["test"]``, with the same ``y``, ``a``,
    ``g``, groups and training group counts (``a`` names the background the original image had:
    absent from a core-only image, the only content of a background-only one, replaced by the
    class's other background in a background-swapped one); their
    ``split`` is ``"test/<kind>"``. Items are
    ``(transform(image), y, a)``. The replica must exist already (load_splits builds it); a
    real dataset, or a replica without counterfactual images (hand-made, or built by an older
    builder), raises DatasetError naming the fix.
    """
    from robustbench_fvae.data.synthetic import COUNTERFACTUAL_KINDS, counterfactual_path

    spec = get_spec(name)
    root = Path(root).expanduser()
    if not spec.synthetic:
        raise DatasetError(
            f"{name} has no counterfactual test images: only the offline replicas (synth-*) "
            "render core-only and background-only twins")
    check_strength(name, spurious_strength)
    info = replica_info(name, root, spurious_strength)
    if info is None or not info.get("counterfactual"):
        where = spec.data_dir(root, spurious_strength)
        raise DatasetError(
            f"{name}: the replica under {where} has no counterfactual test images (missing, "
            f"hand-made or built by an older builder); rebuild it with "
            f"`{spec.build_command(root, spurious_strength, force=True)}`")
    arrays = spec.read(root, strength=spurious_strength)
    paths, y, a = arrays["test"]
    folders = spec.folder_paths(root, spurious_strength)
    twins: dict[str, list[Path]] = {kind: [] for kind in COUNTERFACTUAL_KINDS}
    for path in paths:
        folder = next((f for f in folders if _inside(path, f)), None)
        if folder is None:
            raise DatasetError(f"{name}: test image {path} is outside the replica folders "
                               f"{', '.join(map(str, folders))}")
        for kind in COUNTERFACTUAL_KINDS:
            twins[kind].append(counterfactual_path(folder, path, kind))
    g = spec.group_index(y, a)
    train_counts = np.bincount(spec.group_index(*arrays["train"][1:]), minlength=spec.n_groups)
    return {
        kind: GroupSplit(
            dataset_name=name, split=f"test/{kind}", paths=twins[kind], y=y, a=a, g=g,
            class_names=list(spec.class_names), attribute_names=list(spec.attribute_names),
            groups=list(spec.groups), n_groups=spec.n_groups, train_group_counts=train_counts,
            transform=transform)
        for kind in COUNTERFACTUAL_KINDS
    }


def _inside(path: Path, folder: Path) -> bool:
    return Path(os.path.abspath(path)).is_relative_to(os.path.abspath(folder))
