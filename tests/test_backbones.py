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
    build_offline_vit,
    create_backbone,
    default_backbone,
    ensure_offline_backbone,
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
    assert backbone_data_config(offline).image_size == 64
    assert offline(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    assert default_backbone("synth-celeba") == OFFLINE_BACKBONE
    assert default_backbone("waterbirds") == REAL_BACKBONE


def test_offline_backbone_loads_from_cache(tmp_path):
    torch.manual_seed(7)
    reference = build_offline_vit(0)
    path = offline_cache_path(tmp_path)
    path.parent.mkdir(parents=True)
    save_file(reference.state_dict(), str(path))
    model = create_backbone(OFFLINE_BACKBONE, 5, data_root=tmp_path)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    assert model.head.out_features == 5
    # A cache from another architecture is refused, with the rebuild command.
    save_file({"pos_embed": torch.zeros(1, 5, 192)}, str(path))
    with pytest.raises(BackboneError, match="robustbench_fvae.pretrain --force"):
        create_backbone(OFFLINE_BACKBONE, 5, data_root=tmp_path)


def test_pretraining_writes_the_cache_and_keeps_the_callers_rng(tmp_path):
    from robustbench_fvae.pretrain import PretrainConfig

    tiny = PretrainConfig(epochs=1, n_train=24, n_test=12, batch_size=12)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    path = ensure_offline_backbone(tmp_path, progress=False, config=tiny)
    # Pretraining on first use must not shift the caller's random stream (same seed, same run).
    torch.testing.assert_close(torch.rand(3), expected)
    assert path == offline_cache_path(tmp_path) and path.is_file()
    summary = json.loads(path.with_suffix(".json").read_text())
    assert 0.0 <= summary["source_test_acc"] <= 1.0 and summary["config"]["n_train"] == 24
    assert summary["source_task"]["classes"] == ["Bear", "Cow", "Elephant", "Giraffe", "Sheep",
                                                 "Zebra"]
    model = create_backbone(OFFLINE_BACKBONE, 2, data_root=tmp_path)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2)
    assert not list(path.parent.glob("*.tmp"))
