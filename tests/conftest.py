"""Test-wide settings: offline hubs before timm is imported, deterministic small CPU runs."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# wilds starts a PyPI version check in a thread on import; keep tests offline and quiet.
sys.modules.setdefault("outdated", None)

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
