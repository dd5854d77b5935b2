"""A tiny real timm ViT for end-to-end tests, loadable by name in any process.

``register_tiny_vit()`` registers a 32 px, depth-2, width-32 VisionTransformer under a timm model
name with a pretrained config (input size, mean/std), so the runner's ordinary local-file weight
path (``--backbone NAME --weights FILE``) loads it exactly as it loads ViT-B/16. Subprocesses run
``python -c "import tiny_models; tiny_models.main([...])"`` with ``tests/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

TINY_VIT = "rbf_test_tiny_vit"
TINY_ARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def register_tiny_vit() -> str:
    """Register :data:`TINY_VIT` with timm (idempotent) and return its name."""
    import timm
    from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    if timm.list_models(TINY_VIT):
        return TINY_VIT

    def factory(pretrained: bool = False, **kwargs):
        return build_model_with_cfg(VisionTransformer, TINY_VIT, pretrained,
                                    pretrained_filter_fn=checkpoint_filter_fn,
                                    **{**TINY_ARGS, **kwargs})

    # timm's registry reads the default configs from the factory's module.
    module = types.ModuleType(f"{__name__}_registry")
    module.default_cfgs = generate_default_cfgs({f"{TINY_VIT}.test": {
        "url": "", "input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
        "num_classes": 0, "first_conv": "patch_embed.proj", "classifier": "head"}})
    sys.modules[module.__name__] = module
    factory.__name__ = factory.__qualname__ = TINY_VIT
    factory.__module__ = module.__name__
    register_model(factory)
    return TINY_VIT


def save_tiny_weights(path: Path, seed: int = 0, zero: bool = False) -> Path:
    """A weights file standing in for pretrained weights (random init, or all zeros)."""
    import timm
    import torch
    from safetensors.torch import save_file

    register_tiny_vit()
    torch.manual_seed(seed)
    state = timm.create_model(TINY_VIT, pretrained=False, num_classes=0).state_dict()
    if zero:
        state = {k: torch.zeros_like(v) for k, v in state.items()}
    save_file(state, str(path))
    return path


def main(argv: list[str]) -> int:
    """``robustbench_fvae.run`` in this process, with the tiny ViT registered."""
    import torch

    torch.set_num_threads(int(os.environ.get("RBF_TEST_THREADS", "1")))
    register_tiny_vit()
    from robustbench_fvae.run import main as run_main

    return run_main(argv)


if __name__ == "__main__":  # as a script, e.g. under torchrun
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main(sys.argv[1:]))


def make_offline_runs(root: Path, runs, epochs: int = 1) -> dict:
    """Finished runs on a tiny Waterbirds-layout stand-in of ``synth-waterbirds`` (15 train,
    8 val, 12 test images) with the offline ViT architecture loaded from a random local weights
    file, so any process (a notebook kernel, a subprocess) can reload them without registering
    a model. ``runs``: ``(method, seed)`` pairs. Writes ``root/data``, ``root/vit.safetensors``
    and ``root/out``; returns ``{(method, seed): run_dir}``."""
    import torch
    from data_fixtures import make_waterbirds
    from safetensors.torch import save_file
    from threadpoolctl import threadpool_limits

    from robustbench_fvae.backbones import OFFLINE_BACKBONE, build_offline_vit
    from robustbench_fvae.config import config_from_settings
    from robustbench_fvae.training import run

    weights = root / "vit.safetensors"
    if not weights.exists():
        make_waterbirds(root / "data" / "synth", synthetic_name="synth-waterbirds")
        torch.manual_seed(0)
        save_file(build_offline_vit(0).state_dict(), str(weights))
    made = {}
    for method, seed in runs:
        cfg = config_from_settings({
            "method": method, "dataset": "synth-waterbirds", "backbone": OFFLINE_BACKBONE,
            "weights": str(weights), "data_root": str(root / "data"), "out": str(root / "out"),
            "device": "cpu", "num_workers": 0, "rank": 4, "epochs": epochs, "seed": seed,
            "batch_size": 4, "eval_batch_size": 16, "patience": 0})
        with threadpool_limits(1):
            made[(method, seed)] = run(cfg, progress=False, log=lambda _: None).run_dir
    return made
