"""The sweep state file and run status: done / running / queued / failed / missing.

``OUT/.sweeps/<spec-name>.json`` maps a run hash to what the launchers know about its latest
attempt::

    {"<hash>": {"run_dir", "log", "launcher", "host", "pid", "pid_start", "job_id",
                "submitted", "started", "finished", "exit_code", "error", "attempts"}}

Times are Unix seconds. The file is rewritten atomically under an advisory lock
(``<spec-name>.lock``), so the local launcher's threads and Slurm/submitit tasks on other hosts
can update it side by side. The run's own ``done`` marker is the truth about completion; the state
file only explains the runs that are not done.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robustbench_fvae.record import schema, store
from robustbench_fvae.record.io import write_json_atomic

STATE_DIR = ".sweeps"
STATUSES = ("done", "running", "queued", "failed", "missing")
# Exit codes after which the run kept a checkpoint and resumes when relaunched (143: SIGTERM seen
# by the runner, which checkpointed; negative: killed by a signal — it resumes from its last one).
RESUMABLE_EXIT = 143
SLURM_ACTIVE = {"PENDING": "queued", "REQUEUED": "queued", "CONFIGURING": "queued",
                "RUNNING": "running", "COMPLETING": "running", "SUSPENDED": "running"}


class StateLockTimeout(RuntimeError):
    """The sweep state file stayed locked too long (another process hung while holding it)."""


def process_start_time(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (Linux), None when unknown.

    Stored next to a pid so that a recycled pid is not mistaken for a live run.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces: split after it.
    fields = stat[stat.rfind(")") + 2:].split()
    try:
        return int(fields[19])  # field 22 overall
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int | None, start: int | None = None) -> bool:
    """True when process ``pid`` exists (and, if ``start`` is given, is the same process)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    if start is not None:
        now = process_start_time(pid)
        if now is not None and now != start:
            return False
        stat = Path(f"/proc/{pid}/stat")
        with contextlib.suppress(OSError):  # a zombie has exited; it only awaits its parent
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    return True


class SweepState:
    """Read/update ``OUT/.sweeps/<name>.json``."""

    def __init__(self, out: str | Path, name: str) -> None:
        self.dir = Path(out) / STATE_DIR
        self.path = self.dir / f"{name}.json"
        self.lock_path = self.dir / f"{name}.lock"

    @contextlib.contextmanager
    def _locked(self, timeout: float = 30.0) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as fh:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    # Non-blocking retries: a blocking flock could deadlock when a signal handler
                    # of the lock holder's own process tries to update the state.
                    if time.monotonic() > deadline:
                        raise StateLockTimeout(f"{self.lock_path} stayed locked for {timeout:.0f} "
                                               "s; is another sweep process hung?") from None
                    time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def load(self) -> dict[str, dict[str, Any]]:
        """The state (empty when the file does not exist; an unreadable file counts as empty)."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}  # written atomically, so only a hand edit breaks it; start over
        return data if isinstance(data, dict) else {}

    def update(self, run_hash: str, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into the entry of ``run_hash``; returns the new entry."""
        with self._locked():
            data = self.load()
            entry = dict(data.get(run_hash, {}))
            entry.update(fields)
            data[run_hash] = entry
            write_json_atomic(self.path, data)
        return entry

    def update_many(self, entries: dict[str, dict[str, Any]]) -> None:
        """Merge several entries in one locked rewrite."""
        with self._locked():
            data = self.load()
            for run_hash, fields in entries.items():
                data[run_hash] = {**data.get(run_hash, {}), **fields}
            write_json_atomic(self.path, data)


# ---------------------------------------------------------------- status


@dataclass(frozen=True)
class RunStatus:
    """A run's status (one of STATUSES) and a short human detail."""

    status: str
    detail: str
    entry: dict[str, Any]


def slurm_job_states(job_ids: list[str]) -> dict[str, str]:
    """``{job_id: SLURM state}`` from ``sacct`` (best effort: {} when sacct is missing/fails)."""
    if not job_ids or shutil.which("sacct") is None:
        return {}
    try:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j",
                              ",".join(sorted(set(job_ids)))], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    states = {}
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) >= 2:
            states[parts[0].strip()] = parts[1].split()[0] if parts[1].split() else ""
    return states


def _clock(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "?"


def run_status(run_dir: Path, entry: dict[str, Any] | None,
               slurm_states: dict[str, str] | None = None,
               host: str | None = None) -> RunStatus:
    """Classify one run from its ``done`` marker and its state entry (see module docstring)."""
    entry = entry or {}
    if store.is_done(run_dir):
        return RunStatus("done", "", entry)
    host = host or socket.gethostname()
    started, finished = entry.get("started"), entry.get("finished")
    submitted = entry.get("submitted")
    latest = max((t for t in (submitted, started, finished) if t), default=None)
    if latest is None:
        if (Path(run_dir) / schema.CONFIG_FILE).is_file():
            return RunStatus("missing", "unfinished run not launched by this sweep", entry)
        return RunStatus("missing", "never started", entry)
    job = entry.get("job_id")
    slurm_state = (slurm_states or {}).get(str(job)) if job else None
    if latest == submitted and not (started and started >= submitted):
        if slurm_state and slurm_state not in SLURM_ACTIVE:
            return RunStatus("failed", f"Slurm job {job} is {slurm_state} and the run never "
                             "started", entry)
        return RunStatus("queued", f"Slurm job {job} submitted {_clock(submitted)}", entry)
    if latest == started and not (finished and finished >= started):
        where = entry.get("host")
        if where == host:
            if pid_alive(entry.get("pid"), entry.get("pid_start")):
                return RunStatus("running", f"pid {entry.get('pid')} since {_clock(started)}",
                                 entry)
            return RunStatus("missing", f"interrupted: pid {entry.get('pid')} is gone (killed) — "
                             "relaunch to resume from its last checkpoint", entry)
        if slurm_state and slurm_state not in SLURM_ACTIVE:
            return RunStatus("missing", f"Slurm job {job} is {slurm_state}; relaunch to resume",
                             entry)
        return RunStatus("running", f"on {where} since {_clock(started)}"
                         + (f" (Slurm job {job})" if job else ""), entry)
    code = entry.get("exit_code")
    if code == RESUMABLE_EXIT or (isinstance(code, int) and code < 0):
        how = "stopped by SIGTERM, checkpoint written" if code == RESUMABLE_EXIT else \
            f"killed by signal {-code}"
        return RunStatus("missing", f"interrupted ({how}) — relaunch to resume", entry)
    if code == 0:
        error = entry.get("error") or "exited 0 but wrote no done marker"
        return RunStatus("failed", error, entry)
    return RunStatus("failed", f"exit code {code} at {_clock(finished)}", entry)


def running_here(run_dir: Path, entry: dict[str, Any] | None) -> bool:
    """True when a live process on this machine runs it now (another sweep process's run,
    which a launch must not start twice); a run whose process is gone, however it stopped, is
    not."""
    return bool(entry) and entry.get("host") == socket.gethostname() \
        and run_status(run_dir, entry).status == "running"


def tail(path: str | Path, lines: int = 10) -> list[str]:
    """The last ``lines`` lines of a text file (progress-bar carriage returns folded)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    out = [line.rsplit("\r", 1)[-1].rstrip() for line in data.splitlines()]
    out = [line for line in out if line]
    return out[-lines:]
