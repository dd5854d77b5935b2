"""Launchers: run a sweep's runs as ``python -m robustbench_fvae.run`` subprocesses.

* :func:`launch_local` — N concurrent runs on this machine (``--jobs N``), threads split between
  them, Ctrl-C/SIGTERM forwarded as SIGTERM so every run checkpoints before the sweep exits.
* :func:`launch_dfr` — the DFR step of a spec with ``dfr: true``: ``python -m
  robustbench_fvae.dfr RUN_DIR --wait`` for each finished run, one after the other, here.
* :func:`launch_submitit` — one job array over the runs through ``submitit``: on Slurm
  (``cluster="slurm"``, returns after submission) or with submitit's local executor
  (``cluster="local"``, waits; the same code path, handy to try it without a cluster). A
  preempted or timed-out task gets submitit's USR2 signal, forwards SIGTERM to its run (which
  writes a checkpoint) and is requeued; the relaunched run resumes from that checkpoint.

Every attempt appends the run's output to ``<run_dir>/log.txt`` and records pid, host, times and
exit code in the sweep state file (:mod:`robustbench_fvae.sweeps.state`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from robustbench_fvae.record import store
from robustbench_fvae.sweeps.spec import LOG_FILE, PlannedRun, SweepSpec, dfr_run_dir, run_flags
from robustbench_fvae.sweeps.state import SweepState, process_start_time, running_here, tail

# How long a run gets to write its checkpoint after SIGTERM before it is killed.
STOP_GRACE_S = 120.0
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class LauncherError(RuntimeError):
    """A launcher cannot start (no Slurm here, submitit missing, …); the message says the fix."""


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def run_command(flags: Sequence[str], python: str | None = None) -> list[str]:
    """The command line of one run: progress bars off (the output goes to a log file), and
    ``--wait``: if the same config is being trained by another process (the sweep launched
    twice, a requeue racing a run still alive), wait for it, then find the run done or resume it,
    instead of failing."""
    return [python or sys.executable, "-m", "robustbench_fvae.run", *flags, "--no-progress",
            "--wait"]


def run_env(threads: int | None) -> dict[str, str]:
    """The environment of a run: ``threads`` intra-op threads (torch reads OMP_NUM_THREADS)."""
    env = dict(os.environ)
    if threads:
        for var in THREAD_VARS:
            env[var] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"  # the log shows progress as it happens
    return env


def absolute_flags(run: PlannedRun) -> list[str]:
    """The run's flags with ``out``/``data_root`` made absolute (they are not hashed), so the
    command works from any working directory (Slurm nodes, submitit's job folder)."""
    settings = dict(run.settings)
    settings["out"] = str(Path(run.config.out).resolve())
    settings["data_root"] = str(Path(run.config.data_root).resolve())
    return run_flags(settings)


def _header(log, text: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    log.write(f"\n===== {stamp} {text}\n".encode())
    log.flush()


def _check_landed(run: PlannedRun) -> str | None:
    """After exit 0: None if the run's done marker is where the sweep expects it, else why not."""
    if store.is_done(run.run_dir):
        return None
    lines = tail(run.log_path, 1)
    landed = lines[-1] if lines else "?"
    return (f"the run exited 0 but {run.run_dir} has no done marker (it wrote to {landed}); "
            "the sweep and the runner disagree on the run hash — please report this")


# ---------------------------------------------------------------- shared assets


def prepare_offline_assets(runs: Sequence[PlannedRun], log: Callable[[str], None] = print
                           ) -> None:
    """Build missing offline replicas (one per dataset, data root and spurious strength) and
    pretrain the offline backbone (once per machine) here, before parallel runs start (otherwise
    every run would wait on, or redo, the same preparation)."""
    from robustbench_fvae.backbones import (
        OFFLINE_BACKBONE,
        ensure_offline_backbone,
        offline_cache_path,
    )
    from robustbench_fvae.data.registry import ensure_replica, get_spec, replica_info

    todo = [r for r in runs if not store.is_done(r.run_dir)]
    try:
        for dataset, root, rho in dict.fromkeys(
                (r.dataset, r.config.data_root, r.config.train.spurious_strength) for r in todo):
            if get_spec(dataset).synthetic and replica_info(dataset, root, rho) is None:
                ensure_replica(dataset, root, strength=rho, log=log)
        if any(r.config.backbone == OFFLINE_BACKBONE and not r.config.weights for r in todo) \
                and not offline_cache_path().is_file():
            log(f"pretraining {OFFLINE_BACKBONE} into {offline_cache_path()} (once per machine, "
                "before the runs)")
            ensure_offline_backbone()
    except (ValueError, FileNotFoundError) as err:
        raise LauncherError(f"cannot prepare the offline assets: {err}") from None


# ---------------------------------------------------------------- local


def launch_local(spec: SweepSpec, runs: Sequence[PlannedRun], state: SweepState, *,
                 jobs: int = 1, threads: int | None = None, python: str | None = None,
                 log: Callable[[str], None] = print) -> dict[str, int]:
    """Run every not-done run of ``runs`` on this machine, ``jobs`` at a time.

    Returns ``{hash: exit code}`` of the runs started (0 = finished). Runs already done are
    skipped; runs another sweep process is running right now (live pid in the state) too.
    KeyboardInterrupt / SIGTERM: no new runs start, the running ones get SIGTERM (they write a
    checkpoint and exit 143), then KeyboardInterrupt is re-raised.
    """
    if jobs < 1:
        raise LauncherError(f"--jobs must be >= 1, got {jobs}")
    current = state.load()
    todo, busy = [], []
    for run in runs:
        if store.is_done(run.run_dir):
            continue
        if running_here(run.run_dir, current.get(run.hash)):
            busy.append(run)
            continue
        todo.append(run)
    done_before = len(runs) - len(todo) - len(busy)
    # Cores are shared by the runs that will actually run at once (a relaunch with one run
    # left gets all of them).
    jobs = min(jobs, max(1, len(todo)))
    threads = threads or max(1, available_cores() // jobs)
    log(f"sweep {spec.name}: {len(runs)} runs, {done_before} already done, "
        + (f"{len(busy)} running in another sweep process, " if busy else "")
        + (f"{len(todo)} to run with {jobs} job(s) × {threads} thread(s)" if todo
           else "nothing to run"))
    if not todo:
        return {}
    env = run_env(threads)
    results: dict[str, int] = {}
    lock = threading.Lock()
    live: dict[str, subprocess.Popen] = {}
    queue = list(enumerate(todo, start=1))
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            with lock:
                if not queue:
                    return
                index, run = queue.pop(0)
            try:
                code = _run_one(run, index, len(todo))
            except Exception as err:  # noqa: BLE001 - one broken run must not stop the others
                log(f"[{index}/{len(todo)}] FAILED {run.describe()}: sweep error: {err}")
                code = 1
            if code is not None:
                with lock:
                    results[run.hash] = code

    def _run_one(run: PlannedRun, index: int, total: int) -> int | None:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        cmd = run_command(absolute_flags(run), python)
        start = time.time()
        with open(run.log_path, "ab") as fh:
            with lock:
                if stop.is_set():  # the stop request came before this run started
                    return None
                _header(fh, f"sweep {spec.name} (local launcher): {' '.join(cmd)}")
                proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)  # Ctrl-C reaches only the sweep
                live[run.hash] = proc
            entry = state.load().get(run.hash, {})
            state.update(run.hash, run_dir=str(run.run_dir), log=str(run.log_path),
                         launcher="local", host=socket.gethostname(), pid=proc.pid,
                         pid_start=process_start_time(proc.pid), job_id=None, started=start,
                         finished=None, exit_code=None, error=None,
                         attempts=int(entry.get("attempts", 0)) + 1)
            log(f"[{index}/{total}] start {run.describe()} pid {proc.pid}, log {run.log_path}")
            code = proc.wait()
        with lock:
            live.pop(run.hash, None)
        error = _check_landed(run) if code == 0 else None
        state.update(run.hash, finished=time.time(), exit_code=code, error=error)
        took = time.time() - start
        if code == 0 and error is None:
            log(f"[{index}/{total}] done  {run.describe()} in {took:.0f} s")
        elif code == 143 or code < 0:
            how = "stopped by SIGTERM, checkpoint written" if code == 143 else \
                f"killed by signal {-code}"
            log(f"[{index}/{total}] interrupted {run.describe()} ({how}); relaunch to resume")
        else:
            why = error or f"exit code {code}"
            log(f"[{index}/{total}] FAILED {run.describe()}: {why}; log {run.log_path}")
            for line in tail(run.log_path, 3):
                log(f"    | {line}")
        return code

    workers = [threading.Thread(target=worker, name=f"sweep-worker-{i}", daemon=True)
               for i in range(min(jobs, len(todo)))]
    previous = _sigterm_as_interrupt()
    try:
        for t in workers:
            t.start()
        for t in workers:
            while t.is_alive():
                t.join(0.2)  # short joins keep the main thread responsive to Ctrl-C
    except KeyboardInterrupt:
        stop.set()
        with lock:
            procs = list(live.values())
        log(f"interrupted: stopping {len(procs)} running run(s) (SIGTERM → checkpoint)…")
        _stop_processes(procs)
        for t in workers:
            t.join(5.0)
        log("stopped; relaunch the same command to resume")
        raise
    finally:
        _restore_sigterm(previous)
    return results


def _sigterm_as_interrupt():
    """In the main thread, make SIGTERM behave like Ctrl-C (so `kill <sweep pid>` is clean)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def _stop_processes(procs: Sequence[subprocess.Popen], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM each process, wait up to ``grace`` s for all (they checkpoint), then SIGKILL."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- DFR step


def dfr_command(run_dir: str | Path, python: str | None = None) -> list[str]:
    """The DFR command of one finished run; ``--wait``: another sweep process making the same
    DFR run is waited for, not failed (as for runs)."""
    return [python or sys.executable, "-m", "robustbench_fvae.dfr", str(Path(run_dir).resolve()),
            "--wait"]


def launch_dfr(spec: SweepSpec, runs: Sequence[PlannedRun], *, threads: int | None = None,
               python: str | None = None, log: Callable[[str], None] = print) -> dict[str, int]:
    """Make the DFR run of every finished run of ``runs`` that lacks one, one at a time (a DFR
    run is a feature pass over val and test plus small fits: minutes at most). Output goes to
    the parent's ``log.txt``. Returns ``{parent hash: exit code}`` of the DFR runs started;
    runs that did not finish are left out (their failure is reported by the launch)."""
    done = [r for r in runs if store.is_done(r.run_dir)]
    todo = [r for r in done if not store.is_done(dfr_run_dir(r))]
    log(f"sweep {spec.name}: DFR step: {len(done)} finished run(s), "
        f"{len(done) - len(todo)} with a DFR run already, {len(todo)} to make"
        + (f" ({len(runs) - len(done)} run(s) not finished: no DFR for them)"
           if len(done) < len(runs) else ""))
    env = run_env(threads or available_cores())
    results: dict[str, int] = {}
    for index, run in enumerate(todo, start=1):
        cmd = dfr_command(run.run_dir, python)
        with open(run.log_path, "ab") as fh:
            _header(fh, f"sweep {spec.name} (DFR step): {' '.join(cmd)}")
            code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
        results[run.hash] = code
        if code == 0:
            log(f"[DFR {index}/{len(todo)}] done  {run.describe()} -> {dfr_run_dir(run)}")
        else:
            log(f"[DFR {index}/{len(todo)}] FAILED {run.describe()}: exit code {code}; log "
                f"{run.log_path}")
            for line in tail(run.log_path, 3):
                log(f"    | {line}")
    return results


# ---------------------------------------------------------------- submitit (Slurm / local)


class RunTask:
    """A submitit job: one run as a subprocess, checkpointable for preemption and timeouts.

    Not a subclass of ``submitit.helpers.Checkpointable`` so that this module imports without
    submitit; submitit only looks for a ``checkpoint`` method.
    """

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {}  # a Popen handle cannot travel; a requeued task starts fresh

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._proc = None

    def __call__(self, task: dict[str, Any]) -> dict[str, Any]:
        state = SweepState(task["out"], task["sweep"])
        log_path = Path(task["log"])
        log_path.parent.mkdir(parents=True, exist_ok=True)
        threads = task.get("threads") or _slurm_cpus()
        job_id = _job_id()
        cmd = run_command(task["flags"])
        with open(log_path, "ab") as fh:
            _header(fh, f"sweep {task['sweep']} ({task['launcher']} job {job_id}): "
                        f"{' '.join(cmd)}")
            self._proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                          env=run_env(threads), start_new_session=True)
            entry = state.load().get(task["hash"], {})
            state.update(task["hash"], host=socket.gethostname(), pid=self._proc.pid,
                         task_pid=os.getpid(),
                         pid_start=process_start_time(self._proc.pid), job_id=job_id,
                         started=time.time(), finished=None, exit_code=None, error=None,
                         attempts=int(entry.get("attempts", 0)) + 1)
            # poll() instead of wait(): a signal handler (checkpoint) may poll the same process,
            # and wait() would hold a lock that handler then waits on forever.
            while self._proc.poll() is None:
                time.sleep(0.5)
        code = self._proc.returncode
        error = None
        if code == 0 and not store.is_done(task["run_dir"]):
            error = (f"the run exited 0 but {task['run_dir']} has no done marker; the sweep and "
                     "the runner disagree on the run hash")
        state.update(task["hash"], finished=time.time(), exit_code=code, error=error)
        if code != 0 or error:
            raise RuntimeError(error or f"run {task['describe']} failed with exit code {code}; "
                               f"log {log_path}")
        return {"run_dir": task["run_dir"], "exit_code": code}

    def checkpoint(self, task: dict[str, Any]):
        """Called by submitit on preemption/timeout (USR2): SIGTERM the run, let it write its
        checkpoint, then hand submitit the same task to requeue (the run resumes on relaunch)."""
        from submitit.helpers import DelayedSubmission

        proc = self._proc
        killed = False
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + float(task.get("grace_s", STOP_GRACE_S))
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            if proc.poll() is None:
                # Past its grace period: kill it rather than leave it running beside the
                # requeued task (the run resumes from its last checkpoint either way).
                proc.kill()
                proc.wait()
                killed = True
        with open(task["log"], "ab") as fh:
            _header(fh, f"preempted or timed out (run exit {proc.returncode if proc else None}"
                        f"{', killed after its grace period' if killed else ''}); "
                        "requeued — the run resumes from its checkpoint")
        return DelayedSubmission(RunTask(), task)


def _slurm_cpus() -> int | None:
    value = os.environ.get("SLURM_CPUS_PER_TASK")
    return int(value) if value and value.isdigit() else None


def _job_id() -> str | None:
    try:
        import submitit

        return str(submitit.JobEnvironment().job_id)
    except Exception:  # noqa: BLE001 - outside a submitit job there is simply no id
        return None


def slurm_parameters(resources: dict[str, Any], cluster: str) -> tuple[dict, dict]:
    """``(executor kwargs, update_parameters kwargs)`` for submitit's AutoExecutor from a spec's
    ``slurm`` section (generic keys as they are, others prefixed ``slurm_``)."""
    from robustbench_fvae.sweeps.spec import SLURM_GENERIC_KEYS

    init: dict[str, Any] = {}
    params: dict[str, Any] = {}
    for key, value in resources.items():
        if value is None:
            continue
        if key == "max_num_timeout":
            init["slurm_max_num_timeout"] = value
        elif key == "job_name":
            params["name"] = value
        elif key in SLURM_GENERIC_KEYS:
            params[key] = value
        else:
            params[f"slurm_{key}"] = value
    if cluster == "local":  # the local executor knows only the generic keys and its own two
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
        params.pop("gpus_per_node", None)
    return init, params


def check_slurm() -> None:
    """Raise a one-line LauncherError when this machine cannot submit Slurm jobs."""
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise LauncherError("--launcher slurm needs submitit: pip install submitit (or "
                            "pip install -e '.[slurm]')") from None
    if shutil.which("sbatch") is None:
        raise LauncherError("--launcher slurm: Slurm is not available here (no `sbatch` on "
                            "PATH); run the sweep from a cluster login node, or use "
                            "--launcher local (or submitit-local to try the Slurm code path "
                            "on this machine)")


def submit_submitit(spec: SweepSpec, runs: Sequence[PlannedRun], state: SweepState, *,
                    cluster: str = "slurm", resources: dict[str, Any] | None = None,
                    log: Callable[[str], None] = print) -> list[tuple[dict[str, Any], Any]]:
    """Submit the not-done runs as one submitit job array; returns ``[(task, job)]``.

    ``cluster="slurm"`` needs Slurm (one-line LauncherError otherwise); ``cluster="local"`` runs
    the same tasks with submitit's local executor (all at once, on this machine).
    """
    if cluster == "slurm":
        check_slurm()
    import submitit

    resources = dict(spec.slurm if resources is None else resources)
    todo = [r for r in runs if not store.is_done(r.run_dir)]
    log(f"sweep {spec.name}: {len(runs)} runs, {len(runs) - len(todo)} already done, "
        f"{len(todo)} to submit ({'submitit local executor' if cluster == 'local' else 'Slurm'})")
    if not todo:
        return []
    out = Path(todo[0].config.out).resolve()
    folder = state.dir.resolve() / f"{spec.name}-submitit"
    init, params = slurm_parameters(resources, cluster)
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster, **init)
    params.setdefault("name", f"rbf-{spec.name}")
    params.setdefault("timeout_min", 60 * 24)
    executor.update_parameters(**params)
    threads = resources.get("cpus_per_task") or (
        max(1, available_cores() // len(todo)) if cluster == "local" else None)
    tasks = []
    for run in todo:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        tasks.append({"flags": absolute_flags(run), "hash": run.hash, "run_dir": str(run.run_dir),
                      "log": str(run.log_path.resolve()), "out": str(out), "sweep": spec.name,
                      "describe": run.describe(), "threads": threads,
                      "launcher": "slurm" if cluster == "slurm" else "submitit-local",
                      "grace_s": max(10, int(resources.get("signal_delay_s") or 90) - 20)})
    submitted = time.time()  # before submitting, so any task start is recorded as later
    jobs = executor.map_array(RunTask(), tasks)
    state.update_many({t["hash"]: {"run_dir": t["run_dir"], "log": t["log"],
                                   "launcher": t["launcher"], "job_id": str(j.job_id),
                                   "submitted": submitted} for t, j in zip(tasks, jobs)})
    first = str(jobs[0].job_id).split("_")[0]
    log(f"submitted {len(jobs)} task(s) as job {first}; submitit logs in {folder}; run logs in "
        f"<run dir>/{LOG_FILE}")
    return list(zip(tasks, jobs))


def wait_submitit(submitted: Sequence[tuple[dict[str, Any], Any]],
                  log: Callable[[str], None] = print) -> dict[str, int]:
    """Wait for submitted tasks; ``{hash: 0 (finished) or 1 (failed)}``."""
    results: dict[str, int] = {}
    for task, job in submitted:
        try:
            job.result()
            results[task["hash"]] = 0
            log(f"done  {task['describe']}")
        except Exception as err:  # noqa: BLE001 - submitit re-raises the task's failure
            results[task["hash"]] = 1
            text = str(err).strip()
            last = text.splitlines()[-1] if text else type(err).__name__
            log(f"FAILED {task['describe']}: {last}; log {task['log']}")
    return results


def launch_submitit(spec: SweepSpec, runs: Sequence[PlannedRun], state: SweepState, *,
                    cluster: str = "slurm", resources: dict[str, Any] | None = None,
                    wait: bool | None = None, log: Callable[[str], None] = print
                    ) -> dict[str, int]:
    """Submit (see :func:`submit_submitit`) and, for the local executor or ``wait``, wait.

    Returns ``{hash: exit status}`` of the runs waited for (empty when not waiting).
    """
    submitted = submit_submitit(spec, runs, state, cluster=cluster, resources=resources, log=log)
    if not submitted:
        return {}
    if not (cluster == "local" if wait is None else wait):
        log(f"check progress with: python -m robustbench_fvae.sweep {spec.path or spec.name} "
            "--status")
        return {}
    return wait_submitit(submitted, log)
