"""Adapters against their definitions (docs/methods.md), against PEFT, and inside real timm ViTs."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

from robustbench_fvae.adapters import (
    AdapterError,
    FVAEAdapter,
    FVAEObjective,
    LoRAAdapter,
    adapted_layers,
    collect_aux_loss,
    count_parameters,
    merge_adapters,
    record_latents,
    set_eval_fusion,
    unmerge_adapters,
)
from robustbench_fvae.adapters.inject import AdaptedLinear
from robustbench_fvae.config import AdapterConfig, ConfigError
from robustbench_fvae.methods.fvae import fvae_objective
from robustbench_fvae.methods.setup import inject_method


def tiny_vit(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             depth=2, num_classes=num_classes)


def randomize_(module: nn.Module, std: float = 0.3, seed: int = 1) -> None:
    """Move every parameter off its init so zero-initialised heads and B matter in the tests."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def fvae_layer(d: int = 12, r: int = 4, objective: FVAEObjective | None = None) -> FVAEAdapter:
    torch.manual_seed(0)
    layer = FVAEAdapter(d, 10, r, objective=objective, encoder_hidden=8, decoder_hidden=16,
                        dropout=0.0)
    randomize_(layer)
    return layer


# ---------------------------------------------------------------- LoRA


def test_lora_model_equals_base_at_init():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    before = model(x)
    inject_method(model, "lora", AdapterConfig(rank=4, targets=("q", "k", "v", "fc1")))
    model.eval()
    assert torch.equal(model(x), before)


def test_lora_merge_unmerge_matches_unmerged_logits():
    model = tiny_vit()
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    base = model(x)
    inject_method(model, "lora", AdapterConfig(rank=4, targets=("q", "v", "proj")))
    randomize_(nn.ModuleList(adapted_layers(model).values()), std=0.2)
    model.eval()
    unmerged = model(x)
    assert not torch.allclose(unmerged, base, atol=1e-3)
    weights_before = {n: p.clone() for n, p in model.named_parameters()}
    merge_adapters(model)
    merged = model(x)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    unmerge_adapters(model)
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, weights_before[n], rtol=0, atol=1e-6)


def test_lora_matches_peft_on_the_same_linear():
    import peft  # a dev dependency: its absence must fail the suite, not skip this check
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 18))
    peft_model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["0"]))
    peft_layer = peft_model.base_model.model[0]
    ours = LoRAAdapter(24, 18, rank=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        peft_layer.lora_B["default"].weight.normal_()
        ours.lora_A.copy_(peft_layer.lora_A["default"].weight)
        ours.lora_B.copy_(peft_layer.lora_B["default"].weight)
    x = torch.randn(5, 7, 24)
    expected = peft_model(x)
    got = peft_layer.base_layer(x) + ours(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.delta_weight(), peft_layer.get_delta_weight("default"))


# ---------------------------------------------------------------- FVAE math


def test_closed_form_kl_and_repulsive_term_equal_monte_carlo():
    layer = fvae_layer()
    layer.train()
    x = torch.randn(3, 5, 12)
    with torch.no_grad():
        m1, lv1 = layer.encoder1(x)
        m2, lv2 = layer.encoder2(x)
        _, parts = layer.sample_and_score(x)
        n = 40_000
        s1, s2 = (0.5 * lv1).exp(), (0.5 * lv2).exp()
        z1 = m1 + s1 * torch.randn((n, *m1.shape))
        z2 = m2 + s2 * torch.randn((n, *m2.shape))
        q1 = torch.distributions.Normal(m1, s1)
        q2 = torch.distributions.Normal(m2, s2)
        p1 = torch.distributions.Normal(torch.zeros_like(m1), 1.0)
        p2 = torch.distributions.Normal(torch.full_like(m2, layer.mu_p2), 1.0)
        k1_mc = (q1.log_prob(z1) - p1.log_prob(z1)).sum(-1).mean()
        k2_mc = (q2.log_prob(z2) - p2.log_prob(z2)).sum(-1).mean()
        # The released code's one-sample estimate, averaged over many samples.
        g_mc = z1.square().mean() - (z2 - layer.mu_p2).square().mean()
    assert parts["K1"].item() > 0.05 and parts["K2"].item() > 0.05
    torch.testing.assert_close(parts["K1"], k1_mc, rtol=0.02, atol=0.01)
    torch.testing.assert_close(parts["K2"], k2_mc, rtol=0.02, atol=0.01)
    torch.testing.assert_close(parts["G"], g_mc, rtol=0.02, atol=0.01)


def test_reconstruction_term_is_the_gaussian_negative_log_density():
    layer = fvae_layer()
    x = torch.randn(2, 6, 12)
    z = torch.randn(2, 6, 8)
    with torch.no_grad():
        ours = layer.decoder.negative_log_likelihood(x, z)
        scale = layer.decoder.log_scale.exp()
        direct = -torch.distributions.Normal(layer.decoder(z), scale).log_prob(x).sum(-1)
        # The released formulation: a dense MultivariateNormal with a diagonal scale_tril.
        dense = -torch.distributions.MultivariateNormal(
            loc=x, scale_tril=torch.diag(scale)).log_prob(layer.decoder(z))
    torch.testing.assert_close(ours, direct, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours, dense, rtol=1e-5, atol=1e-4)


def test_per_layer_loss_equals_released_formula_in_expectation():
    """α = β = δ = 1: ℓ = NLL + mean((z2 − 1.5)²) − mean(z1²) + KL1, the released objective."""
    layer = fvae_layer(objective=FVAEObjective(1.0, 1.0, 0.0, 1.0))
    layer.train()
    x = torch.randn(2, 4, 12)
    torch.manual_seed(3)
    ours, released = [], []
    with torch.no_grad():
        m1, lv1 = layer.encoder1(x)
        m2, lv2 = layer.encoder2(x)
        kl1 = (0.5 * (m1.square() + lv1.exp() - 1 - lv1).sum(-1)).mean()
        for _ in range(4000):
            layer(x)
            ours.append(layer.loss)
            z1 = m1 + (0.5 * lv1).exp() * torch.randn_like(m1)
            z2 = m2 + (0.5 * lv2).exp() * torch.randn_like(m2)
            nll = -torch.distributions.Normal(layer.decoder(torch.cat([z1, z2], -1)),
                                              layer.decoder.log_scale.exp()).log_prob(x).sum(-1)
            released.append(nll.mean() + (z2 - 1.5).square().mean() - z1.square().mean() + kl1)
    ours_mean, released_mean = torch.stack(ours).mean(), torch.stack(released).mean()
    spread = torch.stack(released).std() / math.sqrt(len(released))
    assert abs(ours_mean - released_mean) < 5 * spread + 1e-3, (ours_mean, released_mean, spread)


def _per_encoder_sample_and_score(layer: FVAEAdapter, x: torch.Tensor):
    """The FVAE training computation written plainly: encoder 1 then encoder 2 as modules,
    ``randn_like`` noise for each, the decoder's density through ``torch.distributions``."""
    mean1, logvar1 = layer.encoder1(x)
    mean2, logvar2 = layer.encoder2(x)
    z1 = mean1 + (0.5 * logvar1).exp() * torch.randn_like(mean1)
    z2 = mean2 + (0.5 * logvar2).exp() * torch.randn_like(mean2)
    recon = layer.decoder(torch.cat([z1, z2], -1))
    nll = -torch.distributions.Normal(recon, layer.decoder.log_scale.exp()).log_prob(x).sum(-1)
    m2 = mean2 - layer.mu_p2
    parts = {
        "R": nll.mean(),
        "K1": (0.5 * (mean1.square() + logvar1.exp() - 1 - logvar1).sum(-1)).mean(),
        "K2": (0.5 * (m2.square() + logvar2.exp() - 1 - logvar2).sum(-1)).mean(),
        "G": (mean1.square() + logvar1.exp()).mean() - (m2.square() + logvar2.exp()).mean(),
    }
    return z1, parts


@pytest.mark.parametrize("rank,dropout,shape,enc2_dropout", [
    (4, 0.3, (3, 5), "same"), (16, 0.1, (2, 8), "same"), (3, 0.0, (7,), "same"),
    (4, 0.2, (3, 5), "eval"), (4, 0.2, (3, 5), "one")])
def test_training_path_equals_the_per_encoder_formulation_draw_for_draw(rank, dropout, shape,
                                                                         enc2_dropout):
    """The stacked training computation (both encoders in one pass) gives the per-encoder
    values and every gradient, with the same random draws (float64; token counts whose noise
    is not a multiple of 16 values included, where one joint draw would differ; encoder 2's
    dropout module also in eval mode, or at p = 1)."""
    torch.manual_seed(0)
    layer = FVAEAdapter(12, 10, rank, encoder_hidden=8, decoder_hidden=16,
                        dropout=dropout).double().train()
    randomize_(layer)
    if enc2_dropout == "eval":
        layer.encoder2.trunk[2].eval()
    elif enc2_dropout == "one":
        layer.encoder2.trunk[2].p = 1.0
    x = torch.randn(*shape, 12, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(*shape, rank, dtype=torch.float64)
    results = []
    for compute in (FVAEAdapter.sample_and_score, _per_encoder_sample_and_score):
        torch.manual_seed(5)
        z1, parts = compute(layer, x)
        total = (z1 * weights).sum() + sum((i + 1) * v for i, v in enumerate(parts.values()))
        grads = torch.autograd.grad(total, [x, *layer.parameters()], allow_unused=True)
        results.append((z1, parts, grads, torch.rand(())))
    (z1, parts, grads, after), (z1_ref, parts_ref, grads_ref, after_ref) = results
    torch.testing.assert_close(z1, z1_ref)
    assert parts.keys() == parts_ref.keys()
    for k in parts:
        torch.testing.assert_close(parts[k], parts_ref[k])
    names = ["x", *(n for n, _ in layer.named_parameters())]
    for name, got, want in zip(names, grads, grads_ref):
        if want is None:  # B is unused here; the eval head neither
            assert got is None or not got.any(), name
        else:
            torch.testing.assert_close(got, want, msg=name)
    assert torch.equal(after, after_ref), "both paths must consume the same random numbers"


def test_objectives_of_the_three_methods():
    parts = {"R": torch.tensor(2.0), "K1": torch.tensor(3.0), "K2": torch.tensor(5.0),
             "G": torch.tensor(7.0)}
    assert fvae_objective("fvae", AdapterConfig())(parts).item() == pytest.approx(2 + 3 - 7)
    assert fvae_objective("vae2lat", AdapterConfig())(parts).item() == pytest.approx(2 + 3 + 5)
    assert fvae_objective("bvae2lat", AdapterConfig())(parts).item() == \
        pytest.approx(2 + 10 * (3 + 5))
    assert fvae_objective("fvae", AdapterConfig(alpha=0.1, beta=10, delta=2))(parts).item() == \
        pytest.approx(0.2 + 30 - 14)


@pytest.mark.parametrize("method", ["vae2lat", "bvae2lat"])
def test_ablations_differ_from_fvae_only_in_the_objective(method):
    cfg = AdapterConfig(rank=4, targets=("q",))
    models = {}
    for m in ("fvae", method):
        models[m] = tiny_vit()
        inject_method(models[m], m, cfg)
    shapes = {m: [(n, p.shape) for n, p in model.named_parameters()] for m, model in models.items()}
    assert shapes["fvae"] == shapes[method]
    for m, model in models.items():
        torch.manual_seed(5)
        model.train()
        model(torch.randn(2, 3, 32, 32))
        models[m] = collect_aux_loss(model)
    (loss_f, parts_f), (loss_a, parts_a) = models["fvae"], models[method]
    for k in parts_f:
        torch.testing.assert_close(parts_f[k], parts_a[k])
    objective = fvae_objective(method, AdapterConfig())
    torch.testing.assert_close(loss_a, objective(parts_a))
    assert not torch.allclose(loss_f, loss_a)


@pytest.mark.parametrize("fused", [True, False])
def test_eval_path_reads_only_encoder1_mean_and_B_and_is_deterministic(fused):
    model = tiny_vit()
    inject_method(model, "fvae", AdapterConfig(rank=4, targets=("q", "k")))
    randomize_(nn.ModuleList(adapted_layers(model).values()), std=0.2)
    set_eval_fusion(model, fused)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        reference = model(x)
        # Poison what eval must not read: encoder 2, encoder 1's log-variance head, the decoder.
        for adapter in adapted_layers(model).values():
            for part in ("encoder2", "encoder1.logvar", "decoder"):
                for p in adapter.get_submodule(part).parameters():
                    p.fill_(float("nan"))
        first, second = model(x), model(x)
    assert torch.equal(first, reference) and torch.equal(first, second)
    model.train()
    model(x)
    aux, _ = collect_aux_loss(model)
    assert torch.isnan(aux), "training must read the poisoned parts (else the check is void)"


def test_gradients_reach_every_trainable_part_and_never_the_frozen_base():
    model = tiny_vit()
    inject_method(model, "fvae", AdapterConfig(rank=4, targets=("q", "k")), num_classes=3)
    # The heads start at zero (released init), which zeroes the trunks' first gradient.
    randomize_(nn.ModuleList(adapted_layers(model).values()), std=0.2)
    model.train()
    logits = model(torch.randn(4, 3, 32, 32))
    aux, _ = collect_aux_loss(model)
    (nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0])) + aux).backward()
    adapter = adapted_layers(model)["blocks.1.attn.qkv:k"]
    for part in ("encoder1.trunk.0.weight", "encoder1.mean.weight", "encoder1.logvar.weight",
                 "encoder2.trunk.0.weight", "encoder2.mean.weight", "encoder2.logvar.weight",
                 "decoder.net.0.weight", "decoder.net.9.weight", "decoder.log_scale", "lora_B"):
        grad = adapter.get_parameter(part).grad
        assert grad is not None and grad.abs().sum() > 0, part
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        if ".adapters." not in name and not name.startswith("head."):
            assert not p.requires_grad and p.grad is None, name


def test_collect_aux_loss_is_the_mean_over_layers_and_clears():
    model = tiny_vit()
    names = inject_method(model, "fvae", AdapterConfig(rank=4, targets=("q", "k")))
    assert len(names) == 4
    model.train()
    model(torch.randn(2, 3, 32, 32))
    layers = list(adapted_layers(model).values())
    expected = torch.stack([a.loss for a in layers]).mean()
    expected_r = torch.stack([a.loss_parts["R"] for a in layers]).mean()
    loss, parts = collect_aux_loss(model)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(parts["R"], expected_r)
    assert collect_aux_loss(model) == (None, {})


def test_fvae_refuses_to_merge():
    model = tiny_vit()
    inject_method(model, "fvae", AdapterConfig(rank=4, targets=("q",)))
    with pytest.raises(AdapterError, match="only LoRA merges"):
        merge_adapters(model)


# ---------------------------------------------------------------- injection


@pytest.mark.parametrize("target", ["q", "k", "v"])
def test_adapting_one_qkv_slice_leaves_the_others_bit_identical(target):
    model = tiny_vit()
    qkv = model.blocks[0].attn.qkv
    x = torch.randn(2, 17, qkv.in_features)
    with torch.no_grad():
        before = qkv(x)
    inject_method(model, "lora", AdapterConfig(rank=4, targets=(target,)))
    randomize_(nn.ModuleList(adapted_layers(model).values()))
    model.eval()
    with torch.no_grad():
        after = model.blocks[0].attn.qkv(x)
    d = qkv.in_features
    for i, name in enumerate("qkv"):
        part_before, part_after = before[..., i * d:(i + 1) * d], after[..., i * d:(i + 1) * d]
        if name == target:
            assert not torch.equal(part_before, part_after)
        else:
            assert torch.equal(part_before, part_after)


def test_unknown_or_unmatched_targets_are_errors():
    with pytest.raises(AdapterError, match="matches no nn.Linear"):
        inject_method(tiny_vit(), "lora", AdapterConfig(targets=("query",)))
    with pytest.raises(AdapterError, match="classifier head"):
        inject_method(tiny_vit(), "lora", AdapterConfig(targets=("head",)))
    with pytest.raises(AdapterError, match="overlap"):
        inject_method(tiny_vit(), "lora", AdapterConfig(targets=("q", "qkv")))
    with pytest.raises(ConfigError, match="no adapters"):
        inject_method(tiny_vit(), "full", AdapterConfig())


@pytest.mark.parametrize("cfg, method, message", [
    (AdapterConfig(rank=0), "fvae", "rank must be >= 1"),
    (AdapterConfig(beta=0.1, delta=1.0, rank=16), "fvae", "unbounded below"),
    (AdapterConfig(alpha=-1.0), "fvae", "alpha must be a non-negative"),
    (AdapterConfig(delta=float("nan")), "fvae", "delta must be a non-negative"),
    (AdapterConfig(targets=()), "lora", "at least one layer"),
])
def test_bad_settings_are_refused(cfg, method, message):
    with pytest.raises(ConfigError, match=message):
        inject_method(tiny_vit(), method, cfg)


def test_linear_targets_by_name_suffix():
    model = tiny_vit()
    names = inject_method(model, "fvae", AdapterConfig(rank=4, targets=("mlp.fc2", "v")))
    assert names == ["blocks.0.mlp.fc2:all", "blocks.1.mlp.fc2:all",
                     "blocks.0.attn.qkv:v", "blocks.1.attn.qkv:v"]
    assert set(adapted_layers(model)) == set(names)


@pytest.mark.parametrize("method", ["lora", "fvae", "vae2lat", "bvae2lat"])
def test_tiny_vit_trains_and_evaluates(method):
    model = tiny_vit()
    inject_method(model, method, AdapterConfig(rank=4, targets=("q", "k")), num_classes=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    y = (x[:, 0].mean((1, 2)) > 0).long()
    losses = []
    model.train()
    for _ in range(25):
        logits = model(x)
        ce = nn.functional.cross_entropy(logits, y)
        aux, _ = collect_aux_loss(model)
        loss = ce if aux is None else ce + 1e-3 * aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(ce.item())
    assert math.isfinite(losses[-1]) and losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (8, 2)


def test_record_latents_shapes_and_unknown_layer():
    model = tiny_vit()
    inject_method(model, "fvae", AdapterConfig(rank=4, targets=("q",)))
    model.eval()
    with record_latents(model, ["blocks.1.attn.qkv:q"]) as store, torch.no_grad():
        model(torch.randn(3, 3, 32, 32))
    latents = store["blocks.1.attn.qkv:q"]
    assert set(latents) == {"z1", "z2"}
    assert latents["z1"][0].shape == (3, 17, 4)
    with pytest.raises(AdapterError, match="unknown adapted layer"), record_latents(model, ["x"]):
        pass


def test_vit_b16_parameter_counts_match_the_reference_arithmetic():
    """Reference (released code, ViT-B/16, 24 adapted modules): FVAE trainable 175,088 per layer
    including an unused 16-value ``lora_E`` we do not have; inference path: encoder-1 trunk and
    mean head (12,576) + B (12,288). LoRA r=16: 24,576 per layer."""
    counts = {}
    for method in ("lora", "fvae"):
        with torch.device("meta"):
            model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=2)
        inject_method(model, method, AdapterConfig(rank=16, targets=("q", "v")))
        counts[method] = count_parameters(model)
    head = 768 * 2 + 2
    assert counts["lora"]["trainable"] == 24 * 24_576 + head
    assert counts["lora"]["inference"] == 24 * 24_576 + head
    assert counts["fvae"]["trainable"] == 24 * (175_088 - 16) + head
    assert counts["fvae"]["inference"] == 24 * (12_304 + 272 + 12_288) + head
    assert counts["fvae"]["frozen"] == counts["lora"]["frozen"] == 85_798_656
    ratio = counts["fvae"]["inference"] / counts["lora"]["inference"]
    assert 1.0 < ratio < 1.02


def _decoder_reference(decoder, x, z, masks, k):
    """``−log p(x|z)`` through the decoder's own Linear modules, ReLU, decoder ``k``'s drawn 0/1
    keep masks times their scales and ``torch.distributions.Normal``: autograd end to end."""
    linears = [m for m in decoder.net if isinstance(m, nn.Linear)]
    h = z
    for lin, mask in zip(linears[:-1], masks):
        h = torch.relu(lin(h))
        if mask.values is not None:
            h = h * mask.values[k] * mask.scales[k]
    return -torch.distributions.Normal(linears[-1](h), decoder.log_scale.exp()).log_prob(x).sum(-1)


@pytest.mark.parametrize("layers", [3, 1])
def test_decoder_node_equals_autograd_of_the_decoder_and_density(layers):
    """The hand-written decoder + density node, for K = 3 decoders at once (dropout p = 0.3,
    one decoder with dropout off, one hidden layer of another at p = 1), equals autograd through
    the modules in float64, in value and in every gradient (target, latents, weights, biases,
    log-scales); gradcheck on top; an input that needs no gradient gets none."""
    from robustbench_fvae.adapters.fvae import GaussianDecoder, decoder_keep_masks, decoder_nll

    torch.manual_seed(0)
    decoders = [GaussianDecoder(6, 5, layers, 7, dropout=0.3).double().train() for _ in range(3)]
    for seed, dec in enumerate(decoders):
        randomize_(dec, seed=seed)
    decoders[1].eval()
    decoders[2].dropouts()[0].p = 1.0
    x = torch.randn(9, 7, dtype=torch.float64, requires_grad=True)
    z = torch.randn(3, 9, 6, dtype=torch.float64, requires_grad=True)
    masks = decoder_keep_masks(decoders, 9, x)
    for k in range(3):
        for mask in masks:
            mask.draw(k)
    assert masks[0].values[1].eq(1).all() and masks[0].values[2].eq(0).all()
    assert 0 < masks[0].values[0].mean() < 1 and masks[0].scales == [1 / 0.7, 1.0, 1.0]
    weights = torch.randn(3, 9, dtype=torch.float64)
    params = [p for dec in decoders for p in dec.parameters()]
    ours = decoder_nll(decoders, x, z, masks)
    grads = torch.autograd.grad((ours * weights).sum(), [x, z, *params])
    direct = torch.stack([_decoder_reference(dec, x, z[k], masks, k)
                          for k, dec in enumerate(decoders)])
    expected = torch.autograd.grad((direct * weights).sum(), [x, z, *params])
    torch.testing.assert_close(ours, direct)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(lambda x, z: decoder_nll(decoders, x, z, masks), (x, z))
    x.requires_grad_(False)
    assert torch.autograd.grad(decoder_nll(decoders, x, z, masks).sum(), z)[0].shape == z.shape


def _qkv_layer(dropouts: dict[str, float], dtype=torch.float64) -> AdaptedLinear:
    """A 12-wide ``qkv`` layer with an FVAE adapter on each slice, off its init."""
    torch.manual_seed(0)
    layer = AdaptedLinear(nn.Linear(12, 36))
    for i, (key, p) in enumerate(dropouts.items()):
        layer.add_adapter(key, FVAEAdapter(12, 12, 4, encoder_hidden=8, decoder_hidden=16,
                                           dropout=p), 12 * i, 12 * (i + 1))
    randomize_(layer)
    return layer.to(dtype).train()


@pytest.mark.parametrize("shape", [(3, 5), (7,)])
def test_fvae_slices_train_as_one_batch_equal_to_the_per_encoder_formulation(shape):
    """A qkv layer with three FVAE slices in training (one batch, :func:`training_deltas`)
    gives the output, every adapter's loss parts and every gradient of the plain per-adapter,
    per-encoder computation run slice after slice, with the same random draws (float64;
    dropout differs per slice, one slice's decoder dropout in eval)."""
    layer = _qkv_layer({"q": 0.2, "k": 0.0, "v": 0.4})
    layer.adapters["v"].decoder.dropouts()[1].eval()
    assert layer._fvae_batch()
    x = torch.randn(*shape, 12, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(*shape, 36, dtype=torch.float64)
    params = [x, *layer.adapters.parameters()]

    def reference():
        out = layer.base(x)
        deltas, parts = [], {}
        for key, adapter in layer.adapters.items():
            z1, parts[key] = _per_encoder_sample_and_score(adapter, x)
            deltas.append(adapter.output_scale * z1 @ adapter.lora_B.t())
        return out + torch.cat(deltas, -1), parts

    def batched():
        out = layer(x)
        return out, {key: a.loss_parts for key, a in layer.adapters.items()}

    results = []
    for compute in (batched, reference):
        torch.manual_seed(5)
        out, parts = compute()
        total = (out * weights).sum() + sum((i + 1) * v for i, p in enumerate(parts.values())
                                            for v in p.values())
        grads = torch.autograd.grad(total, params)
        results.append((out, parts, grads, torch.rand(())))
    (out, parts, grads, after), (out_ref, parts_ref, grads_ref, after_ref) = results
    torch.testing.assert_close(out, out_ref)
    for key in parts_ref:
        for part in parts_ref[key]:
            torch.testing.assert_close(parts[key][part], parts_ref[key][part])
    names = ["x", *(n for n, _ in layer.named_parameters() if n.startswith("adapters."))]
    assert len(names) == 1 + 3 * 22  # every adapter parameter reaches the loss
    for name, got, want in zip(names, grads, grads_ref):
        torch.testing.assert_close(got, want, msg=name)
    assert torch.equal(after, after_ref), "both paths must consume the same random numbers"


def test_fvae_slices_train_under_bf16_autocast_with_the_density_in_fp32():
    """Under bf16 autocast the encoders run in bf16 and the decoder node in fp32: the same
    draws give loss parts close to the fp32 ones, the reconstruction term in fp32, and
    gradients in the parameters' dtype."""
    layer = _qkv_layer({"q": 0.1, "k": 0.1, "v": 0.1}, dtype=torch.float32)
    x = torch.randn(2, 5, 12)
    parts = []
    for enabled in (False, True):
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            out = layer(x)
        parts.append({k: dict(a.loss_parts) for k, a in layer.adapters.items()})
    assert out.dtype == torch.bfloat16
    for key, reference in parts[0].items():
        assert parts[1][key]["R"].dtype == torch.float32
        for name, value in reference.items():
            torch.testing.assert_close(parts[1][key][name].float(), value, rtol=0.05, atol=0.05)
    (out.float().sum() + sum(a.loss.float() for a in layer.adapters.values())).backward()
    grads = [p.grad for p in layer.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and g.isfinite().all() for g in grads)


def test_fvae_slices_train_one_by_one_when_hooked_or_of_different_shapes():
    """A forward hook on an adapter, or adapters of different shapes, take the per-adapter
    path (so the hook fires), with the same values as the batch."""
    layer = _qkv_layer({"q": 0.1, "k": 0.1}, dtype=torch.float32)
    x = torch.randn(2, 5, 12)
    torch.manual_seed(3)
    batched = layer(x)
    calls = []
    handle = layer.adapters["k"].register_forward_hook(lambda *args: calls.append(1))
    assert not layer._fvae_batch()
    torch.manual_seed(3)
    torch.testing.assert_close(layer(x), batched)
    assert calls == [1]
    handle.remove()
    layer.add_adapter("v", FVAEAdapter(12, 12, 2), 24, 36)  # rank 2 next to rank 4
    assert not layer._fvae_batch()
    layer(x)
    assert all(a.loss is not None for a in layer.adapters.values())
    with pytest.raises(ValueError, match="different shapes"):
        from robustbench_fvae.adapters.fvae import sample_and_score_batch
        sample_and_score_batch(list(layer.adapters.values()), x)


# ---------------------------------------------------------------- fused evaluation


def _fused_calls(monkeypatch) -> list[str]:
    """Count fused forward calls (the real method still runs)."""
    calls: list[str] = []
    real = AdaptedLinear.fused_eval_forward

    def spy(self, x):
        calls.append("fused")
        return real(self, x)

    monkeypatch.setattr(AdaptedLinear, "fused_eval_forward", spy)
    return calls


def _eval_both(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fused, per-adapter) eval logits of ``model`` on ``x``."""
    model.eval()
    with torch.inference_mode():
        fused = model(x)
        set_eval_fusion(model, False)
        reference = model(x)
        set_eval_fusion(model, True)
    return fused, reference


@pytest.mark.parametrize("method", ["lora", "fvae"])
@pytest.mark.parametrize("targets", [("q", "k"), ("q", "k", "v"), ("q", "v"), ("fc1", "k")])
def test_fused_eval_equals_the_per_adapter_path(method, targets, monkeypatch):
    calls = _fused_calls(monkeypatch)
    model = tiny_vit()
    inject_method(model, method, AdapterConfig(rank=4, targets=targets))
    randomize_(nn.ModuleList(adapted_layers(model).values()), std=0.2)
    x = torch.randn(3, 3, 32, 32)
    fused, reference = _eval_both(model, x)
    n_modules = len({n.rsplit(":", 1)[0] for n in adapted_layers(model)})
    assert len(calls) == n_modules, "one fused call per adapted module, then none when off"
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    # The adapters matter: the same model without them gives other logits.
    with torch.no_grad():
        for a in adapted_layers(model).values():
            a.lora_B.zero_()
    assert not torch.allclose(model(x), reference, atol=1e-3)


def test_fused_weights_fold_the_mean_head_into_b():
    """One FVAE layer: ``W_out·ReLU(W_in x + b_in) + b_out`` equals ``s_B·B·μ1(x)``."""
    torch.manual_seed(0)
    adapter = FVAEAdapter(12, 10, 4, encoder_hidden=6, dropout=0.1).eval()
    randomize_(adapter)
    w_in, b_in, relu, w_out, b_out = adapter.eval_factors()
    assert relu and w_in.shape == (6, 12) and w_out.shape == (10, 6) and b_out.shape == (10,)
    x = torch.randn(7, 12)
    with torch.no_grad():
        torch.testing.assert_close(torch.relu(x @ w_in.t() + b_in) @ w_out.t() + b_out,
                                   adapter(x), rtol=1e-5, atol=1e-6)


def test_fused_eval_is_not_used_with_gradients_or_in_training(monkeypatch):
    calls = _fused_calls(monkeypatch)
    model = tiny_vit()
    inject_method(model, "fvae", AdapterConfig(rank=4, targets=("q", "k")))
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    model(x).sum().backward()  # eval mode with gradients: per-adapter path, gradients flow
    assert calls == []
    assert adapted_layers(model)["blocks.0.attn.qkv:q"].lora_B.grad is not None
    model.train()
    with torch.no_grad():
        model(x)
    assert calls == []
    # A forward hook on an adapter (latent recording) must see the adapter run: no fusion.
    model.eval()
    with record_latents(model) as store, torch.no_grad():
        model(x)
    assert calls == [] and all(store[n]["z1"] for n in store)
    # Likewise a hook on every module (a profiler): it must see each adapter run.
    seen: list[str] = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, *_: seen.append(type(m).__name__))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    assert calls == [] and seen.count("FVAEAdapter") == len(adapted_layers(model))
    with torch.no_grad():
        model(x)
    assert len(calls) == 2  # hooks gone: fused again, once per adapted module


@pytest.mark.parametrize("method", ["lora", "fvae"])
def test_fused_eval_follows_in_place_updates_and_loaded_weights(method):
    """Fused weights are rebuilt from the live parameters: after a fused AdamW step (which does
    not bump tensor versions on CPU) and after load_state_dict, fused eval still equals the
    per-adapter path, and an eval pass adds no state-dict keys. In float64: in float32 the two
    paths' rounding differs by up to ~3e-5 on some CPUs' kernels, while stale fused weights
    would be off by the whole step (~1)."""
    model = tiny_vit()
    inject_method(model, method, AdapterConfig(rank=4, targets=("q", "k", "v")),
                    num_classes=2)
    randomize_(nn.ModuleList(adapted_layers(model).values()), std=0.2)
    model.double()
    keys = set(model.state_dict())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    before, _ = _eval_both(model, x)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                            fused=True)
    model.train()
    for _ in range(2):
        loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 0, 1]))
        aux, _ = collect_aux_loss(model)
        (loss if aux is None else loss + 1e-3 * aux).backward()
        opt.step()
        opt.zero_grad()
    after, reference = _eval_both(model, x)
    assert not torch.allclose(after, before, atol=1e-4), "the step must change the outputs"
    torch.testing.assert_close(after, reference, rtol=1e-10, atol=1e-10)
    assert set(model.state_dict()) == keys
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    fresh = tiny_vit(num_classes=2)
    inject_method(fresh, method, AdapterConfig(rank=4, targets=("q", "k", "v")))
    fresh.double().eval()
    with torch.no_grad():
        fresh(x)  # a fused pass on the old weights first
    fresh.load_state_dict(model.state_dict())
    loaded, _ = _eval_both(fresh, x)
    torch.testing.assert_close(loaded, after, rtol=1e-10, atol=1e-10)


def test_fused_eval_under_bf16_autocast_matches_the_per_adapter_path():
    model = tiny_vit()
    inject_method(model, "fvae", AdapterConfig(rank=4, targets=("q", "k")))
    randomize_(nn.ModuleList(adapted_layers(model).values()), std=0.2)
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, reference = _eval_both(model, x)
    torch.testing.assert_close(fused.float(), reference.float(), rtol=0.05, atol=0.05)
