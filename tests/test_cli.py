"""What the command-line tools share: exit codes, short argument errors, quiet progress in logs."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from robustbench_fvae.cli import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    ArgumentParser,
    command,
    exit_code,
    fail,
)
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


def test_command_wrapper_turns_escaped_errors_into_exit_codes(capsys, monkeypatch):
    monkeypatch.delenv("RBF_TRACEBACK", raising=False)

    @command
    def main(argv=None) -> int:
        raise argv

    assert main(ValueError("bad\nsetting")) == EXIT_BAD_INPUT
    assert main(RuntimeError("broke")) == EXIT_FAILURE
    assert main(KeyboardInterrupt()) == EXIT_INTERRUPTED
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.split("  (")[0] for line in err] == ["error: bad setting", "error: broke"]
    with pytest.raises(SystemExit):  # argparse's exits (errors, --help) are left alone
        main(SystemExit(0))
    assert main.__name__ == "main"


REPO = Path(__file__).resolve().parent.parent
# Every command: how it is started, arguments that parse, and a nonexistent path or unknown name.
COMMANDS = {
    "run": (["-m", "robustbench_fvae.run"], ["--method", "fvae", "--dataset", "synth-waterbirds"],
            ["--method", "fvae", "--dataset", "no-such-dataset", "--out", "out"]),
    "sweep": (["-m", "robustbench_fvae.sweep"], ["spec.yaml"], ["no-such-spec.yaml"]),
    "report": (["-m", "robustbench_fvae.report"], ["runs"], ["no-such-runs"]),
    "probe": (["-m", "robustbench_fvae.probe"], ["run"], ["no-such-run"]),
    "pretrain": (["-m", "robustbench_fvae.pretrain"], [],
                 ["--epochs", "0", "--cache-dir", "cache"]),
    "dfr": (["-m", "robustbench_fvae.dfr"], ["run"], ["no-such-run"]),
    "protocol": (["-m", "robustbench_fvae.protocol"], ["finals"],
                 ["finals", "--spec", "no-such-spec.yaml", "--out", "final.yaml",
                  "--controls-out", "controls.yaml"]),
    "download": ([str(REPO / "data_prep" / "download.py")], ["synth-waterbirds"],
                 ["no-such-dataset", "--root", "data"]),
    "verify": ([str(REPO / "data_prep" / "verify.py")], ["synth-waterbirds"],
               ["no-such-dataset", "--root", "data"]),
    "build_synthetic": ([str(REPO / "data_prep" / "build_synthetic.py")], [],
                        ["--only", "no-such-replica", "--root", "data"]),
    "methods": (["-m", "robustbench_fvae.methods"], ["--check"],
                ["--check", "--root", "no-such-repo"]),
    "bench": ([str(REPO / "benchmarks" / "bench.py")], [],
              ["--quick", "--targets", "no-such-layer", "--repeats", "1", "--warmup", "0"]),
    "bench_stem": ([str(REPO / "benchmarks" / "stem_cache.py")], [],
                   ["--dataset", "no-such-dataset", "--data-root", "data"]),
}


@pytest.mark.parametrize("case", ["unknown-option", "bad-input"])
@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_exits_2_with_one_error_line_on_bad_input(name, case, tmp_path):
    start, valid, bad = COMMANDS[name]
    args = [*valid, "--no-such-option"] if case == "unknown-option" else bad
    env = {k: v for k, v in os.environ.items() if k != "RBF_TRACEBACK"}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, *start, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    if case == "unknown-option":
        assert "--no-such-option" in errors[0]
    # Nothing was written for the failed command (the bad paths are under the empty tmp_path).
    assert not any(p.suffix in (".json", ".yaml") for p in tmp_path.rglob("*")), proc.stderr
