"""A typed reader of run records: what one run directory says, read the same way everywhere.

:func:`load_run` / :func:`iter_runs` read runs into :class:`RunRecord`s; the functions below
interpret them: finished (the done marker) or not, derived (DFR) or trained, the algorithm chain
(``"groupdro+dfr"``), the settings that could name a report row, the spurious strength ρ, the
training curve, the metrics at the epoch a selection rule picks, the parent of a derived run.
Records of older versions are read as current ones (epochs from 1, defaults of settings recorded
later filled in). No torch import.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustbench_fvae.config import ALGORITHMS, RunConfig
from robustbench_fvae.methods import find_method
from robustbench_fvae.record.derived import DerivedFacts, derived_facts, redo_command
from robustbench_fvae.record.io import RecordError, RecordNotFoundError, read_json_file
from robustbench_fvae.record.schema import (
    CONFIG_FILE,
    HISTORY_FILE,
    JTT_ERROR_FILE,
    METRICS_FILE,
    check_dataset_info,
    epochs_from_one,
    read_history,
)
from robustbench_fvae.record.store import is_done
from robustbench_fvae.replica_defaults import REPLICA_DEFAULT_STRENGTH
from robustbench_fvae.selection import RULES, select_epoch

# The evaluated splits of a history record and of metrics.json, in report order.
SPLITS = ("test", "val")
# The scalar metrics of one evaluated split, in table order (see metrics.py for definitions).
METRICS = ("worst_group_acc", "avg_acc", "adj_avg_acc", "mean_group_acc", "disparity",
           "adj_disparity", "ece")

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
# Where a run records its early-stopping patience (re-selection emulates it, see selected).
PATIENCE_SETTING = "train.patience"
# A derived run's own settings (its ``derived.settings``) are named
# ``derived.<algorithm>_<key>`` (e.g. ``derived.dfr_refits``).
DERIVED_SETTING = "derived.{algorithm}_{key}"


# --------------------------------------------------------------------------- reading runs


@dataclass
class RunRecord:
    """One run directory as read from disk. ``metrics`` is None until the run wrote it."""

    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any] | None
    history: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False

    @property
    def run_config(self) -> RunConfig:
        """The run's settings as a :class:`RunConfig`."""
        return RunConfig.from_dict(self.config.get("config", {}))

    @property
    def method(self) -> str | None:
        return self.config.get("config", {}).get("method")

    @property
    def dataset(self) -> str | None:
        return self.config.get("config", {}).get("dataset")

    @property
    def seed(self) -> int | None:
        return self.config.get("config", {}).get("train", {}).get("seed")

    @property
    def config_hash(self) -> str | None:
        return self.config.get("config_hash")

    @property
    def dataset_info(self) -> dict[str, Any]:
        return check_dataset_info(self.config.get("dataset_info"), self.path / CONFIG_FILE)

    @property
    def derived(self) -> bool:
        """A derived run (DFR): fitted on a finished parent, no training of its own."""
        return is_derived(self)

    @property
    def algorithm(self) -> str:
        """The algorithm the run recorded: ``"erm"``, ``"groupdro"``, …, ``"dfr"``; for the
        whole chain of a derived run (``"groupdro+dfr"``) see :func:`provenance`."""
        facts = self.derived_facts
        return facts.algorithm if facts is not None else recorded_algorithm(self)

    @property
    def derived_facts(self) -> DerivedFacts | None:
        """How a derived run is shown and redone (its record says); None for a trained run."""
        block = self.config.get("derived")
        return derived_facts(block) if isinstance(block, Mapping) else None

    @property
    def settings(self) -> dict[str, Any]:
        """:func:`run_settings` of the run."""
        return run_settings(self)

    @property
    def rho(self) -> float | None:
        """The spurious strength ρ the run trained at (None: a real dataset)."""
        return spurious_strength(run_settings(self))

    def selected(self, rule: str | None = None) -> tuple[str, int | None, Mapping, Mapping]:
        """``(rule, epoch, val M, test M)`` under ``rule`` (None: the run's own); see
        :func:`selected`."""
        return selected(self, rule)

    def parent(self, by_hash: Mapping[str, RunRecord] | None = None) -> RunRecord | None:
        """The finished parent of a derived run (see :func:`parent_of`); None otherwise."""
        return parent_of(self, by_hash or {}) if self.derived else None


def load_run(run_dir: str | Path) -> RunRecord:
    """Read a run directory (finished or not). Needs ``config.json``; the rest may be absent."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RecordNotFoundError(f"run directory not found: {path}")
    config = read_json_file(path / CONFIG_FILE, "run config")
    if not isinstance(config, dict):
        raise RecordError(f"{path / CONFIG_FILE} must hold a JSON object")
    metrics_file = path / METRICS_FILE
    metrics = read_json_file(metrics_file, "metrics") if metrics_file.is_file() else None
    history = read_history(path / HISTORY_FILE)
    if int(config.get("record_version", 1)) < 2:
        history, metrics = epochs_from_one(history, metrics)
    return RunRecord(path=path, config=config, metrics=metrics, history=history,
                     done=is_done(path))


def iter_runs(root: str | Path, *, strict: bool = False) -> Iterator[RunRecord]:
    """Every run directory (one holding ``config.json``) under ``root``, in sorted path order.

    ``root`` may be an output folder, a dataset or method sub-folder, or a run directory itself.
    Unfinished runs are included (see ``RunRecord.done``). A run whose files cannot be read is
    skipped with a warning, or raises when ``strict``.
    """
    root = Path(root)
    if not root.is_dir():
        raise RecordNotFoundError(f"runs folder not found: {root}")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if CONFIG_FILE not in filenames:
            continue
        dirnames[:] = []  # a run directory holds no nested runs
        try:
            yield load_run(dirpath)
        except (RecordError, RecordNotFoundError) as err:
            if strict:
                raise
            warnings.warn(f"skipping unreadable run {dirpath}: {err}", stacklevel=2)


# --------------------------------------------------------------------------- collecting


class RunsDirNotFoundError(RecordNotFoundError):
    """The runs folder given to the report does not exist."""


@dataclass
class Collection:
    """What was found under a runs folder."""

    root: Path
    finished: list[RunRecord] = field(default_factory=list)
    unfinished: list[RunRecord] = field(default_factory=list)
    # (run directory, reason) of runs whose files could not be read or lack required content
    unreadable: list[tuple[Path, str]] = field(default_factory=list)


def metrics_problem(metrics: Any) -> str | None:
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
        problem = metrics_problem(rec.metrics)
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


# --------------------------------------------------------------------------- interpreting one run


def _flatten(prefix: str, obj: Mapping[str, Any], out: dict[str, Any]) -> None:
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _flatten(f"{name}.", value, out)
        else:
            out[name] = tuple(value) if isinstance(value, list) else value


def run_settings(rec: RunRecord) -> dict[str, Any]:
    """The settings of a run that could name its row: flat ``{"adapter.beta": 10.0, …}``.

    The seed and where/how fields are left out; adapter settings the run left None are
    resolved to its method's default (the method registry: β of the FVAE family), so that an
    explicit default and an omitted one compare equal.
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
        algorithm = derived_facts(derived).algorithm
        for key, value in derived["settings"].items():
            flat[DERIVED_SETTING.format(algorithm=algorithm, key=key)] = \
                tuple(value) if isinstance(value, list) else value
    return {k: v for k, v in flat.items() if k not in _IGNORED_SETTINGS}


def relevant_settings(settings: Mapping[str, Any], algorithm: str) -> dict[str, Any]:
    """``settings`` without the algorithm itself and without the hyperparameters of algorithms
    the run did not use (``train.groupdro_eta`` of a JTT run is a default nobody chose)."""
    used = set(algorithm.split("+"))
    out = {}
    for key, value in settings.items():
        if key == ALGORITHM_SETTING:
            continue
        owner = next((a for a in ALGORITHMS if key.startswith(f"train.{a}_")), None)
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
    return REPLICA_DEFAULT_STRENGTH.get(dataset) if isinstance(dataset, str) else None


def spurious_strength(settings: Mapping[str, Any]) -> float | None:
    """RHO of a run from its :func:`run_settings` (None: not a replica).

    The one place that knows where the knob lives in the record (see SPURIOUS_STRENGTH_SETTING).
    """
    value = settings.get(SPURIOUS_STRENGTH_SETTING)
    if value is None:
        return None
    out = to_float(value)
    return out if math.isfinite(out) else None


def counterfactual_metric(metrics: Mapping[str, Any] | None, split_metrics: Mapping[str, Any],
                          name: str, *, at_own_epoch: bool) -> float:
    """Core-only accuracy or background reliance of a run, NaN when not recorded.

    Read from the reported split's metrics when they hold it, else from ``metrics.json``'s
    ``counterfactual`` object — measured at the run's own selected epoch only, so it counts for
    the report only when the reported epoch is that one (``at_own_epoch``).
    """
    if name in split_metrics:
        return to_float(split_metrics[name])
    block = (metrics or {}).get("counterfactual")
    if at_own_epoch and isinstance(block, Mapping) and name in block:
        return to_float(block[name])
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
            value = to_float(m.get(metric)) if isinstance(m, Mapping) else math.nan
            point.setdefault(split, {})[metric] = value
        points.append(point)
    return sorted(points, key=lambda p: p["epoch"])


def to_float(value: Any) -> float:
    """``float(value)``; NaN when it is not a number (a missing or malformed record field)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def is_derived(rec: RunRecord) -> bool:
    """True for a derived run (DFR): fitted on a finished parent, no training of its own; its
    record has a ``derived`` block (robustbench_fvae/record/derived.py)."""
    return "derived" in rec.config


def run_patience(rec: RunRecord) -> int | None:
    """The early-stopping patience the run trained with (None: not recorded, no emulation)."""
    value = ((rec.config.get("config") or {}).get("train") or {}).get("patience")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def selected(rec: RunRecord, select: str | None) -> tuple[str, int | None, Mapping, Mapping]:
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
            val = selected(rec, name)[2]
        except (ValueError, KeyError):
            out[name] = math.nan
            continue
        out[name] = to_float(val.get(rule.metric)) if isinstance(val, Mapping) else math.nan
    return out


def recorded_algorithm(rec: RunRecord) -> str:
    """The training algorithm a (non-derived) run recorded; records from before the field
    existed trained with ERM."""
    train = (rec.config.get("config") or {}).get("train") or {}
    return str(train.get("algorithm") or "erm")


def training_labels(rec: RunRecord, algorithm: str) -> tuple[str, ...]:
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


def parent_of(rec: RunRecord, by_hash: Mapping[str, RunRecord]) -> RunRecord | None:
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


def provenance(rec: RunRecord, by_hash: Mapping[str, RunRecord]
                ) -> tuple[str, tuple[str, ...], bool, dict[str, float]]:
    """(algorithm chain, group-label splits used in training, whether selection read
    validation group labels, validation scores) of a run; for a derived run, its parent's
    training algorithm and labels come first."""
    selection = str((rec.metrics or {}).get("selection"))
    if not is_derived(rec):
        algorithm = recorded_algorithm(rec)
        return (algorithm, training_labels(rec, algorithm), selection == "val_wg",
                validation_scores(rec))
    facts = rec.derived_facts
    assert facts is not None  # is_derived
    own_labels = (facts.group_labels_in_training,) if facts.group_labels_in_training else ()
    parent = parent_of(rec, by_hash)
    if parent is None:
        warnings.warn(f"the parent of derived run {rec.path} is not among the reported runs nor "
                      f"at {(rec.config.get('derived') or {}).get('parent_dir')}: its training "
                      f"algorithm is unknown (shown as ERM) and it cannot be ranked by "
                      "--best-by", UserWarning, stacklevel=3)
        return (facts.algorithm, own_labels, facts.group_labels_in_selection,
                {name: math.nan for name in RULES})
    base = recorded_algorithm(parent)
    chain = facts.algorithm if base == "erm" else f"{base}+{facts.algorithm}"
    splits = tuple(dict.fromkeys((*training_labels(parent, base), *own_labels)))
    return chain, splits, facts.group_labels_in_selection, validation_scores(parent)


def alarms_at(rec: RunRecord, epoch: int | None) -> list[str]:
    """Sanity alarms (e.g. "constant predictor on test") raised at the reported epoch."""
    for record in rec.history:
        if record.get("epoch") == epoch and "alarms" in record:
            return [str(a) for a in record.get("alarms") or []]
    metrics = rec.metrics or {}
    if epoch == metrics.get("selected_epoch"):
        return [str(a) for a in metrics.get("alarms") or []]
    return []



def jtt_stage1_hashes(runs: Iterable[RunRecord]) -> dict[str, Path]:
    """``{stage-1 hash: JTT run}`` for every JTT run among ``runs``: JTT's identification
    model is an ordinary ERM run record (``jtt_epochs`` epochs, no early stopping), a step of
    JTT rather than a result of its own, so the report does not show it as an ERM row."""
    out: dict[str, Path] = {}
    for rec in runs:
        path = rec.path / JTT_ERROR_FILE
        if recorded_algorithm(rec) != "jtt" or not path.is_file():
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
    unfinished derived run, the command that redoes it, as its record states it."""
    if is_derived(rec):
        return redo_command(rec.config["derived"], rec.path)
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
