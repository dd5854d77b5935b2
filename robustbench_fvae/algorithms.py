"""Training algorithms, orthogonal to the adapter method: which training images each epoch visits
and how their task losses combine into one objective (docs/design.md, Metrics).

* ``erm`` — a seeded permutation of the training split per epoch; mean cross-entropy.
* ``reweight`` — ERM's order; each image's cross-entropy weighted by ``w_g ∝ 1/n_g`` (n_g = its
  group's training count), normalised so that the weights of the populated groups sum to their
  number: the loss is ``mean_i w_{g_i}·CE_i``.
* ``resample`` — as many images per epoch as ERM, drawn with replacement with probability
  ``∝ 1/n_{g_i}`` (every group equally likely in expectation); mean cross-entropy.
* ``groupdro`` — online GroupDRO (Sagawa et al., ICLR 2020, Algorithm 1 as in its released code):
  per step, ``ℓ_g`` = mean cross-entropy of group g over the (global) batch; for the groups present
  ``q_g ← q_g·exp(η·(ℓ_g + C/√n_g))`` then ``q ← q/Σq``; the loss is ``Σ_g q_g·ℓ_g``. η =
  ``groupdro_eta`` (0.01), C = ``groupdro_adjustment`` (0: off), and the order is ERM's or, with
  ``groupdro_sampler=balanced``, the group-balanced draw of ``resample`` (the released code's
  ``--reweight_groups``). Groups absent from a batch keep their weight (the released code
  multiplies them by exp(0) = 1 when C = 0).
* ``jtt`` — Just Train Twice (Liu et al., ICML 2021): stage 1 is an ordinary ERM run of
  ``jtt_epochs`` epochs (its own run record, shared by every JTT run of the same settings); its
  final-epoch model's misclassified training images form the error set E; stage 2 trains from
  the same initial weights on an epoch made of every training image once plus every image of E
  ``jtt_upweight`` more times (each error image is seen λ+1 times per epoch, with λ =
  ``jtt_upweight``: the original code's upsampling), with mean cross-entropy.

GroupDRO's weights and JTT's error set are part of the checkpoint (and JTT's error set a file of
the run record), so a killed run resumes to the same numbers. Group labels of the *training*
split are used by reweight, resample, groupdro; JTT uses none in training (it uses validation
group labels only if the selection rule does).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from .config import ConfigError, TrainConfig
from .distributed import SINGLE_PROCESS, Distributed
from .record.schema import JTT_ERROR_FILE as JTT_ERROR_FILE  # declared with the record files

# What a table says about the group labels an algorithm trains with.
GROUP_LABELS_IN_TRAINING = {"erm": None, "jtt": None, "reweight": "train", "resample": "train",
                            "groupdro": "train"}


def inverse_count_weights(counts: np.ndarray) -> np.ndarray:
    """Per-group weights ∝ 1/n_g over the populated groups (0 elsewhere), summing to their
    number. ``counts``: (n_groups,) training counts."""
    counts = np.asarray(counts, dtype=np.float64)
    weights = np.zeros_like(counts)
    populated = counts > 0
    weights[populated] = 1.0 / counts[populated]
    return weights * populated.sum() / weights.sum()


def seeded_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """Epoch ``epoch``'s order of ``n`` items, a permutation seeded by ``(seed, epoch)``."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def balanced_draw(g: np.ndarray, counts: np.ndarray, seed: int, epoch: int) -> list[int]:
    """``len(g)`` indices drawn with replacement, each with probability ∝ 1/n_{g_i}."""
    weights = torch.as_tensor(inverse_count_weights(counts)[g], dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 7_777_777)
    return torch.multinomial(weights, len(g), replacement=True, generator=generator).tolist()


class TrainingAlgorithm:
    """ERM; subclasses change the epoch's order, the task loss, or both.

    ``g``: (N,) group index of every training image; ``counts``: (n_groups,) training counts.
    """

    name = "erm"

    def __init__(self, t: TrainConfig, g: np.ndarray, counts: np.ndarray,
                 dist: Distributed = SINGLE_PROCESS) -> None:
        self.t, self.g, self.counts, self.dist = t, np.asarray(g), np.asarray(counts), dist

    def epoch_order(self, epoch: int) -> list[int]:
        """The training indices of epoch ``epoch`` in visiting order (repeats allowed)."""
        return seeded_permutation(len(self.g), self.t.seed, epoch)

    def epoch_length(self) -> int:
        return len(self.g)

    def task_loss(self, logits: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The objective's task part for one (local) batch; logits (B, K), y and g (B,)."""
        return nn.functional.cross_entropy(logits.float(), y)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def summary(self) -> dict:
        """What the history records of the algorithm's state after an epoch (JSON-able)."""
        return {}


class Reweight(TrainingAlgorithm):
    name = "reweight"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weights = torch.as_tensor(inverse_count_weights(self.counts), dtype=torch.float32)

    def task_loss(self, logits, y, g):
        per_image = nn.functional.cross_entropy(logits.float(), y, reduction="none")
        return (self.weights.to(per_image.device)[g] * per_image).mean()


class Resample(TrainingAlgorithm):
    name = "resample"

    def epoch_order(self, epoch: int) -> list[int]:
        return balanced_draw(self.g, self.counts, self.t.seed, epoch)


class GroupDRO(TrainingAlgorithm):
    name = "groupdro"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        populated = torch.as_tensor(self.counts > 0)
        self.q = populated.double() / populated.sum()
        counts = torch.as_tensor(self.counts, dtype=torch.float64)
        self.adjustment = torch.where(populated, self.t.groupdro_adjustment /
                                      counts.clamp(min=1).sqrt(), torch.zeros_like(counts))

    def epoch_order(self, epoch: int) -> list[int]:
        if self.t.groupdro_sampler == "balanced":
            return balanced_draw(self.g, self.counts, self.t.seed, epoch)
        return super().epoch_order(epoch)

    def task_loss(self, logits, y, g):
        n_groups = len(self.counts)
        per_image = nn.functional.cross_entropy(logits.float(), y, reduction="none")
        one_hot = nn.functional.one_hot(g, n_groups).to(per_image.dtype)  # (B, G)
        local_sums = one_hot.T @ per_image  # (G,), carries the gradient
        # Group means over the global batch: counts and (detached) sums summed over the ranks.
        counts = self.dist.all_reduce_sum(one_hot.sum(0).detach().double())
        sums = self.dist.all_reduce_sum(local_sums.detach().double())
        present = counts > 0
        group_loss = torch.where(present, sums / counts.clamp(min=1), torch.zeros_like(sums))
        q = self.q.to(group_loss.device)
        step = torch.where(present, self.t.groupdro_eta * (group_loss + self.adjustment.to(
            group_loss.device)), torch.zeros_like(group_loss))
        q = q * torch.exp(step)
        q = q / q.sum()
        self.q = q.cpu()
        # Σ_g q_g·ℓ_g with ℓ_g over the global batch; DDP averages gradients over the K ranks,
        # hence the factor K on each rank's share.
        weights = torch.where(present, q / counts.clamp(min=1), torch.zeros_like(q))
        return self.dist.world_size * (weights.to(local_sums.dtype) * local_sums).sum()

    def state_dict(self) -> dict:
        return {"q": self.q.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.q = state["q"].clone().double()

    def summary(self) -> dict:
        return {"q": [round(float(v), 6) for v in self.q]}


class JTT(TrainingAlgorithm):
    name = "jtt"

    def __init__(self, *args, error_set: list[int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.error_set = sorted(int(i) for i in error_set)

    def epoch_length(self) -> int:
        return len(self.g) + self.t.jtt_upweight * len(self.error_set)

    def epoch_order(self, epoch: int) -> list[int]:
        items = list(range(len(self.g))) + self.error_set * self.t.jtt_upweight
        return [items[i] for i in seeded_permutation(len(items), self.t.seed, epoch)]

    def summary(self) -> dict:
        return {"error_set_size": len(self.error_set)}


def make_algorithm(t: TrainConfig, g: np.ndarray, counts: np.ndarray,
                   dist: Distributed = SINGLE_PROCESS,
                   error_set: Callable[[], list[int]] | None = None) -> TrainingAlgorithm:
    """The algorithm ``t.algorithm`` for a training split with groups ``g`` and ``counts``.
    ``error_set``: for JTT, returns stage 1's error set (training indices)."""
    classes = {cls.name: cls for cls in (TrainingAlgorithm, Reweight, Resample, GroupDRO, JTT)}
    if t.algorithm == "jtt":
        if error_set is None:
            raise ConfigError("jtt needs its stage-1 error set")
        return JTT(t, g, counts, dist, error_set=error_set())
    return classes[t.algorithm](t, g, counts, dist)
