"""``python -m robustbench_fvae.sweep SPEC``: many runs (methods × datasets × hparams × seeds).

Expands the YAML spec (see :mod:`robustbench_fvae.sweeps.spec` and ``runs/README.md``) into runs
named by their config hash, skips the ones already done, and launches the rest: on this machine
(``--launcher local``, ``--jobs N`` at a time) or as one Slurm job array through submitit
(``--launcher slurm``). Killed or preempted runs resume from their checkpoint when the sweep is
launched again. ``--dry-run`` lists the runs; ``--status`` tells what is done, running, failed
(with the tail of its log) or missing. A spec with ``dfr: true`` then makes the DFR run of each
finished run here (``python -m robustbench_fvae.dfr RUN_DIR --wait``): after the local launcher,
after waiting for submitit jobs, or, on Slurm without ``--wait``, when the sweep is launched
again once its jobs are done.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from robustbench_fvae.cli import (
    BAD_INPUT_ERRORS,
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    ArgumentParser,
    add_data_root_option,
    command,
    fail,
)
from robustbench_fvae.record import store
from robustbench_fvae.sweeps.spec import SpecError, slurm_section

LAUNCHERS = ("local", "slurm", "submitit-local")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m robustbench_fvae.sweep",
        usage="%(prog)s SPEC [--launcher local|slurm|submitit-local] [--jobs N] [--dry-run | "
              "--status] [options]",
        description="Many runs (methods × datasets × hyperparameters × seeds) from a YAML spec, "
                    "here or on Slurm; done runs are skipped, interrupted ones resume.",
        epilog="Exit status: 0 all runs done (or submitted), 1 some run failed, 2 bad spec or "
               "launcher, 130 interrupted (runs checkpointed; relaunch to resume).")
    parser.add_argument("spec", metavar="SPEC", help="sweep spec file (YAML), e.g. "
                        "runs/table5-synth.yaml")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="local",
                        help="local: subprocesses here; slurm: one job array via submitit; "
                             "submitit-local: the Slurm code path with submitit's local "
                             "executor (debugging)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="local launcher: runs at a time (default 1)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch threads per run (default: cores // jobs locally, "
                             "cpus_per_task on Slurm)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder (default: the spec's settings.out, else runs/out)")
    add_data_root_option(parser, None,
                         "dataset folder (default: the spec's settings.data_root, else data)")
    parser.add_argument("--datasets", nargs="+", default=None, metavar="NAME",
                        help="only the runs on these datasets of the spec (e.g. to finish one "
                             "replica's search first); default: all")
    parser.add_argument("--skip-published", default=None, metavar="DIR",
                        help="leave out the runs whose finished record is published in DIR "
                             "(<dataset>/<method>/<hash>/, e.g. results/protocol-peft/final): "
                             "a fresh clone does not rerun what another machine published")
    parser.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                        help="override a Slurm resource of the spec's slurm section, e.g. "
                             "--slurm partition=gpu --slurm timeout_min=600 (repeatable)")
    parser.add_argument("--wait", action="store_true",
                        help="slurm: wait for the jobs to finish instead of returning")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--dry-run", action="store_true",
                      help="list every run (dataset, method, seed, settings, hash, status) and "
                           "the totals; run nothing")
    what.add_argument("--status", action="store_true",
                      help="done / running / failed / missing counts; the tail of each failed "
                           "run's log")
    parser.add_argument("--tail", type=int, default=10, metavar="N",
                        help="--status: log lines shown per failed run (default 10)")
    return parser


def slurm_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["partition=gpu", "timeout_min=600"]`` → ``{"partition": "gpu", "timeout_min": 600}``
    (values parsed as YAML scalars, then checked like the spec's slurm section)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(f"--slurm expects KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return slurm_section(out)


def skip_published(runs: Sequence[Any], folder: str) -> list[Any]:
    """``runs`` without those whose record under ``folder/<dataset>/<method>/<hash>`` is done
    (and not done here: a run finished here is reported as done anyway)."""
    from robustbench_fvae.publish import published_dir

    if not Path(folder).is_dir():
        raise SpecError(f"--skip-published {folder}: no such folder (a published stage, e.g. "
                        "results/protocol-peft/final)")
    kept = [r for r in runs if store.is_done(r.run_dir)
            or not store.is_done(published_dir(folder, r.dataset, r.method, r.hash))]
    if len(kept) < len(runs):
        print(f"{len(runs) - len(kept)} of {len(runs)} run(s) published in {folder}: left out",
              flush=True)
    return kept


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from robustbench_fvae.sweeps import (
        LauncherError,
        SweepState,
        collect_statuses,
        expand,
        format_plan,
        format_status,
        launch_local,
        launch_submitit,
        load_spec,
    )
    from robustbench_fvae.sweeps.budget import budget_warnings
    from robustbench_fvae.sweeps.launchers import launch_dfr, prepare_offline_assets

    try:
        if args.threads is not None and args.threads < 1:
            raise LauncherError(f"--threads must be >= 1, got {args.threads}")
        spec = load_spec(args.spec)
        runs = expand(spec, out=args.out, data_root=args.data_root)
        if args.datasets:
            unknown = sorted(set(args.datasets) - set(spec.datasets))
            if unknown:
                raise SpecError(f"--datasets {' '.join(unknown)}: not among the spec's datasets "
                                f"({', '.join(spec.datasets)})")
            runs = [r for r in runs if r.dataset in args.datasets]
            if not runs:
                raise SpecError(f"--datasets {' '.join(args.datasets)}: the spec has no runs "
                                "there")
        if args.skip_published:
            runs = skip_published(runs, args.skip_published)
            if not runs:
                print(f"sweep {spec.name}: every run is published in {args.skip_published}; "
                      "nothing to run")
                return EXIT_OK
        for line in budget_warnings(spec):
            print(f"warning: {line}", file=sys.stderr, flush=True)
        state = SweepState(runs[0].config.out, spec.name)  # every run shares the out folder
        if args.dry_run or args.status:
            statuses = collect_statuses(runs, state)
            text = format_plan(spec, runs, statuses) if args.dry_run else \
                format_status(spec, runs, statuses, args.tail)
            try:
                print(text, flush=True)
            except BrokenPipeError:  # e.g. piped into `head`: not an error
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        if args.launcher != "slurm":  # Slurm tasks prepare on their nodes
            prepare_offline_assets(runs)
        if args.launcher == "local":
            results = launch_local(spec, runs, state, jobs=args.jobs, threads=args.threads)
        else:
            resources = {**spec.slurm, **slurm_overrides(args.slurm)}
            if args.threads:
                resources["cpus_per_task"] = args.threads
            cluster = "slurm" if args.launcher == "slurm" else "local"
            results = launch_submitit(spec, runs, state, cluster=cluster, resources=resources,
                                      wait=True if cluster == "local" else args.wait)
        # Slurm jobs submitted and not waited for: the DFR step comes with a later launch
        waited = args.launcher != "slurm" or args.wait or not results and all(
            store.is_done(r.run_dir) for r in runs)
        if spec.dfr and waited:
            dfr_failed = [h for h, code in launch_dfr(spec, runs, threads=args.threads).items()
                          if code != 0]
            results = {**results, **{f"dfr:{h}": 1 for h in dfr_failed}}
        elif spec.dfr:
            print(f"DFR step (dfr: true): launch this sweep again once its jobs are done, "
                  f"e.g. python -m robustbench_fvae.sweep {args.spec} --launcher slurm")
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (SpecError, LauncherError) as err:  # a bad spec, or a launcher this machine lacks
        fail(err)
        return EXIT_BAD_INPUT
    except BAD_INPUT_ERRORS as err:  # e.g. a replica or backbone that cannot be prepared
        return fail(err)
    failed = [h for h, code in results.items() if code != 0]
    if failed:
        print(f"{len(failed)} run(s) did not finish; see: python -m robustbench_fvae.sweep "
              f"{args.spec} --status", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
