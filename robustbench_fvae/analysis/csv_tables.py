"""The report's CSV files (table.csv, groups.csv, runs.csv, curves.csv): their rows as records
of fractions at full precision, and the CSV text they are written as.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence

from robustbench_fvae.analysis.aggregate import (
    CURVE_POINT_METRICS,
    EXTRA_METRICS,
    METRICS,
    CurvePoint,
    GroupRow,
    RunResult,
    derived_of,
    group_labels_text,
)
from robustbench_fvae.analysis.comparisons import run_worst_group_interval


def settings_text(settings: dict[str, str]) -> str:
    return "; ".join(f"{k}={v}" for k, v in settings.items())


def summary_records(rows: Sequence[GroupRow]) -> list[dict[str, object]]:
    """The rows of ``table.csv``: fractions, with mean/std/ci95 of every metric."""
    out = []
    for r in rows:
        choice = r.choice
        rec: dict[str, object] = {
            "dataset": r.dataset, "method": r.method, "algorithm": r.algorithm,
            "settings": settings_text(r.settings) if choice is None else choice.chosen,
            "label": r.label, "spurious_strength": r.rho, "selection": r.selection,
            "split": r.split, "group_labels": r.group_labels,
            "group_labels_training": "+".join(r.group_labels_training),
            "group_labels_selection": r.group_labels_selection,
            "best_by": choice.rule if choice else "",
            "best_by_score": choice.score if choice else None,
            # every candidate setting compared: "text: score (n runs)", best first
            "best_by_candidates": " | ".join(f"{t or 'only one'}: {v!r} ({n})"
                                             for t, v, n in choice.candidates)
            if choice else "",
            "n_configs": len(choice.candidates) if choice else None,
            "n_seeds": r.n,
            "seeds": " ".join("" if s is None else str(s) for s in r.seeds),
        }
        for m in (*METRICS, *EXTRA_METRICS):
            s = r.stats[m]
            rec[f"{m}_mean"], rec[f"{m}_std"], rec[f"{m}_ci95"] = s.mean, s.std, s.ci95
        for k in ("trainable", "inference", "frozen"):
            rec[f"{k}_params"] = r.params.get(k)
        out.append(rec)
    return out


def group_records(rows: Sequence[GroupRow]) -> list[dict[str, object]]:
    """The rows of ``groups.csv``: per-group accuracy (fractions) of every row."""
    return [{"dataset": r.dataset, "method": r.method, "algorithm": r.algorithm,
             "settings": settings_text(r.settings), "label": r.label, "selection": r.selection,
             "split": r.split, "g": gs.g,
             "group": gs.name, "n_samples": gs.n_samples, "n_seeds": gs.acc.n,
             "acc_mean": gs.acc.mean, "acc_std": gs.acc.std, "acc_ci95": gs.acc.ci95}
            for r in rows for gs in r.groups]


def run_records(results: Sequence[RunResult]) -> list[dict[str, object]]:
    """The rows of ``runs.csv``: one per run, its metrics as fractions, with the
    group-stratified bootstrap 95 % interval of its worst-group accuracy."""
    out = []
    for r in results:
        wg_low, wg_high = run_worst_group_interval(r)
        rec: dict[str, object] = {
            "dataset": r.dataset, "method": r.method, "algorithm": r.algorithm,
            "settings": settings_text(r.row_settings),
            "label": r.label, "spurious_strength": r.rho, "seed": r.seed,
            "group_labels": group_labels_text(r.group_labels_training, r.group_labels_selection,
                                              derived_of([r])),
            **{f"val_score_{k}": v for k, v in r.val_scores.items()},
            "selection": r.selection, "selected_epoch": r.selected_epoch, "split": r.split,
            **r.metrics, "wg_boot_low": wg_low, "wg_boot_high": wg_high, **r.extra,
            "trainable_params": r.params.get("trainable"),
            "inference_params": r.params.get("inference"),
            "alarms": "; ".join(r.alarms), "config_hash": r.config_hash, "run_dir": str(r.path),
        }
        out.append(rec)
    return out


def curve_records(points: Sequence[CurvePoint]) -> list[dict[str, object]]:
    """The rows of ``curves.csv``: one per dataset × line × RHO, fractions with mean, sample
    std and 95 % t-interval half-width over seeds of each plotted metric."""
    out = []
    for p in points:
        rec: dict[str, object] = {"dataset": p.dataset, "method": p.method, "label": p.label,
                                  "rho": p.rho, "n_seeds": p.n,
                                  "seeds": " ".join("" if s is None else str(s) for s in p.seeds)}
        for m in CURVE_POINT_METRICS:
            s = p.stats[m]
            rec[f"{m}_mean"], rec[f"{m}_std"], rec[f"{m}_ci95"] = s.mean, s.std, s.ci95
        out.append(rec)
    return out


def to_csv(records: Sequence[dict[str, object]]) -> str:
    """CSV text; floats with full (round-trip) precision, NaN/None as empty cells."""
    if not records:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(records[0]), lineterminator="\n")
    writer.writeheader()
    for rec in records:
        writer.writerow({k: ("" if v is None or (isinstance(v, float) and not math.isfinite(v))
                             else repr(v) if isinstance(v, float) else v)
                         for k, v in rec.items()})
    return buf.getvalue()

