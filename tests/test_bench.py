"""The speed benchmark: its quick mode end to end, and that its released-formulation reference
computes what our FVAEAdapter computes (so the timing comparison is apples to apples)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from benchmarks.bench import BenchError, benchmark, main
from benchmarks.released_fvae import ReleasedFVAELayer, released_from_ours
from benchmarks.timing import median_interval
from robustbench_fvae.adapters import FVAEAdapter

REQUIRED_KEYS = (
    "fvae_over_lora_train", "fvae_over_lora_eval", "released_over_ours_module_train",
    "fvae_unfused_over_fused_eval",
    "released_over_ours_model_train", "fvae_over_lora_saved_activation_bytes",
)


def randomized_fvae(d: int = 32, out: int = 24, r: int = 16, dropout: float = 0.1,
                    std: float = 0.3, dtype: torch.dtype = torch.float64) -> FVAEAdapter:
    """An FVAEAdapter moved off its init (zero heads, unit scale) so every weight matters."""
    torch.manual_seed(0)
    layer = FVAEAdapter(d, out, r, encoder_hidden=16, decoder_hidden=32, dropout=dropout)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return layer.to(dtype)


def test_quick_benchmark_prints_json_with_positive_finite_ratios(capsys):
    before = torch.get_num_threads()
    # One thread: with more, a busy machine stalls every small op (see bench's load warning).
    threads = 1
    result = benchmark(["--quick", "--repeats", "1", "--warmup", "1", "--threads", str(threads)])
    assert torch.get_num_threads() == before  # restored for the rest of the session
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    record = json.loads(lines[-1])
    for key in REQUIRED_KEYS:
        value = record[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
        assert value == pytest.approx(result[key])
    for key in ("fvae_over_lora_train", "fvae_over_lora_eval", "fvae_unfused_over_fused_eval"):
        assert math.isfinite(record["paired"][key]) and record["paired"][key] > 0
    settings = record["settings"]
    assert settings["quick"] is True and settings["threads"] == threads
    assert settings["device"] == "cpu" and settings["torch"] == torch.__version__
    assert {"depth", "batch_size"} <= set(settings)
    # Both FVAE forms save for backward what LoRA saves and more (encoders, decoder, NLL).
    saved = record["saved_activation_bytes"]
    assert saved["fvae"] > saved["lora"] > 0 and saved["released"] > saved["lora"]
    # The released model's adapters really are the released formulation.
    assert settings["released_layers"] == 2  # depth 1, targets q,k
    # Every target is judged in the text output.
    for key in ("fvae_over_lora_train", "fvae_over_lora_eval",
                "released_over_ours_module_train"):
        assert any(line.startswith(f"target {key}") and line.split()[5] in ("met", "MISSED")
                   for line in lines)
    # One round: no interval can be given, and the JSON says so rather than inventing one.
    assert record["paired_ci95"]["fvae_over_lora_train"] is None


@pytest.mark.parametrize("n,expected", [(5, None), (6, [1, 6]), (9, [2, 8]), (15, [4, 12]),
                                        (25, [8, 18])])
def test_median_interval_is_the_binomial_order_statistic_interval(n, expected):
    """Standard tables: the 95 % interval of a median from n samples (n = 5 cannot reach 95 %:
    even the full range covers only 93.75 %)."""
    values = [float(v) for v in range(n, 0, -1)]  # unsorted on purpose
    assert median_interval(values) == expected


def test_cpu_clock_times_cpu_work(capsys):
    result = benchmark(["--quick", "--repeats", "1", "--warmup", "0", "--threads", "1",
                        "--clock", "cpu"])
    assert result["settings"]["clock"] == "cpu"
    assert all(v > 0 for v in result["median_ms"].values())
    assert "clock=cpu" in capsys.readouterr().out


def test_bad_device_is_one_line_error(capsys, monkeypatch):
    # The error is for asking for CUDA where torch sees none; on a CUDA machine, hide it.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("RBF_TRACEBACK", raising=False)
    assert main(["--quick", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --device cuda") and "\n" not in err
    assert issubclass(BenchError, ValueError)


def test_released_mvn_log_prob_equals_our_decoder_nll():
    ours = randomized_fvae().eval()  # eval: decoder dropout off, so g(z) is deterministic
    released = released_from_ours(ours, jitter=0.0).eval()
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    z = torch.randn(3, 5, 32, dtype=torch.float64)
    recon = released.decoder(z)
    torch.testing.assert_close(recon, ours.decoder(z))
    log_prob = released.reconstruction_log_prob(x, recon)
    assert log_prob.shape == (3, 5)
    # Without the jitter the dense MVN is exactly our closed-form diagonal Gaussian.
    torch.testing.assert_close(-log_prob, ours.decoder.negative_log_likelihood(x, z))
    # The released 1e-5 jitter barely moves it (s is O(1) here).
    jittered = released_from_ours(ours, jitter=1e-5).eval()
    torch.testing.assert_close(jittered.reconstruction_log_prob(x, recon), log_prob,
                               rtol=1e-3, atol=1e-2)


def test_released_layer_matches_ours_draw_for_draw():
    ours = randomized_fvae(d=32, out=24, r=16).train()  # dropout 0.1 everywhere
    released = released_from_ours(ours, jitter=0.0).train()
    x = torch.randn(4, 16, 32, dtype=torch.float64)
    torch.manual_seed(7)
    delta_ours = ours(x)
    torch.manual_seed(7)
    delta_released = released(x)
    # Same weights, same draws (dropout masks and noise): same z1, so the same delta
    # (released factor scaling/ranknum = 8/16 = our s_B 0.5).
    torch.testing.assert_close(delta_released, delta_ours)
    parts_o, parts_r = ours.loss_parts, released.loss_parts
    torch.testing.assert_close(parts_r["R"], parts_o["R"])
    torch.testing.assert_close(parts_r["K1"], parts_o["K1"])
    # The losses differ by the repulsive term's estimate only: ours R + K1 − G (closed-form
    # expectations), released NLL + z2_l2 − z1_l2 + KL1 (one sample).
    g_released = parts_r["z1_l2"] - parts_r["z2_l2"]
    torch.testing.assert_close(ours.loss - released.loss, g_released - parts_o["G"])
    assert not torch.equal(g_released, parts_o["G"])  # one sample is not the expectation


def test_released_repulsive_term_equals_ours_in_expectation():
    # No dropout, so the posterior parameters below are exactly the ones the forward pass used.
    ours = randomized_fvae(d=32, out=24, r=16, dropout=0.0, std=0.1).train()
    released = released_from_ours(ours, jitter=0.0).train()
    x = torch.randn(16, 128, 32, dtype=torch.float64)  # 2048 tokens × 16 latent dims
    torch.manual_seed(11)
    ours(x)
    released(x)
    g_released = (released.loss_parts["z1_l2"] - released.loss_parts["z2_l2"]).item()
    g_ours = ours.loss_parts["G"].item()
    with torch.no_grad():
        mean1, logvar1 = ours.encoder1(x)
        mean2, logvar2 = ours.encoder2(x)
    # Per element, Var[(z − m)²] = 4 (μ − m)² σ² + 2 σ⁴ for z ~ N(μ, σ²); the two means are
    # independent, so the one-sample G has this standard error around its expectation.
    m2 = mean2 - ours.mu_p2
    var = ((4 * mean1.square() * logvar1.exp() + 2 * logvar1.exp().square()).mean()
           + (4 * m2.square() * logvar2.exp() + 2 * logvar2.exp().square()).mean())
    se = math.sqrt(var.item() / mean1.numel())
    assert abs(g_released - g_ours) < 5 * se
    # The band is tight: a sign slip or a missing term would land far outside it.
    assert abs(g_ours) > 20 * se


def test_released_eval_output_equals_ours_and_loss_is_discarded():
    ours = randomized_fvae().eval()
    released = released_from_ours(ours).eval()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    torch.testing.assert_close(released(x), ours(x))  # both z1 = μ1(x)
    assert released.loss is None and ours.loss is None
    assert isinstance(released, ReleasedFVAELayer) and isinstance(released.decoder, nn.Sequential)
