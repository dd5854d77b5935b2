"""Offline replicas: real layouts (read by wilds itself), counts, determinism, cue difficulty."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.modules.setdefault("outdated", None)  # no wilds version-check thread

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from robustbench_fvae.data import silhouettes as sil  # noqa: E402
from robustbench_fvae.data.base import DatasetError  # noqa: E402
from robustbench_fvae.data.registry import REGISTRY, ensure_replica, is_replica  # noqa: E402
from robustbench_fvae.data.synthetic import (  # noqa: E402
    BUILDER_VERSION,
    COUNTERFACTUAL_KINDS,
    COUNTS,
    MARKER,
    MAX_ROTATION,
    REPLICAS,
    SILHOUETTE_SCALE,
    SPECS,
    ReplicaError,
    build_replica,
    default_strength,
    read_manifest,
    replica_counts,
    replica_dir,
    replica_folders,
    resolve_strength,
    split_group_counts_on_disk,
    train_counts,
)
from robustbench_fvae.data.verify import verify_dataset  # noqa: E402

SCALE = 0.15  # ≈1,650 images for the three replicas: a few seconds


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("replicas")
    for name in REPLICAS:
        build_replica(name, root, seed=0, scale=SCALE, progress=False)
    return root


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")
    }


def test_same_seed_gives_identical_bytes_and_no_leftovers(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    build_replica("synth-animals", a, seed=3, scale=0.1, progress=False)
    build_replica("synth-animals", b, seed=3, scale=0.1, progress=False)
    build_replica("synth-animals", c, seed=4, scale=0.1, progress=False)
    da, db, dc = _digest(a / "synth"), _digest(b / "synth"), _digest(c / "synth")
    assert len(da) > 250 and da == db
    images = [k for k in da if k.endswith(".png")]
    assert sum(da[k] != dc[k] for k in images) > 0.9 * len(images)  # a new seed, new images
    # Staging folders are renamed into place or removed: nothing half-written is left.
    assert sorted(p.name for p in (a / "synth").iterdir() if not p.name.endswith(".lock")) == [
        "spuco_birds", "spuco_dogs"]


@pytest.mark.parametrize("name", REPLICAS)
def test_group_counts_on_disk_match_manifest_and_spec(built, name):
    expected = replica_counts(name, SCALE)
    on_disk = split_group_counts_on_disk(name, built)
    assert on_disk == expected
    for folder in replica_folders(name, built):
        manifest = read_manifest(folder)
        assert manifest["name"] == name and manifest["seed"] == 0
        assert manifest["image_size"] == 64 and manifest["builder_version"] >= 1
        assert {s: {int(g): n for g, n in c.items()}
                for s, c in manifest["split_group_counts"].items()} == expected
    some_png = next(replica_folders(name, built)[0].rglob("*.png"))
    with Image.open(some_png) as img:
        assert img.size == (64, 64) and img.mode == "RGB"


def test_full_size_counts_mirror_the_real_datasets():
    def shares(counts):
        total = sum(counts.values())
        return np.array([counts[g] / total for g in sorted(counts)])

    wb, ca, an = COUNTS["synth-waterbirds"], COUNTS["synth-celeba"], COUNTS["synth-animals"]
    # Real training group sizes (WILDS) and their scaled copies: same shares within 1 point.
    assert np.abs(shares(wb["train"]) - shares({0: 3498, 1: 184, 2: 56, 3: 1057})).max() < 0.01
    real_celeba = {0: 71629, 1: 66874, 2: 22880, 3: 1387}
    assert np.abs(shares(ca["train"]) - shares(real_celeba)).max() < 0.01
    assert min(wb["train"].values()) >= 20 and min(ca["train"].values()) >= 20
    assert sum(wb["train"].values()) == 2000 and 2000 <= sum(ca["train"].values()) <= 3000
    # Val/test resolve WG: every group >= 130 validation and >= 600 test images.
    for counts in (wb, ca, an):
        assert min(counts["val"].values()) >= 130 and min(counts["test"].values()) >= 600
    # Waterbirds val/test: the real splits' own group sizes.
    assert wb["val"] == {0: 467, 1: 466, 2: 133, 3: 133}
    assert wb["test"] == {0: 2255, 1: 2255, 2: 642, 3: 642}
    # CelebA val/test: not-blond groups larger than blond ones, blond groups floored.
    for split in ("val", "test"):
        c = ca[split]
        assert c[0] > c[1] > c[2] == c[3]
    # Animals: SpuCo's 20:1 majority/minority in train, floored minorities in val.
    majority, minority = (0, 5, 10, 15), (1, 4, 11, 14)
    assert {an["train"][g] for g in majority} == {20 * an["train"][minority[0]]}
    assert {an["val"][g] for g in majority} == {500} and {an["val"][g] for g in minority} == {130}
    assert len(set(an["test"].values())) == 1


def test_wilds_reads_the_replicas(built):
    import torch
    from wilds.datasets.celebA_dataset import CelebADataset
    from wilds.datasets.waterbirds_dataset import WaterbirdsDataset

    for cls, name in ((WaterbirdsDataset, "synth-waterbirds"), (CelebADataset, "synth-celeba")):
        ds = cls(root_dir=str(built / "synth"), download=False)
        expected = replica_counts(name, SCALE)
        for split in ("train", "val", "test"):
            subset = ds.get_subset(split)
            groups = ds._eval_grouper.metadata_to_group(subset.metadata_array)
            # wilds' grouper numbers (background|male, y) as g = a + 2y: our numbering.
            counts = torch.bincount(groups, minlength=4).tolist()
            assert counts == [expected[split][g] for g in range(4)], (name, split)
        x, y, meta = ds.get_subset("val")[0]
        assert x.size == (64, 64) and x.mode == "RGB" and int(y) in (0, 1)


def test_existing_replica_is_kept_unless_forced(tmp_path):
    root = tmp_path / "d"
    build_replica("synth-waterbirds", root, seed=0, scale=0.03, progress=False)
    folder = replica_folders("synth-waterbirds", root)[0]
    meta = folder / "metadata.csv"
    meta.write_text(meta.read_text() + "# user edit\n")
    build_replica("synth-waterbirds", root, seed=1, scale=0.03, progress=False)  # no-op
    assert meta.read_text().endswith("# user edit\n") and read_manifest(folder)["seed"] == 0
    build_replica("synth-waterbirds", root, seed=1, scale=0.03, progress=False, force=True)
    assert not meta.read_text().endswith("# user edit\n") and read_manifest(folder)["seed"] == 1
    # A replica from an older builder version shows other pictures: it is rebuilt.
    manifest = read_manifest(folder)
    (folder / MARKER).write_text(json.dumps({**manifest, "builder_version": 0}))
    meta.write_text(meta.read_text() + "# user edit\n")
    build_replica("synth-waterbirds", root, seed=2, scale=0.03, progress=False)
    assert not meta.read_text().endswith("# user edit\n") and read_manifest(folder)["seed"] == 2
    # Loading a stale replica rebuilds it too, with its own seed and scale.
    (folder / MARKER).write_text(json.dumps({**read_manifest(folder), "builder_version": 0}))
    meta.write_text(meta.read_text() + "# user edit\n")
    with pytest.raises(DatasetError, match="older replica builder"):
        ensure_replica("synth-waterbirds", root, build_missing=False)
    ensure_replica("synth-waterbirds", root)
    rebuilt = read_manifest(folder)
    assert not meta.read_text().endswith("# user edit\n")
    assert (rebuilt["seed"], rebuilt["scale"], rebuilt["builder_version"]) == (2, 0.03,
                                                                               BUILDER_VERSION)
    # A folder that is not a replica is never overwritten without --force.
    (folder / MARKER).unlink()
    with pytest.raises(ReplicaError, match="--force"):
        build_replica("synth-waterbirds", root, seed=0, scale=0.03, progress=False)
    with pytest.raises(ReplicaError, match="unknown replica"):
        build_replica("synth-nope", root)


def _features(paths: list[Path], px: int = 12) -> np.ndarray:
    """Downsampled RGB pixels in [0, 1], shape (N, px·px·3)."""
    small = [Image.open(p).convert("RGB").resize((px, px), Image.BILINEAR) for p in paths]
    return np.stack([np.asarray(im, np.float32).ravel() / 255.0 for im in small])


def test_spurious_cue_is_much_easier_than_the_core_cue(built):
    """On the val+test images (where y and a are far less correlated than in train), a linear
    model on 12×12 pixels reads the background attribute almost perfectly and the class barely:
    the spurious cue is the easy one, as the benchmark needs."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    base = built / "synth" / "waterbirds_v1.0"
    meta = pd.read_csv(base / "metadata.csv")
    meta = meta[meta["split"] > 0]
    x = _features([base / f for f in meta["img_filename"]])
    clf = LogisticRegression(max_iter=2000)
    acc_a = cross_val_score(clf, x, meta["place"], cv=3, scoring="balanced_accuracy").mean()
    acc_y = cross_val_score(clf, x, meta["y"], cv=3, scoring="balanced_accuracy").mean()
    assert acc_a > 0.9, acc_a
    assert acc_a - acc_y > 0.25, (acc_a, acc_y)

    base = built / "synth" / "celebA_v1.0"
    attrs = pd.read_csv(base / "list_attr_celeba.csv")
    part = pd.read_csv(base / "list_eval_partition.csv")
    keep = part["partition"].to_numpy() > 0
    x = _features([base / "img_align_celeba" / f for f in attrs["image_id"][keep]])
    acc_a = cross_val_score(clf, x, attrs["Male"][keep], cv=3, scoring="balanced_accuracy").mean()
    acc_y = cross_val_score(clf, x, attrs["Blond_Hair"][keep], cv=3,
                            scoring="balanced_accuracy").mean()
    assert acc_a > 0.9 and acc_a - acc_y > 0.25, (acc_a, acc_y)


def test_images_show_the_documented_silhouette_class_and_background(built):
    """Recompute a few files from the public rendering primitives: a label on disk must map to
    its documented silhouette class (held-out instance pool for val/test) and background."""
    images, _ = sil.load_silhouettes()
    spec = SPECS["synth-waterbirds"]
    base = built / "synth" / "waterbirds_v1.0"
    meta = pd.read_csv(base / "metadata.csv")
    for split_code, split in ((0, "train"), (2, "test")):
        for y, place in ((1, 0), (0, 1)):  # the two minority groups
            rows = meta[(meta["split"] == split_code) & (meta["y"] == y) & (meta["place"] == place)]
            row = rows.iloc[0]
            g, k = 2 * y + place, 0  # the first file of a group has index 0 within it
            rng = np.random.default_rng([0, REPLICAS.index("synth-waterbirds"),
                                         ("train", "val", "test").index(split), g, k])
            pool = sil.instance_pools(spec.foreground[y], 0)[("train", "val", "test").index(split)]
            silhouette = images[pool[int(rng.integers(len(pool)))]]
            expected = sil.render_scene(rng, silhouette, spec.background[place], tone=spec.tone,
                                        scale=SILHOUETTE_SCALE, max_rotation=MAX_ROTATION)
            actual = np.asarray(Image.open(base / row["img_filename"]).convert("RGB"))
            np.testing.assert_array_equal(actual, expected)
    assert spec.foreground == ("Bird", "Horse") and spec.background == ("land", "water")


def test_instance_pools_are_disjoint_and_replicas_avoid_pretraining_classes():
    """Pools are disjoint; a replica class's pools leave out the silhouettes the offline backbone
    pretrains on (it must have seen the concept, never a replica's instances)."""
    _, labels = sil.load_silhouettes()
    for name in sil.SILHOUETTE_CLASSES:
        pools = sil.instance_pools(name, seed=0)
        flat = np.concatenate(pools)
        reserved = (sil.reserved_source_instances(name) if name in sil.REPLICA_CLASSES
                    else np.array([], dtype=np.int64))
        assert len(flat) == len(set(flat.tolist())) == 1000 - len(reserved)
        assert (labels[flat] == sil.class_index(name)).all()
        assert not np.intersect1d(flat, reserved).size
        if name in sil.REPLICA_CLASSES:
            assert len(reserved) == sil.RESERVED_PER_CLASS
            assert (labels[reserved] == sil.class_index(name)).all()
    used = {c for spec in SPECS.values() for c in spec.foreground}
    assert used == set(sil.REPLICA_CLASSES) and not used & set(sil.PRETRAIN_CLASSES)


def test_missing_animal_mnist_names_the_install_command(monkeypatch):
    import importlib.util

    sil.load_silhouettes.cache_clear()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    try:
        hint = r"pip install --no-deps animal-mnist==0\.4"
        with pytest.raises(sil.SilhouetteDataError, match=hint):
            sil.load_silhouettes()
    finally:
        monkeypatch.undo()
        sil.load_silhouettes.cache_clear()


def test_build_cli(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data_prep"))
    try:
        import build_synthetic
    finally:
        sys.path.pop(0)
    rc = build_synthetic.main(["--root", str(tmp_path), "--only", "synth-celeba", "--scale",
                               "0.02", "--seed", "5", "--quiet"])
    out = capsys.readouterr().out
    n_train = sum(replica_counts("synth-celeba", 0.02)["train"].values())
    assert rc == 0 and "synth-celeba: seed 5" in out and f"train {n_train} " in out
    info = json.loads((tmp_path / "synth" / "celebA_v1.0" / MARKER).read_text())
    assert info["seed"] == 5 and info["scale"] == 0.02
    with pytest.raises(SystemExit):
        build_synthetic.main(["--root", str(tmp_path), "--only", "waterbirds"])


# ---------------------------------------------------------------- spurious strength


def _shares(name: str, counts: dict[int, int]) -> dict[int, float]:
    """Per class y: the share of its training images on its majority background."""
    spec = SPECS[name]
    out = {}
    for y in range(len(spec.class_names)):
        n = sum(c for g, c in counts.items() if spec.ya(g)[0] == y)
        out[y] = counts[spec.group(y, spec.majority[y])] / n
    return out


@pytest.mark.parametrize("name", REPLICAS)
def test_training_counts_follow_the_spurious_strength(name):
    spec = SPECS[name]
    full = COUNTS[name]["train"]
    class_sizes = {y: sum(c for g, c in full.items() if spec.ya(g)[0] == y)
                   for y in range(len(spec.class_names))}
    # The default is the real dataset's own strength and changes nothing.
    assert train_counts(name) == full == train_counts(name, default_strength(name))
    assert default_strength(name) == {"synth-waterbirds": 0.95, "synth-celeba": 0.943,
                                      "synth-animals": 0.952}[name]
    for rho in (0.5, 0.75, 0.95, 1.0):
        counts = replica_counts(name, strength=rho)
        assert counts["val"] == COUNTS[name]["val"] and counts["test"] == COUNTS[name]["test"]
        train = counts["train"]
        assert set(train) == set(full)
        for y, share in _shares(name, train).items():
            n = class_sizes[y]
            assert sum(c for g, c in train.items() if spec.ya(g)[0] == y) == n  # class kept
            # Classes the real data correlates sit at rho; CelebA's not-blond keeps its lean.
            want = 0.5 + spec.lean[y] * (rho - 0.5)
            assert abs(share - want) <= 0.5 / n + 1e-12, (name, rho, y, share)
        if rho == 0.5 and name != "synth-animals":
            # No correlation at all: each class split evenly between the two backgrounds.
            assert all(abs(s - 0.5) <= 1 / 1000 for s in _shares(name, train).values())
        if rho == 1.0:
            # Every correlated class lies entirely on its majority background.
            assert all(train[spec.group(y, a)] == 0 for y in range(len(spec.class_names))
                       for a in range(len(spec.attribute_names))
                       if spec.group(y, a) in train and a != spec.majority[y]
                       and spec.lean[y] == 1.0)
    # Measured numbers the docs quote.
    if name == "synth-waterbirds":
        assert train_counts(name, 0.5) == {0: 768, 1: 768, 2: 232, 3: 232}
        assert train_counts(name, 0.75) == {0: 1152, 1: 384, 2: 116, 3: 348}
    if name == "synth-celeba":
        assert train_counts(name, 0.5) == {0: 1064, 1: 1063, 2: 186, 3: 186}
    for bad in (0.49, 1.01, float("nan"), "high"):
        with pytest.raises(ReplicaError, match=r"spurious strength must be"):
            resolve_strength(name, bad)


@pytest.mark.parametrize("rho", [0.5, 0.75])
def test_a_replica_per_strength_in_its_own_folder(tmp_path, rho, monkeypatch):
    import robustbench_fvae.data.synthetic as synthetic

    name = "synth-waterbirds"
    logs = []

    def small(*args, **kwargs):  # the real builder at a test scale
        return build_replica(*args, **{**kwargs, "scale": 0.05, "progress": False})

    monkeypatch.setattr(synthetic, "build_replica", small)
    ensure_replica(name, tmp_path, strength=rho, log=logs.append)
    monkeypatch.undo()
    where = tmp_path / "synth" / f"rho-{rho}"
    assert replica_dir(name, tmp_path, rho) == where
    assert logs and str(where) in logs[0] and f"spurious strength {rho}" in logs[0]
    # The default replica is not touched; this one has its own counts and manifest.
    assert not (tmp_path / "synth" / "waterbirds_v1.0").exists()
    manifest = read_manifest(where / "waterbirds_v1.0")
    assert manifest["spurious_strength"] == rho
    expected = replica_counts(name, 0.05, rho)
    assert split_group_counts_on_disk(name, tmp_path, rho) == expected
    assert {int(g): n for g, n in manifest["split_group_counts"]["train"].items()} == \
        expected["train"]
    report = verify_dataset(name, tmp_path, strength=rho)
    assert report.ok, report.problems
    assert report.spurious_strength == rho and f"rho = {rho:g}" in report.render()
    # The default replica is missing: asking for it does not fall back to this one.
    with pytest.raises(DatasetError, match="SYNTHETIC.json missing"):
        ensure_replica(name, tmp_path, build_missing=False)
    # A manifest whose training counts do not follow its rho is caught.
    bad = dict(manifest, split_group_counts={**manifest["split_group_counts"],
                                             "train": COUNTS[name]["train"]})
    (where / "waterbirds_v1.0" / MARKER).write_text(json.dumps(bad))
    problems = verify_dataset(name, tmp_path, strength=rho).problems
    assert any("are not what spurious strength" in p for p in problems), problems


def test_real_datasets_refuse_a_spurious_strength(tmp_path):
    from robustbench_fvae.data import check_data_recipe, load_splits

    with pytest.raises(ValueError, match=r"synth-\*.*not to waterbirds") as err:
        load_splits("waterbirds", tmp_path, spurious_strength=0.9)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="not to celeba"):
        verify_dataset("celeba", tmp_path, strength=0.9)
    with pytest.raises(ValueError, match="not to animals"):
        check_data_recipe("animals", None, 0.952)
    assert check_data_recipe("animals", None, None) == ("paper", None)
    assert check_data_recipe("synth-animals", None, None) == ("flip", 0.952)


# ---------------------------------------------------------------- counterfactual test images


def test_every_test_image_has_core_only_and_background_only_twins(built):
    from robustbench_fvae.data import counterfactual_splits, load_splits

    for name in REPLICAS:
        test = load_splits(name, built, build_missing=False)["test"]
        twins = counterfactual_splits(name, built)
        manifest = read_manifest(replica_folders(name, built)[0])
        assert manifest["counterfactual"]["images_per_kind"] == len(test)
        for kind in COUNTERFACTUAL_KINDS:
            split = twins[kind]
            assert len(split) == len(test) and split.split == f"test/{kind}"
            assert (split.y == test.y).all() and (split.a == test.a).all()
            assert (split.g == test.g).all() and split.groups == test.groups
            assert (split.train_group_counts == test.train_group_counts).all()
            for original, twin in zip(test.paths, split.paths):
                folder = next(f for f in replica_folders(name, built)
                              if Path(original).is_relative_to(f))
                rel = Path(original).relative_to(folder)
                assert twin == folder / "counterfactual" / kind / rel and twin.is_file()
    # No twin of a training or validation image, and the readers never see the twins.
    folder = replica_folders("synth-waterbirds", built)[0]
    n_twins = len(list((folder / "counterfactual").rglob("*.png")))
    n_test = sum(replica_counts("synth-waterbirds", SCALE)["test"].values())
    assert n_twins == len(COUNTERFACTUAL_KINDS) * n_test


def test_twins_are_the_test_scene_without_background_or_without_object(built):
    """Recompute one test scene and its twins from the public rendering primitives."""
    from robustbench_fvae.data import counterfactual_splits, load_splits

    images, _ = sil.load_silhouettes()
    spec = SPECS["synth-celeba"]
    test = load_splits("synth-celeba", built, build_missing=False)["test"]
    twins = counterfactual_splits("synth-celeba", built)
    i = int(np.flatnonzero(test.g == 3)[0])  # first blond male: k = 0 within group 3
    key = [0, REPLICAS.index("synth-celeba"), 2, 3, 0]
    rng = np.random.default_rng(key)
    pool = sil.instance_pools("Cat", 0)[2]
    silhouette = images[pool[int(rng.integers(len(pool)))]]
    parts = sil.scene_parts(rng, silhouette, "dark", tone=spec.tone, scale=SILHOUETTE_SCALE,
                            max_rotation=MAX_ROTATION)
    scene = sil.compose(rng, *parts)
    core, background = sil.counterfactual_scenes(np.random.default_rng(key + [1]), parts)
    np.testing.assert_array_equal(np.asarray(test[i][0]), scene)
    np.testing.assert_array_equal(np.asarray(twins["core_only"][i][0]), core)
    np.testing.assert_array_equal(np.asarray(twins["background_only"][i][0]), background)
    alpha = parts[1] > 0.5
    # Core-only: flat grey around the object; background-only: the scene's background.
    grey = np.asarray(core, np.float32)[~(parts[1] > 0.01)] / 255
    assert abs(np.median(grey) - sil.NEUTRAL_LIGHT) < 0.03 or \
        abs(np.median(grey) - sil.NEUTRAL_DARK) < 0.03
    diff = np.abs(background.astype(int) - scene.astype(int)).mean(-1)
    assert diff[alpha].mean() > 4 * diff[~(parts[1] > 0.01)].mean()


def test_verify_catches_a_missing_counterfactual_image(tmp_path):
    name = "synth-animals"
    build_replica(name, tmp_path, scale=0.03, progress=False)
    assert verify_dataset(name, tmp_path).ok
    folder = replica_folders(name, tmp_path)[1]  # spuco_dogs
    victim = sorted((folder / "counterfactual" / "background_only").rglob("*.png"))[3]
    victim.unlink()
    problems = verify_dataset(name, tmp_path).problems
    assert len(problems) == 1, problems
    assert problems[0].startswith("test/background_only: 1 of ") and str(victim) in problems[0]
    assert "--force" in problems[0]
    # A corrupt core-only twin is found by the sample that verify decodes.
    twin = sorted((folder / "counterfactual" / "core_only").rglob("*.png"))[0]
    twin.write_bytes(b"not a png")
    problems = verify_dataset(name, tmp_path, sample_per_split=10_000).problems
    assert any(p.startswith("test/core_only: cannot open") and str(twin) in p
               for p in problems), problems


def test_counterfactual_splits_refuse_a_replica_without_twins(tmp_path):
    from data_fixtures import make_waterbirds

    from robustbench_fvae.data import counterfactual_splits

    make_waterbirds(tmp_path / "synth", synthetic_name="synth-waterbirds")  # hand-made
    with pytest.raises(DatasetError, match="no counterfactual test images.*--force"):
        counterfactual_splits("synth-waterbirds", tmp_path)
    with pytest.raises(DatasetError, match="only the offline replicas"):
        counterfactual_splits("waterbirds", tmp_path)


def test_is_replica_reads_the_registry_and_refuses_unknown_names():
    assert {n for n in REGISTRY if is_replica(n)} == {f"synth-{f}" for f in
                                                      ("waterbirds", "celeba", "animals")}
    assert all(is_replica(n) == n.startswith("synth-") for n in REGISTRY)
    for unknown in ("synth-mnist", "imagenet", "", None, ["synth-celeba"]):
        assert is_replica(unknown) is False
