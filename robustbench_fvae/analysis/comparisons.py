"""Paired comparisons of report rows against a reference method, Holm-adjusted per table.

Two rows of one dataset (and spurious strength) are paired by seed: the method's run of seed
``s`` against the reference's run of seed ``s``, both reported under the same selection rule.
For each metric the per-seed differences ``method − reference`` give a mean, its 95 %
t-interval and a paired-t p-value (:mod:`robustbench_fvae.analysis.statistics`); the p-values of
every comparison of one call (one table: all datasets, methods and metrics) are Holm-adjusted,
and each comparison carries the interval at its Holm step's level. A difference is *declared*
only when its Holm-adjusted p-value is below ``alpha`` — then that interval excludes zero.
Accuracies are fractions; the disparity is ``|WG − avg|``, so a negative difference is better.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from robustbench_fvae.analysis.aggregate import GroupRow, RunResult, algorithm_label
from robustbench_fvae.analysis.statistics import (
    bootstrap_worst_group_interval,
    holm_adjust,
    holm_levels,
    paired_difference,
)

COMPARED_METRICS = ("worst_group_acc", "avg_acc", "disparity")
ALPHA = 0.05
# The columns of comparisons.csv, in order.
COMPARISON_COLUMNS = ("dataset", "method", "reference", "metric", "n_pairs", "mean_diff",
                      "ci_low", "ci_high", "p_value", "p_holm", "holm_level", "holm_ci_low",
                      "holm_ci_high", "declared", "selection", "label", "reference_label",
                      "seeds")


@dataclass(frozen=True)
class Comparison:
    """One method − reference difference in one metric on one dataset (fractions)."""

    dataset: str
    method: str  # the row's method with its algorithm, e.g. "fvae", "lora + groupdro"
    reference: str
    metric: str
    n_pairs: int
    mean_diff: float
    ci_low: float
    ci_high: float
    p_value: float
    p_holm: float
    holm_level: float
    holm_ci_low: float
    holm_ci_high: float
    selection: str
    label: str
    reference_label: str
    seeds: tuple[int, ...]

    @property
    def declared(self) -> bool:
        """True when the Holm-adjusted p-value is below :data:`ALPHA` (a difference)."""
        return math.isfinite(self.p_holm) and self.p_holm < ALPHA

    def record(self) -> dict[str, object]:
        """The comparisons.csv row."""
        out = {k: getattr(self, k) for k in COMPARISON_COLUMNS if k not in ("declared", "seeds")}
        out["declared"] = self.declared
        out["seeds"] = " ".join(map(str, self.seeds))
        return {k: out[k] for k in COMPARISON_COLUMNS}


def _by_seed(runs: Sequence[RunResult]) -> dict[int, RunResult]:
    return {int(r.seed): r for r in runs if r.seed is not None}


def compare_to_reference(rows: Sequence[GroupRow], reference: str = "lora", *,
                         metrics: Sequence[str] = COMPARED_METRICS,
                         alpha: float = ALPHA) -> tuple[list[Comparison], list[str]]:
    """Every row against the reference row of its dataset × spurious strength.

    The reference row is the one ERM row of method ``reference`` in that cell; a cell with
    none, or with several (several settings: report with ``--best-by``), is skipped with a
    note. Returns the comparisons (Holm-adjusted together) and the notes.
    """
    notes: list[str] = []
    pending: list[tuple[GroupRow, GroupRow, str, object, tuple[int, ...]]] = []
    cells = dict.fromkeys((r.dataset, r.rho) for r in rows)
    for dataset, rho in cells:
        in_cell = [r for r in rows if (r.dataset, r.rho) == (dataset, rho)]
        refs = [r for r in in_cell if r.method == reference and r.algorithm == "erm"]
        if len(refs) != 1:
            why = "no" if not refs else f"{len(refs)}"
            notes.append(f"{dataset}: {why} {reference} row(s) to compare against; "
                         + ("run the reference method" if not refs else
                            "keep one setting per method with --best-by"))
            continue
        ref = refs[0]
        ref_seeds = _by_seed(ref.runs)
        for row in in_cell:
            if row is ref:
                continue
            mine = _by_seed(row.runs)
            seeds = tuple(sorted(set(mine) & set(ref_seeds)))
            if len(seeds) < 2:
                notes.append(f"{dataset}: {row.label} shares {len(seeds)} seed(s) with "
                             f"{ref.label}; a paired comparison needs at least 2")
                continue
            for metric in metrics:
                diff = paired_difference([mine[s].metrics[metric] for s in seeds],
                                         [ref_seeds[s].metrics[metric] for s in seeds])
                pending.append((row, ref, metric, diff, seeds))
    p_holm = holm_adjust([d.p_value for *_, d, _ in pending])
    levels = holm_levels([d.p_value for *_, d, _ in pending], alpha)
    out = []
    for (row, ref, metric, diff, seeds), ph, level in zip(pending, p_holm, levels):
        low, high = diff.interval(level) if math.isfinite(level) else (math.nan, math.nan)
        out.append(Comparison(
            dataset=row.dataset, method=algorithm_label(row.method, row.algorithm),
            reference=reference, metric=metric, n_pairs=diff.n_pairs, mean_diff=diff.mean_diff,
            ci_low=diff.ci_low, ci_high=diff.ci_high, p_value=diff.p_value, p_holm=ph,
            holm_level=level, holm_ci_low=low, holm_ci_high=high, selection=row.selection,
            label=row.label, reference_label=ref.label, seeds=seeds))
    return out, notes


def run_worst_group_interval(result: RunResult, *, n_boot: int = 2000, seed: int = 0
                             ) -> tuple[float, float]:
    """The group-stratified bootstrap 95 % interval of one run's worst-group accuracy, from
    its per-group sizes and accuracies (groups without images or accuracy left out)."""
    groups = [g for g in result.groups if g.get("acc") is not None and int(g.get("n") or 0) > 0]
    return bootstrap_worst_group_interval([int(g["n"]) for g in groups],
                                          [float(g["acc"]) for g in groups],
                                          n_boot=n_boot, seed=seed)
