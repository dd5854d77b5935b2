"""The method registry: every method of the suite is one module that registers a :class:`Method`.

A method says what it trains, how its loss is formed, its defaults, its random-search space (the
one table that sweeps draw from) and which codes ``probe`` can read. Nothing outside the method's
own module special-cases it by name; docs/design.md shows how to add one. This module imports no
torch: the config, sweep specs and reports read the registry without it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from robustbench_fvae.config import AdapterConfig, ConfigError

if TYPE_CHECKING:
    from torch import nn

    from robustbench_fvae.config import RunConfig

TRAINS = ("adapters", "all", "biases", "head")


@dataclass(frozen=True)
class Method:
    """One registered method.

    ``prepare(model, cfg)`` sets the model up in place (inject adapters, (un)freeze parameters;
    the classifier head already has the right size and always trains) and returns the adapted
    layers' names. ``validate(adapter_cfg)`` refuses settings that make the method meaningless.
    ``defaults`` fills adapter settings left ``None`` (never written back into the hashed
    config). ``search_space`` maps a setting to a distribution in sweep-spec syntax, e.g.
    ``{"lr": {"log_uniform": [1e-3, 1e-2]}}``. ``codes`` are the latents ``probe`` reads from the
    method's adapters (``lora``: ``A x``; ``z1``/``z2``: the FVAE codes); empty: none.
    ``accepts``: the adapter settings the method reads (for help and for the docs' tables).

    Optional hooks (None: nothing to do): ``loss(model, task, cfg) -> (loss, parts)`` forms the
    training loss from the algorithm's task loss (the FVAE family adds its per-layer loss);
    ``start_training(model, total_steps)`` once before the first step; ``after_step(model,
    global_step)`` after each optimiser step, gradients still present; ``state(model)`` /
    ``load_state(model, state)``: training state outside the parameters, checkpointed for exact
    resume; ``save_pretrained(model, folder)``: the trained adapters in another library's own
    format, written beside the run's weights; ``probe_form(model) -> model``: the trained model
    with its layers in the form ``probe`` reads (our adapters), for a method built by another
    library.
    """

    name: str
    label: str
    summary: str
    trains: str
    default_lr: float
    prepare: Callable[[nn.Module, RunConfig], list[str]]
    search_space: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    codes: tuple[str, ...] = ()
    validate: Callable[[AdapterConfig], None] | None = None
    accepts: tuple[str, ...] = ()
    loss: Callable[..., tuple[Any, dict[str, Any]]] | None = None
    start_training: Callable[[nn.Module, int], None] | None = None
    after_step: Callable[[nn.Module, int], None] | None = None
    state: Callable[[nn.Module], dict[str, Any]] | None = None
    load_state: Callable[[nn.Module, Mapping[str, Any]], None] | None = None
    save_pretrained: Callable[[nn.Module, str], None] | None = None
    probe_form: Callable[[nn.Module], nn.Module] | None = None

    def __post_init__(self) -> None:
        if self.trains not in TRAINS:
            raise ValueError(f"{self.name}: trains must be one of {TRAINS}, got {self.trains!r}")
        object.__setattr__(self, "search_space", MappingProxyType(dict(self.search_space)))
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

    @property
    def has_adapters(self) -> bool:
        return self.trains == "adapters"

    def setting(self, adapter: AdapterConfig, name: str) -> Any:
        """An adapter setting as the method uses it: the config's value, or the method's default
        where the config leaves it ``None``."""
        value = getattr(adapter, name)
        return self.defaults.get(name) if value is None else value


_REGISTRY: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to the registry (names are unique; registration order is table order)."""
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def method_names() -> tuple[str, ...]:
    """Every registered method, in table order."""
    return tuple(_REGISTRY)


def get_method(name: str) -> Method:
    """The registered method ``name``; an unknown name is a :class:`ConfigError` naming them all."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown method {name!r}; expected one of "
                          f"{', '.join(method_names())}") from None


def find_method(name: str) -> Method | None:
    """The registered method ``name``, or None (a record of a method this version lacks)."""
    return _REGISTRY.get(name) if isinstance(name, str) else None


def method_label(name: str) -> str:
    """The name tables print (``FVAE-LoRA`` for ``fvae``); the name itself if unregistered."""
    return _REGISTRY[name].label if name in _REGISTRY else name


def method_order(name: str) -> tuple[int, str]:
    """Sort key: registration order, unregistered names last."""
    names = method_names()
    return (names.index(name) if name in names else len(names), name)


def validate_method(name: str, adapter: AdapterConfig) -> Method:
    """Check ``name`` and, for a method with adapters, ``adapter``'s ranges and the method's own
    rules. Returns the method."""
    method = get_method(name)
    if method.has_adapters:
        check_adapter_ranges(adapter)
        if method.validate is not None:
            method.validate(adapter)
    return method


def check_adapter_ranges(cfg: AdapterConfig) -> None:
    """Ranges every adapter setting must be in, whichever method reads it."""
    if cfg.rank < 1:
        raise ConfigError(f"rank must be >= 1, got {cfg.rank}")
    if not cfg.targets:
        raise ConfigError("targets must name at least one layer (e.g. q,k)")
    for name in ("lora_alpha", "alpha", "delta", "lambda_task", "lambda_fvae", "output_scale",
                 "b_init_std"):
        value = getattr(cfg, name)
        if not value >= 0:  # also catches NaN
            raise ConfigError(f"{name} must be a non-negative number, got {value}")
    if cfg.beta is not None and not cfg.beta >= 0:
        raise ConfigError(f"beta must be a non-negative number, got {cfg.beta}")
    if not 0.0 <= cfg.lora_dropout < 1.0 or not 0.0 <= cfg.fvae_dropout < 1.0:
        raise ConfigError("dropout probabilities must be in [0, 1)")
    for name in ("encoder_hidden", "decoder_hidden", "decoder_layers"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.logvar_clamp <= 0:
        raise ConfigError(f"logvar_clamp must be > 0, got {cfg.logvar_clamp}")
