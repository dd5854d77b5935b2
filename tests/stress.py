"""Run the process-level tests (marker ``processes``) N times beside CPU hogs: ``make stress-test``.

A test that signals real processes must pass on a machine busier than CI's worst day. This
script starts ``--hogs`` busy-looping processes, runs pytest ``--repeat`` times, and after every
round looks for processes the tests left behind: any live process, in any state, that carries
this round's tag in its environment (pytest runs with ``RBF_STRESS_TAG=<tag>`` and every process
it starts inherits it, however it was detached), so processes of anything else on the machine are
neither counted nor touched. It prints one line per round and a summary, and exits 1 if any
round failed or left a process (which it then kills). The hogs are killed however it ends.

    python tests/stress.py --repeat 10 --hogs 2 [-- extra pytest args]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TAG_VAR = "RBF_STRESS_TAG"


def leftovers(tag: str) -> list[str]:
    """``pid state cmdline`` of the live processes whose environment carries ``tag``."""
    needle = f"{TAG_VAR}={tag}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if needle not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            found.append(f"{proc.name} {state} {cmd.strip()[:120]}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/stress.py", description=__doc__)
    parser.add_argument("--repeat", type=int, default=10, metavar="N")
    parser.add_argument("--hogs", type=int, default=2, metavar="N",
                        help="busy-looping processes beside the tests (default 2: one per core "
                             "on a 2-core machine)")
    parser.add_argument("--marker", default="processes", help="pytest marker to select")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args(argv)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(args.hogs)]
    results = []
    try:
        for i in range(1, args.repeat + 1):
            start = time.monotonic()
            tag = f"{os.getpid()}-{i}"
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m",
                 args.marker, *args.pytest_args],
                cwd=ROOT, capture_output=True, text=True,
                env=dict(os.environ, HF_HUB_OFFLINE="1", **{TAG_VAR: tag}))
            left = leftovers(tag)
            tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
            ok = proc.returncode == 0 and not left
            results.append(ok)
            print(f"round {i}/{args.repeat}: {'ok  ' if ok else 'FAIL'} exit {proc.returncode} "
                  f"in {time.monotonic() - start:.0f} s, {len(left)} process(es) left | {tail}",
                  flush=True)
            if proc.returncode != 0:
                print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n")
            for line in left:
                print(f"  left behind: {line}")
                os.kill(int(line.split()[0]), signal.SIGKILL)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    print(f"{sum(results)} of {len(results)} rounds passed with no process left behind "
          f"({args.hogs} CPU hog(s), load average now {os.getloadavg()[0]:.1f})")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
