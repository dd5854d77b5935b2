"""Pretrained ViT backbones: the real one through timm, and our small offline one
(docs/backbones.md).

* :data:`REAL_BACKBONE` ``vit_base_patch16_224.orig_in21k`` is google/vit-base-patch16-224-in21k
  in timm (beware the alias ``vit_base_patch16_224_in21k``: a different, AugReg checkpoint).
  Any timm VisionTransformer name works. Weights come from a local file (``weights=FILE``,
  .safetensors or .pth/.pt/.bin, loaded with safetensors or ``torch.load(weights_only=True)``), from
  the local Hugging Face cache, or from the hub when online. Offline without a file this fails
  within about a second with a :class:`BackboneError` that says how to pass ``--weights FILE``.
* :data:`OFFLINE_BACKBONE` ``rbf_vit_offline``: a hybrid timm VisionTransformer for the offline
  replicas (96 px input; patch embedding = a frozen ImageNet MobileNetV2 stem, 6 x 6 tokens;
  width 128, depth 4, 2 heads), see :mod:`robustbench_fvae.stems`. Everything after the stem is
  pretrained by this project on shipped data (:mod:`robustbench_fvae.pretrain`), once per
  machine, into the user cache folder (``$RBF_CACHE_DIR``, default ``~/.cache/robustbench_fvae``);
  it is pretrained on first use if missing.

Every backbone gets a new, freshly initialised classification head of ``num_classes`` outputs
(drawn from torch's global RNG, so a run's seed fixes it).
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

# What names the weights (torch-free, read by the config): backbone_identity. Building them, one
# way only: backbones -> pretrain -> stems (pretrain never imports this module).
from .backbone_identity import (
    OFFLINE_ARCH,
    OFFLINE_BACKBONE,
    OFFLINE_MEAN,
    OFFLINE_STD,
    REAL_BACKBONE,
    WEIGHT_SUFFIXES,
    BackboneError,
    PretrainConfig,
    backbone_digest,
    check_weights_file,
    default_backbone,
    offline_backbone_key,
)
from .pretrain import (
    CACHE_ENV,
    ensure_offline_backbone,
    offline_cache_dir,
    offline_cache_path,
)
from .stems import build_offline_vit

__all__ = [
    "CACHE_ENV", "OFFLINE_ARCH", "OFFLINE_BACKBONE", "OFFLINE_MEAN", "OFFLINE_STD",
    "REAL_BACKBONE", "BackboneError", "DataConfig", "PretrainConfig", "backbone_data_config",
    "backbone_digest", "build_offline_vit", "create_backbone", "default_backbone",
    "ensure_offline_backbone", "offline_backbone_key", "offline_cache_dir", "offline_cache_path",
]

@dataclass(frozen=True)
class DataConfig:
    """What the input pipeline needs: square ``image_size`` in pixels and per-channel RGB
    ``mean``/``std`` of the pretraining normalisation (applied to images scaled to [0, 1])."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def create_backbone(
    name: str,
    num_classes: int,
    *,
    weights: str | Path | None = None,
    data_root: str | Path | None = None,
    cache_dir: str | Path | None = None,
    pretrained: bool = True,
    **model_kwargs,
) -> nn.Module:
    """A timm ``VisionTransformer`` with pretrained weights and a new ``num_classes`` head.

    ``weights``: a local file (.safetensors/.pth/.pt/.bin) to load instead of the hub or the
    offline cache; its classifier (if any) is dropped. ``pretrained=False``: random init (tests).
    ``cache_dir``: the offline backbone's cache folder (default: see
    :func:`~robustbench_fvae.pretrain.offline_cache_dir`); ``data_root`` is accepted for older
    callers and unused (the offline backbone no longer lives under the data root).
    ``model_kwargs`` go to ``timm.create_model`` (e.g. ``img_size=32, depth=2``); the offline
    backbone's shape is fixed and takes none. Errors are one-line :class:`BackboneError`s.
    """
    del data_root
    if int(num_classes) < 1:
        raise BackboneError(f"num_classes must be >= 1, got {num_classes}")
    if weights is not None:
        weights = check_weights_file(weights)
    if name == OFFLINE_BACKBONE:
        if model_kwargs:
            raise BackboneError(
                f"{OFFLINE_BACKBONE} has a fixed architecture {OFFLINE_ARCH}; "
                f"unexpected settings {sorted(model_kwargs)}"
            )
        model = build_offline_vit(0)
        if pretrained:
            path = weights or ensure_offline_backbone(cache_dir=cache_dir)
            _load_offline_weights(model, path)
    else:
        model = _create_timm(name, weights=weights, pretrained=pretrained, **model_kwargs)
    _new_head(model, int(num_classes))
    return model


def backbone_data_config(model: nn.Module) -> DataConfig:
    """Input size and normalisation of a backbone, from its timm ``pretrained_cfg``
    (ViT in21k: mean = std = 0.5; our offline ViT: ImageNet's, those of its CNN stem)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        size = tuple(cfg.get("input_size", (3, 224, 224)))[-2:]
    size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
    if size[0] != size[1]:
        raise BackboneError(f"only square inputs are supported, the backbone expects {size}")
    mean = tuple(float(m) for m in cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(float(s) for s in cfg.get("std", (0.229, 0.224, 0.225)))
    return DataConfig(image_size=int(size[0]), mean=mean, std=std)


# ------------------------------------------------------------------------------ offline backbone


def _load_offline_weights(model: nn.Module, path: Path) -> None:
    state = _read_state_dict(path)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise BackboneError(
            f"weights file {path} does not fit {OFFLINE_BACKBONE}: {_first_line(err)}; rebuild "
            "it with `python -m robustbench_fvae.pretrain --force`"
        ) from err
    missing = [k for k in result.missing_keys if not k.startswith("head.")]
    if missing or result.unexpected_keys:
        raise BackboneError(
            f"weights file {path} does not fit {OFFLINE_BACKBONE}: missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}; rebuild it with "
            "`python -m robustbench_fvae.pretrain --force`"
        )


# ---------------------------------------------------------------------------------- timm models


def _create_timm(name: str, *, weights: Path | None, pretrained: bool, **kwargs) -> nn.Module:
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag
    from timm.models.vision_transformer import VisionTransformer

    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        close = get_close_matches(arch, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise BackboneError(
            f"unknown backbone {name!r}: not {OFFLINE_BACKBONE} and not a timm model name{hint}"
        )
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
        raise BackboneError(
            f"unknown pretrained tag {tag!r} for {arch}; available: {', '.join(tags) or 'none'}"
        ) from None
    cfg = cfg.to_dict() if cfg is not None else {}

    if not pretrained:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    else:
        if weights is None:
            weights = _hub_cached_file(cfg)
        if weights is not None:
            model = _create_from_file(name, weights, cfg, **kwargs)
        else:
            model = _create_from_hub(name, cfg, **kwargs)
    if not isinstance(model, VisionTransformer):
        raise BackboneError(
            f"{name} is a {type(model).__name__}, not a timm VisionTransformer; the adapters "
            "need ViT blocks with a fused qkv projection (e.g. vit_*, deit_*)"
        )
    return model


def _create_from_file(name: str, path: Path, cfg: dict, **kwargs) -> nn.Module:
    """timm's own loader on a local file (pos_embed/patch resampling included), loaded strictly:
    the model is built with the file's head size so that any missing or unexpected key fails."""
    import timm

    classifier = cfg.get("classifier") or "head"
    classifier = classifier[0] if isinstance(classifier, (list, tuple)) else classifier
    shapes = _peek_shapes(path)
    head = shapes.get(f"{classifier}.weight")
    n_file = int(head[0]) if head is not None and len(head) == 2 else 0
    try:
        model = timm.create_model(
            name,
            pretrained=True,
            num_classes=n_file,
            pretrained_cfg_overlay=dict(file=str(path), custom_load=False, num_classes=n_file),
            **kwargs,
        )
    except (RuntimeError, KeyError, ValueError) as err:
        hub = cfg.get("hf_hub_id")
        example = f" (e.g. model.safetensors from https://huggingface.co/{hub})" if hub else ""
        raise BackboneError(
            f"weights file {path} does not fit {name}: {_first_line(err)}; expected a timm-format "
            f"state dict of this architecture{example}"
        ) from err
    return model


def _create_from_hub(name: str, cfg: dict, **kwargs) -> nn.Module:
    import timm

    where = cfg.get("hf_hub_id") or cfg.get("url") or "the hub"
    how = (
        f"download the weights on a machine with internet (e.g. model.safetensors from "
        f"https://huggingface.co/{cfg['hf_hub_id']}) and pass --weights FILE"
        if cfg.get("hf_hub_id") else "pass a local weights file with --weights FILE"
    )
    if not (cfg.get("hf_hub_id") or cfg.get("url")):
        raise BackboneError(f"timm has no pretrained weights for {name}; {how}")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if offline or not _reachable(_weights_host(cfg)):
        reason = "HF_HUB_OFFLINE is set" if offline else f"{_weights_host(cfg)} is unreachable"
        raise BackboneError(
            f"pretrained weights for {name} ({where}) are not cached and {reason}; {how}"
        )
    try:
        return timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
    except Exception as err:  # network/hub errors come in many types; keep the message one line
        raise BackboneError(
            f"could not fetch pretrained weights for {name} from {where}: "
            f"{type(err).__name__}: {_first_line(err)}; {how}"
        ) from err


def _hub_cached_file(cfg: dict) -> Path | None:
    """A weights file for this cfg already in the local Hugging Face cache (no network)."""
    repo = cfg.get("hf_hub_id")
    if not repo:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else []
    names += ["model.safetensors", "pytorch_model.bin"]
    for filename in names:
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str) and Path(found).suffix in WEIGHT_SUFFIXES:
            return Path(found)
    return None


def _weights_host(cfg: dict) -> str:
    if cfg.get("hf_hub_id"):
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        return urlparse(endpoint).hostname or "huggingface.co"
    return urlparse(cfg.get("url", "")).hostname or "huggingface.co"


def _reachable(host: str, port: int = 443, timeout: float = 2.0) -> bool:
    """Can we open a TCP connection to ``host`` within ``timeout`` seconds (DNS included)?

    Without this, huggingface_hub retries for about 46 s before failing on a machine without a
    network; the check runs in a thread so a hanging DNS lookup cannot block either.
    """
    ok = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(ok)


# ------------------------------------------------------------------------------- weight files


def _unwrap(obj: object, path: Path) -> dict:
    """The state dict inside a torch checkpoint (timm's conventions: ``state_dict``/``model``
    wrappers, ``module.`` prefixes from DataParallel)."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BackboneError(f"weights file {path} does not hold a state dict of tensors")
    return {k[7:] if k.startswith("module.") else k: v for k, v in obj.items()}


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict with safetensors or ``torch.load(weights_only=True)`` (no pickled code)."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return _unwrap(torch.load(path, map_location="cpu", weights_only=True), path)
    except BackboneError:
        raise
    except Exception as err:  # safetensors/pickle/zip errors have no common base class
        raise BackboneError(
            f"cannot read weights file {path}: {type(err).__name__}: {_first_line(err)}"
        ) from err


def _peek_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a weights file without keeping it in memory (header or mmap only)."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) checkpoints cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
        return {k: tuple(v.shape) for k, v in _unwrap(obj, path).items()}
    except BackboneError:
        raise
    except Exception as err:
        raise BackboneError(
            f"cannot read weights file {path}: {type(err).__name__}: {_first_line(err)}"
        ) from err


def _new_head(model: nn.Module, num_classes: int) -> None:
    """Replace the classifier by a fresh ``num_classes`` head (truncated normal, std 0.02, zero
    bias, as timm initialises ViT heads), drawn from torch's global RNG."""
    model.reset_classifier(num_classes)
    head = model.get_classifier()
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300] + ("…" if len(text) > 300 else "")
