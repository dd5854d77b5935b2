"""Core-only accuracy and background reliance: the metrics on planted models (pure functions and
real replica images), and a real run that records them (docs/design.md, Metrics)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import register_tiny_vit, save_tiny_weights

from robustbench_fvae.config import AdapterConfig, ConfigError, RunConfig, TrainConfig
from robustbench_fvae.data import counterfactual_splits, load_splits
from robustbench_fvae.data.synthetic import build_replica
from robustbench_fvae.metrics import (
    MetricsError,
    background_reliance,
    core_only_acc,
    core_only_accuracy,
    counterfactual_metrics,
)
from robustbench_fvae.run import format_summary
from robustbench_fvae.run import main as run_main
from robustbench_fvae.training import resolve_config, run


def one_hot(pred: np.ndarray, k: int) -> np.ndarray:
    return np.eye(k)[pred]


# ---------------------------------------------------------------- the definitions


def test_background_reliance_extremes_and_a_half_way_model():
    a = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    assert background_reliance(a, a) == 1.0  # the background decides: land -> 0, water -> 1
    assert background_reliance(a, 1 - a) == 1.0  # any injective pairing counts
    assert background_reliance(a, np.zeros(8, int), num_classes=2) == 0.0
    # Half of the water images move: TV((1, 0), (1/2, 1/2)) = 1/2.
    assert background_reliance(a, np.array([0, 0, 0, 0, 1, 1, 0, 0])) == 0.5
    # The same prediction mix on both backgrounds, in a different order: no reliance.
    assert background_reliance(a, np.array([0, 1, 0, 1, 1, 0, 1, 0])) == 0.0


def test_background_reliance_makes_sense_for_celeba():
    """CelebA: both classes' majority attribute is "female"; the definition needs no pairing
    of classes with backgrounds, so a backdrop-driven model still scores 1."""
    a = np.repeat([0, 1], 50)  # female (light), male (dark) backdrops
    blond_on_light = np.where(a == 0, 1, 0)
    assert background_reliance(a, blond_on_light) == 1.0
    # "not blond" everywhere: the backdrop moves no decision...
    assert background_reliance(a, np.zeros(100, int), num_classes=2) == 0.0
    # ...while the probability version sees the backdrop shift P(blond) from 0.05 to 0.35.
    p_blond = np.where(a == 0, 0.35, 0.05)
    prob = np.stack([1 - p_blond, p_blond], axis=1)
    m = counterfactual_metrics(np.zeros(4, int), np.full((4, 2), 0.5), a, prob, ["f", "m"])
    assert m["background_reliance"] == 0.0
    assert m["background_reliance_prob"] == pytest.approx(0.30)
    assert [d["name"] for d in m["background_pred_dist"]] == ["f", "m"]


def test_background_reliance_averages_pairs_of_four_backgrounds():
    a = np.repeat([0, 1, 2, 3], 10)
    assert background_reliance(a, a) == 1.0  # SpuCoAnimals-like: each background its class
    # Background tells birds from dogs only: land/water -> 0, indoor/outdoor -> 2.
    coarse = np.where(a < 2, 0, 2)
    assert background_reliance(a, coarse, num_classes=4) == pytest.approx(4 / 6)
    with pytest.raises(MetricsError, match="at least two background values"):
        background_reliance(np.zeros(5, int), np.zeros(5, int))


def test_core_only_accuracy_is_class_balanced():
    y = np.array([0] * 8 + [1] * 2)
    constant = np.zeros(10, int)
    out = core_only_accuracy(y, constant, num_classes=2)
    assert out["core_only_acc"] == 0.5  # chance, whatever the class mix
    assert out["core_only_avg_acc"] == 0.8 and out["core_only_class_acc"] == [1.0, 0.0]
    assert core_only_acc(y, y) == 1.0
    assert core_only_accuracy(y, y, num_classes=3)["core_only_class_acc"] == [1.0, 1.0, None]


# ---------------------------------------------------------------- planted models


def test_planted_background_model_and_silhouette_model():
    """A 'model' that predicts from the background only, and one that reads the object."""
    rng = np.random.default_rng(0)
    n, k = 400, 2
    y = rng.integers(0, k, n)
    a = np.where(rng.random(n) < 0.5, y, 1 - y)  # test backgrounds balanced within class
    # Background model: predicts the class paired with the background it sees. On core-only
    # images it sees the neutral grey, which it maps to one class (a fixed guess).
    bg_core = one_hot(np.zeros(n, int), k)
    bg_background = one_hot(a, k)
    m = counterfactual_metrics(y, bg_core, a, bg_background)
    assert m["background_reliance"] == 1.0 and m["core_only_acc"] == 0.5
    # Silhouette model: right on every core-only image; on background-only images there is no
    # object, so its guesses (noise) do not depend on the background.
    sil_core = one_hot(y, k)
    sil_background = one_hot(rng.integers(0, k, n), k)
    m = counterfactual_metrics(y, sil_core, a, sil_background)
    assert m["core_only_acc"] == 1.0 and m["background_reliance"] < 0.1
    assert m["n_core_only"] == m["n_background_only"] == n


def _colour_model(name: str):
    """A planted background reader for real replica images: it classifies the mean colour of
    the whole picture (water: blue; CelebA 'male': a dark backdrop) and never looks at shape."""
    def predict(image: Image.Image) -> int:
        rgb = np.asarray(image, np.float32).reshape(-1, 3).mean(0) / 255
        if name == "synth-waterbirds":
            return int(rgb[2] > rgb[1])  # water -> waterbird
        return int(rgb.mean() > 0.45)  # light backdrop -> blond (female -> blond)
    return predict


@pytest.mark.parametrize("name", ["synth-waterbirds", "synth-celeba"])
def test_a_background_reader_on_the_replica_twins(tmp_path_factory, name):
    root = tmp_path_factory.mktemp("cf")
    # Enough test images (868 / 807 at this scale) that chance is measured within a few points.
    build_replica(name, root, scale=0.15, progress=False)
    test = load_splits(name, root, build_missing=False)["test"]
    twins = counterfactual_splits(name, root)
    model = _colour_model(name)
    pred_test = np.array([model(test[i][0]) for i in range(len(test))])
    pred_core = np.array([model(twins["core_only"][i][0]) for i in range(len(test))])
    pred_bg = np.array([model(twins["background_only"][i][0]) for i in range(len(test))])
    k = test.num_classes
    # The planted model really reads the background on the original test images.
    if name == "synth-waterbirds":
        assert np.mean(pred_test == test.a) > 0.95
    m = counterfactual_metrics(twins["core_only"].y, one_hot(pred_core, k),
                               twins["background_only"].a, one_hot(pred_bg, k))
    assert m["background_reliance"] > 0.9, m
    # On core-only images the background is gone: the reader is at chance (0.5).
    assert abs(m["core_only_acc"] - 0.5) < 0.12, m


# ---------------------------------------------------------------- a real run records them


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("cfrun")
    build_replica("synth-waterbirds", base / "data", scale=0.03, progress=False)
    build_replica("synth-waterbirds", base / "data", scale=0.03, progress=False, strength=0.5)
    return {"base": base, "data": base / "data", "name": register_tiny_vit(),
            "weights": save_tiny_weights(base / "tiny.safetensors")}


def _cfg(tiny, **train) -> RunConfig:
    settings = dict(epochs=2, batch_size=8, eval_batch_size=32, seed=0, patience=0)
    settings.update(train)
    return RunConfig(method="lora", dataset="synth-waterbirds", data_root=str(tiny["data"]),
                     out=str(tiny["base"] / "out"), backbone=tiny["name"],
                     weights=str(tiny["weights"]), device="cpu", num_workers=0,
                     adapter=AdapterConfig(rank=2), train=TrainConfig(**settings))


def test_a_run_on_a_replica_records_the_counterfactual_metrics(tiny):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run(_cfg(tiny), progress=False, log=lambda _m: None)
        strong = run(_cfg(tiny, spurious_strength=0.5), progress=False, log=lambda _m: None)
    finally:
        torch.set_num_threads(threads)
    metrics = json.loads((Path(result.run_dir) / "metrics.json").read_text())
    cf = metrics["counterfactual"]
    n_test = len(load_splits("synth-waterbirds", tiny["data"], build_missing=False)["test"])
    assert cf["n_core_only"] == cf["n_background_only"] == n_test
    assert 0 <= cf["core_only_acc"] <= 1 and 0 <= cf["background_reliance"] <= 1
    assert [d["name"] for d in cf["background_pred_dist"]] == ["land", "water"]
    summary = format_summary(metrics)
    assert f"core-only acc {cf['core_only_acc']:.3f}" in summary
    assert f"background reliance {cf['background_reliance']:.3f}" in summary
    # The data recipe is resolved, recorded and hashed: another rho is another run.
    config = json.loads((Path(result.run_dir) / "config.json").read_text())
    text = json.dumps(config)
    assert '"augment": "flip"' in text and '"spurious_strength": 0.95' in text
    assert strong.run_dir != result.run_dir
    assert '"spurious_strength": 0.5' in (Path(strong.run_dir) / "config.json").read_text()
    assert "counterfactual" in strong.metrics


def test_the_data_recipe_is_resolved_checked_and_hashed(tiny):
    from robustbench_fvae.config import config_hash

    cfg = resolve_config(_cfg(tiny))
    assert (cfg.train.augment, cfg.train.spurious_strength) == ("flip", 0.95)
    explicit = resolve_config(_cfg(tiny, augment="flip", spurious_strength=0.95))
    assert config_hash(explicit) == config_hash(cfg)
    assert config_hash(resolve_config(_cfg(tiny, augment="standard"))) != config_hash(cfg)
    real = resolve_config(RunConfig(method="lora", dataset="celeba", device="cpu"))
    assert (real.train.augment, real.train.spurious_strength) == ("paper", None)
    for bad, match in (
        (dict(dataset="waterbirds", spurious_strength=0.9), r"synth-\*.*not to waterbirds"),
        (dict(augment="crop"), "unknown augmentation recipe 'crop'; expected one of paper"),
        (dict(spurious_strength=0.2), r"must be in \[0.5, 1.0\]"),
    ):
        dataset = bad.pop("dataset", "synth-waterbirds")
        cfg = _cfg(tiny, **bad)
        cfg.dataset = dataset
        with pytest.raises(ConfigError, match=match) as err:
            resolve_config(cfg)
        assert "\n" not in str(err.value)


def test_the_cli_refuses_a_strength_for_real_data_in_one_line(tmp_path, capsys):
    rc = run_main(["--method", "lora", "--dataset", "celeba", "--spurious-strength", "0.9",
                   "--data-root", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "not to celeba" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.processes
def test_two_process_ddp_records_the_counterfactual_metrics_of_one_process(tiny, tmp_path):
    """Under torchrun (2 CPU processes, gloo) the twins are evaluated sharded and gathered back:
    the recorded core-only accuracy and background reliance equal a single process's (LoRA
    without dropout follows the single-process run step for step)."""
    import os
    import subprocess
    import sys

    tests = Path(__file__).parent
    single_cfg = _cfg(tiny, seed=3, lr=0.05)
    single_cfg.out = str(tmp_path / "one")
    single_cfg.adapter.lora_dropout = 0.0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = run(single_cfg, progress=False, log=lambda _m: None)
    finally:
        torch.set_num_threads(threads)
    args = ["--method", "lora", "--dataset", "synth-waterbirds", "--data-root", tiny["data"],
            "--out", tmp_path / "two", "--backbone", tiny["name"], "--weights", tiny["weights"],
            "--device", "cpu", "--num-workers", "0", "--rank", "2", "--epochs", "2",
            "--batch-size", "8", "--eval-batch-size", "32", "--seed", "3", "--patience", "0",
            "--lr", "0.05", "--lora-dropout", "0", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=f"{tests}{os.pathsep}{tests.parent}",
               RBF_TEST_THREADS="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(28500 + os.getpid() % 1000), str(tests / "tiny_models.py"),
         *map(str, args)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rdir = Path(proc.stdout.strip().splitlines()[-1])
    assert rdir.name == Path(single.run_dir).name  # same settings, same hash
    ddp = json.loads((rdir / "metrics.json").read_text())["counterfactual"]
    one = single.metrics["counterfactual"]
    assert ddp["n_core_only"] == one["n_core_only"] > 0
    assert ddp["n_background_only"] == one["n_background_only"]
    assert ddp["core_only_acc"] == pytest.approx(one["core_only_acc"], abs=1e-9)
    assert ddp["background_pred_dist"] == one["background_pred_dist"]  # per background, in order
    for key in ("background_reliance", "background_reliance_prob"):
        assert ddp[key] == pytest.approx(one[key], abs=1e-4), key
