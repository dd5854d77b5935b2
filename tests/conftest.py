"""Test-wide settings: offline hubs before timm is imported, deterministic small CPU runs."""

import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Never the user's backbone cache: one throw-away folder per test session (subprocesses inherit it).
os.environ["RBF_CACHE_DIR"] = tempfile.mkdtemp(prefix="rbf-test-cache-")
atexit.register(shutil.rmtree, os.environ["RBF_CACHE_DIR"], ignore_errors=True)
# wilds starts a PyPI version check in a thread on import; keep tests offline and quiet.
sys.modules.setdefault("outdated", None)

import torch  # noqa: E402

# Tiny test models run fastest on one thread (and do not fight over a busy machine).
torch.set_num_threads(1)
