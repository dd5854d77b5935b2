"""Datasets: the group-split contract, real adapters, offline replicas, transforms, checks.

Public API (what runs, sweeps and notebooks use)::

    load_splits(name, root, train_transform, eval_transform) -> {"train"|"val"|"test": GroupSplit}
    dataset_names() -> list[str]
    make_transforms(image_size, mean, std) -> (train_transform, eval_transform)
    verify_dataset(name, root) -> VerifyReport
    download_dataset(name, root, manual=None) -> VerifyReport
"""

from robustbench_fvae.data.base import SPLITS, DatasetError, Group, GroupSplit
from robustbench_fvae.data.registry import (
    REGISTRY,
    DatasetSpec,
    DownloadError,
    dataset_names,
    download_dataset,
    get_spec,
    load_splits,
    replica_info,
)
from robustbench_fvae.data.transforms import make_transforms
from robustbench_fvae.data.verify import VerifyReport, verify_dataset

__all__ = [
    "REGISTRY",
    "SPLITS",
    "DatasetError",
    "DatasetSpec",
    "DownloadError",
    "Group",
    "GroupSplit",
    "VerifyReport",
    "dataset_names",
    "download_dataset",
    "get_spec",
    "load_splits",
    "make_transforms",
    "replica_info",
    "verify_dataset",
]
