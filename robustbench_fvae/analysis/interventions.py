"""Causal tests of what an adapter's update carries into the prediction.

At evaluation, the update of chosen adapted slices (:mod:`.updates`) is **replaced**, and the
predictions are compared, image by image, with the unmodified model's:

* ``zero`` — no update (the frozen base layer);
* ``mean`` — the update's mean over the evaluated images at the same token position (keeps a
  learned positional bias, removes everything the image changes);
* ``background_only`` — the update the same slice computes on the image's background-only twin
  (object removed);
* ``background_swapped`` — its value on the background-swapped twin (the same object on its
  class's other background): an in-distribution counterfactual of the spurious attribute alone;
* ``sampled`` (FVAE family only) — z1 drawn from the posterior as in training,
  ``s_B·B (μ1 + σ1 ε)``, instead of its mean.

Targets: every slice alone, every block's slices together, and all slices at once (``all``).
The twins' updates are read from the unmodified model run on the twin (every other layer as
trained), so only the targeted slices change.

Per (target, intervention), paired against the unmodified predictions on the same images
(:func:`paired_effect`): the change of average accuracy and of worst-group accuracy, the flip
rate (fraction of images whose predicted class changes) and the mean |Δ margin| (margin = the
true class's logit minus the largest other logit), each with a 95 % interval — WG by a
group-stratified bootstrap of the image pairs, the others by the normal approximation of a mean
of per-image values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..adapters import FVAEAdapter, adapted_layers
from .statistics import Z95
from .updates import _batches, block_of, hook_adapters

INTERVENTIONS = ("zero", "mean", "background_only", "background_swapped", "sampled")
TWIN_INTERVENTIONS = ("background_only", "background_swapped")
INTERVENTION_COLUMNS = (
    "target", "scope", "intervention", "n", "avg_acc", "delta_avg", "delta_avg_low",
    "delta_avg_high", "wg_acc", "delta_wg", "delta_wg_low", "delta_wg_high", "flip_rate",
    "flip_low", "flip_high", "margin_change", "margin_change_low", "margin_change_high")
DEFAULT_BOOT = 1000


def intervention_targets(layers: Sequence[str]) -> list[tuple[str, str, list[str]]]:
    """``(target, scope, layers)``: each slice (scope ``slice``), each block's slices (scope
    ``block``, target ``blocks.<i>``) when a block holds more than one, and ``all``."""
    targets = [(name, "slice", [name]) for name in layers]
    blocks: dict[str, list[str]] = {}
    for name in layers:
        blocks.setdefault(block_of(name), []).append(name)
    targets += [(block, "block", names) for block, names in blocks.items() if len(names) > 1]
    if len(blocks) > 1:
        targets.append(("all", "all", list(layers)))
    return targets


def _sampled_update(adapter: FVAEAdapter, x: torch.Tensor, generator: torch.Generator
                    ) -> torch.Tensor:
    mean, logvar = adapter.encoder1(x)
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return adapter.output_scale * ((mean + torch.exp(0.5 * logvar) * noise)
                                   @ adapter.lora_B.t())


@torch.inference_mode()
def intervention_logits(model: nn.Module, test, twins: dict, layers: Sequence[str],
                        means: dict[str, torch.Tensor], indices: np.ndarray, *,
                        interventions: Sequence[str] = INTERVENTIONS, batch_size: int = 256,
                        device: str | torch.device = "cpu", seed: int = 0,
                        progress: bool = False) -> tuple[np.ndarray, dict]:
    """Logits of the unmodified model (N, C) and ``{(target, intervention): (N, C)}`` over
    ``test[indices]`` (eval mode). ``twins`` maps ``background_only`` / ``background_swapped``
    to splits in the order of ``test``; an intervention whose twin is missing, and ``sampled``
    for a target without FVAE slices, is skipped. ``means``: per-position mean updates
    (:func:`~.updates.measure_updates`)."""
    device = torch.device(device)
    model.eval()
    adapters = adapted_layers(model)
    targets = intervention_targets(layers)
    plan = []
    for target, _, names in targets:
        for kind in interventions:
            if kind in TWIN_INTERVENTIONS and kind not in twins:
                continue
            if kind == "sampled" and not all(isinstance(adapters[n], FVAEAdapter)
                                             for n in names):
                continue
            plan.append((target, kind, names))
    generator = torch.Generator(device=device).manual_seed(seed)
    twin_batches = {kind: _batches(twins[kind], indices, batch_size, device, kind, False)
                    for kind in TWIN_INTERVENTIONS if kind in twins}
    clean, out = [], {(t, k): [] for t, k, _ in plan}
    recorded: dict[str, dict[str, torch.Tensor]] = {}

    def record(kind):
        def fn(name, adapter, x, update):
            recorded[kind][name] = update
        return fn

    for images in _batches(test, indices, batch_size, device, "interventions", progress):
        clean.append(model(images).float().cpu())
        for kind, batches in twin_batches.items():
            recorded[kind] = {}
            with hook_adapters(model, layers, record(kind)):
                model(next(batches))
        for target, kind, names in plan:
            def replace(name, adapter, x, update, kind=kind):
                if kind == "zero":
                    return torch.zeros_like(update)
                if kind == "mean":
                    return means[name].to(update.dtype).expand_as(update)
                if kind == "sampled":
                    return _sampled_update(adapter, x, generator).to(update.dtype)
                return recorded[kind][name]
            with hook_adapters(model, names, replace):
                out[(target, kind)].append(model(images).float().cpu())
    return (torch.cat(clean).numpy(),
            {key: torch.cat(v).numpy() for key, v in out.items()})


def margins(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per image: the true class's logit minus the largest other logit (N,)."""
    logits = np.asarray(logits, dtype=np.float64)
    rows = np.arange(len(y))
    true = logits[rows, y]
    other = logits.copy()
    other[rows, y] = -np.inf
    return true - other.max(axis=1)


def _mean_interval(values: np.ndarray) -> tuple[float, float, float]:
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = Z95 * float(values.std(ddof=1)) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def _worst_group(correct: np.ndarray, g: np.ndarray) -> float:
    return min(float(correct[g == grp].mean()) for grp in np.unique(g))


def paired_effect(y: np.ndarray, g: np.ndarray, clean_logits: np.ndarray,
                  new_logits: np.ndarray, *, n_boot: int = DEFAULT_BOOT, seed: int = 0) -> dict:
    """The paired effect of an intervention on images with labels ``y`` and groups ``g`` (N,)
    (module docstring): ``avg_acc`` and ``wg_acc`` after it, ``delta_avg``, ``delta_wg``,
    ``flip_rate``, ``margin_change`` (mean |Δ margin|), each change with ``_low``/``_high``
    95 % bounds. Accuracies as fractions."""
    y, g = np.asarray(y), np.asarray(g)
    before = clean_logits.argmax(1) == y
    after = new_logits.argmax(1) == y
    delta = after.astype(np.float64) - before
    avg, avg_low, avg_high = _mean_interval(delta)
    flips = (clean_logits.argmax(1) != new_logits.argmax(1)).astype(np.float64)
    flip, flip_low, flip_high = _mean_interval(flips)
    margin, margin_low, margin_high = _mean_interval(
        np.abs(margins(new_logits, y) - margins(clean_logits, y)))
    wg_before, wg_after = _worst_group(before, g), _worst_group(after, g)
    # Group-stratified bootstrap of the image pairs: each group's pairs resampled within it.
    rng = np.random.RandomState(seed)
    groups = np.unique(g)
    acc_before = np.empty((n_boot, len(groups)))
    acc_after = np.empty((n_boot, len(groups)))
    for i, grp in enumerate(groups):
        members = np.flatnonzero(g == grp)
        draw = members[rng.randint(0, len(members), size=(n_boot, len(members)))]
        acc_before[:, i] = before[draw].mean(1)
        acc_after[:, i] = after[draw].mean(1)
    boot = acc_after.min(1) - acc_before.min(1)
    wg_low, wg_high = np.quantile(boot, [0.025, 0.975])
    return {"n": len(y), "avg_acc": float(after.mean()), "delta_avg": avg,
            "delta_avg_low": avg_low, "delta_avg_high": avg_high, "wg_acc": wg_after,
            "delta_wg": wg_after - wg_before, "delta_wg_low": float(wg_low),
            "delta_wg_high": float(wg_high), "flip_rate": flip, "flip_low": flip_low,
            "flip_high": flip_high, "margin_change": margin, "margin_change_low": margin_low,
            "margin_change_high": margin_high}


def intervention_rows(y: np.ndarray, g: np.ndarray, clean_logits: np.ndarray,
                      logits: dict, layers: Sequence[str], *, n_boot: int = DEFAULT_BOOT,
                      seed: int = 0) -> list[dict]:
    """One row of :data:`INTERVENTION_COLUMNS` per ``(target, intervention)`` of ``logits``,
    targets in :func:`intervention_targets` order."""
    scopes = {target: scope for target, scope, _ in intervention_targets(layers)}
    return [{"target": target, "scope": scopes[target], "intervention": kind,
             **paired_effect(y, g, clean_logits, value, n_boot=n_boot, seed=seed)}
            for (target, kind), value in logits.items()]


def format_intervention_table(rows: Sequence[dict]) -> str:
    """Rows target × intervention: Δ avg and Δ WG in points with their intervals, flip rate."""
    width = max([len("target")] + [len(r["target"]) for r in rows])
    head = (f"{'target':{width}}  {'intervention':18}  {'Δ avg (pts)':>20}  "
            f"{'Δ WG (pts)':>20}  {'flips':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        def pts(key, r=r):
            return (f"{100 * r[key]:+.1f} [{100 * r[key + '_low']:+.1f}, "
                    f"{100 * r[key + '_high']:+.1f}]")
        lines.append(f"{r['target']:{width}}  {r['intervention']:18}  {pts('delta_avg'):>20}  "
                     f"{pts('delta_wg'):>20}  {100 * r['flip_rate']:5.1f}%")
    return "\n".join(lines)
