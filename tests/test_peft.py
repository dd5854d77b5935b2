"""The peft library's methods as ``peft-<name>``: each trains through the real runner on a tiny
timm ViT, reloads in plain ``peft`` to the run's own predictions, takes its options into the
config and hash, and works with every training algorithm; our LoRA equals peft's number for
number and its runs reload in plain peft too."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import peft
import pytest
import timm
import torch
from data_fixtures import make_waterbirds
from tiny_models import register_tiny_vit, save_tiny_weights

from robustbench_fvae import records
from robustbench_fvae.backbones import backbone_data_config, create_backbone
from robustbench_fvae.config import AdapterConfig, ConfigError, RunConfig, TrainConfig, config_hash
from robustbench_fvae.data import load_splits, make_transforms
from robustbench_fvae.methods import get_method, method_names
from robustbench_fvae.methods.lora import lora_as_peft
from robustbench_fvae.methods.peft_zoo import PEFT_METHODS, peft_model_of
from robustbench_fvae.methods.setup import inject_method, prepare_model
from robustbench_fvae.run import main as run_main
from robustbench_fvae.training import PRETRAINED_DIR, resolve_config, run

PEFT = sorted(m for m in method_names() if m.startswith("peft-"))
ROOT = Path(__file__).resolve().parent.parent
LISTED = ("lora", "dora", "rslora", "pissa", "vera", "loha", "lokr", "ia3", "oft", "boft",
          "fourierft", "hra", "adalora")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("peft")
    make_waterbirds(base / "data" / "synth", synthetic_name="synth-waterbirds")
    return {"data": base / "data", "weights": save_tiny_weights(base / "tiny.safetensors"),
            "name": register_tiny_vit()}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_cfg(env, out, method: str, peft_options: dict | None = None, **train) -> RunConfig:
    settings = dict(epochs=1, batch_size=4, eval_batch_size=16, seed=0, patience=0)
    settings.update(train)
    return RunConfig(method=method, dataset="synth-waterbirds", data_root=str(env["data"]),
                     out=str(out), backbone=env["name"], weights=str(env["weights"]),
                     device="cpu", num_workers=0,
                     adapter=AdapterConfig(rank=4, peft_options=peft_options or {}),
                     train=TrainConfig(**settings))


def quiet(_msg: str) -> None:
    pass


def plain_peft_probabilities(env, run_dir) -> np.ndarray:
    """The test split's class probabilities from the run's timm backbone (its weights file, a
    new 2-class head) + plain ``PeftModel.from_pretrained``."""
    base = create_backbone(env["name"], 2, weights=env["weights"])
    model = peft.PeftModel.from_pretrained(base, str(run_dir / PRETRAINED_DIR)).eval()
    test = load_splits("synth-waterbirds", str(env["data"]))["test"]
    dc = backbone_data_config(base)
    _, test.transform = make_transforms(dc.image_size, dc.mean, dc.std, augment="none",
                                        family="synth-waterbirds")
    with torch.no_grad():
        images = torch.stack([test[i][0] for i in range(len(test))])
        return model(images).softmax(-1).numpy()


def test_every_listed_peft_method_is_registered():
    assert sorted(PEFT) == sorted(f"peft-{m}" for m in LISTED)
    assert set(PEFT_METHODS) == set(LISTED)


@pytest.mark.parametrize("method", PEFT)
def test_each_peft_method_trains_and_reloads_in_plain_peft(env, tmp_path, method):
    result = run(tiny_cfg(env, tmp_path, method), progress=False, log=quiet)
    params = result.metrics["params"]
    assert 0 < params["trainable"] < params["frozen"]
    history = records.read_history(result.run_dir / "history.jsonl")
    assert math.isfinite(history[0]["train"]["ce"])
    saved = json.loads((result.run_dir / PRETRAINED_DIR / "adapter_config.json").read_text())
    assert saved["peft_type"] == peft.PeftType[PEFT_METHODS[method[5:]].config[:-6].upper()]
    assert saved["modules_to_save"] == ["head"]
    predictions = records.read_predictions(records.predictions_path(result.run_dir, "test"))
    probabilities = plain_peft_probabilities(env, result.run_dir)
    np.testing.assert_array_equal(probabilities.argmax(-1), predictions["pred"])
    np.testing.assert_allclose(probabilities[:, 1], predictions["prob"][:, 1], atol=1e-5)


@pytest.mark.parametrize("method", ["peft-dora", "peft-adalora"])
@pytest.mark.parametrize("algorithm", ["groupdro", "resample", "reweight", "jtt"])
def test_peft_methods_run_with_every_algorithm(env, tmp_path, method, algorithm):
    extra = {"jtt_epochs": 1, "jtt_upweight": 3} if algorithm == "jtt" else {}
    result = run(tiny_cfg(env, tmp_path, method, algorithm=algorithm, **extra), progress=False,
                 log=quiet)
    assert result.metrics["algorithm"]["name"] == algorithm
    (record,) = records.read_history(result.run_dir / "history.jsonl")
    assert math.isfinite(record["train"]["task"])
    assert ("orth" in record["train"]) == (method == "peft-adalora")


def test_peft_options_are_recorded_and_hashed(env, tmp_path):
    plain = resolve_config(tiny_cfg(env, tmp_path, "peft-lora"))
    ranked = resolve_config(tiny_cfg(env, tmp_path, "peft-lora", {"r": 2}))
    assert config_hash(plain) != config_hash(ranked)
    model = timm.create_model(env["name"], num_classes=2)
    prepare_model(model, ranked)
    assert peft_model_of(model).peft_config["default"].r == 2
    # no options: the hash is that of a config without the field (runs recorded before it)
    data = plain.to_dict()
    del data["adapter"]["peft_options"]
    assert config_hash(RunConfig.from_dict(data)) == config_hash(plain)


@pytest.mark.parametrize(("flags", "message"), [
    (["--peft-option", "nonsense=1"], "not fields of peft.LoraConfig"),
    (["--peft-option", "r"], "expected KEY=VALUE"),
    (["--peft-option", "r=-3"], "should be a positive integer"),
])
def test_bad_peft_options_are_one_line_errors_exit_2(env, tmp_path, capsys, flags, message):
    code = run_main(["--method", "peft-lora", "--dataset", "synth-waterbirds", "--data-root",
                     str(env["data"]), "--out", str(tmp_path), "--backbone", env["name"],
                     "--weights", str(env["weights"]), "--no-progress", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_peft_option_values_parse_as_yaml(env, tmp_path):
    from robustbench_fvae.run import build_parser, config_from_args

    args = build_parser().parse_args([
        "--method", "peft-lora", "--dataset", "synth-waterbirds",
        "--peft-option", "use_dora=true", "--peft-option", "target_modules=[qkv, fc1]",
        "--peft-option", "lora_alpha=8"])
    assert config_from_args(args).adapter.peft_options == {
        "lora_alpha": 8, "target_modules": ["qkv", "fc1"], "use_dora": True}
    with pytest.raises(ConfigError, match="peft option"):
        get_method("peft-lora").validate(AdapterConfig(peft_options={"bogus": 1}))


# ---------------------------------------------------------------- our LoRA and theirs


@pytest.mark.parametrize("targets", [("qkv",), ("q", "k"), ("q", "v", "fc1")])
def test_our_lora_equals_peft_lora_number_for_number(env, targets):
    """Our LoRA, written in peft's form (lora_as_peft), loads into a peft LoRA model that
    computes the same outputs: whole-layer targets map one to one, q/k/v slices as one LoRA of
    rank r·|slices| with a block-diagonal B."""
    torch.manual_seed(0)
    ours = timm.create_model(env["name"], num_classes=2)
    base_state = {k: v.clone() for k, v in ours.state_dict().items()}
    inject_method(ours, "lora", AdapterConfig(rank=4, lora_alpha=8.0, targets=targets))
    with torch.no_grad():  # B starts at zero; give every adapter and the head some value
        for p in ours.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    fields, tensors = lora_as_peft(ours)
    theirs = timm.create_model(env["name"], num_classes=2)
    theirs.load_state_dict(base_state)
    model = peft.get_peft_model(theirs, peft.LoraConfig(**fields))
    missing = peft.set_peft_model_state_dict(model, tensors)
    assert not missing.unexpected_keys
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ours.eval()(x), rtol=1e-5, atol=1e-5)


def test_our_lora_run_reloads_in_plain_peft(env, tmp_path):
    result = run(tiny_cfg(env, tmp_path, "lora"), progress=False, log=quiet)
    predictions = records.read_predictions(records.predictions_path(result.run_dir, "test"))
    probabilities = plain_peft_probabilities(env, result.run_dir)
    np.testing.assert_array_equal(probabilities.argmax(-1), predictions["pred"])
    np.testing.assert_allclose(probabilities[:, 1], predictions["prob"][:, 1], atol=1e-5)


def test_peft_lora_equals_our_lora_on_the_whole_qkv(env):
    """The same LoRA (targets the whole qkv, same rank, alpha and values) in both
    implementations: the same logits."""
    torch.manual_seed(0)
    ours = timm.create_model(env["name"], num_classes=2)
    theirs = timm.create_model(env["name"], num_classes=2)
    theirs.load_state_dict(ours.state_dict())
    inject_method(ours, "lora", AdapterConfig(rank=4, lora_alpha=8.0, lora_dropout=0.0,
                                              targets=("qkv",)))
    prepare_model(theirs, RunConfig(method="peft-lora", adapter=AdapterConfig(
        rank=4, lora_alpha=8.0, lora_dropout=0.0)))
    with torch.no_grad():
        for i, block in enumerate(ours.blocks):
            adapter = block.attn.qkv.adapters["all"]
            adapter.lora_B.normal_()
            layer = theirs.blocks[i].attn.qkv
            layer.lora_A["default"].weight.copy_(adapter.lora_A)
            layer.lora_B["default"].weight.copy_(adapter.lora_B)
        theirs.head.modules_to_save["default"].load_state_dict(ours.head.state_dict())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(x), ours.eval()(x), rtol=1e-5, atol=1e-5)


def test_adalora_allocator_state_round_trips(env):
    """AdaLoRA's rank allocator (importance averages, final rank pattern) lives outside the
    parameters; the method's state hooks carry it through a checkpoint."""
    method = get_method("peft-adalora")
    cfg = RunConfig(method="peft-adalora", adapter=AdapterConfig(rank=4))
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = timm.create_model(env["name"], num_classes=2)
        prepare_model(model, cfg)
        method.start_training(model, 20)
        models.append(model)
    trained, fresh = models
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    for step in range(1, 6):
        loss, _ = method.loss(trained, torch.nn.functional.cross_entropy(trained(x), y), cfg)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.after_step(trained, step)
    state = method.state(trained)
    assert state["exp_avg_ipt"] and all(t.abs().sum() > 0 for t in state["exp_avg_ipt"].values())
    method.load_state(fresh, state)
    again = method.state(fresh)
    for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        assert again[key].keys() == state[key].keys()
        for name in state[key]:
            torch.testing.assert_close(again[key][name], state[key][name], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["peft-lokr", "peft-ia3"])
def test_dfr_on_a_finished_peft_run(env, tmp_path, method):
    from robustbench_fvae.dfr import run_dfr

    parent = run(tiny_cfg(env, tmp_path / "runs", method), progress=False, log=quiet)
    result = run_dfr(parent.run_dir, out=tmp_path / "dfr", refits=2, device="cpu", log=quiet)
    assert records.is_done(result.run_dir)
    assert 0.0 <= result.metrics["test"]["worst_group_acc"] <= 1.0


def test_committed_methods_tables_are_current():
    """README.md and docs/methods.md quote `python -m robustbench_fvae.methods --write`."""
    from robustbench_fvae.methods.__main__ import main

    assert main(["--check", "--root", str(ROOT)]) == 0


def probed_peft_run(env, tmp_path, capsys, method):
    """Train ``method`` on the tiny ViT, check that its probe form is the same function (atol
    1e-5) with our AdaptedLinear layers in it, and probe it; returns (what probe printed, its
    output folder)."""
    from robustbench_fvae.probe import main as probe_main
    from robustbench_fvae.training import load_trained_model

    result = run(tiny_cfg(env, tmp_path, method), progress=False, log=quiet)
    model, _, splits = load_trained_model(result.run_dir)
    images = torch.stack([splits["test"][i][0] for i in range(8)])
    with torch.no_grad():
        before = model(images)
        after = get_method(method).probe_form(model)(images)
    assert any(type(m).__name__ == "AdaptedLinear" for m in model.modules())
    assert torch.allclose(before, after, atol=1e-5), (before - after).abs().max()
    out = tmp_path / "probe"
    code = probe_main([str(result.run_dir), "--layers", "0", "--max-images", "10",
                       "--tsne-max", "0", "--device", "cpu", "--no-progress", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    return printed.out, out


@pytest.mark.parametrize("method", ["peft-vera", "peft-dora", "peft-ia3"])
def test_probe_reads_the_update_of_other_peft_methods_and_says_so(env, tmp_path, capsys, method):
    """A peft method without an A x code: `probe` wraps each tuner layer so that its adapter's
    output is the update (layer output − base output; the same model function), says so, and
    measures the update, its interventions and the parameters' displacement."""
    import csv

    printed, out = probed_peft_run(env, tmp_path, capsys, method)
    assert "no code of its own: probing its adapted layers' update" in printed
    with open(out / "probes.csv", newline="") as f:
        latents = {r["latent"] for r in csv.DictReader(f)}
    assert "update" in latents and "lora" not in latents
    with open(out / "updates.csv", newline="") as f:
        sizes = list(csv.DictReader(f))
    assert sizes and all(float(r["update_ratio_median"]) >= 0 for r in sizes)
    assert all(float(r["displacement"]) > 0 for r in sizes)  # the method's parameters moved


@pytest.mark.parametrize("method", ["peft-lora", "peft-rslora", "peft-pissa"])
def test_probe_reads_the_code_of_peft_plain_lora_layers(env, tmp_path, capsys, method):
    """peft's plain LoRA layers, rewritten as ours (the same base layer, A, B and scaling), are
    the same function to float rounding; `probe` then reads their code A x, the update and its
    interventions as it reads our LoRA's."""
    import csv

    _, out = probed_peft_run(env, tmp_path, capsys, method)
    with open(out / "probes.csv", newline="") as f:
        latents = {(r["layer"], r["latent"]) for r in csv.DictReader(f)}
    assert {("blocks.0.attn.qkv:all", "lora"), ("blocks.0.attn.qkv:all", "update"),
            ("blocks.0.attn.qkv:all", "lora_init")} <= latents
    with open(out / "interventions.csv", newline="") as f:
        assert {r["intervention"] for r in csv.DictReader(f)} >= {"zero", "mean"}


@pytest.mark.parametrize("method", PEFT)
def test_each_peft_method_trains_under_bf16_autocast(env, method):
    """The run's CUDA path is bf16 autocast; CPU autocast casts the same linear and matmul ops.
    Each method's logits under it are bf16 and within bf16 rounding of the fp32 ones, and one
    training step gives a finite loss and finite gradients on every trainable tensor, some of
    them non-zero."""
    torch.manual_seed(0)
    model = timm.create_model(env["name"], num_classes=2)
    prepare_model(model, tiny_cfg(env, "unused", method))
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    with torch.no_grad():  # many methods start as the identity: move them off it
        start = model.eval()(x)
        for name, p in model.named_parameters():
            if p.requires_grad and "head" not in name:
                p.add_(torch.randn_like(p), alpha=0.1)
        reference = model(x)
        assert (reference - start).abs().max() > 1e-4  # the adapted layers are on the path
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), reference, rtol=0.05, atol=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model.train()(x).float(), y)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert math.isfinite(loss.item()) and grads and all(g is not None for g in grads)
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
