"""Where runs live and how one is made: run identity and directory, done marker, run lock, and
:func:`run_job`, the one lifecycle every run record goes through.

A run of config ``cfg`` lives in ``OUT/<dataset>/<method>/<config_hash>/``; it is finished when
its ``done`` marker exists, which is written last. One process makes a run directory at a time
(:func:`run_lock`). No torch import.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from robustbench_fvae.config import RunConfig, config_hash
from robustbench_fvae.record.io import flocked, read_json, write_json_atomic, write_text_atomic
from robustbench_fvae.record.schema import DONE_FILE, LOCK_SUFFIX, METRICS_FILE


def run_dir(out: str | Path, cfg: RunConfig) -> Path:
    """``out/<dataset>/<method>/<config_hash>``: where the run of ``cfg`` lives."""
    return Path(out) / cfg.dataset / cfg.method / config_hash(cfg)


def is_done(run_dir: str | Path) -> bool:
    """True when the run finished (its ``done`` marker exists)."""
    return (Path(run_dir) / DONE_FILE).is_file()


def mark_done(run_dir: str | Path) -> None:
    """Write the ``done`` marker (call it after every other file of the run is written)."""
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_text_atomic(Path(run_dir) / DONE_FILE, stamp + "\n")



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

    with flocked(path, on_busy=busy) as handle:
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




# --------------------------------------------------------------------------- the run lifecycle


class Ranks(Protocol):
    """The processes making one run together (``distributed.Distributed``): every rank runs the
    body; rank 0 (``is_main``) alone holds the lock and writes the shared files."""

    @property
    def is_main(self) -> bool: ...

    def any(self, flag: bool) -> bool: ...

    def barrier(self) -> None: ...


class _OneProcess:
    """:class:`Ranks` of a run made by this process alone."""

    is_main = True

    def any(self, flag: bool) -> bool:
        return bool(flag)

    def barrier(self) -> None:
        pass


@dataclass
class JobResult:
    """A run directory and its ``metrics.json``; ``skipped``: it was done already."""

    run_dir: Path
    metrics: dict[str, Any]
    skipped: bool = False


def _silent(_message: str) -> None:
    pass


def run_job(rdir: str | Path, body: Callable[[], Mapping[str, Any]], *, force: bool = False,
            wait: bool = False, resume: bool = True, redo: str = "rerun",
            log: Callable[[str], None] = _silent, ranks: Ranks | None = None) -> JobResult:
    """Make the run in ``rdir`` once, whoever else tries to at the same time:

    1. done and not ``force``: return its ``metrics.json`` (``skipped``);
    2. hold :func:`run_lock` (rank 0): a live holder raises :class:`RunInUseError` on every rank,
       or with ``wait`` is waited for;
    3. done now (by the holder waited for) and not ``force``: as 1;
    4. remove ``rdir`` with ``force``, and whenever ``resume`` is False (the leftovers of a
       killed run that cannot resume);
    5. ``body()`` (every rank) writes the run's other files and returns its metrics;
    6. rank 0 writes them to ``metrics.json``, then the done marker (last, so a run killed
       before it is unfinished).

    ``redo`` names, in the "already done" line, what ``--force`` does.
    """
    rdir, ranks = Path(rdir), ranks if ranks is not None else _OneProcess()

    def finished() -> JobResult | None:
        if force or not is_done(rdir):
            return None
        log(f"already done: {rdir} (use --force to {redo})")
        return JobResult(rdir, read_json(rdir / METRICS_FILE), skipped=True)

    if (done := finished()) is not None:
        return done
    with contextlib.ExitStack() as held:
        failure = None
        if ranks.is_main:
            try:
                held.enter_context(run_lock(rdir, wait=wait, log=log))
            except RunInUseError as err:
                failure = err
        if ranks.any(failure is not None):  # every rank stops, not only rank 0
            raise failure or RunInUseError(f"{rdir} is held by another process")
        if (done := finished()) is not None:
            return done
        if (force or not resume) and rdir.exists() and ranks.is_main:
            shutil.rmtree(rdir)
        ranks.barrier()
        metrics = body()
        if ranks.is_main:
            write_json_atomic(rdir / METRICS_FILE, metrics)
            mark_done(rdir)
        ranks.barrier()
        return JobResult(rdir, metrics if isinstance(metrics, dict) else dict(metrics))
