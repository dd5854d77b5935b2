"""Run records: the on-disk contract read by reports, sweeps, notebooks and outside tools (§7).

One directory per run, ``OUT/<dataset>/<method>/<config_hash>/``, holding:

* ``config.json`` — ``{"config_hash", "config": RunConfig.to_dict(), "dataset_info": {...},
  "environment": {...}}`` (see :func:`config_record`). ``dataset_info`` holds the class and
  attribute names, the populated groups, ``n_groups`` and the training group counts, so the
  metrics can be recomputed from the record alone.
* ``history.jsonl`` — one JSON object per evaluation (``epoch, step, train, val, test``).
* ``metrics.json`` — ``{"selection", "selected_epoch", "val": M, "test": M, "params"}``.

Epochs are counted from 1 everywhere (epoch 1 = the evaluation after the first pass over the
training data), as on the console. Records written before :data:`RECORD_VERSION` 2 counted from 0;
:func:`load_run` converts them when it reads them.
* ``predictions_val.csv``, ``predictions_test.csv`` — ``index, y, a, g, pred, prob_0 … prob_{K-1}``.
* ``done`` — written last; a run directory without it is unfinished (or was killed).


Every file is written atomically (see :mod:`robustbench_fvae.record.io`). This module names the
files once, for writers and readers alike, and holds their format-level readers and writers;
:mod:`~robustbench_fvae.record.store` places and locks runs, :mod:`~robustbench_fvae.record.view`
interprets them. No torch import.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import platform
import socket
import subprocess
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from robustbench_fvae.config import RunConfig, config_hash
from robustbench_fvae.metrics import evaluate_split
from robustbench_fvae.record.io import (
    RecordError,
    RecordNotFoundError,
    read_json_file,
    write_text_atomic,
)

if TYPE_CHECKING:  # the data package imports torch; the schema only needs the split's attributes
    from robustbench_fvae.data.base import GroupSplit

CONFIG_FILE = "config.json"
HISTORY_FILE = "history.jsonl"
METRICS_FILE = "metrics.json"
DONE_FILE = "done"
LOCK_SUFFIX = ".lock"
# 2: epochs counted from 1 in history.jsonl and metrics.json (1: counted from 0).
RECORD_VERSION = 2
PREDICTION_SPLITS = ("val", "test")
PREDICTION_COLUMNS = ("index", "y", "a", "g", "pred")
# JTT's record of its error set: the training indices stage 1 misclassified, and the stage-1
# ERM run (``stage1_hash``) they came from.
JTT_ERROR_FILE = "jtt_error_set.json"


def predictions_path(run_dir: str | Path, split: str) -> Path:
    """Where a run's predictions of ``split`` are: ``predictions_<split>.csv``, or its gzip
    copy ``.csv.gz`` (published records, see robustbench_fvae/publish.py) when only that
    exists."""
    plain = Path(run_dir) / f"predictions_{split}.csv"
    packed = plain.with_name(plain.name + ".gz")
    return packed if not plain.exists() and packed.exists() else plain



def write_predictions_csv(
    path: str | Path,
    index: Any,
    y: Any,
    a: Any,
    g: Any,
    pred: Any,
    prob: Any,
) -> None:
    """Atomically write ``index, y, a, g, pred, prob_0 … prob_{K-1}``, one row per sample.

    ``index`` is the sample's position in its split; ``prob`` has shape (N, K). Probabilities are
    written as float64 with shortest round-trip ``repr``, so reading them back is exact and the
    recomputed metrics equal the ones computed in memory.
    """
    cols = [np.asarray(v) for v in (index, y, a, g, pred)]
    p = np.asarray(prob, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"prob must have shape (N, K), got {p.shape}")
    lengths = [len(c) for c in cols] + [p.shape[0]]
    if len(set(lengths)) != 1:
        names = (*PREDICTION_COLUMNS, "prob")
        detail = ", ".join(f"{k}={n}" for k, n in zip(names, lengths))
        raise ValueError(f"prediction arrays must have the same length, got {detail}")
    ints = [c.astype(np.int64) for c in cols]
    buf = io.StringIO()
    header = [*PREDICTION_COLUMNS, *(f"prob_{k}" for k in range(p.shape[1]))]
    buf.write(",".join(header) + "\n")
    for i in range(p.shape[0]):
        row = [str(int(c[i])) for c in ints] + [repr(float(x)) for x in p[i]]
        buf.write(",".join(row) + "\n")
    write_text_atomic(path, buf.getvalue())




def read_predictions(path: str | Path) -> dict[str, np.ndarray]:
    """Read a predictions CSV (gzip-compressed when its name ends in ``.gz``).

    Returns ``{"index","y","a","g","pred"}`` as int64 arrays (N,) and ``"prob"`` float64 (N, K).
    """
    path = Path(path)
    if not path.is_file():
        raise RecordNotFoundError(f"predictions file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        rows = list(reader)
    if header is None:
        raise RecordError(f"predictions file {path} is empty; expected a header "
                          f"{','.join(PREDICTION_COLUMNS)},prob_0,...")
    k = len(header) - len(PREDICTION_COLUMNS)
    expected = [*PREDICTION_COLUMNS, *(f"prob_{i}" for i in range(k))]
    if k < 1 or header != expected:
        raise RecordError(f"predictions file {path} has columns {header}; expected "
                          f"{','.join(PREDICTION_COLUMNS)},prob_0,...,prob_K-1")
    for line_no, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise RecordError(f"predictions file {path} line {line_no} has {len(row)} fields, "
                              f"expected {len(header)}")
    n_int = len(PREDICTION_COLUMNS)
    try:
        ints = np.array([row[:n_int] for row in rows], dtype=np.int64).reshape(-1, n_int)
        prob = np.array([row[n_int:] for row in rows], dtype=np.float64).reshape(-1, k)
    except ValueError as err:
        raise RecordError(f"predictions file {path} has a non-numeric value: {err}") from err
    out = {name: ints[:, j].copy() for j, name in enumerate(PREDICTION_COLUMNS)}
    out["prob"] = prob
    return out


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """Read ``history.jsonl``: one dict per evaluation, in file order.

    A malformed *last* line without a trailing newline (a write cut short by a crash) is skipped;
    a malformed line anywhere else is corruption and raises :class:`RecordError`. A missing file
    gives an empty history (the run has not evaluated yet).
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail is b"" when the file ends with a newline
    records: list[dict[str, Any]] = []
    for line_no, raw in enumerate(complete, start=1):
        if not raw.strip():
            continue
        try:
            records.append(json.loads(raw))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RecordError(f"history {path} line {line_no} is not valid JSON: {err}") from err
    if tail.strip():
        # A complete record merely missing its newline (hand-edited file) is kept; anything else
        # is a write cut short by a crash and is not a record.
        with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
            records.append(json.loads(tail))
    return records



# --------------------------------------------------------------------------- dataset info


def dataset_info_dict(split: GroupSplit) -> dict[str, Any]:
    """What ``config.json`` stores about the dataset so the record is self-contained."""
    return {
        "dataset": split.dataset_name,
        "class_names": list(split.class_names),
        "attribute_names": list(split.attribute_names),
        "groups": [{"g": int(gr.g), "y": int(gr.y), "a": int(gr.a), "name": str(gr.name)}
                   for gr in split.groups],
        "n_groups": int(split.n_groups),
        "train_group_counts": [int(c) for c in np.asarray(split.train_group_counts)],
    }



def check_dataset_info(info: Any, where: Path) -> dict[str, Any]:
    """``info`` (a ``config.json`` ``dataset_info``) as a dict, or RecordError naming what is
    missing from it at ``where``."""
    required = ("class_names", "attribute_names", "groups", "n_groups", "train_group_counts")
    if not isinstance(info, Mapping):
        raise RecordError(f"{where} has no \"dataset_info\" object; it is needed to recompute "
                          "metrics (records written by this package always have it)")
    missing = [k for k in required if k not in info]
    if missing:
        raise RecordError(f"dataset_info in {where} lacks {missing}; "
                          f"expected keys {list(required)}")
    return dict(info)




# --------------------------------------------------------------------------- environment


def _git_commit(repo_dir: Path) -> dict[str, Any]:
    """Commit and dirtiness of the project checkout, or Nones when it is not a git checkout."""
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=repo_dir,
                             capture_output=True, text=True, timeout=5, check=True).stdout.split()
        # Only report a commit when the package lives at the top of *its own* repository (not,
        # say, inside some unrelated repo that happens to contain a site-packages folder).
        if len(top) != 2 or Path(top[0]).resolve() != repo_dir.resolve():
            return {"git_commit": None, "git_dirty": None}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=repo_dir, capture_output=True, text=True, timeout=5,
                               check=True).stdout.strip() != ""
        return {"git_commit": top[1], "git_dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}


def _cpu_model() -> str | None:
    """The processor's model name (Linux: /proc/cpuinfo), else platform's guess, else None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def environment_info(device: str | None = None) -> dict[str, Any]:
    """Package versions, git commit of the project (None if unavailable), host and device.

    Cheap (no torch import, one or two short git calls) and never raises.
    """
    import robustbench_fvae

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("torch", "torchvision", "timm", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    versions["robustbench_fvae"] = getattr(robustbench_fvae, "__version__", None)
    repo_dir = Path(robustbench_fvae.__file__).resolve().parent.parent
    return {
        "versions": versions,
        **_git_commit(repo_dir),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        # CPU kernels round differently from one processor to another: a rerun elsewhere can
        # differ in the last bits (docs/protocol.md), so the record says where it ran.
        "cpu": _cpu_model(),
        "device": device,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def config_record(
    cfg: RunConfig, dataset_info: Mapping[str, Any], environment: Mapping[str, Any]
) -> dict[str, Any]:
    """The content of ``config.json``: hash, resolved config, dataset info, environment."""
    return {
        "record_version": RECORD_VERSION,
        "config_hash": config_hash(cfg),
        "config": cfg.to_dict(),
        "dataset_info": dict(dataset_info),
        "environment": dict(environment),
    }




def epochs_from_one(history: list[dict[str, Any]], metrics: dict[str, Any] | None = None
                    ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Convert a version-1 record (epochs counted from 0) to the current convention (from 1)."""
    history = [dict(h, epoch=h["epoch"] + 1) if isinstance(h.get("epoch"), int) else h
               for h in history]
    if isinstance(metrics, dict):
        metrics = dict(metrics)
        if isinstance(metrics.get("selected_epoch"), int):
            metrics["selected_epoch"] += 1
        others = metrics.get("other_selections")
        if isinstance(others, dict):
            metrics["other_selections"] = {
                rule: dict(o, selected_epoch=o["selected_epoch"] + 1)
                if isinstance(o, dict) and isinstance(o.get("selected_epoch"), int) else o
                for rule, o in others.items()}
    return history, metrics


def recompute_metrics(
    run_dir: str | Path,
    groups: Sequence[Any] | None = None,
    train_group_counts: Sequence[int] | np.ndarray | None = None,
    *,
    allow_empty: bool = False,
) -> dict[str, dict[str, Any]]:
    """Rebuild ``{"val": M, "test": M}`` from the prediction CSVs of a run.

    Groups and training counts come from ``config.json``'s ``dataset_info`` unless given. Splits
    without a predictions file are left out; having none at all is an error.
    """
    path = Path(run_dir)
    if groups is None or train_group_counts is None:
        config = read_json_file(path / CONFIG_FILE, "run config")
        info = check_dataset_info(config.get("dataset_info") if isinstance(config, dict)
                                   else None, path / CONFIG_FILE)
        groups = info["groups"] if groups is None else groups
        if train_group_counts is None:
            train_group_counts = info["train_group_counts"]
    out: dict[str, dict[str, Any]] = {}
    for split in PREDICTION_SPLITS:
        file = predictions_path(path, split)
        if not file.is_file():
            continue
        p = read_predictions(file)
        out[split] = evaluate_split(p["y"], p["a"], p["g"], p["pred"], p["prob"], groups,
                                    train_group_counts, allow_empty=allow_empty)
    if not out:
        raise RecordNotFoundError(f"no predictions_val.csv or predictions_test.csv in {path}")
    return out
