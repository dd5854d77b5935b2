"""Text views of a sweep: the ``--dry-run`` plan and the ``--status`` report."""

from __future__ import annotations

import shlex
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from robustbench_fvae.record import store
from robustbench_fvae.sweeps.spec import (
    PlannedRun,
    SweepSpec,
    dfr_run_dir,
    format_value,
    varying_settings,
)
from robustbench_fvae.sweeps.state import (
    STATUSES,
    RunStatus,
    SweepState,
    run_status,
    slurm_job_states,
    tail,
)

MAX_LISTED = 25


def collect_statuses(runs: Sequence[PlannedRun], state: SweepState) -> list[RunStatus]:
    """The status of every run, from done markers, the state file and (Slurm) sacct."""
    entries = state.load()
    jobs = [str(e["job_id"]) for r in runs if (e := entries.get(r.hash)) and e.get("job_id")
            and e.get("launcher") == "slurm"]
    slurm = slurm_job_states(jobs) if jobs else {}
    return [run_status(r.run_dir, entries.get(r.hash), slurm) for r in runs]


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else format_value(value)


def _counts_line(statuses: Sequence[RunStatus]) -> str:
    counts = Counter(s.status for s in statuses)
    shown = [s for s in STATUSES if s != "queued" or counts[s]]  # queued only exists on Slurm
    return ", ".join(f"{counts[s]} {s}" for s in shown)


def _size_line(spec: SweepSpec, runs: Sequence[PlannedRun]) -> str:
    if spec.cells:
        n_configs = sum(len(t) for by_method in spec.cells.values() for t in by_method.values())
        total = n_configs * len(spec.seeds)
        size = f"{n_configs} chosen configuration(s) × {len(spec.seeds)} seed(s)"
    else:
        trials = len(spec.trials())
        total = len(spec.methods) * len(spec.datasets) * trials * len(spec.seeds)
        size = (f"{len(spec.methods)} method(s) × {len(spec.datasets)} dataset(s) × {trials} "
                f"trial(s) × {len(spec.seeds)} seed(s)")
    merged = total - len(runs)
    return (f"{size} = {len(runs)} runs"
            + (f" ({merged} duplicate(s) merged: equal config hashes)" if merged else ""))


def format_plan(spec: SweepSpec, runs: Sequence[PlannedRun], statuses: Sequence[RunStatus]
                ) -> str:
    """Every run (dataset, method, seed, varying settings, hash, status) and the totals."""
    out_dir = Path(runs[0].config.out) if runs else None
    lines = [f"sweep {spec.name}: {_size_line(spec, runs)}", f"output folder: {out_dir}"]
    if spec.settings:
        shared = " ".join(f"{k}={format_value(v)}" for k, v in spec.settings.items())
        lines.append(f"shared settings: {shared}")
    for title, overrides in (("per dataset", spec.per_dataset), ("per method", spec.per_method)):
        for name, settings in overrides.items():
            shown = " ".join(f"{k}={format_value(v)}" for k, v in settings.items())
            lines.append(f"{title} {name}: {shown}")
    if spec.slurm:
        shown = " ".join(f"{k}={v}" for k, v in spec.slurm.items())
        lines.append(f"slurm resources (--launcher slurm): {shown}")
    varying = varying_settings(list(runs))
    rows = [["#", "dataset", "method", "seed", *varying, "hash", "status"]]
    for i, (run, st) in enumerate(zip(runs, statuses), start=1):
        rows.append([str(i), run.dataset, run.method, str(run.seed),
                     *(_short(run.settings.get(k)) for k in varying), run.hash, st.status])
    lines += _table(rows)
    todo = [r for r, s in zip(runs, statuses) if s.status != "done"]
    lines.append(f"totals: {len(runs)} runs — {_counts_line(statuses)}; a launch would start "
                 f"{sum(s.status not in ('done', 'running', 'queued') for s in statuses)}")
    if todo:
        lines.append("command of the first run not done: python -m robustbench_fvae.run "
                     + shlex.join(todo[0].flags()))
    if spec.dfr:
        lines.append(_dfr_line(runs))
    return "\n".join(lines)


def _dfr_line(runs: Sequence[PlannedRun]) -> str:
    """The DFR step of a ``dfr: true`` spec: how many DFR runs exist of how many."""
    made = sum(store.is_done(dfr_run_dir(r)) for r in runs)
    return (f"then DFR on each finished run (python -m robustbench_fvae.dfr RUN_DIR --wait, a "
            f"derived run beside it): {made} of {len(runs)} DFR runs done")


def format_status(spec: SweepSpec, runs: Sequence[PlannedRun], statuses: Sequence[RunStatus],
                  tail_lines: int = 10) -> str:
    """Counts by status; the running/queued/missing runs; the failed ones with their log tail."""
    out_dir = Path(runs[0].config.out) if runs else None
    lines = [f"sweep {spec.name} ({out_dir}): {len(runs)} runs — {_counts_line(statuses)}"]
    by_status: dict[str, list[tuple[PlannedRun, RunStatus]]] = {}
    for run, st in zip(runs, statuses):
        by_status.setdefault(st.status, []).append((run, st))
    for status in ("running", "queued", "missing"):
        items = by_status.get(status, [])
        if not items:
            continue
        lines.append(f"{status}:")
        for run, st in items[:MAX_LISTED]:
            lines.append(f"  {run.describe()}: {st.detail}")
        if len(items) > MAX_LISTED:
            lines.append(f"  … and {len(items) - MAX_LISTED} more")
    failed = by_status.get("failed", [])
    if failed:
        lines.append("failed:")
        for run, st in failed:
            lines.append(f"  {run.describe()}: {st.detail}; log {run.log_path}")
            lines += [f"    | {line}" for line in tail(run.log_path, tail_lines)]
    if spec.dfr:
        lines.append(_dfr_line(runs))
    if by_status.get("missing") or failed:
        lines.append(f"relaunch to run the missing/failed ones: python -m robustbench_fvae.sweep "
                     f"{spec.path or spec.name}")
    return "\n".join(lines)
