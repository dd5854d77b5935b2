"""Process control for the tests that signal real runs, without races against the scheduler.

Rules these helpers follow (a busy CI machine can stall any process for seconds):
* never act on a process on the strength of a check made while it was running: freeze it
  (SIGSTOP), wait until the kernel reports it stopped, and only then look at its files;
* wait for events, not for time: a wait ends when the event happens; its ceiling
  (:data:`HANG_S`) only turns a genuine hang into a failure instead of a stuck CI job;
* every process a test starts is killed and reaped whatever happens (:func:`reaped`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

# Not a deadline for the event: a hang detector. Far beyond any load-induced delay.
HANG_S = 900.0
POLL_S = 0.02


class ProcessGone(AssertionError):
    """The process ended before the event the test waited for."""


def process_state(pid: int) -> str | None:
    """The kernel's one-letter state of ``pid`` (R, S, D, T, t, Z, …), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # "pid (comm) S ...": comm may hold spaces or parentheses, so split after the last ')'.
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int) -> bool:
    return process_state(pid) not in (None, "Z", "X")


def wait_until(predicate: Callable[[], bool], what: str,
               gone: Callable[[], bool] | None = None) -> None:
    """Return once ``predicate()`` holds; fail if ``gone()`` says the awaited event can no longer
    happen, or after :data:`HANG_S` (a hang, not load)."""
    ceiling = time.monotonic() + HANG_S
    while not predicate():
        if gone is not None and gone():
            raise ProcessGone(f"the process ended before {what}")
        if time.monotonic() > ceiling:
            raise AssertionError(f"hung: no {what} after {HANG_S:.0f} s")
        time.sleep(POLL_S)


def stop(pid: int) -> None:
    """SIGSTOP ``pid`` and return once it is stopped (state T)."""
    os.kill(pid, signal.SIGSTOP)
    wait_until(lambda: process_state(pid) in ("T", "t"), f"stop of process {pid}",
               gone=lambda: not alive(pid))


def freeze_when(pid: int | subprocess.Popen, condition: Callable[[], bool], what: str) -> None:
    """Leave ``pid`` stopped at a moment when ``condition()`` holds.

    The process runs in short slices between checks; every check is made while it is stopped,
    so it cannot move on (or finish) between the check and what the caller does next. Given a
    ``Popen`` with captured output, a process that ends first fails with that output.
    """
    if isinstance(pid, subprocess.Popen):
        proc = pid
        try:
            return freeze_when(proc.pid, condition, what)
        except ProcessGone:
            output = proc.communicate()[0] if proc.stdout is not None else ""
            raise ProcessGone(f"the process ended (exit {proc.returncode}) before {what}:\n"
                              f"{output}") from None
    ceiling = time.monotonic() + HANG_S
    while True:
        stop(pid)
        if condition():
            return
        os.kill(pid, signal.SIGCONT)
        if time.monotonic() > ceiling:
            raise AssertionError(f"hung: no {what} after {HANG_S:.0f} s")
        time.sleep(POLL_S)


def signal_pending(pid: int, signum: int) -> bool:
    """True when ``signum`` waits to be delivered to (stopped) process ``pid``."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    masks = [int(line.split()[1], 16) for line in status.splitlines()
             if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(mask & (1 << (signum - 1)) for mask in masks)


def kill_pid(pid: int | None) -> None:
    """SIGKILL ``pid`` if it still runs (continuing it first does not matter for SIGKILL)."""
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def reaped(*procs: subprocess.Popen, pids: Callable[[], list[int]] | None = None
           ) -> Iterator[None]:
    """Kill and reap ``procs`` (and the pids ``pids()`` names at exit) whatever happens."""
    try:
        yield
    finally:
        for pid in (pids() if pids is not None else []):
            kill_pid(pid)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
