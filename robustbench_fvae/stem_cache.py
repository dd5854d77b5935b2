"""The offline backbone's frozen stem computed once per replica image and view, then reused.

The offline hybrid ViT's patch embedding starts with :class:`~robustbench_fvae.stems.
FrozenMobileNetV2Stem`, whose weights are buffers that nothing trains, and the replicas' only
augmentation (the ``flip`` recipe) is a horizontal flip. So the stem's output for one image is one
of two tensors, the original view's or the flipped view's, for the whole life of the replica.
Recomputing it every step cost more than half of a fine-tuning step (measured: 0.158 s of 0.286 s
per batch of 64 at 96 px, one thread). This module computes it once and stores it beside the
replica; runs then feed the model those features, with the stem switched to pass them through
(``FrozenMobileNetV2Stem.takes_features``).

**Layout.** ``<replica folder>/stem_features/<stem digest>/<dataset>.<split>.<view>.<key>.npy``:
one float32 array (N, C, h, w) per split (``train``, ``val``, ``test``, ``test.core_only``, …)
and view (``original``, ``flipped``: the train split only, when its transform flips), rows in
the split's order. ``<replica folder>`` is the replica's data directory (``data/synth`` or
``data/synth/rho-<ρ>``); ``<stem digest>`` is :func:`stem_digest` of the stem's buffers.
``<key>`` is a digest of everything else the features depend on: the view's transform, the image
paths in order with each file's size and modification time, and the cache format. A rebuilt
replica, another stem, another transform or another image order therefore never reads a stale
file; it computes a new one (and removes the old file of the same dataset, split and view).
Image paths enter the key resolved (symlinks followed), so checkouts that share one replica
folder through a link share its cache instead of removing each other's files.

**Exactness.** The cached path draws the same random flip decision from the same generator as
``torchvision.transforms.RandomHorizontalFlip`` does in the uncached path (one ``torch.rand(1)``
per training item, under the item's seeded augmentation), builds each view with the uncached
path's own transform objects (the flip forced on or left out), and hands the model the stem's
output in the memory format the stem returns. oneDNN gives bit-identical stem outputs for
batches of 64 images or more; smaller batches (an epoch's last partial batch) can differ in the
last bits (about 1e-11 here), which is the only difference between the two paths
(tests/test_stem_cache.py checks features, runs and resume).

When it applies (``stem_cache_unavailable`` in robustbench_fvae/config/resolve.py): a
``synth-*`` replica, the offline backbone, and a training recipe whose only random step is a
horizontal flip (``flip``, ``none``). Runs record ``stem_cache`` (``on``/``off``) in their
config; ``on`` is part of the run hash, so a cached run is never mistaken for an uncached one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from .data.base import GroupSplit
from .data.transforms import CenterCropShortSide
from .record.io import exclusive_lock
from .stems import OFFLINE_BACKBONE, FrozenMobileNetV2Stem

CACHE_DIR = "stem_features"
# Bumped whenever the files' content or naming changes.
FORMAT_VERSION = 1
# Deterministic steps a cached view may contain (besides the flip it forces or leaves out).
_DETERMINISTIC = (T.Resize, T.CenterCrop, CenterCropShortSide, T.ToTensor, T.Normalize)
# Images per stem batch when computing the cache: at >= 64, oneDNN's result does not depend on
# the batch (see the module docstring).
BATCH = 256


class StemCacheError(ValueError):
    """The stem cache cannot serve this run (one-line message naming the fix)."""


def frozen_stem(model: torch.nn.Module) -> FrozenMobileNetV2Stem | None:
    """The model's frozen CNN stem (the offline backbone's ``patch_embed.backbone``), or None."""
    stem = getattr(getattr(model, "patch_embed", None), "backbone", None)
    return stem if isinstance(stem, FrozenMobileNetV2Stem) else None


def stem_digest(stem: torch.nn.Module) -> str:
    """16 hex characters of a SHA-256 over the stem's buffers (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, value in sorted(stem.state_dict().items()):
        value = value.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()[:16]


class ForcedHorizontalFlip:
    """``RandomHorizontalFlip`` with the flip drawn: the same ``TF.hflip`` call, no draw."""

    def __call__(self, image):
        return TF.hflip(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def view_transforms(transform: Callable) -> tuple[dict[str, Callable], bool]:
    """The fixed views of a transform made of deterministic steps and at most one
    ``RandomHorizontalFlip``: ``({"original": …[, "flipped": …]}, draws_flip)``. Anything else
    is a :class:`StemCacheError`."""
    steps = list(getattr(transform, "transforms", [transform]))
    flips = [i for i, step in enumerate(steps) if isinstance(step, T.RandomHorizontalFlip)]
    others = [step for step in steps if not isinstance(step, T.RandomHorizontalFlip)]
    unknown = [type(step).__name__ for step in others if not isinstance(step, _DETERMINISTIC)]
    if unknown or len(flips) > 1:
        raise StemCacheError(f"the stem cache holds fixed views, but this transform has random "
                             f"or unknown steps {unknown or ['two flips']}; use --stem-cache off")
    views: dict[str, Callable] = {"original": T.Compose(others)}
    if flips:
        forced = list(steps)
        forced[flips[0]] = ForcedHorizontalFlip()
        views["flipped"] = T.Compose(forced)
    return views, bool(flips)


def _split_fields(split: GroupSplit) -> dict:
    """The constructor arguments of ``split`` other than its transform."""
    return dict(dataset_name=split.dataset_name, split=split.split, paths=split.paths,
                y=split.y, a=split.a, g=split.g, class_names=split.class_names,
                attribute_names=split.attribute_names, groups=split.groups,
                n_groups=split.n_groups, train_group_counts=split.train_group_counts)


class StemFeatureSplit(GroupSplit):
    """A split whose items are the stem's precomputed output ``(features (C, h, w), y, a)``.

    ``views`` maps a view name to its ``.npy`` file (rows in the split's order), opened
    memory-mapped on first use in each process (loader workers share the pages). With
    ``draws_flip`` each item draws ``torch.rand(1) < flip_p`` exactly as the uncached
    ``RandomHorizontalFlip`` does and reads the flipped view when it is true.
    """

    def __init__(self, split: GroupSplit, views: dict[str, Path], draws_flip: bool,
                 flip_p: float, source_transform: Callable, cache: StemFeatureCache) -> None:
        super().__init__(**_split_fields(split), transform=None)
        self.view_files = dict(views)
        self.draws_flip, self.flip_p = draws_flip, float(flip_p)
        # The image transform the features stand for (twins of this split use it too).
        self.source_transform = source_transform
        self.cache = cache
        self._arrays: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_arrays"] = {}  # reopened in the worker, never pickled
        return state

    def view(self, name: str) -> np.ndarray:
        """The memory-mapped (N, C, h, w) array of one view."""
        if name not in self._arrays:
            self._arrays[name] = np.load(self.view_files[name], mmap_mode="r")
        return self._arrays[name]

    def __getitem__(self, index: int):
        view = "original"
        if self.draws_flip and bool(torch.rand(1) < self.flip_p):
            view = "flipped"
        features = torch.from_numpy(np.array(self.view(view)[index]))
        return features, int(self.y[index]), int(self.a[index])


class StemFeatureCache:
    """Computes and finds the stem features of one replica's splits (see the module docstring).

    ``folder``: the replica's data directory; ``progress``: a bar while computing; ``log``:
    where the one line announcing each computation goes (None: nowhere).
    """

    def __init__(self, stem: FrozenMobileNetV2Stem, dataset: str, folder: str | Path,
                 progress: bool = False, log: Callable[[str], None] | None = None) -> None:
        self.stem, self.dataset, self.progress, self.log = stem, dataset, progress, log
        self.digest = stem_digest(stem)
        self.root = Path(folder) / CACHE_DIR / self.digest

    def wrap(self, split: GroupSplit, transform: Callable, name: str | None = None
             ) -> StemFeatureSplit:
        """``split`` read from the cache as ``transform`` would have made its images, computing
        any view that is missing. ``name`` names the split's files (default: ``split.split``
        with ``/`` as ``.``)."""
        views, draws_flip = view_transforms(transform)
        flip_p = next((s.p for s in getattr(transform, "transforms", [])
                       if isinstance(s, T.RandomHorizontalFlip)), 0.0)
        name = (name or split.split).replace("/", ".")
        files = {view: self._ensure(split, f"{name}.{view}", tf) for view, tf in views.items()}
        return StemFeatureSplit(split, files, draws_flip, flip_p, transform, self)

    def _key(self, split: GroupSplit, transform: Callable) -> str:
        stats = []
        for path in split.paths:
            st = os.stat(path)
            # realpath: a second checkout reaching the same replica through a symlink must name
            # the same files, or each would remove the other's as stale while it is in use.
            stats.append([os.path.realpath(path), st.st_size, st.st_mtime_ns])
        text = json.dumps({"format": FORMAT_VERSION, "stem": self.digest,
                           "transform": repr(transform), "images": stats})
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _ensure(self, split: GroupSplit, label: str, transform: Callable) -> Path:
        prefix = f"{self.dataset}.{label}."
        path = self.root / f"{prefix}{self._key(split, transform)}.npy"
        if path.is_file():
            return path
        self.root.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.root / f".{prefix}lock"):  # parallel runs compute it once
            if not path.is_file():
                if self.log is not None:
                    self.log(f"{self.dataset}: computing the frozen stem's features of "
                             f"{label} ({len(split)} images) once, into {self.root}")
                self._compute(split, transform, path)
                for old in self.root.glob(f"{prefix}*.npy"):
                    if old != path:
                        old.unlink(missing_ok=True)
        return path

    @torch.inference_mode()
    def _compute(self, split: GroupSplit, transform: Callable, path: Path) -> None:
        from .progress import progress_bar

        source = GroupSplit(**_split_fields(split), transform=transform)
        # A generator of its own: a loader without one draws its base seed from the global RNG,
        # which would shift the run's dropout stream whenever the cache is computed.
        loader = torch.utils.data.DataLoader(source, batch_size=BATCH, shuffle=False,
                                             num_workers=0, generator=torch.Generator())
        was_on, self.stem.takes_features = self.stem.takes_features, False
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        out = None
        try:
            start = 0
            bar = progress_bar(loader, desc=f"stem features {path.name.rsplit('.', 2)[0]}",
                               unit="batch", disable=not self.progress, leave=False)
            for images, _, _ in bar:
                features = self.stem(images).contiguous().numpy()
                if out is None:
                    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                                    shape=(len(source), *features.shape[1:]))
                out[start:start + len(features)] = features
                start += len(features)
            if out is None:
                raise StemCacheError(f"{split.dataset_name} {split.split} has no images to cache")
            out.flush()
            del out
            os.replace(tmp, path)
        finally:
            self.stem.takes_features = was_on
            tmp.unlink(missing_ok=True)


def feed_stem_features(model: torch.nn.Module, on: bool = True) -> None:
    """Make the model read precomputed stem features (``on``) or images."""
    stem = frozen_stem(model)
    if stem is None:
        raise StemCacheError("this model has no frozen stem to feed features to")
    stem.takes_features = on


def cached_splits(model: torch.nn.Module, dataset: str, folder: str | Path,
                  splits: dict[str, GroupSplit], progress: bool = False,
                  log: Callable[[str], None] | None = None) -> dict[str, StemFeatureSplit]:
    """Every split of ``splits`` read from the stem cache with its own transform, the model
    switched to take features. ``folder``: the replica's data directory; ``progress`` and
    ``log`` as for :class:`StemFeatureCache`."""
    stem = frozen_stem(model)
    if stem is None:
        raise StemCacheError("the stem cache needs a model with a frozen stem "
                             f"({OFFLINE_BACKBONE}); use --stem-cache off")
    cache = StemFeatureCache(stem, dataset, folder, progress=progress, log=log)
    out = {name: cache.wrap(split, split.transform, name) for name, split in splits.items()}
    feed_stem_features(model)
    return out


def counterfactual_inputs(dataset: str, root: str | Path, test: GroupSplit,
                          spurious_strength: float | None) -> dict[str, GroupSplit]:
    """The replica's counterfactual twins of ``test`` (``data.counterfactual_splits``) as the
    model reads ``test``: images through its transform, or, for a :class:`StemFeatureSplit`,
    stem features from the same cache."""
    from .data import counterfactual_splits

    if not isinstance(test, StemFeatureSplit):
        return counterfactual_splits(dataset, root, transform=test.transform,
                                     spurious_strength=spurious_strength)
    twins = counterfactual_splits(dataset, root, transform=None,
                                  spurious_strength=spurious_strength)
    return {kind: test.cache.wrap(twin, test.source_transform) for kind, twin in twins.items()}
