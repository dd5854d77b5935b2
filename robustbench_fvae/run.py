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
    SELECTION_RULES,
    STEM_CACHE_CHOICES,
    AdapterConfig,
    RunConfig,
    TrainConfig,
    config_from_settings,
)
from .data import dataset_names
from .data.transforms import AUGMENT_RECIPES
from .methods import method_names

DATASETS = tuple(dataset_names())
# Help texts live on the config's fields (config.setting); the method's lists the registry.
HELP = {"method": f"adaptation method (required): {', '.join(method_names())}"}
CHOICES = {"method": method_names(), "select": SELECTION_RULES, "dataset": DATASETS,
           "algorithm": ALGORITHMS, "groupdro_sampler": GROUPDRO_SAMPLERS,
           "augment": AUGMENT_RECIPES, "stem_cache": STEM_CACHE_CHOICES}
REQUIRED = ("method", "dataset")
FIELD_HELP = {f.name: f.metadata.get("help", "")
              for cls in (RunConfig, AdapterConfig, TrainConfig) for f in dataclasses.fields(cls)}
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
    text = HELP.get(name) or FIELD_HELP.get(name, "")
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
                                   default=None, metavar="KEY=VALUE",
                                   help=FIELD_HELP["peft_options"])
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
