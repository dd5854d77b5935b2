"""Collect finished runs and aggregate their selected-epoch metrics over seeds (DESIGN §6–§7).

Pipeline: :func:`collect_runs` (read every run record under a folder; finished, unfinished and
unreadable runs are told apart) → :func:`run_results` (one :class:`RunResult` per finished run:
the metrics of the epoch chosen by a selection rule) → :func:`aggregate` (one
:class:`GroupRow` per dataset × method × differing settings, statistics over seeds).

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

import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from robustbench_fvae.config import (
    ALGORITHMS,
    DERIVED_ALGORITHMS,
    RunConfig,
)
from robustbench_fvae.methods import find_method, method_order
from robustbench_fvae.records import RecordNotFoundError, RunRecord, iter_runs, load_run
from robustbench_fvae.selection import RULES, get_rule, select_epoch

# The scalar metrics of one evaluated split, in table order (see metrics.py for definitions).
METRICS = ("worst_group_acc", "avg_acc", "adj_avg_acc", "mean_group_acc", "disparity",
           "adj_disparity", "ece")
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
SPLITS = ("test", "val")
# Dataset order of the paper's Table 5 (Animals, Waterbirds, CelebA), real before replicas.
DATASET_ORDER = ("animals", "waterbirds", "celeba", "synth-animals", "synth-waterbirds",
                 "synth-celeba")
# Counterfactual metrics of the replicas (issue 10): recorded by runs on a synth-* dataset only.
EXTRA_METRICS = ("core_only_acc", "background_reliance")
METRIC_LABELS.update({"core_only_acc": "Core-only", "background_reliance": "Bg. reliance"})
HIGHER_IS_BETTER.update({"core_only_acc": True, "background_reliance": False})
# Where a run's recorded config holds the spurious strength RHO (flat dotted name, see
# run_settings); runs recorded without it count as the dataset default (None).
SPURIOUS_STRENGTH_SETTING = "train.spurious_strength"
# Per-epoch metrics of the training curves: (split, metric) pairs read from history.jsonl.
CURVE_METRICS = (("val", "worst_group_acc"), ("val", "avg_acc"), ("test", "worst_group_acc"),
                 ("test", "avg_acc"))
# Config fields that never name a row: where/how a run happens, and the seed (averaged over).
_IGNORED_SETTINGS = frozenset({*RunConfig.UNHASHED, "train.seed", "method", "dataset"})
# The training algorithm is part of the row's name ("lora + groupdro"), not one of its settings.
ALGORITHM_SETTING = "train.algorithm"
# Where a run records its early-stopping patience (re-selection emulates it, see _selected).
PATIENCE_SETTING = "train.patience"
# Prefix of the settings a DFR run adds from its ``derived.settings`` (e.g. ``dfr_refits``).
DERIVED_PREFIX = "derived.dfr_"
# Table order of the training algorithms; a derived run (DFR) follows its parent's algorithm.
ALGORITHM_ORDER = (*ALGORITHMS, *DERIVED_ALGORITHMS)


class ReportError(ValueError):
    """The runs cannot be reported (no finished run, bad option)."""


class RunsDirNotFoundError(RecordNotFoundError):
    """The runs folder given to the report does not exist."""


# --------------------------------------------------------------------------- collecting


@dataclass
class Collection:
    """What was found under a runs folder."""

    root: Path
    finished: list[RunRecord] = field(default_factory=list)
    unfinished: list[RunRecord] = field(default_factory=list)
    # (run directory, reason) of runs whose files could not be read or lack required content
    unreadable: list[tuple[Path, str]] = field(default_factory=list)


def _metrics_problem(metrics: Any) -> str | None:
    """Why a finished run's ``metrics.json`` cannot be reported, or None when it can."""
    if not isinstance(metrics, Mapping):
        return "metrics.json is missing although the run is marked done"
    for split in SPLITS:
        m = metrics.get(split)
        if not isinstance(m, Mapping):
            return f"metrics.json has no {split!r} object"
        missing = [k for k in (*METRICS, "groups") if k not in m]
        if missing:
            return f"metrics.json {split!r} lacks {missing}"
    if "selection" not in metrics:
        return "metrics.json has no 'selection'"
    return None


def collect_runs(runs_dir: str | Path) -> Collection:
    """Read every run directory under ``runs_dir`` and sort them into finished / unfinished /
    unreadable. Each unreadable run is also reported with a ``UserWarning`` naming it."""
    root = Path(runs_dir)
    if not root.is_dir():
        what = "runs folder is a file" if root.exists() else "runs folder not found"
        raise RunsDirNotFoundError(
            f"{what}: {root} (expected the --out folder of "
            "`python -m robustbench_fvae.run`/`sweep`, holding <dataset>/<method>/<hash>/ runs)")
    found = Collection(root=root)
    seen: dict[str, Path] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = list(iter_runs(root))
    prefix = "skipping unreadable run "
    for w in caught:
        text = str(w.message)
        if not text.startswith(prefix):  # not ours to interpret: pass it on unchanged
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            continue
        # iter_runs says "skipping unreadable run <dir>: <reason>"
        head, _, reason = text.partition(": ")
        found.unreadable.append((Path(head.removeprefix(prefix).strip()), reason or text))
    for rec in records:
        if not rec.done:
            found.unfinished.append(rec)
            continue
        problem = _metrics_problem(rec.metrics)
        if problem is None and (not rec.dataset or not rec.method):
            problem = "config.json lacks config.dataset or config.method"
        if problem is None and rec.config_hash in seen:
            problem = f"same config hash {rec.config_hash} as {seen[rec.config_hash]} (a copy?)"
        if problem is not None:
            found.unreadable.append((rec.path, problem))
            continue
        seen[str(rec.config_hash)] = rec.path
        found.finished.append(rec)
    for path, reason in found.unreadable:
        warnings.warn(f"skipping unreadable run {path}: {reason}", UserWarning, stacklevel=2)
    return found


# JTT's record of its error set (algorithms.JTT_ERROR_FILE; not imported from there because
# that module pulls in torch): it names the stage-1 ERM run the error set came from.
JTT_ERROR_FILE = "jtt_error_set.json"


def jtt_stage1_hashes(runs: Iterable[RunRecord]) -> dict[str, Path]:
    """``{stage-1 hash: JTT run}`` for every JTT run among ``runs``: JTT's identification
    model is an ordinary ERM run record (``jtt_epochs`` epochs, no early stopping), a step of
    JTT rather than a result of its own, so the report does not show it as an ERM row."""
    out: dict[str, Path] = {}
    for rec in runs:
        path = rec.path / JTT_ERROR_FILE
        if _recorded_algorithm(rec) != "jtt" or not path.is_file():
            continue
        try:
            stage1 = json.loads(path.read_text()).get("stage1_hash")
        except (OSError, ValueError, AttributeError):
            continue
        if stage1:
            out[str(stage1)] = rec.path
    return out


def resume_command(rec: RunRecord) -> str:
    """The ``python -m robustbench_fvae.run`` command that resumes (or re-creates) run ``rec``:
    its stored, resolved settings as flags (only those that differ from the defaults). For an
    unfinished derived run, the ``python -m robustbench_fvae.dfr`` command that redoes it."""
    if is_derived(rec):
        return _derived_command(rec)
    cfg = rec.config.get("config", {})
    # JSON round trip so that tuples in the defaults compare equal to the lists read from disk
    default = json.loads(json.dumps(RunConfig().to_dict()))
    flags: list[str] = []
    sections = [(cfg, default)]
    sections += [(cfg.get(k, {}), default.get(k, {})) for k in ("adapter", "train")]
    for values, defaults in sections:
        for key, value in values.items():
            if key in ("adapter", "train") or value is None or value == defaults.get(key):
                continue
            if isinstance(value, (list, tuple)):
                value = ",".join(map(str, value))
            flags.append(f"--{key.replace('_', '-')} {value}")
    base = f"--method {cfg.get('method')} --dataset {cfg.get('dataset')}"
    rest = [f for f in flags if not f.startswith(("--method ", "--dataset "))]
    return " ".join(["python -m robustbench_fvae.run", base, *rest])


def _derived_command(rec: RunRecord) -> str:
    """``python -m robustbench_fvae.dfr PARENT_DIR`` with the recorded DFR settings that differ
    from dfr's defaults and the output folder the run is in (so it lands in the same
    derived-run folder)."""
    from robustbench_fvae import dfr  # numpy only; the record names what it ran

    derived = rec.config.get("derived") or {}
    settings = derived.get("settings") or {}
    flags = []
    if settings.get("seed", 0) != 0:
        flags.append(f"--seed {settings['seed']}")
    if settings.get("refits", dfr.DEFAULT_REFITS) != dfr.DEFAULT_REFITS:
        flags.append(f"--refits {settings['refits']}")
    grid = settings.get("c_grid")
    if grid is not None and [float(c) for c in grid] != [float(c) for c in dfr.C_GRID]:
        flags.append("--c-grid " + ",".join(f"{float(c):g}" for c in grid))
    # where the run lives (OUT/<dataset>/<method>/<hash>), even if its folder was moved
    flags.append(f"--out {rec.path.parents[2]}")
    return " ".join(["python -m robustbench_fvae.dfr",
                     str(derived.get("parent_dir", "PARENT_RUN_DIR")), *flags])


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
    # the label without the spurious strength: one line of a robustness curve (assign_labels)
    base_label: str = ""
    # core-only accuracy and background reliance (NaN when the run did not record them)
    extra: dict[str, float] = field(default_factory=dict)
    # one entry per history record: {"epoch": int, "val": {metric: value}, "test": {...}}
    curve: list[dict[str, Any]] = field(default_factory=list)
    # "erm", "groupdro", …; a DFR run: "dfr" on an ERM parent, else e.g. "groupdro+dfr"
    algorithm: str = "erm"
    derived: bool = False  # a derived run (DFR): no training history of its own
    # the splits whose group labels trained the run ("train": GroupDRO/ReSample/ReWeight,
    # "val": DFR) and whether its selection (epoch rule, DFR's C) read validation group labels
    group_labels_training: tuple[str, ...] = ()
    group_labels_selection: bool = False
    # {rule: validation score the rule maximises, at the epoch it selects} (--best-by); a DFR
    # run carries its parent's (its own validation numbers are in-sample)
    val_scores: dict[str, float] = field(default_factory=dict)

    @property
    def rho(self) -> float | None:
        """The run's spurious strength RHO; None for a real dataset (a replica run recorded
        without one trained at the replica's default, filled in by :func:`run_settings`)."""
        return spurious_strength(self.settings)


def _flatten(prefix: str, obj: Mapping[str, Any], out: dict[str, Any]) -> None:
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _flatten(f"{name}.", value, out)
        else:
            out[name] = tuple(value) if isinstance(value, list) else value


def run_settings(rec: RunRecord) -> dict[str, Any]:
    """The settings of a run that could name its row: flat ``{"adapter.beta": 10.0, …}``.

    The seed and where/how fields are left out; ``adapter.beta`` of the FVAE family is resolved
    (None → the method's default) so that an explicit default and an omitted one compare equal.
    """
    cfg = rec.config.get("config", {})
    flat: dict[str, Any] = {}
    _flatten("", cfg, flat)
    method = cfg.get("method")
    registered = find_method(method)
    for name, value in (registered.defaults.items() if registered else ()):
        if flat.get(f"adapter.{name}") is None:
            flat[f"adapter.{name}"] = value
    # A record written before a setting existed (the spurious strength, the training algorithm)
    # ran at that setting's default: fill it in, so that it shares a row with newer runs that
    # record the default explicitly.
    for key, value in _default_settings().items():
        flat.setdefault(key, value)
    if flat.get(SPURIOUS_STRENGTH_SETTING) is None:  # newer records hold the resolved value
        flat[SPURIOUS_STRENGTH_SETTING] = default_spurious_strength(cfg.get("dataset"))
    derived = rec.config.get("derived")
    if isinstance(derived, Mapping) and isinstance(derived.get("settings"), Mapping):
        for key, value in derived["settings"].items():
            flat[f"{DERIVED_PREFIX}{key}"] = tuple(value) if isinstance(value, list) else value
    return {k: v for k, v in flat.items() if k not in _IGNORED_SETTINGS}


def relevant_settings(settings: Mapping[str, Any], algorithm: str) -> dict[str, Any]:
    """``settings`` without the algorithm itself and without the hyperparameters of algorithms
    the run did not use (``train.groupdro_eta`` of a JTT run is a default nobody chose)."""
    used = set(algorithm.split("+"))
    out = {}
    for key, value in settings.items():
        if key == ALGORITHM_SETTING:
            continue
        owner = next((a for a in ALGORITHM_ORDER if key.startswith(f"train.{a}_")), None)
        if owner is not None and owner not in used:
            continue
        out[key] = value
    return out


def _default_settings() -> dict[str, Any]:
    """The flat settings of a default RunConfig, as they read back from JSON."""
    flat: dict[str, Any] = {}
    _flatten("", json.loads(json.dumps(RunConfig().to_dict())), flat)
    return flat


def default_spurious_strength(dataset: Any) -> float | None:
    """The spurious strength ρ a run of ``dataset`` trains at by default: the replica's own (the
    real dataset's); None for a real or unknown dataset."""
    from robustbench_fvae.data import data_defaults

    try:
        return data_defaults(dataset)["spurious_strength"]
    except ValueError:
        return None


def spurious_strength(settings: Mapping[str, Any]) -> float | None:
    """RHO of a run from its :func:`run_settings` (None: not a replica).

    The one place that knows where the knob lives in the record (see SPURIOUS_STRENGTH_SETTING).
    """
    value = settings.get(SPURIOUS_STRENGTH_SETTING)
    if value is None:
        return None
    out = _float(value)
    return out if math.isfinite(out) else None


def counterfactual_metric(metrics: Mapping[str, Any] | None, split_metrics: Mapping[str, Any],
                          name: str, *, at_own_epoch: bool) -> float:
    """Core-only accuracy or background reliance of a run, NaN when not recorded.

    Read from the reported split's metrics when they hold it, else from ``metrics.json``'s
    ``counterfactual`` object — measured at the run's own selected epoch only, so it counts for
    the report only when the reported epoch is that one (``at_own_epoch``).
    """
    if name in split_metrics:
        return _float(split_metrics[name])
    block = (metrics or {}).get("counterfactual")
    if at_own_epoch and isinstance(block, Mapping) and name in block:
        return _float(block[name])
    return math.nan


def training_curve(rec: RunRecord) -> list[dict[str, Any]]:
    """The per-epoch validation and test metrics of ``rec`` (CURVE_METRICS), from its history,
    epochs as recorded; records without an epoch number are left out."""
    points = []
    for record in rec.history:
        epoch = record.get("epoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            continue
        point: dict[str, Any] = {"epoch": epoch}
        for split, metric in CURVE_METRICS:
            m = record.get(split)
            value = _float(m.get(metric)) if isinstance(m, Mapping) else math.nan
            point.setdefault(split, {})[metric] = value
        points.append(point)
    return sorted(points, key=lambda p: p["epoch"])


def _float(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def is_derived(rec: RunRecord) -> bool:
    """True for a derived run (DFR): fitted on a finished parent, no training of its own."""
    train = (rec.config.get("config") or {}).get("train") or {}
    return "derived" in rec.config or train.get("algorithm") in DERIVED_ALGORITHMS


def run_patience(rec: RunRecord) -> int | None:
    """The early-stopping patience the run trained with (None: not recorded, no emulation)."""
    value = ((rec.config.get("config") or {}).get("train") or {}).get("patience")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _selected(rec: RunRecord, select: str | None) -> tuple[str, int | None, Mapping, Mapping]:
    """(rule, epoch, val M, test M) of ``rec`` under ``select`` (None: the run's own rule).

    Re-selecting from ``history.jsonl`` emulates early stopping on ``select`` alone with the
    run's own patience (the runner trains until every rule's patience is spent, so the history
    holds what that rule alone would have seen), as the runner's ``other_selections`` do.
    A DFR run was fitted at its parent's selected epoch: it serves ``select`` only when that is
    its parent's rule.
    """
    metrics = rec.metrics or {}
    own = str(metrics.get("selection"))
    if is_derived(rec):
        parent_rule = (rec.config.get("derived") or {}).get("parent_selection")
        if select is not None and select != parent_rule:
            raise ValueError(f"a derived ({own}) run is fitted at its parent's epoch selected by "
                             f"{parent_rule}, and has no epochs of its own to re-select by "
                             f"{select}")
        return own, metrics.get("selected_epoch"), metrics["val"], metrics["test"]
    if select is None or select == own:
        return own, metrics.get("selected_epoch"), metrics["val"], metrics["test"]
    other = (metrics.get("other_selections") or {}).get(select)
    if isinstance(other, Mapping) and isinstance(other.get("test"), Mapping) \
            and isinstance(other.get("val"), Mapping):
        return select, other.get("selected_epoch"), other["val"], other["test"]
    # ValueError when the history cannot serve it
    chosen = select_epoch(rec.history, select, run_patience(rec))
    for split in SPLITS:
        if not isinstance(chosen.get(split), Mapping):
            raise ValueError(f"the history record of epoch {chosen.get('epoch')} has no "
                             f"{split} metrics")
    return select, chosen.get("epoch"), chosen["val"], chosen["test"]


def validation_scores(rec: RunRecord) -> dict[str, float]:
    """``{rule: the validation metric the rule maximises, at the epoch it selects}`` for every
    rule the run can serve (NaN otherwise): what ``--best-by`` ranks settings by."""
    out = {}
    for name, rule in RULES.items():
        try:
            val = _selected(rec, name)[2]
        except (ValueError, KeyError):
            out[name] = math.nan
            continue
        out[name] = _float(val.get(rule.metric)) if isinstance(val, Mapping) else math.nan
    return out


def _recorded_algorithm(rec: RunRecord) -> str:
    """The training algorithm a (non-derived) run recorded; records from before the field
    existed trained with ERM."""
    train = (rec.config.get("config") or {}).get("train") or {}
    return str(train.get("algorithm") or "erm")


def _training_labels(rec: RunRecord, algorithm: str) -> tuple[str, ...]:
    """The splits whose group labels trained a non-derived run, as its metrics.json records
    (``algorithm.group_labels_in_training``); older records trained with ERM (none)."""
    block = (rec.metrics or {}).get("algorithm")
    if isinstance(block, Mapping) and "group_labels_in_training" in block:
        split = block.get("group_labels_in_training")
        return (str(split),) if split else ()
    if algorithm == "erm":
        return ()
    from robustbench_fvae.algorithms import GROUP_LABELS_IN_TRAINING  # imports torch

    split = GROUP_LABELS_IN_TRAINING.get(algorithm)
    return (split,) if split else ()


def _parent_of(rec: RunRecord, by_hash: Mapping[str, RunRecord]) -> RunRecord | None:
    """The finished run a derived run was made from: among the reported runs, else read from
    the ``derived.parent_dir`` it names; None when neither is there."""
    derived = rec.config.get("derived") or {}
    parent = by_hash.get(str(derived.get("parent_hash")))
    if parent is not None:
        return parent
    try:
        parent = load_run(derived.get("parent_dir") or "")
    except (ValueError, OSError):
        return None
    return parent if parent.metrics else None


def _provenance(rec: RunRecord, by_hash: Mapping[str, RunRecord]
                ) -> tuple[str, tuple[str, ...], bool, dict[str, float]]:
    """(algorithm chain, group-label splits used in training, whether selection read
    validation group labels, validation scores) of a run; for a derived run, its parent's
    training algorithm and labels come first."""
    selection = str((rec.metrics or {}).get("selection"))
    if not is_derived(rec):
        algorithm = _recorded_algorithm(rec)
        return (algorithm, _training_labels(rec, algorithm), selection == "val_wg",
                validation_scores(rec))
    own = str((rec.config.get("config") or {}).get("train", {}).get("algorithm") or "dfr")
    parent = _parent_of(rec, by_hash)
    if parent is None:
        warnings.warn(f"the parent of derived run {rec.path} is not among the reported runs nor "
                      f"at {(rec.config.get('derived') or {}).get('parent_dir')}: its training "
                      f"algorithm is unknown (shown as ERM) and it cannot be ranked by "
                      "--best-by", UserWarning, stacklevel=3)
        return own, ("val",), True, {name: math.nan for name in RULES}
    base = _recorded_algorithm(parent)
    chain = own if base == "erm" else f"{base}+{own}"
    splits = tuple(dict.fromkeys((*_training_labels(parent, base), "val")))
    # DFR chooses C by worst-group accuracy on held-out validation images: group labels
    return chain, splits, True, validation_scores(parent)


def _alarms(rec: RunRecord, epoch: int | None) -> list[str]:
    """Sanity alarms (e.g. "constant predictor on test") raised at the reported epoch."""
    for record in rec.history:
        if record.get("epoch") == epoch and "alarms" in record:
            return [str(a) for a in record.get("alarms") or []]
    metrics = rec.metrics or {}
    if epoch == metrics.get("selected_epoch"):
        return [str(a) for a in metrics.get("alarms") or []]
    return []


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
            rule, epoch, val, test = _selected(rec, select)
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
        algorithm, trained_on, selection_labels, scores = _provenance(rec, by_hash)
        results.append(RunResult(
            path=rec.path, dataset=str(rec.dataset), method=str(rec.method), seed=rec.seed,
            config_hash=str(rec.config_hash), selection=rule,
            selected_epoch=None if epoch is None else int(epoch), split=split,
            metrics={k: _float(m[k]) for k in METRICS},
            groups=[dict(gr) for gr in m["groups"]],
            params={k: int(v) for k, v in params.items() if isinstance(v, (int, float))},
            settings=relevant_settings(run_settings(rec), algorithm),
            alarms=_alarms(rec, epoch),
            extra={k: counterfactual_metric(rec.metrics, m, k, at_own_epoch=at_own)
                   for k in EXTRA_METRICS},
            curve=training_curve(rec),
            algorithm=algorithm, derived=is_derived(rec),
            group_labels_training=trained_on,
            group_labels_selection=selection_labels if select is None or is_derived(rec)
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
    derived: bool = False  # DFR rows: fitted on their parents, no training history
    group_labels_training: tuple[str, ...] = ()  # see RunResult
    group_labels_selection: bool = False
    choice: Choice | None = None  # with --best-by: how this row's setting was chosen

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def group_labels(self) -> str:
        """Which group labels the row used and what for, e.g. ``"train (training) + val
        (selection)"``, ``"val (DFR training) + val (selection)"``, ``"none"``."""
        return group_labels_text(self.group_labels_training, self.group_labels_selection)

    @property
    def seeds_text(self) -> str:
        """The seeds of the row's runs, e.g. ``"1, 2, 42"`` (``?`` for a run without one)."""
        return ", ".join("?" if s is None else str(s) for s in self.seeds)


def group_labels_text(training: Sequence[str], selection: bool) -> str:
    """The group-label column of a table (see :attr:`GroupRow.group_labels`)."""
    parts = []
    if "train" in training:
        parts.append("train (training)")
    if "val" in training:
        parts.append("val (DFR training)")
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
    derived = parts[-1] in DERIVED_ALGORITHMS
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
            algorithm=algorithm, derived=any(r.derived for r in runs),
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
                                     split=r.split, selection=r.selection))
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


def selection_description(rule: str) -> str:
    """Human description of a selection rule name (or of several joined by '/')."""
    parts = []
    for name in rule.split("/"):
        spec = RULES.get(name)
        text = spec.description if spec else DERIVED_SELECTION.get(name)
        parts.append(f"{name}: {text}" if text else name)
    return "; ".join(parts)


# What the ``selection`` of a derived run's metrics.json means (docs/dfr.md).
DERIVED_SELECTION = {
    "dfr": "the parent run's selected epoch, its last layer refitted on the validation split "
           "with C chosen by worst-group accuracy on a held-out validation half (uses "
           "validation group labels)"}
