"""The replicas' default spurious strengths ρ, without torch: data/synthetic.py builds each
replica at its default, and run records written before ρ was recorded are read at it."""

from __future__ import annotations

# The real dataset's own ρ: the share of each class's training images on its majority attribute.
REPLICA_DEFAULT_STRENGTH: dict[str, float] = {
    "synth-waterbirds": 0.95,
    # Real CelebA train: 22880 of 24267 blond faces are female (0.943).
    "synth-celeba": 0.943,
    "synth-animals": 0.952,  # SpuCo: 10000 of 10500 per class on the majority background
}
