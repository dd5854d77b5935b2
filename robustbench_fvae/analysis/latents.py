"""Per-image latent codes of a trained run's adapted layers, for probes and t-SNE
(docs/methods.md, docs/design.md).

For each chosen adapted layer (named ``"<module>:<key>"`` as by
:func:`robustbench_fvae.adapters.adapted_layers`, e.g. ``"blocks.3.attn.qkv:q"``) the model is run
in eval mode over (a subsample of) a split, and the per-token codes are pooled to one vector per
image. Latent kinds:

* ``z1``, ``z2`` — posterior means ``μ1(x)``, ``μ2(x)`` of the FVAE family's two encoders;
* ``lora`` — LoRA's low-rank code ``A x``;
* ``backbone`` — the frozen backbone's own token features *entering* the adapted module (the
  input ``x`` of the adapted Linear, i.e. the block's LayerNorm output for ``qkv``), pooled the
  same way: the reference a latent space is compared with. The slices ``:q``, ``:k``, ``:v`` of
  one fused ``qkv`` read the same input, so it is recorded once per module, under the module's
  name (layer ``blocks.3.attn.qkv``, latent ``backbone``).

For the FVAE family the posterior standard deviations ``σ = exp(log σ²/2)`` of z1 and z2 are
summarised too (:attr:`LatentSet.sigma`: the mean over images, pooled tokens and dimensions), for
the collapse checks of :mod:`.probes`.

Pooling over the token axis (ViT tokens are ``[CLS, (registers), patches…]``):

* ``mean`` (default) — mean over the **patch tokens only** (CLS and register tokens excluded): at
  the first block the CLS token is the same learned vector for every image, so including it would
  only dilute the mean; excluding it also keeps ``both`` free of double counting;
* ``cls`` — the CLS token (models without a class token refuse it);
* ``both`` — ``[cls ; mean]`` concatenated (twice the width).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..adapters import adapted_layers, record_latents
from ..data.base import GroupSplit
from ..progress import progress_bar

POOLS = ("cls", "mean", "both")
LATENT_KINDS = ("z1", "z2", "lora", "update", "z1_init", "z2_init", "lora_init", "random",
                "backbone")
# Seed of the untrained random projections (latent ``random``): fixed, so that every run and
# method is compared with the same control.
RANDOM_CONTROL_SEED = 20260
DEFAULT_MAX_IMAGES = 5000
# Fewest images a group keeps in a capped subsample (or all it has): per-group accuracies of the
# group-balanced metric need a few samples even for the rarest group.
MIN_PER_GROUP = 25


class LayerError(ValueError):
    """A requested layer is unknown or the model has no adapted layers."""


class PoolError(ValueError):
    """A pooling mode is unknown or impossible for this model (``cls`` without a class token)."""


# ---------------------------------------------------------------- layer choice


def _module_of(layer: str) -> str:
    return layer.rsplit(":", 1)[0]


def default_layers(available: Sequence[str]) -> list[str]:
    """All adapted layers when they sit in at most 3 modules; otherwise every target of the
    first, middle (index ``n // 2``) and last adapted module, in model order."""
    modules = list(dict.fromkeys(_module_of(n) for n in available))
    if len(modules) <= 3:
        return list(available)
    keep = {modules[0], modules[len(modules) // 2], modules[-1]}
    return [n for n in available if _module_of(n) in keep]


def select_layers(available: Sequence[str], spec: str | Sequence[str] | None) -> list[str]:
    """Resolve ``--layers``: ``None``/empty → :func:`default_layers`; ``all``; or comma-separated
    items, each a full layer name (``blocks.3.attn.qkv:q``), a module name (all of its targets,
    ``blocks.3.attn.qkv``) or an integer index into ``available`` (negative counts from the end).
    Returns names in the order given, without repeats."""
    available = list(available)
    if not available:
        from robustbench_fvae.methods import get_method, method_names

        readable = [m for m in method_names() if get_method(m).codes]
        raise LayerError(f"the model has no adapted layers that probe reads: it reads the codes "
                         f"of {', '.join(readable)} and the update of the other peft-* methods; "
                         "full, linear and bitfit have no adapters")
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return default_layers(available)
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    items = [s for s in items if s]
    if items == ["all"]:
        return available
    chosen: list[str] = []
    for item in items:
        if item in available:
            chosen.append(item)
            continue
        by_module = [n for n in available if _module_of(n) == item]
        if by_module:
            chosen.extend(by_module)
            continue
        try:
            index = int(item)
        except ValueError:
            index = None
        if index is not None and -len(available) <= index < len(available):
            chosen.append(available[index])
            continue
        raise LayerError(
            f"unknown layer {item!r}; give names, module names or indices 0..{len(available) - 1} "
            f"(negative from the end) of the available layers: {', '.join(available)}")
    return list(dict.fromkeys(chosen))


# ---------------------------------------------------------------- pooling


def pool_tokens(tokens: torch.Tensor, pool: str, num_prefix_tokens: int = 1,
                has_class_token: bool = True) -> torch.Tensor:
    """Pool per-token codes (B, T, r) to per-image vectors: (B, r) for ``cls``/``mean``, (B, 2r)
    for ``both``. Tokens ``[0, num_prefix_tokens)`` are CLS/register tokens (CLS first, as in
    timm); ``mean`` averages the remaining patch tokens. A (B, r) input is already per image and
    is returned unchanged; (B, H, W, r) maps are flattened to (B, H·W, r) without prefix tokens."""
    if pool not in POOLS:
        raise PoolError(f"unknown pooling {pool!r}; accepted: {', '.join(POOLS)}")
    if tokens.ndim == 2:
        return tokens
    if tokens.ndim > 3:
        tokens = tokens.flatten(1, -2)
        num_prefix_tokens, has_class_token = 0, False
    if pool in ("cls", "both") and not (has_class_token and num_prefix_tokens >= 1):
        raise PoolError("--pool cls/both needs a class token, and this model has none; use "
                        "--pool mean")
    if tokens.shape[1] <= num_prefix_tokens and pool != "cls":
        raise PoolError(f"no patch tokens to average: {tokens.shape[1]} tokens, "
                        f"{num_prefix_tokens} of them prefix tokens")
    mean = tokens[:, num_prefix_tokens:].mean(dim=1)
    if pool == "mean":
        return mean
    cls = tokens[:, 0]
    return cls if pool == "cls" else torch.cat([cls, mean], dim=-1)


# ---------------------------------------------------------------- subsampling


def stratified_subsample(g: np.ndarray, max_images: int | None, seed: int = 0,
                         min_per_group: int = MIN_PER_GROUP) -> np.ndarray:
    """Sorted positions of at most ``max_images`` samples, drawn without replacement per group.

    ``None`` or a cap ≥ N keeps everything. Otherwise every group first keeps
    ``min(n_g, min_per_group, max_images // n_groups)`` images and the rest of the budget is
    shared in proportion to the groups' remaining sizes (largest remainders), so the split's group
    proportions — its spurious correlation — are kept while rare groups are not lost. Seeded.
    """
    g = np.asarray(g)
    n = len(g)
    if max_images is None or max_images >= n:
        return np.arange(n)
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    groups, counts = np.unique(g, return_counts=True)
    floor = np.minimum(counts, min(min_per_group, max_images // len(groups)))
    left = max_images - int(floor.sum())
    spare = counts - floor
    share = spare * left / max(1, int(spare.sum()))
    extra = np.floor(share).astype(int)
    # Hand out what flooring dropped to the largest fractional parts (ties: larger groups first).
    order = np.lexsort((-spare, -(share - extra)))
    for i in order[: left - int(extra.sum())]:
        extra[i] += 1
    quota = floor + np.minimum(extra, spare)
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(g == grp), size=int(q), replace=False)
              for grp, q in zip(groups, quota)]
    return np.sort(np.concatenate(picked))


# ---------------------------------------------------------------- extraction


@dataclass
class LatentSet:
    """Pooled latents of one split: ``features[(layer, latent)]`` is float32 (N, D), row ``i``
    belonging to split position ``indices[i]`` with labels ``y[i]``, ``a[i]``, group ``g[i]``."""

    split: str
    pool: str
    indices: np.ndarray
    y: np.ndarray
    a: np.ndarray
    g: np.ndarray
    features: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    # Mean posterior σ of z1/z2 over this set's images (pooled tokens, dims), keyed like features.
    sigma: dict[tuple[str, str], float] = field(default_factory=dict)

    def pairs(self) -> list[tuple[str, str]]:
        """``(layer, latent)`` pairs, layers in extraction order, latents in LATENT_KINDS order."""
        rank = {k: i for i, k in enumerate(LATENT_KINDS)}
        layers = list(dict.fromkeys(layer for layer, _ in self.features))
        return sorted(self.features, key=lambda k: (layers.index(k[0]), rank.get(k[1], 99)))

    def subset(self, rows: np.ndarray) -> LatentSet:
        """The same set restricted to rows ``rows`` (positions into this set, not the split);
        ``sigma`` stays the whole set's summary."""
        return LatentSet(self.split, self.pool, self.indices[rows], self.y[rows], self.a[rows],
                         self.g[rows], {k: v[rows] for k, v in self.features.items()},
                         dict(self.sigma))


def _prepare(model: nn.Module, split: GroupSplit, indices, device, pool: str):
    """Check ``pool``, put ``model`` in eval mode; returns the split positions to read, the
    device, and the model's prefix-token count and whether it has a class token."""
    if pool not in POOLS:
        raise PoolError(f"unknown pooling {pool!r}; accepted: {', '.join(POOLS)}")
    idx = np.arange(len(split)) if indices is None else np.asarray(indices, dtype=np.int64)
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    model.eval()
    return idx, torch.device(device), prefix, bool(getattr(model, "has_class_token", prefix >= 1))


def _loader(split: GroupSplit, idx: np.ndarray, batch_size: int, num_workers: int,
            device: torch.device) -> torch.utils.data.DataLoader:
    """Batches of ``split[idx]`` in the order of ``idx`` (no shuffling)."""
    return torch.utils.data.DataLoader(
        split, batch_size=batch_size, sampler=idx.tolist(), num_workers=num_workers,
        pin_memory=device.type == "cuda")


@torch.inference_mode()
def extract_latents(model: nn.Module, split: GroupSplit, layers: Sequence[str] | None = None, *,
                    pool: str = "mean", indices: Sequence[int] | np.ndarray | None = None,
                    batch_size: int = 256, device: str | torch.device = "cpu",
                    num_workers: int = 0, backbone: bool = True, updates: bool = False,
                    random_control: bool = False, progress: bool = False) -> LatentSet:
    """Run ``model`` (eval mode, float32, no autocast) over ``split[indices]`` with the split's
    own transform — pass a split whose transform is the *evaluation* one — and pool the latents
    of ``layers`` (``None``: every adapted layer) per image. With ``backbone`` the input features
    of each adapted module are pooled too (latent ``backbone``, once per module, under the module
    name). The posterior σ of z1/z2 is summarised in ``sigma``. Tokens are pooled batch by batch,
    so memory holds only the pooled (N, D) arrays. Feature order: per module, its layers' codes,
    then the module's backbone input. ``updates``: also the adapters' outputs (latent
    ``update``, the delta the model uses). ``random_control``: also an untrained random ReLU
    projection of each module's input per token, as wide as the module's adapter code (latent
    ``random``, once per module; :func:`random_projection`)."""
    available = adapted_layers(model)
    layers = list(available) if layers is None else list(layers)
    unknown = [n for n in layers if n not in available]
    if unknown:
        raise LayerError(f"unknown adapted layer(s) {unknown}; available: {', '.join(available)}")
    idx, device, prefix, has_cls = _prepare(model, split, indices, device, pool)

    modules = list(dict.fromkeys(_module_of(n) for n in layers))
    inputs: dict[str, list[torch.Tensor]] = {m: [] for m in modules}
    handles = []
    controls = {m: random_projection(model.get_submodule(m).in_features,
                                     available[next(n for n in layers if _module_of(n) == m)].rank)
                for m in modules} if random_control else {}
    randoms: dict[str, list[torch.Tensor]] = {m: [] for m in controls}
    if backbone or random_control:
        for module in modules:
            def pre_hook(_, args, module=module):
                x = args[0].detach().float()
                if backbone:
                    inputs[module].append(x)
                if module in controls:
                    randoms[module].append(controls[module].to(x.device)(x))
            handles.append(model.get_submodule(module).register_forward_pre_hook(pre_hook))
    chunks: dict[tuple[str, str], list[torch.Tensor]] = {}
    sigma_sums: dict[tuple[str, str], float] = {}
    loader = _loader(split, idx, batch_size, num_workers, device)

    def take(key: tuple[str, str], calls: list[torch.Tensor]) -> None:
        # One forward call per batch; pool each before anything accumulates.
        pooled = [pool_tokens(t, pool, prefix, has_cls).cpu() for t in calls]
        if key[1].startswith("sigma:"):
            sigma_key = (key[0], key[1].split(":", 1)[1])
            sigma_sums[sigma_key] = sigma_sums.get(sigma_key, 0.0) + sum(
                float(p.double().mean(-1).sum()) for p in pooled)
        else:
            chunks.setdefault(key, []).extend(pooled)
        calls.clear()

    try:
        with record_latents(model, layers, sigma=True, updates=updates) as store:
            for images, _, _ in progress_bar(loader, desc=f"latents {split.split}",
                                             disable=not progress, leave=False,
                                             dynamic_ncols=True):
                model(images.to(device, non_blocking=True))
                for name in layers:
                    for kind, calls in store[name].items():
                        if calls:
                            take((name, kind), calls)
                for module in modules:
                    if inputs[module]:
                        take((module, "backbone"), inputs[module])
                    if randoms.get(module):
                        take((module, "random"), randoms[module])
    finally:
        for h in handles:
            h.remove()
    order = [(n, k) for m in modules for n in [*(x for x in layers if _module_of(x) == m), m]
             for k in LATENT_KINDS if (n, k) in chunks]
    features = {k: torch.cat(chunks[k]).numpy().astype(np.float32, copy=False) for k in order}
    for key, value in features.items():
        if len(value) != len(idx):
            raise RuntimeError(f"{key} recorded {len(value)} rows for {len(idx)} images: the "
                               "layer ran more than once per forward pass")
    sigma = {k: v / max(1, len(idx)) for k, v in sigma_sums.items()}
    return LatentSet(split=split.split, pool=pool, indices=idx, y=split.y[idx], a=split.a[idx],
                     g=split.g[idx], features=features, sigma=sigma)


def random_projection(in_features: int, width: int, seed: int = RANDOM_CONTROL_SEED
                      ) -> nn.Module:
    """The untrained control code ``ReLU(R x + c)``: ``R`` (width, in), ``c`` drawn as
    ``nn.Linear`` initialises them (Kaiming-uniform), from ``seed`` alone (the global RNG is
    untouched). The shape of the FVAE encoder's trunk at initialisation; LoRA's ``A x`` at
    initialisation is a random projection too, so a probe score at this control's level says
    nothing learned."""
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / in_features ** 0.5
    layer = nn.utils.skip_init(nn.Linear, in_features, width)  # no draw from the global RNG
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.uniform_(-bound, bound, generator=generator)
    return nn.Sequential(layer, nn.ReLU()).requires_grad_(False)


@torch.inference_mode()
def extract_block_features(model: nn.Module, split: GroupSplit, *, pool: str = "mean",
                           indices: Sequence[int] | np.ndarray | None = None,
                           batch_size: int = 256, device: str | torch.device = "cpu",
                           num_workers: int = 0, progress: bool = False) -> LatentSet:
    """The frozen backbone's own features, no adapters needed: the pooled output of every
    transformer block (layer ``blocks.<i>``) and of the final norm (layer ``norm``, what a linear
    head reads), all as latent ``backbone``. Same conventions as :func:`extract_latents`."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise LayerError("the model has no `blocks` (a timm VisionTransformer is expected)")
    taps = {f"blocks.{i}": block for i, block in enumerate(blocks)}
    if isinstance(getattr(model, "norm", None), nn.LayerNorm):
        taps["norm"] = model.norm
    idx, device, prefix, has_cls = _prepare(model, split, indices, device, pool)
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in taps}

    def hook_for(name):
        def hook(module, args, output):
            chunks[name].append(pool_tokens(output.detach().float(), pool, prefix, has_cls).cpu())
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in taps.items()]
    loader = _loader(split, idx, batch_size, num_workers, device)
    try:
        for images, _, _ in progress_bar(loader, desc=f"features {split.split}",
                                         disable=not progress, leave=False, dynamic_ncols=True):
            model.forward_features(images.to(device, non_blocking=True))
    finally:
        for h in handles:
            h.remove()
    features = {(name, "backbone"): torch.cat(v).numpy().astype(np.float32, copy=False)
                for name, v in chunks.items()}
    return LatentSet(split=split.split, pool=pool, indices=idx, y=split.y[idx], a=split.a[idx],
                     g=split.g[idx], features=features)
