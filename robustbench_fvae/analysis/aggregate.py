"""Collect finished runs and aggregate their selected-epoch metrics over seeds
(docs/design.md).

Pipeline: :func:`~robustbench_fvae.record.view.collect_runs` (read every run record under a
folder; finished, unfinished and unreadable runs are told apart) → :func:`run_results` (one
:class:`RunResult` per finished run: the metrics of the epoch chosen by a selection rule) →
:func:`aggregate` (one :class:`GroupRow` per dataset × method × differing settings, statistics
over seeds). How one run's record is read (settings, selection, algorithm) is
:mod:`robustbench_fvae.record.view`'s.

Conventions:

* Accuracies and ECE are fractions in [0, 1] here; tables turn them into percent.
* Rows are formed *within* a dataset/method: the run settings that differ between its runs
  (other than the seed and the unhashed where/how fields: data root, output folder, device, …)
  name the row, e.g. ``fvae (beta=10)``. Settings shared by all its runs are not shown.
* ``std`` is the sample standard deviation (``ddof=1``); ``ci95`` is the half-width of the 95 %
  confidence interval of the mean under a t-distribution with ``n − 1`` degrees of freedom,
  ``t_{0.975, n−1} · std / √n``. Both are NaN for a single seed (undefined, not zero).
* Epochs are shown exactly as recorded (``history.jsonl`` ``epoch``, ``metrics.json``
  ``selected_epoch``): counted from 1, epoch 1 = after the first pass over the training data.
* The spurious strength RHO of a replica (issue 10) is a run setting like any other, so runs of
  different RHO form different rows; :func:`robustness_curves` lines the rows of one dataset ×
  method up against RHO. It and the counterfactual metrics (core-only accuracy, background
  reliance) are read through :func:`spurious_strength` and :func:`counterfactual_metric` only.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from robustbench_fvae.config import ALGORITHMS
from robustbench_fvae.methods import method_order
from robustbench_fvae.record.derived import DerivedFacts
from robustbench_fvae.record.io import RecordError

# Collection, collect_runs, RunsDirNotFoundError, default_spurious_strength,
# jtt_stage1_hashes, resume_command and validation_scores moved to record.view; they are
# imported here under their old path too (``name as name``: re-exported).
from robustbench_fvae.record.view import (
    CURVE_METRICS,
    METRICS,
    SPLITS,
    SPURIOUS_STRENGTH_SETTING,
    RunRecord,
    alarms_at,
    counterfactual_metric,
    provenance,
    relevant_settings,
    run_settings,
    selected,
    spurious_strength,
    to_float,
    training_curve,
)
from robustbench_fvae.record.view import Collection as Collection
from robustbench_fvae.record.view import RunsDirNotFoundError as RunsDirNotFoundError
from robustbench_fvae.record.view import collect_runs as collect_runs
from robustbench_fvae.record.view import default_spurious_strength as default_spurious_strength
from robustbench_fvae.record.view import jtt_stage1_hashes as jtt_stage1_hashes
from robustbench_fvae.record.view import resume_command as resume_command
from robustbench_fvae.record.view import validation_scores as validation_scores
from robustbench_fvae.selection import RULES, get_rule

METRIC_LABELS = {
    "worst_group_acc": "WG",
    "avg_acc": "Avg",
    "adj_avg_acc": "Adj. avg",
    "mean_group_acc": "Mean-group",
    "disparity": "Disparity",
    "adj_disparity": "Adj. disparity",
    "ece": "ECE",
}
# Whether larger is better (used to bold the best entry of a column).
HIGHER_IS_BETTER = {"worst_group_acc": True, "avg_acc": True, "adj_avg_acc": True,
                    "mean_group_acc": True, "disparity": False, "adj_disparity": False,
                    "ece": False}
# Dataset order of the paper's Table 5 (Animals, Waterbirds, CelebA), real before replicas.
DATASET_ORDER = ("animals", "waterbirds", "celeba", "synth-animals", "synth-waterbirds",
                 "synth-celeba")
# Counterfactual metrics of the replicas (issue 10): recorded by runs on a synth-* dataset only.
EXTRA_METRICS = ("core_only_acc", "background_reliance")
METRIC_LABELS.update({"core_only_acc": "Core-only", "background_reliance": "Bg. reliance"})
HIGHER_IS_BETTER.update({"core_only_acc": True, "background_reliance": False})
# Table order of the training algorithms; a derived run (DFR) follows its parent's algorithm.
ALGORITHM_ORDER = ALGORITHMS


class ReportError(ValueError):
    """The runs cannot be reported (no finished run, bad option)."""


# --------------------------------------------------------------------------- per-run results


@dataclass
class RunResult:
    """The metrics one finished run reports under a selection rule (fractions in [0, 1])."""

    path: Path
    dataset: str
    method: str
    seed: int | None
    config_hash: str
    selection: str
    selected_epoch: int | None
    split: str
    metrics: dict[str, float]
    groups: list[dict[str, Any]]
    params: dict[str, int]
    settings: dict[str, Any]
    alarms: list[str] = field(default_factory=list)
    label: str = ""  # set by :func:`assign_labels`
    row_settings: dict[str, str] = field(default_factory=dict)
    base_label: str = ""  # without the spurious strength: one curve line (assign_labels)
    # core-only accuracy and background reliance (NaN when the run did not record them)
    extra: dict[str, float] = field(default_factory=dict)
    # one entry per history record: {"epoch": int, "val": {metric: value}, "test": {...}}
    curve: list[dict[str, Any]] = field(default_factory=list)
    # "erm", "groupdro", …; a DFR run: "dfr" on an ERM parent, else e.g. "groupdro+dfr"
    algorithm: str = "erm"
    # a derived run's facts, as its record says (its selection is named by its algorithm)
    derived_facts: DerivedFacts | None = None
    # the splits whose group labels trained the run ("train": GroupDRO/ReSample/ReWeight,
    # "val": DFR) and whether its selection (epoch rule, DFR's C) read validation group labels
    group_labels_training: tuple[str, ...] = ()
    group_labels_selection: bool = False
    # {rule: validation score the rule maximises, at the epoch it selects} (--best-by); a DFR
    # run carries its parent's (its own validation numbers are in-sample)
    val_scores: dict[str, float] = field(default_factory=dict)

    @property
    def derived(self) -> bool:  # a derived run (DFR): no training history of its own
        return self.derived_facts is not None

    @property
    def rho(self) -> float | None:
        """The run's spurious strength RHO; None for a real dataset (a replica run recorded
        without one trained at the replica's default, filled in by :func:`run_settings`)."""
        return spurious_strength(self.settings)



def run_results(
    runs: Iterable[RunRecord], select: str | None = None, split: str = "test"
) -> tuple[list[RunResult], list[tuple[Path, str]]]:
    """The reported metrics of each finished run, and (run, reason) of runs that cannot serve
    ``select``.

    ``select`` None keeps each run's own selection (``metrics.json``); ``"val_wg"``/``"val_avg"``
    re-selects: from ``metrics.json``'s ``other_selections`` when it holds the rule, otherwise from
    ``history.jsonl`` (early stopping on that rule emulated with the run's patience). ``split``
    is the evaluated split shown ("test" by default; "val" shows the numbers the selection itself
    looked at). A derived (DFR) run is found its parent among ``runs`` (or at the parent
    directory it records) for its parent's algorithm and validation scores.
    """
    if select is not None:
        get_rule(select)  # unknown names → ValueError listing the rules
    if split not in SPLITS:
        raise ReportError(f"unknown split {split!r}; accepted: {', '.join(SPLITS)}")
    runs = list(runs)
    by_hash = {str(rec.config_hash): rec for rec in runs}
    results: list[RunResult] = []
    skipped: list[tuple[Path, str]] = []
    for rec in runs:
        try:
            rule, epoch, val, test = selected(rec, select)
        except (ValueError, KeyError) as err:
            skipped.append((rec.path, f"cannot select by {select}: {err}"))
            continue
        m = test if split == "test" else val
        missing = [k for k in (*METRICS, "groups") if k not in m]
        if missing:
            skipped.append((rec.path, f"{split} metrics lack {missing}"))
            continue
        params = (rec.metrics or {}).get("params") or {}
        own_epoch = (rec.metrics or {}).get("selected_epoch")
        at_own = split == "test" and epoch == own_epoch
        try:
            algorithm, trained_on, selection_labels, scores = provenance(rec, by_hash)
        except RecordError as err:  # a derived run whose record does not describe it
            skipped.append((rec.path, str(err)))
            continue
        results.append(RunResult(
            path=rec.path, dataset=str(rec.dataset), method=str(rec.method), seed=rec.seed,
            config_hash=str(rec.config_hash), selection=rule,
            selected_epoch=None if epoch is None else int(epoch), split=split,
            metrics={k: to_float(m[k]) for k in METRICS},
            groups=[dict(gr) for gr in m["groups"]],
            params={k: int(v) for k, v in params.items() if isinstance(v, (int, float))},
            settings=relevant_settings(run_settings(rec), algorithm),
            alarms=alarms_at(rec, epoch),
            extra={k: counterfactual_metric(rec.metrics, m, k, at_own_epoch=at_own)
                   for k in EXTRA_METRICS},
            curve=training_curve(rec),
            algorithm=algorithm, derived_facts=rec.derived_facts,
            group_labels_training=trained_on,
            group_labels_selection=selection_labels if select is None or rec.derived
            else select == "val_wg",
            val_scores=scores,
        ))
    return results, skipped


def _show(value: Any) -> str:
    if value is None:
        return "default"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def algorithm_label(method: str, algorithm: str) -> str:
    """``"lora"`` for ERM, ``"lora + groupdro"``, ``"lora + dfr"`` (DFR of an ERM run),
    ``"lora + groupdro + dfr"`` (DFR of a GroupDRO run)."""
    parts = [a for a in algorithm.split("+") if a and a != "erm"]
    return " + ".join([method, *parts])


def assign_labels(results: Sequence[RunResult], *, best_by: bool = False) -> None:
    """Set ``row_settings``, ``label`` and ``base_label`` of every result (in place).

    The method and training algorithm name the row (``lora + groupdro``); within each
    dataset/method, the settings whose values differ between its runs are added:
    ``label = "fvae (beta=10, lr=0.001)"``. A setting is shown by its last name component unless
    two differing settings share it (then by its dotted name). An algorithm's own
    hyperparameters count only among the runs of that algorithm (see
    :func:`relevant_settings`). With ``best_by`` (one setting kept per dataset × method ×
    algorithm × RHO, see :func:`choose_best`) only RHO names the row; ``row_settings`` still
    holds every differing setting (the chosen one, shown in its own column).
    """
    by_dm: dict[tuple[str, str], list[RunResult]] = {}
    for r in results:
        by_dm.setdefault((r.dataset, r.method), []).append(r)
    for runs in by_dm.values():
        keys = sorted({k for r in runs for k in r.settings})
        differing = [k for k in keys
                     if len({repr(r.settings[k]) for r in runs if k in r.settings}) > 1]
        short = {k: k.rsplit(".", 1)[-1] for k in differing}
        clashes = {s for s in short.values() if list(short.values()).count(s) > 1}
        names = {k: (k if short[k] in clashes else short[k]) for k in differing}
        rho_name = names.get(SPURIOUS_STRENGTH_SETTING)
        for r in runs:
            r.row_settings = {names[k]: _show(r.settings[k]) for k in differing
                              if k in r.settings}
            r.base_label = _label(algorithm_label(r.method, r.algorithm),
                                  {} if best_by else {k: v for k, v in r.row_settings.items()
                                                      if k != rho_name})
            shown = {k: v for k, v in r.row_settings.items()
                     if not best_by or k == rho_name}
            r.label = _label(algorithm_label(r.method, r.algorithm), shown)


def _label(method: str, settings: Mapping[str, str]) -> str:
    inner = ", ".join(f"{k}={v}" for k, v in settings.items())
    return f"{method} ({inner})" if inner else method


@dataclass
class Choice:
    """How ``--best-by`` chose the setting of one dataset × method × algorithm × RHO cell."""

    rule: str
    chosen: str  # the chosen setting, e.g. "lr=0.001, beta=10" ("" when there was one)
    score: float  # its seed-mean validation score (NaN: none could be ranked)
    # every candidate setting compared, in rank order: (setting text, seed-mean score, n runs)
    candidates: list[tuple[str, float, int]] = field(default_factory=list)
    via_parent: bool = False  # derived runs: ranked by their parents' validation scores


def setting_text(settings: Mapping[str, str]) -> str:
    """``{"lr": "0.001", "beta": "10"}`` → ``"lr=0.001, beta=10"``; the spurious strength is
    left out (it is a condition of the comparison, not a setting to choose)."""
    rho = SPURIOUS_STRENGTH_SETTING.rsplit(".", 1)[-1]
    return ", ".join(f"{k}={v}" for k, v in settings.items() if k.rsplit(".", 1)[-1] != rho)


def choose_best(results: Sequence[RunResult], rule: str
                ) -> tuple[list[RunResult], dict[tuple, Choice]]:
    """DomainBed-style hyperparameter selection: per dataset × method × algorithm × RHO, keep
    only the runs of the setting with the best seed-mean validation score of ``rule`` (each
    run's validation worst-group or average accuracy at the epoch ``rule`` selects).

    Ties go to the setting whose text sorts first (``"lr=0.001" < "lr=0.005"``); settings no run
    of which has a score rank last. Derived runs (DFR) are ranked by their parents' scores:
    their own validation numbers are their training data. Returns the kept results and
    ``{(dataset, method, algorithm, rho): Choice}``.
    """
    get_rule(rule)  # unknown names → ValueError listing the rules
    assign_labels(results)
    cells: dict[tuple, dict[str, list[RunResult]]] = {}
    for r in results:
        cells.setdefault((r.dataset, r.method, r.algorithm, r.rho), {}).setdefault(
            r.label, []).append(r)
    kept: list[RunResult] = []
    choices: dict[tuple, Choice] = {}
    for cell, candidates in cells.items():
        ranked = []
        for label in sorted(candidates):
            runs = candidates[label]
            score = summarize(r.val_scores.get(rule, math.nan) for r in runs).mean
            ranked.append((setting_text(runs[0].row_settings), score, len(runs), label))
        # stable: sorted by text above, so among equal scores the first text stays first
        ranked.sort(key=lambda c: -c[1] if math.isfinite(c[1]) else math.inf)
        best = ranked[0]
        kept += candidates[best[3]]
        choices[cell] = Choice(rule=rule, chosen=best[0], score=best[1],
                               candidates=[c[:3] for c in ranked],
                               via_parent=any(r.derived for r in candidates[best[3]]))
    return kept, choices


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Stat:
    """Mean, sample std (ddof=1), 95 % t-interval half-width and count of a set of values."""

    mean: float
    std: float
    ci95: float
    n: int


def summarize(values: Iterable[float]) -> Stat:
    """:class:`Stat` of the finite ``values``; std and ci95 are NaN when fewer than two."""
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = int(arr.size)
    if n == 0:
        return Stat(math.nan, math.nan, math.nan, 0)
    mean = float(arr.mean())
    if n == 1:
        return Stat(mean, math.nan, math.nan, 1)
    std = float(arr.std(ddof=1))
    ci = float(scipy_stats.t.ppf(0.975, n - 1) * std / math.sqrt(n))
    return Stat(mean, std, ci, n)


@dataclass
class GroupStat:
    """Accuracy of one dataset group over seeds; ``n_samples`` is its evaluated-split size."""

    g: int
    name: str
    n_samples: int
    acc: Stat


@dataclass
class GroupRow:
    """One table row: a dataset × method × differing-settings cell, aggregated over seeds."""

    dataset: str
    method: str
    label: str
    settings: dict[str, str]
    selection: str
    split: str
    seeds: list[int | None]
    stats: dict[str, Stat]
    groups: list[GroupStat]
    params: dict[str, int]
    runs: list[RunResult]
    base_label: str = ""  # the label without the spurious strength (one curve line)
    rho: float | None = None  # spurious strength of the row's runs (None: dataset default)
    algorithm: str = "erm"  # see RunResult.algorithm
    # {derived algorithm: its facts} of the row's derived runs (see derived_of)
    derived_facts: dict[str, DerivedFacts] = field(default_factory=dict)
    group_labels_training: tuple[str, ...] = ()  # see RunResult
    group_labels_selection: bool = False
    choice: Choice | None = None  # with --best-by: how this row's setting was chosen

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def derived(self) -> bool:  # a row of derived runs (DFR): no training history
        return bool(self.derived_facts)

    @property
    def group_labels(self) -> str:
        """Which group labels the row used and what for, e.g. ``"train (training) + val
        (selection)"``, ``"val (DFR training) + val (selection)"``, ``"none"``."""
        return group_labels_text(self.group_labels_training, self.group_labels_selection,
                                 self.derived_facts)

    @property
    def seeds_text(self) -> str:
        """The seeds of the row's runs, e.g. ``"1, 2, 42"`` (``?`` for a run without one)."""
        return ", ".join("?" if s is None else str(s) for s in self.seeds)


def group_labels_text(training: Sequence[str], selection: bool,
                      derived: Mapping[str, DerivedFacts] | None = None) -> str:
    """The group-label column of a table (see :attr:`GroupRow.group_labels`); a split that a
    derived run among ``derived`` trains on is named with it (``"val (DFR training)"``)."""
    parts = []
    for split in training:
        owner = next((f.label for f in (derived or {}).values()
                      if f.group_labels_in_training == split), None)
        parts.append(f"{split} ({owner} training)" if owner else f"{split} (training)")
    if selection:
        parts.append("val (selection)")
    return " + ".join(parts) or "none"


def _dataset_key(name: str) -> tuple[int, str]:
    return (DATASET_ORDER.index(name) if name in DATASET_ORDER else len(DATASET_ORDER), name)


def _method_key(name: str) -> tuple[int, str]:
    return method_order(name)


def _algorithm_key(chain: str) -> tuple[int, ...]:
    """ERM, GroupDRO, ReSample, ReWeight, JTT, then the derived rows (DFR) in the order of
    their parents' algorithms."""
    parts = chain.split("+")
    derived = parts[-1] not in ALGORITHM_ORDER
    if derived and len(parts) == 1:
        parts = ["erm", *parts]  # "dfr" is DFR of an ERM run
    return (int(derived), *(ALGORITHM_ORDER.index(a) if a in ALGORITHM_ORDER
                            else len(ALGORITHM_ORDER) for a in parts))


def sort_key(dataset: str, method: str, label: str, algorithm: str = "erm") -> tuple:
    """Table order: datasets as in the paper, methods in registration order
    (robustbench_fvae/methods/), algorithms as in ALGORITHM_ORDER (derived DFR rows after the
    trained ones), then label."""
    return (_dataset_key(dataset), _method_key(method), _algorithm_key(algorithm), label)


def aggregate(results: Sequence[RunResult], best_by: str | None = None) -> list[GroupRow]:
    """Group ``results`` into rows (labels assigned here) and aggregate each metric over seeds.

    ``best_by`` (``"val_wg"``/``"val_avg"``) keeps one setting per dataset × method ×
    algorithm × RHO (:func:`choose_best`); the rows then carry their :class:`Choice`.
    Per-group accuracies are aggregated by group index ``g``; a group empty in a run
    (``acc`` None) does not count for that run. Parameter counts come from the first run and are
    expected to be identical across seeds (a warning says otherwise).
    """
    choices: dict[tuple, Choice] = {}
    if best_by is not None:
        results, choices = choose_best(results, best_by)
    assign_labels(results, best_by=best_by is not None)
    buckets: dict[tuple[str, str, str, str], list[RunResult]] = {}
    for r in results:
        buckets.setdefault((r.dataset, r.method, r.label, r.algorithm), []).append(r)
    rows: list[GroupRow] = []
    for (dataset, method, label, algorithm), runs in sorted(buckets.items(),
                                                             key=lambda kv: sort_key(*kv[0])):
        runs = sorted(runs, key=lambda r: (r.seed is None, r.seed if r.seed is not None else 0))
        rules = sorted({r.selection for r in runs})
        group_meta: dict[int, tuple[str, int]] = {}
        group_vals: dict[int, list[float]] = {}
        for r in runs:
            for gr in r.groups:
                g = int(gr["g"])
                group_meta.setdefault(g, (str(gr.get("name", g)), int(gr.get("n") or 0)))
                acc = gr.get("acc")
                group_vals.setdefault(g, [])
                if acc is not None:
                    group_vals[g].append(float(acc))
        params = dict(runs[0].params)
        if any(r.params != runs[0].params for r in runs[1:]):
            warnings.warn(f"{label} on {dataset}: parameter counts differ between seeds; "
                          "showing the first run's", UserWarning, stacklevel=2)
        rows.append(GroupRow(
            dataset=dataset, method=method, label=label, settings=dict(runs[0].row_settings),
            selection="/".join(rules), split=runs[0].split, seeds=[r.seed for r in runs],
            stats={**{k: summarize(r.metrics[k] for r in runs) for k in METRICS},
                   **{k: summarize(r.extra.get(k, math.nan) for r in runs)
                      for k in EXTRA_METRICS}},
            groups=[GroupStat(g, group_meta[g][0], group_meta[g][1], summarize(group_vals[g]))
                    for g in sorted(group_meta)],
            params=params, runs=runs, base_label=runs[0].base_label, rho=runs[0].rho,
            algorithm=algorithm, derived_facts=derived_of(runs),
            group_labels_training=tuple(dict.fromkeys(
                s for r in runs for s in r.group_labels_training)),
            # hyperparameters chosen by validation worst-group accuracy read group labels too
            group_labels_selection=any(r.group_labels_selection for r in runs)
            or best_by == "val_wg",
            choice=choices.get((dataset, method, algorithm, runs[0].rho)),
        ))
    return rows


# --------------------------------------------------------------------------- curves


@dataclass
class CurvePoint:
    """One point of a robustness curve: a row (dataset × method line) at one RHO."""

    dataset: str
    method: str
    label: str  # the line: method plus any other differing settings
    rho: float
    seeds: list[int | None]
    stats: dict[str, Stat]  # CURVE_POINT_METRICS
    split: str = "test"
    selection: str = ""  # the row's selection rule(s), for the table notes
    derived_facts: dict[str, DerivedFacts] = field(default_factory=dict)  # see GroupRow

    @property
    def n(self) -> int:
        return len(self.seeds)


# What a robustness curve plots against RHO.
CURVE_POINT_METRICS = ("worst_group_acc", "avg_acc", "core_only_acc")


def robustness_curves(rows: Sequence[GroupRow]) -> list[CurvePoint]:
    """The rows of every dataset whose rows span two or more spurious strengths, as curve points
    sorted by dataset, line and RHO. Rows without a RHO (real datasets) have no position on the
    axis and are left out; so are datasets with a single RHO (nothing to draw)."""
    points: list[CurvePoint] = []
    for dataset in dict.fromkeys(r.dataset for r in rows):
        mine = [r for r in rows if r.dataset == dataset and r.rho is not None]
        if len({r.rho for r in mine}) < 2:
            continue
        for r in sorted(mine, key=lambda r: (sort_key(r.dataset, r.method, r.base_label,
                                                      r.algorithm), r.rho)):
            assert r.rho is not None
            points.append(CurvePoint(dataset=dataset, method=r.method, label=r.base_label,
                                     rho=r.rho, seeds=list(r.seeds),
                                     stats={k: r.stats[k] for k in CURVE_POINT_METRICS},
                                     split=r.split, selection=r.selection,
                                     derived_facts=r.derived_facts))
    return points


@dataclass
class EpochStat:
    """One metric of a row at one epoch over the seeds that reached it: mean, min, max, n."""

    epoch: int
    mean: float
    low: float
    high: float
    n: int


def epoch_curves(row: GroupRow) -> dict[tuple[str, str], list[EpochStat]]:
    """Per (split, metric) of CURVE_METRICS: the row's per-epoch mean and min–max over seeds.

    A seed that stopped early counts only at the epochs it reached (``n`` says how many did).
    """
    out: dict[tuple[str, str], list[EpochStat]] = {}
    for split, metric in CURVE_METRICS:
        by_epoch: dict[int, list[float]] = {}
        for run in row.runs:
            for point in run.curve:
                value = point[split][metric]
                if math.isfinite(value):
                    by_epoch.setdefault(point["epoch"], []).append(value)
        out[(split, metric)] = [
            EpochStat(e, float(np.mean(v)), float(np.min(v)), float(np.max(v)), len(v))
            for e, v in sorted(by_epoch.items())]
    return out


def derived_of(items: Iterable[Any]) -> dict[str, DerivedFacts]:
    """``{algorithm: facts}`` of the derived runs among ``items`` (RunResults: their own facts;
    GroupRows or CurvePoints: the facts they carry)."""
    out: dict[str, DerivedFacts] = {}
    for item in items:
        facts = item.derived_facts
        if isinstance(facts, DerivedFacts):
            out.setdefault(facts.algorithm, facts)
        elif isinstance(facts, Mapping):
            for name, value in facts.items():
                out.setdefault(name, value)
    return out


def selection_description(rule: str, derived: Mapping[str, DerivedFacts] | None = None) -> str:
    """Human description of a selection rule name (or of several joined by '/'); a derived
    run's selection (named by its algorithm) as its record describes it, from ``derived``
    (:func:`derived_of` the rows shown)."""
    parts = []
    for name in rule.split("/"):
        spec = RULES.get(name)
        facts = (derived or {}).get(name)
        text = spec.description if spec else facts.selection_description if facts else None
        parts.append(f"{name}: {text}" if text else name)
    return "; ".join(parts)
