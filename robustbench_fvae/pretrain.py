"""Pretrain the small offline ViT (``rbf_vit_offline``) on a source task built from shipped data.

    python -m robustbench_fvae.pretrain [--data-root DIR] [--force] [--epochs N] [--seed N]

It plays the role of ImageNet-21k pretraining for the offline replicas. The source task uses the
six animal-mnist classes that no replica uses (Bear, Cow, Elephant, Giraffe, Sheep, Zebra),
pasted on uninformative backgrounds: any shipped texture or photo, random crops, stretches and
tints, with a random foreground colour that contrasts with it, random position, scale, flip and
rotation. Three heads are trained: on the class token, the silhouette class (shape) and, as an
auxiliary task, which texture/photo the background came from (texture and colour statistics);
on every patch token, that patch's object mask (figure/ground). The dense mask loss is what makes
a ViT trained from scratch for a few CPU minutes learn shape features at all.

Images are generated in memory from a fixed seed; training is full fine-tuning in fp32 with
AdamW, warmup and cosine decay. The backbone (without heads) is cached atomically at
``<data_root>/backbones/rbf_vit_offline.safetensors`` with ``rbf_vit_offline.json`` beside it
(source-task held-out accuracy, time, seed, settings). Silhouette instances used for the held-out
accuracy are disjoint from the training ones.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .backbones import OFFLINE_ARCH, OFFLINE_BACKBONE, build_offline_vit, offline_cache_path
from .data.silhouettes import (
    PRETRAIN_CLASSES,
    TEXTURE_SOURCES,
    compose,
    foreground_fill,
    instance_pools,
    load_silhouettes,
    random_background,
    silhouette_alpha,
)
from .records import exclusive_lock

PRETRAIN_VERSION = 1


@dataclass
class PretrainConfig:
    """Settings of the source task and its optimisation (recorded in the JSON beside the cache)."""

    seed: int = 0
    epochs: int = 6
    n_train: int = 7200  # generated training images (balanced over the six classes)
    n_test: int = 1200  # held-out images (held-out silhouette instances)
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_frac: float = 0.1
    label_smoothing: float = 0.1
    texture_weight: float = 0.5  # weight of the auxiliary background-source loss
    mask_weight: float = 10.0  # weight of the per-pixel figure/ground loss on the patch tokens
    max_shift: int = 4  # random translation (pixels) of each training batch


def make_source_images(
    n: int, split: str, seed: int, size: int = 64
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``n`` source-task scenes: uint8 images (n, size, size, 3), class labels (n,) indexing
    :data:`PRETRAIN_CLASSES` (balanced), background-source labels (n,) indexing
    :data:`TEXTURE_SOURCES`, and uint8 object masks (n, size, size) (alpha·255).
    ``split`` is ``train`` or ``test`` (disjoint silhouette instances)."""
    images, _ = load_silhouettes()
    part = {"train": 0, "test": 1}[split]
    pools = [instance_pools(c, seed, (0.9, 0.1))[part] for c in PRETRAIN_CLASSES]
    out = np.empty((n, size, size, 3), np.uint8)
    masks = np.empty((n, size, size), np.uint8)
    classes = np.arange(n) % len(PRETRAIN_CLASSES)
    textures = np.empty(n, np.int64)
    for i in range(n):
        rng = np.random.default_rng([seed, 104729, part, i])
        pool = pools[classes[i]]
        silhouette = images[pool[int(rng.integers(len(pool)))]]
        background, textures[i] = random_background(rng, size, contrast=(0.03, 0.2))
        # The object must stay visible: its tone is chosen against the background's brightness.
        tone = "dark" if background.mean() > 0.45 else "light"
        alpha = silhouette_alpha(rng, silhouette, size, scale=(0.45, 0.8), max_rotation=25.0)
        out[i] = compose(rng, background, alpha, foreground_fill(rng, size, tone))
        masks[i] = (alpha * 255.0 + 0.5).astype(np.uint8)
    return out, classes.astype(np.int64), textures, masks


def _to_input(batch: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) normalised with the backbone's mean = std = 0.5."""
    return (batch.permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5


class _SourceModel(nn.Module):
    """The backbone and three heads: class and background source on the class token, and each
    patch's object mask (patch² pixels) on that patch's token (dense figure/ground supervision,
    which makes a ViT trained from scratch learn shape features several times faster)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = build_offline_vit(0)
        width, patch = OFFLINE_ARCH["embed_dim"], OFFLINE_ARCH["patch_size"]
        self.shape_head = nn.Linear(width, len(PRETRAIN_CLASSES))
        self.texture_head = nn.Linear(width, len(TEXTURE_SOURCES))
        self.mask_head = nn.Linear(width, patch * patch)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits: class (B, 6), background source (B, 16), mask (B, n_patches, patch²)."""
        tokens = self.backbone.forward_features(x)  # (B, 1 + n_patches, width), final norm
        pooled = self.backbone.forward_head(tokens, pre_logits=True)  # class token
        patches = tokens[:, self.backbone.num_prefix_tokens:]
        return self.shape_head(pooled), self.texture_head(pooled), self.mask_head(patches)


def _patch_masks(masks: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W) masks -> float (B, n_patches, patch²) targets in [0, 1], patches in the
    ViT's row-major token order."""
    p = OFFLINE_ARCH["patch_size"]
    b, h, w = masks.shape
    m = masks.float().div(255.0).reshape(b, h // p, p, w // p, p).permute(0, 1, 3, 2, 4)
    return m.reshape(b, (h // p) * (w // p), p * p)


@torch.no_grad()
def _evaluate(model: _SourceModel, x, y, t, masks) -> tuple[float, float, float]:
    """Held-out accuracy of class and background source, and pixel accuracy of the mask."""
    model.eval()
    right_y = right_t = 0
    right_m = 0.0
    for i in range(0, len(x), 256):
        logits_y, logits_t, logits_m = model(_to_input(x[i: i + 256]))
        right_y += int((logits_y.argmax(1) == y[i: i + 256]).sum())
        right_t += int((logits_t.argmax(1) == t[i: i + 256]).sum())
        target = _patch_masks(masks[i: i + 256]) > 0.5
        right_m += float(((logits_m > 0) == target).float().mean(dim=(1, 2)).sum())
    model.train()
    return right_y / len(x), right_t / len(x), right_m / len(x)


def pretrain_offline_backbone(
    data_root: str | Path = "data",
    config: PretrainConfig | None = None,
    *,
    force: bool = False,
    progress: bool = True,
    log=print,
) -> dict:
    """Pretrain and cache the offline backbone; returns the summary written beside the cache.

    If the cache exists and ``force`` is false, nothing is trained and its summary is returned.
    """
    cfg = config or PretrainConfig()
    for name in ("epochs", "n_train", "n_test", "batch_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"pretraining setting {name} must be >= 1, got {getattr(cfg, name)}")
    path = offline_cache_path(data_root)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Parallel sweep jobs that all find the cache missing pretrain it once: the others wait here.
    with exclusive_lock(path.with_name(f".{path.name}.lock")):
        if path.is_file() and not force:
            log(f"{OFFLINE_BACKBONE}: cached at {path} (use --force to pretrain again)")
            try:
                return json.loads(path.with_suffix(".json").read_text())
            except (OSError, ValueError):
                return {"path": str(path)}
        return _pretrain(path, cfg, progress, log)


def _pretrain(path: Path, cfg: PretrainConfig, progress: bool, log) -> dict:
    from tqdm.auto import tqdm

    start, cpu_start = time.perf_counter(), time.process_time()
    torch.manual_seed(cfg.seed)
    size = OFFLINE_ARCH["img_size"]
    x_train, y_train, t_train, m_train = (torch.from_numpy(a) for a in make_source_images(
        cfg.n_train, "train", cfg.seed, size))
    x_test, y_test, t_test, m_test = (torch.from_numpy(a) for a in make_source_images(
        cfg.n_test, "test", cfg.seed, size))
    gen_seconds = time.perf_counter() - start
    log(f"{OFFLINE_BACKBONE}: generated {cfg.n_train} + {cfg.n_test} source images in "
        f"{gen_seconds:.0f}s")

    model = _SourceModel()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "pos_embed" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    steps_per_epoch = math.ceil(cfg.n_train / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    warmup = max(1, int(cfg.warmup_frac * total))

    def lr_at(step: int) -> float:
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(total=total, desc=f"pretraining {OFFLINE_BACKBONE}", unit="step",
               disable=not progress)
    step = 0
    model.train()
    for _epoch in range(cfg.epochs):
        order = torch.randperm(cfg.n_train, generator=gen)
        for i in range(0, cfg.n_train, cfg.batch_size):
            idx = order[i: i + cfg.batch_size]
            x, m = _to_input(x_train[idx]), m_train[idx]
            if cfg.max_shift:
                dx, dy = (int(v) for v in torch.randint(-cfg.max_shift, cfg.max_shift + 1, (2,),
                                                        generator=gen))
                x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
                m = torch.roll(m, shifts=(dy, dx), dims=(1, 2))
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            logits_y, logits_t, logits_m = model(x)
            loss = (
                criterion(logits_y, y_train[idx])
                + cfg.texture_weight * criterion(logits_t, t_train[idx])
                + cfg.mask_weight * nn.functional.binary_cross_entropy_with_logits(
                    logits_m, _patch_masks(m))
            )
            if not torch.isfinite(loss):
                raise FloatingPointError(f"pretraining loss became {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    n = min(cfg.n_test, cfg.n_train)
    train_acc = _evaluate(model, x_train[:n], y_train[:n], t_train[:n], m_train[:n])
    test_acc = _evaluate(model, x_test, y_test, t_test, m_test)
    seconds = time.perf_counter() - start

    summary = {
        "name": OFFLINE_BACKBONE,
        "version": PRETRAIN_VERSION,
        "architecture": dict(OFFLINE_ARCH),
        "parameters": sum(p.numel() for p in model.backbone.parameters()),
        "source_task": {"classes": list(PRETRAIN_CLASSES),
                        "auxiliary_texture_sources": list(TEXTURE_SOURCES)},
        "source_test_acc": round(test_acc[0], 4),
        "source_test_texture_acc": round(test_acc[1], 4),
        "source_test_mask_pixel_acc": round(test_acc[2], 4),
        "source_train_acc": round(train_acc[0], 4),
        "seconds": round(seconds, 1),
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
        "generation_seconds": round(gen_seconds, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "config": asdict(cfg),
    }
    _save_atomic(model.backbone, path, summary)
    log(f"{OFFLINE_BACKBONE}: held-out source accuracy {test_acc[0]:.3f} (6 classes, chance "
        f"0.167; texture {test_acc[1]:.3f}) after {seconds:.0f}s; cached at {path}")
    return summary


def _save_atomic(backbone: nn.Module, path: Path, summary: dict) -> None:
    """Write the JSON, then the weights, each atomically (weights last: they mark 'done')."""
    from safetensors.torch import save

    from .records import write_bytes_atomic, write_json_atomic

    state = {k: v.detach().contiguous() for k, v in backbone.state_dict().items()}
    write_json_atomic(path.with_suffix(".json"), summary)
    # One metadata key only: safetensors orders several keys at random, and the file should be
    # byte-identical across runs with the same seed (the weights are).
    write_bytes_atomic(path, save(state, metadata={"name": OFFLINE_BACKBONE}))


def main(argv: list[str] | None = None) -> int:
    defaults = PretrainConfig()
    parser = argparse.ArgumentParser(
        description="Pretrain the offline ViT backbone on shipped silhouettes and textures.")
    parser.add_argument("--data-root", default="data",
                        help="data root; weights go to DATA_ROOT/backbones/ (default: data)")
    parser.add_argument("--force", action="store_true", help="pretrain again even if cached")
    parser.add_argument("--epochs", type=int, default=defaults.epochs,
                        help=f"epochs over the generated images (default {defaults.epochs})")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help=f"seed of data and training (default {defaults.seed})")
    parser.add_argument("--n-train", type=int, default=defaults.n_train,
                        help=f"generated training images (default {defaults.n_train})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    cfg = PretrainConfig(seed=args.seed, epochs=args.epochs, n_train=args.n_train)
    try:
        pretrain_offline_backbone(args.data_root, cfg, force=args.force, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
