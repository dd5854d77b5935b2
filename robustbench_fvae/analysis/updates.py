"""What the adapters add at evaluation, per token: update sizes, per-position means and the
token-level information of the FVAE family's posteriors.

For an adapted slice (``"<module>:<key>"``, e.g. ``blocks.3.attn.qkv:q``) with frozen base
``W x + b`` (the slice's rows) the *update* is what the adapter adds in eval mode: LoRA's
``(α/r)·B A x``, FVAE-LoRA's ``s_B·B μ1(x)``. Its **size** is the median over tokens of
``‖update‖ / ‖W x + b‖`` (both over the slice's output dims); its **image-dependent part** is the
update minus its mean over images at the same token position (what an image changes beyond a
learned positional bias), sized the same way. Together with the parameters' displacement from
their initialisation (:func:`parameter_displacement`) these tell "never trained" (tiny update,
tiny displacement) from "trained to the prior" (displaced, but an input-independent update).

The passes read the model through forward hooks on the adapters (:func:`hook_adapters`), so the
adapted layers run per adapter (no fused eval) while they are measured.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..adapters import FVAEAdapter, adapted_layers
from ..progress import progress_bar
from .information import DEFAULT_MI_TOKENS, PosteriorMoments, minibatch_mutual_information

# A hook gets (layer name, adapter, its input x, its update) and returns None (keep the update)
# or a replacement of the update's shape.
AdapterHook = Callable[[str, nn.Module, torch.Tensor, torch.Tensor], torch.Tensor | None]


@contextlib.contextmanager
def hook_adapters(model: nn.Module, layers: Sequence[str], fn: AdapterHook) -> Iterator[None]:
    """Call ``fn`` on every forward call of the adapters of ``layers``; a tensor it returns
    replaces the adapter's update (the slice's delta) in the model's output."""
    available = adapted_layers(model)
    handles = []
    for name in layers:
        def hook(module, inputs, output, name=name):
            return fn(name, module, inputs[0], output)
        handles.append(available[name].register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def base_slice(model: nn.Module, layer: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The frozen weight rows (out, in) and bias (out) of ``layer``'s slice of its base Linear."""
    module_name, key = layer.rsplit(":", 1)
    wrapper = model.get_submodule(module_name)
    start, stop = wrapper.slices[key]
    bias = wrapper.base.bias
    return wrapper.base.weight[start:stop], None if bias is None else bias[start:stop]


def block_of(layer: str) -> str:
    """The transformer block an adapted layer sits in (``blocks.3`` for
    ``blocks.3.attn.qkv:q``); a layer outside ``blocks.<i>`` is its own block (its module)."""
    match = re.match(r"(.*?blocks\.\d+)\.", layer)
    return match.group(1) if match else layer.rsplit(":", 1)[0]


def _batches(split, indices: np.ndarray, batch_size: int, device: torch.device, desc: str,
             progress: bool):
    """The images of ``split[indices]`` on ``device``, in the order of ``indices``."""
    from .latents import _loader

    loader = _loader(split, np.asarray(indices), batch_size, 0, device)
    for batch in progress_bar(loader, desc=desc, disable=not progress, leave=False,
                              dynamic_ncols=True):
        yield batch[0].to(device)


@torch.inference_mode()
def measure_updates(model: nn.Module, split, layers: Sequence[str], indices: np.ndarray, *,
                    batch_size: int = 256, device: str | torch.device = "cpu",
                    mi_tokens: int = DEFAULT_MI_TOKENS, seed: int = 0,
                    progress: bool = False) -> dict:
    """Two eval passes over ``split[indices]``.

    Returns ``{"means": {layer: (T, out) tensor}, "sizes": [row per layer], "information":
    [row per (layer, latent, unit)], "mi": [row per (layer, latent)]}``: the per-position mean
    update; the update sizes (:data:`UPDATE_COLUMNS`); for FVAE-family slices the token-level
    rates of z1 (prior N(0, I)) and z2 (prior N(μ_p2·1, I)) per unit
    (:meth:`~.information.PosteriorMoments.rates`) and per slice the minibatch MI estimate on
    ``mi_tokens`` tokens drawn uniformly (seeded) from all tokens read.
    """
    device = torch.device(device)
    model.eval()
    adapters = adapted_layers(model)
    sums: dict[str, torch.Tensor] = {}
    counts = {"images": 0}
    moments: dict[tuple[str, str], PosteriorMoments] = {}
    priors: dict[tuple[str, str], float] = {}
    mi_rows: dict[tuple[str, str], list[np.ndarray]] = {}
    pick: dict[str, np.ndarray] = {}
    rng = np.random.RandomState(seed)

    def first_pass(name, adapter, x, update):
        sums[name] = sums.get(name, 0) + update.float().sum(0)
        if not isinstance(adapter, FVAEAdapter):
            return None
        b, t = x.shape[:2]
        if "tokens" not in pick:  # the MI sample: token rows of the whole pass, seeded
            total = len(indices) * t
            pick["tokens"] = np.sort(rng.choice(total, size=min(mi_tokens, total),
                                                replace=False))
        start = counts["images"] * t
        rows = pick["tokens"][(pick["tokens"] >= start) & (pick["tokens"] < start + b * t)]
        for latent, encoder, prior in (("z1", adapter.encoder1, 0.0),
                                       ("z2", adapter.encoder2, adapter.mu_p2)):
            mean, logvar = (v.float() for v in encoder(x))
            priors[(name, latent)] = prior
            moments.setdefault((name, latent), PosteriorMoments()).update(
                mean.cpu().numpy(), logvar.cpu().numpy())
            flat = torch.cat([mean, logvar], -1).reshape(b * t, -1)[
                torch.as_tensor(rows - start, device=mean.device)]
            mi_rows.setdefault((name, latent), []).append(flat.cpu().numpy())
        return None

    with hook_adapters(model, layers, first_pass):
        for images in _batches(split, indices, batch_size, device, "updates (1/2)", progress):
            model(images)
            counts["images"] += len(images)
    means = {name: s / counts["images"] for name, s in sums.items()}

    ratios: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    image_ratios: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    bases = {n: base_slice(model, n) for n in layers}

    def second_pass(name, adapter, x, update):
        weight, bias = bases[name]
        base = x.float() @ weight.float().t()
        if bias is not None:
            base = base + bias.float()
        norm = torch.linalg.vector_norm(base, dim=-1).clamp_min(1e-12)
        ratios[name].append((torch.linalg.vector_norm(update.float(), dim=-1) / norm).flatten())
        image_part = update.float() - means[name].to(update.device)
        image_ratios[name].append((torch.linalg.vector_norm(image_part, dim=-1)
                                   / norm).flatten())
        return None

    with hook_adapters(model, layers, second_pass):
        for images in _batches(split, indices, batch_size, device, "updates (2/2)", progress):
            model(images)
    sizes = []
    for name in layers:
        r = torch.cat(ratios[name]).cpu().numpy()
        ri = torch.cat(image_ratios[name]).cpu().numpy()
        sizes.append({"layer": name, "method": adapters[name].kind,
                      "update_ratio_median": float(np.median(r)),
                      "image_update_ratio_median": float(np.median(ri)),
                      "update_ratio_p90": float(np.quantile(r, 0.9)), "tokens": int(r.size)})
    information, mi = [], []
    for (name, latent), acc in moments.items():
        rates = acc.rates(priors[(name, latent)])
        for j in range(len(rates["kl"])):
            information.append({"layer": name, "latent": latent, "unit": j,
                                **{k: float(v[j]) for k, v in rates.items()}})
        stacked = np.concatenate(mi_rows[(name, latent)])
        r = stacked.shape[1] // 2
        estimate, cap = minibatch_mutual_information(stacked[:, :r], stacked[:, r:], seed)
        mi.append({"layer": name, "latent": latent, "mi_estimate": estimate, "mi_cap": cap,
                   "mi_tokens": len(stacked)})
    return {"means": means, "sizes": sizes, "information": information, "mi": mi}


UPDATE_COLUMNS = ("layer", "method", "update_ratio_median", "image_update_ratio_median",
                  "update_ratio_p90", "tokens", "displacement", "init_norm",
                  "relative_displacement")


def parameter_displacement(trained: nn.Module, initial: nn.Module, layers: Sequence[str]
                           ) -> dict[str, dict[str, float]]:
    """Per adapted slice: ``‖θ − θ0‖`` over all its parameters (``displacement``), ``‖θ0‖``
    (``init_norm``) and their ratio (``relative_displacement``; NaN when θ0 is all zero).
    ``initial`` is the same model rebuilt at its initialisation (same config and seed)."""
    now, then = adapted_layers(trained), adapted_layers(initial)
    out = {}
    for name in layers:
        a = torch.cat([p.detach().float().flatten() for p in now[name].parameters()])
        b = torch.cat([p.detach().float().flatten() for p in then[name].parameters()])
        if a.shape != b.shape:
            raise ValueError(f"{name}: the initial model's adapter has {b.numel()} parameters, "
                             f"the trained one {a.numel()}")
        init_norm = float(b.norm())
        displacement = float((a - b).norm())
        out[name] = {"displacement": displacement, "init_norm": init_norm,
                     "relative_displacement": displacement / init_norm if init_norm > 0
                     else float("nan")}
    return out
