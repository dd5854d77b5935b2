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
