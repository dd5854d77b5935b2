"""The one typed configuration of a run, its validation, and its hash.

Every setting a run depends on lives here and is written to ``config.json`` of the run. The run
directory is named by :func:`config_hash`, a hash of the canonical config (DomainBed style), so the
same settings always land in the same directory and a finished run is never redone by accident.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

SELECTION_RULES = ("val_wg", "val_avg")
# Training algorithms of `run`; "dfr" is a derived run made from a finished one by `dfr`.
ALGORITHMS = ("erm", "groupdro", "resample", "reweight", "jtt")
DERIVED_ALGORITHMS = ("dfr",)
GROUPDRO_SAMPLERS = ("natural", "balanced")


# What a None epochs / batch_size / eval_batch_size becomes: CPU-sized numbers for the offline
# replicas, the released code's for real data (the rest of a dataset's defaults, its data recipe,
# is in its spec: robustbench_fvae/data/registry.py; a method's, in robustbench_fvae/methods/).
SYNTH_DEFAULTS = {"epochs": 5, "batch_size": 64, "eval_batch_size": 256}
REAL_DEFAULTS = {"epochs": 50, "batch_size": 64, "eval_batch_size": 64}


class ConfigError(ValueError):
    """A setting is unknown, out of range, or makes the objective meaningless."""


@dataclass
class AdapterConfig:
    """Settings of the adapted layers (docs/methods.md). Ignored fields are kept for the record.

    ``alpha``/``beta``/``delta`` weigh reconstruction, KL(q1‖p1) and the repulsive term G in the
    per-layer loss ``ℓ = α·R + β·K1 (+ β·K2 for the VAE2LAT family) − δ·G (FVAE-LoRA only)``.
    ``beta=None`` means the method's default (robustbench_fvae/methods/fvae.py: 1 for
    fvae/vae2lat, 10 for bvae2lat). Which method reads which field, and the rules a method adds
    (FVAE-LoRA's bound on β), are in the method registry (robustbench_fvae/methods/).
    """

    rank: int = 16
    targets: tuple[str, ...] = ("q", "k")
    # LoRA
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    # FVAE family
    alpha: float = 1.0
    beta: float | None = None
    delta: float = 1.0
    mu_p2: float = 1.5
    encoder_hidden: int = 16
    decoder_hidden: int = 128
    decoder_layers: int = 3
    fvae_dropout: float = 0.1
    b_init_std: float = 0.02
    output_scale: float = 0.5
    logvar_clamp: float = 20.0
    lambda_task: float = 1000.0
    lambda_fvae: float = 1.0
    # peft-* methods (robustbench_fvae/methods/peft_zoo.py): fields of the peft config class set
    # on top of the method's defaults, e.g. {"target_modules": ["qkv", "fc1"]}. Hashed only when
    # set, so the hashes of runs recorded before the option existed are unchanged.
    peft_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Optimisation and evaluation settings. ``None`` means: the dataset's default (see run.py)."""

    epochs: int | None = None
    batch_size: int | None = None
    eval_batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    grad_clip: float = 1.0
    patience: int = 5
    select: str = "val_wg"
    seed: int = 0
    # The data recipe (hashed): augmentation recipe (data/transforms.py: paper, standard, flip,
    # none) and, for synth-* replicas only, the spurious strength rho = fraction of each class's
    # training images on its majority background. None: the dataset's default
    # (robustbench_fvae/engine/model.py).
    augment: str | None = None
    spurious_strength: float | None = None
    # The training algorithm, orthogonal to the method (robustbench_fvae/algorithms.py): erm,
    # groupdro, resample, reweight, jtt. None in a jtt_* field: the dataset's default.
    algorithm: str = "erm"
    groupdro_eta: float = 0.01
    groupdro_adjustment: float = 0.0
    groupdro_sampler: str = "natural"
    jtt_epochs: int | None = None
    jtt_upweight: int | None = None


@dataclass
class RunConfig:
    """Everything one run depends on. Paths and the device are recorded but not hashed."""

    method: str = "fvae"
    dataset: str = "synth-waterbirds"
    backbone: str | None = None
    weights: str | None = None
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data_root: str = "data"
    out: str = "runs/out"
    device: str = "auto"
    num_workers: int | None = None
    checkpoint_every: int = 0
    threads: int | None = None
    # Filled by engine.model.resolve_config: what the weights and the data were built from
    # (backbones.backbone_digest; the replica builder's version for synth-*), so that a changed
    # backbone or replica never counts as the same run. Given explicitly, they are checked.
    backbone_digest: str | None = None
    replica_version: int | None = None
    # The offline backbone's frozen stem read from features computed once per replica image and
    # view (robustbench_fvae/stem_cache.py): auto (on wherever it applies), on, off. Resolved
    # to on/off by engine.model.resolve_config; hashed only when on, so the hashes of runs that
    # compute the stem per batch (every run recorded before the cache) are unchanged.
    stem_cache: str = "auto"

    # Fields that say *where* or *how* a run happens, not *what* it computes.
    UNHASHED = ("data_root", "out", "device", "num_workers", "checkpoint_every", "threads")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        data = dict(data)
        adapter = AdapterConfig(**_known(AdapterConfig, data.pop("adapter", {}), "adapter"))
        adapter.targets = tuple(adapter.targets)
        train = TrainConfig(**_known(TrainConfig, data.pop("train", {}), "train"))
        return cls(adapter=adapter, train=train, **_known(cls, data, "run"))


def _known(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {where} setting(s) {unknown}; accepted: {sorted(names)}")
    return data


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(cfg: RunConfig) -> str:
    """Hash of everything that changes what the run computes (seed included), 12 hex chars."""
    data = cfg.to_dict()
    for name in RunConfig.UNHASHED:
        data.pop(name, None)
    if data.get("stem_cache") != "on":
        data.pop("stem_cache", None)
    if not data["adapter"].get("peft_options"):
        data["adapter"].pop("peft_options", None)
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- flat settings (CLI flags, specs)

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
