"""Data loading and evaluation of a model on a split: seeded augmentation, loaders, predictions,
the metrics of a split and the replicas' counterfactual metrics."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from ..config import (
    RunConfig,
)
from ..data import (
    is_replica,
)
from ..data.base import GroupSplit
from ..distributed import SINGLE_PROCESS, Distributed
from ..metrics import (
    EmptyGroupError,
    counterfactual_record,
    evaluate_split,
)
from ..stem_cache import counterfactual_inputs
from .checkpoint import load_trainable_state


class SeededAugmentation(torch.utils.data.Dataset):
    """A training split read by ``(position, index)`` keys: item ``index`` at ``position`` of
    epoch ``e``'s order, its random augmentation seeded by ``(seed, e, position)`` — the same in
    any worker, after any resume, and different for two visits of one image (resampling, JTT).
    Yields ``(image, y, g)``."""

    def __init__(self, split: GroupSplit, seed: int) -> None:
        self.split, self.seed, self.epoch = split, seed, 0

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int]):
        position, index = key
        seed = np.random.SeedSequence([self.seed, self.epoch, int(position)]).generate_state(1)[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            image, y, _ = self.split[index]
        return image, y, int(self.split.g[index])


def make_loader(dataset, indices: list[int], batch_size: int, workers: int,
                device: torch.device, seed: int = 0) -> torch.utils.data.DataLoader:
    """A loader over ``indices`` in that order. It has its own generator (seeded by ``seed``):
    a DataLoader without one draws its base seed from the global RNG each time it is iterated,
    which would shift the model's dropout stream when a resumed run builds a mid-epoch loader."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=indices, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=False,
        generator=torch.Generator().manual_seed(int(seed)),
    )


@torch.inference_mode()
def predict(model: nn.Module, split: GroupSplit, batch_size: int, workers: int,
            device: torch.device, dist: Distributed = SINGLE_PROCESS
            ) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (N, K) float32 and predictions (N,) for a whole split, in order.

    Under data parallelism each rank predicts its shard and the rows are gathered back into
    dataset order on every rank.
    """
    model.eval()
    indices = dist.shard(list(range(len(split))))
    probs = [torch.zeros(0, split.num_classes)]
    for images, _, _ in make_loader(split, indices, batch_size, workers, device):
        with autocast(device):
            logits = model(images.to(device, non_blocking=True))
        probs.append(torch.softmax(logits.float(), dim=-1).cpu())
    prob = dist.gather_rows(indices, torch.cat(probs).numpy(), len(split))
    return prob, prob.argmax(1)


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def evaluate(model, split: GroupSplit, batch_size: int, workers: int, device: torch.device,
             dist: Distributed = SINGLE_PROCESS) -> tuple[dict, np.ndarray, np.ndarray]:
    prob, pred = predict(model, split, batch_size, workers, device, dist)
    metrics = evaluate_split(split.y, split.a, split.g, pred, prob, split.groups,
                             split.train_group_counts)
    return metrics, prob, pred


def evaluate_counterfactual(model: nn.Module, cfg: RunConfig, test: GroupSplit, weights: Path,
                            batch_size: int, workers: int, device: torch.device,
                            dist: Distributed = SINGLE_PROCESS) -> dict | None:
    """Core-only accuracy, background reliance and background-swapped accuracy
    (metrics.counterfactual_metrics) of the selected epoch's weights (``weights``) on the
    replica's counterfactual test images; None for a real dataset or a replica without them (a
    hand-made test fixture). The model keeps the selected weights afterwards."""
    if not is_replica(cfg.dataset):
        return None
    try:
        twins = counterfactual_inputs(cfg.dataset, cfg.data_root, test,
                                      cfg.train.spurious_strength)
    except FileNotFoundError:  # DatasetError: no counterfactual images in this replica
        return None
    dist.barrier()  # rank 0 wrote the selected weights
    load_trainable_state(model, load_file(str(weights)))
    probs = {kind: predict(model, twin, batch_size, workers, device, dist)[0]
             for kind, twin in twins.items()}
    return counterfactual_record(twins, probs, test.attribute_names)


def check_eval_groups(splits: dict[str, GroupSplit]) -> None:
    for name in ("val", "test"):
        counts = splits[name].group_counts()
        empty = [g.name for g in splits[name].groups if counts[g.g] == 0]
        if empty:
            raise EmptyGroupError(
                f"{splits[name].dataset_name} {name} split has no sample in group(s) {empty}: "
                "worst-group accuracy is undefined; check the data with data_prep/verify.py")


def penultimate_features(model: nn.Module, split: GroupSplit, *, batch_size: int, device,
                         num_workers: int = 0) -> np.ndarray:
    """The input of ``model``'s classifier head for every image of ``split`` in order: (N, D)
    float32, what a last-layer derived run (DFR) refits on. Float32 even on CUDA (no autocast):
    a retrained head deserves exact features."""
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise ValueError(f"{type(model).__name__} has no forward_features/forward_head: the "
                         "penultimate features are read from a timm model")
    loader = torch.utils.data.DataLoader(split, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers,
                                         pin_memory=torch.device(device).type == "cuda")
    model.eval()
    chunks = [np.zeros((0, model.num_features), dtype=np.float32)]
    with torch.inference_mode():
        for images, _, _ in loader:
            x = model.forward_features(images.to(device, non_blocking=True))
            chunks.append(model.forward_head(x, pre_logits=True).float().cpu().numpy())
    return np.concatenate(chunks)
