"""Sweeps: spec expansion and validation, launchers (local, submitit), --dry-run and --status.

The end-to-end tests launch real ``python -m robustbench_fvae.run`` subprocesses on a tiny
Waterbirds-layout replica with a tiny ViT loaded from a local weights file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from processes import alive, freeze_when, kill_pid, reaped, signal_pending, wait_until  # noqa: E402,I001

from robustbench_fvae import records  # noqa: E402
from robustbench_fvae.methods import get_method  # noqa: E402
from robustbench_fvae.sweep import main as sweep_main  # noqa: E402
from robustbench_fvae.sweeps import (  # noqa: E402
    SpecError,
    SweepState,
    expand,
    load_spec,
    parse_spec,
)
from robustbench_fvae.sweeps.launchers import (  # noqa: E402
    available_cores,
    launch_local,
    slurm_parameters,
)
from robustbench_fvae.sweeps.state import run_status, running_here  # noqa: E402
from robustbench_fvae.training import SYNTH_DEFAULTS  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BASE = {
    "methods": ["lora", "fvae"],
    "datasets": ["synth-waterbirds", "synth-celeba"],
    "seeds": [1, 2, 42],
}


def write_spec(tmp_path: Path, data: dict, name: str = "spec") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def spec_of(data: dict):
    return parse_spec(data, "t")


def cli_hash(flags: list[str]) -> str:
    """The hash the run CLI gives to these flags (its own parser and config resolution)."""
    from robustbench_fvae.config import config_hash
    from robustbench_fvae.run import build_parser, config_from_args
    from robustbench_fvae.training import resolve_config

    return config_hash(resolve_config(config_from_args(build_parser().parse_args(flags))))


# ---------------------------------------------------------------- expansion


def test_expansion_crosses_methods_datasets_grid_and_seeds(tmp_path):
    spec = spec_of(
        {
            **BASE,
            "settings": {"epochs": 2, "out": str(tmp_path)},
            "grid": {"lr": [1e-3, 5e-3], "rank": [4, 8]},
        }
    )
    runs = expand(spec)
    assert len(runs) == 2 * 2 * 4 * 3
    assert len({r.hash for r in runs}) == len(runs)
    got = {(r.method, r.dataset, r.config.train.lr, r.config.adapter.rank, r.seed) for r in runs}
    want = {
        (m, d, lr, rank, s)
        for m in BASE["methods"]
        for d in BASE["datasets"]
        for lr in (1e-3, 5e-3)
        for rank in (4, 8)
        for s in BASE["seeds"]
    }
    assert got == want
    # order: methods × datasets × trials × seeds; run dirs are the records' layout
    assert [(r.method, r.dataset, r.seed) for r in runs[:3]] == [
        ("lora", "synth-waterbirds", s) for s in (1, 2, 42)
    ]
    assert all(r.run_dir == tmp_path / r.dataset / r.method / r.hash for r in runs)
    # resolved: dataset defaults filled in, shared settings applied
    assert {r.config.train.epochs for r in runs} == {2}
    assert {r.config.train.batch_size for r in runs} == {64}


def test_random_draws_are_reproducible_shared_by_seeds_and_independent_of_them():
    space = {
        "lr": {"log_uniform": [1e-4, 1e-2]},
        "beta": {"choice": [1, 10]},
        "rank": {"int_uniform": [2, 32]},
        "delta": {"uniform": [0.5, 1.0]},
    }
    data = {**BASE, "random": {"n": 6, "hparam_seed": 7, "space": space}}
    runs = expand(spec_of(data))
    assert len(runs) == 2 * 2 * 6 * 3
    draws = [spec_of(data).trials(), spec_of(data).trials()]
    assert draws[0] == draws[1]  # reproducible
    assert len({tuple(sorted(d.items())) for d in draws[0]}) == 6
    for d in draws[0]:
        assert 1e-4 <= d["lr"] <= 1e-2 and d["beta"] in (1.0, 10.0)
        assert 2 <= d["rank"] <= 32 and isinstance(d["rank"], int)
        assert 0.5 <= d["delta"] <= 1.0
    # the same draw for every seed (and method, dataset) of a trial
    by_trial: dict[int, set] = {}
    for r in runs:
        by_trial.setdefault(r.trial, set()).add(
            (r.config.train.lr, r.config.adapter.beta, r.config.adapter.rank)
        )
    assert all(len(v) == 1 for v in by_trial.values())
    # independent of the trial seeds: other seeds, same draws
    other = spec_of({**data, "seeds": [3, 99]}).trials()
    assert other == draws[0]
    # ... but not of hparam_seed
    assert spec_of({**data, "random": {**data["random"], "hparam_seed": 8}}).trials() != draws[0]
    # adding a setting to the space leaves the other settings' draws alone
    wider = {
        **data,
        "random": {**data["random"], "space": {**space, "alpha": {"uniform": [0.1, 1.0]}}},
    }
    assert [{k: d[k] for k in space} for d in spec_of(wider).trials()] == draws[0]
    # log-uniform spreads over the decades
    many = spec_of(
        {
            **data,
            "random": {"n": 200, "hparam_seed": 0, "space": {"lr": {"log_uniform": [1e-4, 1e-2]}}},
        }
    )
    lrs = [d["lr"] for d in many.trials()]
    assert sum(lr < 1e-3 for lr in lrs) > 60 and sum(lr > 1e-3 for lr in lrs) > 60


def test_overrides_precedence_and_duplicates_merged():
    data = {
        "methods": ["lora", "full"],
        "datasets": ["synth-waterbirds", "synth-animals"],
        "seeds": [0],
        "settings": {"epochs": 3},
        "grid": {"lr": [1e-3, 5e-3]},
        "per_dataset": {"synth-animals": {"epochs": 5, "lr": 2e-3}},
        "per_method": {"full": {"lr": 1e-4}},
    }
    spec = spec_of(data)
    runs = expand(spec)
    got = sorted((r.method, r.dataset, r.config.train.lr, r.config.train.epochs) for r in runs)
    # per_method beats per_dataset beats the grid beats settings; collapsed grids are merged
    assert got == sorted(
        [
            ("lora", "synth-waterbirds", 1e-3, 3),
            ("lora", "synth-waterbirds", 5e-3, 3),
            ("lora", "synth-animals", 2e-3, 5),
            ("full", "synth-waterbirds", 1e-4, 3),
            ("full", "synth-animals", 1e-4, 5),
        ]
    )
    # an explicit default and an omitted one name the same run (hash of the resolved config)
    default_epochs = SYNTH_DEFAULTS["epochs"]
    same = expand(spec_of({**BASE, "grid": {"epochs": [None, default_epochs], "beta": [None]}}))
    assert len(same) == len(expand(spec_of(BASE))) == 12
    assert [r.hash for r in same] == [r.hash for r in expand(spec_of(BASE))]


def test_flags_give_the_run_cli_the_same_hash(tmp_path):
    """YAML ints for float settings, '1e-4' (text in YAML), lists for targets: the flags the
    launchers pass make the run CLI compute exactly the hash the sweep expects."""
    path = tmp_path / "s.yaml"
    path.write_text(
        "methods: [fvae, bvae2lat]\ndatasets: [synth-waterbirds, waterbirds]\n"
        "seeds: [1]\nsettings: {beta: 1, lr: 1e-4, targets: [q, v], rank: 8}\n"
        "random: {n: 2, space: {alpha: {log_uniform: [0.1, 1]}}}\n"
    )
    runs = expand(load_spec(path))
    assert {r.config.adapter.beta for r in runs} == {1.0}
    assert {r.config.train.lr for r in runs} == {1e-4}
    for run in runs:
        assert cli_hash(run.flags()) == run.hash
    for name in ("table5.yaml", "table5-synth.yaml", "protocol-search.yaml"):
        for run in expand(load_spec(REPO / "runs" / name)):
            assert cli_hash(run.flags()) == run.hash, (name, run.flags())


def test_committed_specs():
    """The real-data Table 5 search is the replicas' protocol search on the real datasets."""
    table5 = load_spec(REPO / "runs" / "table5.yaml")
    replicas = load_spec(REPO / "runs" / "protocol-search.yaml")
    real_runs, replica_runs = expand(table5), expand(replicas)
    methods = {"lora", "fvae", "vae2lat", "bvae2lat", "full", "linear"}
    assert len(real_runs) == len(replica_runs) == 6 * 3 * 8
    assert {r.method for r in real_runs} == {r.method for r in replica_runs} == methods
    assert {r.dataset for r in real_runs} == {"waterbirds", "celeba", "animals"}
    assert {r.dataset for r in replica_runs} == {"synth-waterbirds", "synth-celeba",
                                                  "synth-animals"}
    assert {r.seed for r in real_runs} == {r.seed for r in replica_runs} == {0}
    assert {r.config.backbone for r in real_runs} == {"vit_base_patch16_224.orig_in21k"}
    assert {(r.config.train.epochs, r.config.train.batch_size) for r in real_runs} == {(50, 64)}
    # the same draws from the same spaces: every searched value equals the replicas'
    for method in methods:
        assert table5.trials(method) == replicas.trials(method)
    assert table5.random.method_space("fvae") == replicas.random.method_space("fvae")
    # bvae2lat resolves to beta 10 (its method default), vae2lat to 1
    assert {get_method(r.method).setting(r.config.adapter, "beta") for r in real_runs
            if r.method == "bvae2lat"} == {10.0}
    assert {get_method(r.method).setting(r.config.adapter, "beta") for r in real_runs
            if r.method == "vae2lat"} == {1.0}
    assert table5.slurm["gpus_per_node"] == 1 and table5.slurm["timeout_min"] > 0
    synth = expand(load_spec(REPO / "runs" / "table5-synth.yaml"))
    assert len(synth) == 4 * 3 * 3 and {r.seed for r in synth} == {1, 2, 42}


# ---------------------------------------------------------------- malformed specs


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"metods": ["lora"]},
            "unknown top-level key(s) ['metods']; accepted: description, methods",
        ),
        ({"settings": {"epoch": 3}}, "settings.epoch: unknown setting 'epoch'; accepted:"),
        (
            {"settings": {"epochs": "three"}},
            "settings.epochs: epochs expects an integer, got 'three'",
        ),
        ({"settings": {"lr": [1e-3]}}, "settings.lr: lr expects a number"),
        (
            {"settings": {"seed": 3}},
            "settings.seed: 'seed' cannot be set here; it comes from the top-level 'seeds' list",
        ),
        ({"settings": ["epochs"]}, "settings: expected a mapping of run settings"),
        ({"methods": []}, "methods: expected a non-empty list"),
        ({"seeds": []}, "seeds: expected a non-empty list of non-negative integers"),
        ({"seeds": [1, "2"]}, "seeds: expected a non-empty list of non-negative integers"),
        ({"methods": ["lora", "fave"]}, "methods: unknown name 'fave'; accepted: lora, fvae"),
        ({"datasets": ["waterbird"]}, "datasets: unknown name 'waterbird'; accepted: waterbirds"),
        ({"grid": {"lr": []}}, "grid.lr: expected a non-empty list of values"),
        ({"grid": {"lr": 1e-3}}, "grid.lr: expected a non-empty list of values"),
        ({"grid": {"rank": [4, 4.5]}}, "grid.rank: rank expects an integer, got 4.5"),
        ({"per_method": {"fave": {"lr": 1e-3}}}, "per_method: unknown name 'fave'"),
        (
            {"per_dataset": {"synth-celeba": {"lr": "fast"}}},
            "per_dataset.synth-celeba.lr: lr expects a number, got 'fast'",
        ),
        (
            {"random": {"n": 0, "space": {"lr": {"uniform": [0, 1]}}}},
            "random.n: expected a positive",
        ),
        ({"random": {"n": 2, "lr": {"uniform": [0, 1]}}}, "random: unknown key(s) ['lr']"),
        (
            {"random": {"n": 2, "space": {"lr": {"normal": [0, 1]}}}},
            "random.space.lr: unknown distribution 'normal'; accepted: choice, uniform",
        ),
        (
            {"random": {"n": 2, "space": {"lr": {"log_uniform": [0, 1]}}}},
            "random.space.lr.log_uniform: bounds must be > 0",
        ),
        (
            {"random": {"n": 2, "space": {"rank": {"uniform": [2, 8]}}}},
            "random.space.rank.uniform: rank is not a real-valued setting",
        ),
        (
            {"random": {"n": 2, "space": {"lrr": {"uniform": [0.1, 1]}}}},
            "random.space.lrr: unknown setting 'lrr'",
        ),
        (
            {"grid": {"lr": [1e-3]}, "random": {"n": 2, "space": {"lr": {"uniform": [0.1, 1]}}}},
            "random.space: ['lr'] also in grid",
        ),
        ({"slurm": {"partitions": "gpu"}}, "slurm: unknown key(s) ['partitions']; accepted:"),
        ({"slurm": {"timeout_min": "1h"}}, "slurm.timeout_min: expected a non-negative integer"),
        (
            {"methods": ["fvae"], "settings": {"beta": 0.05}},
            "run synth-waterbirds/fvae seed 1: beta=0.05 <= 2*delta/rank",
        ),
        ({"settings": {"epochs": 0}}, "run synth-waterbirds/lora seed 1: epochs must be >= 1"),
        ({"dfr": "yes"}, "dfr: expected true or false (true: DFR on each finished run)"),
    ],
)
def test_malformed_specs_name_the_key(tmp_path, change, message):
    path = write_spec(tmp_path, {**BASE, **change})
    with pytest.raises(SpecError) as info:
        expand(load_spec(path))
    text = str(info.value)
    assert message in text
    assert text.startswith(str(path)) and "\n" not in text


def test_missing_keys_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(SpecError, match=r"missing required key\(s\) \['seeds'\]"):
        load_spec(write_spec(tmp_path, {"methods": ["lora"], "datasets": ["synth-celeba"]}))
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods: [lora\n")
    with pytest.raises(SpecError, match="is not valid YAML"):
        load_spec(bad)
    with pytest.raises(SpecError, match="sweep spec not found: .*nope.yaml"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match="expected a YAML mapping"):
        load_spec(write_spec(tmp_path, ["lora"], "list"))


def test_cli_reports_spec_errors_in_one_line(tmp_path, capsys):
    path = write_spec(tmp_path, {**BASE, "grid": {"lr": "fast"}})
    assert sweep_main([str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "grid.lr" in err and "\n" not in err


# ---------------------------------------------------------------- Slurm resources


def test_slurm_resources_map_onto_submitit(tmp_path, monkeypatch):
    """The spec's slurm section becomes parameters submitit's Slurm executor accepts (built with
    a stand-in `srun` on PATH: the executor only checks that the command exists)."""
    import submitit  # a dev dependency: missing, it must fail rather than skip
    spec = load_spec(REPO / "runs" / "table5.yaml")
    init, params = slurm_parameters(
        {**spec.slurm, "qos": "high", "setup": ["module load x"]}, "slurm"
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm", **init)
    executor.update_parameters(name="t", **params)  # raises on a key Slurm does not know
    got = executor._executor.parameters
    assert got["partition"] == "gpu" and got["gpus_per_node"] == 1 and got["qos"] == "high"
    assert got["time"] == spec.slurm["timeout_min"] and got["mem"] == "48GB"
    assert got["array_parallelism"] == 12 and got["setup"] == ["module load x"]
    assert executor._executor.max_num_timeout == 10
    # the local executor gets only what it understands
    _, local = slurm_parameters(spec.slurm, "local")
    submitit.AutoExecutor(folder=tmp_path / "l" / "%j", cluster="local").update_parameters(**local)


def test_slurm_launcher_without_slurm_is_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # certainly no sbatch
    path = write_spec(tmp_path, {**BASE, "settings": {"out": str(tmp_path / "out")}})
    assert sweep_main([str(path), "--launcher", "slurm"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Slurm is not available here (no `sbatch` on PATH)" in err
    assert "--launcher local" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- status


def _fake_run_dir(out: Path, run) -> Path:
    run.run_dir.mkdir(parents=True, exist_ok=True)
    return run.run_dir


@pytest.mark.processes
def test_status_classifies_runs_from_markers_state_and_pids(tmp_path, capsys):
    path = write_spec(
        tmp_path,
        {
            "methods": ["lora"],
            "datasets": ["synth-waterbirds"],
            "seeds": [1, 2, 3, 4, 5, 6, 7],
            "settings": {"out": str(tmp_path / "out")},
        },
        "st",
    )
    runs = expand(load_spec(path))
    state = SweepState(tmp_path / "out", "st")
    now = time.time()
    # 1: done
    records.mark_done(_fake_run_dir(tmp_path, runs[0]))
    # 2: running (a live process of ours with its real start time)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        from robustbench_fvae.sweeps.state import process_start_time

        state.update(
            runs[1].hash,
            host=os.uname().nodename,
            pid=sleeper.pid,
            pid_start=process_start_time(sleeper.pid),
            started=now,
        )
        # 3: failed with a log
        _fake_run_dir(tmp_path, runs[2])
        runs[2].log_path.write_text("".join(f"line {i}\n" for i in range(30)) + "boom: bad\n")
        state.update(
            runs[2].hash,
            host=os.uname().nodename,
            pid=1,
            started=now - 5,
            finished=now,
            exit_code=1,
        )
        # 4: killed mid-way with its sweep (started, pid gone, finished still None), 5:
        # SIGTERM-checkpointed, 6: queued on Slurm
        state.update(runs[3].hash, host=os.uname().nodename, pid=2**22 + 17, started=now,
                     finished=None, exit_code=None)
        state.update(runs[4].hash, host="x", started=now - 9, finished=now, exit_code=143)
        state.update(runs[5].hash, launcher="slurm", job_id="77_5", submitted=now)
        # 7: never started
        statuses = [run_status(r.run_dir, state.load().get(r.hash)) for r in runs]
        assert [s.status for s in statuses] == [
            "done",
            "running",
            "failed",
            "missing",
            "missing",
            "queued",
            "missing",
        ]
        assert "interrupted" in statuses[3].detail and "SIGTERM" in statuses[4].detail
        # a launch skips only the run a live process here is running
        assert [running_here(r.run_dir, state.load().get(r.hash)) for r in runs] == [
            False, True, False, False, False, False, False]
        assert statuses[6].detail == "never started"
        assert sweep_main([str(path), "--status", "--tail", "4"]) == 0
        out = capsys.readouterr().out
        assert "7 runs — 1 done, 1 running, 1 queued, 1 failed, 3 missing" in out
        assert f"pid {sleeper.pid}" in out
        tail_lines = [ln for ln in out.splitlines() if ln.startswith("    | ")]
        assert tail_lines == ["    | line 27", "    | line 28", "    | line 29", "    | boom: bad"]
        assert "exit code 1" in out and str(runs[2].log_path) in out
    finally:
        sleeper.kill()
        sleeper.wait()
    # the same process gone → its run is no longer running
    assert run_status(runs[1].run_dir, state.load()[runs[1].hash]).status == "missing"


def test_dry_run_lists_every_run_and_totals(tmp_path, capsys):
    path = write_spec(
        tmp_path,
        {
            **BASE,
            "settings": {"out": str(tmp_path / "out"), "epochs": 2},
            "grid": {"lr": [1e-3, 5e-3]},
        },
        "dry",
    )
    runs = expand(load_spec(path))
    records.mark_done(_fake_run_dir(tmp_path, runs[4]))
    assert sweep_main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("sweep dry: 2 method(s) × 2 dataset(s) × 2 trial(s) × 3 seed(s) = 24 runs")
    header = next(i for i, ln in enumerate(out) if ln.startswith("#"))
    assert out[header].split() == ["#", "dataset", "method", "seed", "lr", "hash", "status"]
    rows = [ln.split() for ln in out[header + 1 : header + 25]]
    assert [r[5] for r in rows] == [r.hash for r in runs]
    assert [(r[1], r[2], int(r[3]), float(r[4])) for r in rows] == [
        (r.dataset, r.method, r.seed, r.config.train.lr) for r in runs
    ]
    assert [r[6] for r in rows].count("done") == 1 and rows[4][6] == "done"
    assert any(
        ln.startswith(
            "totals: 24 runs — 1 done, 0 running, 0 failed, 23 missing; a launch would start 23"
        )
        for ln in out
    )
    assert not (tmp_path / "out" / ".sweeps").exists()  # nothing launched, no state written
    # runs published elsewhere (a fresh clone's results/) are left out with --skip-published
    published = tmp_path / "results" / "final"
    for run in runs[:3]:
        records.mark_done(published / run.dataset / run.method / run.hash)
    assert sweep_main([str(path), "--dry-run", "--skip-published", str(published)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("3 of 24 run(s) published in ") and \
        "totals: 21 runs — 1 done, 0 running, 0 failed, 20 missing" in out
    for run in runs:
        records.mark_done(published / run.dataset / run.method / run.hash)
    assert sweep_main([str(path), "--skip-published", str(published)]) == 0
    assert "23 of 24 run(s) published" in capsys.readouterr().out  # the one done here stays
    assert sweep_main([str(path), "--dry-run", "--skip-published", str(tmp_path / "no")]) == 2
    assert "--skip-published" in capsys.readouterr().err


# ---------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """Run settings for tiny real runs: a Waterbirds-layout replica stand-in of a few dozen
    images and timm's tiny ``test_vit`` (64 wide, 0.4 M parameters) "pretrained" from a local
    weights file, so no hub and no offline pretraining are needed."""
    import torch
    from data_fixtures import make_waterbirds
    from safetensors.torch import save_file
    from timm import create_model

    root = tmp_path_factory.mktemp("sweep_data")
    make_waterbirds(root / "data" / "synth", synthetic_name="synth-waterbirds")
    torch.manual_seed(0)
    weights = root / "test_vit.safetensors"
    save_file(create_model("test_vit", pretrained=False, num_classes=0).state_dict(), str(weights))
    return {"data_root": str(root / "data"), "backbone": "test_vit", "weights": str(weights),
            "rank": 4, "batch_size": 2, "eval_batch_size": 16, "patience": 0, "device": "cpu"}


def tiny_spec(tmp_path: Path, tiny: dict, name: str, **settings) -> Path:
    return write_spec(tmp_path, {"methods": ["lora"], "datasets": ["synth-waterbirds"],
                                 "seeds": [0], "settings": {**tiny, "out": str(tmp_path / "out"),
                                                            **settings}}, name)


def status_text(capsys, spec_path: Path) -> str:
    capsys.readouterr()
    assert sweep_main([str(spec_path), "--status"]) == 0
    return capsys.readouterr().out


@pytest.mark.processes
def test_local_launcher_kill_resume_and_relaunch(tmp_path, tiny, capsys):
    """A run killed mid-way (SIGKILL of its subprocess) shows as running, then missing; the next
    launch resumes it from its checkpoint to the end; a further launch runs nothing."""
    spec_path = tiny_spec(tmp_path, tiny, "kill", epochs=4, checkpoint_every=1)
    spec = load_spec(spec_path)
    (run,) = expand(spec)
    state = SweepState(tmp_path / "out", "kill")
    results: dict = {}
    lines: list[str] = []
    worker = threading.Thread(target=lambda: results.update(
        launch_local(spec, [run], state, jobs=1, threads=1, log=lines.append)))
    worker.start()
    pid = None
    try:
        wait_until(lambda: "pid" in state.load().get(run.hash, {}), "the run to start",
                   gone=lambda: not worker.is_alive())
        pid = state.load()[run.hash]["pid"]
        # frozen mid-way, at a moment when a checkpoint exists: it cannot finish before the kill
        freeze_when(pid, lambda: (run.run_dir / "checkpoint.pt").exists(), "first checkpoint")
        assert "1 runs — 0 done, 1 running, 0 failed, 0 missing" in status_text(capsys, spec_path)
        os.kill(pid, signal.SIGKILL)
        worker.join()
    finally:
        kill_pid(pid)
        worker.join()
    assert results == {run.hash: -signal.SIGKILL}
    assert not records.is_done(run.run_dir)
    out = status_text(capsys, spec_path)
    assert "0 done, 0 running, 0 failed, 1 missing" in out and "killed by signal 9" in out
    # relaunch through the CLI: the run resumes from its checkpoint and finishes; the one run
    # left gets every core although --jobs asks for two at a time
    capsys.readouterr()
    assert sweep_main([str(spec_path), "--jobs", "2"]) == 0
    assert f"1 to run with 1 job(s) × {available_cores()} thread(s)" in capsys.readouterr().out
    assert records.is_done(run.run_dir)
    log_text = run.log_path.read_text()
    assert log_text.count("===== ") == 2 and "resuming from checkpoint" in log_text
    history = records.read_history(run.run_dir / records.HISTORY_FILE)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert log_text.rstrip().splitlines()[-1] == str(run.run_dir)  # the runner agrees on the dir
    entry = state.load()[run.hash]
    assert entry["attempts"] == 2 and entry["exit_code"] == 0
    assert "1 runs — 1 done, 0 running, 0 failed, 0 missing" in status_text(capsys, spec_path)
    # a further launch runs nothing
    assert sweep_main([str(spec_path)]) == 0
    assert "1 runs, 1 already done, nothing to run" in capsys.readouterr().out
    assert run.log_path.read_text() == log_text


@pytest.mark.processes
def test_dfr_step_makes_the_dfr_run_of_each_finished_run(tmp_path, tiny, capsys):
    """A spec with `dfr: true`: after its runs, the sweep makes each one's DFR run (a derived
    run beside it, through `python -m robustbench_fvae.dfr RUN_DIR --wait`); a relaunch makes
    nothing; --dry-run and --status count them; the report shows `lora` and `lora + dfr`."""
    from robustbench_fvae.report import build_report
    from robustbench_fvae.sweeps.spec import dfr_run_dir

    spec_path = write_spec(tmp_path, {
        "methods": ["lora"], "datasets": ["synth-waterbirds"], "seeds": [0],
        "settings": {**tiny, "out": str(tmp_path / "out"), "epochs": 1}, "dfr": True}, "dfr")
    runs = expand(load_spec(spec_path))
    capsys.readouterr()
    assert sweep_main([str(spec_path), "--dry-run"]) == 0
    assert "then DFR on each finished run" in capsys.readouterr().out
    assert sweep_main([str(spec_path)]) == 0
    out = capsys.readouterr().out
    assert "DFR step: 1 finished run(s), 0 with a DFR run already, 1 to make" in out
    for run in runs:
        rec = records.load_run(dfr_run_dir(run))
        assert rec.done and rec.config["derived"]["parent_hash"] == run.hash
        assert rec.run_config.train.algorithm == "dfr"
        assert "(DFR step): " in run.log_path.read_text()
    assert sweep_main([str(spec_path)]) == 0
    assert "DFR step: 1 finished run(s), 1 with a DFR run already, 0 to make" in \
        capsys.readouterr().out
    assert "1 of 1 DFR runs done" in status_text(capsys, spec_path)
    rows = build_report(tmp_path / "out", tmp_path / "report").rows
    assert [(r.label, r.n) for r in rows] == [("lora", 1), ("lora + dfr", 1)]


@pytest.mark.processes
def test_submitit_local_executor_requeues_a_preempted_run(tmp_path, tiny):
    """The Slurm code path through submitit's local executor: a task preempted (USR2, as Slurm
    sends before a preemption or timeout) stops its run with SIGTERM (checkpoint), is requeued
    by submitit, and the requeued task resumes the run to the end."""
    from robustbench_fvae.sweeps.launchers import submit_submitit, wait_submitit

    spec_path = tiny_spec(tmp_path, tiny, "sub", epochs=4, checkpoint_every=1)
    spec = load_spec(spec_path)
    (run,) = expand(spec)
    state = SweepState(tmp_path / "out", "sub")
    lines: list[str] = []
    submitted = submit_submitit(spec, [run], state, cluster="local",
                                resources={"timeout_min": 10, "cpus_per_task": 1},
                                log=lines.append)

    def started_pids() -> list[int]:
        entry = state.load().get(run.hash, {})
        return [p for p in (entry.get("pid"), entry.get("task_pid")) if p]

    with reaped(pids=started_pids):
        assert [t["hash"] for t, _ in submitted] == [run.hash]
        wait_until(lambda: len(started_pids()) == 2, "the task to start its run",
                   gone=lambda: submitted[0][1].done())
        entry = state.load()[run.hash]
        assert entry["launcher"] == "submitit-local" and entry["job_id"]
        # Freeze the run at a moment when it has a checkpoint, so it cannot finish before the
        # preemption reaches it; signal the task as Slurm does ahead of a preemption; the task's
        # SIGTERM then stays pending on the stopped run (it cannot be handled half-way through a
        # step), and the run handles it once continued.
        freeze_when(entry["pid"], lambda: (run.run_dir / "checkpoint.pt").exists(),
                    "first checkpoint")
        os.kill(entry["task_pid"], signal.SIGUSR2)
        wait_until(lambda: signal_pending(entry["pid"], signal.SIGTERM),
                   "SIGTERM forwarded by the task", gone=lambda: not alive(entry["pid"]))
        os.kill(entry["pid"], signal.SIGCONT)
        assert wait_submitit(submitted, log=lines.append) == {run.hash: 0}
    assert records.is_done(run.run_dir)
    log_text = run.log_path.read_text()
    assert "requeued" in log_text and "resuming from checkpoint" in log_text
    history = records.read_history(run.run_dir / records.HISTORY_FILE)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    entry = state.load()[run.hash]
    assert entry["attempts"] == 2 and entry["exit_code"] == 0
    # nothing left to submit
    assert submit_submitit(spec, [run], state, cluster="local", log=lines.append) == []


@pytest.mark.processes
def test_a_run_that_outlives_its_grace_period_is_killed_not_orphaned(tmp_path):
    """A preempted task SIGTERMs its run and waits ``grace_s``; a run still alive then (here one
    that ignores SIGTERM, so the outcome does not depend on timing) is killed and reaped."""
    from robustbench_fvae.sweeps.launchers import RunTask

    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys, time; signal.signal(signal.SIGTERM, "
         "signal.SIG_IGN); print('ready', flush=True); time.sleep(3600)"],
        stdout=subprocess.PIPE, text=True)
    with reaped(stubborn):
        assert stubborn.stdout.readline().strip() == "ready"  # SIGTERM is ignored from now on
        task = RunTask()
        task._proc = stubborn
        log = tmp_path / "run.log"
        task.checkpoint({"log": str(log), "grace_s": 0.2})
        assert stubborn.returncode == -signal.SIGKILL
    assert "killed after its grace period" in log.read_text()


def test_robust_specs_cross_methods_with_every_algorithm_and_share_the_erm_runs():
    synth = expand(load_spec(REPO / "runs" / "robust-synth.yaml"))
    real = expand(load_spec(REPO / "runs" / "robust.yaml"))
    algorithms = {"erm", "groupdro", "resample", "reweight", "jtt"}
    assert len(synth) == 2 * 5 * 3 and len(real) == 2 * 3 * 5 * 5
    for runs, datasets in ((synth, {"synth-waterbirds"}), (real, {"waterbirds", "celeba",
                                                                  "animals"})):
        assert {r.method for r in runs} == {"lora", "fvae"}
        assert {r.config.train.algorithm for r in runs} == algorithms
        assert {r.dataset for r in runs} == datasets
    assert {r.seed for r in synth} == {1, 2, 42} and {r.seed for r in real} == {1, 2, 3, 4, 5}
    assert load_spec(REPO / "runs" / "robust-synth.yaml").dfr
    assert load_spec(REPO / "runs" / "robust.yaml").dfr
    # ERM runs are the ones of the existing specs (same settings, same hash: not rerun)
    erm = {r.hash for r in synth if r.config.train.algorithm == "erm"}
    assert erm <= {r.hash for r in expand(load_spec(REPO / "runs" / "synth-waterbirds-all.yaml"))}
    assert {r.config.train.lr for r in real} == {5e-3}
