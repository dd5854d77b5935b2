"""Sweeps: spec files (methods × datasets × hyperparameters × seeds), launchers, status.

Public API::

    load_spec(path) -> SweepSpec            # validated; SpecError names the bad key
    expand(spec, out=None, data_root=None) -> list[PlannedRun]
    launch_local(spec, runs, state, jobs=N)
    launch_submitit(spec, runs, state, cluster="slurm" | "local")
    SweepState(out, spec.name); collect_statuses(runs, state)
"""

from robustbench_fvae.sweeps.launchers import LauncherError, launch_local, launch_submitit
from robustbench_fvae.sweeps.spec import (
    PlannedRun,
    SpecError,
    SweepSpec,
    expand,
    load_spec,
    parse_spec,
    run_flags,
)
from robustbench_fvae.sweeps.state import SweepState, run_status
from robustbench_fvae.sweeps.views import collect_statuses, format_plan, format_status

__all__ = [
    "LauncherError",
    "PlannedRun",
    "SpecError",
    "SweepSpec",
    "SweepState",
    "collect_statuses",
    "expand",
    "format_plan",
    "format_status",
    "launch_local",
    "launch_submitit",
    "load_spec",
    "parse_spec",
    "run_flags",
    "run_status",
]
