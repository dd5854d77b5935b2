"""Datasets: the group-split contract, real adapters, offline replicas, transforms, checks.

Public API (what runs, sweeps and notebooks use)::

    load_splits(name, root, train_transform, eval_transform, spurious_strength=None)
        -> {"train"|"val"|"test": GroupSplit}
    counterfactual_splits(name, root, transform=None, spurious_strength=None)
        -> {"core_only"|"background_only"|"background_swapped": GroupSplit}   (replicas: twins of the test split)
    dataset_names() -> list[str]
    data_defaults(name) -> {"augment", "spurious_strength"}
    make_transforms(image_size, mean, std, augment="paper", family=None) -> (train, eval)
    verify_dataset(name, root, strength=None) -> VerifyReport
    download_dataset(name, root, manual=None) -> VerifyReport
"""

from robustbench_fvae.data.base import SPLITS, DatasetError, Group, GroupSplit
from robustbench_fvae.data.download import DownloadError, download_dataset
from robustbench_fvae.data.registry import (
    REGISTRY,
    DatasetSpec,
    check_data_recipe,
    counterfactual_splits,
    data_defaults,
    dataset_names,
    get_spec,
    is_replica,
    load_splits,
    replica_info,
)
from robustbench_fvae.data.transforms import AUGMENT_RECIPES, make_transforms
from robustbench_fvae.data.verify import VerifyReport, verify_dataset

__all__ = [
    "AUGMENT_RECIPES",
    "REGISTRY",
    "SPLITS",
    "DatasetError",
    "DatasetSpec",
    "DownloadError",
    "Group",
    "GroupSplit",
    "VerifyReport",
    "check_data_recipe",
    "counterfactual_splits",
    "data_defaults",
    "dataset_names",
    "download_dataset",
    "get_spec",
    "is_replica",
    "load_splits",
    "make_transforms",
    "replica_info",
    "verify_dataset",
]
