"""Latent evidence beyond probe accuracy: token-level information rates, update sizes and
interventions, on hand-made posteriors and on small real models with a known answer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from robustbench_fvae.adapters import AdaptedLinear, FVAEAdapter, LoRAAdapter
from robustbench_fvae.analysis.evidence import information_summary
from robustbench_fvae.analysis.information import (
    COLLAPSE_NATS,
    InformationError,
    PosteriorMoments,
    gaussian_capacity_bound,
    minibatch_mutual_information,
    slice_is_collapsed,
)
from robustbench_fvae.analysis.interventions import (
    intervention_logits,
    intervention_rows,
    intervention_targets,
    margins,
    paired_effect,
)
from robustbench_fvae.analysis.latents import random_projection
from robustbench_fvae.analysis.probes import add_controls, add_information
from robustbench_fvae.analysis.updates import measure_updates, parameter_displacement

# ---------------------------------------------------------------- information, by hand


def _direct_kl(mu, logvar, prior=0.0):
    """Mean over all tokens of the per-unit KL(N(mu, e^logvar) || N(prior, 1)), (r,)."""
    var = np.exp(logvar)
    kl = 0.5 * (var + (mu - prior) ** 2 - 1.0 - logvar)
    return kl.reshape(-1, mu.shape[-1]).mean(0)


def test_kl_splits_exactly_into_offset_data_and_sigma():
    rng = np.random.default_rng(0)
    b, t, r = 50, 7, 3
    position = rng.normal(size=(1, t, r))
    mu = 0.4 + position + rng.normal(size=(b, t, r)) * np.array([1.0, 0.1, 0.0])
    logvar = rng.normal(scale=0.3, size=(b, t, r))
    moments = PosteriorMoments()
    for chunk in np.array_split(np.arange(b), 4):  # batch by batch equals all at once
        moments.update(mu[chunk], logvar[chunk])
    rates = moments.rates(prior_mean=0.25)
    assert np.allclose(rates["kl"], _direct_kl(mu, logvar, 0.25))
    assert np.allclose(rates["kl"], rates["offset"] + rates["data"] + rates["sigma"])
    assert np.allclose(rates["data"], rates["data_image"] + rates["data_position"])
    flat = mu.reshape(-1, r)
    assert np.allclose(rates["data"], 0.5 * flat.var(0))
    assert np.allclose(rates["offset"], 0.5 * (flat.mean(0) - 0.25) ** 2)
    assert np.allclose(rates["data_image"], 0.5 * mu.var(0).mean(0))
    # unit 2 varies with the position only: no image-dependent part
    assert rates["data_image"][2] == pytest.approx(0.0, abs=1e-12)
    assert rates["data_position"][2] > 0.1


def test_a_unit_at_its_prior_reads_zero_nats_and_a_constant_shift_is_not_information():
    b, t = 40, 5
    mu = np.zeros((b, t, 2))
    mu[..., 1] = 3.0  # a constant code: far from the prior, but the same for every token
    logvar = np.zeros((b, t, 2))
    moments = PosteriorMoments()
    moments.update(mu, logvar)
    rates = moments.rates()
    assert rates["kl"][0] == pytest.approx(0.0, abs=1e-12)
    assert rates["kl"][1] == pytest.approx(4.5) and rates["offset"][1] == pytest.approx(4.5)
    assert np.allclose(rates["data"], 0.0) and slice_is_collapsed(rates["data"])
    assert np.allclose(rates["capacity"], 0.0)
    estimate, cap = minibatch_mutual_information(mu.reshape(-1, 2), logvar.reshape(-1, 2))
    assert abs(estimate) < 1e-9 and cap == pytest.approx(math.log(b * t))
    with pytest.raises(InformationError):
        PosteriorMoments().rates()
    with pytest.raises(InformationError):
        moments.update(mu[:, :3], logvar[:, :3])


def test_mutual_information_of_a_gaussian_channel_matches_its_closed_form():
    # z = mu(x) + sigma·eps with mu ~ N(0, s2) and sigma2 = v fixed: I = ½ log(1 + s2 / v) per
    # unit, which the Gaussian-capacity bound reaches and the minibatch estimate approaches.
    rng = np.random.default_rng(1)
    m, s2, v = 4000, 3.0, 1.0
    mu = rng.normal(scale=math.sqrt(s2), size=(m, 2))
    logvar = np.full((m, 2), math.log(v))
    exact = 2 * 0.5 * math.log(1 + s2 / v)
    assert gaussian_capacity_bound(mu, logvar) == pytest.approx(exact, rel=0.05)
    estimate, cap = minibatch_mutual_information(mu, logvar, seed=0)
    assert estimate == pytest.approx(exact, abs=0.12) and estimate < cap
    # a deterministic, informative code saturates the estimator at its cap log M
    sharp, _ = minibatch_mutual_information(mu[:500], np.full((500, 2), -20.0))
    assert sharp == pytest.approx(math.log(500), abs=0.01)


def test_information_summary_counts_active_units_and_collapse():
    units = [{"layer": "L", "latent": "z1", "unit": j, "kl": d + 0.1, "offset": 0.1, "data": d,
              "data_image": d, "data_position": 0.0, "sigma": 0.0, "capacity": d}
             for j, d in enumerate([0.0, 0.002, 0.5])]
    mi = [{"layer": "L", "latent": "z1", "mi_estimate": 0.3, "mi_cap": 7.6, "mi_tokens": 10}]
    (row,) = information_summary(units, mi, "test")
    assert (row["active_units"], row["collapsed"], row["units"]) == (1, False, 3)
    assert row["data"] == pytest.approx(0.502) and row["kl"] == pytest.approx(0.802)
    (dead,) = information_summary(units[:2], mi, "test")
    assert dead["collapsed"] and dead["active_units"] == 0
    assert COLLAPSE_NATS == 0.01


# ---------------------------------------------------------------- small real models


class _ToyViT(nn.Module):
    """One block with one adapted Linear on a single token of (object, background) features,
    then a linear head on the token: enough structure for the adapter passes."""

    def __init__(self, adapter: nn.Module, in_features: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Module()])
        base = nn.Linear(in_features, in_features)
        with torch.no_grad():
            base.weight.copy_(torch.eye(in_features))
            base.bias.zero_()
        self.blocks[0].fc = AdaptedLinear(base)
        self.blocks[0].fc.add_adapter("all", adapter, 0, in_features)
        self.head = nn.Linear(in_features, 2)
        with torch.no_grad():  # class 1 when obj + out[1] > 0
            self.head.weight.copy_(torch.tensor([[0.0] * in_features,
                                                 [1.0, 1.0] + [0.0] * (in_features - 2)]))
            self.head.bias.zero_()
        self.eval()

    def forward(self, x):
        return self.head(self.blocks[0].fc(x)[:, 0])


def _lora(reads: str, strength: float = 4.0) -> LoRAAdapter:
    lora = LoRAAdapter(2, 2, rank=1, alpha=1.0, dropout=0.0)
    with torch.no_grad():
        lora.lora_A.copy_(torch.tensor([[1.0, 0.0]] if reads == "object" else [[0.0, 1.0]]))
        lora.lora_B.copy_(torch.tensor([[0.0], [strength]]))
    return lora


def _object_background_data(n: int = 400, seed: int = 0):
    """Tokens (obj, bg) = (±1 by y, ±0.5 by a), y = a for 80 % of the images; and the
    background-only (obj = 0) and background-swapped (bg negated) twins, same order."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    a = np.where(rng.random(n) < 0.8, y, 1 - y)
    obj, bg = 2.0 * y - 1.0, (2.0 * a - 1.0) * 0.5
    x = torch.tensor(np.stack([obj, bg], 1)[:, None, :], dtype=torch.float32)
    swapped, only = x.clone(), x.clone()
    swapped[..., 1] *= -1
    only[..., 0] = 0
    ds = {name: torch.utils.data.TensorDataset(t, torch.tensor(y), torch.tensor(a))
          for name, t in (("test", x), ("background_swapped", swapped),
                          ("background_only", only))}
    return ds, y, 2 * y + a


def ds_majority(y, g):
    """Images whose background agrees with their label (a = y)."""
    return (g % 2) == y


def _interventions(model, ds, g_y):
    layers = ["blocks.0.fc:all"]
    idx = np.arange(len(ds["test"]))
    means = measure_updates(model, ds["test"], layers, idx, batch_size=64)["means"]
    twins = {k: v for k, v in ds.items() if k != "test"}
    clean, logits = intervention_logits(model, ds["test"], twins, layers, means, idx,
                                        batch_size=64)
    y, g = g_y
    return {r["intervention"]: r for r in intervention_rows(y, g, clean, logits, layers,
                                                            n_boot=200)}


def test_background_swap_finds_a_planted_background_channel():
    ds, y, g = _object_background_data()
    # The adapter adds 4·bg: the model predicts from the background (obj + 5·bg).
    reads_bg = _interventions(_ToyViT(_lora("background")), ds, (y, g))
    assert reads_bg["background_swapped"]["flip_rate"] == 1.0
    # every image now follows the other background: the 80 % majority groups turn wrong
    assert reads_bg["background_swapped"]["delta_avg"] == pytest.approx(
        1 - 2 * np.mean(ds_majority(y, g)), abs=1e-9)
    assert reads_bg["background_swapped"]["delta_avg_high"] < -0.4
    assert reads_bg["zero"]["flip_rate"] > 0.1 and reads_bg["background_only"]["flip_rate"] == 0
    assert "sampled" not in reads_bg  # LoRA has no posterior to sample
    # The adapter adds 4·obj: swapping the background changes nothing it reads.
    reads_obj = _interventions(_ToyViT(_lora("object")), ds, (y, g))
    assert reads_obj["background_swapped"]["flip_rate"] == 0.0
    assert reads_obj["background_swapped"]["margin_change"] == pytest.approx(0.0, abs=1e-6)
    assert reads_obj["background_only"]["margin_change"] > 1.0  # its object input is gone


def test_an_update_set_to_zero_has_no_effect():
    ds, y, g = _object_background_data()
    rows = _interventions(_ToyViT(_lora("background", strength=0.0)), ds, (y, g))
    assert set(rows) == {"zero", "mean", "background_only", "background_swapped"}
    for row in rows.values():
        assert row["flip_rate"] == 0.0 and row["delta_avg"] == 0.0 and row["delta_wg"] == 0.0
        assert row["margin_change"] == pytest.approx(0.0, abs=1e-6)
        assert (row["delta_wg_low"], row["delta_wg_high"]) == (0.0, 0.0)


def _fvae_toy(plant_unit: int | None) -> nn.Module:
    torch.manual_seed(0)
    adapter = FVAEAdapter(4, 4, rank=2, encoder_hidden=8, dropout=0.0)
    if plant_unit is not None:
        with torch.no_grad():
            adapter.encoder1.mean.weight[plant_unit].normal_()
    return _ToyViT(adapter, in_features=4)


def test_token_information_of_a_real_fvae_adapter_with_a_known_answer():
    torch.manual_seed(1)
    x = torch.randn(300, 3, 4)
    ds = torch.utils.data.TensorDataset(x, torch.zeros(300, dtype=torch.long))
    layers = ["blocks.0.fc:all"]
    # At initialisation the heads are zero: q1 is the prior, exactly 0 nats in every unit.
    at_prior = measure_updates(_fvae_toy(None), ds, layers, np.arange(300), batch_size=64)
    z1 = [r for r in at_prior["information"] if r["latent"] == "z1"]
    assert len(z1) == 2 and all(abs(r["kl"]) < 1e-9 and abs(r["data"]) < 1e-9 for r in z1)
    (mi,) = [r for r in at_prior["mi"] if r["latent"] == "z1"]
    assert abs(mi["mi_estimate"]) < 1e-6 and mi["mi_tokens"] == 900
    (size,) = at_prior["sizes"]
    assert size["update_ratio_median"] == 0.0 and size["tokens"] == 900
    # Plant unit 1 of encoder 1: its data-dependent KL is half the variance of its mean over
    # tokens, computed here by hand; unit 0 stays at the prior.
    model = _fvae_toy(plant_unit=1)
    planted = measure_updates(model, ds, layers, np.arange(300), batch_size=64)
    by_unit = {r["unit"]: r for r in planted["information"] if r["latent"] == "z1"}
    enc = model.blocks[0].fc.adapters["all"].encoder1
    with torch.no_grad():
        mu = enc.mean_only(x).reshape(-1, 2).double().numpy()
    assert by_unit[1]["data"] == pytest.approx(0.5 * mu[:, 1].var(), rel=1e-6)
    assert by_unit[1]["data"] > COLLAPSE_NATS and by_unit[0]["data"] == pytest.approx(0.0)
    (size,) = planted["sizes"]
    assert size["update_ratio_median"] > 0 and size["image_update_ratio_median"] > 0
    moved = parameter_displacement(model, _fvae_toy(None), layers)["blocks.0.fc:all"]
    assert moved["displacement"] > 0.1
    assert parameter_displacement(model, model, layers)["blocks.0.fc:all"]["displacement"] == 0


def test_targets_cover_slices_blocks_and_all():
    layers = ["blocks.0.attn.qkv:q", "blocks.0.attn.qkv:k", "blocks.3.attn.qkv:q"]
    assert [(t, s) for t, s, _ in intervention_targets(layers)] == [
        ("blocks.0.attn.qkv:q", "slice"), ("blocks.0.attn.qkv:k", "slice"),
        ("blocks.3.attn.qkv:q", "slice"), ("blocks.0", "block"), ("all", "all")]
    assert intervention_targets(["blocks.1.mlp.fc1:all"]) == [
        ("blocks.1.mlp.fc1:all", "slice", ["blocks.1.mlp.fc1:all"])]


def test_paired_effect_by_hand():
    y = np.array([0, 0, 1, 1])
    g = np.array([0, 0, 1, 1])
    clean = np.array([[2.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # 3 of 4 right
    new = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])  # one lost, one gained
    effect = paired_effect(y, g, clean, new, n_boot=100)
    assert effect["delta_avg"] == 0.0 and effect["flip_rate"] == 0.5
    assert effect["wg_acc"] == 0.5 and effect["delta_wg"] == 0.0
    assert np.allclose(margins(clean, y), [2.0, 2.0, 1.0, -1.0])
    assert effect["margin_change"] == pytest.approx((0 + 3 + 0 + 2) / 4)


# ---------------------------------------------------------------- probe controls


def test_random_control_is_seeded_and_leaves_the_global_stream_alone():
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    first = random_projection(8, 3)
    after = torch.rand(1)
    assert torch.equal(before, after)
    second = random_projection(8, 3)
    assert torch.equal(first[0].weight, second[0].weight)
    x = torch.randn(4, 8)
    assert (first(x) >= 0).all() and first(x).shape == (4, 3)


def test_controls_and_token_verdict_join_each_probe_row():
    def row(layer, latent, acc):
        return {"layer": layer, "latent": latent, "target": "y", "acc": acc}
    rows = [row("b.qkv:q", "z1", 0.80), row("b.qkv:q", "z1_init", 0.5),
            row("b.qkv:q", "lora", 0.9), row("b.qkv", "random", 0.85),
            row("b.qkv", "backbone", 0.95)]
    joined = {r["latent"]: r for r in add_controls(rows)}
    assert joined["z1"]["learned"] == pytest.approx(-0.05)
    assert (joined["z1"]["acc_input"], joined["z1"]["acc_init"]) == (0.95, 0.5)
    assert math.isnan(joined["lora"]["acc_init"])
    summary = [{"split": "test", "layer": "b.qkv:q", "latent": "z1", "active_units": 0,
                "data": 0.001, "collapsed": True},
               {"split": "val", "layer": "b.qkv:q", "latent": "lora", "active_units": 9,
                "data": 1.0, "collapsed": False}]
    verdict = {r["latent"]: r for r in add_information(add_controls(rows), summary)}
    assert verdict["z1"]["collapsed"] and verdict["z1"]["active_units"] == 0
    assert not verdict["lora"]["collapsed"] and math.isnan(verdict["lora"]["active_units"])
