"""Tests of the group-accuracy report: aggregation, grouping, tables, figures, HTML, CLI.

Run records are written with the real writers of records.py into tmp dirs (real files in the
real layout); their metrics come from metrics.evaluate_split on predictions built so that every
group's accuracy is known exactly.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from robustbench_fvae import report as report_cli  # noqa: E402
from robustbench_fvae.analysis import tables  # noqa: E402
from robustbench_fvae.analysis.aggregate import (  # noqa: E402
    SPURIOUS_STRENGTH_SETTING,
    aggregate,
    collect_runs,
    run_results,
    summarize,
)
from robustbench_fvae.config import (  # noqa: E402
    AdapterConfig,
    RunConfig,
    TrainConfig,
    canonical_json,
)
from robustbench_fvae.metrics import evaluate_split  # noqa: E402
from robustbench_fvae.records import (  # noqa: E402
    append_jsonl,
    config_record,
    environment_info,
    mark_done,
    run_dir,
    write_json_atomic,
    write_predictions_csv,
)

GROUPS = [
    {"g": 0, "y": 0, "a": 0, "name": "landbird/land"},
    {"g": 1, "y": 0, "a": 1, "name": "landbird/water"},
    {"g": 2, "y": 1, "a": 0, "name": "waterbird/land"},
    {"g": 3, "y": 1, "a": 1, "name": "waterbird/water"},
]
TRAIN_COUNTS = [3498, 184, 56, 1057]
# Unequal group sizes so that the plain, train-weighted and group-mean averages all differ.
SIZES = [40, 10, 10, 20]
T_975_2 = 4.302653  # t_{0.975} with 2 degrees of freedom, from a printed t-table
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def dataset_info() -> dict:
    return {
        "dataset": "synth-waterbirds",
        "class_names": ["landbird", "waterbird"],
        "attribute_names": ["land", "water"],
        "groups": GROUPS,
        "n_groups": 4,
        "train_group_counts": TRAIN_COUNTS,
    }


def split_with_accuracies(accs: list[float], seed: int = 0) -> dict[str, np.ndarray]:
    """Predictions of a 2-class split whose group ``g`` has accuracy exactly ``accs[g]``."""
    rng = np.random.default_rng(seed)
    cols: dict[str, list] = {"y": [], "a": [], "g": [], "pred": []}
    for grp, n, acc in zip(GROUPS, SIZES, accs):
        k = round(acc * n)
        assert abs(k / n - acc) < 1e-12, "pick accuracies that the group size can realise"
        correct = np.array([True] * k + [False] * (n - k))
        rng.shuffle(correct)
        cols["y"] += [grp["y"]] * n
        cols["a"] += [grp["a"]] * n
        cols["g"] += [grp["g"]] * n
        cols["pred"] += [grp["y"] if c else 1 - grp["y"] for c in correct]
    out = {k: np.array(v) for k, v in cols.items()}
    conf = rng.uniform(0.55, 0.95, len(out["y"]))
    prob = np.zeros((len(conf), 2))
    prob[np.arange(len(conf)), out["pred"]] = conf
    prob[np.arange(len(conf)), 1 - out["pred"]] = 1 - conf
    out["prob"], out["index"] = prob, np.arange(len(conf))
    return out


def evaluated(accs: list[float], seed: int = 0) -> tuple[dict, dict[str, np.ndarray]]:
    arrays = split_with_accuracies(accs, seed)
    m = evaluate_split(
        arrays["y"], arrays["a"], arrays["g"], arrays["pred"], arrays["prob"], GROUPS, TRAIN_COUNTS
    )
    return m, arrays


def write_run(
    out: Path,
    *,
    method: str = "lora",
    seed: int = 0,
    test_accs: tuple[list[float], ...] = ([0.9, 0.6, 0.6, 0.9],),
    val_accs: tuple[list[float], ...] | None = None,
    done: bool = True,
    selection: str = "val_wg",
    selected: int | None = None,
    other_selections: bool = True,
    adapter: AdapterConfig | None = None,
    lr: float | None = None,
    params: dict | None = None,
    dataset: str = "synth-waterbirds",
    alarms: list[str] | None = None,
    rho: float | None = None,
    counterfactual: dict[str, float] | None = None,
    config: RunConfig | None = None,
) -> Path:
    """A run record with one history line per epoch (``test_accs[e]`` = group accuracies of
    epoch e + 1: epochs are counted from 1); metrics.json reports the epoch chosen by
    ``selection`` (or the 0-based index ``selected``). ``rho`` sets the spurious strength in the
    recorded config, ``counterfactual`` metrics.json's core-only/background-reliance block;
    ``config`` (e.g. a sweep's planned run) replaces the config built from the arguments."""
    cfg = config or RunConfig(
        method=method,
        dataset=dataset,
        adapter=adapter or AdapterConfig(),
        train=TrainConfig(seed=seed, lr=lr, select=selection),
        out=str(out),
    )
    seed, dataset = cfg.train.seed, cfg.dataset
    info = {**dataset_info(), "dataset": dataset}
    record = config_record(cfg, info, environment_info("cpu"))
    rd = run_dir(out, cfg)
    if rho is not None:
        record = with_spurious_strength(record, rho)
        rd = rd.with_name(record["config_hash"])
    write_json_atomic(rd / "config.json", record)
    val_accs = val_accs or test_accs
    history = []
    for epoch, (ta, va) in enumerate(zip(test_accs, val_accs)):
        tm, vm = evaluated(ta, seed + 10 * epoch)[0], evaluated(va, seed + 1)[0]
        history.append(
            {
                "epoch": epoch + 1,
                "step": 5 * (epoch + 1),
                "train": {"ce": 0.5},
                "val": vm,
                "test": tm,
                "alarms": list(alarms or []),
            }
        )
        append_jsonl(rd / "history.jsonl", history[-1])
    if not done:
        return rd

    def best(rule: str) -> int:
        key = "worst_group_acc" if rule == "val_wg" else "avg_acc"
        vals = [h["val"][key] for h in history]
        return vals.index(max(vals))

    chosen = best(selection) if selected is None else selected
    for split in ("val", "test"):
        accs = (val_accs if split == "val" else test_accs)[chosen]
        arr = split_with_accuracies(accs, seed + 10 * chosen if split == "test" else seed + 1)
        write_predictions_csv(rd / f"predictions_{split}.csv", **arr)
    other = "val_avg" if selection == "val_wg" else "val_wg"
    metrics = {
        "selection": selection,
        "selection_description": "test rule",
        "selected_epoch": chosen + 1,
        "val": history[chosen]["val"],
        "test": history[chosen]["test"],
        "params": params or {"trainable": 1234, "inference": 1000, "frozen": 500000},
        "alarms": list(alarms or []),
        "epochs_run": len(history),
        "train_time_s": 1.0,
    }
    if other_selections:
        o = best(other)
        metrics["other_selections"] = {
            other: {"selected_epoch": o + 1, "val": history[o]["val"],
                    "test": history[o]["test"]}
        }
    if counterfactual is not None:
        metrics["counterfactual"] = dict(counterfactual)
    write_json_atomic(rd / "metrics.json", metrics)
    mark_done(rd)
    return rd


def with_spurious_strength(record: dict, rho: float) -> dict:
    """``config.json`` content of the same run at spurious strength ``rho``: the value where the
    report reads it (aggregate.SPURIOUS_STRENGTH_SETTING) and the hash recomputed as config_hash
    does (sha256 of the canonical config without the unhashed fields)."""
    record = json.loads(json.dumps(record))
    *parents, leaf = SPURIOUS_STRENGTH_SETTING.split(".")
    node = record["config"]
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = rho
    hashed = {k: v for k, v in record["config"].items() if k not in RunConfig.UNHASHED}
    record["config_hash"] = hashlib.sha256(canonical_json(hashed).encode()).hexdigest()[:12]
    return record


def three_seed_runs(out: Path) -> list[Path]:
    """lora with WG 0.6/0.7/0.8 over seeds 0-2, fvae with one seed (WG 0.8)."""
    dirs = [
        write_run(out, method="lora", seed=s, test_accs=([0.9, wg, wg + 0.1, 0.95],))
        for s, wg in enumerate([0.6, 0.7, 0.8])
    ]
    dirs.append(write_run(out, method="fvae", seed=0, test_accs=([0.9, 0.8, 0.9, 0.9],)))
    return dirs


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------- statistics


def test_summarize_matches_hand_computation_and_single_seed_is_undefined():
    s = summarize([0.6, 0.7, 0.8])
    assert s.n == 3 and s.mean == pytest.approx(0.7)
    assert s.std == pytest.approx(0.1)  # sample std: sqrt((0.01 + 0 + 0.01) / 2)
    assert s.ci95 == pytest.approx(T_975_2 * 0.1 / math.sqrt(3), rel=1e-5)  # 0.248413
    one = summarize([0.42])
    assert one.n == 1 and one.mean == 0.42 and math.isnan(one.std) and math.isnan(one.ci95)
    none = summarize([float("nan")])
    assert none.n == 0 and math.isnan(none.mean)
    # population std (ddof=0) would be 0.0816: make sure the sample std is what is reported
    assert summarize([0.6, 0.8]).std == pytest.approx(math.sqrt(0.02))


def test_aggregate_over_seeds_from_real_records(tmp_path):
    out = tmp_path / "out"
    three_seed_runs(out)
    found = collect_runs(out)
    assert len(found.finished) == 4 and not found.unfinished and not found.unreadable
    results, skipped = run_results(found.finished)
    assert not skipped
    rows = aggregate(results)
    assert [(r.dataset, r.label, r.n) for r in rows] == [
        ("synth-waterbirds", "lora", 3),
        ("synth-waterbirds", "fvae", 1),
    ]
    lora, fvae = rows
    wg = lora.stats["worst_group_acc"]
    assert (wg.mean, wg.std, wg.n) == (pytest.approx(0.7), pytest.approx(0.1), 3)
    assert wg.ci95 == pytest.approx(T_975_2 * 0.1 / math.sqrt(3), rel=1e-5)
    assert lora.seeds == [0, 1, 2] and lora.selection == "val_wg" and lora.split == "test"
    # plain average of seed 0: (0.9*40 + 0.6*10 + 0.7*10 + 0.95*20) / 80
    plain = [(36 + 10 * w + 10 * (w + 0.1) + 19) / 80 for w in (0.6, 0.7, 0.8)]
    assert lora.stats["avg_acc"].mean == pytest.approx(np.mean(plain))
    assert lora.stats["avg_acc"].std == pytest.approx(np.std(plain, ddof=1))
    adj = [
        (0.9 * 3498 + w * 184 + (w + 0.1) * 56 + 0.95 * 1057) / sum(TRAIN_COUNTS)
        for w in (0.6, 0.7, 0.8)
    ]
    assert lora.stats["adj_avg_acc"].mean == pytest.approx(np.mean(adj))
    assert lora.stats["mean_group_acc"].mean == pytest.approx(
        np.mean([(0.9 + w + w + 0.1 + 0.95) / 4 for w in (0.6, 0.7, 0.8)])
    )
    assert lora.stats["disparity"].mean == pytest.approx(
        np.mean([p - w for p, w in zip(plain, (0.6, 0.7, 0.8))])
    )
    groups = {gs.g: gs for gs in lora.groups}
    assert groups[1].acc.mean == pytest.approx(0.7) and groups[1].acc.std == pytest.approx(0.1)
    assert groups[0].acc.std == pytest.approx(0.0) and groups[1].n_samples == 10
    assert groups[3].name == "waterbird/water"
    assert lora.params == {"trainable": 1234, "inference": 1000, "frozen": 500000}
    # one seed: the mean is the value, std and CI are undefined (NaN), not zero, not a crash
    assert fvae.stats["worst_group_acc"].mean == pytest.approx(0.8)
    assert math.isnan(fvae.stats["worst_group_acc"].std)
    assert math.isnan(fvae.stats["worst_group_acc"].ci95)


def test_rows_are_named_by_the_settings_that_differ(tmp_path):
    out = tmp_path / "out"
    for seed in (0, 1):
        write_run(out, method="fvae", seed=seed, adapter=AdapterConfig(beta=10.0))
    write_run(out, method="fvae", seed=0)  # beta=None: the method default, 1
    write_run(out, method="fvae", seed=1, adapter=AdapterConfig(beta=1.0))  # explicit default
    write_run(out, method="lora", seed=0, lr=1e-3)
    write_run(out, method="lora", seed=1, lr=1e-3)
    write_run(out, method="lora", seed=0, lr=1e-2, dataset="synth-celeba")
    rows = aggregate(run_results(collect_runs(out).finished)[0])
    got = {(r.dataset, r.label): (r.n, r.settings, sorted(r.seeds)) for r in rows}
    assert got == {
        ("synth-waterbirds", "fvae (beta=1)"): (2, {"beta": "1"}, [0, 1]),
        ("synth-waterbirds", "fvae (beta=10)"): (2, {"beta": "10"}, [0, 1]),
        # lora runs share every setting but the seed within their dataset: one plain row each
        ("synth-waterbirds", "lora"): (2, {}, [0, 1]),
        ("synth-celeba", "lora"): (1, {}, [0]),
    }
    # paper order: waterbirds before celeba; lora before fvae
    assert [(r.dataset, r.method) for r in rows][0] == ("synth-waterbirds", "lora")
    assert rows[-1].dataset == "synth-celeba"
    # a record written before a setting existed counts as that setting's default
    old = write_run(out, method="lora", seed=2, lr=1e-3)
    record = json.loads((old / "config.json").read_text())
    del record["config"]["train"]["algorithm"], record["config"]["train"]["spurious_strength"]
    write_json_atomic(old / "config.json", record)
    rows = aggregate(run_results(collect_runs(out).finished)[0])
    assert {(r.dataset, r.label): sorted(r.seeds) for r in rows}[
        ("synth-waterbirds", "lora")] == [0, 1, 2]
    # several settings differing at once are all named
    out2 = tmp_path / "out2"
    write_run(out2, method="fvae", adapter=AdapterConfig(beta=10.0, delta=2.0), lr=1e-3)
    write_run(out2, method="fvae", adapter=AdapterConfig(beta=1.0, delta=1.0), lr=1e-3)
    labels = sorted(r.label for r in aggregate(run_results(collect_runs(out2).finished)[0]))
    assert labels == ["fvae (beta=1, delta=1)", "fvae (beta=10, delta=2)"]


# --------------------------------------------------------------------------- collection


def test_unfinished_and_unreadable_runs_are_skipped_counted_and_named(tmp_path):
    out = tmp_path / "out"
    write_run(out, method="lora", seed=0)
    write_run(out, method="lora", seed=1)
    unfinished = write_run(out, method="fvae", seed=0, done=False)
    corrupt = out / "synth-waterbirds" / "lora" / "badc0ffee000"
    corrupt.mkdir(parents=True)
    (corrupt / "config.json").write_text("{oops")
    no_metrics = write_run(out, method="lora", seed=5)
    (no_metrics / "metrics.json").unlink()  # done marker but no metrics
    with pytest.warns(UserWarning) as caught:
        found = collect_runs(out)
    messages = " ".join(str(w.message) for w in caught)
    assert "badc0ffee000" in messages and no_metrics.name in messages
    assert len(found.finished) == 2
    assert [r.path for r in found.unfinished] == [unfinished]
    assert sorted(p.name for p, _ in found.unreadable) == sorted(["badc0ffee000", no_metrics.name])
    with pytest.warns(UserWarning):
        rep = report_cli.build_report(out, tmp_path / "rep")
    assert [r.n for r in rep.rows] == [2]
    md = (tmp_path / "rep" / "table.md").read_text()
    assert "1 unfinished run(s) not reported" in md and str(unfinished) in md
    assert "badc0ffee000" in md
    html = (tmp_path / "rep" / "report.html").read_text()
    assert str(unfinished) in html and "0 unfinished" not in html


def test_cli_errors_are_one_line(tmp_path, capsys):
    # missing or unfinished records are bad input (exit 2, cli.py), as for every command
    assert report_cli.main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "runs folder not found: " in err and "nope" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert report_cli.main([str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no runs under" in err and "robustbench_fvae.run" in err

    # a bad flag: the short usage line and the error, exit 2
    with pytest.raises(SystemExit) as exc:
        report_cli.main([str(empty), "--best-by", "test_wg"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("usage:") and "--best-by" in err[1]
    # two rules for one report: refused in one line
    write_run(empty, method="lora", seed=0)
    assert report_cli.main([str(empty), "--best-by", "val_wg", "--select", "val_avg"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "same rule" in err

    out = tmp_path / "out"
    a = write_run(out, method="lora", seed=0, done=False, lr=1e-3)
    write_run(out, method="fvae", seed=3, done=False, adapter=AdapterConfig(beta=10.0))
    assert report_cli.main([str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "found 2 unfinished" in err and str(a) in err
    cmd = re.search(r"`(python -m robustbench_fvae\.run [^`]*)`", err).group(1)
    assert "--method fvae" in cmd or "--method lora" in cmd
    assert f"--out {out}" in cmd
    assert not (out / "report").exists()  # nothing written on error


def test_suggested_resume_command_recreates_the_run(tmp_path):
    """The command the no-finished-runs error suggests parses with run's own parser into the
    very config of the unfinished run (same hash, hence same folder: it resumes there)."""
    import robustbench_fvae.run as run_cli
    from robustbench_fvae.analysis.aggregate import resume_command
    from robustbench_fvae.config import config_hash
    from robustbench_fvae.records import load_run

    out = tmp_path / "out"
    for rd in (
        write_run(out, method="lora", seed=3, done=False, lr=1e-3),
        write_run(
            out,
            method="fvae",
            seed=0,
            done=False,
            adapter=AdapterConfig(beta=10.0, targets=("q", "v")),
        ),
    ):
        cmd = resume_command(load_run(rd))
        args = run_cli.build_parser().parse_args(cmd.split()[3:])
        cfg = run_cli.config_from_args(args)
        assert config_hash(cfg) == rd.name, cmd
        assert Path(cfg.out) == out


def test_select_override_reads_other_selections_or_the_history(tmp_path):
    out = tmp_path / "out"
    # epoch 1: best val WG (0.7), epoch 2: best val average (lots of majority, WG 0.3)
    val = ([0.8, 0.7, 0.7, 0.8], [1.0, 0.3, 0.3, 1.0])
    test = ([0.8, 0.7, 0.7, 0.8], [1.0, 0.2, 0.3, 0.95])
    with_other = write_run(out, method="lora", seed=0, val_accs=val, test_accs=test)
    write_run(out, method="lora", seed=1, val_accs=val, test_accs=test, other_selections=False)
    found = collect_runs(out)
    own = {r.seed: r for r in run_results(found.finished)[0]}
    assert {s: (r.selection, r.selected_epoch) for s, r in own.items()} == {
        0: ("val_wg", 1),
        1: ("val_wg", 1),
    }
    assert own[0].metrics["worst_group_acc"] == pytest.approx(0.7)
    avg = {r.seed: r for r in run_results(found.finished, select="val_avg")[0]}
    # seed 0 from metrics.json's other_selections, seed 1 re-selected from history.jsonl
    assert {s: (r.selection, r.selected_epoch) for s, r in avg.items()} == {
        0: ("val_avg", 2),
        1: ("val_avg", 2),
    }
    assert avg[0].metrics["worst_group_acc"] == pytest.approx(0.2)
    same = [k for k in avg[0].metrics if k != "ece"]  # ECE depends on each seed's random probs
    assert [avg[1].metrics[k] for k in same] == [avg[0].metrics[k] for k in same]
    # the val split shows the numbers the rule looked at
    val_rows = run_results(found.finished, select="val_avg", split="val")[0]
    assert val_rows[0].metrics["worst_group_acc"] == pytest.approx(0.3)
    # end to end: the tables say which rule they show
    report_cli.main([str(out), "--select", "val_avg", "--out", str(tmp_path / "rep")])
    assert "selected by val_avg" in (tmp_path / "rep" / "table.md").read_text()
    assert {r["selection"] for r in read_csv(tmp_path / "rep" / "table.csv")} == {"val_avg"}
    (with_other / "history.jsonl").write_text("")  # nothing to select from any more...
    (with_other / "metrics.json").write_text(
        json.dumps(
            {
                k: v
                for k, v in json.loads((with_other / "metrics.json").read_text()).items()
                if k != "other_selections"
            }
        )
    )
    results, skipped = run_results(collect_runs(out).finished, select="val_avg")
    assert [r.seed for r in results] == [1] and skipped[0][0] == with_other  # ...so it is skipped


# --------------------------------------------------------------------------- outputs


@pytest.fixture(scope="module")
def built_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    three_seed_runs(tmp / "out")
    write_run(
        tmp / "out",
        method="lora",
        seed=0,
        dataset="synth-celeba",
        test_accs=([0.95, 0.5, 0.6, 0.9],),
    )
    rep = report_cli.build_report(tmp / "out")  # default --out: RUNS_DIR/report
    return rep


def test_report_writes_every_file_into_the_default_folder(built_report):
    out = built_report.out
    assert out == built_report.collection.root / "report"
    expected = {
        "table.md",
        "table.csv",
        "groups.csv",
        "runs.csv",
        "table.tex",
        "report.html",
        "groups_synth-waterbirds.png",
        "groups_synth-celeba.png",
        "wg_vs_avg.png",
        "training_curves_synth-waterbirds.png",
        "training_curves_synth-celeba.png",
    }  # no curves.csv / curves_*.png: every run is at the default spurious strength
    assert set(built_report.files) == expected
    assert {p.name for p in out.iterdir()} == expected  # and no temp files left behind
    # a second report over the same folder does not mistake the report for a run
    again = report_cli.build_report(built_report.collection.root)
    assert len(again.results) == 5


def test_csv_has_fractions_mean_std_ci_and_params(built_report):
    rows = read_csv(built_report.out / "table.csv")
    metric_cols = [
        f"{m}_{s}"
        for m in (
            "worst_group_acc",
            "avg_acc",
            "adj_avg_acc",
            "mean_group_acc",
            "disparity",
            "adj_disparity",
            "ece",
            "core_only_acc",
            "background_reliance",
        )
        for s in ("mean", "std", "ci95")
    ]
    assert list(rows[0]) == [
        "dataset",
        "method",
        "algorithm",
        "settings",
        "label",
        "spurious_strength",
        "selection",
        "split",
        "group_labels",
        "group_labels_training",
        "group_labels_selection",
        "best_by",
        "best_by_score",
        "best_by_candidates",
        "n_configs",
        "n_seeds",
        "seeds",
        *metric_cols,
        "trainable_params",
        "inference_params",
        "frozen_params",
    ]
    by = {(r["dataset"], r["method"]): r for r in rows}
    lora = by[("synth-waterbirds", "lora")]
    assert lora["n_seeds"] == "3" and lora["seeds"] == "0 1 2" and lora["selection"] == "val_wg"
    assert float(lora["worst_group_acc_mean"]) == pytest.approx(0.7)  # a fraction, not 70
    assert float(lora["worst_group_acc_std"]) == pytest.approx(0.1)
    assert float(lora["worst_group_acc_ci95"]) == pytest.approx(0.248413, rel=1e-4)
    assert lora["trainable_params"] == "1234" and lora["inference_params"] == "1000"
    single = by[("synth-waterbirds", "fvae")]
    assert single["worst_group_acc_std"] == "" and single["worst_group_acc_ci95"] == ""
    for r in rows:
        for col in metric_cols:
            assert r[col] == "" or 0.0 <= float(r[col]) <= 1.0
    groups = read_csv(built_report.out / "groups.csv")
    g1 = next(
        g
        for g in groups
        if g["label"] == "lora" and g["dataset"] == "synth-waterbirds" and g["g"] == "1"
    )
    assert g1["group"] == "landbird/water" and float(g1["acc_mean"]) == pytest.approx(0.7)
    runs = read_csv(built_report.out / "runs.csv")
    assert len(runs) == 5 and all(Path(r["run_dir"]).is_dir() for r in runs)


def test_markdown_states_rule_and_averages_in_percent(built_report):
    md = (built_report.out / "table.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Dataset"))
    assert header.startswith("| Dataset | Method | Seeds | WG | Avg | Adj. avg | Mean-group |")
    assert "Core-only" not in header  # no run recorded counterfactual metrics
    lora = next(line for line in md.splitlines() if line.startswith("| synth-waterbirds | lora |"))
    assert "| 3 (0, 1, 2) |" in lora and "70.0 ± 10.0" in lora and "[45.2, 94.8]" in lora
    fvae = next(line for line in md.splitlines() if line.startswith("| synth-waterbirds | fvae |"))
    assert "| **80.0** |" in fvae  # one seed: mean alone; best WG of its dataset in bold
    assert "1,234" in lora
    for phrase in (
        "selected by val_wg",
        "avg_acc, the plain sample-mean accuracy",
        "adj_avg_acc, group accuracies weighted by the training split's group counts",
        "mean_group_acc, the unweighted mean",
        "sample standard deviation (ddof = 1)",
        "on the test split",
    ):
        assert phrase in md, phrase
    assert "## Per-group accuracy: synth-celeba" in md
    assert "landbird/water (g=1, n=10)" in md


def test_latex_table_has_the_paper_shape(built_report):
    tex = (built_report.out / "table.tex").read_text()
    assert "\\begin{tabular}{lcccccc}" in tex  # 2 datasets × (WG, AVG, Disparity)
    assert tex.index("{Waterbirds (synthetic)}") < tex.index("{CelebA (synthetic)}")
    assert "\\cmidrule(lr){2-4} \\cmidrule(lr){5-7}" in tex
    lines = tex.splitlines()
    lora = next(line for line in lines if line.startswith("LoRA &"))
    fvae = next(line for line in lines if line.startswith("FVAE-LoRA &"))
    cells = [c.strip().rstrip("\\").strip() for c in lora.split("&")]
    assert cells[1] == "$70.0 \\pm 10.0$"  # WG, not best: fvae has 80.0
    assert fvae.split("&")[1].strip() == "$\\mathbf{80.0}$"
    assert fvae.split("&")[4].strip().rstrip("\\").strip() == "--"  # no fvae run on celeba
    assert "\\mathbf" not in cells[4]  # a lone entry in a column is not "best"
    assert "selected by val\\_wg" in tex and "plain sample-mean accuracy (avg\\_acc)" in tex
    assert tex.count("&") == 2 + 6 + 2 * 6  # dataset row, metric row, 2 method rows
    assert "\\toprule" in tex and "\\bottomrule" in tex and "\\end{table}" in tex


def test_figures_are_valid_non_trivial_pngs(built_report):
    for name in ("groups_synth-waterbirds.png", "groups_synth-celeba.png", "wg_vs_avg.png"):
        path = built_report.out / name
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 15_000, name
        with Image.open(path) as img:
            img.load()
            w, h = img.size
            assert w >= 600 and h >= 400, (name, img.size)
            # not a blank canvas: many distinct colours (bars, text, markers)
            assert len(img.convert("RGB").getcolors(maxcolors=1 << 20)) > 50


def test_html_is_self_contained_with_tables_and_images(built_report):
    html = (built_report.out / "report.html").read_text()
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    pngs = [name for name in built_report.files if name.endswith(".png")]
    assert len(uris) == len(pngs) == 5  # 2 per-group, scatter, 2 training-curve figures
    embedded = {base64.b64decode(uri) for uri in uris}
    for name in pngs:
        assert (built_report.out / name).read_bytes() in embedded, name
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing fetched from elsewhere
    assert html.count("<table>") == 5  # summary, two per-group tables, noise floor, runs
    assert "70.0 ± 10.0" in html and "<strong>80.0</strong>" in html
    assert "selected by val_wg" in html and "avg_acc, the plain sample-mean accuracy" in html
    assert "\\begin{tabular}" in html  # LaTeX source included
    assert html.rstrip().endswith("</html>")


def test_alarms_are_surfaced_and_equal_columns_are_not_bolded(tmp_path):
    out = tmp_path / "out"
    write_run(out, method="lora", seed=0, alarms=["constant predictor on test"])
    write_run(out, method="fvae", seed=0)  # same group accuracies as lora: every column ties
    rep = report_cli.build_report(out)
    md = (rep.out / "table.md").read_text()
    assert "1 reported run(s) raised alarms" in md and "constant predictor on test" in md
    runs = {r["method"]: r for r in read_csv(rep.out / "runs.csv")}
    assert runs["lora"]["alarms"] == "constant predictor on test" and runs["fvae"]["alarms"] == ""
    wg_col = 3
    assert not any(j == wg_col for _, j in tables.summary_table(rep.rows).bold)
    assert "\\mathbf" not in (rep.out / "table.tex").read_text().split("\\midrule")[1].split(
        "\\bottomrule")[0].replace("ECE", "")  # WG, AVG, Disparity all tie


def test_cli_prints_the_table_and_the_html_path(tmp_path, capsys):
    out = tmp_path / "out"
    three_seed_runs(out)
    assert report_cli.main([str(out), "--out", str(tmp_path / "r")]) == 0
    stdout = capsys.readouterr().out
    assert "70.0 ± 10.0" in stdout
    assert stdout.strip().splitlines()[-1] == str(tmp_path / "r" / "report.html")


# --------------------------------------------------------------------------- real runs


def test_report_on_real_runs_made_by_the_runner(tmp_path):
    """Two seeds of LoRA and one of FVAE-LoRA trained by the real runner on a tiny replica
    stand-in with a tiny ViT loaded from a local weights file, then reported: the report's
    numbers are the runs' own metrics, aggregated."""
    import timm
    import torch
    from data_fixtures import make_waterbirds
    from safetensors.torch import save_file
    from tiny_models import register_tiny_vit

    from robustbench_fvae import training

    make_waterbirds(tmp_path / "data" / "synth", synthetic_name="synth-waterbirds")
    name = register_tiny_vit()
    torch.manual_seed(0)
    weights = tmp_path / "tiny_vit.safetensors"  # stands in for pretrained weights
    save_file(timm.create_model(name, pretrained=False, num_classes=0).state_dict(),
              str(weights))
    made = {}
    # One thread: these matrices are tiny, and on a busy 2-core machine two threads spin against
    # other processes (measured here: 0.5 s per run with one thread, 3-12 s with two).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method, seed in (("lora", 0), ("lora", 1), ("fvae", 0)):
            cfg = RunConfig(method=method, dataset="synth-waterbirds",
                            data_root=str(tmp_path / "data"), out=str(tmp_path / "out"),
                            backbone=name, weights=str(weights), device="cpu", num_workers=0,
                            adapter=AdapterConfig(rank=4),
                            train=TrainConfig(epochs=2, batch_size=8, eval_batch_size=16,
                                              seed=seed))
            made[(method, seed)] = training.run(cfg, progress=False, log=lambda _msg: None)
    finally:
        torch.set_num_threads(threads)
    rep = report_cli.build_report(tmp_path / "out")
    assert [(r.label, r.n) for r in rep.rows] == [("lora", 2), ("fvae", 1)]
    lora = rep.rows[0]
    wgs = [made[("lora", s)].metrics["test"]["worst_group_acc"] for s in (0, 1)]
    assert lora.stats["worst_group_acc"].mean == pytest.approx(np.mean(wgs))
    assert lora.stats["worst_group_acc"].std == pytest.approx(np.std(wgs, ddof=1))
    assert lora.params == made[("lora", 0)].metrics["params"]
    # LoRA uses every trained parameter at inference; FVAE-LoRA drops q2 and the decoder there
    assert lora.params["trainable"] == lora.params["inference"] > 0
    fvae = rep.rows[1].params
    assert fvae == made[("fvae", 0)].metrics["params"] and fvae["trainable"] > fvae["inference"]
    assert [(gs.name, gs.n_samples) for gs in lora.groups] == [
        ("landbird/land", 3), ("landbird/water", 3), ("waterbird/land", 3),
        ("waterbird/water", 3)]  # the fixture's test split
    csv_rows = read_csv(rep.out / "table.csv")
    assert float(csv_rows[0]["worst_group_acc_mean"]) == pytest.approx(np.mean(wgs))
    for name in ("table.md", "table.tex", "report.html", "wg_vs_avg.png",
                 "groups_synth-waterbirds.png", "training_curves_synth-waterbirds.png"):
        assert (rep.out / name).stat().st_size > 0
    assert (rep.out / "wg_vs_avg.png").read_bytes()[:8] == PNG_SIGNATURE
    # epochs exactly as the records hold them, and the curves are the histories' numbers
    from robustbench_fvae.analysis.aggregate import epoch_curves
    from robustbench_fvae.records import load_run

    for r in rep.results:
        rec = load_run(r.path)
        assert r.selected_epoch == rec.metrics["selected_epoch"]
        assert [p["epoch"] for p in r.curve] == [h["epoch"] for h in rec.history]
    histories = [load_run(made[("lora", s)].run_dir).history for s in (0, 1)]
    for i, point in enumerate(epoch_curves(lora)[("val", "worst_group_acc")]):
        values = [h[i]["val"]["worst_group_acc"] for h in histories]
        assert point.epoch == histories[0][i]["epoch"]
        assert (point.mean, point.low, point.high) == pytest.approx(
            (np.mean(values), min(values), max(values)))


# --------------------------------------------------------------------------- figures, closely


def _rows(out: Path):
    return aggregate(run_results(collect_runs(out).finished)[0])


def _luminance(colour) -> float:
    from matplotlib.colors import to_rgb

    r, g, b = to_rgb(colour)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_bar_value_labels_sit_above_every_bar_in_dark_text(tmp_path):
    """Every bar, the near-zero worst group included, carries its mean as dark text placed above
    the bar and its error bar, inside the axes: readable whatever the bar's height."""
    from robustbench_fvae.analysis import plots

    out = tmp_path / "out"
    for seed, g1 in ((0, 0.0), (1, 0.1)):  # worst group 0 % and 10 %: mean 5, std 7.07
        write_run(out, method="lora", seed=seed, test_accs=([1.0, g1, 0.5, 0.95],))
    write_run(out, method="fvae", seed=0, test_accs=([0.9, 0.8, 0.9, 0.9],))
    rows = _rows(out)
    fig = plots.per_group_figure(rows, "synth-waterbirds")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    bars = [p for p in ax.patches if p.get_height() == p.get_height()]  # finite bars
    labels = [t for t in ax.texts if t.get_gid() == "value-label"]
    assert len(bars) == len(labels) == 8  # 2 rows × 4 groups
    expected = {(r.label, gs.g): gs.acc for r in rows for gs in r.groups}
    assert sorted(float(t.get_text()) for t in labels) == sorted(
        round(100 * s.mean, 1) for s in expected.values())
    box = ax.get_window_extent(renderer)
    for bar in bars:
        x0, x1 = bar.get_x(), bar.get_x() + bar.get_width()
        (label,) = [t for t in labels if x0 <= t.get_position()[0] <= x1]
        assert float(label.get_text()) == pytest.approx(bar.get_height(), abs=0.05)
        # above the bar *and* above its error bar (mean + std), never over the bar's colour
        std = next(100 * s.std for (_, _g), s in expected.items()
                   if round(100 * s.mean, 1) == float(label.get_text()))
        std = std if std == std else 0.0
        assert label.get_position()[1] >= bar.get_height() + std
        text_box = label.get_window_extent(renderer)
        assert text_box.y0 >= bar.get_window_extent(renderer).y1
        assert box.x0 <= text_box.x0 and text_box.x1 <= box.x1
        assert box.y0 <= text_box.y0 and text_box.y1 <= box.y1  # not cut by the frame
        assert _luminance(label.get_color()) < 0.3 and label.get_fontsize() >= 7
    zero = min(bars, key=lambda b: b.get_height())
    assert zero.get_height() == pytest.approx(5.0)  # the worst group: 0 % and 10 % over seeds


def test_many_bars_get_vertical_labels_and_one_panel_per_strength(tmp_path):
    from robustbench_fvae.analysis import plots

    out = tmp_path / "out"
    methods = ("lora", "fvae", "vae2lat", "bvae2lat", "full", "linear")
    for rho in (0.5, 0.99):
        for m in methods:
            write_run(out, method=m, seed=1, rho=rho, test_accs=([0.9, 0.0, 0.6, 1.0],))
    fig = plots.per_group_figure(_rows(out), "synth-waterbirds")
    fig.canvas.draw()
    axes = [ax for ax in fig.axes if ax.patches]
    assert len(axes) == 2  # one panel per spurious strength
    assert [ax.get_title() for ax in axes] == ["spurious strength RHO = 0.5",
                                               "spurious strength RHO = 0.99"]
    for ax in axes:
        labels = [t for t in ax.texts if t.get_gid() == "value-label"]
        assert len(labels) == 24
        _assert_readable(ax, labels)
        # one colour per method, the same in both panels
        assert len({p.get_facecolor() for p in ax.patches}) == len(methods)
    assert {p.get_facecolor() for p in axes[0].patches} == {p.get_facecolor()
                                                            for p in axes[1].patches}
    # ten rows on one dataset: 40 narrow bars, labels turn vertical and still do not collide
    out2 = tmp_path / "out2"
    for i in range(10):
        write_run(out2, method="lora", seed=1, lr=(i + 1) * 1e-3,
                  test_accs=([0.9, 0.0, 0.6, 1.0],))
    fig = plots.per_group_figure(_rows(out2), "synth-waterbirds")
    fig.canvas.draw()
    labels = [t for t in fig.axes[0].texts if t.get_gid() == "value-label"]
    assert len(labels) == 40 and {t.get_rotation() for t in labels} == {90.0}
    _assert_readable(fig.axes[0], labels)


def _assert_readable(ax, labels) -> None:
    """Value labels inside the axes, none overlapping another."""
    frame = ax.get_window_extent()
    boxes = [t.get_window_extent() for t in labels]
    for i, b in enumerate(boxes):
        assert frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1
        assert not any(b.overlaps(o) for o in boxes[i + 1:]), labels[i].get_text()


def test_scatter_axes_have_margins_so_a_wg_zero_point_is_whole(tmp_path):
    from robustbench_fvae.analysis import plots

    out = tmp_path / "out"
    write_run(out, method="lora", seed=0, test_accs=([1.0, 0.0, 0.5, 1.0],))  # WG 0
    write_run(out, method="fvae", seed=0, test_accs=([1.0, 1.0, 1.0, 1.0],))  # WG = Avg = 100
    results = run_results(collect_runs(out).finished)[0]
    aggregate(results)
    fig = plots.wg_vs_avg_figure(results)
    fig.canvas.draw()
    ax = fig.axes[0]
    frame = ax.get_window_extent()
    (points,) = [c for c in ax.collections if len(c.get_offsets())]
    xy = ax.transData.transform(points.get_offsets())
    assert sorted(points.get_offsets()[:, 1]) == [0.0, 100.0]
    radius = [math.sqrt(s) / 2 * fig.dpi / 72 for s in points.get_sizes()][0]  # points → px
    for x, y in xy:
        assert frame.x0 + radius <= x <= frame.x1 - radius
        assert frame.y0 + radius <= y <= frame.y1 - radius
    assert ax.get_ylim()[0] < 0 and ax.get_ylim()[1] > 100


def test_training_curves_show_recorded_epochs_with_seed_bands(tmp_path):
    """Per-epoch means and min–max bands over seeds, validation from the validation records
    and test from the test records, epochs exactly as recorded (1, 2, 3)."""
    from matplotlib.collections import PolyCollection

    from robustbench_fvae.analysis import plots
    from robustbench_fvae.analysis.aggregate import epoch_curves

    out = tmp_path / "out"
    test = {0: ([1.0, 0.2, 0.3, 1.0], [1.0, 0.4, 0.5, 1.0], [1.0, 0.6, 0.6, 1.0]),
            1: ([1.0, 0.4, 0.5, 1.0], [1.0, 0.6, 0.7, 1.0], [1.0, 0.7, 0.8, 1.0])}
    val = ([0.9, 0.5, 0.5, 0.9],) * 3
    for seed in (0, 1):
        write_run(out, method="lora", seed=seed, test_accs=test[seed], val_accs=val)
    (row,) = _rows(out)
    curves = epoch_curves(row)
    wg = curves[("test", "worst_group_acc")]
    assert [s.epoch for s in wg] == [1, 2, 3]
    assert [s.mean for s in wg] == pytest.approx([0.3, 0.5, 0.65])
    assert [(s.low, s.high, s.n) for s in wg] == [
        pytest.approx((0.2, 0.4, 2)), pytest.approx((0.4, 0.6, 2)), pytest.approx((0.6, 0.7, 2))]
    assert [s.mean for s in curves[("val", "worst_group_acc")]] == pytest.approx([0.5] * 3)
    # plain average of seed 0, epoch 1: (40 + 2 + 3 + 20) / 80
    assert curves[("test", "avg_acc")][0].low == pytest.approx(65 / 80)
    fig = plots.training_curves_figure([row], "synth-waterbirds")
    panels = {ax.get_title().split("\n")[0]: ax for ax in fig.axes if ax.get_title()}
    assert set(panels) == {"validation worst-group", "validation average (avg_acc)",
                           "test worst-group", "test average (avg_acc)"}
    ax = panels["test worst-group"]
    (line,) = [ln for ln in ax.get_lines() if ln.get_label().startswith("lora")]
    assert list(line.get_xdata()) == [1, 2, 3]
    assert list(line.get_ydata()) == pytest.approx([30, 50, 65])
    (band,) = [c for c in ax.collections if isinstance(c, PolyCollection)]
    ys = band.get_paths()[0].vertices[:, 1]
    assert min(ys) == pytest.approx(20) and max(ys) == pytest.approx(70)
    val_line = [ln for ln in panels["validation worst-group"].get_lines()
                if ln.get_label().startswith("lora")][0]
    assert list(val_line.get_ydata()) == pytest.approx([50, 50, 50])
    assert "min–max over seeds" in fig._suptitle.get_text()


def test_runs_of_different_spurious_strength_make_robustness_curves(tmp_path):
    """Rows keep each RHO apart; curves.csv holds mean/std/95 % CI over seeds per method × RHO
    (checked by hand); the figure has a core-only panel only when runs recorded it."""
    from robustbench_fvae.analysis import plots

    out = tmp_path / "out"
    wgs = {0.5: [0.8, 0.9, 1.0], 0.9: [0.3, 0.4, 0.5]}
    core = {0.5: [0.9, 0.95, 1.0], 0.9: [0.6, 0.7, 0.8]}
    for rho in (0.5, 0.9):
        for seed, wg, c in zip((1, 2, 42), wgs[rho], core[rho]):
            write_run(out, method="lora", seed=seed, rho=rho,
                      test_accs=([1.0, wg, wg, 1.0],),
                      counterfactual={"core_only_acc": c, "background_reliance": 1 - c})
        write_run(out, method="fvae", seed=1, rho=rho, test_accs=([1.0, 0.7, 0.7, 1.0],))
    # A record written before RHO was recorded trained at the replica's default: it shares the
    # row of a run that records that default (another dataset here, so the curves above stay).
    write_run(out, method="lora", seed=1, dataset="synth-celeba")
    write_run(out, method="lora", seed=2, dataset="synth-celeba", rho=0.943)
    rep = report_cli.build_report(out, tmp_path / "rep")
    assert [(r.dataset, r.label, r.rho, r.n) for r in rep.rows] == [
        ("synth-waterbirds", "lora (spurious_strength=0.5)", 0.5, 3),
        ("synth-waterbirds", "lora (spurious_strength=0.9)", 0.9, 3),
        ("synth-waterbirds", "fvae (spurious_strength=0.5)", 0.5, 1),
        ("synth-waterbirds", "fvae (spurious_strength=0.9)", 0.9, 1),
        ("synth-celeba", "lora", 0.943, 2)]
    curves = read_csv(rep.out / "curves.csv")
    assert [(c["method"], c["rho"], c["n_seeds"], c["seeds"]) for c in curves] == [
        ("lora", "0.5", "3", "1 2 42"), ("lora", "0.9", "3", "1 2 42"),
        ("fvae", "0.5", "1", "1"), ("fvae", "0.9", "1", "1")]  # celeba: one RHO, no curve
    lora = curves[1]
    assert float(lora["worst_group_acc_mean"]) == pytest.approx(0.4)
    assert float(lora["worst_group_acc_std"]) == pytest.approx(0.1)
    assert float(lora["worst_group_acc_ci95"]) == pytest.approx(T_975_2 * 0.1 / math.sqrt(3),
                                                                rel=1e-5)
    # plain average at RHO 0.9, seed by seed: (40 + 10 w + 10 w + 20) / 80
    avgs = [(60 + 20 * w) / 80 for w in wgs[0.9]]
    assert float(lora["avg_acc_mean"]) == pytest.approx(np.mean(avgs))
    assert float(lora["avg_acc_std"]) == pytest.approx(np.std(avgs, ddof=1))
    assert float(lora["core_only_acc_mean"]) == pytest.approx(0.7)
    assert float(lora["core_only_acc_std"]) == pytest.approx(0.1)
    assert curves[2]["core_only_acc_mean"] == "" and curves[2]["worst_group_acc_std"] == ""
    # the figure: one line per method, x = RHO, y = mean %, a 95 % CI band for 3 seeds
    assert "curves_synth-waterbirds.png" in rep.files
    fig = plots.robustness_figure(rep.curves, "synth-waterbirds")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["test worst-group accuracy", "test average (avg_acc)",
                      "test core-only accuracy"]
    wg_ax = fig.axes[0]
    lines = {ln.get_label().split(" (")[0]: ln for ln in wg_ax.get_lines()}
    # x = RHO, moved a little (2.5 % of the axis span, in logit units) off fvae's line
    shift = np.log(lines["lora"].get_xdata() / (1 - lines["lora"].get_xdata())) - np.log(
        np.array([0.5, 0.9]) / (1 - np.array([0.5, 0.9])))
    assert shift == pytest.approx([-0.025 * np.log(9)] * 2)
    assert list(lines["lora"].get_ydata()) == pytest.approx([90, 40])
    band = wg_ax.collections[0].get_paths()[0].vertices[:, 1]
    half = 100 * T_975_2 * 0.1 / math.sqrt(3)
    assert max(band) == pytest.approx(min(100, 90 + half), rel=1e-4)
    assert min(band) == pytest.approx(40 - half, rel=1e-4)
    # a row at a single RHO is a point, not a curve: left out while another row has a curve
    one_rho = [p for p in rep.curves if p.method == "lora" or p.rho == 0.5]
    drawn = plots.robustness_figure(one_rho, "synth-waterbirds").axes[0].get_lines()
    assert [ln.get_label().split(" (")[0] for ln in drawn] == ["lora"]
    no_core = [p for p in rep.curves if p.method == "fvae"]
    assert len([ax for ax in plots.robustness_figure(no_core, "synth-waterbirds").axes
                if ax.get_title()]) == 2  # no core-only panel without core-only numbers
    # bold = best among rows of the same RHO: fvae wins at 0.9 although lora at 0.5 is higher
    table = tables.summary_table(rep.rows)
    wg_col = table.header.index("WG")
    assert {table.rows[i][1] for i, j in table.bold if j == wg_col} == {
        "lora (spurious_strength=0.5)", "fvae (spurious_strength=0.9)"}
    md = (rep.out / "table.md").read_text()
    assert "## Robustness to the spurious strength: synth-waterbirds" in md
    # like every table, the curves table names its rule, split and average
    curves_md = md.split("## Robustness to the spurious strength")[1].split("\n## ")[0]
    assert "Metrics on the test split at the epoch selected by val_wg" in curves_md
    assert "Avg = avg_acc, the plain sample-mean accuracy" in curves_md
    assert "Core-only" in md.split("## Per-group")[0]  # a main-table column now
    html = (rep.out / "report.html").read_text()
    assert base64.b64encode((rep.out / "curves_synth-waterbirds.png").read_bytes()).decode() \
        in html
    # --split val: validation numbers, and no core-only (measured on test images only)
    val = report_cli.build_report(out, tmp_path / "rep_val", split="val")
    assert {c["core_only_acc_mean"] for c in read_csv(val.out / "curves.csv")} == {""}
    titles = [ax.get_title() for ax in plots.robustness_figure(val.curves,
                                                               "synth-waterbirds").axes]
    assert [t for t in titles if t] == ["val worst-group accuracy", "val average (avg_acc)"]


def test_every_row_lists_its_seeds_so_a_mixed_row_shows(tmp_path):
    out = tmp_path / "out"
    for seed in (0, 1, 2, 42):  # a demo run (seed 0) beside a three-seed sweep
        write_run(out, method="fvae", seed=seed)
    rep = report_cli.build_report(out, tmp_path / "rep")
    md = (rep.out / "table.md").read_text()
    assert "| synth-waterbirds | fvae | 4 (0, 1, 2, 42) |" in md
    assert "| fvae | 4 (0, 1, 2, 42) |" in md  # the per-group table too
    assert "<td class=num>4 (0, 1, 2, 42)</td>" in (rep.out / "report.html").read_text()
    assert read_csv(rep.out / "table.csv")[0]["seeds"] == "0 1 2 42"


def test_epochs_are_shown_as_recorded(tmp_path):
    out = tmp_path / "out"
    rd = write_run(out, method="lora", seed=0,
                   test_accs=([0.9, 0.5, 0.5, 0.9], [0.9, 0.7, 0.7, 0.9], [0.9, 0.6, 0.6, 0.9]))
    recorded = json.loads((rd / "metrics.json").read_text())["selected_epoch"]
    assert recorded == 2  # 1-based: the second of three epochs has the best validation WG
    rep = report_cli.build_report(out, tmp_path / "rep")
    md = (rep.out / "table.md").read_text()
    runs_line = next(line for line in md.splitlines()
                     if line.startswith("| synth-waterbirds | lora | 0 |"))
    assert runs_line.split("|")[5].strip() == "2"  # no +1 on the way
    assert read_csv(rep.out / "runs.csv")[0]["selected_epoch"] == "2"
    assert "counted from 1 (epoch 1 = after the first pass over the training data)" in md


def test_robustness_curves_from_real_runs_at_two_strengths(tmp_path):
    """LoRA trained by the real runner at RHO 0.5 and at the replica's default (0.95, resolved
    into the record), two seeds each, on tiny hand-made stand-ins of the two replicas: two rows,
    and curves.csv holds the runs' own metrics, aggregated."""
    import timm
    import torch
    from data_fixtures import make_waterbirds
    from safetensors.torch import save_file
    from tiny_models import register_tiny_vit

    from robustbench_fvae import training

    data = tmp_path / "data"
    make_waterbirds(data / "synth", synthetic_name="synth-waterbirds")  # the default RHO
    make_waterbirds(data / "synth" / "rho-0.5", seed=1, synthetic_name="synth-waterbirds")
    name = register_tiny_vit()
    torch.manual_seed(0)
    weights = tmp_path / "tiny_vit.safetensors"
    save_file(timm.create_model(name, pretrained=False, num_classes=0).state_dict(),
              str(weights))
    made = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: see test_report_on_real_runs_made_by_the_runner
    try:
        for rho in (0.5, None):
            for seed in (0, 1):
                cfg = RunConfig(method="lora", dataset="synth-waterbirds", data_root=str(data),
                                out=str(tmp_path / "out"), backbone=name, weights=str(weights),
                                device="cpu", num_workers=0, adapter=AdapterConfig(rank=4),
                                train=TrainConfig(epochs=1, batch_size=8, eval_batch_size=16,
                                                  seed=seed, spurious_strength=rho))
                made[(rho, seed)] = training.run(cfg, progress=False, log=lambda _msg: None)
    finally:
        torch.set_num_threads(threads)
    rep = report_cli.build_report(tmp_path / "out")
    default = rep.rows[1].rho
    assert default is not None and default != 0.5  # the record holds the resolved default
    assert [(r.label, r.n) for r in rep.rows] == [
        ("lora (spurious_strength=0.5)", 2), (f"lora (spurious_strength={default:g})", 2)]
    curves = read_csv(rep.out / "curves.csv")
    assert [(c["method"], float(c["rho"]), c["seeds"]) for c in curves] == [
        ("lora", 0.5, "0 1"), ("lora", default, "0 1")]
    for c, rho in zip(curves, (0.5, None)):
        wgs = [made[(rho, s)].metrics["test"]["worst_group_acc"] for s in (0, 1)]
        assert float(c["worst_group_acc_mean"]) == pytest.approx(np.mean(wgs))
        assert float(c["worst_group_acc_std"]) == pytest.approx(np.std(wgs, ddof=1))
        assert c["core_only_acc_mean"] == ""  # hand-made replicas have no core-only twins
    assert (rep.out / "curves_synth-waterbirds.png").read_bytes()[:8] == PNG_SIGNATURE


# --------------------------------------------------------------------------- algorithms, DFR


def test_reselection_emulates_early_stopping_with_the_runs_patience(tmp_path):
    """Re-selecting from history.jsonl picks the epoch early stopping on that rule alone would
    have chosen with the run's recorded patience (5): the late val-average peak at epoch 8 lies
    after val_avg would have stopped (epoch 6), so epoch 1 is selected, not 8."""
    out = tmp_path / "out"
    val = ([0.9, 0.9, 0.9, 0.9], *([[0.8, 0.8, 0.8, 0.8]] * 6), [1.0, 0.8, 0.8, 1.0])
    rd = write_run(out, method="lora", seed=0, val_accs=val, test_accs=val,
                   other_selections=False)
    assert json.loads((rd / "config.json").read_text())["config"]["train"]["patience"] == 5
    (result,), _ = run_results(collect_runs(out).finished, select="val_avg")
    assert (result.selection, result.selected_epoch) == ("val_avg", 1)
    from robustbench_fvae.records import load_run
    from robustbench_fvae.selection import select_epoch

    assert select_epoch(load_run(rd).history, "val_avg")["epoch"] == 8  # without patience
    # the validation score --best-by ranks by is the one at that epoch too
    assert result.val_scores["val_avg"] == pytest.approx(0.9)


def test_best_by_ties_go_to_the_setting_whose_text_sorts_first(tmp_path):
    out = tmp_path / "out"
    for lr in (1e-2, 1e-3):  # equal validation scores; different test numbers
        for seed in (0, 1):
            write_run(out, method="lora", seed=seed, lr=lr,
                      test_accs=([0.9, 0.5 if lr == 1e-2 else 0.7, 0.9, 0.9],))
    results = run_results(collect_runs(out).finished, select="val_wg")[0]
    (row,) = aggregate(results, best_by="val_wg")
    assert row.label == "lora" and row.choice.chosen == "lr=0.001"
    assert [c[0] for c in row.choice.candidates] == ["lr=0.001", "lr=0.01"]
    assert row.stats["worst_group_acc"].mean == pytest.approx(0.7)
    assert row.group_labels == "val (selection)"


@pytest.fixture(scope="module")
def robust_runs(tmp_path_factory) -> dict:
    """Real runs on planted images (the class is a coloured square, the background is balanced
    in every split, so a trained linear head reads the class and gets everything right): a
    tiny timm ViT, `linear` at lr 0.05 and at lr 1e-9 (learns nothing: a constant predictor,
    validation WG 0) × seeds 0, 1 with ERM; GroupDRO and JTT at lr 0.05; and DFR runs made by
    `python -m robustbench_fvae.dfr` of two ERM runs and of the GroupDRO run."""
    import contextlib
    import io

    from data_fixtures import make_waterbirds
    from test_dfr import _paint
    from threadpoolctl import threadpool_limits
    from tiny_models import register_tiny_vit, save_tiny_weights

    from robustbench_fvae import dfr
    from robustbench_fvae.config import config_from_settings
    from robustbench_fvae.training import run

    root = tmp_path_factory.mktemp("robust")
    counts = {split: {g: n for g in range(4)} for split, n in
              (("train", 12), ("val", 6), ("test", 6))}
    folder = make_waterbirds(root / "data" / "synth", counts=counts,
                             synthetic_name="synth-waterbirds")
    rng = np.random.default_rng(0)
    with open(folder / "metadata.csv", newline="") as fh:
        for line in csv.DictReader(fh):
            _paint(folder / line["img_filename"], int(line["y"]), int(line["place"]), rng)
    weights = save_tiny_weights(root / "vit.safetensors")
    made: dict = {}
    with threadpool_limits(1):
        for algorithm, lr, seed in (("erm", 0.05, 0), ("erm", 0.05, 1), ("erm", 1e-9, 0),
                                    ("erm", 1e-9, 1), ("groupdro", 0.05, 0), ("jtt", 0.05, 0)):
            cfg = config_from_settings({
                "method": "linear", "dataset": "synth-waterbirds", "backbone": register_tiny_vit(),
                "weights": str(weights), "data_root": str(root / "data"),
                "out": str(root / "out"), "device": "cpu", "num_workers": 0, "epochs": 2,
                "seed": seed, "batch_size": 16, "eval_batch_size": 64, "patience": 0,
                "augment": "none", "lr": lr, "algorithm": algorithm})
            made[(algorithm, lr, seed)] = run(cfg, progress=False, log=lambda _: None).run_dir
        for key in (("erm", 0.05, 0), ("erm", 0.05, 1), ("groupdro", 0.05, 0)):
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                assert dfr.main([str(made[key]), "--device", "cpu", "--refits", "3"]) == 0
            made[("dfr", *key)] = Path(buf.getvalue().strip().splitlines()[-1])
    return {"out": root / "out", "runs": made}


def test_rows_by_algorithm_with_dfr_runs_and_group_label_columns(robust_runs, tmp_path):
    runs = robust_runs["runs"]
    rep = report_cli.build_report(robust_runs["out"], tmp_path / "rep")
    got = [(r.label, r.algorithm, r.n, r.group_labels) for r in rep.rows]
    assert got == [
        ("linear (lr=0.05)", "erm", 2, "val (selection)"),
        ("linear (lr=1e-09)", "erm", 2, "val (selection)"),
        ("linear + groupdro (lr=0.05)", "groupdro", 1, "train (training) + val (selection)"),
        ("linear + jtt (lr=0.05)", "jtt", 1, "val (selection)"),
        ("linear + dfr (lr=0.05)", "dfr", 2, "val (DFR training) + val (selection)"),
        ("linear + groupdro + dfr (lr=0.05)", "groupdro+dfr", 1,
         "train (training) + val (DFR training) + val (selection)"),
    ]
    # JTT's stage-1 ERM run is a step of JTT, not an ERM row; the report says where it is
    (stage1, jtt), = rep.jtt_stage1
    assert jtt == runs[("jtt", 0.05, 0)] and stage1.parent == jtt.parent
    assert str(stage1) in (rep.out / "table.md").read_text()
    # a DFR run: its parent's epoch, its own numbers (the runner's record, aggregated)
    from robustbench_fvae.records import load_run

    dfr_row = rep.rows[4]
    for r in dfr_row.runs:
        rec = load_run(r.path)
        parent = load_run(rec.config["derived"]["parent_dir"])
        assert r.selected_epoch == parent.metrics["selected_epoch"] and r.selection == "dfr"
        assert r.metrics["worst_group_acc"] == rec.metrics["test"]["worst_group_acc"]
        assert r.curve == [] and r.derived
        # ranked by the parent's validation score, never by its own (in-sample) one
        assert r.val_scores["val_wg"] == parent.metrics["val"]["worst_group_acc"]
    table = read_csv(rep.out / "table.csv")
    assert [(t["algorithm"], t["group_labels_training"], t["group_labels_selection"])
            for t in table] == [("erm", "", "True"), ("erm", "", "True"),
                                ("groupdro", "train", "True"), ("jtt", "", "True"),
                                ("dfr", "val", "True"), ("groupdro+dfr", "train+val", "True")]
    assert {r["algorithm"] for r in read_csv(rep.out / "runs.csv")} == {
        "erm", "groupdro", "jtt", "dfr", "groupdro+dfr"}
    md = (rep.out / "table.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Dataset"))
    assert "| Group labels |" in header and "Setting" not in header
    assert "not a selection signal" in md and "'val (DFR training)'" in md
    assert "selected by dfr: the parent run's selected epoch" in md
    tex = (rep.out / "table.tex").read_text()
    assert r"Linear probe + GroupDRO + DFR$^\dagger$ (lr=0.05)" in tex
    assert r"Linear probe (lr=1e-09) &" in tex and "not a selection signal" in tex
    html_text = (rep.out / "report.html").read_text()
    assert "val (DFR training) + val (selection)" in html_text
    # training curves: drawn for the trained rows, DFR named as having no history of its own
    from robustbench_fvae.analysis import plots

    fig = plots.training_curves_figure(rep.rows, "synth-waterbirds")
    title = fig._suptitle.get_text()
    assert "not drawn (no training history of their own): linear + dfr (lr=0.05), " \
           "linear + groupdro + dfr (lr=0.05)" in title
    labels = {t.get_text() for t in fig.legends[0].get_texts()}
    assert not any("dfr" in t for t in labels) and "linear + jtt (lr=0.05) (n=1)" in labels
    assert (rep.out / "training_curves_synth-waterbirds.png").read_bytes()[:8] == PNG_SIGNATURE
    # re-selection by another rule than the parents' cannot serve a DFR run: listed, skipped
    with pytest.warns(UserWarning, match="fitted at its parent's epoch selected by val_wg"):
        rep2 = report_cli.build_report(robust_runs["out"], tmp_path / "rep2", select="val_avg")
    assert not any(r.derived for r in rep2.rows) and len(rep2.skipped) == 3
    assert {r.group_labels for r in rep2.rows} == {"none", "train (training)"}


def test_best_by_keeps_the_setting_with_the_best_validation_score(robust_runs, tmp_path):
    """lr 1e-9 learns nothing (validation WG 0), lr 0.05 everything (validation WG 1): with
    --best-by val_wg only the lr 0.05 runs remain, named in the Setting column."""
    runs = robust_runs["runs"]
    for lr, wg in ((0.05, 1.0), (1e-9, 0.0)):  # the premise, from the runs' own records
        for seed in (0, 1):
            metrics = json.loads((runs[("erm", lr, seed)] / "metrics.json").read_text())
            assert metrics["val"]["worst_group_acc"] == wg
    assert report_cli.main([str(robust_runs["out"]), "--out", str(tmp_path / "rep"),
                            "--best-by", "val_wg"]) == 0
    table = read_csv(tmp_path / "rep" / "table.csv")
    assert [(t["label"], t["settings"], t["best_by"], t["seeds"]) for t in table] == [
        ("linear", "lr=0.05", "val_wg", "0 1"),
        ("linear + groupdro", "lr=0.05", "val_wg", "0"),
        ("linear + jtt", "lr=0.05", "val_wg", "0"),
        ("linear + dfr", "lr=0.05", "val_wg", "0 1"),
        ("linear + groupdro + dfr", "lr=0.05", "val_wg", "0"),
    ]
    assert table[0]["best_by_candidates"] == "lr=0.05: 1.0 (2) | lr=1e-09: 0.0 (2)"
    assert float(table[0]["worst_group_acc_mean"]) == 1.0
    md = (tmp_path / "rep" / "table.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Dataset"))
    assert "| Group labels | Setting |" in header
    assert "| synth-waterbirds | linear | 2 (0, 1) |" in md
    assert "chosen with --best-by val_wg (DomainBed style)" in md
    assert "out of 1–2 setting(s) run" in md and "sorts first" in md
    tex = (tmp_path / "rep" / "table.tex").read_text()
    assert "Linear probe (lr=0.05) &" in tex and "DomainBed style" in tex
    # without --best-by every setting is a row of its own
    rows = report_cli.build_report(robust_runs["out"], tmp_path / "all").rows
    assert sum(r.algorithm == "erm" for r in rows) == 2


def test_an_unfinished_dfr_run_is_listed_with_the_dfr_command_that_redoes_it(robust_runs,
                                                                              tmp_path):
    import shutil

    from robustbench_fvae import dfr
    from robustbench_fvae.analysis.aggregate import resume_command

    out = tmp_path / "out"
    shutil.copytree(robust_runs["out"], out, ignore=shutil.ignore_patterns("*.lock"))
    name = robust_runs["runs"][("dfr", "erm", 0.05, 0)].name
    killed = next(out.rglob(name))
    (killed / "done").unlink()  # as if killed before its last write
    (unfinished,) = collect_runs(out).unfinished
    cmd = resume_command(unfinished)
    assert cmd.startswith("python -m robustbench_fvae.dfr ") and "--refits 3" in cmd
    assert f"--out {out}" in cmd
    assert dfr.main([*cmd.split()[3:], "--device", "cpu"]) == 0
    assert (killed / "done").is_file() and not collect_runs(out).unfinished


def test_a_derived_run_of_a_new_kind_is_shown_as_its_own_record_says(robust_runs, tmp_path):
    """A new derived run (here "afr") is one module that writes its facts into its record:
    the reports, tables and resume command read them, and no other file names it. Planted by
    rewriting a real DFR record as the new module would have written it."""
    import shutil

    from robustbench_fvae.analysis.aggregate import resume_command
    from robustbench_fvae.record.derived import DerivedFacts
    from robustbench_fvae.record.io import read_json

    out = tmp_path / "out"
    shutil.copytree(robust_runs["out"], out, ignore=shutil.ignore_patterns("*.lock"))
    source = next(out.rglob(robust_runs["runs"][("dfr", "erm", 0.05, 0)].name))
    for key, path in robust_runs["runs"].items():  # keep one derived run: the new one
        if key[0] == "dfr" and path.name != source.name:
            shutil.rmtree(next(out.rglob(path.name)))
    facts = DerivedFacts(algorithm="afr", label="AFR", group_labels_in_training="val",
                         group_labels_in_selection=True,
                         selection_description="the parent's epoch, its last layer reweighted",
                         note="AFR's own note.", command="python -m elsewhere.afr",
                         args=("--gamma", "4"))
    config = read_json(source / "config.json")
    config["derived"] = {**config["derived"], **facts.record_fields()}
    config["config"]["train"]["algorithm"] = "afr"
    config["config_hash"] = "afafafafafaf"
    metrics = read_json(source / "metrics.json")
    metrics["selection"] = "afr"
    write_json_atomic(source / "config.json", config)
    write_json_atomic(source / "metrics.json", metrics)
    run_dir = source.rename(source.parent / "afafafafafaf")

    rep = report_cli.build_report(out, tmp_path / "rep")
    (row,) = [r for r in rep.rows if r.derived]
    assert (row.label, row.algorithm, row.group_labels) == (
        "linear + afr (lr=0.05)", "afr", "val (AFR training) + val (selection)")
    md = (rep.out / "table.md").read_text()
    assert "AFR rows (+ afr): AFR's own note." in md and "'val (AFR training)'" in md
    assert "afr: the parent's epoch, its last layer reweighted" in md and "DFR" not in md
    tex = (rep.out / "table.tex").read_text()
    assert r"Linear probe + AFR$^\dagger$ (lr=0.05)" in tex and "AFR's own note." in tex
    (run_dir / "done").unlink()
    (unfinished,) = collect_runs(out).unfinished
    parent = config["derived"]["parent_dir"]
    assert resume_command(unfinished) == f"python -m elsewhere.afr {parent} --gamma 4 --out {out}"


def test_default_spurious_strength_of_replicas_real_and_unknown_datasets():
    from robustbench_fvae.analysis.aggregate import default_spurious_strength

    assert default_spurious_strength("synth-waterbirds") == 0.95
    assert default_spurious_strength("synth-celeba") == 0.943
    assert default_spurious_strength("waterbirds") is None  # real data: no knob
    assert default_spurious_strength("no-such-dataset") is None
