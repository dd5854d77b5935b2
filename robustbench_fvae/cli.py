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
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

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
