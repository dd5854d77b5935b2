"""The ``peft`` library's methods as ``peft-<name>``: DoRA, rsLoRA, PiSSA, VeRA, LoHa, LoKr, IA3,
OFT, BOFT, FourierFT, HRA, AdaLoRA and LoRA itself, through the installed library (not
re-implemented), on any timm ViT.

Each entry of :data:`PEFT_METHODS` is the method's documented default: the peft config class,
its settings (rank 16 where the method has one: our ``--rank``), and the fused attention ``qkv``
as the target, plus the MLP's ``fc2`` where the method is defined on feed-forward layers (IA3).
``--peft-option KEY=VALUE`` (``peft_options`` in a sweep spec) sets any field of the config class
on top, ``target_modules`` included; the options are part of the run's config and hash. The new
classifier head is peft's ``modules_to_save``, so a run's ``save_pretrained`` output
(``RUN_DIR/peft/``) reloads onto the same timm backbone with ``PeftModel.from_pretrained``.

Methods whose init depends on the weights (PiSSA: an SVD) or on random numbers are seeded by the
run's seed like every other init (the run seeds torch before the model is set up); VeRA's shared
projections come from ``projection_prng_key``. AdaLoRA's rank schedule is set from the run's
total step count when training starts (10 % warm-up ``tinit``, last 20 % ``tfinal``), its rank
allocator steps after every optimiser step, its state is checkpointed for exact resume, and its
orthogonality regulariser joins the loss (``orth_reg_weight``, peft's default 0.5).

``probe`` reads a trained run through the method's ``probe_form``: plain LoRA layers (lora,
rslora, pissa) as our LoRA with its code ``A x`` (:func:`peft_lora_as_ours`), every other tuner
layer by its update ``layer(x) − base_layer(x)`` (:func:`peft_updates_as_ours`).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from robustbench_fvae.config import ConfigError

from .registry import Method, register_method
from .search import ADAPTER_LR_SPACE

if TYPE_CHECKING:
    import torch
    from torch import nn

    from robustbench_fvae.config import AdapterConfig, RunConfig

PEFT_MIN_VERSION = "0.17"
PREFIX = "peft-"
ATTENTION = ("qkv",)
HEAD = "head"
# The attribute of the model under which the PeftModel that wraps it is kept (a plain attribute,
# not a submodule: the PeftModel holds the model, so a submodule would make a cycle).
PEFT_MODEL_ATTR = "_peft_model"


@dataclass(frozen=True)
class PeftEntry:
    """One peft method: ``config`` (the peft config class name), ``settings`` (its fields as
    ``{field: value}``; a value that is a str naming an adapter setting in ``FROM_ADAPTER`` is
    read from the run's adapter config), ``codes`` (what ``probe`` reads: ``lora``, the code
    ``A x``, for the methods whose layers are plain LoRA, read through :func:`peft_lora_as_ours`;
    none for the others), and the search space (the learning rate unless said otherwise)."""

    config: str
    label: str
    summary: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    codes: tuple[str, ...] = ()
    search_space: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: ADAPTER_LR_SPACE)


# Settings read from the run's own flags, so that --rank means the same thing everywhere.
RANK, LORA_ALPHA, LORA_DROPOUT = "@rank", "@lora_alpha", "@lora_dropout"
_LORA = {"r": RANK, "lora_alpha": LORA_ALPHA, "lora_dropout": LORA_DROPOUT,
         "target_modules": list(ATTENTION)}

PEFT_METHODS: dict[str, PeftEntry] = {
    "lora": PeftEntry("LoraConfig", "peft LoRA", "peft's LoRA on the whole fused qkv", _LORA,
                      codes=("lora",)),
    "dora": PeftEntry("LoraConfig", "DoRA", "weight-decomposed LoRA (magnitude + direction)",
                      {**_LORA, "use_dora": True}),
    "rslora": PeftEntry("LoraConfig", "rsLoRA", "LoRA scaled by alpha/sqrt(r)",
                        {**_LORA, "use_rslora": True}, codes=("lora",)),
    "pissa": PeftEntry("LoraConfig", "PiSSA",
                       "LoRA initialised from the top-r singular vectors of W (W keeps the rest)",
                       {**_LORA, "init_lora_weights": "pissa"}, codes=("lora",)),
    "adalora": PeftEntry("AdaLoraConfig", "AdaLoRA",
                         "SVD-form LoRA whose ranks are pruned to a budget during training "
                         "(init_r = rank, target_r = rank/2)",
                         {"init_r": RANK, "target_r": "@half_rank", "lora_alpha": LORA_ALPHA,
                          "lora_dropout": LORA_DROPOUT, "target_modules": list(ATTENTION)},
                         ),
    "vera": PeftEntry("VeraConfig", "VeRA",
                      "shared frozen random projections, trained scaling vectors",
                      {"r": RANK, "target_modules": list(ATTENTION),
                       "vera_dropout": LORA_DROPOUT},
                      # tiny vectors want larger steps (the VeRA paper's learning rates)
                      search_space={"lr": {"log_uniform": [3.0e-3, 3.0e-2]}}),
    "loha": PeftEntry("LoHaConfig", "LoHa", "low-rank Hadamard product update",
                      {"r": RANK, "alpha": LORA_ALPHA, "target_modules": list(ATTENTION)}),
    "lokr": PeftEntry("LoKrConfig", "LoKr", "low-rank Kronecker product update",
                      {"r": RANK, "alpha": LORA_ALPHA, "target_modules": list(ATTENTION)}),
    "ia3": PeftEntry("IA3Config", "IA3",
                     "learned scaling of the attention outputs and of the MLP's fc2 input",
                     {"target_modules": [*ATTENTION, "fc2"], "feedforward_modules": ["fc2"]},
                     search_space={"lr": {"log_uniform": [3.0e-3, 3.0e-2]}}),
    "oft": PeftEntry("OFTConfig", "OFT", "block-diagonal orthogonal rotation of W (block 16)",
                     {"r": 0, "oft_block_size": 16, "target_modules": list(ATTENTION)}),
    "boft": PeftEntry("BOFTConfig", "BOFT", "butterfly-factorised orthogonal rotation (block 4)",
                      {"boft_block_size": 4, "boft_n_butterfly_factor": 1,
                       "target_modules": list(ATTENTION)}),
    "fourierft": PeftEntry("FourierFTConfig", "FourierFT",
                           "update given by n trained spectral coefficients (n = 1000)",
                           {"n_frequency": 1000, "scaling": 150.0,
                            "target_modules": list(ATTENTION)},
                           search_space={"lr": {"log_uniform": [1.0e-2, 1.0e-1]}}),
    "hra": PeftEntry("HRAConfig", "HRA", "a chain of r Householder reflections of W",
                     {"r": RANK, "target_modules": list(ATTENTION)}),
}


def check_peft() -> Any:
    """The installed ``peft`` module, or a ConfigError saying how to install it."""
    try:
        import peft
    except ImportError:
        raise ConfigError(f"peft-* methods need the peft library (>= {PEFT_MIN_VERSION}): "
                          f"pip install 'peft>={PEFT_MIN_VERSION}'") from None
    version = importlib.metadata.version("peft")
    if _version_tuple(version) < _version_tuple(PEFT_MIN_VERSION):
        raise ConfigError(f"peft {version} is installed; peft-* methods need >= "
                          f"{PEFT_MIN_VERSION}: pip install -U peft")
    return peft


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:2] if p.isdigit())


def _adapter_value(marker: str, cfg: AdapterConfig) -> Any:
    if marker == "@half_rank":
        return max(1, cfg.rank // 2)
    return getattr(cfg, marker[1:])


def peft_settings(name: str, cfg: AdapterConfig) -> dict[str, Any]:
    """The peft config fields of ``peft-<name>`` under ``cfg``: the method's defaults, our
    flags where they apply, then ``cfg.peft_options``."""
    entry = PEFT_METHODS[name]
    settings = {k: _adapter_value(v, cfg) if isinstance(v, str) and v.startswith("@") else v
                for k, v in entry.settings.items()}
    settings.update(cfg.peft_options)
    return settings


def peft_config(name: str, cfg: AdapterConfig, *, total_steps: int = 1000) -> Any:
    """The peft config object of ``peft-<name>`` (a ConfigError for unknown or bad options).
    ``total_steps``: AdaLoRA's schedule length until training sets the real one."""
    peft = check_peft()
    cls = getattr(peft, PEFT_METHODS[name].config)
    settings = peft_settings(name, cfg)
    accepted = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg.peft_options) - accepted)
    if unknown:
        raise ConfigError(f"peft option(s) {unknown} are not fields of peft.{cls.__name__}; "
                          f"accepted: {', '.join(sorted(accepted - {'peft_type', 'task_type'}))}")
    settings.setdefault("modules_to_save", [HEAD])
    if cls.__name__ == "AdaLoraConfig":
        settings.setdefault("total_step", total_steps)
        settings.setdefault("tinit", max(1, total_steps // 10))
        settings.setdefault("tfinal", max(1, total_steps // 5))
    try:
        return cls(**settings)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"peft-{name}: peft.{cls.__name__} refuses these settings "
                          f"({settings}): {' '.join(str(err).split())}") from None


def _validate(name: str, cfg: AdapterConfig) -> None:
    peft_config(name, cfg)


def _prepare(name: str, model: nn.Module, cfg: RunConfig) -> list[str]:
    peft = check_peft()
    config = peft_config(name, cfg.adapter)
    try:
        peft_model = peft.get_peft_model(model, config)
    except (ValueError, TypeError, RuntimeError) as err:
        raise ConfigError(f"peft-{name} cannot adapt {type(model).__name__}: "
                          f"{' '.join(str(err).split())}") from None
    object.__setattr__(model, PEFT_MODEL_ATTR, peft_model)
    return [n for n, m in model.named_modules()
            if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)]


def peft_model_of(model: nn.Module) -> Any:
    """The PeftModel that wraps ``model`` (set up by a ``peft-*`` method), or None."""
    return getattr(model, PEFT_MODEL_ATTR, None)


def save_peft(model: nn.Module, folder: str) -> None:
    """``save_pretrained`` of ``model``'s PeftModel into ``folder``: adapter_config.json and
    adapter_model.safetensors, in peft's own format."""
    peft_model_of(model).save_pretrained(folder)


def peft_lora_as_ours(model: nn.Module, strict: bool = True) -> nn.Module:
    """``model`` with each of peft's plain LoRA layers replaced, in place, by our
    :class:`~robustbench_fvae.adapters.AdaptedLinear` holding the same LoRA (its ``base_layer``,
    A, B and scaling) on the layer's whole output (key ``all``): the same function, in the form
    that ``probe`` reads (``A x``, the update, interventions, the base layer's output). The
    model is eval-only afterwards (the PeftModel no longer sees these layers). A LoRA layer that
    is not plain (DoRA's magnitude, a LoRA bias, several adapters) is an error, or with
    ``strict=False`` left as it is."""
    import torch

    from robustbench_fvae.adapters import AdaptedLinear, LoRAAdapter
    from robustbench_fvae.adapters.inject import WHOLE_LAYER

    peft = check_peft()
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, peft.tuners.lora.layer.Linear)]
    for name, layer in layers:
        keys = list(layer.lora_A)
        if len(keys) != 1 or layer.use_dora.get(keys[0]) or getattr(layer, "lora_bias", {}).get(
                keys[0]):
            if not strict:
                continue
            raise ConfigError(f"{name}: not a plain single LoRA (DoRA, a LoRA bias or several "
                              "adapters): probe reads only peft's plain LoRA layers")
        key = keys[0]
        a, b = layer.lora_A[key].weight, layer.lora_B[key].weight
        ours = LoRAAdapter(a.shape[1], b.shape[0], rank=a.shape[0], dropout=0.0)
        with torch.no_grad():
            ours.lora_A.copy_(a)
            ours.lora_B.copy_(b)
        ours.scaling = float(layer.scaling[key])
        wrapper = AdaptedLinear(layer.base_layer)
        wrapper.add_adapter(WHOLE_LAYER, ours.to(device=a.device, dtype=a.dtype), 0,
                            b.shape[0])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, wrapper.eval())
    return model


def peft_updates_as_ours(model: nn.Module) -> nn.Module:
    """``model`` with each of peft's tuner layers (any method) wrapped, in place, as our
    :class:`~robustbench_fvae.adapters.AdaptedLinear` over its base layer with one
    :class:`~robustbench_fvae.adapters.LayerUpdate` adapter, ``layer(x) − base_layer(x)`` (key
    ``all``): no code to read, but the update ``probe`` measures and intervenes on, and the
    method's own parameters for their displacement. Plain LoRA layers are read with their code
    instead (:func:`peft_lora_as_ours`)."""
    from torch import nn as torch_nn

    from robustbench_fvae.adapters import AdaptedLinear, LayerUpdate
    from robustbench_fvae.adapters.inject import WHOLE_LAYER

    peft = check_peft()
    tuner = peft.tuners.tuners_utils.BaseTunerLayer
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, tuner)]
    for name, layer in layers:
        base = layer.get_base_layer()
        if not isinstance(base, torch_nn.Linear):
            raise ConfigError(f"{name}: peft adapted a {type(base).__name__}; probe reads "
                              "adapted Linear layers only")
        own = {n: p for n, p in layer.named_parameters() if not n.startswith("base_layer.")}
        ranks = getattr(layer, "r", None)  # {adapter: r} where the method has a rank
        rank = max(ranks.values(), default=0) if isinstance(ranks, dict) else 0
        update = LayerUpdate(layer, base, own, rank=int(rank) or 16)
        wrapper = AdaptedLinear(base)
        wrapper.add_adapter(WHOLE_LAYER, update, 0, base.out_features)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, wrapper.eval())
    return model


def _probe_form(model: nn.Module) -> nn.Module:
    """Plain LoRA layers with their code, every other tuner layer by its update."""
    return peft_updates_as_ours(peft_lora_as_ours(model, strict=False))


# ---------------------------------------------------------------- AdaLoRA's training hooks


def _adalora_allocator(model: nn.Module) -> Any:
    return peft_model_of(model).base_model.rankallocator


def _adalora_start(model: nn.Module, total_steps: int) -> None:
    """The rank schedule over the run's real length (peft needs it at config time)."""
    peft_model = peft_model_of(model)
    config = peft_model.peft_config["default"]
    config.total_step = total_steps
    config.tinit, config.tfinal = max(1, total_steps // 10), max(1, total_steps // 5)
    if total_steps - config.tinit - config.tfinal <= 0:
        config.tinit = config.tfinal = 0
    _adalora_allocator(model).set_total_step(total_steps)


def _adalora_after_step(model: nn.Module, global_step: int) -> None:
    """peft's rank allocation after each optimiser step (it reads the gradients, so before they
    are zeroed)."""
    peft_model_of(model).base_model.update_and_allocate(global_step)


_ALLOCATOR_STATE = ("ipt", "exp_avg_ipt", "exp_avg_unc")


def _adalora_state(model: nn.Module) -> dict[str, Any]:
    """The rank allocator's importance averages and the final rank pattern (set once the
    budget is reached): what exact resume needs beyond the parameters."""
    allocator = _adalora_allocator(model)
    state: dict[str, Any] = {
        k: {n: t.detach().cpu().clone() for n, t in getattr(allocator, k).items()}
        for k in _ALLOCATOR_STATE}
    pattern = peft_model_of(model).peft_config["default"].rank_pattern
    state["rank_pattern"] = {n: [bool(v) for v in m] for n, m in (pattern or {}).items()}
    return state


def _adalora_load_state(model: nn.Module, state: Mapping[str, Any]) -> None:
    allocator = _adalora_allocator(model)
    device = next(model.parameters()).device
    for key in _ALLOCATOR_STATE:
        setattr(allocator, key, {n: t.to(device) for n, t in state.get(key, {}).items()})
    if state.get("rank_pattern"):
        peft_model_of(model).peft_config["default"].rank_pattern = dict(state["rank_pattern"])


def _adalora_loss(model: nn.Module, task: torch.Tensor, cfg: RunConfig
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``task + orth_reg_weight · mean_over_matrices ‖P Pᵀ − I‖_F`` with P each lora_A (rows)
    and lora_B (columns): the regulariser peft's AdaLoraModel adds to a model output's
    ``.loss``, which a timm model's logits do not have."""
    import torch

    weight = peft_model_of(model).peft_config["default"].orth_reg_weight
    terms = []
    for n, p in model.named_parameters():
        if ("lora_A" in n or "lora_B" in n) and "default" in n and p.requires_grad:
            cov = p @ p.T if "lora_A" in n else p.T @ p
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(*cov.shape, device=cov.device,
                                                                  dtype=cov.dtype)))
    orth = torch.stack(terms).mean() if terms else task.new_zeros(())
    return task + weight * orth.float(), {"orth": orth}


def _register(name: str, entry: PeftEntry) -> None:
    adalora = entry.config == "AdaLoraConfig"
    register_method(Method(
        name=PREFIX + name, label=entry.label, summary=entry.summary,
        trains="adapters", default_lr=5e-3, prepare=partial(_prepare, name),
        search_space=entry.search_space, codes=entry.codes,
        probe_form=_probe_form,
        validate=partial(_validate, name), accepts=("rank", "peft_options"),
        save_pretrained=save_peft,
        loss=_adalora_loss if adalora else None,
        start_training=_adalora_start if adalora else None,
        after_step=_adalora_after_step if adalora else None,
        state=_adalora_state if adalora else None,
        load_state=_adalora_load_state if adalora else None,
    ))


for _name, _entry in PEFT_METHODS.items():
    _register(_name, _entry)
