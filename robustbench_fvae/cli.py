"""What every command-line tool of the package shares: exit codes, argument parsing, errors.

Exit codes (the same for ``run``, ``sweep``, ``report``, ``probe``, ``pretrain``, the
``data_prep`` scripts and ``benchmarks/bench.py``):

* 0 — done (also "already done", and ``--help``);
* 1 — runtime failure: the input was fine but the work failed (a non-finite loss, the run
  directory held by another live process, a failed download, a run of a sweep that failed);
* 2 — bad input: unknown or malformed arguments, settings, names, specs, missing data, weights or
  records — fix the command or the files and rerun;
* 130 — interrupted (Ctrl-C) after its runs checkpointed (``sweep``): relaunch to resume;
* 143 — stopped by SIGTERM (Slurm preemption) after writing a checkpoint: relaunch to resume.

Errors are one line on stderr, ``error: …``; ``RBF_TRACEBACK=1`` re-raises for the traceback.
Every command's ``main`` is wrapped in :func:`command`, so an error it does not handle itself
still ends as that one line and its exit code; options several commands share come from the
``add_*_option`` helpers below, so they read the same everywhere.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from typing import NoReturn, ParamSpec

_P = ParamSpec("_P")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_PREEMPTED = 143

# Bad input is what a user fixes by changing the command or the files: our error classes for
# settings, names, specs and records derive from ValueError, those for missing files from
# FileNotFoundError; LookupError covers unknown keys.
BAD_INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, LookupError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a short error: the usage line (give a short ``usage=``), the error, and
    where the full help is (exit 2), instead of the whole usage block of every option."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.format_usage().rstrip()}\n{self.prog}: error: {message} "
                         f"(--help lists every option)\n")
        sys.exit(EXIT_BAD_INPUT)


def exit_code(err: BaseException) -> int:
    """:data:`EXIT_BAD_INPUT` for errors of the input, :data:`EXIT_FAILURE` for the rest."""
    return EXIT_BAD_INPUT if isinstance(err, BAD_INPUT_ERRORS) else EXIT_FAILURE


def fail(err: BaseException) -> int:
    """Print ``err`` as one ``error:`` line and return its exit code (re-raise under
    ``RBF_TRACEBACK=1``)."""
    if os.environ.get("RBF_TRACEBACK"):
        raise err
    text = " ".join(str(err).split()) or type(err).__name__
    print(f"error: {text}  (set RBF_TRACEBACK=1 for the traceback)", file=sys.stderr)
    return exit_code(err)


def command(main: Callable[_P, int]) -> Callable[_P, int]:
    """Wrap a command's ``main``: an exception it lets escape becomes one ``error:`` line and
    its exit code (:func:`fail`: 2 for bad input, 1 for the rest), Ctrl-C exits
    :data:`EXIT_INTERRUPTED`. ``SystemExit`` (argument errors, ``--help``) passes through."""

    @functools.wraps(main)
    def wrapped(*args: _P.args, **kwargs: _P.kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
        except Exception as err:  # noqa: BLE001 - every failure gets the same one-line report
            return fail(err)

    return wrapped


# ------------------------------------------------------------------ shared options


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """``--device``: where the model runs (``auto`` picks CUDA when torch sees it)."""
    parser.add_argument("--device", default="auto", metavar="DEVICE",
                        help="auto (default), cpu, cuda or cuda:N")


def add_data_root_option(parser: argparse.ArgumentParser, default: str | None = "data",
                         help: str = "the data root (default: data)") -> None:
    """``--data-root DIR``: the datasets folder (``default`` None: taken from a spec)."""
    parser.add_argument("--data-root", default=default, metavar="DIR", help=help)


def add_lock_options(parser: argparse.ArgumentParser, what: str) -> None:
    """``--force`` and ``--wait`` of a command that writes one run record (``what``)."""
    parser.add_argument("--force", action="store_true", help=f"redo {what} even if it is done")
    parser.add_argument("--wait", action="store_true",
                        help=f"if another process is making {what}, wait for it to end "
                             "(default: exit 1 naming that process)")


def add_progress_option(parser: argparse.ArgumentParser) -> None:
    """``--no-progress``: no progress bars (logs of batch jobs)."""
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
