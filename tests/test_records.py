"""Run records (docs/design.md): atomic writers, readers, recomputation, and model selection."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import robustbench_fvae.records as records
from robustbench_fvae.config import SELECTION_RULES, RunConfig, TrainConfig, config_hash
from robustbench_fvae.data.base import Group, GroupSplit
from robustbench_fvae.metrics import evaluate_split
from robustbench_fvae.records import (
    RECORD_VERSION,
    RecordError,
    RecordNotFoundError,
    RunInUseError,
    append_jsonl,
    config_record,
    dataset_info_dict,
    environment_info,
    is_done,
    iter_runs,
    load_run,
    lock_path,
    mark_done,
    read_history,
    read_json,
    read_predictions,
    recompute_metrics,
    run_dir,
    run_lock,
    write_csv_atomic,
    write_json_atomic,
    write_jsonl_atomic,
    write_predictions_csv,
)
from robustbench_fvae.selection import RULES, select_all, select_epoch, should_stop_early

GROUPS = [Group(0, 0, 0, "landbird/land"), Group(1, 0, 1, "landbird/water"),
          Group(2, 1, 0, "waterbird/land"), Group(3, 1, 1, "waterbird/water")]


def _split_arrays(seed: int, n: int = 200, k: int = 2):
    """A random but valid eval split: y, a, g = 2y + a, softmax probs and their argmax."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    a = rng.integers(0, 2, n)
    logits = rng.normal(size=(n, k)).astype(np.float32)
    logits[np.arange(n), y] += 1.0
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)  # float32, like a model
    return {"index": np.arange(n), "y": y, "a": a, "g": 2 * y + a,
            "pred": prob.argmax(axis=1), "prob": prob}


def _group_split(tmp_path: Path) -> GroupSplit:
    # The real contract class; construction reads no image, so the paths need not exist.
    return GroupSplit(dataset_name="synth-waterbirds", split="val",
                      paths=[tmp_path / f"{i}.png" for i in range(4)],
                      y=np.array([0, 0, 1, 1]), a=np.array([0, 1, 0, 1]),
                      g=np.array([0, 1, 2, 3]), class_names=["landbird", "waterbird"],
                      attribute_names=["land", "water"], groups=GROUPS, n_groups=4,
                      train_group_counts=np.array([3498, 184, 56, 1057]))


def _write_run(out: Path, tmp_path: Path, seed: int, *, done: bool) -> Path:
    cfg = RunConfig(method="lora", dataset="synth-waterbirds", train=TrainConfig(seed=seed))
    rd = run_dir(out, cfg)
    write_json_atomic(rd / "config.json", config_record(
        cfg, dataset_info_dict(_group_split(tmp_path)), environment_info("cpu")))
    arrays = {}
    for split, s in (("val", seed), ("test", seed + 100)):
        arrays[split] = _split_arrays(s)
        write_predictions_csv(rd / f"predictions_{split}.csv", **arrays[split])
    ms = {split: evaluate_split(v["y"], v["a"], v["g"], v["pred"], v["prob"], GROUPS,
                                [3498, 184, 56, 1057]) for split, v in arrays.items()}
    for epoch in (1, 2, 3):
        append_jsonl(rd / "history.jsonl", {"epoch": epoch, "step": 10 * epoch,
                                            "train": {"ce": 1.0 / epoch}, **ms})
    if done:
        write_json_atomic(rd / "metrics.json", {"selection": "val_wg", "selected_epoch": 1, **ms,
                                                "params": {"trainable": 10, "inference": 8}})
        mark_done(rd)
    return rd


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- layout


def test_run_dir_is_dataset_method_hash_and_ignores_where_it_runs(tmp_path):
    cfg = RunConfig(method="fvae", dataset="synth-animals")
    rd = run_dir(tmp_path, cfg)
    assert rd == tmp_path / "synth-animals" / "fvae" / config_hash(cfg)
    assert re.fullmatch(r"[0-9a-f]{12}", rd.name)
    moved = RunConfig(method="fvae", dataset="synth-animals", out="elsewhere", device="cuda")
    assert run_dir(tmp_path, moved) == rd
    assert run_dir(tmp_path, RunConfig(method="fvae", dataset="synth-animals",
                                       train=TrainConfig(seed=1))) != rd


# --------------------------------------------------------------------------- atomic writes


def test_atomic_json_writer_never_leaves_a_half_file(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "metrics.json"
    write_json_atomic(path, {"avg_acc": np.float32(0.5), "n": np.int64(3), "p": Path("x")})
    assert json.loads(path.read_text()) == {"avg_acc": 0.5, "n": 3, "p": "x"}
    before = path.read_bytes()
    with pytest.raises(RecordError, match="NaN"):
        write_json_atomic(path, {"avg_acc": float("nan")})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"model": object()})
    assert path.read_bytes() == before and _no_temp_files(path.parent)

    # a failure after the temp file is written (e.g. the rename) also leaves the old file alone
    def failing_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(records.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk gone"):
        write_json_atomic(path, {"avg_acc": 0.9})
    assert path.read_bytes() == before and _no_temp_files(path.parent)


def test_history_append_survives_a_partial_last_line(tmp_path):
    path = tmp_path / "history.jsonl"
    assert read_history(path) == []
    for epoch in range(3):
        append_jsonl(path, {"epoch": epoch, "val": {"worst_group_acc": 0.1 * epoch}})
    # a crash in the middle of a write leaves a truncated line without its newline
    with open(path, "ab") as fh:
        fh.write(b'{"epoch": 3, "val": {"worst_gr')
    assert [r["epoch"] for r in read_history(path)] == [0, 1, 2]
    append_jsonl(path, {"epoch": 3, "val": {"worst_group_acc": 0.3}})
    assert [r["epoch"] for r in read_history(path)] == [0, 1, 2, 3]
    assert path.read_text().count("\n") == 4 and path.read_text().endswith("}\n")
    # corruption that is not a cut-short last line is an error, not silently dropped
    path.write_text('{"epoch": 0}\n{"epo\n{"epoch": 2}\n')
    with pytest.raises(RecordError, match="line 2"):
        read_history(path)
    write_jsonl_atomic(path, [{"epoch": 0}, {"epoch": 1}])
    assert read_history(path) == [{"epoch": 0}, {"epoch": 1}]
    # a complete record that merely lacks its newline (hand-edited) is kept, and kept on append
    path.write_text('{"epoch": 0}\n{"epoch": 1}')
    assert read_history(path) == [{"epoch": 0}, {"epoch": 1}]
    append_jsonl(path, {"epoch": 2})
    assert read_history(path) == [{"epoch": 0}, {"epoch": 1}, {"epoch": 2}]


# --------------------------------------------------------------------------- predictions


def test_predictions_csv_round_trip_is_exact(tmp_path):
    arrays = _split_arrays(0, n=50, k=3)
    arrays["g"] = arrays["y"]  # any ints round-trip
    path = tmp_path / "predictions_val.csv"
    write_predictions_csv(path, **arrays)
    header = path.read_text().splitlines()[0]
    assert header == "index,y,a,g,pred,prob_0,prob_1,prob_2"
    back = read_predictions(path)
    for key in ("index", "y", "a", "g", "pred"):
        assert back[key].dtype == np.int64 and np.array_equal(back[key], arrays[key])
    assert np.array_equal(back["prob"], arrays["prob"].astype(np.float64))
    assert _no_temp_files(tmp_path)
    with pytest.raises(ValueError, match="same length"):
        write_predictions_csv(path, **{**arrays, "pred": arrays["pred"][:-1]})


def test_predictions_reader_errors(tmp_path):
    with pytest.raises(RecordNotFoundError, match="predictions_test.csv"):
        read_predictions(tmp_path / "predictions_test.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("index,label,a,g,pred,prob_0\n0,1,0,1,1,0.5\n")
    with pytest.raises(RecordError, match="expected index,y,a,g,pred"):
        read_predictions(bad)
    bad.write_text("index,y,a,g,pred,prob_0,prob_1\n0,1,0,1,1,0.5\n")
    with pytest.raises(RecordError, match="line 2"):
        read_predictions(bad)


def test_recompute_metrics_from_the_record_alone_equals_evaluate_split(tmp_path):
    rd = _write_run(tmp_path / "out", tmp_path, seed=3, done=True)
    stored = json.loads((rd / "metrics.json").read_text())
    recomputed = recompute_metrics(rd)  # groups and train counts come from config.json
    assert set(recomputed) == {"val", "test"}
    for split in ("val", "test"):
        assert recomputed[split] == stored[split]
    info = json.loads((rd / "config.json").read_text())["dataset_info"]
    assert info["train_group_counts"] == [3498, 184, 56, 1057]
    assert info["groups"][2] == {"g": 2, "y": 1, "a": 0, "name": "waterbird/land"}
    assert info["class_names"] == ["landbird", "waterbird"]
    # a record without dataset_info cannot be recomputed silently
    cfg = json.loads((rd / "config.json").read_text())
    del cfg["dataset_info"]
    write_json_atomic(rd / "config.json", cfg)
    with pytest.raises(RecordError, match="dataset_info"):
        recompute_metrics(rd)
    assert recompute_metrics(rd, GROUPS, [3498, 184, 56, 1057]) == {
        s: stored[s] for s in ("val", "test")}


# --------------------------------------------------------------------------- run directories


def test_load_and_iter_runs_finished_unfinished_and_corrupt(tmp_path):
    out = tmp_path / "out"
    finished = _write_run(out, tmp_path, seed=0, done=True)
    unfinished = _write_run(out, tmp_path, seed=1, done=False)
    assert is_done(finished) and not is_done(unfinished)

    rec = load_run(finished)
    assert rec.done and rec.metrics["selection"] == "val_wg" and len(rec.history) == 3
    assert rec.method == "lora" and rec.dataset == "synth-waterbirds" and rec.seed == 0
    assert config_hash(rec.run_config) == rec.config_hash == finished.name
    assert rec.dataset_info["n_groups"] == 4
    part = load_run(unfinished)
    assert not part.done and part.metrics is None and len(part.history) == 3

    corrupt = out / "synth-waterbirds" / "lora" / "deadbeef0000"
    corrupt.mkdir(parents=True)
    (corrupt / "config.json").write_text("{not json")
    with pytest.warns(UserWarning, match="deadbeef0000"):
        found = list(iter_runs(out))
    assert sorted(r.path for r in found) == sorted([finished, unfinished])
    with pytest.raises(RecordError, match="not valid JSON"):
        list(iter_runs(out, strict=True))
    # a sub-folder or a run directory itself is a valid root too
    assert [r.path for r in iter_runs(finished)] == [finished]
    with pytest.raises(RecordNotFoundError, match="runs folder not found"):
        list(iter_runs(tmp_path / "nope"))
    with pytest.raises(RecordNotFoundError, match="run directory not found"):
        load_run(tmp_path / "nope")


def test_a_version_1_record_is_read_with_epochs_counted_from_1(tmp_path):
    """Records written before RECORD_VERSION 2 counted epochs from 0; reading converts them, so
    reports and notebooks see one convention whatever wrote the record."""
    rd = _write_run(tmp_path / "out", tmp_path, seed=0, done=True)
    config = read_json(rd / "config.json")
    assert config["record_version"] == RECORD_VERSION == 2
    assert [h["epoch"] for h in load_run(rd).history] == [1, 2, 3]  # current: as written
    del config["record_version"]  # an old record: epochs 0, 1, 2 and selected epoch 0
    write_json_atomic(rd / "config.json", config)
    write_jsonl_atomic(rd / "history.jsonl", [dict(h, epoch=h["epoch"] - 1)
                                              for h in read_history(rd / "history.jsonl")])
    metrics = read_json(rd / "metrics.json")
    write_json_atomic(rd / "metrics.json", dict(
        metrics, selected_epoch=0,
        other_selections={"val_avg": {"selected_epoch": 2, "val": {}, "test": {}}}))
    rec = load_run(rd)
    assert [h["epoch"] for h in rec.history] == [1, 2, 3]
    assert rec.metrics["selected_epoch"] == 1
    assert rec.metrics["other_selections"]["val_avg"]["selected_epoch"] == 3


def test_run_lock_names_its_holder_and_dies_with_it(tmp_path):
    """One holder at a time; a second gets RunInUseError naming the holder; the lock is the
    kernel's flock, so it goes away with its holder's file handle (a killed process)."""
    rd = tmp_path / "out" / "synth-waterbirds" / "lora" / "0123456789ab"
    with run_lock(rd):
        assert lock_path(rd).read_text().startswith(f"pid {os.getpid()} on ")
        with pytest.raises(RunInUseError, match=f"pid {os.getpid()}.*--wait"), run_lock(rd):
            pass
    with run_lock(rd):  # released: taken again at once
        pass
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]);"
        "from robustbench_fvae.records import run_lock;"
        "lock = run_lock(sys.argv[2]); lock.__enter__(); print('held', flush=True);"
        "time.sleep(3600)"), str(Path(__file__).resolve().parent.parent), str(rd)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunInUseError, match=f"pid {holder.pid}"), run_lock(rd):
            pass
    finally:
        holder.kill()
        holder.wait()
    with run_lock(rd):  # the SIGKILLed holder's lock is gone with it
        pass


def test_mark_done_is_a_file_written_atomically(tmp_path):
    assert not is_done(tmp_path)
    mark_done(tmp_path)
    assert is_done(tmp_path) and (tmp_path / "done").read_text().strip()
    assert _no_temp_files(tmp_path)


def test_environment_info_is_json_ready_and_names_versions(tmp_path):
    import numpy

    env = environment_info("cuda:0")
    assert env["device"] == "cuda:0"
    assert env["versions"]["numpy"] == numpy.__version__
    assert env["versions"]["robustbench_fvae"]
    assert set(env["versions"]) >= {"torch", "torchvision", "timm", "numpy", "python"}
    commit = env["git_commit"]
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit)
    assert env["hostname"]
    write_json_atomic(tmp_path / "env.json", env)  # strict JSON


# --------------------------------------------------------------------------- selection


def _hist(wg: list, avg: list) -> list[dict]:
    return [{"epoch": e, "step": 5 * e, "train": {"ce": 0.1},
             "val": {"worst_group_acc": w, "avg_acc": v}, "test": {"worst_group_acc": 0.0}}
            for e, (w, v) in enumerate(zip(wg, avg))]


def test_select_epoch_direction_and_ties():
    history = _hist(wg=[0.5, 0.7, 0.7, 0.6], avg=[0.90, 0.80, 0.95, 0.95])
    # val_wg: max WG; the tie between epochs 1 and 2 goes to the better validation average
    assert select_epoch(history, "val_wg")["epoch"] == 2
    # val_avg: max average; the tie between epochs 2 and 3 goes to the earliest
    assert select_epoch(history, "val_avg")["epoch"] == 2
    assert {k: v["epoch"] for k, v in select_all(history).items()} == {"val_wg": 2, "val_avg": 2}
    tied = _hist(wg=[0.5, 0.7, 0.7], avg=[0.9, 0.8, 0.8])  # a full tie → the earliest epoch
    assert select_epoch(tied, "val_wg")["epoch"] == 1
    # order in the file does not matter, the epoch does
    assert select_epoch(list(reversed(history)), "val_wg")["epoch"] == 2
    assert select_epoch(list(reversed(tied)), "val_wg")["epoch"] == 1
    assert set(RULES) == set(SELECTION_RULES)


def test_select_epoch_skips_missing_and_nan_and_rejects_unknown_rules():
    history = _hist(wg=[float("nan"), 0.2, None, 0.1], avg=[0.5, 0.5, 0.5, 0.5])
    history.insert(0, {"epoch": -1, "step": 0, "train": {"ce": 2.0}})  # no evaluation
    assert select_epoch(history, "val_wg")["epoch"] == 1
    with pytest.raises(ValueError, match="val_wg, val_avg"):
        select_epoch(history, "test_wg")
    with pytest.raises(ValueError, match="no evaluation"):
        select_epoch(history[:1], "val_wg")


def test_should_stop_early():
    history = _hist(wg=[0.5, 0.7, 0.7, 0.6], avg=[0.5] * 4)
    assert should_stop_early(history, "val_wg", patience=2)  # ties are not improvements
    assert not should_stop_early(history, "val_wg", patience=3)
    assert not should_stop_early(history, "val_wg", patience=0)
    assert should_stop_early(history, "val_avg", patience=3)  # flat from the start
    assert not should_stop_early(history[:2], "val_wg", patience=1)
    assert not should_stop_early([], "val_wg", patience=1)


def test_written_history_feeds_selection(tmp_path):
    path = tmp_path / "history.jsonl"
    for record in _hist(wg=[0.2, 0.4, 0.3], avg=[0.9, 0.8, 0.85]):
        append_jsonl(path, record)
    history = read_history(path)
    assert select_epoch(history, "val_wg")["step"] == 5
    assert select_epoch(history, "val_avg")["step"] == 0
    assert os.path.getsize(path) > 0


def test_atomic_writes_have_ordinary_file_permissions(tmp_path):
    path = tmp_path / "shared.json"
    records.write_json_atomic(path, {"a": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_an_atomic_write_never_replaces_what_is_not_a_file(tmp_path):
    """A rename onto a folder, a pipe or a device (``--out /dev/null`` as root) would replace
    it with a plain file; the writer refuses and leaves it as it was."""
    folder, fifo = tmp_path / "spec.yaml", tmp_path / "pipe"
    (folder / "inside").mkdir(parents=True)
    os.mkfifo(fifo)
    for path in (folder, fifo):
        with pytest.raises(ValueError, match="exists and is not a regular file"):
            records.write_json_atomic(path, {"a": 1})
    assert (folder / "inside").is_dir() and fifo.is_fifo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "spec.yaml"]


def test_csv_rows_in_column_order_and_a_bad_row_leaves_the_old_file(tmp_path):
    path = tmp_path / "out" / "t.csv"
    rows = [{"b": 1 / 3, "a": "z1", "c": float("nan")}, {"a": "z2", "b": float("inf"), "c": 7}]
    assert write_csv_atomic(path, ["a", "b", "c"], rows) == path
    assert path.read_text() == "a,b,c\nz1,0.333333,\nz2,inf,7\n"
    with pytest.raises(KeyError):
        write_csv_atomic(path, ["a", "missing"], rows)
    assert path.read_text() == "a,b,c\nz1,0.333333,\nz2,inf,7\n"
