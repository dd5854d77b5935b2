"""Real-dataset adapters, registry, transforms, verification and download/placement.

Every dataset here is a small folder in the exact real on-disk layout (``data_fixtures``), read
through the same code as the real data (wilds for Waterbirds/CelebA). The only fake is the network:
downloads are made to fail by replacing the urllib call, to check that nothing is left behind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import runpy
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.modules.setdefault("outdated", None)  # wilds' PyPI version check

import data_fixtures as F  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from robustbench_fvae.data import (  # noqa: E402
    DatasetError,
    DownloadError,
    GroupSplit,
    dataset_names,
    download_dataset,
    load_splits,
    make_transforms,
    verify_dataset,
)

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.5)


def _cli(script: str):
    """Import a data_prep script as a module (its ``main(argv) -> int`` is the CLI)."""
    spec = importlib.util.spec_from_file_location(
        f"cli_{script}", REPO / "data_prep" / f"{script}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory) -> Path:
    """One read-only data root holding all three real layouts."""
    root = tmp_path_factory.mktemp("data")
    F.make_waterbirds(root)
    F.make_celeba(root)
    F.make_animals(root)
    return root


# ---------------------------------------------------------------- registry


def test_dataset_names_and_unknown_name(tmp_path):
    assert dataset_names() == [
        "waterbirds",
        "celeba",
        "animals",
        "synth-waterbirds",
        "synth-celeba",
        "synth-animals",
    ]
    for call in (lambda: load_splits("waterbird", tmp_path), lambda: verify_dataset("x", tmp_path)):
        with pytest.raises(
            ValueError, match=r"unknown dataset .*accepted: waterbirds, celeba, animals, synth-"
        ):
            call()
    assert _entries(tmp_path) == []


@pytest.mark.parametrize(
    ("name", "folder"),
    [("waterbirds", "waterbirds_v1.0"), ("celeba", "celebA_v1.0"), ("animals", "spuco_birds")],
)
def test_missing_real_dataset_gives_one_line_with_the_fix(tmp_path, monkeypatch, name, folder):
    def no_network(*args, **kwargs):
        raise AssertionError("loading must never try to download")

    monkeypatch.setattr(urllib.request, "urlretrieve", no_network)
    with pytest.raises(DatasetError) as err:
        load_splits(name, tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(tmp_path / folder) in msg
    assert f"python data_prep/download.py {name} --root {tmp_path}" in msg
    assert _entries(tmp_path) == []  # wilds was never asked (it would create the folder)


def test_missing_release_marker_is_reported_before_wilds(tmp_path, monkeypatch):
    F.make_waterbirds(tmp_path, marker=False)
    monkeypatch.setattr(urllib.request, "urlretrieve", pytest.fail)
    with pytest.raises(DatasetError, match="RELEASE_v1.0.txt"):
        load_splits("waterbirds", tmp_path)


# ---------------------------------------------------------------- Waterbirds / CelebA via wilds


def _group_from_name(path: Path) -> int:
    """The Waterbirds fixture encodes the group in the file name: ``..._<g>.jpg``."""
    return int(path.stem.rsplit("_", 1)[1])


def test_waterbirds_fixture_reads_labels_groups_and_names(fixture_root):
    splits = load_splits("waterbirds", fixture_root)
    meta = pd.read_csv(fixture_root / "waterbirds_v1.0" / "metadata.csv")
    by_file = meta.set_index("img_filename")
    for s, code in F.SPLIT_CODES.items():
        sp = splits[s]
        assert isinstance(sp, GroupSplit) and sp.split == s and sp.dataset_name == "waterbirds"
        rel = [p.relative_to(fixture_root / "waterbirds_v1.0").as_posix() for p in sp.paths]
        assert sorted(rel) == sorted(meta.loc[meta.split == code, "img_filename"])
        np.testing.assert_array_equal(sp.y, by_file.loc[rel, "y"].to_numpy())
        np.testing.assert_array_equal(sp.a, by_file.loc[rel, "place"].to_numpy())
        np.testing.assert_array_equal(sp.g, [_group_from_name(p) for p in sp.paths])
        np.testing.assert_array_equal(sp.g, 2 * sp.y + sp.a)
        assert sp.group_counts().tolist() == [F.WATERBIRDS_COUNTS[s][g] for g in range(4)]
        assert sp.train_group_counts.tolist() == [6, 2, 2, 5]
    sp = splits["val"]
    assert sp.class_names == ["landbird", "waterbird"]
    assert sp.attribute_names == ["land", "water"]
    assert [(g.g, g.y, g.a, g.name) for g in sp.groups] == [
        (0, 0, 0, "landbird/land"),
        (1, 0, 1, "landbird/water"),
        (2, 1, 0, "waterbird/land"),
        (3, 1, 1, "waterbird/water"),
    ]
    image, y, a = sp[3]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (12, 10)
    assert (y, a) == (int(sp.y[3]), int(sp.a[3]))


def _wilds_split_groups(cls_path: str, cls_name: str, root: Path, fields: list[str]):
    """Group index per split from wilds' own CombinatorialGrouper."""
    from wilds.common.grouper import CombinatorialGrouper

    module = importlib.import_module(cls_path)
    ds = getattr(module, cls_name)(root_dir=str(root), download=False)
    grouper = CombinatorialGrouper(dataset=ds, groupby_fields=fields)
    g = grouper.metadata_to_group(ds.metadata_array).numpy()
    split = np.asarray(ds.split_array)
    return {s: g[split == code] for s, code in F.SPLIT_CODES.items()}, grouper


def _parse_group_str(text: str) -> dict[str, str]:
    """wilds' "y =  landbird, background =  land" -> {"y": "landbird", "background": "land"}."""
    pairs = (part.split("=") for part in text.split(",") if part.strip())
    return {k.strip(): v.strip() for k, v in pairs}


def test_waterbirds_group_numbering_equals_wilds_grouper(fixture_root):
    ours = load_splits("waterbirds", fixture_root)
    theirs, grouper = _wilds_split_groups(
        "wilds.datasets.waterbirds_dataset", "WaterbirdsDataset", fixture_root, ["background", "y"]
    )
    for s in F.SPLIT_CODES:
        np.testing.assert_array_equal(ours[s].g, theirs[s])
    # wilds' own description of each group index matches our readable names.
    for grp in ours["train"].groups:
        cls, attr = grp.name.split("/")
        assert _parse_group_str(grouper.group_str(grp.g)) == {"background": attr, "y": cls}


def test_celeba_fixture_reads_labels_and_matches_wilds_grouper(fixture_root):
    splits = load_splits("celeba", fixture_root)
    folder = fixture_root / "celebA_v1.0"
    attrs = pd.read_csv(folder / "list_attr_celeba.csv").set_index("image_id")
    part = pd.read_csv(folder / "list_eval_partition.csv").set_index("image_id")
    for s, code in F.SPLIT_CODES.items():
        sp = splits[s]
        ids = [p.name for p in sp.paths]
        assert all(p.parent == folder / "img_align_celeba" for p in sp.paths)
        assert (part.loc[ids, "partition"] == code).all()
        np.testing.assert_array_equal(sp.y, (attrs.loc[ids, "Blond_Hair"] == 1).astype(int))
        np.testing.assert_array_equal(sp.a, (attrs.loc[ids, "Male"] == 1).astype(int))
        assert sp.group_counts().tolist() == [F.CELEBA_COUNTS[s][g] for g in range(4)]
        assert sp.train_group_counts.tolist() == [6, 5, 3, 1]
    assert splits["test"].class_names == ["not_blond", "blond"]
    assert splits["test"].attribute_names == ["female", "male"]
    assert [g.name for g in splits["test"].groups] == [
        "not_blond/female",
        "not_blond/male",
        "blond/female",
        "blond/male",
    ]
    theirs, grouper = _wilds_split_groups(
        "wilds.datasets.celebA_dataset", "CelebADataset", fixture_root, ["male", "y"]
    )
    for s in F.SPLIT_CODES:
        np.testing.assert_array_equal(splits[s].g, theirs[s])
    assert _parse_group_str(grouper.group_str(3)) == {"male": "1", "y": "blond"}  # the rare group


def test_celeba_full_width_csv_reads_under_pandas3(tmp_path):
    # A CSV this large is parsed into a single pandas block; wilds 2.0.0 then writes into the
    # read-only ``.values`` of pandas >= 3 unless the adapter guards it (the real file has 202,599
    # rows). Only the CSVs exist: loading must not need the images.
    folder = F.make_celeba_csvs(tmp_path, n_rows=60000)
    splits = load_splits("celeba", tmp_path)
    attrs = pd.read_csv(folder / "list_attr_celeba.csv")
    part = pd.read_csv(folder / "list_eval_partition.csv")["partition"].to_numpy()
    blond = (attrs["Blond_Hair"].to_numpy() == 1).astype(int)
    male = (attrs["Male"].to_numpy() == 1).astype(int)
    for s, code in F.SPLIT_CODES.items():
        np.testing.assert_array_equal(splits[s].y, blond[part == code])
        np.testing.assert_array_equal(splits[s].g, 2 * blond[part == code] + male[part == code])
    assert sum(len(sp) for sp in splits.values()) == 60000


# ---------------------------------------------------------------- Animals


def test_animals_fixture_reads_spuco_labels_and_eight_groups(fixture_root):
    splits = load_splits("animals", fixture_root)
    cls_y = {"landbirds": 0, "waterbirds": 1, "small_dogs": 2, "big_dogs": 3}
    bg_a = {"land": 0, "water": 1, "indoor": 2, "outdoor": 3}
    for s, sp in splits.items():
        assert sp.n_groups == 16 and sp.num_classes == 4
        np.testing.assert_array_equal(sp.y, [cls_y[p.parts[-3]] for p in sp.paths])
        np.testing.assert_array_equal(sp.a, [bg_a[p.parts[-2]] for p in sp.paths])
        np.testing.assert_array_equal(sp.g, 4 * sp.y + sp.a)
        counts = sp.group_counts()
        assert {int(g): int(counts[g]) for g in np.flatnonzero(counts)} == F.ANIMALS_COUNTS[s]
        # sorted within each folder, folders in group order: deterministic indices
        assert sp.paths == sorted(
            sp.paths, key=lambda p: (int(4 * cls_y[p.parts[-3]] + bg_a[p.parts[-2]]), p.name)
        )
    train = splits["train"]
    assert {p.suffix for p in train.paths} == {".jpg", ".JPEG", ".png"}
    assert not any(p.name in ("notes.txt", ".hidden.jpg") for p in train.paths)
    assert [(g.g, g.name) for g in train.groups] == [
        (0, "landbird/land"),
        (1, "landbird/water"),
        (4, "waterbird/land"),
        (5, "waterbird/water"),
        (10, "small_dog/indoor"),
        (11, "small_dog/outdoor"),
        (14, "big_dog/indoor"),
        (15, "big_dog/outdoor"),
    ]
    assert train.train_group_counts.sum() == len(train) == 20
    assert load_splits("animals", fixture_root)["test"].paths == splits["test"].paths


def test_loading_opens_no_image_and_bad_images_fail_clearly(tmp_path):
    F.make_animals(tmp_path)
    for p in (tmp_path / "spuco_dogs").rglob("*.*"):
        p.write_bytes(b"not an image")
    splits = load_splits("animals", tmp_path)  # only paths and labels are read
    dog = int(np.flatnonzero(splits["val"].y >= 2)[0])
    with pytest.raises(DatasetError, match=r"cannot read image .*verify.py animals"):
        splits["val"][dog]


# ---------------------------------------------------------------- transforms


def test_transforms_shapes_and_normalisation():
    train_t, eval_t = make_transforms(32, MEAN, STD)
    img = Image.fromarray(np.full((50, 70, 3), 255, dtype=np.uint8))
    x_train, x_eval = train_t(img), eval_t(img)
    assert x_train.shape == x_eval.shape == (3, 32, 32) and x_eval.dtype == torch.float32
    expected = (1.0 - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(x_eval.mean(dim=(1, 2)), expected)
    ramp = Image.fromarray(np.tile(np.arange(70, dtype=np.uint8)[None, :, None] * 3, (50, 1, 3)))
    torch.testing.assert_close(eval_t(ramp), eval_t(ramp))  # eval is deterministic
    torch.manual_seed(0)
    assert any(not torch.equal(train_t(ramp), train_t(ramp)) for _ in range(5))  # train is random
    with pytest.raises(ValueError, match="std"):
        make_transforms(32, MEAN, (0.2, 0.0, 0.2))


def test_splits_carry_train_and_eval_transforms(fixture_root):
    train_t, eval_t = make_transforms(16, MEAN, STD)
    splits = load_splits("waterbirds", fixture_root, train_transform=train_t, eval_transform=eval_t)
    assert splits["train"].transform is train_t
    assert splits["val"].transform is eval_t and splits["test"].transform is eval_t
    x, y, a = splits["test"][0]
    assert x.shape == (3, 16, 16) and isinstance(y, int) and isinstance(a, int)
    batch = next(iter(torch.utils.data.DataLoader(splits["train"], batch_size=4)))
    assert batch[0].shape == (4, 3, 16, 16) and batch[1].dtype == torch.int64


# ---------------------------------------------------------------- verify


def test_verify_passes_with_expected_counts_and_prints_table(fixture_root):
    report = verify_dataset("waterbirds", fixture_root, expected=F.WATERBIRDS_COUNTS)
    assert report.ok, report.problems
    assert report.n_images == 35 and report.n_opened == 35
    assert report.counts["train"].tolist() == [6, 2, 2, 5]
    text = report.render()
    assert "OK:" in text
    rows = {line.split()[1]: line.split()[2:] for line in text.splitlines()[2:6]}
    assert rows["landbird/water"] == ["2", "2", "3"]
    assert rows["waterbird/water"] == ["5", "2", "3"]


def test_verify_checks_real_counts_by_default(fixture_root):
    report = verify_dataset("celeba", fixture_root)
    assert not report.ok
    assert "train: 15 images, expected 162770" in report.problems
    assert "test: group 3 (blond/male) has 2 images, expected 180" in report.problems


def test_verify_catches_missing_image(tmp_path):
    folder = F.make_waterbirds(tmp_path)
    victim = sorted(folder.rglob("*.jpg"))[4]
    victim.unlink()
    report = verify_dataset("waterbirds", tmp_path, expected=F.WATERBIRDS_COUNTS)
    assert len(report.problems) == 1
    assert "referenced images missing" in report.problems[0] and str(victim) in report.problems[0]


def test_verify_catches_missing_csv_column(tmp_path):
    folder = F.make_waterbirds(tmp_path)
    meta = pd.read_csv(folder / "metadata.csv").drop(columns=["place"])
    meta.to_csv(folder / "metadata.csv", index=False)
    report = verify_dataset("waterbirds", tmp_path, expected=F.WATERBIRDS_COUNTS)
    assert len(report.problems) == 1 and "lacks column(s) place" in report.problems[0]
    with pytest.raises(DatasetError, match="lacks column"):
        load_splits("waterbirds", tmp_path)


def test_verify_catches_wrong_split_size(fixture_root):
    wrong = {s: dict(per) for s, per in F.WATERBIRDS_COUNTS.items()}
    wrong["test"][3] += 1
    report = verify_dataset("waterbirds", fixture_root, expected=wrong)
    assert report.problems == [
        "test: 12 images, expected 13",
        "test: group 3 (waterbird/water) has 3 images, expected 4",
    ]
    assert "3 (expected 4)" in report.table()


def test_verify_catches_corrupt_image_and_bad_values(tmp_path):
    folder = F.make_celeba(tmp_path)
    bad = folder / "img_align_celeba" / "000003.jpg"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated JPEG
    report = verify_dataset("celeba", tmp_path, expected=F.CELEBA_COUNTS, sample_per_split=100)
    assert len(report.problems) == 1 and f"cannot open {bad}" in report.problems[0]
    part = pd.read_csv(folder / "list_eval_partition.csv")
    part.loc[[0, 1], "image_id"] = part.loc[[1, 0], "image_id"].to_numpy()
    part.loc[5, "partition"] = 7
    part.to_csv(folder / "list_eval_partition.csv", index=False)
    problems = verify_dataset("celeba", tmp_path, expected=F.CELEBA_COUNTS).problems
    assert len(problems) == 2
    assert "partition has 1 value(s) outside [0, 1, 2]" in problems[0]
    assert "different order" in problems[1]


def test_verify_cli_exit_codes_and_one_line_errors(tmp_path, capsys):
    cli = _cli("verify")
    F.make_animals(tmp_path / "synth", synthetic_name="synth-animals")
    assert cli.main(["synth-animals", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "big_dog/outdoor" in out and "SYNTHETIC.json" in out and "OK:" in out
    shutil.rmtree(tmp_path / "synth" / "spuco_dogs" / "val" / "big_dogs" / "indoor")
    assert cli.main(["synth-animals", "--root", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert (
        out.splitlines()[-1]
        == f"PROBLEM: missing folder {tmp_path}/synth/spuco_dogs/val/big_dogs/indoor"
    )
    assert cli.main(["celeba", "--root", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert out.count("PROBLEM:") == 1 and "celebA_v1.0" in out
    assert cli.main(["celebA", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: unknown dataset 'celebA'")


def test_verify_script_runs_as_a_script(tmp_path, monkeypatch, capsys):
    F.make_waterbirds(tmp_path / "synth", synthetic_name="synth-waterbirds")
    script = str(REPO / "data_prep" / "verify.py")
    monkeypatch.setattr(sys, "argv", [script, "synth-waterbirds", "--root", str(tmp_path)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(script, run_name="__main__")
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "waterbird/land" in out and "OK:" in out


# ---------------------------------------------------------------- replicas (synth-*)


def test_synth_replica_reads_through_real_adapter_and_its_json(tmp_path):
    F.make_celeba(tmp_path / "synth", synthetic_name="synth-celeba")
    splits = load_splits("synth-celeba", tmp_path, build_missing=False)
    assert splits["train"].dataset_name == "synth-celeba"
    assert splits["train"].train_group_counts.tolist() == [6, 5, 3, 1]
    assert verify_dataset("synth-celeba", tmp_path).ok
    info_path = tmp_path / "synth" / "celebA_v1.0" / "SYNTHETIC.json"
    info = json.loads(info_path.read_text())
    info["split_group_counts"]["val"]["3"] = 2
    info_path.write_text(json.dumps(info))
    assert verify_dataset("synth-celeba", tmp_path).problems == [
        "val: 7 images, expected 8",
        "val: group 3 (blond/male) has 1 images, expected 2",
    ]
    # real names never look under synth/
    with pytest.raises(DatasetError, match="download.py celeba"):
        load_splits("celeba", tmp_path)


def test_missing_replica_is_built_or_named(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match=r"build_synthetic.py --root") as err:
        load_splits("synth-waterbirds", tmp_path, build_missing=False)
    assert "\n" not in str(err.value)
    # build_missing=True calls the replica builder (the real one, at a tiny scale for speed).
    from robustbench_fvae.data import synthetic

    calls = []
    real = synthetic.build_replica

    def small_build(name, root, seed=0, scale=1.0):
        calls.append((name, Path(root), seed, scale))
        return real(name, root, seed=seed, scale=0.02, progress=False)

    monkeypatch.setattr(synthetic, "build_replica", small_build)
    splits = load_splits("synth-waterbirds", tmp_path)
    assert calls == [("synth-waterbirds", tmp_path, 0, 1.0)]
    assert (tmp_path / "synth" / "waterbirds_v1.0" / "SYNTHETIC.json").is_file()
    assert len(splits["train"]) > 0 and splits["val"].groups[1].name == "landbird/water"
    load_splits("synth-waterbirds", tmp_path)  # present now: no second build
    assert len(calls) == 1


# ---------------------------------------------------------------- download / manual placement


def _offline(monkeypatch, host_answers: bool = False):
    """Make urllib downloads fail the way they do without network.

    ``host_answers``: our reachability probe gets an HTTP error status (the host is "up"), so the
    download really starts inside wilds and fails there.
    """

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    def http_405(request, *args, **kwargs):
        raise urllib.error.HTTPError(request.full_url, 405, "Method Not Allowed", {}, None)

    monkeypatch.setattr(urllib.request, "urlretrieve", refuse)  # wilds' downloader
    monkeypatch.setattr(urllib.request, "urlopen", http_405 if host_answers else refuse)


@pytest.mark.parametrize(
    ("name", "host_answers"),
    [("waterbirds", False), ("waterbirds", True), ("celeba", True), ("animals", False)],
)
def test_failed_offline_download_leaves_nothing_behind(tmp_path, monkeypatch, name, host_answers):
    _offline(monkeypatch, host_answers)
    root = tmp_path / "data"
    with pytest.raises(DownloadError) as err:
        download_dataset(name, root, log=lambda _: None)
    msg = str(err.value)
    assert "\n" not in msg
    assert "download failed" in msg and "Name or service not known" in msg
    assert f"python data_prep/download.py {name} --root {root} --manual" in msg
    assert _entries(root) == []


def test_download_cli_offline_is_one_line(tmp_path, monkeypatch, capsys):
    _offline(monkeypatch)
    assert _cli("download").main(["waterbirds", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: waterbirds: download failed")
    assert _entries(tmp_path) == []


def test_manual_waterbirds_is_linked_with_marker_and_loads(tmp_path):
    user = tmp_path / "user"
    F.make_waterbirds(user, marker=False)  # e.g. the original release, which has no marker
    src = user / "waterbirds_v1.0"
    before = _entries(src)
    root = tmp_path / "data"
    report = download_dataset(
        "waterbirds", root, manual=user, expected=F.WATERBIRDS_COUNTS, log=lambda _: None
    )
    assert report.ok, report.problems
    assert _entries(src) == before  # nothing written into the user's folder
    assert _entries(root) == ["waterbirds_v1.0"]  # no staging folder left
    assert (root / "waterbirds_v1.0" / "RELEASE_v1.0.txt").is_file()
    assert (root / "waterbirds_v1.0" / "metadata.csv").resolve() == src / "metadata.csv"
    assert load_splits("waterbirds", root)["train"].train_group_counts.tolist() == [6, 2, 2, 5]
    # a second run finds it in place
    again = download_dataset(
        "waterbirds", root, manual=user, expected=F.WATERBIRDS_COUNTS, log=lambda _: None
    )
    assert again.ok


def test_manual_celeba_kaggle_nesting_is_handled(tmp_path):
    src = F.make_celeba(tmp_path / "user")
    (src / "RELEASE_v1.0.txt").unlink()
    images = src / "img_align_celeba"
    images.rename(tmp_path / "inner")
    images.mkdir()
    (tmp_path / "inner").rename(
        images / "img_align_celeba"
    )  # Kaggle: img_align_celeba/img_align_celeba/
    root = tmp_path / "data"
    report = download_dataset("celeba", root, manual=src, expected=F.CELEBA_COUNTS, log=print)
    assert report.ok, report.problems
    assert load_splits("celeba", root)["test"][0][0].size == (9, 11)


def test_manual_broken_folder_is_refused_and_nothing_placed(tmp_path):
    F.make_animals(tmp_path / "user")
    victim = tmp_path / "user" / "spuco_dogs" / "test" / "big_dogs" / "indoor"
    for p in victim.iterdir():
        p.unlink()
    root = tmp_path / "data"
    with pytest.raises(DatasetError) as err:
        download_dataset(
            "animals", root, manual=tmp_path / "user", copy=True, expected=F.ANIMALS_COUNTS
        )
    msg = str(err.value)
    assert (
        "fails verification" in msg and "group 14 (big_dog/indoor) has 0 images, expected 2" in msg
    )
    assert _entries(root) == []


def test_manual_animals_copy(tmp_path):
    F.make_animals(tmp_path / "user")
    root = tmp_path / "data"
    report = download_dataset(
        "animals", root, manual=tmp_path / "user", copy=True, expected=F.ANIMALS_COUNTS, log=print
    )
    assert report.ok and _entries(root) == ["spuco_birds", "spuco_dogs"]
    assert not (root / "spuco_birds").is_symlink()
    shutil.rmtree(tmp_path / "user")  # a copy does not depend on the source
    assert len(load_splits("animals", root)["val"]) == 8


def test_manual_fills_in_the_missing_half_of_animals(tmp_path):
    F.make_animals(tmp_path / "user")
    root = tmp_path / "data"
    root.mkdir()
    shutil.copytree(tmp_path / "user" / "spuco_birds", root / "spuco_birds")
    shutil.rmtree(tmp_path / "user" / "spuco_birds")  # the user's folder holds only the dogs now
    report = download_dataset(
        "animals", root, manual=tmp_path / "user", expected=F.ANIMALS_COUNTS, log=print
    )
    assert report.ok, report.problems
    assert (root / "spuco_dogs").is_symlink() and not (root / "spuco_birds").is_symlink()
    assert _entries(root) == ["spuco_birds", "spuco_dogs"]
