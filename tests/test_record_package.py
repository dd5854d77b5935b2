"""The record package: torch-free imports, one run lifecycle (store.run_job), the view's
answers about a run (finished, derived, algorithm), and data/'s dependence on record.io only."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from robustbench_fvae.methods import get_method
from robustbench_fvae.record import schema, store, view
from robustbench_fvae.record.io import RecordError, write_json_atomic

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("module", ["robustbench_fvae.record", "robustbench_fvae.record.io",
                                    "robustbench_fvae.record.schema",
                                    "robustbench_fvae.record.store",
                                    "robustbench_fvae.record.view",
                                    "robustbench_fvae.record.derived", "robustbench_fvae.records",
                                    # the rest of what reads records or configs
                                    "robustbench_fvae.config", "robustbench_fvae.config.resolve",
                                    "robustbench_fvae.backbone_identity",
                                    "robustbench_fvae.selection",
                                    "robustbench_fvae.metrics", "robustbench_fvae.methods",
                                    "robustbench_fvae.analysis.tables",
                                    "robustbench_fvae.analysis.statistics",
                                    "robustbench_fvae.analysis.comparisons",
                                    # the commands parse their arguments before torch loads, so
                                    # a typo or a bad path is answered in a second
                                    "robustbench_fvae.data", "robustbench_fvae.run",
                                    "robustbench_fvae.sweep", "robustbench_fvae.dfr",
                                    "robustbench_fvae.protocol"])
def test_importing_the_record_does_not_import_torch(module):
    code = (f"import sys; sys.path.insert(0, sys.argv[1]); import {module}; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code, str(ROOT)], check=True, timeout=120)


def test_a_config_resolves_to_its_run_hash_without_torch():
    """Resolution (defaults, checks, backbone digest, replica version) is the config's own job:
    a sweep names every run, and a bad setting is refused, before any model code loads."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from robustbench_fvae.config import RunConfig, config_hash; "
            "from robustbench_fvae.config.resolve import resolve_config; "
            "cfg = resolve_config(RunConfig(method='fvae', dataset='synth-waterbirds', "
            "train={'algorithm': 'jtt'})); "
            "assert cfg.backbone_digest.startswith('key:') and cfg.train.jtt_epochs == 1; "
            "assert cfg.stem_cache == 'on' and cfg.train.lr > 0; "
            "assert 'torch' not in sys.modules, 'torch imported'; print(config_hash(cfg))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT)], check=True, timeout=120,
                         capture_output=True, text=True).stdout.split()
    assert len(out) == 1 and len(out[0]) == 12


def test_data_imports_only_record_io():
    """data/ builds caches with the atomic writers; it must not depend on the run record."""
    for path in sorted((ROOT / "robustbench_fvae" / "data").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                name = "." * node.level + (node.module or "")
                names = [name]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if "records" in name.split(".") or (
                        "record" in name.split(".") and not name.endswith("record.io")):
                    pytest.fail(f"{path.name} imports {name}; data/ may import record.io only")


def test_run_job_lifecycle(tmp_path):
    """Done → skipped with the recorded metrics; else the body runs under the lock and its
    metrics are written, then the done marker; force redoes; resume=False clears leftovers."""
    rdir = tmp_path / "out" / "ds" / "m" / "0123456789ab"
    calls = []

    def body():
        calls.append(sorted(p.name for p in rdir.iterdir()) if rdir.exists() else None)
        assert store.lock_path(rdir).is_file() and not store.is_done(rdir)
        rdir.mkdir(parents=True, exist_ok=True)
        (rdir / "checkpoint.pt").write_text("x")
        return {"selection": "val_wg", "n": len(calls)}

    lines = []
    first = store.run_job(rdir, body, log=lines.append)
    assert not first.skipped and first.metrics == {"selection": "val_wg", "n": 1}
    assert json.loads((rdir / schema.METRICS_FILE).read_text()) == first.metrics
    assert store.is_done(rdir)
    again = store.run_job(rdir, body, log=lines.append, redo="redo")
    assert again.skipped and again.metrics == first.metrics and len(calls) == 1
    assert lines == [f"already done: {rdir} (use --force to redo)"]
    forced = store.run_job(rdir, body, force=True)
    assert not forced.skipped and calls[-1] is None  # the old directory was removed first
    # an unfinished run: kept for resuming by default, removed with resume=False
    (rdir / schema.DONE_FILE).unlink()
    store.run_job(rdir, body)
    assert calls[-1] == ["checkpoint.pt", schema.METRICS_FILE]
    (rdir / schema.DONE_FILE).unlink()
    store.run_job(rdir, body, resume=False)
    assert calls[-1] is None


def test_run_job_refuses_a_held_run(tmp_path):
    rdir = tmp_path / "run"
    with store.run_lock(rdir), pytest.raises(store.RunInUseError, match="--wait"):
        store.run_job(rdir, lambda: pytest.fail("the body must not run"))
    assert not rdir.exists()


def _record(path: Path, config: dict, metrics: dict | None = None) -> view.RunRecord:
    write_json_atomic(path / schema.CONFIG_FILE, config)
    if metrics is not None:
        write_json_atomic(path / schema.METRICS_FILE, metrics)
        store.mark_done(path)
    return view.load_run(path)


def test_view_answers_finished_derived_and_algorithm(tmp_path):
    parent = _record(tmp_path / "p", {"config_hash": "aaaaaaaaaaaa", "config": {
        "dataset": "synth-celeba", "method": "bvae2lat",
        "train": {"algorithm": "groupdro"}}}, {"selection": "val_wg"})
    child = _record(tmp_path / "c", {"config_hash": "bbbbbbbbbbbb", "config": {
        "dataset": "synth-celeba", "method": "bvae2lat", "train": {"algorithm": "dfr"}},
        "derived": {"parent_hash": "aaaaaaaaaaaa", "parent_dir": str(tmp_path / "p")}},
        {"selection": "dfr"})
    old = _record(tmp_path / "o", {"config": {"dataset": "waterbirds", "method": "lora"}})
    assert parent.done and not parent.derived and parent.algorithm == "groupdro"
    assert child.derived and child.algorithm == "dfr" and child.parent().path == parent.path
    assert not old.done and old.algorithm == "erm" and old.parent() is None
    # settings recorded before they existed read as their defaults
    assert parent.rho == 0.943 and old.rho is None
    assert parent.settings["adapter.beta"] == get_method("bvae2lat").defaults["beta"] == 10.0
    assert view.provenance(child, {"aaaaaaaaaaaa": parent})[0] == "groupdro+dfr"


def test_derived_facts_read_from_the_record_and_upgraded_for_older_dfr_records(tmp_path):
    from robustbench_fvae.record.derived import DerivedFacts, derived_facts, redo_command

    facts = DerivedFacts(algorithm="afr", label="AFR", group_labels_in_training=None,
                         group_labels_in_selection=False, selection_description="its own words",
                         note="a note", command="python -m somewhere.afr", args=("--gamma", "4"))
    block = {**facts.record_fields(), "parent_dir": "/runs/x/synth-waterbirds/lora/abc"}
    assert derived_facts(json.loads(json.dumps(block))) == facts  # a JSON round trip
    run_dir = tmp_path / "out" / "synth-waterbirds" / "lora" / "def"
    assert redo_command(block, run_dir) == (
        f"python -m somewhere.afr /runs/x/synth-waterbirds/lora/abc --gamma 4 "
        f"--out {tmp_path / 'out'}")
    # a DFR record written before derived runs described themselves: DFR's facts, and a redo
    # command that names every recorded setting (the same settings, so the same hash)
    old = {"algorithm": "dfr", "parent_dir": "/p", "settings": {
        "seed": 1, "refits": 3, "c_grid": [1.0, 0.1], "penalty": "l1"}}
    legacy = derived_facts(old)
    assert (legacy.algorithm, legacy.label, legacy.group_labels_in_training) == ("dfr", "DFR",
                                                                                 "val")
    assert legacy.group_labels_in_selection and "not a selection signal" in legacy.note
    assert redo_command(old, run_dir) == (f"python -m robustbench_fvae.dfr /p --seed 1 "
                                          f"--refits 3 --c-grid 1.0,0.1 --out {tmp_path / 'out'}")
    # the upgrade is DFR's alone: another derived run that wrote no facts is an error, not DFR
    with pytest.raises(RecordError, match="'afr' run lacks its facts"):
        derived_facts({"algorithm": "afr", "parent_dir": "/p"})
