"""Putting adapters into a timm Vision Transformer, and reading them back out.

timm ViTs compute q, k, v with one fused ``qkv`` Linear of output size 3·d. Targets ``q``, ``k``,
``v`` adapt one slice each (each slice its own adapter, added to its part of the fused output);
any other target names an ``nn.Linear`` by its qualified name or a dotted suffix of it
(``proj``, ``attn.proj``, ``mlp.fc1`` …). A target that matches nothing is an error, never a
silent no-op. The model keeps the adapters inside :class:`AdaptedLinear` wrappers, PEFT style:
the frozen base layer plus a ``ModuleDict`` of adapters keyed by target name.

**Fused evaluation.** Without gradients and with every adapter in eval mode, an
:class:`AdaptedLinear` computes all its adapters at once: each adapter's eval delta is
``W_out · act(W_in x + b_in) + b_out`` (LoRA: ``(α/r)·B · A x``; FVAE: the mean head folded into
B, ``s_B·B·W_μ · ReLU(W1 x + b1) + s_B·B·b_μ``), so the ``W_in`` of all slices are stacked into
one matmul and the ``W_out`` into one block matrix over the adapted output span: one matmul, an
activation and one matmul per layer, whatever the number of slices. The fused weights are rebuilt
from the live parameters on every such forward call (a few O(r·d) operations, negligible next to
the per-token matmuls), never cached and never registered, so no optimizer step, in-place
update, ``load_state_dict`` or ``.to()`` can leave them stale, and checkpoints are unchanged.
Training, and any forward with gradients enabled, takes the per-adapter path; so does a layer
whose adapters carry forward hooks (e.g. :func:`record_latents`), since fusing would skip them.

**Batched FVAE training.** A layer with several FVAE adapters of one shape, all training and
unhooked, runs them as one batch (:func:`~.fvae.training_deltas`: all encoders in one matmul, all
decoders and densities in one node), with the random draws of the per-adapter calls in their
order, so the values are those of the per-adapter path up to float rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from .fvae import LOSS_PARTS, FVAEAdapter, training_deltas
from .lora import LoRAAdapter

QKV_SLICES = {"q": 0, "k": 1, "v": 2}
WHOLE_LAYER = "all"  # adapter key of a target that adapts a Linear's whole output


class AdapterError(ValueError):
    """A target is unknown or unmatched, or an adapter operation is not possible."""


class AdaptedLinear(nn.Module):
    """A frozen ``nn.Linear`` plus adapters, each adding its delta to a slice of the output."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.slices: dict[str, tuple[int, int]] = {}
        self.merged = False
        self.fuse_eval = True  # see the module docstring; set_eval_fusion switches it off

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def add_adapter(self, name: str, adapter: nn.Module, start: int, stop: int) -> None:
        for other, (s, e) in self.slices.items():
            if start < e and s < stop:
                raise AdapterError(f"targets {other!r} and {name!r} overlap in the same layer")
        self.adapters[name] = adapter
        self.slices[name] = (start, stop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if self.fuse_eval and not torch.is_grad_enabled() and self._fusable():
            return self.fused_eval_forward(x)
        out = self.base(x)
        if self._fvae_batch():
            deltas = training_deltas(list(self.adapters.values()), x)
        else:
            deltas = [adapter(x) for adapter in self.adapters.values()]
        for name, delta in zip(self.adapters, deltas):
            start, stop = self.slices[name]
            if start == 0 and stop == out.shape[-1]:
                out = out + delta
            else:
                # In place on a fresh output is safe: linear's backward does not need its output.
                out[..., start:stop] += delta
        return out

    def _unhooked(self) -> bool:
        """No adapter carries forward hooks, and no hook is registered for every module
        (profilers, debuggers): the batched paths skip the adapters' module calls."""
        if any(a._forward_hooks or a._forward_pre_hooks for a in self.adapters.values()):
            return False
        return not (getattr(_torch_module, "_global_forward_hooks", None)
                    or getattr(_torch_module, "_global_forward_pre_hooks", None))

    def _fusable(self) -> bool:
        """All adapters in eval mode, of one kind with :meth:`eval_factors`, and unhooked."""
        adapters = list(self.adapters.values())
        if any(a.training or not hasattr(a, "eval_factors") for a in adapters):
            return False
        return len({type(a) for a in adapters}) == 1 and self._unhooked()

    def _fvae_batch(self) -> bool:
        """Several FVAE adapters, all in training mode, of one shape and unhooked: they train
        as one batch (:func:`~.fvae.training_deltas`, equal to the per-adapter calls)."""
        adapters = list(self.adapters.values())
        if len(adapters) < 2 or not all(isinstance(a, FVAEAdapter) and a.training
                                        for a in adapters):
            return False
        return len({a.batch_key() for a in adapters}) == 1 and self._unhooked()

    def fused_eval_weights(self) -> tuple[torch.Tensor, torch.Tensor | None, bool, torch.Tensor,
                                          torch.Tensor | None, tuple[int, int]]:
        """The stacked eval factors of all adapters of this layer, built from the live
        parameters: ``W_in`` (Σh, in), ``b_in`` (Σh) or None, whether a ReLU follows,
        ``W_out`` (span, Σh) — each adapter's block at its output rows and hidden columns, zero
        elsewhere — the full-width output bias (out) or None, and the output span
        ``(start, stop)`` covering every adapted slice."""
        factors = {name: a.eval_factors() for name, a in self.adapters.items()}
        start = min(s for s, _ in self.slices.values())
        stop = max(e for _, e in self.slices.values())
        w_in = torch.cat([f[0] for f in factors.values()])
        b_ins = [f[1] for f in factors.values()]
        b_in = None if all(b is None for b in b_ins) else torch.cat([
            b if b is not None else f[0].new_zeros(f[0].shape[0])
            for b, f in zip(b_ins, factors.values())])
        w_out = w_in.new_zeros(stop - start, w_in.shape[0])
        b_out = None
        col = 0
        for name, (_, _, _, w, b) in factors.items():
            s, e = self.slices[name]
            w_out[s - start:e - start, col:col + w.shape[1]] = w
            col += w.shape[1]
            if b is not None:
                if b_out is None:
                    b_out = w.new_zeros(self.out_features)
                b_out[s:e] = b
        relu = next(iter(factors.values()))[2]
        return w_in, b_in, relu, w_out, b_out, (start, stop)

    def fused_eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The eval output ``W x + b + Σ deltas`` in three matmuls (base, stacked ``W_in``, block
        ``W_out``); the adapters' output biases ride on the base bias. Shapes as :meth:`forward`.
        Used without gradients (the caller checks); equal to the per-adapter path up to float
        rounding."""
        w_in, b_in, relu, w_out, b_out, (start, stop) = self.fused_eval_weights()
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        bias = self.base.bias
        if b_out is not None:
            bias = b_out if bias is None else bias + b_out
        out = x2 @ self.base.weight.t() if bias is None else torch.addmm(
            bias, x2, self.base.weight.t())
        h = x2 @ w_in.t() if b_in is None else torch.addmm(b_in, x2, w_in.t())
        if relu:
            h = torch.relu_(h)
        # In place into the adapted columns; under autocast ``out`` may be bf16 and addmm_ is not
        # autocast, so the operands follow its dtype.
        out[:, start:stop].addmm_(h.to(out.dtype), w_out.t().to(out.dtype))
        return out.reshape(*lead, out.shape[-1])

    def merge(self) -> None:
        """Fold every adapter's dense delta into the base weight (LoRA only)."""
        if self.merged:
            return
        with torch.no_grad():
            deltas = {name: a.delta_weight() for name, a in self.adapters.items()}
            for name, delta in deltas.items():
                start, stop = self.slices[name]
                self.base.weight[start:stop] += delta.to(self.base.weight.dtype)
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        with torch.no_grad():
            for name, adapter in self.adapters.items():
                start, stop = self.slices[name]
                self.base.weight[start:stop] -= adapter.delta_weight().to(self.base.weight.dtype)
        self.merged = False


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _resolve_targets(model: nn.Module, targets: Sequence[str]
                     ) -> list[tuple[str, str, int, int]]:
    """(module name, adapter key, slice start, slice stop) for every slice to adapt; the key is
    ``q``/``k``/``v`` for a slice of a fused qkv layer and ``all`` for a whole Linear."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    plan: list[tuple[str, str, int, int]] = []
    for target in targets:
        if target in QKV_SLICES:
            matched = [n for n in linears if n == "qkv" or n.endswith(".qkv")]
            if not matched:
                raise AdapterError(
                    f"target {target!r} needs fused 'qkv' Linear layers, and this model has none; "
                    f"name a Linear instead (available: {_suffix_summary(linears)})"
                )
            for name in matched:
                out = linears[name].out_features
                if out % 3:
                    raise AdapterError(f"{name} has {out} outputs, not divisible into q, k, v")
                width = out // 3
                i = QKV_SLICES[target]
                plan.append((name, target, i * width, (i + 1) * width))
        else:
            matched = [n for n in linears if n == target or n.endswith("." + target)]
            if not matched:
                raise AdapterError(
                    f"target {target!r} matches no nn.Linear; accepted: q, k, v or a Linear name "
                    f"suffix such as {_suffix_summary(linears)}"
                )
            plan.extend((n, WHOLE_LAYER, 0, linears[n].out_features) for n in matched)
    return plan


def _suffix_summary(linears: dict[str, nn.Module] | list[str]) -> str:
    names = sorted({".".join(n.split(".")[-2:]) for n in linears if n and "." in n})
    return ", ".join(names[:12]) or "none"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject_adapters(model: nn.Module, make_adapter: Callable[[int, int], nn.Module],
                    targets: Sequence[str], num_classes: int | None = None) -> list[str]:
    """Freeze ``model``, wrap every target slice with ``make_adapter(in_features,
    out_features)``, and give it a trainable head.

    ``targets``: ``q``/``k``/``v`` (slices of a fused qkv Linear) or Linear name suffixes. With
    ``num_classes`` the classifier head is replaced (``reset_classifier``); the head trains in
    every method. Returns the adapted layer names ``"<module>:<key>"`` (key ``q``/``k``/``v`` or
    ``all``), target by target.
    """
    targets = tuple(targets)
    if not targets:
        raise AdapterError("targets must name at least one layer (e.g. q,k)")
    if len(set(targets)) != len(targets):
        raise AdapterError(f"targets repeat a name: {list(targets)}")
    if num_classes is not None:
        model.reset_classifier(num_classes)
    head = model.get_classifier()
    head_ids = {id(m) for m in head.modules()}
    plan = _resolve_targets(model, targets)
    for name, _, _, _ in plan:
        if id(model.get_submodule(name)) in head_ids:
            raise AdapterError(f"a target matches the classifier head {name!r}, which is "
                               "trained in full anyway; remove it from the targets")
    model.requires_grad_(False)
    names = []
    for module_name, key, start, stop in plan:
        layer = model.get_submodule(module_name)
        if not isinstance(layer, AdaptedLinear):
            layer = AdaptedLinear(layer)
            _set_submodule(model, module_name, layer)
        adapter = make_adapter(layer.in_features, stop - start)
        adapter.to(device=layer.base.weight.device, dtype=layer.base.weight.dtype)
        layer.add_adapter(key, adapter, start, stop)
        names.append(f"{module_name}:{key}")
    head.requires_grad_(True)
    return names


def adapted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every adapter in the model, keyed ``"<module>:<key>"`` as returned by
    :func:`inject_adapters`, in model order."""
    found = {}
    for module_name, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            for target, adapter in module.adapters.items():
                found[f"{module_name}:{target}"] = adapter
    return found


def collect_aux_loss(model: nn.Module, per_layer: bool = False
                     ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """The auxiliary loss of the last training forward pass: mean over adapted FVAE layers of
    their per-layer loss ``ℓ``, and the means of its parts R, K1, K2, G (for logging); with
    ``per_layer`` also each layer's parts, keyed ``"<part>@<layer>"`` (e.g.
    ``K1@blocks.3.attn.qkv:q``).

    Returns ``(None, {})`` when the model has no FVAE adapters or none ran in training mode.
    Each layer's stored loss is cleared, so a stale value is never counted twice.
    """
    losses, parts = [], {k: [] for k in LOSS_PARTS}
    layers: dict[str, torch.Tensor] = {}
    for name, adapter in adapted_layers(model).items():
        if isinstance(adapter, FVAEAdapter) and adapter.loss is not None:
            losses.append(adapter.loss)
            for k in LOSS_PARTS:
                parts[k].append(adapter.loss_parts[k])
                if per_layer:
                    layers[f"{k}@{name}"] = adapter.loss_parts[k]
            adapter.loss, adapter.loss_parts = None, None
    if not losses:
        return None, {}
    return torch.stack(losses).mean(), {**{k: torch.stack(v).mean() for k, v in parts.items()},
                                        **layers}


@contextlib.contextmanager
def record_latents(model: nn.Module, layers: Sequence[str] | None = None, sigma: bool = False,
                   updates: bool = False) -> Iterator[dict[str, dict[str, list[torch.Tensor]]]]:
    """Record per-token latents of chosen adapted layers during forward passes.

    Yields ``store[layer][latent] -> list of tensors`` (one per forward call, each (B, T, r),
    detached, on CPU), where ``latent`` is ``z1``/``z2`` (posterior means, FVAE family) or
    ``lora`` (``A x``); with ``sigma`` also ``sigma:z1``/``sigma:z2``, the posterior standard
    deviations (FVAE family); with ``updates`` also ``update``, the adapter's output (the delta
    it adds to its slice, (B, T, out)). ``layers=None`` records every adapted layer. Unknown
    layer names
    raise. The hooks make the recorded layers run per adapter (no fused eval).
    """
    available = adapted_layers(model)
    chosen = list(available) if layers is None else list(layers)
    unknown = [n for n in chosen if n not in available]
    if unknown:
        raise AdapterError(f"unknown adapted layer(s) {unknown}; available: {list(available)}")
    store: dict[str, dict[str, list[torch.Tensor]]] = {n: {} for n in chosen}
    handles = []
    for name in chosen:
        def hook(module, inputs, output, name=name):
            with torch.no_grad():
                values = module.latents(inputs[0], sigma=sigma)
                if updates:
                    values["update"] = output
                for key, value in values.items():
                    store[name].setdefault(key, []).append(value.detach().float().cpu())
        handles.append(available[name].register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def set_eval_fusion(model: nn.Module, enabled: bool) -> None:
    """Switch the fused eval path (module docstring) on or off for every adapted layer; off,
    eval runs each adapter separately (the reference path the fused one is tested against)."""
    for module in model.modules():
        if isinstance(module, AdaptedLinear):
            module.fuse_eval = bool(enabled)


def merge_adapters(model: nn.Module) -> None:
    """Merge every LoRA delta into its base weight; FVAE adapters refuse with a clear error."""
    wrappers = [m for m in model.modules() if isinstance(m, AdaptedLinear)]
    for w in wrappers:
        for name, adapter in w.adapters.items():
            if not isinstance(adapter, LoRAAdapter):
                raise AdapterError(
                    f"cannot merge adapter {name!r} ({type(adapter).__name__}): z1 = μ1(x) is a "
                    "non-linear function of x, so no dense update equals it; only LoRA merges"
                )
    for w in wrappers:
        w.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, AdaptedLinear):
            module.unmerge()


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts: ``trainable`` (requires_grad now), ``inference`` (added parameters the
    eval path uses: the head plus each adapter's inference parameters; every trainable parameter
    when the backbone itself is trained), and ``frozen`` (frozen backbone parameters)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    adapters = adapted_layers(model)
    adapter_params = {id(p) for a in adapters.values() for p in a.parameters()}
    other_trainable = sum(p.numel() for p in model.parameters()
                          if p.requires_grad and id(p) not in adapter_params)
    inference = other_trainable + sum(a.inference_parameters() for a in adapters.values())
    return {"trainable": trainable, "inference": inference, "frozen": frozen}
