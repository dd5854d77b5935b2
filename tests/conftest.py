"""Test-wide settings: offline hubs before timm is imported, deterministic small CPU runs."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# wilds starts a PyPI version check in a thread on import; keep tests offline and quiet.
sys.modules.setdefault("outdated", None)

import torch  # noqa: E402

# Tiny test models run fastest on one thread (and do not fight over a busy machine).
torch.set_num_threads(1)
