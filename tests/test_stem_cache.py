"""The frozen-stem feature cache (robustbench_fvae/stem_cache.py): exact at feature level, the same
draws as the uncached path, never stale, and runs on it equal runs without it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from robustbench_fvae.backbones import OFFLINE_BACKBONE, build_offline_vit
from robustbench_fvae.config import ConfigError, RunConfig, config_from_settings, config_hash
from robustbench_fvae.config.resolve import resolve_config, resolve_stem_cache
from robustbench_fvae.data import counterfactual_splits, load_splits, make_transforms
from robustbench_fvae.data.synthetic import build_replica, replica_dir
from robustbench_fvae.run import main as run_main
from robustbench_fvae.stem_cache import (
    CACHE_DIR,
    StemFeatureCache,
    StemFeatureSplit,
    cached_splits,
    counterfactual_inputs,
    frozen_stem,
    stem_digest,
)
from robustbench_fvae.stems import OFFLINE_ARCH, OFFLINE_MEAN, OFFLINE_STD, StemError
from robustbench_fvae.training import SeededAugmentation, run

SIZE = OFFLINE_ARCH["img_size"]


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    """A small synth-waterbirds (40 train, 24 val, 116 test images with their twins) and a
    random offline-ViT weights file (any stem weights show exactness as well as ImageNet's)."""
    base = tmp_path_factory.mktemp("stemcache")
    build_replica("synth-waterbirds", base / "data", scale=0.02, progress=False)
    torch.manual_seed(0)
    weights = base / "vit.safetensors"
    save_file(build_offline_vit(0).state_dict(), str(weights))
    return {"base": base, "data": base / "data", "weights": weights}


def _splits(replica):
    splits = load_splits("synth-waterbirds", replica["data"], build_missing=False)
    train_tf, eval_tf = make_transforms(SIZE, OFFLINE_MEAN, OFFLINE_STD, augment="flip",
                                        family="synth-waterbirds")
    splits["train"].transform = train_tf
    splits["val"].transform = splits["test"].transform = eval_tf
    return splits


def _uncached_stem(stem, split, indices, batch: int = 64) -> torch.Tensor:
    """The stem's output as the uncached path computes it: images through the split's own
    transform, a batch of ``batch`` at a time."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(indices), batch):
            images = torch.stack([split[i][0] for i in indices[start:start + batch]])
            out.append(stem(images))
    return torch.cat(out)


def test_cached_features_equal_the_uncached_stem_feature_by_feature(replica):
    model = build_offline_vit(2)
    stem = frozen_stem(model)
    splits = _splits(replica)
    folder = replica_dir("synth-waterbirds", replica["data"])
    cached = cached_splits(model, "synth-waterbirds", folder, splits)
    assert stem.takes_features
    for name in ("val", "test"):
        plain, feats = splits[name], cached[name]
        assert isinstance(feats, StemFeatureSplit) and list(feats.view_files) == ["original"]
        stem.takes_features = False
        expected = _uncached_stem(stem, plain, list(range(len(plain))))
        got = torch.stack([feats[i][0] for i in range(len(feats))])
        assert torch.equal(got, expected), name  # bit for bit at batch >= 64
        assert [feats[i][1:] for i in range(3)] == [plain[i][1:] for i in range(3)]
    # The training split draws its flip as RandomHorizontalFlip does: seeded items agree.
    stem.takes_features = False
    plain = SeededAugmentation(splits["train"], seed=7)
    feats = SeededAugmentation(cached["train"], seed=7)
    plain.epoch = feats.epoch = 3
    keys = [(p, i) for p, i in enumerate(np.random.default_rng(0).permutation(40))]
    with torch.inference_mode():
        expected = stem(torch.stack([plain[k][0] for k in keys]))
    got = torch.stack([feats[k][0] for k in keys])
    assert torch.equal(got, expected)
    flipped = cached["train"].view("flipped")
    original = cached["train"].view("original")
    assert not np.array_equal(flipped, original)  # both views exist and differ
    # Every twin kind, with the test split's transform.
    twins = counterfactual_inputs("synth-waterbirds", replica["data"], cached["test"], None)
    plain_twins = counterfactual_splits("synth-waterbirds", replica["data"],
                                        transform=splits["test"].transform)
    assert set(twins) == {"core_only", "background_only", "background_swapped"}
    for kind, twin in twins.items():
        expected = _uncached_stem(stem, plain_twins[kind], list(range(len(twin))))
        assert torch.equal(torch.stack([twin[i][0] for i in range(len(twin))]), expected), kind


def test_the_cache_is_keyed_by_stem_transform_and_images_and_never_stale(replica, tmp_path):
    data = tmp_path / "data"
    build_replica("synth-waterbirds", data, scale=0.01, progress=False)
    splits = load_splits("synth-waterbirds", data, build_missing=False)
    _, eval_tf = make_transforms(SIZE, OFFLINE_MEAN, OFFLINE_STD, augment="flip",
                                 family="synth-waterbirds")
    folder = replica_dir("synth-waterbirds", data)
    torch.manual_seed(0)
    stem = frozen_stem(build_offline_vit(0))
    cache = StemFeatureCache(stem, "synth-waterbirds", folder)
    rng = torch.get_rng_state()
    first = cache.wrap(splits["val"], eval_tf)
    # Computing features leaves the global RNG (the run's dropout stream) where it was.
    assert torch.equal(torch.get_rng_state(), rng)
    path = first.view_files["original"]
    assert path.parent == folder / CACHE_DIR / stem_digest(stem)
    assert cache.wrap(splits["val"], eval_tf).view_files == first.view_files  # found, reused
    # The same replica reached through a symlink (another checkout's data/) is the same cache.
    (tmp_path / "link").symlink_to(data, target_is_directory=True)
    linked = load_splits("synth-waterbirds", tmp_path / "link", build_missing=False)
    via_link = StemFeatureCache(stem, "synth-waterbirds", replica_dir("synth-waterbirds",
                                                                      tmp_path / "link"))
    assert via_link.wrap(linked["val"], eval_tf).view_files["original"].resolve() == path
    assert path.is_file()
    # An image rewritten (new bytes, new mtime) gets a new file; the stale one is removed.
    image = Path(splits["val"].paths[0])
    image.write_bytes(image.read_bytes())
    os.utime(image, ns=(1, 1))
    second = cache.wrap(splits["val"], eval_tf).view_files["original"]
    assert second != path and second.is_file() and not path.exists()
    # Another stem (another digest) never reads this one's features.
    torch.manual_seed(1)
    other = frozen_stem(build_offline_vit(0))
    assert stem_digest(other) != stem_digest(stem)
    third = StemFeatureCache(other, "synth-waterbirds", folder).wrap(splits["val"], eval_tf)
    assert third.view_files["original"].parent != second.parent
    # A random crop has no fixed view: refused in one line.
    train_tf, _ = make_transforms(SIZE, OFFLINE_MEAN, OFFLINE_STD, augment="standard",
                                  family="synth-waterbirds")
    with pytest.raises(ValueError, match="random or unknown steps") as err:
        cache.wrap(splits["train"], train_tf)
    assert "\n" not in str(err.value)


def test_a_model_fed_features_refuses_images_in_one_line(replica):
    model = build_offline_vit(2)
    frozen_stem(model).takes_features = True
    with pytest.raises(StemError, match=r"precomputed stem features of shape \(B, 96") as err:
        model(torch.zeros(1, 3, SIZE, SIZE))
    assert "\n" not in str(err.value)


def _cfg(replica, **settings) -> RunConfig:
    base = dict(method="fvae", dataset="synth-waterbirds", backbone=OFFLINE_BACKBONE,
                weights=str(replica["weights"]), data_root=str(replica["data"]),
                out=str(replica["base"] / "out"), device="cpu", num_workers=0, rank=4,
                epochs=2, batch_size=16, eval_batch_size=64, seed=1, patience=0)
    base.update(settings)
    return config_from_settings(base)


def test_the_setting_resolves_per_run_and_only_on_enters_the_hash(replica):
    on = resolve_config(_cfg(replica))
    off = resolve_config(_cfg(replica, stem_cache="off"))
    assert (on.stem_cache, off.stem_cache) == ("on", "off")
    assert config_hash(on) != config_hash(off)
    # A record written before the setting existed has no such key: its hash is the off one's.
    old = off.to_dict()
    del old["stem_cache"]
    assert config_hash(RunConfig.from_dict(old)) == config_hash(off)
    assert resolve_config(_cfg(replica, augment="standard")).stem_cache == "off"
    assert resolve_stem_cache("auto", "waterbirds", OFFLINE_BACKBONE, "flip") == "off"
    with pytest.raises(ConfigError, match="random") as err:
        resolve_config(_cfg(replica, augment="paper", stem_cache="on"))
    assert "\n" not in str(err.value)


def test_the_cli_refuses_an_impossible_stem_cache_with_exit_2(tmp_path, capsys):
    rc = run_main(["--method", "lora", "--dataset", "waterbirds", "--stem-cache", "on",
                   "--data-root", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "real dataset" in err
    assert not (tmp_path / "out").exists()


def test_a_cached_run_equals_the_uncached_run_bit_for_bit(replica):
    """FVAE-LoRA, 2 epochs, same seed, the default batch of 64: the stem's outputs agree bit
    for bit at this batch (and at the epoch's one partial batch of 40), so the cached run
    records exactly the uncached run's numbers. (Batches under 64 can differ by ~1e-11 in the
    stem, which training carries to ~1e-6 in the probabilities.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cached = run(_cfg(replica, batch_size=64), progress=False, log=lambda _m: None)
        plain = run(_cfg(replica, batch_size=64, stem_cache="off"), progress=False,
                    log=lambda _m: None)
    finally:
        torch.set_num_threads(threads)
    assert cached.run_dir != plain.run_dir
    config = json.loads((cached.run_dir / "config.json").read_text())["config"]
    assert config["stem_cache"] == "on"
    for key in ("val", "test", "counterfactual", "selected_epoch", "other_selections"):
        assert cached.metrics[key] == plain.metrics[key], key
    assert "background_swapped_acc" in cached.metrics["counterfactual"]
    for split in ("val", "test"):
        name = f"predictions_{split}.csv"
        assert (cached.run_dir / name).read_bytes() == (plain.run_dir / name).read_bytes()
    history = [json.loads(line) for line in
               (cached.run_dir / "history.jsonl").read_text().splitlines()]
    plain_history = [json.loads(line) for line in
                     (plain.run_dir / "history.jsonl").read_text().splitlines()]
    assert [h["train"] for h in history] == [h["train"] for h in plain_history]


def test_the_timing_benchmark_runs_side_by_side_and_compares_the_metrics(replica, capsys):
    """benchmarks/stem_cache.py on the small replica, one epoch, one round: it times both modes
    and reports whether the runs recorded the same numbers (they do at batch 64). No time is
    asserted: timings belong to the benchmark command, not to tests."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "stem_cache.py"
    spec = importlib.util.spec_from_file_location("bench_stem_cache", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.build_parser().parse_args([
        "--data-root", str(replica["data"]), "--weights", str(replica["weights"]),
        "--epochs", "1", "--rounds", "1", "--setting", "rank=4", "--setting", "patience=0"])
    result = bench.measure(args)
    assert result["same_metrics"] is True
    (only,) = result["rounds"]
    assert only["order"] == ["on", "off"] and only["cached_wall_s"] > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert bench.main(["--setting", "rank"]) == 2
