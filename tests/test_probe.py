"""Latent analysis: pooling, subsampling, layer choice, extraction from a real tiny ViT, linear
probes on planted signals, t-SNE figures, and the ``probe`` CLI end to end on a real tiny run."""

from __future__ import annotations

import csv
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from threadpoolctl import threadpool_limits

from robustbench_fvae import probe as probe_cli
from robustbench_fvae.analysis.latents import (
    DEFAULT_MAX_IMAGES,
    LatentSet,
    LayerError,
    PoolError,
    default_layers,
    extract_block_features,
    extract_latents,
    pool_tokens,
    select_layers,
    stratified_subsample,
)
from robustbench_fvae.analysis.probe_plot import probe_accuracy_plot
from robustbench_fvae.analysis.probes import (
    CSV_COLUMNS,
    ProbeError,
    add_information,
    balance_weights,
    chance_level,
    collapse_stats,
    format_table,
    group_balanced_accuracy,
    majority_rate,
    probe_latents,
    run_probe,
    write_probes_csv,
)
from robustbench_fvae.analysis.tsne import (
    ATTRIBUTE_COLOURS,
    DEFAULT_TSNE_MAX,
    LABEL_COLOURS,
    figure_name,
    plot_tsne,
    tsne_embedding,
)
from robustbench_fvae.backbones import OFFLINE_ARCH
from robustbench_fvae.config import AdapterConfig
from robustbench_fvae.data.base import Group, GroupSplit
from robustbench_fvae.data.transforms import make_transforms
from robustbench_fvae.methods.setup import inject_method


@pytest.fixture(autouse=True)
def _one_blas_thread():
    # Small scikit-learn fits and t-SNE spin-wait in OpenMP/BLAS threads; on a busy 2-core
    # machine that makes them 10-20x slower than one thread.
    with threadpool_limits(1):
        yield


# ---------------------------------------------------------------- metrics by hand


def test_group_balanced_accuracy_matches_hand_computation():
    target = np.array([0, 0, 1, 1, 1, 0, 1])
    pred = np.array([0, 1, 1, 1, 0, 0, 0])
    g = np.array([0, 0, 3, 3, 3, 1, 2])
    # group 0: 1/2, group 1: 1/1, group 2: 0/1, group 3: 2/3 → mean over the 4 groups
    expected = (0.5 + 1.0 + 0.0 + 2 / 3) / 4
    assert group_balanced_accuracy(target, pred, g) == pytest.approx(expected)
    # plain accuracy would be 4/7 ≠ the group-balanced value
    assert np.mean(target == pred) != pytest.approx(expected)
    # constant 0 is right in groups 0 and 1, constant 1 in groups 2 and 3 → 2/4 either way;
    # with group 1 now holding a 1 instead, constant 1 is right in 3 of 4 groups
    assert chance_level(target, g) == pytest.approx(0.5)
    assert chance_level(np.array([0, 0, 1, 1, 1, 1, 1]), g) == pytest.approx(0.75)
    assert majority_rate(target) == pytest.approx(4 / 7)
    with pytest.raises(ProbeError):
        group_balanced_accuracy(target, pred[:-1], g)


# ---------------------------------------------------------------- pooling


def test_pooling_on_a_hand_made_tensor():
    tokens = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    cls = pool_tokens(tokens, "cls")
    mean = pool_tokens(tokens, "mean")
    both = pool_tokens(tokens, "both")
    assert torch.equal(cls, torch.tensor([[0.0, 1, 2], [12, 13, 14]]))
    # mean over the 3 patch tokens only (CLS excluded): rows 1..3 of each image
    assert torch.allclose(mean, torch.tensor([[6.0, 7, 8], [18, 19, 20]]))
    assert torch.equal(both, torch.cat([cls, mean], dim=1)) and both.shape == (2, 6)
    # a register token after CLS is excluded from the mean as well
    assert torch.allclose(
        pool_tokens(tokens, "mean", num_prefix_tokens=2),
        torch.tensor([[7.5, 8.5, 9.5], [19.5, 20.5, 21.5]]),
    )
    with pytest.raises(PoolError, match="class token"):
        pool_tokens(tokens, "cls", num_prefix_tokens=0, has_class_token=False)
    with pytest.raises(PoolError, match="accepted"):
        pool_tokens(tokens, "max")
    flat = torch.ones(2, 3)
    assert pool_tokens(flat, "mean") is flat


# ---------------------------------------------------------------- subsampling and layers


def test_stratified_subsample_keeps_proportions_and_rare_groups():
    g = np.repeat([0, 1, 2, 3], [5000, 300, 60, 2000])
    idx = stratified_subsample(g, 1000, seed=1)
    assert len(idx) == 1000 and len(np.unique(idx)) == 1000 and np.all(np.diff(idx) > 0)
    counts = np.bincount(g[idx], minlength=4)
    assert counts[2] >= 25  # floor for the rare group (proportional share alone would be 8)
    assert abs(counts[0] / counts[3] - 2.5) < 0.15  # the big groups keep their ratio
    assert np.array_equal(idx, stratified_subsample(g, 1000, seed=1))
    assert not np.array_equal(idx, stratified_subsample(g, 1000, seed=2))
    assert np.array_equal(stratified_subsample(g, None), np.arange(len(g)))
    assert np.array_equal(stratified_subsample(g, 10**6), np.arange(len(g)))


def test_layer_selection_by_name_module_index_and_default():
    avail = [f"blocks.{i}.attn.qkv:{k}" for i in range(12) for k in "qk"]
    assert default_layers(avail) == [
        "blocks.0.attn.qkv:q",
        "blocks.0.attn.qkv:k",
        "blocks.6.attn.qkv:q",
        "blocks.6.attn.qkv:k",
        "blocks.11.attn.qkv:q",
        "blocks.11.attn.qkv:k",
    ]
    assert select_layers(avail, None) == default_layers(avail)
    assert select_layers(avail, "0,5,-1") == [avail[0], avail[5], avail[-1]]
    assert select_layers(avail, "blocks.3.attn.qkv") == [
        "blocks.3.attn.qkv:q",
        "blocks.3.attn.qkv:k",
    ]
    assert select_layers(avail, "blocks.2.attn.qkv:k, 4,4") == [avail[5], avail[4]]
    assert select_layers(avail, "all") == avail
    assert select_layers(avail[:4], None) == avail[:4]
    with pytest.raises(LayerError, match="available layers: blocks.0.attn.qkv:q"):
        select_layers(avail, "blocks.99.attn.qkv:q")
    with pytest.raises(LayerError, match="0..23"):
        select_layers(avail, "24")
    with pytest.raises(LayerError, match="no adapted layers"):
        select_layers([], None)


# ---------------------------------------------------------------- probes on planted signals


def _planted(n: int, rng: np.random.Generator, agree: float):
    """Binary y, and a equal to y with probability ``agree`` (a spurious correlation)."""
    y = rng.integers(0, 2, n)
    a = np.where(rng.random(n) < agree, y, 1 - y)
    g = 2 * y + a
    noise = rng.normal(size=(n, 8))
    z1 = noise.copy()
    z1[:, 0] += 3.0 * (2 * y - 1)  # z1 carries y on one axis
    z2 = rng.normal(size=(n, 8))
    z2[:, 3] += 3.0 * (2 * a - 1)  # z2 carries a
    return y, a, g, z1, z2, rng.normal(size=(n, 8))


def test_probes_recover_planted_signals_and_noise_gives_chance():
    rng = np.random.default_rng(0)
    # train and test both spuriously correlated (a = y 85% of the time), like CelebA's test split
    tr = _planted(800, rng, 0.85)
    te = _planted(800, rng, 0.85)
    fit = {}
    for name, col in (("z1", 3), ("z2", 4), ("noise", 5)):
        for target, t in (("y", 0), ("a", 1)):
            fit[name, target] = run_probe(
                tr[col], tr[t], tr[2], te[col], te[t], te[2], n_folds=3, seed=0
            )
    assert fit["z1", "y"].acc > 0.95 and fit["z2", "a"].acc > 0.95
    # z1 carries nothing of a but through y; under group weights a and y are independent, so the
    # probe finds nothing: chance on both metrics
    assert abs(fit["z1", "a"].acc - 0.5) < 0.06 and abs(fit["z2", "y"].acc - 0.5) < 0.06
    assert abs(fit["z1", "a"].plain_acc - 0.5) < 0.08
    # class-balanced only, the probe of a reads y: right in the 2 majority groups, wrong in the 2
    # minority ones (group-balanced ≈ 0.5), which plain accuracy on the correlated test split
    # hides (≈ 0.85)
    rides = run_probe(tr[3], tr[1], tr[2], te[3], te[1], te[2], n_folds=3, seed=0,
                      weighting="class")
    assert abs(rides.acc - 0.5) < 0.06 and rides.plain_acc > 0.78
    assert rides.weighting == "class" and fit["z1", "a"].weighting == "group"
    for target in ("y", "a"):
        r = fit["noise", target]
        assert abs(r.acc - 0.5) < 0.06, r
        assert r.chance == pytest.approx(0.5)
        assert r.n_fit == 800 and r.n_test == 800 and r.dim == 8
        assert r.C in (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
    # a single-valued target cannot be probed
    with pytest.raises(ProbeError, match="one value"):
        run_probe(tr[3], np.zeros(800, int), tr[2], te[3], te[0], te[2])


def test_balance_weights_equalise_groups_or_classes():
    t = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    g = np.array([0, 0, 0, 0, 0, 1, 2, 3])
    w = balance_weights(t, g, "group")
    assert w.mean() == pytest.approx(1.0)
    assert [w[g == k].sum() for k in range(4)] == pytest.approx([2.0] * 4)
    w = balance_weights(t, g, "class")
    assert [w[t == k].sum() for k in (0, 1)] == pytest.approx([4.0, 4.0])
    with pytest.raises(ProbeError, match="accepted: group, class"):
        balance_weights(t, g, "none")


def _two_latents(y: np.ndarray, a: np.ndarray, rng: np.random.Generator):
    """L1: a strong y axis (3σ) and a weak a axis (0.75σ); L2 the mirror image."""
    n = len(y)
    l1 = rng.normal(size=(n, 2))
    l1[:, 0] += 3.0 * (2 * y - 1)
    l1[:, 1] += 0.75 * (2 * a - 1)
    l2 = rng.normal(size=(n, 2))
    l2[:, 0] += 3.0 * (2 * a - 1)
    l2[:, 1] += 0.75 * (2 * y - 1)
    return l1, l2


def test_group_weights_keep_each_probe_on_its_own_target_under_95pct_correlation():
    """Training split: a = y for 95 % of the images; test split: four equal groups. Each latent
    carries one target strongly and the other weakly (0.75σ: a Bayes accuracy of Φ(0.75) =
    0.773). Class-balanced, the probe of the weak target rides the strong one, which agrees
    with it on 95 % of the fit data, and fails the minority groups; group-balanced, the strong
    axis carries nothing of the other target and the probe recovers the weak target's own
    signal."""
    rng = np.random.default_rng(0)
    n = 4000
    y_tr = rng.integers(0, 2, n)
    a_tr = np.where(rng.random(n) < 0.95, y_tr, 1 - y_tr)
    l1_tr, l2_tr = _two_latents(y_tr, a_tr, rng)
    y_te = np.repeat([0, 0, 1, 1], 500)
    a_te = np.tile(np.repeat([0, 1], 500), 2)
    l1_te, l2_te = _two_latents(y_te, a_te, rng)
    g_tr, g_te = 2 * y_tr + a_tr, 2 * y_te + a_te
    bayes = 0.773
    for X_tr, X_te, t_tr, t_te in ((l1_tr, l1_te, a_tr, a_te), (l2_tr, l2_te, y_tr, y_te)):
        res = {w: run_probe(X_tr, t_tr, g_tr, X_te, t_te, g_te, n_folds=3, seed=0, weighting=w)
               for w in ("class", "group")}
        assert abs(res["group"].acc - bayes) < 0.04, res["group"]
        assert res["class"].acc < 0.65, res["class"]
        assert res["group"].acc - res["class"].acc > 0.15
        assert res["group"].chance == res["class"].chance == 0.5
    # The strong targets are read off either way.
    for w in ("class", "group"):
        assert run_probe(l1_tr, y_tr, g_tr, l1_te, y_te, g_te, n_folds=3, weighting=w).acc > 0.99


def test_collapse_checks_flag_a_constant_or_near_constant_latent():
    rng = np.random.default_rng(0)
    n = 400
    y = np.repeat([0, 1], n // 2)
    a = np.tile([0, 1], n // 2)
    live = rng.normal(size=(n, 4))
    live[:, 0] += 2.0 * (2 * y - 1)
    live[:, 3] *= 0.05  # variance 0.0025: not an active unit
    stats = collapse_stats(live)
    assert stats["pooled_active_units"] == 3 and not stats["pooled_collapsed"]
    assert stats["std_min"] == pytest.approx(live[:, 3].std())
    assert stats["std_median"] == pytest.approx(np.median(live.std(0)))
    assert np.isnan(stats["sigma"])
    const = collapse_stats(np.full((n, 4), 1.5), sigma=0.8)
    assert const == {"std_median": 0.0, "std_min": 0.0, "pooled_active_units": 0, "sigma": 0.8,
                     "pooled_collapsed": True}
    # Tiny variation that still carries y: the probe scores well after standardisation, which
    # is why a collapsed latent is flagged rather than read as informative.
    faint = 1.5 + 1e-3 * rng.normal(size=(n, 4))
    faint[:, 0] += 0.01 * (2 * y - 1)
    features = {("blocks.0.attn.qkv:q", "z1"): live, ("blocks.0.attn.qkv:q", "z2"): faint,
                ("blocks.0.attn.qkv:k", "z2"): np.full((n, 4), 1.5)}
    split = LatentSet("train", "mean", np.arange(n), y, a, 2 * y + a, features)
    test = LatentSet("test", "mean", np.arange(n), y, a, 2 * y + a, features,
                     {("blocks.0.attn.qkv:q", "z1"): 0.3})
    rows = probe_latents(split, test, n_folds=2)
    by = {(r["layer"], r["latent"], r["target"]): r for r in rows}
    faint_y = by["blocks.0.attn.qkv:q", "z2", "y"]
    assert faint_y["acc"] > 0.95 and faint_y["pooled_collapsed"]
    assert faint_y["pooled_active_units"] == 0
    assert by["blocks.0.attn.qkv:k", "z2", "a"]["pooled_collapsed"]
    assert not by["blocks.0.attn.qkv:q", "z1", "y"]["pooled_collapsed"]
    assert by["blocks.0.attn.qkv:q", "z1", "a"]["sigma"] == 0.3
    assert {r["fit_split"] for r in rows} == {"train"} and {r["weighting"] for r in rows} == {
        "group"}
    # The verdict is the token-level one: only latents the information summary calls collapsed
    # are marked, whatever their pooled spread.
    summary = [{"split": "test", "layer": "blocks.0.attn.qkv:q", "latent": "z2",
                "active_units": 0, "data": 0.001, "collapsed": True},
               {"split": "test", "layer": "blocks.0.attn.qkv:q", "latent": "z1",
                "active_units": 4, "data": 2.0, "collapsed": False}]
    table = format_table(add_information(rows, summary)).splitlines()
    flagged = [line for line in table if line.endswith("COLLAPSED")]
    assert len(flagged) == 1 and " z2 " in flagged[0]
    assert "4/4" in table[2] and "3/4" in table[2] and "0.300" in table[2]


def test_probes_csv_and_table(tmp_path):
    rows = [
        {
            "layer": "blocks.0.attn.qkv:q",
            "latent": lat,
            "target": t,
            "acc": acc,
            "plain_acc": acc,
            "chance": 0.5,
            "plain_chance": 0.6,
            "cv_acc": float("nan"),
            "C": 1.0,
            "n_fit": 10,
            "n_test": 8,
            "dim": 4,
            "pool": "mean",
            "fit_split": "val",
            "weighting": "group",
            "std_median": 0.5,
            "std_min": 0.0 if lat == "z2" else 0.2,
            "pooled_active_units": 0 if lat == "z2" else 3,
            "pooled_collapsed": lat == "z2",
            "sigma": 0.25 if lat == "z1" else float("nan"),
            "acc_input": 0.99, "acc_random": 0.8, "acc_init": 0.5, "learned": acc - 0.8,
            "active_units": 0 if lat == "z2" else 4, "data_kl": 0.001 if lat == "z2" else 1.5,
            "collapsed": lat == "z2",
        }
        for lat, t, acc in (
            ("z1", "y", 0.9),
            ("z1", "a", 0.51),
            ("z2", "y", 0.55),
            ("z2", "a", 0.97),
        )
    ]
    path = write_probes_csv(rows, tmp_path / "probes.csv")
    with open(path, newline="") as f:
        read = list(csv.DictReader(f))
    assert tuple(read[0]) == CSV_COLUMNS and CSV_COLUMNS[:4] == ("layer", "latent", "target", "acc")
    assert [(r["latent"], r["target"], float(r["acc"])) for r in read] == [
        ("z1", "y", 0.9),
        ("z1", "a", 0.51),
        ("z2", "y", 0.55),
        ("z2", "a", 0.97),
    ]
    assert read[0]["cv_acc"] == "" and read[2]["sigma"] == ""
    assert (read[0]["fit_split"], read[0]["weighting"], read[0]["collapsed"]) == (
        "val", "group", "False")
    assert read[2]["collapsed"] == "True" and read[0]["pooled_active_units"] == "3"
    assert read[0]["active_units"] == "4" and float(read[0]["learned"]) == pytest.approx(0.1)
    table = format_table(rows).splitlines()
    assert "acc(y)" in table[0] and "learned(y)" in table[0] and "active" in table[0]
    assert table[2].split()[-8:] == ["z1", "0.900", "0.510", "+0.100", "4/4", "1.500", "3/4",
                                     "0.250"]
    assert table[3].split()[:7] == ["z2", "0.550", "0.970", "-0.250", "0/4", "0.001", "0/4"]
    assert "COLLAPSED" in table[3] and "COLLAPSED" not in table[2]
    assert table[-2].split()[-2:] == ["0.500", "0.500"]
    assert table[-1].startswith("active = units whose token-level")
    # The figure: written, and taller with the collapse panel than without it.
    with_checks = probe_accuracy_plot(rows, tmp_path / "probes.png", "t")
    plain = [{k: v for k, v in r.items() if k in CSV_COLUMNS[:15]} for r in rows]
    without = probe_accuracy_plot(plain, tmp_path / "plain.png", "t")
    with Image.open(with_checks) as img, Image.open(without) as img2:
        assert img.size[1] > img2.size[1] > 400


# ---------------------------------------------------------------- t-SNE


def test_tsne_figure_is_written_and_shows_points(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 40)
    a = np.tile([0, 1], 40)
    X = rng.normal(size=(80, 60)) + 4.0 * y[:, None]
    emb = tsne_embedding(X, seed=0)
    assert emb.shape == (80, 2) and np.isfinite(emb).all()
    assert np.array_equal(emb, tsne_embedding(X, seed=0))  # seeded
    # the planted y split shows in the map: the class means are far apart relative to spread
    gap = np.linalg.norm(emb[y == 0].mean(0) - emb[y == 1].mean(0))
    assert gap > 2 * emb[y == 0].std(0).mean()
    path = plot_tsne(
        emb,
        y,
        a,
        ["landbird", "waterbird"],
        ["land", "water"],
        "a title",
        tmp_path / figure_name("blocks.0.attn.qkv:q", "z1"),
    )
    assert path.name == "tsne_blocks.0.attn.qkv-q_z1.png" and path.stat().st_size > 10_000
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("RGB"), dtype=np.float32)
    assert pixels.shape[1] > pixels.shape[0] > 400  # two panels side by side
    assert pixels.std() > 10  # not blank
    assert not list(tmp_path.glob("*.tmp*"))
    # One colour meaning per figure: no colour marks a class on the left and an attribute on
    # the right (Animals has 4 of each).
    assert len(set(LABEL_COLOURS[:4]) | set(ATTRIBUTE_COLOURS[:4])) == 8
    left, right = pixels[:, : pixels.shape[1] // 2], pixels[:, pixels.shape[1] // 2:]

    def has(colour: str, part: np.ndarray) -> bool:
        """Pixels of ``colour`` as drawn: at alpha 0.7 on white (a lone dot or a legend mark)."""
        rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.float32)
        drawn = 0.7 * rgb + 0.3 * 255.0
        return bool((np.abs(part - drawn).max(-1) < 6).sum() > 20)

    assert has(LABEL_COLOURS[0], left) and not has(LABEL_COLOURS[0], right)
    assert has(ATTRIBUTE_COLOURS[0], right) and not has(ATTRIBUTE_COLOURS[0], left)


# ---------------------------------------------------------------- extraction from a real tiny ViT


def _tiny_split(root, n: int = 12) -> GroupSplit:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    y = np.arange(n) % 2
    a = (np.arange(n) // 2) % 2
    groups = [Group(2 * yy + aa, yy, aa, f"g{2 * yy + aa}") for yy in (0, 1) for aa in (0, 1)]
    _, eval_tf = make_transforms(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    return GroupSplit(
        dataset_name="tiny",
        split="test",
        paths=paths,
        y=y,
        a=a,
        g=2 * y + a,
        class_names=["c0", "c1"],
        attribute_names=["a0", "a1"],
        groups=groups,
        n_groups=4,
        train_group_counts=np.ones(4, int),
        transform=eval_tf,
    )


def _tiny_vit(method: str):
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=2
    )
    inject_method(model, method, AdapterConfig(rank=4, targets=("q", "k")))
    for p in model.parameters():  # move the zero-initialised heads off zero: real codes
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.3)
    return model.eval()


@pytest.mark.parametrize("pool", ["mean", "cls", "both"])
def test_extract_latents_matches_a_manual_forward(tmp_path, pool):
    split = _tiny_split(tmp_path)
    model = _tiny_vit("fvae")
    idx = np.array([1, 4, 5, 9, 10])
    got = extract_latents(
        model, split, ["blocks.1.attn.qkv:k"], pool=pool, indices=idx, batch_size=2
    )
    assert list(got.features) == [("blocks.1.attn.qkv:k", "z1"), ("blocks.1.attn.qkv:k", "z2"),
                                  ("blocks.1.attn.qkv", "backbone")]
    assert np.array_equal(got.y, split.y[idx]) and np.array_equal(got.g, split.g[idx])
    # the same codes by hand: the tokens entering block 1's qkv are norm1 of block 0's output
    images = torch.stack([split[i][0] for i in idx])
    with torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        x = model.blocks[0](x)
        tokens = model.blocks[1].norm1(x)
        adapter = model.blocks[1].attn.qkv.adapters["k"]
        codes = {
            "backbone": tokens,
            "z1": adapter.encoder1.mean_only(tokens),
            "z2": adapter.encoder2.mean_only(tokens),
        }
        sigmas = {k: (0.5 * adapter.get_submodule(f"encoder{k[1]}")(tokens)[1]).exp()
                  for k in ("z1", "z2")}
    width = {"backbone": 192, "z1": 4, "z2": 4}
    pooled = {"mean": lambda t: t[:, 1:].mean(1), "cls": lambda t: t[:, 0],
              "both": lambda t: torch.cat([t[:, 0], t[:, 1:].mean(1)], 1)}[pool]
    for kind, sigma in sigmas.items():  # mean over images, pooled tokens and dims
        assert got.sigma[("blocks.1.attn.qkv:k", kind)] == pytest.approx(
            float(pooled(sigma).mean()), rel=1e-5)
    for kind, t in codes.items():
        layer = "blocks.1.attn.qkv" if kind == "backbone" else "blocks.1.attn.qkv:k"
        feat = got.features[(layer, kind)]
        expect = {
            "mean": t[:, 1:].mean(1),
            "cls": t[:, 0],
            "both": torch.cat([t[:, 0], t[:, 1:].mean(1)], 1),
        }[pool]
        assert feat.shape == (5, width[kind] * (2 if pool == "both" else 1))
        np.testing.assert_allclose(feat, expect.numpy(), rtol=1e-4, atol=1e-5)


def test_extract_lora_latents_and_unknown_layer(tmp_path):
    split = _tiny_split(tmp_path, n=6)
    model = _tiny_vit("lora")
    got = extract_latents(model, split, None, batch_size=4)
    assert sorted({k for _, k in got.features}) == ["backbone", "lora"]
    # per module: its slices' codes, then the module's input once
    assert got.pairs()[:3] == [("blocks.0.attn.qkv:q", "lora"), ("blocks.0.attn.qkv:k", "lora"),
                               ("blocks.0.attn.qkv", "backbone")]
    assert got.sigma == {}
    assert got.features[("blocks.0.attn.qkv:q", "lora")].shape == (6, 4)
    with pytest.raises(LayerError, match="available"):
        extract_latents(model, split, ["blocks.7.attn.qkv:q"])


def test_cli_defaults_match_the_library():
    assert probe_cli.DEFAULT_MAX_IMAGES == DEFAULT_MAX_IMAGES
    assert probe_cli.DEFAULT_TSNE_MAX == DEFAULT_TSNE_MAX


# ---------------------------------------------------------------- the CLI on a real tiny run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished fvae run of one epoch on a Waterbirds-layout replica stand-in with the offline
    ViT architecture loaded from a local weights file."""
    from tiny_models import make_offline_runs

    root = tmp_path_factory.mktemp("probe_run")
    return make_offline_runs(root, [("fvae", 0)])[("fvae", 0)]


def test_probe_cli_end_to_end(tiny_run, tmp_path, capsys):
    out = tmp_path / "probe"
    rc = probe_cli.main([str(tiny_run), "--layers", "blocks.0.attn.qkv,-1", "--max-images", "10",
                         "--tsne-max", "9", "--device", "cpu", "--no-progress", "--jobs", "1",
                         "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    with open(out / "probes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:4] == ["layer", "latent", "target", "acc"]
    last = f"blocks.{OFFLINE_ARCH['depth'] - 1}.attn.qkv"
    # q and k of one module read the same input: its backbone features are probed once, under
    # the module's name, after the module's slices
    codes = ("z1", "z2", "update", "z1_init", "z2_init")
    expected = [*((f"blocks.0.attn.qkv:{s}", c) for s in "qk" for c in codes),
                ("blocks.0.attn.qkv", "random"), ("blocks.0.attn.qkv", "backbone"),
                *((f"{last}:k", c) for c in codes), (last, "random"), (last, "backbone")]
    assert [(r["layer"], r["latent"], r["target"]) for r in rows] == [
        (layer, latent, target) for layer, latent in expected for target in ("y", "a")]
    widths = {"backbone": OFFLINE_ARCH["embed_dim"], "update": OFFLINE_ARCH["embed_dim"]}
    for r in rows:
        assert 0.0 <= float(r["acc"]) <= 1.0 and 0.0 <= float(r["plain_acc"]) <= 1.0
        assert float(r["chance"]) == 0.5  # two values per target, every test group present
        # capped at 10 per split, every group kept: 15 train → 10, 12 test → 10
        assert (r["n_fit"], r["n_test"], r["pool"]) == ("10", "10", "mean")
        assert (r["fit_split"], r["weighting"]) == ("train", "group")
        width = widths.get(r["latent"], 4)
        assert r["dim"] == str(width)
        assert 0 <= int(r["pooled_active_units"]) <= width
        assert float(r["std_min"]) <= float(r["std_median"])
        posterior = r["latent"] in ("z1", "z2")
        # token-level verdict and posterior σ for z1/z2 only
        assert (r["active_units"] != "") == posterior == (r["sigma"] != "")
        if posterior:
            assert 0 <= int(r["active_units"]) <= 4 and float(r["sigma"]) > 0
            assert int(r["active_units"]) == 0 or r["collapsed"] == "False"
        else:
            assert r["collapsed"] == "False"
        # every row carries its controls; the learned margin is against the random control
        module = r["layer"].split(":")[0]
        random_acc = next(float(x["acc"]) for x in rows if x["layer"] == module
                          and x["latent"] == "random" and x["target"] == r["target"])
        assert float(r["learned"]) == pytest.approx(float(r["acc"]) - random_acc, abs=1e-5)
        # the FVAE mean heads start at zero: the codes at initialisation are constant
        if r["latent"] in ("z1_init", "z2_init"):
            assert float(r["acc"]) == 0.5 and r["pooled_active_units"] == "0"
        if r["latent"] == "z1":
            assert r["acc_init"] == "0.5"
    tsne_keys = [k for k in expected if k[1] in ("z1", "z2", "backbone")]
    figures = sorted(out.glob("tsne_*.png"))
    assert len(figures) == len(tsne_keys) and all(f.stat().st_size > 10_000 for f in figures)
    assert (out / f"tsne_{last}-k_z2.png") in figures
    assert (out / f"tsne_{last}_backbone.png") in figures
    assert "acc(y)" in printed and "group-balanced" in printed and str(out) in printed
    assert "active" in printed and "fitted on train" in printed
    meta = json.loads((out / "probe.json").read_text())
    assert (meta["fit_split"], meta["weighting"], meta["n_fit"]) == ("train", "group", 10)
    assert [(c["layer"], c["latent"]) for c in meta["collapse"]] == expected
    assert all(set(c) >= {"active_units", "pooled_active_units", "std_median", "std_min",
                          "sigma", "collapsed", "data_kl"} for c in meta["collapse"])
    # the evidence files, and the per-layer loss parts the run logged
    assert meta["evidence"] == ["information.csv", "information_summary.csv", "updates.csv",
                                "interventions.csv"]
    with open(out / "information_summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert {(r["split"], r["layer"], r["latent"]) for r in summary} == {
        (split, layer, latent) for split in ("val", "test") for layer, latent in expected
        if latent in ("z1", "z2")}
    with open(out / "interventions.csv", newline="") as f:
        done = {(r["target"], r["intervention"]) for r in csv.DictReader(f)}
    # no twins on this stand-in: zero, mean and sampled per slice, per block and for all
    assert done == {(t, k) for t in ("blocks.0.attn.qkv:q", "blocks.0.attn.qkv:k", f"{last}:k",
                                     "blocks.0", "all") for k in ("zero", "mean", "sampled")}
    assert (out / "loss_parts.png").stat().st_size > 10_000 and "loss_parts.png" in meta[
        "figures"]
    assert (out / "probes.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "probes.png").stat().st_size > 10_000


def test_probe_cli_fits_on_val_with_class_weights(tiny_run, tmp_path, capsys):
    out = tmp_path / "probe_val"
    rc = probe_cli.main([str(tiny_run), "--layers", "0", "--max-images", "10", "--tsne-max", "0",
                         "--device", "cpu", "--no-progress", "--jobs", "1", "--fit-split", "val",
                         "--weighting", "class", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    with open(out / "probes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["fit_split"], r["weighting"]) for r in rows} == {("val", "class")}
    assert "fitted on val" in printed
    with pytest.raises(SystemExit) as info:
        probe_cli.main([str(tiny_run), "--fit-split", "test"])
    assert info.value.code == 2
    capsys.readouterr()


def test_probe_cli_refuses_bad_input_in_one_line(tiny_run, tmp_path, capsys):
    rc = probe_cli.main([str(tiny_run), "--layers", "blocks.9.attn.qkv:q", "--device", "cpu",
                         "--no-progress", "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    last = f"blocks.{OFFLINE_ARCH['depth'] - 1}.attn.qkv:k"
    assert "unknown layer 'blocks.9.attn.qkv:q'" in err and last in err
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((tiny_run / "config.json").read_text())
    for path, says in ((unfinished, "not a finished run"), (tmp_path, "not a run directory"),
                       (tmp_path / "nope", "run directory not found")):
        assert probe_cli.main([str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err, err


def test_block_features_match_a_manual_forward(tmp_path):
    split = _tiny_split(tmp_path, n=6)
    model = _tiny_vit("lora")  # adapters are ignored: only block outputs are read
    idx = np.array([0, 2, 5])
    got = extract_block_features(model, split, pool="both", indices=idx, batch_size=2)
    assert [k for k, _ in got.pairs()] == ["blocks.0", "blocks.1", "norm"]
    images = torch.stack([split[i][0] for i in idx])
    with torch.no_grad():
        final = model.forward_features(images)
        first = model.blocks[0](model.norm_pre(model._pos_embed(model.patch_embed(images))))
    for name, tokens in (("norm", final), ("blocks.0", first)):
        expect = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], 1).numpy()
        np.testing.assert_allclose(got.features[(name, "backbone")], expect, rtol=1e-4,
                                   atol=1e-5)
    assert np.array_equal(got.a, split.a[idx])


def test_probe_cli_on_a_frozen_backbone(tiny_run, tmp_path, capsys):
    root = tiny_run.parents[3]  # OUT/<dataset>/<method>/<hash>, OUT = root/out
    out = tmp_path / "frozen"
    rc = probe_cli.main(["--dataset", "synth-waterbirds", "--data-root", str(root / "data"),
                         "--weights", str(root / "vit.safetensors"), "--max-images", "10",
                         "--tsne-max", "0", "--device", "cpu", "--no-progress", "--jobs", "1",
                         "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    with open(out / "probes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    layers = [f"blocks.{i}" for i in range(OFFLINE_ARCH["depth"])] + ["norm"]
    assert [(r["layer"], r["latent"], r["target"]) for r in rows] == [
        (layer, "backbone", t) for layer in layers for t in ("y", "a")]
    assert {r["dim"] for r in rows} == {str(OFFLINE_ARCH["embed_dim"])}
    assert "frozen rbf_vit_offline on synth-waterbirds" in printed
    assert printed.strip().splitlines()[-1] == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["probe.json", "probes.csv", "probes.png"]


def test_probe_cli_refuses_mixed_or_bad_targets(tiny_run, tmp_path, capsys):
    for argv in ([str(tiny_run), "--dataset", "synth-waterbirds"], [],
                 [str(tiny_run), "--weights", "w.pt"],
                 ["--dataset", "synth-waterbirds", "--layers", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            probe_cli.main(argv)
        assert exit_info.value.code == 2
    capsys.readouterr()
    rc = probe_cli.main(["--dataset", "waterbird", "--data-root", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "waterbirds" in err, err


# ---------------------------------------------------------------- counterfactual sensitivity


def _planted_images(n: int, rng: np.random.Generator):
    """Images as [core | background] vectors (16 + 16 values): the core is one of two
    silhouette prototypes (by y), the background one of two textures (by a), both with noise.
    Returns the images and their core-only (background set to a neutral 0) and
    background-only (core set to 0) twins."""
    y = rng.integers(0, 2, n)
    a = rng.integers(0, 2, n)
    protos, textures = rng.normal(size=(2, 16)), rng.normal(size=(2, 16))
    core = protos[y] + 0.3 * rng.normal(size=(n, 16))
    back = textures[a] + 0.3 * rng.normal(size=(n, 16))
    zeros = np.zeros((n, 16))
    return (np.hstack([core, back]), np.hstack([core, zeros]), np.hstack([zeros, back]))


def test_mean_pairwise_distance_equals_scipy():
    from scipy.spatial.distance import pdist

    from robustbench_fvae.analysis import sensitivity

    X = np.random.default_rng(0).normal(size=(1100, 5))  # more rows than one block
    assert sensitivity.mean_pairwise_distance(X) == pytest.approx(pdist(X).mean(), rel=1e-9)


def test_sensitivity_of_planted_encoders(tmp_path):
    """An encoder that reads only the silhouette does not move when the background is removed
    (ratio inf) and moves when the silhouette is; one that reads only the background is the
    mirror image (ratio 0); a mixed one gives the hand-computed ratio."""
    from scipy.spatial.distance import pdist

    from robustbench_fvae.analysis.sensitivity import (
        counterfactual_sensitivity,
        format_sensitivity_table,
        sensitivity_rows,
        write_sensitivity_csv,
    )

    rng = np.random.default_rng(0)
    images, core_only, background_only = _planted_images(400, rng)
    W = rng.normal(size=(16, 8))
    readers = {
        "silhouette": lambda x: x[:, :16] @ W,
        "background": lambda x: x[:, 16:] @ W,
        "both": lambda x: np.hstack([x[:, :16] @ W, 0.5 * x[:, 16:] @ W]),
    }
    got = {name: counterfactual_sensitivity(f(images), f(core_only), f(background_only))
           for name, f in readers.items()}
    s = got["silhouette"]
    assert s["shift_core_only"] == 0.0 and s["ratio"] == math.inf
    spread = pdist(images[:, :16] @ W).mean()
    expect = np.linalg.norm(images[:, :16] @ W, axis=1).mean() / spread
    assert s["shift_background_only"] == pytest.approx(expect, rel=1e-9) and expect > 0.5
    b = got["background"]
    assert b["shift_background_only"] == 0.0 and b["ratio"] == 0.0 and b["shift_core_only"] > 0.5
    f = readers["both"]
    codes = f(images)
    spread = pdist(codes).mean()
    core = np.linalg.norm(codes - f(core_only), axis=1).mean() / spread
    bg = np.linalg.norm(codes - f(background_only), axis=1).mean() / spread
    m = got["both"]
    assert (m["shift_core_only"], m["shift_background_only"]) == (
        pytest.approx(core, rel=1e-9), pytest.approx(bg, rel=1e-9))
    assert m["ratio"] == pytest.approx(bg / core) and 1.0 < m["ratio"] < math.inf
    assert m["spread"] == pytest.approx(spread) and m["n"] == 400
    per_image = np.linalg.norm(codes - f(core_only), axis=1) / spread
    half = 1.959963984540054 * per_image.std(ddof=1) / math.sqrt(400)
    assert (m["shift_core_only_low"], m["shift_core_only_high"]) == (
        pytest.approx(core - half), pytest.approx(core + half))
    # A constant latent has no spread: nothing to move, NaN rather than a fake number.
    const = counterfactual_sensitivity(np.ones((5, 3)), np.ones((5, 3)), np.zeros((5, 3)))
    assert math.isnan(const["ratio"]) and math.isnan(const["shift_core_only"])
    with pytest.raises(ValueError, match="one shape"):
        counterfactual_sensitivity(codes, codes[:3], codes)
    # rows, CSV and table
    keys = {("l0", "z1"): "silhouette", ("l0", "z2"): "background"}
    rows = sensitivity_rows(*({k: readers[v](x) for k, v in keys.items()}
                              for x in (images, core_only, background_only)))
    assert [(r["layer"], r["latent"]) for r in rows] == list(keys)
    path = write_sensitivity_csv(rows, tmp_path / "sensitivity.csv")
    with open(path, newline="") as fh:
        read = list(csv.DictReader(fh))
    assert read[0]["ratio"] == "inf" and read[1]["ratio"] == "0"
    table = format_sensitivity_table(rows).splitlines()
    assert table[2].split()[-1] == "inf" and table[3].split()[-1] == "0.000"


def test_probe_cli_measures_sensitivity_on_a_replica_with_twins(tmp_path, capsys):
    """A real run on a small real replica (core-only and background-only twins on disk): the
    probe writes sensitivity.csv for every probed latent and its figure."""
    from tiny_models import register_tiny_vit, save_tiny_weights

    from robustbench_fvae.config import RunConfig, TrainConfig
    from robustbench_fvae.data.synthetic import build_replica
    from robustbench_fvae.training import run

    data = tmp_path / "data"
    build_replica("synth-waterbirds", data, scale=0.03, progress=False)
    cfg = RunConfig(method="fvae", dataset="synth-waterbirds", data_root=str(data),
                    out=str(tmp_path / "out"), backbone=register_tiny_vit(),
                    weights=str(save_tiny_weights(tmp_path / "tiny.safetensors")), device="cpu",
                    num_workers=0, adapter=AdapterConfig(rank=4),
                    train=TrainConfig(epochs=1, batch_size=8, eval_batch_size=32, patience=0))
    run_dir = run(cfg, progress=False, log=lambda _m: None).run_dir
    out = tmp_path / "probe"
    rc = probe_cli.main([str(run_dir), "--layers", "0", "--max-images", "16", "--tsne-max", "0",
                         "--device", "cpu", "--no-progress", "--jobs", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    with open(out / "probes.csv", newline="") as f:
        probed = list(dict.fromkeys((r["layer"], r["latent"]) for r in csv.DictReader(f)))
    with open(out / "sensitivity.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["layer"], r["latent"]) for r in rows] == probed
    assert probed[-1] == ("blocks.0.attn.qkv", "backbone")
    for r in rows:
        assert r["n"] == "16"
        # the frozen input of block 0 changes when either part of the image is removed
        if r["latent"] == "backbone":
            assert float(r["shift_core_only"]) > 0 and float(r["shift_background_only"]) > 0
            assert float(r["ratio"]) == pytest.approx(
                float(r["shift_background_only"]) / float(r["shift_core_only"]), rel=1e-4)
    assert "counterfactual sensitivity" in printed
    assert (out / "sensitivity.png").stat().st_size > 10_000
    meta = json.loads((out / "probe.json").read_text())
    assert [(s["layer"], s["latent"]) for s in meta["sensitivity"]] == probed
    # the replica's twins drive the twin interventions, the background-swapped one included
    with open(out / "interventions.csv", newline="") as f:
        kinds = {r["intervention"] for r in csv.DictReader(f)}
    assert kinds == {"zero", "mean", "background_only", "background_swapped", "sampled"}


def test_history_logs_each_layers_loss_parts(tiny_run):
    """history.jsonl holds R, K1, K2, G per adapted layer and epoch; their mean over layers is
    the logged overall mean."""
    from robustbench_fvae import records

    history = records.load_run(tiny_run).history
    assert history
    for epoch in history:
        layers = epoch["train_layers"]
        assert len(layers) == 2 * OFFLINE_ARCH["depth"]  # q and k of every block
        for part in ("R", "K1", "K2", "G"):
            per_layer = [v[part] for v in layers.values()]
            assert np.mean(per_layer) == pytest.approx(epoch["train"][part], rel=1e-5)


def test_initial_model_is_the_runs_own_initialisation(tiny_run):
    """Rebuilt from the run's seed, the initial B of every FVAE slice sits close to the trained
    one (one short epoch moves it little), much closer than an independent draw (another
    slice's initial B) does; the mean heads start at zero."""
    from robustbench_fvae.adapters import adapted_layers
    from robustbench_fvae.training import load_initial_model, load_trained_model

    state = torch.random.get_rng_state()
    initial = adapted_layers(load_initial_model(tiny_run))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's stream is untouched
    trained = adapted_layers(load_trained_model(tiny_run)[0])
    names = list(trained)
    for i, name in enumerate(names):
        b0, b = initial[name].lora_B, trained[name].lora_B
        other = initial[names[(i + 1) % len(names)]].lora_B
        assert (b - b0).norm() < 0.5 * b0.norm() < 0.5 * (b - other).norm()
        assert not initial[name].encoder1.mean.weight.any()
