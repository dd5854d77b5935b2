"""The one typed configuration of a run: its fields with their help text, and its hash.

Every setting a run depends on lives here and is written to ``config.json`` of the run. The run
directory is named by :func:`config_hash`, a hash of the canonical config (DomainBed style), so the
same settings always land in the same directory and a finished run is never redone by accident.
Defaults: :mod:`.defaults`; resolution and checks: :mod:`.resolve`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from .defaults import REAL_DEFAULTS, SYNTH_DEFAULTS


def setting(default: Any, help: str) -> Any:  # noqa: A002 - argparse's word
    """A config field with its ``--help`` text on it (``run --help`` and the docs read it)."""
    return field(default=default, metadata={"help": help})


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

    rank: int = setting(16, "rank r of LoRA = size of z1 and z2")
    targets: tuple[str, ...] = setting(("q", "k"),
        "comma-separated: q, k, v (slices of fused qkv) or Linear names (proj, fc1…)")
    # LoRA
    lora_alpha: float = setting(16.0, "LoRA scaling numerator (delta = alpha/r * BAx)")
    lora_dropout: float = setting(0.1, "dropout on the LoRA input")
    # FVAE family
    alpha: float = setting(1.0, "FVAE weight of the reconstruction term R")
    beta: float | None = setting(None,
        "FVAE weight of KL(q1||p1) (and of KL(q2||p2) for vae2lat/bvae2lat); "
        "default 1, 10 for bvae2lat")
    delta: float = setting(1.0, "FVAE weight of the repulsive term G (fvae only)")
    mu_p2: float = setting(1.5, "mean of the z2 prior N(mu_p2, I)")
    encoder_hidden: int = setting(16, "hidden width of each FVAE encoder")
    decoder_hidden: int = setting(128, "hidden width of the FVAE decoder")
    decoder_layers: int = setting(3, "hidden layers of the FVAE decoder")
    fvae_dropout: float = setting(0.1, "dropout inside the FVAE encoders and decoder")
    b_init_std: float = setting(0.02, "std of the FVAE B init (normal)")
    output_scale: float = setting(0.5, "FVAE output scale s_B (delta = s_B * B z1)")
    logvar_clamp: float = setting(20.0, "FVAE log-variance clamp (+-)")
    lambda_task: float = setting(1000.0, "weight of the cross-entropy in the FVAE-family loss")
    lambda_fvae: float = setting(1.0, "weight of the mean per-layer FVAE loss")
    # peft-* methods (robustbench_fvae/methods/peft_zoo.py): fields of the peft config class set
    # on top of the method's defaults, e.g. {"target_modules": ["qkv", "fc1"]}. Hashed only when
    # set, so the hashes of runs recorded before the option existed are unchanged.
    peft_options: dict[str, Any] = field(default_factory=dict, metadata={"help": (
        "peft-* methods: a field of the method's peft config on top of its defaults "
        "(docs/methods.md), value read as YAML, e.g. r=8, use_dora=true, "
        "target_modules=[qkv,fc1]; repeat the flag for more")})


@dataclass
class TrainConfig:
    """Optimisation and evaluation settings. ``None``: the dataset's default (config/resolve.py)."""

    epochs: int | None = setting(None,
        f"max epochs (default: {SYNTH_DEFAULTS['epochs']} synth-*, "
        f"{REAL_DEFAULTS['epochs']} real)")
    batch_size: int | None = setting(None,
        f"training batch (default {SYNTH_DEFAULTS['batch_size']})")
    eval_batch_size: int | None = setting(None,
        f"evaluation batch (default: {SYNTH_DEFAULTS['eval_batch_size']} synth-*, "
        f"{REAL_DEFAULTS['eval_batch_size']} real)")
    lr: float | None = setting(None, "AdamW learning rate (default: 5e-3; 1e-4 for full)")
    weight_decay: float = setting(0.01, "AdamW weight decay (not on biases, norms, 1-D scales)")
    warmup_frac: float = setting(0.1, "fraction of steps of linear warm-up, then linear decay")
    grad_clip: float = setting(1.0, "gradient norm clipping (0: off)")
    patience: int = setting(5,
        "early stopping: training stops once every selection rule (val_wg and "
        "val_avg) has gone N epochs without improving; each rule selects as if it had "
        "stopped alone (0: off)")
    select: str = setting("val_wg",
        "model selection: val_wg (uses val group labels) or val_avg (does not) "
        "(default: val_wg)")
    seed: int = setting(0, "random seed")
    # The data recipe (hashed): augmentation recipe (data/transforms.py: paper, standard, flip,
    # none) and, for synth-* replicas only, the spurious strength rho = fraction of each class's
    # training images on its majority background. None: the dataset's default
    # (robustbench_fvae/config/resolve.py).
    augment: str | None = setting(None,
        "training augmentation recipe: paper, standard, flip or none (default: the "
        "dataset's, see docs/datasets.md)")
    spurious_strength: float | None = setting(None,
        "synth-* only: fraction of each class's training images on its "
        "majority background (default: the real dataset's own)")
    # The training algorithm, orthogonal to the method (robustbench_fvae/algorithms.py): erm,
    # groupdro, resample, reweight, jtt. None in a jtt_* field: the dataset's default.
    algorithm: str = setting("erm",
        "training algorithm, any with any method: erm, groupdro, resample, reweight, "
        "jtt (see docs/algorithms.md) (default: erm)")
    groupdro_eta: float = setting(0.01,
        "GroupDRO step size of the group weights q <- q*exp(eta*loss_g)")
    groupdro_adjustment: float = setting(0.0,
        "GroupDRO generalisation adjustment C (adds C/sqrt(n_g) to the "
        "group losses in the q update; 0: off)")
    groupdro_sampler: str = setting("natural",
        "GroupDRO batches: natural (ERM's order) or balanced (group-balanced "
        "draws, the released code's reweight_groups) (default: natural)")
    jtt_epochs: int | None = setting(None,
        "JTT stage-1 ERM epochs T (default: 1 on synth-*, JTT paper's otherwise)")
    jtt_upweight: int | None = setting(None,
        "JTT upweight lambda: each error image is seen lambda+1 times per epoch "
        "(default: 20 on synth-*, JTT paper's otherwise)")


@dataclass
class RunConfig:
    """Everything one run depends on. Paths and the device are recorded but not hashed."""

    method: str = "fvae"
    dataset: str = setting("synth-waterbirds",
        "dataset (required): real ones read from --data-root, synth-* offline "
        "replicas built there on first use")
    backbone: str | None = setting(None,
        "timm model name (default: our offline ViT for synth-*, "
        "vit_base_patch16_224.orig_in21k otherwise)")
    weights: str | None = setting(None,
        "local pretrained weights file (.safetensors/.pth) for the backbone")
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data_root: str = setting("data", "folder holding the datasets (replicas under DIR/synth)")
    out: str = setting("runs/out", "output folder; the run goes to OUT/<dataset>/<method>/<hash>")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    num_workers: int | None = setting(None,
        "data loader workers (default: 0 on CPU, min(8, cores) on CUDA)")
    checkpoint_every: int = setting(0, "also checkpoint every N steps (0: at epoch ends only)")
    threads: int | None = setting(None,
        "CPU threads for torch (default: torch's own choice, all cores)")
    # Filled by config.resolve.resolve_config: what the weights and the data were built from
    # (backbones.backbone_digest; the replica builder's version for synth-*), so that a changed
    # backbone or replica never counts as the same run. Given explicitly, they are checked.
    backbone_digest: str | None = setting(None,
        "filled in by the run (a digest of the backbone's weights, in the hash); "
        "given, the run refuses to start unless this machine's backbone has it")
    replica_version: int | None = setting(None,
        "filled in by the run for synth-* (the replica builder's version, in the "
        "hash); given, it is checked the same way")
    # The offline backbone's frozen stem read from features computed once per replica image and
    # view (robustbench_fvae/stem_cache.py): auto (on wherever it applies), on, off. Resolved
    # to on/off by config.resolve.resolve_config; hashed only when on, so the hashes of runs that
    # compute the stem per batch (every run recorded before the cache) are unchanged.
    stem_cache: str = setting("auto",
        "offline backbone on synth-*: read the frozen stem's output from features "
        "computed once per replica image and view (auto: wherever the recipe is "
        "flip or none; on; off: compute it every batch) (default: auto)")

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


