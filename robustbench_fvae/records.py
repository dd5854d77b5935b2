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

Every file is written atomically: a temp file in the same directory, fsync, then ``os.replace``.
The history is appended line by line; a crash can at worst leave a partial *last* line, which
readers skip and the next append removes.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import math
import os
import platform
import socket
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from robustbench_fvae.config import RunConfig, config_hash
from robustbench_fvae.metrics import evaluate_split

if TYPE_CHECKING:  # the data package imports torch; records only needs the split's attributes
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


class RecordError(ValueError):
    """A run record file exists but is malformed (bad JSON, wrong columns, missing keys)."""


class RecordNotFoundError(FileNotFoundError):
    """A run record file or directory is missing."""


def predictions_path(run_dir: str | Path, split: str) -> Path:
    """Where a run's predictions of ``split`` are: ``predictions_<split>.csv``, or its gzip
    copy ``.csv.gz`` (published records, see robustbench_fvae/publish.py) when only that
    exists."""
    plain = Path(run_dir) / f"predictions_{split}.csv"
    packed = plain.with_name(plain.name + ".gz")
    return packed if not plain.exists() and packed.exists() else plain


def run_dir(out: str | Path, cfg: RunConfig) -> Path:
    """``out/<dataset>/<method>/<config_hash>``: where the run of ``cfg`` lives."""
    return Path(out) / cfg.dataset / cfg.method / config_hash(cfg)


# --------------------------------------------------------------------------- atomic writers


def _json_default(obj: Any) -> Any:
    # numpy scalars/arrays and paths show up in configs and metrics; write them as plain JSON.
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (Path, os.PathLike)):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def _dumps(obj: Any, indent: int | None = None) -> str:
    # allow_nan=False: NaN/Infinity are not JSON, and outside tools reading the record would choke.
    try:
        return json.dumps(obj, indent=indent, allow_nan=False, default=_json_default)
    except ValueError as err:
        raise RecordError(f"cannot write a record containing NaN or infinity: {err}") from err


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def _flocked(path: Path, on_busy: Callable[[], None] | None = None) -> Iterator[IO[str] | None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) and yield its handle (opened
    ``a+``), or None without POSIX ``fcntl``. With ``on_busy``, a held lock first calls it (it may
    raise instead of waiting), then waits; without, it just waits."""
    try:
        import fcntl
    except ImportError:
        yield None
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (fcntl.LOCK_NB if on_busy else 0))
        except BlockingIOError:
            on_busy()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield handle
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def exclusive_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive inter-process lock on the file ``path`` (created if missing), so that
    parallel jobs build a shared cache once. Without POSIX ``fcntl`` there is no lock; the atomic
    renames of the writers still keep every file whole."""
    with _flocked(Path(path)):
        yield


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder + fsync + rename.

    Readers see either the old file or the complete new one, never a half-written file; on any
    error the temp file is removed and the old file is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates 0600 files; records are shared, so use the usual umask-based mode.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Atomically write UTF-8 text (see :func:`write_bytes_atomic`)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_csv_atomic(path: str | Path, columns: Sequence[str], rows: Iterable[dict]) -> Path:
    """Atomically write ``rows`` as CSV with the header ``columns`` (in that order); floats with
    6 significant digits, NaN as an empty cell, ``inf`` as ``inf``. Returns ``path``."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if isinstance(v, float) and math.isnan(v)
                         else f"{v:.6g}" if isinstance(v, float) else str(v)
                         for v in (row[c] for c in columns)])
    write_text_atomic(path, buf.getvalue())
    return Path(path)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON. Serialisation happens before anything is
    written, so an unserialisable object (or NaN) leaves the old file intact."""
    write_text_atomic(path, _dumps(obj, indent=2) + "\n")


def _repair_last_line(path: Path) -> None:
    """Make a JSON-lines file end with a newline before appending to it.

    A last line without a newline is either a complete record (hand-edited file: the newline is
    added) or a write cut short by a crash (not valid JSON: it is truncated away), matching what
    :func:`read_history` reads.
    """
    with open(path, "rb+") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return
        # Scan backwards in chunks for the last newline; history lines are short.
        pos, keep = size, 0
        while pos > 0:
            step = min(4096, pos)
            pos -= step
            fh.seek(pos)
            chunk = fh.read(step)
            idx = chunk.rfind(b"\n")
            if idx >= 0:
                keep = pos + idx + 1
                break
        fh.seek(keep)
        tail = fh.read()
        try:
            json.loads(tail)
        except (json.JSONDecodeError, UnicodeDecodeError):
            fh.truncate(keep)
        else:
            fh.seek(0, os.SEEK_END)
            fh.write(b"\n")


def append_jsonl(path: str | Path, obj: Any) -> None:
    """Append ``obj`` as one JSON line to ``path`` (created if missing), fsynced.

    The line is serialised first and written with a single ``write``; a partial last line left
    by an earlier crash is removed before appending, so a crash never corrupts a later record.
    """
    path = Path(path)
    line = (_dumps(obj) + "\n").encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        _repair_last_line(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_jsonl_atomic(path: str | Path, records: Sequence[Any]) -> None:
    """Atomically replace a JSON-lines file (e.g. to cut the history back to a checkpoint)."""
    write_text_atomic(path, "".join(_dumps(r) + "\n" for r in records))


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


# --------------------------------------------------------------------------- readers


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise RecordNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RecordError(f"{what} {path} is not valid JSON: {err}") from err


def read_json(path: str | Path) -> Any:
    """Read one JSON record file; missing → RecordNotFoundError, malformed → RecordError."""
    return _read_json(Path(path), "record file")


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


def _check_dataset_info(info: Any, where: Path) -> dict[str, Any]:
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


# --------------------------------------------------------------------------- run records


def is_done(run_dir: str | Path) -> bool:
    """True when the run finished (its ``done`` marker exists)."""
    return (Path(run_dir) / DONE_FILE).is_file()


def mark_done(run_dir: str | Path) -> None:
    """Write the ``done`` marker (call it after every other file of the run is written)."""
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_text_atomic(Path(run_dir) / DONE_FILE, stamp + "\n")


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
        return _check_dataset_info(self.config.get("dataset_info"), self.path / CONFIG_FILE)


def load_run(run_dir: str | Path) -> RunRecord:
    """Read a run directory (finished or not). Needs ``config.json``; the rest may be absent."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RecordNotFoundError(f"run directory not found: {path}")
    config = _read_json(path / CONFIG_FILE, "run config")
    if not isinstance(config, dict):
        raise RecordError(f"{path / CONFIG_FILE} must hold a JSON object")
    metrics_file = path / METRICS_FILE
    metrics = _read_json(metrics_file, "metrics") if metrics_file.is_file() else None
    history = read_history(path / HISTORY_FILE)
    if int(config.get("record_version", 1)) < 2:
        history, metrics = epochs_from_one(history, metrics)
    return RunRecord(path=path, config=config, metrics=metrics, history=history,
                     done=is_done(path))


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


# --------------------------------------------------------------------------- one process per run


class RunInUseError(RuntimeError):
    """Another live process holds the run directory (a second launch of the same config)."""


def lock_path(run_dir: str | Path) -> Path:
    """The lock file of a run: ``<hash>.lock`` beside the run directory (outside it, so that
    ``--force`` can delete the directory while holding the lock)."""
    run_dir = Path(run_dir)
    return run_dir.with_name(run_dir.name + LOCK_SUFFIX)


@contextlib.contextmanager
def run_lock(run_dir: str | Path, *, wait: bool = False,
             log: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the run directory for this process: one process trains a config at a time.

    The lock is an ``flock`` on :func:`lock_path`, released by the kernel when the holder exits
    however it exits, so a killed run never blocks a relaunch. The file names the holder (pid,
    host, start time) for the message a second launch gets: :class:`RunInUseError`, or with
    ``wait`` a wait until the holder ends. Without POSIX ``fcntl`` there is no lock.
    """
    path = lock_path(run_dir)

    def busy() -> None:
        holder = _lock_holder(path)
        if not wait:
            raise RunInUseError(
                f"{run_dir} is being trained by {holder}; wait for it to finish (or pass "
                "--wait), or stop that process first")
        if log is not None:
            log(f"waiting for {holder}, which is training {run_dir}")

    with _flocked(path, on_busy=busy) as handle:
        if handle is not None:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                         f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}\n")
            handle.flush()
        yield


def _lock_holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return f"process {text}" if text.startswith("pid ") else "another process"


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
        config = _read_json(path / CONFIG_FILE, "run config")
        info = _check_dataset_info(config.get("dataset_info") if isinstance(config, dict)
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
