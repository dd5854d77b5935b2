"""Pretrain the offline hybrid ViT (``rbf_vit_offline``) on a source task built from shipped data.

    python -m robustbench_fvae.pretrain [--cache-dir DIR] [--force] [--epochs N] [--seed N]

It plays the role of ImageNet-21k pretraining for the offline replicas
(docs/backbones.md). The backbone
is a small timm ViT whose patch embedding is a *frozen* ImageNet MobileNetV2 stem
(:mod:`robustbench_fvae.stems`); what is pretrained here is everything after the stem: the 1x1
projection to tokens, the position embedding, the class token, the transformer blocks (where the
adapters go) and the final norm.

Source task: all ten animal-mnist classes, each pasted on a background of any family (land,
water, indoor, outdoor, light, dark, or any shipped texture/photo) drawn independently of the
class, with random position, scale, flip, rotation and a foreground tone that contrasts with the
background. So the source data holds the replicas' concepts but not their correlations, as
ImageNet-21k holds birds and water but not Waterbirds' pairing of them. The four replica classes
(Bird, Cat, Dog, Horse) use only :func:`reserved_source_instances`, a fixed set of silhouettes
that the replica builder must leave out of every replica split (see docs/backbones.md). Three
losses: the class on the class token and on the mean of the patch tokens; the background family
(auxiliary, so the final features keep the spurious cue as in21k features keep the background);
and each token's object mask (dense figure/ground supervision).

The stem is frozen, so its features are computed once for all source images; training then runs
on the cached features, in fp32 with AdamW, warmup and cosine decay, on the CPU (deterministic for
a seed). The backbone is cached once per machine in the user cache folder
(:func:`offline_cache_dir`: ``--cache-dir``, else ``$RBF_CACHE_DIR``, else
``$XDG_CACHE_HOME/robustbench_fvae`` or ``~/.cache/robustbench_fvae``) as
``rbf_vit_offline-<key>.safetensors`` with a JSON summary beside it; the key is a digest of
everything that determines the weights (:func:`offline_backbone_key`), so a changed recipe gets a
new file and a new run hash, and never a stale one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .backbone_identity import (
    OFFLINE_ARCH,
    OFFLINE_BACKBONE,
    OFFLINE_MEAN,
    OFFLINE_STD,
    OFFLINE_STEM_BLOCKS,
    PRETRAIN_VERSION,
    PretrainConfig,
    offline_arch_summary,
    offline_backbone_key,
)
from .cli import EXIT_OK, ArgumentParser, command
from .data.silhouettes import (
    FAMILIES,
    REPLICA_CLASSES,
    RESERVED_PER_CLASS,
    SILHOUETTE_CLASSES,
    class_index,
    compose,
    foreground_fill,
    load_silhouettes,
    render_background,
    reserved_source_instances,
    silhouette_alpha,
)
from .record.io import exclusive_lock
from .stems import (
    FrozenMobileNetV2Stem,
    build_offline_vit,
)

CACHE_ENV = "RBF_CACHE_DIR"
SOURCE_SIZE = 64  # source scenes are drawn at the replicas' resolution, then resized like them
MASK_CELLS = 4  # figure/ground targets per token: a MASK_CELLS x MASK_CELLS grid of its area


# ------------------------------------------------------------------------------ cache


def offline_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """The user cache folder: ``cache_dir``, else ``$RBF_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/robustbench_fvae``, else ``~/.cache/robustbench_fvae``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "robustbench_fvae"


def offline_cache_path(data_root: str | Path | None = None, *, cache_dir: str | Path | None = None,
                       config: PretrainConfig | None = None) -> Path:
    """Where the offline backbone of these settings is cached (see :func:`offline_cache_dir`).

    ``data_root`` is accepted for callers written when the cache lived under the data root and is
    ignored: the backbone does not depend on the data.
    """
    del data_root
    key = offline_backbone_key(config)
    return offline_cache_dir(cache_dir) / f"{OFFLINE_BACKBONE}-{key}.safetensors"


def ensure_offline_backbone(data_root: str | Path | None = None, *,
                            cache_dir: str | Path | None = None, progress: bool = True,
                            config: PretrainConfig | None = None) -> Path:
    """Path of the cached offline backbone; pretrains it first if the cache is missing.

    Pretraining runs with its own fixed seed inside :func:`torch.random.fork_rng`, so whether it
    happened does not change the caller's random stream (same run seed -> same numbers).
    ``data_root``: ignored (see :func:`offline_cache_path`).
    """
    del data_root
    path = offline_cache_path(cache_dir=cache_dir, config=config)
    if path.is_file():
        return path
    print(f"{OFFLINE_BACKBONE}: no cached weights at {path}; pretraining it now (a few minutes on "
          "a CPU, once per machine; or run `python -m robustbench_fvae.pretrain` beforehand)",
          flush=True)
    with torch.random.fork_rng(devices=[]):
        pretrain_offline_backbone(cache_dir, config, progress=progress)
    return path


# ------------------------------------------------------------------------------ source task


def source_pools(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per class, disjoint (train, test) silhouette indices of the source task (90 % / 10 %)."""
    _, labels = load_silhouettes()
    pools = {}
    for name in SILHOUETTE_CLASSES:
        idx = (reserved_source_instances(name) if name in REPLICA_CLASSES
               else np.flatnonzero(labels == class_index(name)))
        idx = idx[np.random.default_rng([seed, 7919, class_index(name)]).permutation(len(idx))]
        cut = int(round(0.9 * len(idx)))
        pools[name] = (idx[:cut], idx[cut:])
    return pools


def make_source_images(
    n: int, split: str, seed: int, size: int = SOURCE_SIZE
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``n`` source-task scenes: uint8 images (n, size, size, 3), class labels (n,) indexing
    :data:`SILHOUETTE_CLASSES` (balanced), background-family labels (n,) indexing
    :data:`FAMILIES` (uniform, independent of the class), and uint8 object masks (n, size, size)
    (alpha·255). ``split`` is ``train`` or ``test`` (disjoint silhouette instances)."""
    images, _ = load_silhouettes()
    part = {"train": 0, "test": 1}[split]
    pools = source_pools(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    masks = np.empty((n, size, size), np.uint8)
    classes = np.arange(n) % len(SILHOUETTE_CLASSES)
    families = np.empty(n, np.int64)
    for i in range(n):
        rng = np.random.default_rng([seed, 104729, part, i])
        pool = pools[SILHOUETTE_CLASSES[classes[i]]][part]
        silhouette = images[pool[int(rng.integers(len(pool)))]]
        families[i] = int(rng.integers(len(FAMILIES)))
        background = render_background(rng, FAMILIES[families[i]], size)
        # The object must stay visible: its tone is chosen against the background's brightness,
        # from the tones the replicas use (dark, mid) and a light one.
        level = float(background.mean())
        tones = ("dark", "mid") if level > 0.62 else ("mid", "light") if level < 0.3 else (
            "dark", "light")
        tone = tones[int(rng.integers(2))]
        alpha = silhouette_alpha(rng, silhouette, size, scale=(0.45, 0.85), max_rotation=20.0)
        out[i] = compose(rng, background, alpha, foreground_fill(rng, size, tone))
        masks[i] = (alpha * 255.0 + 0.5).astype(np.uint8)
    return out, classes.astype(np.int64), families, masks


def _resize_like_eval(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, h, w) float -> (B, C, size, size): resize to ``size·256/224`` and centre-crop
    ``size``, as the evaluation transform does to the replicas' images."""
    big = int(size * 256 / 224)
    x = F.interpolate(x, size=(big, big), mode="bilinear", align_corners=False, antialias=True)
    top = (big - size) // 2
    return x[:, :, top: top + size, top: top + size]


def _to_input(batch: torch.Tensor) -> torch.Tensor:
    """uint8 (B, h, w, 3) -> the backbone's input (B, 3, S, S), normalised with its mean/std."""
    x = batch.permute(0, 3, 1, 2).float() / 255.0
    x = _resize_like_eval(x, OFFLINE_ARCH["img_size"])
    mean = torch.tensor(OFFLINE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OFFLINE_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _token_masks(masks: torch.Tensor, grid: int) -> torch.Tensor:
    """uint8 (B, h, w) masks -> float (B, grid², MASK_CELLS²) targets in [0, 1]: each token's
    area (row-major token order) as a MASK_CELLS x MASK_CELLS grid of mean coverage."""
    m = masks.float().div(255.0).unsqueeze(1)
    m = _resize_like_eval(m, OFFLINE_ARCH["img_size"])
    m = F.adaptive_avg_pool2d(m, grid * MASK_CELLS)[:, 0]
    b, c = m.shape[0], MASK_CELLS
    m = m.reshape(b, grid, c, grid, c).permute(0, 1, 3, 2, 4)
    return m.reshape(b, grid * grid, c * c)


class _SourceModel(nn.Module):
    """The backbone and its source-task heads: class on the class token and on the mean patch
    token, background family on the class token, and each patch token's object mask."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        width = OFFLINE_ARCH["embed_dim"]
        self.class_head = nn.Linear(width, len(SILHOUETTE_CLASSES))
        self.mean_class_head = nn.Linear(width, len(SILHOUETTE_CLASSES))
        self.family_head = nn.Linear(width, len(FAMILIES))
        self.mask_head = nn.Linear(width, MASK_CELLS * MASK_CELLS)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Logits: class from the class token (B, 10) and from the mean patch token (B, 10),
        family (B, 7), mask (B, n_tokens, MASK_CELLS²). ``x``: images, or stem features while
        the stem is bypassed (see :func:`_stem_bypassed`)."""
        tokens = self.backbone.forward_features(x)  # (B, 1 + n_tokens, width), final norm
        cls = tokens[:, 0]
        patches = tokens[:, self.backbone.num_prefix_tokens:]
        return (self.class_head(cls), self.mean_class_head(patches.mean(1)),
                self.family_head(cls), self.mask_head(patches))


@contextlib.contextmanager
def _stem_bypassed(backbone: nn.Module) -> Iterator[None]:
    """Within this context the backbone's patch embedding takes stem features instead of
    images (the stem is frozen, so its features are computed once for all source images)."""
    embed = backbone.patch_embed
    stem, embed.backbone = embed.backbone, nn.Identity()
    try:
        yield
    finally:
        embed.backbone = stem


@torch.no_grad()
def _stem_features(stem: nn.Module, images: torch.Tensor, batch: int = 128,
                   bar=None) -> torch.Tensor:
    """Frozen-stem features (N, C, g, g) of uint8 scenes (N, h, w, 3)."""
    out = []
    for i in range(0, len(images), batch):
        out.append(stem(_to_input(images[i: i + batch])).contiguous())
        if bar is not None:
            bar.update(len(out[-1]))
    return torch.cat(out)


@torch.no_grad()
def _evaluate(model: _SourceModel, x: torch.Tensor, y: torch.Tensor, f: torch.Tensor,
              masks: torch.Tensor) -> dict[str, float]:
    """Held-out accuracy of the class (class token, mean token), family, and mask pixels.
    ``x``: inputs of ``model`` as it is called (images, or features under the bypass)."""
    model.eval()
    right = np.zeros(4)
    for i in range(0, len(x), 256):
        logits_y, logits_ym, logits_f, logits_m = model(x[i: i + 256])
        right[0] += int((logits_y.argmax(1) == y[i: i + 256]).sum())
        right[1] += int((logits_ym.argmax(1) == y[i: i + 256]).sum())
        right[2] += int((logits_f.argmax(1) == f[i: i + 256]).sum())
        target = masks[i: i + 256] > 0.5
        right[3] += float(((logits_m > 0) == target).float().mean(dim=(1, 2)).sum())
    model.train()
    acc = right / len(x)
    return {"class": float(acc[0]), "class_mean_token": float(acc[1]), "family": float(acc[2]),
            "mask_pixel": float(acc[3])}


def pretrain_offline_backbone(
    cache_dir: str | Path | None = None,
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
    path = offline_cache_path(cache_dir=cache_dir, config=cfg)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create the cache folder {path.parent}: {err.strerror}; set "
                         f"{CACHE_ENV} or --cache-dir to a writable folder") from None
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
    from .progress import progress_bar

    start, cpu_start = time.perf_counter(), time.process_time()
    torch.manual_seed(cfg.seed)
    backbone = build_offline_vit(0, stem=FrozenMobileNetV2Stem(OFFLINE_STEM_BLOCKS,
                                                               pretrained=True))
    stem = backbone.patch_embed.backbone
    data = {}
    for split, n in (("train", cfg.n_train), ("test", cfg.n_test)):
        data[split] = [torch.from_numpy(a) for a in make_source_images(n, split, cfg.seed)]
    gen_seconds = time.perf_counter() - start
    log(f"{OFFLINE_BACKBONE}: generated {cfg.n_train} + {cfg.n_test} source scenes in "
        f"{gen_seconds:.0f}s")
    bar = progress_bar(total=cfg.n_train + cfg.n_test, desc="frozen stem features", unit="img",
                       disable=not progress)
    grid = backbone.patch_embed.grid_size[0]
    feats = {s: _stem_features(stem, d[0], bar=bar) for s, d in data.items()}
    token_masks = {s: _token_masks(d[3], grid) for s, d in data.items()}
    bar.close()
    stem_seconds = time.perf_counter() - start - gen_seconds

    model = _SourceModel(backbone)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2 and "pos_embed" not in n]
    no_decay = [p for n, p in params if p.ndim < 2 or "pos_embed" in n]
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
    x_train, y_train, f_train = feats["train"], data["train"][1], data["train"][2]
    m_train = token_masks["train"]
    bar = progress_bar(total=total, desc=f"pretraining {OFFLINE_BACKBONE}", unit="step",
                       disable=not progress)
    step = 0
    model.train()
    with _stem_bypassed(backbone):
        for _epoch in range(cfg.epochs):
            order = torch.randperm(cfg.n_train, generator=gen)
            for i in range(0, cfg.n_train, cfg.batch_size):
                idx = order[i: i + cfg.batch_size]
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step)
                logits_y, logits_ym, logits_f, logits_m = model(x_train[idx])
                loss = (
                    criterion(logits_y, y_train[idx]) + criterion(logits_ym, y_train[idx])
                    + cfg.family_weight * criterion(logits_f, f_train[idx])
                    + cfg.mask_weight * F.binary_cross_entropy_with_logits(logits_m,
                                                                           m_train[idx])
                )
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"pretraining loss became {loss.item()} at step "
                                             f"{step}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
                optimizer.step()
                step += 1
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bar.close()
        n = min(cfg.n_test, cfg.n_train)
        train_acc = _evaluate(model, x_train[:n], y_train[:n], f_train[:n], m_train[:n])
    # Held-out accuracy through the whole backbone, stem included, on the images themselves:
    # this also checks that the saved model computes what was trained.
    x_test = _to_input(data["test"][0])
    test_acc = _evaluate(model, x_test, data["test"][1], data["test"][2], token_masks["test"])
    seconds = time.perf_counter() - start

    summary = {
        "name": OFFLINE_BACKBONE,
        "key": path.stem.rsplit("-", 1)[-1],
        "version": PRETRAIN_VERSION,
        "architecture": offline_arch_summary(),
        "trained_parameters": sum(p.numel() for p in backbone.parameters()),
        "frozen_stem_values": sum(b.numel() for b in stem.buffers()),
        "source_task": {"classes": list(SILHOUETTE_CLASSES), "families": list(FAMILIES),
                        "reserved_per_replica_class": RESERVED_PER_CLASS},
        "source_test_acc": round(test_acc["class"], 4),
        "source_test_acc_mean_token": round(test_acc["class_mean_token"], 4),
        "source_test_family_acc": round(test_acc["family"], 4),
        "source_test_mask_pixel_acc": round(test_acc["mask_pixel"], 4),
        "source_train_acc": round(train_acc["class"], 4),
        "seconds": round(seconds, 1),
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
        "generation_seconds": round(gen_seconds, 1),
        "stem_feature_seconds": round(stem_seconds, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "config": asdict(cfg),
    }
    _save_atomic(backbone, path, summary)
    log(f"{OFFLINE_BACKBONE}: held-out source accuracy {test_acc['class']:.3f} (10 classes, "
        f"chance 0.1; background family {test_acc['family']:.3f}) after {seconds:.0f}s; cached "
        f"at {path}")
    return summary


def _save_atomic(backbone: nn.Module, path: Path, summary: dict) -> None:
    """Write the JSON, then the weights, each atomically (weights last: they mark 'done')."""
    from safetensors.torch import save

    from .record.io import write_bytes_atomic, write_json_atomic

    state = {k: v.detach().contiguous() for k, v in backbone.state_dict().items()}
    write_json_atomic(path.with_suffix(".json"), summary)
    # One metadata key only: safetensors orders several keys at random, and the file should be
    # byte-identical across runs with the same seed (the weights are).
    write_bytes_atomic(path, save(state, metadata={"name": f"{OFFLINE_BACKBONE}-{summary['key']}"}))


@command
def main(argv: list[str] | None = None) -> int:
    defaults = PretrainConfig()
    parser = ArgumentParser(
        prog="python -m robustbench_fvae.pretrain",
        description="Pretrain the offline hybrid ViT (frozen ImageNet MobileNetV2 stem, blocks "
                    "trained here) on shipped silhouettes and textures; cached once per machine.")
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help=f"cache folder (default: ${CACHE_ENV}, else "
                             "$XDG_CACHE_HOME/robustbench_fvae or ~/.cache/robustbench_fvae)")
    parser.add_argument("--force", action="store_true", help="pretrain again even if cached")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, metavar="N",
                        help=f"epochs over the generated scenes (default {defaults.epochs})")
    parser.add_argument("--seed", type=int, default=defaults.seed, metavar="N",
                        help=f"seed of data and training (default {defaults.seed})")
    parser.add_argument("--n-train", type=int, default=defaults.n_train, metavar="N",
                        help=f"generated training scenes (default {defaults.n_train})")
    parser.add_argument("--print-path", action="store_true",
                        help="only print where the backbone of these settings is cached")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    cfg = PretrainConfig(seed=args.seed, epochs=args.epochs, n_train=args.n_train)
    if args.print_path:
        print(offline_cache_path(cache_dir=args.cache_dir, config=cfg))
        return 0
    # Errors end in cli.command: one line, exit 2 for bad input, 1 for the rest.
    pretrain_offline_backbone(args.cache_dir, cfg, force=args.force, progress=not args.quiet)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
