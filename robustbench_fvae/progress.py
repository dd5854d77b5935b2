"""Progress bars that suit both a terminal and a log file.

On a terminal a bar redraws as tqdm likes. When stderr is not a terminal (a redirected log, a
Slurm output file, a notebook kernel's pipe) every redraw would add a line to the file, so the bar
redraws at most once per :data:`LOG_INTERVAL_S` seconds, plus its first and last state.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

# Seconds between two redraws of a bar written to a file: a line a minute keeps a 5-epoch run's
# log to a few dozen lines and still shows that it is alive.
LOG_INTERVAL_S = 60.0


def print_line(message: str) -> None:
    """A job's log line on stdout, flushed: a log file or a pipe sees each line when it
    happens."""
    print(message, flush=True)


def is_terminal(stream: Any = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or file-like without isatty
        return False


def progress_bar(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)``, throttled to one redraw per :data:`LOG_INTERVAL_S` when its
    output is not a terminal."""
    if not is_terminal(kwargs.get("file")):
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.setdefault("maxinterval", max(LOG_INTERVAL_S, kwargs["mininterval"]))
        kwargs["dynamic_ncols"] = False
    return tqdm(iterable, **kwargs)
