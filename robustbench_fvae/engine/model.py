"""A run's model from its resolved config (robustbench_fvae/config/resolve.py): the device, the
model and splits built, and a finished run's model rebuilt from its record."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..backbones import backbone_data_config, create_backbone
from ..config import ConfigError, RunConfig
from ..config.resolve import built_versions
from ..data import get_spec, load_splits, make_transforms
from ..methods.setup import prepare_model
from ..record import view
from ..record.io import RecordError, RecordNotFoundError
from ..stem_cache import cached_splits
from .checkpoint import WEIGHTS_FILE, load_trainable_state


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; "
                          "use --device cpu")
    return torch.device(name)


def build_model_and_data(cfg: RunConfig, device: torch.device, progress: bool = False,
                         log: Callable[[str], None] | None = None):
    """The prepared model and the three splits (transforms set from the backbone). With
    ``cfg.stem_cache == "on"`` the splits yield the frozen stem's cached output and the model
    takes it (stem_cache.py; ``progress``, ``log``: a bar and a line when features are computed
    the first time)."""
    splits = load_splits(cfg.dataset, cfg.data_root,
                         spurious_strength=cfg.train.spurious_strength)
    model = create_backbone(cfg.backbone, splits["train"].num_classes, weights=cfg.weights,
                            data_root=cfg.data_root)
    adapted = prepare_model(model, cfg)
    model.to(device)
    dc = backbone_data_config(model)
    train_tf, eval_tf = make_transforms(dc.image_size, dc.mean, dc.std,
                                        augment=cfg.train.augment, family=cfg.dataset)
    splits["train"].transform = train_tf
    splits["val"].transform = splits["test"].transform = eval_tf
    if cfg.stem_cache == "on":
        folder = get_spec(cfg.dataset).data_dir(cfg.data_root, cfg.train.spurious_strength)
        splits = cached_splits(model, cfg.dataset, folder, splits, progress=progress, log=log)
    return model, splits, adapted


def check_rebuildable(cfg: RunConfig, git_commit: str | None = None) -> None:
    """Raise :class:`RecordError` when this checkout would rebuild a different backbone or
    replica than the one a finished run trained on: its adapter weights would then load into the
    wrong model and every number derived from them (probes, DFR) would be silently wrong.

    Compares the run's recorded ``backbone_digest`` and ``replica_version`` with
    :func:`built_versions`; a record without them (older than both) is refused too, since it
    cannot be checked.
    """
    where = f"commit {git_commit[:12]}" if git_commit else "the code it was trained with"
    for key, current in built_versions(cfg).items():
        recorded = getattr(cfg, key)
        if recorded is None and current is not None:
            raise RecordError(
                f"this run's record has no {key} (it predates it), so its model cannot be "
                f"rebuilt safely with this checkout; rerun it, or check out {where}")
        if recorded != current:
            raise RecordError(
                f"this run trained on {key} {recorded!r}, but this checkout builds {current!r}; "
                f"its weights would load into a different model: rerun it, or check out {where}")


def load_trained_model(run_dir: str | Path, device: str = "cpu"):
    """The trained model of a finished run (selected epoch's weights), its config and splits.

    Refuses (:func:`check_rebuildable`) when this checkout would rebuild another backbone or
    replica than the run trained on. The model is built from the run's seed, as the run built
    it, before the weights load: a method whose frozen parts are random (LoRA-FA's A, say) gets
    them back, since the weights file holds the trained parameters only.

    Returns ``(model, cfg, splits)`` with eval-mode model and transforms set on the splits.
    """
    record = view.load_run(run_dir)
    weights = Path(run_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise RecordNotFoundError(f"{weights} not found: the run has not selected an "
                                  "epoch yet (run it to completion first)")
    cfg = record.run_config
    check_rebuildable(cfg, record.config.get("environment", {}).get("git_commit"))
    model, splits = _build_as_the_run_did(cfg, device)
    load_trainable_state(model, load_file(str(weights)))
    model.eval()
    return model, cfg, splits


def load_initial_model(run_dir: str | Path, device: str = "cpu") -> nn.Module:
    """The model of a run as it was before its first step: rebuilt from the run's config with
    its seed, exactly as the run built it (``torch.manual_seed(seed)`` then
    :func:`build_model_and_data`), in eval mode. For the parameters' displacement and the
    probes' initialisation control."""
    record = view.load_run(run_dir)
    cfg = record.run_config
    check_rebuildable(cfg, record.config.get("environment", {}).get("git_commit"))
    model, _ = _build_as_the_run_did(cfg, device)
    model.eval()
    return model


def _build_as_the_run_did(cfg: RunConfig, device: str):
    """``build_model_and_data`` after ``torch.manual_seed(cfg.train.seed)``, as the training job
    does, leaving the caller's global RNG where it was. Returns ``(model, splits)``."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(cfg.train.seed)
        model, splits, _ = build_model_and_data(cfg, torch.device(device))
    finally:
        torch.random.set_rng_state(state)
    return model, splits
