"""DFR (Kirichenko et al. 2023) as a derived run: the fit on planted features, and the command
end to end on a real finished tiny run (record contract, recompute, idempotence, refusals)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from robustbench_fvae import dfr, records
from robustbench_fvae.cli import EXIT_BAD_INPUT, EXIT_OK
from robustbench_fvae.jobs.last_layer import derived_hash

sys.path.insert(0, str(Path(__file__).resolve().parent))

# ---------------------------------------------------------------- planted features

CORE_NOISE, SPURIOUS_SCALE, SPURIOUS_NOISE, N_NOISE_DIMS = 0.3, 3.0, 0.1, 8


def planted(counts: dict[tuple[int, int], int], rng: np.random.Generator):
    """Features [core, spurious, noise…] (N, 2 + N_NOISE_DIMS) for groups (y, a) of the given
    sizes: the core dim is ±1 by the class y (noisy), the spurious dim ±3 by the attribute a
    (clean and wide, so a max-margin head trained where a = y leans on it). Returns x, y, a, g."""
    y = np.concatenate([np.full(n, yy) for (yy, _), n in counts.items()])
    a = np.concatenate([np.full(n, aa) for (_, aa), n in counts.items()])
    x = np.column_stack([(2 * y - 1) + CORE_NOISE * rng.standard_normal(len(y)),
                         SPURIOUS_SCALE * (2 * a - 1)
                         + SPURIOUS_NOISE * rng.standard_normal(len(y)),
                         rng.standard_normal((len(y), N_NOISE_DIMS))])
    return x, y, a, 2 * y + a


def test_dfr_recovers_the_core_direction_where_erm_used_the_spurious_one():
    rng = np.random.default_rng(0)
    # ERM's training set: background always matches the class, so the clean, wide background
    # feature separates it with the larger margin; validation is group-imbalanced but has every
    # group.
    x_tr, y_tr, _, _ = planted({(0, 0): 200, (1, 1): 200}, rng)
    x_val, y_val, _, g_val = planted({(0, 0): 60, (0, 1): 20, (1, 0): 15, (1, 1): 60}, rng)
    x_te, y_te, _, g_te = planted({(0, 0): 100, (0, 1): 100, (1, 0): 100, (1, 1): 100}, rng)

    erm = LogisticRegression(C=100.0).fit(x_tr, y_tr)
    # ERM's head used the spurious dim (its score moves more along it than along the core dim)
    assert abs(erm.coef_[0, 1]) * SPURIOUS_SCALE > 2 * abs(erm.coef_[0, 0])
    erm_wg = dfr.worst_group_accuracy(erm.predict(x_te), y_te, g_te)
    assert erm_wg < 0.1

    fit = dfr.fit_dfr(x_val, y_val, g_val, num_classes=2, seed=0)
    coef = fit.head.coef[0]
    assert abs(coef[0]) > 5 * np.abs(coef[1:]).max()  # the core dim dominates
    assert coef[0] > 0  # and points the right way
    dfr_wg = dfr.worst_group_accuracy(fit.head.predict(x_te), y_te, g_te)
    assert dfr_wg > 0.9
    # the protocol's bookkeeping: C from the grid by held-out WG, balanced subsets
    assert fit.chosen_c in dfr.C_GRID and len(fit.c_scores) == len(dfr.C_GRID)
    best = max(s["worst_group_acc"] for s in fit.c_scores)
    assert next(s["C"] for s in fit.c_scores if s["worst_group_acc"] == best) == fit.chosen_c
    assert fit.refit_per_group == 15 and fit.tune_per_group == 8  # ceil(15/2) on the fit half
    assert len(fit.refit_heads) == dfr.DEFAULT_REFITS


def test_dfr_multiclass_one_vs_rest():
    """Four classes (as Animals), each with a core direction of its own and a background that
    ERM could use; DFR's averaged head recovers the classes in every group."""
    rng = np.random.default_rng(1)
    k, n = 4, {0: 50, 1: 12}  # majority / minority background per class
    y = np.concatenate([np.full(n[int(a != c % 2)], c) for c in range(k) for a in (0, 1)])
    a = np.concatenate([np.full(n[int(aa != c % 2)], aa) for c in range(k) for aa in (0, 1)])
    g = 2 * y + a

    def features(y, a):
        core = 1.5 * np.eye(k)[y] + 0.3 * rng.standard_normal((len(y), k))
        spur = (2 * a - 1)[:, None] + 0.1 * rng.standard_normal((len(y), 1))
        return np.column_stack([core, spur, rng.standard_normal((len(y), 6))])

    x_val = features(y, a)
    y_te = np.repeat(np.arange(k), 60)
    a_te = np.tile(np.repeat([0, 1], 30), k)
    x_te = features(y_te, a_te)
    fit = dfr.fit_dfr(x_val, y, g, num_classes=k, seed=0, refits=5)
    assert fit.head.coef.shape == (k, x_val.shape[1]) and fit.head.intercept.shape == (k,)
    prob = fit.head.predict_proba(x_te)
    assert prob.shape == (len(y_te), k) and np.allclose(prob.sum(1), 1.0)
    assert dfr.worst_group_accuracy(prob.argmax(1), y_te, 2 * y_te + a_te) > 0.9
    # each class's one-vs-rest row leans on its own core dim, not on the background
    own = np.abs(fit.head.coef[np.arange(k), np.arange(k)])
    assert np.all(own > 3 * np.abs(fit.head.coef[:, k]))


def test_averaged_head_is_the_mean_of_the_refits_in_raw_feature_space():
    rng = np.random.default_rng(2)
    x, y, _, g = planted({(0, 0): 30, (0, 1): 10, (1, 0): 10, (1, 1): 30}, rng)
    x = x * np.linspace(0.5, 5.0, x.shape[1]) + 3.0  # scales and offsets the scaler must undo
    fit = dfr.fit_dfr(x, y, g, num_classes=2, seed=3, refits=4)
    mean_scores = np.mean([h.scores(x) for h in fit.refit_heads], axis=0)
    np.testing.assert_allclose(fit.head.scores(x), mean_scores, rtol=1e-10, atol=1e-10)
    # one refit head in raw space scores exactly as the scaler + logistic regression it came from
    head, _ = dfr.fit_l1_head(x, y, 0.3, 2, random_state=0)
    scaler = StandardScaler().fit(x)
    sk = dfr._l1_logreg(0.3, 0).fit(scaler.transform(x), y)
    np.testing.assert_allclose(head.scores(x)[:, 0], sk.decision_function(scaler.transform(x)),
                               rtol=1e-9, atol=1e-9)
    assert np.array_equal(head.predict(x), sk.predict(scaler.transform(x)))


def test_subsets_are_seeded_balanced_and_stratified():
    g = np.repeat([0, 1, 2, 3], [9, 3, 4, 7])
    fit_half, held = dfr.stratified_halves(g, np.random.default_rng(0))
    assert sorted(np.concatenate([fit_half, held]).tolist()) == list(range(len(g)))
    assert np.bincount(g[held]).tolist() == [4, 1, 2, 3]  # floor(n_g / 2) held out
    sub = dfr.balanced_subsample(np.arange(len(g)), g, np.random.default_rng(0))
    assert np.bincount(g[sub]).tolist() == [3, 3, 3, 3] and len(set(sub.tolist())) == 12
    rng = np.random.default_rng(5)
    x, y, _, gg = planted({(0, 0): 20, (0, 1): 8, (1, 0): 8, (1, 1): 20}, rng)
    a, b = (dfr.fit_dfr(x, y, gg, 2, seed=7, refits=3) for _ in range(2))
    assert np.array_equal(a.head.coef, b.head.coef) and a.chosen_c == b.chosen_c
    c = dfr.fit_dfr(x, y, gg, 2, seed=8, refits=3)
    assert not np.array_equal(a.head.coef, c.head.coef)
    with pytest.raises(dfr.DFRError, match="at least 2"):
        dfr.stratified_halves(np.array([0, 0, 1]), np.random.default_rng(0))


# ---------------------------------------------------------------- the command on a real run


@pytest.fixture(scope="module")
def parent_run(tmp_path_factory) -> Path:
    """A finished one-epoch lora run on a tiny Waterbirds-layout replica stand-in (real timm
    offline ViT, real record)."""
    from tiny_models import make_offline_runs

    root = tmp_path_factory.mktemp("dfr_parent")
    return make_offline_runs(root, [("lora", 0)])[("lora", 0)]


@pytest.fixture(scope="module")
def dfr_run(parent_run) -> tuple[Path, str]:
    """The DFR run of ``parent_run`` made through the CLI, and what it printed."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = dfr.main([str(parent_run), "--device", "cpu"])
    assert rc == EXIT_OK, buf.getvalue()
    out = buf.getvalue()
    return Path(out.strip().splitlines()[-1]), out


def test_dfr_cli_writes_a_derived_run_record(parent_run, dfr_run):
    rdir, printed = dfr_run
    parent = records.load_run(parent_run)
    # beside the parent: OUT/<dataset>/<method>/<hash>, hash over parent hash + settings
    assert rdir.parent == parent_run.parent and rdir != parent_run
    settings = dfr.dfr_settings()
    assert rdir.name == derived_hash(parent.config_hash, settings)
    for name in ("config.json", "metrics.json", "predictions_val.csv", "predictions_test.csv",
                 dfr.HEAD_FILE, "done"):
        assert (rdir / name).is_file(), name
    # done is written last
    others = [p.stat().st_mtime_ns for p in rdir.iterdir() if p.name != "done"]
    assert (rdir / "done").stat().st_mtime_ns >= max(others)

    config = records.read_json(rdir / "config.json")
    assert config["record_version"] == records.RECORD_VERSION
    assert config["config_hash"] == rdir.name
    assert config["config"]["train"]["algorithm"] == "dfr"
    # everything else of the parent's config is kept
    parent_cfg = dict(parent.config["config"])
    ours = dict(config["config"])
    for c in (parent_cfg, ours):
        c.pop("out"), c.pop("device")
        c["train"] = {k: v for k, v in c["train"].items() if k != "algorithm"}
    assert ours == parent_cfg
    assert config["dataset_info"] == parent.config["dataset_info"]
    derived = config["derived"]
    assert derived["algorithm"] == "dfr" and derived["parent_hash"] == parent.config_hash
    assert Path(derived["parent_dir"]) == parent_run.resolve()
    assert derived["settings"] == settings and derived["settings"]["refits"] == 20
    assert derived["chosen_C"] in dfr.C_GRID
    assert derived["selection"] == "worst-group accuracy on held-out validation half"

    metrics = records.read_json(rdir / "metrics.json")
    assert metrics["selection"] == "dfr"
    assert metrics["selected_epoch"] == parent.metrics["selected_epoch"]
    assert metrics["uses_group_labels"][0] == "training (validation split)"
    assert "not a selection signal" in metrics["notes"]
    assert metrics["params"]["inference"] == parent.metrics["params"]["inference"]
    d = metrics["dfr"]["feature_dim"]
    assert metrics["params"]["trainable"] == d + 1  # binary: one coefficient row + intercept
    # the extracted features are what the parent's head reads: it reproduces its predictions
    assert metrics["dfr"]["parent_head_agreement_test"] == 1.0
    assert metrics["dfr"]["parent_head_max_prob_diff_test"] < 1e-5  # fp32 on CPU
    # every metric can be recomputed from the prediction files alone
    assert records.recompute_metrics(rdir) == {"val": metrics["val"], "test": metrics["test"]}
    pred = records.read_predictions(rdir / "predictions_test.csv")
    test_parent = records.read_predictions(parent_run / "predictions_test.csv")
    for col in ("index", "y", "a", "g"):
        assert np.array_equal(pred[col], test_parent[col])
    assert pred["prob"].shape == test_parent["prob"].shape
    # the saved head reproduces the probabilities... of its own record
    from safetensors.numpy import load_file

    head = load_file(str(rdir / dfr.HEAD_FILE))
    assert head["coef"].shape == (1, d) and head["intercept"].shape == (1,)
    assert f"chosen C {derived['chosen_C']:g}" in printed and "not a selection signal" in printed


def test_dfr_run_is_read_by_iter_runs_and_the_report(parent_run, dfr_run, tmp_path):
    rdir, _ = dfr_run
    out = parent_run.parents[2]
    found = {r.path: r for r in records.iter_runs(out, strict=True)}
    assert set(found) == {parent_run, rdir}
    assert found[rdir].done and found[rdir].method == "lora"
    assert found[rdir].run_config.train.algorithm == "dfr"
    from robustbench_fvae import report

    rc = report.main([str(out), "--out", str(tmp_path / "report")])
    assert rc == 0
    runs_csv = (tmp_path / "report" / "runs.csv").read_text()
    assert str(rdir) in runs_csv and str(parent_run) in runs_csv


def test_dfr_is_idempotent_and_force_redoes_it(parent_run, dfr_run, capsys):
    rdir, _ = dfr_run
    stamp = (rdir / "done").read_text()
    before = (rdir / "metrics.json").read_text()
    assert dfr.main([str(parent_run), "--device", "cpu"]) == EXIT_OK
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("already done") and lines[-1] == str(rdir)
    assert (rdir / "done").read_text() == stamp
    assert dfr.main([str(parent_run), "--device", "cpu", "--force"]) == EXIT_OK
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(rdir)
    after = json.loads((rdir / "metrics.json").read_text())
    # seeded: the redone run has the same numbers (only the timing differs)
    old = json.loads(before)
    for m in (old, after):
        m.pop("train_time_s")
    assert after == old


def test_dfr_run_held_by_another_process_is_not_touched(parent_run, dfr_run, capsys):
    rdir, _ = dfr_run
    stamp = (rdir / "done").read_text()
    with records.run_lock(rdir):  # a separate open file: flock conflicts as with a process
        assert dfr.main([str(parent_run), "--device", "cpu", "--force"]) == 1
        assert "pid" in _one_error_line(capsys)
    assert (rdir / "done").read_text() == stamp


def test_dfr_settings_name_a_different_run(parent_run, dfr_run, tmp_path, capsys):
    rdir, _ = dfr_run
    out = tmp_path / "elsewhere"
    assert dfr.main([str(parent_run), "--device", "cpu", "--seed", "1", "--refits", "2",
                     "--c-grid", "1,0.1", "--out", str(out)]) == EXIT_OK
    other = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert other.parent == out / "synth-waterbirds" / "lora" and other.name != rdir.name
    derived = records.read_json(other / "config.json")["derived"]
    assert derived["settings"]["seed"] == 1 and derived["settings"]["c_grid"] == [1.0, 0.1]
    assert len(records.read_json(other / "metrics.json")["dfr"]["c_scores"]) == 2


# ---------------------------------------------------------------- planted images, real pipeline

BACKGROUND_RGB = ((60, 150, 60), (60, 80, 190))  # the spurious cue: the whole image
CORE_RGB = ((230, 230, 230), (20, 20, 20), (230, 40, 40), (240, 200, 30))  # a square per class
ANIMAL_CLASSES = {"landbirds": 0, "waterbirds": 1, "small_dogs": 2, "big_dogs": 3}
ANIMAL_BACKGROUNDS = {"land": 0, "water": 1, "indoor": 0, "outdoor": 1}


def _paint(path: Path, y: int, a: int, rng: np.random.Generator) -> None:
    """Overwrite a fixture image with a planted one: a noisy background colour by ``a`` and a
    noisy 12x12 square in the middle coloured by the class ``y`` (32x32 px)."""
    from PIL import Image

    img = np.array(BACKGROUND_RGB[a], float) + 25 * rng.standard_normal((32, 32, 3))
    img[10:22, 10:22] = np.array(CORE_RGB[y], float) + 20 * rng.standard_normal((12, 12, 1))
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, format=fmt, quality=95)


def _planted_replica(root: Path, dataset: str) -> None:
    """A replica stand-in in the real layout whose training split pairs every class with one
    background (one image per minority group), with group-balanced val and test splits."""
    import csv

    from data_fixtures import make_animals, make_waterbirds

    rng = np.random.default_rng(0)
    if dataset == "synth-waterbirds":
        train = {0: 30, 1: 1, 2: 1, 3: 30}
        counts = {"train": train, "val": {g: 12 for g in train}, "test": {g: 12 for g in train}}
        folder = make_waterbirds(root / "synth", counts=counts, synthetic_name=dataset)
        with open(folder / "metadata.csv", newline="") as f:
            for row in csv.DictReader(f):
                _paint(folder / row["img_filename"], int(row["y"]), int(row["place"]), rng)
        return
    # Animals: birds land/water, dogs indoor/outdoor; each class's majority background differs
    # from the other class of its family, so within a family the background predicts the class.
    train = {0: 24, 1: 1, 4: 1, 5: 24, 10: 24, 11: 1, 14: 1, 15: 24}
    counts = {"train": train, "val": {g: 8 for g in train}, "test": {g: 8 for g in train}}
    base = make_animals(root / "synth", counts=counts, synthetic_name=dataset)
    for path in sorted(base.rglob("*")):
        if path.suffix.lower() in (".jpg", ".jpeg", ".png") and not path.name.startswith("."):
            _paint(path, ANIMAL_CLASSES[path.parent.parent.name],
                   ANIMAL_BACKGROUNDS[path.parent.name], rng)


@pytest.mark.parametrize("dataset,num_classes", [("synth-waterbirds", 2), ("synth-animals", 4)])
def test_dfr_fixes_an_erm_head_that_reads_the_background(tmp_path, dataset, num_classes, capsys):
    """Through the real pipeline: a `linear` ERM run (tiny real timm ViT, random weights) on
    planted images learns the background, which predicts the class in training (test WG 0); DFR
    on its frozen features, fitted on group-balanced validation subsets, reads the class square
    instead (test WG >= 0.9). Two classes and Animals' four."""
    from threadpoolctl import threadpool_limits
    from tiny_models import register_tiny_vit, save_tiny_weights

    from robustbench_fvae.config import config_from_settings
    from robustbench_fvae.training import run

    _planted_replica(tmp_path / "data", dataset)
    cfg = config_from_settings({
        "method": "linear", "dataset": dataset, "backbone": register_tiny_vit(),
        "weights": str(save_tiny_weights(tmp_path / "vit.safetensors")),
        "data_root": str(tmp_path / "data"), "out": str(tmp_path / "out"), "device": "cpu",
        "num_workers": 0, "epochs": 2, "seed": 0, "batch_size": 16, "eval_batch_size": 64,
        "patience": 0, "augment": "none", "select": "val_avg", "lr": 0.05})
    with threadpool_limits(1):
        parent = run(cfg, progress=False, log=lambda _: None)
    erm = parent.metrics["test"]
    # ERM followed the background: right on every majority group, wrong on every minority one
    assert erm["worst_group_acc"] <= 0.1
    assert max(gr["acc"] for gr in erm["groups"]) == 1.0

    with threadpool_limits(1):
        assert dfr.main([str(parent.run_dir), "--device", "cpu"]) == EXIT_OK
    rdir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = records.read_json(rdir / "metrics.json")
    assert metrics["test"]["worst_group_acc"] >= 0.9
    assert min(gr["acc"] for gr in metrics["test"]["groups"]) >= 0.9
    assert metrics["dfr"]["parent_head_agreement_test"] == 1.0
    assert metrics["dfr"]["parent_head_max_prob_diff_test"] < 1e-5  # fp32 on CPU
    d = metrics["dfr"]["feature_dim"]
    rows = 1 if num_classes == 2 else num_classes
    assert metrics["params"]["trainable"] == rows * (d + 1)
    assert records.read_predictions(rdir / "predictions_test.csv")["prob"].shape[1] == \
        num_classes
    assert records.recompute_metrics(rdir) == {"val": metrics["val"], "test": metrics["test"]}
    assert records.read_json(rdir / "config.json")["config"]["dataset"] == dataset


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_dfr_refuses_bad_input(parent_run, dfr_run, tmp_path, capsys):
    rdir, _ = dfr_run
    # not a run directory
    assert dfr.main([str(tmp_path), "--device", "cpu"]) == EXIT_BAD_INPUT
    assert "not a run directory" in _one_error_line(capsys)
    assert dfr.main([str(tmp_path / "missing")]) == EXIT_BAD_INPUT
    assert "not a run directory" in _one_error_line(capsys)
    # an unfinished run
    unfinished = tmp_path / "out" / "synth-waterbirds" / "lora" / "abc"
    shutil.copytree(parent_run, unfinished)
    (unfinished / "done").unlink()
    assert dfr.main([str(unfinished)]) == EXIT_BAD_INPUT
    assert "unfinished" in _one_error_line(capsys)
    # a DFR run as the parent
    assert dfr.main([str(rdir)]) == EXIT_BAD_INPUT
    line = _one_error_line(capsys)
    assert "dfr run itself" in line and str(parent_run.resolve()) in line
    # malformed arguments: short usage + error, exit 2
    for bad in (["--refits", "0"], ["--c-grid", "1,-2"], ["--c-grid", "x"]):
        with pytest.raises(SystemExit) as stop:
            dfr.main([str(parent_run), *bad])
        assert stop.value.code == EXIT_BAD_INPUT
        assert "error:" in capsys.readouterr().err


def test_dfr_writes_the_facts_its_older_records_are_read_with():
    """Reports show old and new DFR records as one algorithm: the facts dfr.py writes now equal
    the frozen ones that older records are upgraded with (record/derived.py), flags aside; the
    redo flags name only what differs from the defaults, C values exactly."""
    import dataclasses

    from robustbench_fvae.record.derived import derived_facts

    legacy = derived_facts({"algorithm": "dfr", "settings": dfr.dfr_settings()})
    assert dataclasses.replace(dfr.derived_facts(), args=()) == \
        dataclasses.replace(legacy, args=())
    assert dfr.derived_facts().args == ()
    assert dfr.derived_facts(seed=2, c_grid=(0.1234567,)).args == (
        "--seed", "2", "--c-grid", "0.1234567")
