"""The dataset contract every benchmark dataset follows (WILDS-like, docs/datasets.md).

A *split* is a map-style dataset (what a torch DataLoader reads) of ``(image, y, a)`` items
that also knows its class, attribute and group names, each sample's group index ``g``, and the
training split's group counts (needed for the train-weighted average accuracy). Group indices
follow WILDS where WILDS defines them; ``groups`` lists only the populated groups of the
dataset's definition (Animals: 8 of 16).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("train", "val", "test")


class DatasetError(FileNotFoundError):
    """Data missing, partial or corrupt; the message names the path, what was expected, the fix."""


@dataclass(frozen=True)
class Group:
    """One (label, attribute) group: ``g`` is its index in the dataset's numbering."""

    g: int
    y: int
    a: int
    name: str


class GroupSplit:
    """One split of a group-labelled image dataset: a map-style dataset (``len`` and indexing,
    all a torch DataLoader needs; not a torch subclass, so the data package imports without
    torch and the commands parse their arguments before torch loads).

    Items are ``(image, y, a)``: ``image`` is whatever ``transform`` returns for a PIL RGB image
    (the PIL image itself when ``transform`` is None); ``y`` and ``a`` are Python ints.
    Arrays ``y``, ``a``, ``g`` are int64 of shape (N,). ``train_group_counts`` has shape
    (n_groups,): the number of *training* samples in each group index (0 for unpopulated ones).
    """

    def __init__(
        self,
        *,
        dataset_name: str,
        split: str,
        paths: list[Path],
        y: np.ndarray,
        a: np.ndarray,
        g: np.ndarray,
        class_names: list[str],
        attribute_names: list[str],
        groups: list[Group],
        n_groups: int,
        train_group_counts: np.ndarray,
        transform: Callable | None = None,
    ) -> None:
        if not (len(paths) == len(y) == len(a) == len(g)):
            raise ValueError("paths, y, a and g must have the same length")
        self.dataset_name = dataset_name
        self.split = split
        self.paths = list(paths)
        self.y = np.asarray(y, dtype=np.int64)
        self.a = np.asarray(a, dtype=np.int64)
        self.g = np.asarray(g, dtype=np.int64)
        self.class_names = list(class_names)
        self.attribute_names = list(attribute_names)
        self.groups = list(groups)
        self.n_groups = int(n_groups)
        self.train_group_counts = np.asarray(train_group_counts, dtype=np.int64)
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def group_counts(self) -> np.ndarray:
        """Samples per group index in *this* split, shape (n_groups,)."""
        return np.bincount(self.g, minlength=self.n_groups)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                image = img.convert("RGB")
        except (OSError, ValueError) as err:
            raise DatasetError(
                f"cannot read image {path} of {self.dataset_name}/{self.split}: {err}; "
                f"check the folder with `python data_prep/verify.py {self.dataset_name} --root DIR`"
            ) from err
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.y[index]), int(self.a[index])
