"""Every run-level default and choice in one table (DomainBed's ``hparams_registry`` in spirit).

What a ``None`` setting becomes is decided here or by the owner this table names: a dataset's
data recipe (``augment``, ``spurious_strength``) is in its spec (robustbench_fvae/data/registry.py),
and a method's learning rate, adapter defaults and search space are registered with the method
(robustbench_fvae/methods/). :func:`robustbench_fvae.config.resolve.resolve_config` reads them all
and nothing else fills a default.
"""

from __future__ import annotations

SELECTION_RULES = ("val_wg", "val_avg")
# Training algorithms of `run`. A derived run (DFR) is made from a finished run by its own
# command and keeps its settings in its own module (robustbench_fvae/dfr.py).
ALGORITHMS = ("erm", "groupdro", "resample", "reweight", "jtt")
GROUPDRO_SAMPLERS = ("natural", "balanced")
DEVICES = ("auto", "cpu", "cuda")  # or cuda:N

# How a run uses the frozen-stem feature cache (robustbench_fvae/stem_cache.py, docs/backbones.md):
# auto is on wherever it applies, which is a replica on the offline backbone with a recipe whose
# views are fixed (the cache holds one feature map per image and view).
STEM_CACHE_CHOICES = ("auto", "on", "off")
CACHEABLE_RECIPES = ("flip", "none")

# What a None epochs / batch_size / eval_batch_size becomes: CPU-sized numbers for the offline
# replicas, the released code's for real data.
SYNTH_DEFAULTS = {"epochs": 5, "batch_size": 64, "eval_batch_size": 256}
REAL_DEFAULTS = {"epochs": 50, "batch_size": 64, "eval_batch_size": 64}

# JTT's (T, λ) from the JTT paper's tuned values (Waterbirds 60 epochs / 100, CelebA 1 / 50;
# Animals is not in the paper: CelebA's); on the CPU-sized replicas (5 epochs by default) one
# identification epoch and λ = 20 keep stage 2 within about 1.5× an ERM run.
JTT_DEFAULTS = {"waterbirds": (60, 100), "celeba": (1, 50), "animals": (1, 50)}
JTT_SYNTH_DEFAULT = (1, 20)
