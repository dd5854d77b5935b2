"""The released FVAE-LoRA formulation (idiap/FVAE-LoRA), written from its published facts.

The speed benchmark (:mod:`benchmarks.bench`) times it against our
:class:`~robustbench_fvae.adapters.FVAEAdapter`, and the tests use it as the oracle our adapter is
checked against: same weights and same random draws give the same delta, reconstruction term and
KL, while the repulsive term differs only by being a one-sample estimate here. It lives beside the
benchmark, outside the package, because nothing in a run uses it.
"""

from __future__ import annotations

import torch
from torch import nn

from robustbench_fvae.adapters import AdaptedLinear, FVAEAdapter


class _ReleasedEncoder(nn.Module):
    """``Linear(d→h) → ReLU → Dropout`` and two heads, as released (same parameter names as
    :class:`~robustbench_fvae.adapters.fvae.GaussianEncoder`, so weights copy across)."""

    def __init__(self, in_features: int, hidden: int, latent: int, dropout: float) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.mean = nn.Linear(hidden, latent)
        self.logvar = nn.Linear(hidden, latent)
        for head in (self.mean, self.logvar):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)


class ReleasedFVAELayer(nn.Module):
    """The released per-layer FVAE-LoRA computation, as a speed and correctness reference.

    Follows the released code's formulation (not its code): the reconstruction log-density is a
    ``torch.distributions.MultivariateNormal(loc=x, scale_tril=diag(s) + jitter·I)`` evaluated at
    the decoder output — a dense d×d triangular matrix per call, one triangular solve over all
    tokens (``validate_args=False``, as released); ``s`` is unconstrained (init 1); only
    KL(q1‖N(0, I)) enters the loss (KL(q2‖p2) is computed and dropped); the repulsive term is the
    one-sample ``mean((z2_sample − 1.5)²) − mean(z1_sample²)``; and the whole FVAE runs at eval
    too (its loss is discarded there). The delta is ``(z1 @ B.T) · scaling / ranknum`` (z1
    sampled in training, the mean in eval).
    Random draws happen in the same order as in :class:`FVAEAdapter` (dropout of encoder 1,
    of encoder 2, noise of z1, of z2, decoder dropouts), so seeded runs match draw for draw.
    Shapes: ``x`` (..., in_features) → delta (..., out_features).
    """

    def __init__(self, in_features: int, out_features: int, rank: int = 16, *,
                 encoder_hidden: int = 16, decoder_hidden: int = 128, decoder_layers: int = 3,
                 dropout: float = 0.1, mu_p2: float = 1.5, scaling: float = 8.0,
                 ranknum: float = 16.0, jitter: float = 1e-5, logvar_clamp: float = 20.0,
                 lambdas: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.encoder1 = _ReleasedEncoder(in_features, encoder_hidden, rank, dropout)
        self.encoder2 = _ReleasedEncoder(in_features, encoder_hidden, rank, dropout)
        blocks: list[nn.Module] = []
        width = 2 * rank
        for _ in range(decoder_layers):
            blocks += [nn.Linear(width, decoder_hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = decoder_hidden
        blocks.append(nn.Linear(width, in_features))
        self.decoder = nn.Sequential(*blocks)
        self.scale = nn.Parameter(torch.ones(in_features))  # unconstrained, as released
        self.lora_B = nn.Parameter(torch.randn(out_features, rank) * 0.02)
        self.mu_p2, self.factor, self.jitter = mu_p2, scaling / ranknum, jitter
        self.logvar_clamp = logvar_clamp
        # (λ_rec, λ_kl_z1, λ_z2_l2, λ_z1_l2), released defaults all 1.
        self.lambdas = lambdas
        self.loss: torch.Tensor | None = None
        self.loss_parts: dict[str, torch.Tensor] | None = None

    def reconstruction_log_prob(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """``log N(recon; loc=x, scale_tril=diag(s) + jitter·I)`` per token, shape x.shape[:-1].

        Computed in (at least) fp32 outside autocast: the triangular solve has no
        reduced-precision kernel.
        """
        dtype = torch.promote_types(self.scale.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            d = x.shape[-1]
            eye = torch.eye(d, device=x.device, dtype=dtype)
            scale_tril = torch.diag(self.scale.to(dtype)) + self.jitter * eye
            # validate_args=False as released: validation would materialise the d×d matrix
            # expanded over every token (GBs per call).
            mvn = torch.distributions.MultivariateNormal(loc=x.to(dtype), scale_tril=scale_tril,
                                                         validate_args=False)
            return mvn.log_prob(recon.to(dtype))

    def inference_parameters(self) -> int:
        """Every parameter: the released eval path runs the whole FVAE."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = self.encoder1.trunk(x)
        h2 = self.encoder2.trunk(x)
        mean1 = self.encoder1.mean(h1)
        logvar1 = self.encoder1.logvar(h1).clamp(-self.logvar_clamp, self.logvar_clamp)
        mean2 = self.encoder2.mean(h2)
        logvar2 = self.encoder2.logvar(h2).clamp(-self.logvar_clamp, self.logvar_clamp)
        z1 = mean1 + torch.exp(0.5 * logvar1) * torch.randn_like(mean1)
        z2 = mean2 + torch.exp(0.5 * logvar2) * torch.randn_like(mean2)
        recon = self.decoder(torch.cat([z1, z2], dim=-1))
        nll = -self.reconstruction_log_prob(x, recon).mean()
        kl1 = (-0.5 * (1 + logvar1 - mean1.square() - logvar1.exp()).sum(-1)).mean()
        # KL(q2‖p2) is computed and then dropped by the released code; keep its (small) cost.
        _ = (0.5 * ((mean2 - self.mu_p2).square() + logvar2.exp() - 1 - logvar2).sum(-1)).mean()
        z1_l2 = z1.square().mean()
        z2_l2 = (z2 - self.mu_p2).square().mean()
        rec, kl, l2_z2, l2_z1 = self.lambdas
        loss = rec * nll + l2_z2 * z2_l2 - l2_z1 * z1_l2 + kl * kl1
        if self.training:
            self.loss = loss
            self.loss_parts = {"R": nll, "K1": kl1, "z1_l2": z1_l2, "z2_l2": z2_l2}
        else:  # computed and discarded at eval, as released
            self.loss, self.loss_parts = None, None
        code = z1 if self.training else mean1
        return (code @ self.lora_B.t()) * self.factor


def released_from_ours(adapter: FVAEAdapter, jitter: float = 1e-5) -> ReleasedFVAELayer:
    """A :class:`ReleasedFVAELayer` with exactly the weights of ``adapter`` (``s = exp(log s)``),
    same sizes, dropout, μ_p2 and output factor (``scaling/ranknum`` = ``output_scale``)."""
    enc_lin = adapter.encoder1.trunk[0]
    dec_linears = [m for m in adapter.decoder.net if isinstance(m, nn.Linear)]
    dropouts = [m for m in adapter.encoder1.trunk if isinstance(m, nn.Dropout)]
    layer = ReleasedFVAELayer(
        adapter.in_features, adapter.out_features, adapter.rank,
        encoder_hidden=enc_lin.out_features, decoder_hidden=dec_linears[0].out_features,
        decoder_layers=len(dec_linears) - 1, dropout=dropouts[0].p if dropouts else 0.0,
        mu_p2=adapter.mu_p2, scaling=adapter.output_scale * adapter.rank,
        ranknum=float(adapter.rank), jitter=jitter, logvar_clamp=adapter.encoder1.logvar_clamp,
    )
    p = next(adapter.parameters())
    layer.to(device=p.device, dtype=p.dtype)
    layer.encoder1.load_state_dict(adapter.encoder1.state_dict())
    layer.encoder2.load_state_dict(adapter.encoder2.state_dict())
    layer.decoder.load_state_dict(adapter.decoder.net.state_dict())
    with torch.no_grad():
        layer.scale.copy_(adapter.decoder.log_scale.exp())
        layer.lora_B.copy_(adapter.lora_B)
    layer.train(adapter.training)
    return layer


def swap_in_released(model: nn.Module, jitter: float = 1e-5) -> int:
    """Replace every :class:`FVAEAdapter` in ``model`` by its released-formulation twin (same
    weights). Returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        if isinstance(module, AdaptedLinear):
            for key, adapter in list(module.adapters.items()):
                if isinstance(adapter, FVAEAdapter):
                    module.adapters[key] = released_from_ours(adapter, jitter)
                    swapped += 1
    return swapped


def released_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Mean over the released-style layers of their last training loss (then cleared)."""
    losses = []
    for m in model.modules():
        if isinstance(m, ReleasedFVAELayer) and m.loss is not None:
            losses.append(m.loss)
            m.loss = None
    return torch.stack(losses).mean() if losses else None
