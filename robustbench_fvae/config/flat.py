"""Flat settings: the names that a command-line flag or a sweep spec sets (``rank``, ``epochs``),
mapped onto the nested config."""

from __future__ import annotations

import dataclasses
from typing import Any

from .fields import AdapterConfig, ConfigError, RunConfig, TrainConfig

# Top-level run settings that a flag or a sweep spec may set, besides the adapter/train fields.
RUN_FIELDS = ("method", "dataset", "backbone", "weights", "data_root", "out", "device",
              "num_workers", "checkpoint_every", "threads", "backbone_digest",
              "replica_version", "stem_cache")


def flat_setting_names() -> dict[str, str]:
    """Every settable name (a CLI flag with ``_`` for ``-``) → where it lives: run/adapter/train."""
    names = {name: "run" for name in RUN_FIELDS}
    names.update({f.name: "adapter" for f in dataclasses.fields(AdapterConfig)})
    names.update({f.name: "train" for f in dataclasses.fields(TrainConfig)})
    return names


def config_from_settings(settings: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
    """A RunConfig from flat settings such as ``{"method": "fvae", "rank": 8, "epochs": 3}``.

    Unknown keys are an error naming the accepted ones; ``targets`` may be a list or "q,k".
    """
    cfg = RunConfig.from_dict((base or RunConfig()).to_dict())
    where = flat_setting_names()
    for key, value in settings.items():
        if key not in where:
            raise ConfigError(f"unknown setting {key!r}; accepted: {', '.join(sorted(where))}")
        if key == "peft_options":
            value = parse_peft_options(value)
        elif key == "targets" and isinstance(value, str):
            value = tuple(t.strip() for t in value.split(",") if t.strip())
        elif key == "targets":
            value = tuple(value)
        target = {"run": cfg, "adapter": cfg.adapter, "train": cfg.train}[where[key]]
        setattr(target, key, value)
    return cfg


def parse_peft_options(value: Any) -> dict[str, Any]:
    """``peft_options`` from a mapping (a sweep spec) or ``KEY=VALUE`` texts (the repeated
    ``--peft-option`` flag), values read as YAML: ``r=8`` → 8, ``use_dora=true`` → True,
    ``target_modules=[qkv, fc1]`` → a list. None or empty: no options."""
    import yaml

    if value is None:
        return {}
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        items = []
        for text in value:
            key, sep, raw = text.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"peft option {text!r}: expected KEY=VALUE, e.g. r=8 or "
                                  "target_modules=[qkv,fc1]")
            try:
                items.append((key.strip(), yaml.safe_load(raw) if raw.strip() else ""))
            except yaml.YAMLError:
                raise ConfigError(f"peft option {text!r}: cannot read the value "
                                  f"{raw!r} (numbers, true/false, text or [a, b])") from None
    else:
        raise ConfigError(f"peft_options: expected a mapping or KEY=VALUE texts, got {value!r}")
    options = {}
    for key, item in items:
        if not isinstance(key, str) or not key.isidentifier():
            raise ConfigError(f"peft option name {key!r} is not a field name")
        if not isinstance(item, (str, int, float, bool, list)) or (
                isinstance(item, list) and not all(isinstance(v, (str, int, float)) for v in item)):
            raise ConfigError(f"peft option {key}: expected a number, true/false, text or a "
                              f"list of them, got {item!r}")
        options[key] = item
    return dict(sorted(options.items()))
