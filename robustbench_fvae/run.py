"""``python -m robustbench_fvae.run --method fvae --dataset synth-waterbirds``: one benchmark run.

Trains, evaluates val and test every epoch, selects an epoch (validation worst-group accuracy by
default), writes the run record (docs/design.md) and prints a summary; the last line of output
is the run directory. Every setting of :mod:`robustbench_fvae.config` is a flag (``_`` → ``-``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from collections.abc import Sequence

from .cli import (
    EXIT_OK,
    EXIT_PREEMPTED,
    ArgumentParser,
    add_lock_options,
    add_progress_option,
    command,
    fail,
)
from .config import (
    ALGORITHMS,
    GROUPDRO_SAMPLERS,
    REAL_DEFAULTS,
    SELECTION_RULES,
    SYNTH_DEFAULTS,
    AdapterConfig,
    RunConfig,
    TrainConfig,
    config_from_settings,
)
from .data import dataset_names
from .data.transforms import AUGMENT_RECIPES
from .methods import method_names
from .stem_cache import STEM_CACHE_CHOICES

DATASETS = tuple(dataset_names())
HELP = {
    "method": f"adaptation method (required): {', '.join(method_names())}",
    "dataset": "dataset (required): real ones read from --data-root, synth-* offline "
               "replicas built there on first use",
    "backbone": "timm model name (default: our offline ViT for synth-*, "
                "vit_base_patch16_224.orig_in21k otherwise)",
    "weights": "local pretrained weights file (.safetensors/.pth) for the backbone",
    "data_root": "folder holding the datasets (replicas under DIR/synth)",
    "out": "output folder; the run goes to OUT/<dataset>/<method>/<hash>",
    "device": "auto, cpu, cuda or cuda:N",
    "num_workers": "data loader workers (default: 0 on CPU, min(8, cores) on CUDA)",
    "checkpoint_every": "also checkpoint every N steps (0: at epoch ends only)",
    "threads": "CPU threads for torch (default: torch's own choice, all cores)",
    "backbone_digest": "filled in by the run (a digest of the backbone's weights, in the hash); "
                       "given, the run refuses to start unless this machine's backbone has it",
    "replica_version": "filled in by the run for synth-* (the replica builder's version, in the "
                       "hash); given, it is checked the same way",
    "stem_cache": "offline backbone on synth-*: read the frozen stem's output from features "
                  "computed once per replica image and view (auto: wherever the recipe is "
                  "flip or none; on; off: compute it every batch) (default: auto)",
    "rank": "rank r of LoRA = size of z1 and z2",
    "targets": "comma-separated: q, k, v (slices of fused qkv) or Linear names (proj, fc1…)",
    "lora_alpha": "LoRA scaling numerator (delta = alpha/r * BAx)",
    "lora_dropout": "dropout on the LoRA input",
    "alpha": "FVAE weight of the reconstruction term R",
    "beta": "FVAE weight of KL(q1||p1) (and of KL(q2||p2) for vae2lat/bvae2lat); "
            "default 1, 10 for bvae2lat",
    "delta": "FVAE weight of the repulsive term G (fvae only)",
    "mu_p2": "mean of the z2 prior N(mu_p2, I)",
    "encoder_hidden": "hidden width of each FVAE encoder",
    "decoder_hidden": "hidden width of the FVAE decoder",
    "decoder_layers": "hidden layers of the FVAE decoder",
    "fvae_dropout": "dropout inside the FVAE encoders and decoder",
    "b_init_std": "std of the FVAE B init (normal)",
    "output_scale": "FVAE output scale s_B (delta = s_B * B z1)",
    "logvar_clamp": "FVAE log-variance clamp (+-)",
    "lambda_task": "weight of the cross-entropy in the FVAE-family loss",
    "lambda_fvae": "weight of the mean per-layer FVAE loss",
    "peft_options": "peft-* methods: a field of the method's peft config on top of its "
                    "defaults (docs/methods.md), value read as YAML, e.g. r=8, use_dora=true, "
                    "target_modules=[qkv,fc1]; repeat the flag for more",
    "epochs": f"max epochs (default: {SYNTH_DEFAULTS['epochs']} synth-*, "
              f"{REAL_DEFAULTS['epochs']} real)",
    "batch_size": f"training batch (default {SYNTH_DEFAULTS['batch_size']})",
    "eval_batch_size": f"evaluation batch (default: {SYNTH_DEFAULTS['eval_batch_size']} synth-*, "
                       f"{REAL_DEFAULTS['eval_batch_size']} real)",
    "lr": "AdamW learning rate (default: 5e-3; 1e-4 for full)",
    "weight_decay": "AdamW weight decay (not on biases, norms, 1-D scales)",
    "warmup_frac": "fraction of steps of linear warm-up, then linear decay",
    "grad_clip": "gradient norm clipping (0: off)",
    "patience": "early stopping: training stops once every selection rule (val_wg and "
                "val_avg) has gone N epochs without improving; each rule selects as if it had "
                "stopped alone (0: off)",
    "select": "model selection: val_wg (uses val group labels) or val_avg (does not) "
              "(default: val_wg)",
    "seed": "random seed",
    "augment": "training augmentation recipe: paper, standard, flip or none (default: the "
               "dataset's, see docs/datasets.md)",
    "spurious_strength": "synth-* only: fraction of each class's training images on its "
                         "majority background (default: the real dataset's own)",
    "algorithm": "training algorithm, any with any method: erm, groupdro, resample, reweight, "
                 "jtt (see docs/algorithms.md) (default: erm)",
    "groupdro_eta": "GroupDRO step size of the group weights q <- q*exp(eta*loss_g)",
    "groupdro_adjustment": "GroupDRO generalisation adjustment C (adds C/sqrt(n_g) to the "
                           "group losses in the q update; 0: off)",
    "groupdro_sampler": "GroupDRO batches: natural (ERM's order) or balanced (group-balanced "
                        "draws, the released code's reweight_groups) (default: natural)",
    "jtt_epochs": "JTT stage-1 ERM epochs T (default: 1 on synth-*, JTT paper's otherwise)",
    "jtt_upweight": "JTT upweight lambda: each error image is seen lambda+1 times per epoch "
                    "(default: 20 on synth-*, JTT paper's otherwise)",
}
CHOICES = {"method": method_names(), "select": SELECTION_RULES, "dataset": DATASETS,
           "algorithm": ALGORITHMS, "groupdro_sampler": GROUPDRO_SAMPLERS,
           "augment": AUGMENT_RECIPES, "stem_cache": STEM_CACHE_CHOICES}
REQUIRED = ("method", "dataset")
METAVARS = {int: "N", float: "X", str: "TEXT"}
NAMED_METAVARS = {"backbone": "NAME", "weights": "FILE", "data_root": "DIR", "out": "DIR",
                  "device": "DEVICE", "targets": "LIST"}
SHORT_USAGE = ("%(prog)s --method METHOD --dataset DATASET [options]\n"
               f"  METHOD: {', '.join(method_names())}\n  DATASET: {', '.join(DATASETS)}")


def _flag_type(annotation) -> type:
    """The scalar type of a field annotation (``int | None`` → int); tuples parse as text."""
    kinds = [a for a in (typing.get_args(annotation) or (annotation,)) if a is not type(None)]
    return kinds[0] if kinds and kinds[0] in (int, float, str) else str


def _help(name: str, default) -> str:
    """The flag's help with its default, stated once (help texts that explain a default that
    depends on the dataset or method say so themselves)."""
    text = HELP.get(name, "")
    if name in REQUIRED or "default" in text or default is None:
        return text
    return f"{text} (default: {default})"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m robustbench_fvae.run", usage=SHORT_USAGE,
        description="One benchmark run: train, evaluate val and test every epoch, select an "
                    "epoch, write the run record; the last line printed is the run directory.",
        epilog="Exit codes: 0 done, 1 runtime failure, 2 bad input, 143 stopped by SIGTERM "
               "(relaunch to resume).")
    base = RunConfig()
    sections = [("run", RunConfig, base), ("adapter (lora, FVAE family, peft-*)", AdapterConfig,
                base.adapter), ("training", TrainConfig, base.train)]
    hints = typing.get_type_hints(RunConfig) | typing.get_type_hints(AdapterConfig) | \
        typing.get_type_hints(TrainConfig)
    for title, cls, defaults in sections:
        group = parser.add_argument_group(title)
        for field in dataclasses.fields(cls):
            if field.name in ("adapter", "train"):
                continue
            if field.name == "peft_options":
                group.add_argument("--peft-option", dest="peft_options", action="append",
                                   default=None, metavar="KEY=VALUE", help=HELP["peft_options"])
                continue
            default = getattr(defaults, field.name)
            if field.name == "targets":
                default = ",".join(default)
            kind = _flag_type(hints[field.name])
            required = field.name in REQUIRED
            group.add_argument(
                f"--{field.name.replace('_', '-')}", dest=field.name,
                default=None if required else default, required=required, type=kind,
                choices=CHOICES.get(field.name), help=_help(field.name, default),
                metavar=field.name.upper() if field.name in CHOICES
                else NAMED_METAVARS.get(field.name, METAVARS[kind]))
    add_lock_options(parser, "this run")
    add_progress_option(parser)
    return parser


LAUNCH_FLAGS = ("force", "wait", "no_progress")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    settings = {k: v for k, v in vars(args).items() if k not in LAUNCH_FLAGS}
    return config_from_settings(settings)


def format_summary(metrics: dict) -> str:
    """A short human summary of a run's selected-epoch metrics (WG, averages, per group)."""
    lines = [f"selected epoch {metrics['selected_epoch']} by {metrics['selection']} "
             f"({metrics['selection_description']})"]
    header = f"{'split':6} {'WG':>6} {'avg':>6} {'adj_avg':>7} {'mean_grp':>8} {'disp':>6} " \
             f"{'ECE':>6}"
    lines.append(header)
    for split in ("val", "test"):
        m = metrics[split]
        lines.append(f"{split:6} {m['worst_group_acc']:6.3f} {m['avg_acc']:6.3f} "
                     f"{m['adj_avg_acc']:7.3f} {m['mean_group_acc']:8.3f} {m['disparity']:6.3f} "
                     f"{m['ece']:6.3f}")
    lines.append("test groups:")
    for grp in metrics["test"]["groups"]:
        acc = "  n/a" if grp["acc"] is None else f"{grp['acc']:.3f}"
        lines.append(f"  g={grp['g']:<2} {grp['name']:28} n={grp['n']:<6} acc={acc}")
    lines.append("avg = plain test accuracy; adj_avg = group accuracies weighted by training "
                 "group counts (WILDS); mean_grp = mean of group accuracies; disp = |WG - avg|")
    cf = metrics.get("counterfactual")
    if cf:  # replicas only (docs/design.md, Metrics)
        lines.append(f"counterfactual test: core-only acc {cf['core_only_acc']:.3f} (class-"
                     f"balanced; chance {1 / len(cf['core_only_class_acc']):.3f}), background "
                     f"reliance {cf['background_reliance']:.3f} (0: background alone never moves "
                     f"the prediction, 1: it decides it)")
        if "background_swapped_acc" in cf:
            lines.append(f"background-swapped test (each object on its class's other "
                         f"background): acc {cf['background_swapped_acc']:.3f} "
                         f"(class-balanced)")
    for alarm in metrics.get("alarms", []):
        lines.append(f"ALARM: {alarm}")
    return "\n".join(lines)


@command
def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: see :mod:`robustbench_fvae.cli` (0 done, 1 failure, 2 bad input, 143
    SIGTERM)."""
    args = build_parser().parse_args(argv)
    from .engine.checkpoint import Preempted, TrainingError
    from .jobs.train import run
    from .record.store import RunInUseError

    try:
        cfg = config_from_args(args)
        result = run(cfg, force=args.force, progress=not args.no_progress, wait=args.wait)
    except Preempted as stop:
        print(str(stop), file=sys.stderr)
        return EXIT_PREEMPTED
    except (ValueError, FileNotFoundError, LookupError, TrainingError, RunInUseError) as err:
        return fail(err)
    finally:
        _leave_process_group()
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        print(format_summary(result.metrics))
        print(result.run_dir)
    return EXIT_OK


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
