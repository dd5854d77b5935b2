"""A run's config resolved, once: every ``None`` filled from its owner's defaults, every setting
checked, and what this checkout builds (backbone digest, replica version) pinned into it.

The run hash is taken over the resolved config, so an explicit default and an omitted one name
the same run. Resolving is idempotent and imports no torch: a sweep names all its runs, and a bad
flag is refused, before any model code loads.
"""

from __future__ import annotations

import math

from ..backbone_identity import OFFLINE_BACKBONE as OFFLINE_BACKBONE
from ..backbone_identity import BackboneError, backbone_digest, default_backbone
from ..data import check_data_recipe, data_defaults, is_replica
from ..methods import validate_method
from .defaults import (
    ALGORITHMS,
    CACHEABLE_RECIPES,
    DEVICES,
    GROUPDRO_SAMPLERS,
    JTT_DEFAULTS,
    JTT_SYNTH_DEFAULT,
    REAL_DEFAULTS,
    SELECTION_RULES,
    STEM_CACHE_CHOICES,
    SYNTH_DEFAULTS,
)
from .fields import ConfigError, RunConfig, TrainConfig


def resolve_config(cfg: RunConfig) -> RunConfig:
    """Fill dataset- and method-dependent defaults and check every setting; returns a copy."""
    cfg = RunConfig.from_dict(cfg.to_dict())
    method = validate_method(cfg.method, cfg.adapter)
    t = cfg.train
    for key, value in dataset_defaults(cfg.dataset).items():
        if getattr(t, key) is None:
            setattr(t, key, value)
    try:
        t.augment, t.spurious_strength = check_data_recipe(cfg.dataset, t.augment,
                                                           t.spurious_strength)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if t.lr is None:
        t.lr = method.default_lr
    if t.algorithm == "jtt":
        epochs, upweight = jtt_defaults(cfg.dataset)
        t.jtt_epochs = epochs if t.jtt_epochs is None else t.jtt_epochs
        t.jtt_upweight = upweight if t.jtt_upweight is None else t.jtt_upweight
    validate_train(t)
    if cfg.backbone is None:
        cfg.backbone = default_backbone(cfg.dataset)
    cfg.stem_cache = resolve_stem_cache(cfg.stem_cache, cfg.dataset, cfg.backbone, t.augment)
    # The hash covers what the weights and the replica were built from (docs/backbones.md).
    for key, value in built_versions(cfg).items():
        if getattr(cfg, key) not in (None, value):
            raise ConfigError(f"{key} {getattr(cfg, key)!r} was asked for, but this machine's "
                              f"is {value!r}; drop the setting to run with it")
        setattr(cfg, key, value)
    if cfg.device not in DEVICES and not cfg.device.startswith("cuda:"):
        raise ConfigError(f"unknown device {cfg.device!r}; expected auto, cpu, cuda or cuda:N")
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(f"threads must be >= 1, got {cfg.threads}")
    return cfg


def dataset_defaults(dataset: str) -> dict[str, int | float | str | None]:
    """What a None training setting becomes: CPU-sized numbers for the replicas, the released
    code's for real data, plus the data recipe (``augment``, ``spurious_strength``) of
    :func:`robustbench_fvae.data.data_defaults`."""
    try:
        recipe = data_defaults(dataset)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return {**(SYNTH_DEFAULTS if is_replica(dataset) else REAL_DEFAULTS), **recipe}


def jtt_defaults(dataset: str) -> tuple[int, int]:
    """``(jtt_epochs, jtt_upweight)`` defaults of a dataset."""
    if is_replica(dataset):
        return JTT_SYNTH_DEFAULT
    return JTT_DEFAULTS.get(dataset, JTT_DEFAULTS["celeba"])


def validate_train(t: TrainConfig) -> None:
    """Refuse unknown rules and algorithms and out-of-range optimisation settings (one-line
    ConfigErrors). ``t`` has its dataset defaults filled."""
    if t.select not in SELECTION_RULES:
        raise ConfigError(f"unknown selection rule {t.select!r}; "
                          f"accepted: {', '.join(SELECTION_RULES)}")
    for key in ("epochs", "batch_size", "eval_batch_size"):
        if getattr(t, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(t, key)}")
    if not (t.lr > 0 and math.isfinite(t.lr)):
        raise ConfigError(f"lr must be a positive number, got {t.lr}")
    if not 0 <= t.warmup_frac < 1:
        raise ConfigError(f"warmup_frac must be in [0, 1), got {t.warmup_frac}")
    if t.weight_decay < 0 or t.grad_clip < 0 or t.patience < 0:
        raise ConfigError("weight_decay, grad_clip and patience must be >= 0")
    validate_algorithm(t)


def validate_algorithm(t: TrainConfig) -> None:
    """Refuse unknown algorithms and out-of-range hyperparameters (one-line ConfigErrors)."""
    if t.algorithm not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {t.algorithm!r}; accepted: {', '.join(ALGORITHMS)}"
                          " (a derived run, such as DFR, is made from a finished run by its own "
                          "command: python -m robustbench_fvae.dfr RUN_DIR)")
    if not (t.groupdro_eta > 0 and math.isfinite(t.groupdro_eta)):
        raise ConfigError(f"groupdro_eta must be a positive number, got {t.groupdro_eta}")
    if not (t.groupdro_adjustment >= 0 and math.isfinite(t.groupdro_adjustment)):
        raise ConfigError(f"groupdro_adjustment must be >= 0, got {t.groupdro_adjustment}")
    if t.groupdro_sampler not in GROUPDRO_SAMPLERS:
        raise ConfigError(f"unknown groupdro_sampler {t.groupdro_sampler!r}; accepted: "
                          f"{', '.join(GROUPDRO_SAMPLERS)}")
    if t.algorithm == "jtt":
        if t.jtt_epochs is None or t.jtt_epochs < 1:
            raise ConfigError(f"jtt_epochs must be >= 1, got {t.jtt_epochs}")
        if t.jtt_upweight is None or t.jtt_upweight < 0:
            raise ConfigError(f"jtt_upweight must be >= 0, got {t.jtt_upweight}")


def stem_cache_unavailable(dataset: str, backbone: str | None, augment: str | None) -> str | None:
    """Why the stem cache cannot serve a run of ``dataset`` with ``backbone`` and recipe
    ``augment`` (one line), or None when it can."""
    if not is_replica(dataset):
        return f"{dataset} is a real dataset (the stem cache is for the synth-* replicas)"
    if backbone != OFFLINE_BACKBONE:
        return f"backbone {backbone} has no frozen stem (only {OFFLINE_BACKBONE} has)"
    if augment not in CACHEABLE_RECIPES:
        return (f"recipe {augment!r} crops at random (the cache holds fixed views: "
                f"{' or '.join(CACHEABLE_RECIPES)})")
    return None


def resolve_stem_cache(setting: str | None, dataset: str, backbone: str | None,
                       augment: str | None) -> str:
    """``on`` or ``off`` for a run: ``auto`` (or None) is ``on`` wherever the cache applies;
    ``on`` where it does not is a :class:`ConfigError` saying why."""
    setting = "auto" if setting is None else setting
    if setting not in STEM_CACHE_CHOICES:
        raise ConfigError(f"stem_cache must be one of {', '.join(STEM_CACHE_CHOICES)}, "
                          f"got {setting!r}")
    reason = stem_cache_unavailable(dataset, backbone, augment)
    if setting == "on" and reason:
        raise ConfigError(f"--stem-cache on is not possible: {reason}; use auto or off")
    return "off" if setting == "off" or reason else "on"


def built_versions(cfg: RunConfig) -> dict[str, str | int | None]:
    """What this checkout builds for ``cfg``: ``backbone_digest``
    (:func:`robustbench_fvae.backbone_identity.backbone_digest`) and ``replica_version`` (the
    replica builder's version for ``synth-*``, else None); both are run hash inputs."""
    from ..data.synthetic import BUILDER_VERSION

    try:
        digest = backbone_digest(cfg.backbone, cfg.weights)
    except BackboneError as err:
        raise ConfigError(str(err)) from None
    return {"backbone_digest": digest,
            "replica_version": BUILDER_VERSION if is_replica(cfg.dataset) else None}


def jtt_stage1_config(cfg: RunConfig) -> RunConfig:
    """JTT's identification run: ERM with the same settings for ``jtt_epochs`` epochs, no early
    stopping (JTT uses the model at the end of its T epochs). An ordinary run record."""
    stage1 = RunConfig.from_dict(cfg.to_dict())
    t = stage1.train
    t.epochs, t.patience, t.algorithm = cfg.train.jtt_epochs, 0, "erm"
    t.jtt_epochs = t.jtt_upweight = None
    return stage1
