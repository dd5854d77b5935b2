"""What the command-line tools share: exit codes, short argument errors, quiet progress in logs."""

from __future__ import annotations

import io

import pytest

from robustbench_fvae.cli import EXIT_BAD_INPUT, EXIT_FAILURE, ArgumentParser, exit_code, fail
from robustbench_fvae.config import ConfigError
from robustbench_fvae.data import DatasetError
from robustbench_fvae.progress import LOG_INTERVAL_S, progress_bar
from robustbench_fvae.records import RunInUseError
from robustbench_fvae.training import TrainingError


@pytest.mark.parametrize(("err", "code"), [
    (ConfigError("beta too small"), EXIT_BAD_INPUT),
    (DatasetError("no metadata.csv"), EXIT_BAD_INPUT),
    (KeyError("nope"), EXIT_BAD_INPUT),
    (TrainingError("non-finite loss"), EXIT_FAILURE),
    (RunInUseError("held by pid 1"), EXIT_FAILURE),
    (OSError("disk full"), EXIT_FAILURE),
])
def test_bad_input_exits_2_and_runtime_failures_exit_1(err, code, capsys, monkeypatch):
    monkeypatch.delenv("RBF_TRACEBACK", raising=False)
    assert exit_code(err) == code
    assert fail(err) == code
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("error: ")


def test_argument_errors_are_short(capsys):
    parser = ArgumentParser(prog="tool", usage="%(prog)s --name NAME")
    parser.add_argument("--name", required=True)
    for i in range(30):
        parser.add_argument(f"--option-{i}")
    with pytest.raises(SystemExit) as stop:
        parser.parse_args([])
    assert stop.value.code == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["usage: tool --name NAME",
                   "tool: error: the following arguments are required: --name "
                   "(--help lists every option)"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_written_to_a_file_redraw_rarely():
    log = io.StringIO()
    bar = progress_bar(range(5000), file=log, desc="steps")
    for step in bar:
        bar.set_postfix(loss=f"{1 / (step + 1):.3g}", refresh=False)  # as the runner does
    # tqdm writes each redraw after a carriage return: the first and the final state only
    assert log.getvalue().count("\r") <= 3 and "5000/5000" in log.getvalue()
    bar = progress_bar(range(3), file=log)
    assert bar.mininterval == LOG_INTERVAL_S
    bar.close()
    bar = progress_bar(range(3), file=_Terminal())
    assert bar.mininterval < 1  # a terminal keeps tqdm's own redraw rate
    bar.close()
