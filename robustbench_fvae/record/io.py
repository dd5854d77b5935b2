"""Atomic files and locks: the write primitives every record, cache and shared file uses.

Every file is written atomically: a temp file in the same directory, fsync, then ``os.replace``,
so readers see the old file or the complete new one, never a half-written one. JSON-lines files
are appended line by line; a crash can at worst leave a partial *last* line, which readers skip
and the next append removes. Locks are ``flock``s, released by the kernel when their holder exits.

No torch here (and no other module of the package): ``data/`` builds its caches with these.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np


class RecordError(ValueError):
    """A run record file exists but is malformed (bad JSON, wrong columns, missing keys)."""


class RecordNotFoundError(FileNotFoundError):
    """A run record file or directory is missing."""


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
def flocked(path: Path, on_busy: Callable[[], None] | None = None) -> Iterator[IO[str] | None]:
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
    with flocked(Path(path)):
        yield


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder + fsync + rename.

    Readers see either the old file or the complete new one, never a half-written file; on any
    error the temp file is removed and the old file is left as it was. A ``path`` that exists
    and is not a regular file raises a ValueError.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        # A rename would replace it: a folder, or a device such as /dev/null (as root).
        raise ValueError(f"cannot write {path}: it exists and is not a regular file; "
                         "give the path of a file")
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


def write_folder_atomic(folder: str | Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` fills a fresh sibling folder, which then replaces ``folder`` (its
    permissions from the umask): readers see the old folder or the new one, never a half-written
    one (another library's ``save_pretrained`` writes several files)."""
    folder = Path(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    old = folder.with_name(f".{folder.name}.old")
    try:
        write(str(tmp))
        tmp.chmod(0o777 & ~_UMASK)
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON. Serialisation happens before anything is
    written, so an unserialisable object (or NaN) leaves the old file intact."""
    write_text_atomic(path, _dumps(obj, indent=2) + "\n")


def _repair_last_line(path: Path) -> None:
    """Make a JSON-lines file end with a newline before appending to it.

    A last line without a newline is either a complete record (hand-edited file: the newline is
    added) or a write cut short by a crash (not valid JSON: it is truncated away), matching what
    :func:`robustbench_fvae.record.schema.read_history` reads.
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


def read_json_file(path: Path, what: str) -> Any:
    """Read a JSON file; ``what`` names it in the errors (missing → RecordNotFoundError,
    malformed → RecordError)."""
    if not path.is_file():
        raise RecordNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RecordError(f"{what} {path} is not valid JSON: {err}") from err


def read_json(path: str | Path) -> Any:
    """Read one JSON record file; missing → RecordNotFoundError, malformed → RecordError."""
    return read_json_file(Path(path), "record file")
