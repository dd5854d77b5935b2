"""FVAE-LoRA (Kumar et al., NeurIPS 2025) and its ablations VAE2LAT and β-VAE2LAT.

One :class:`FVAEAdapter` replaces LoRA's ``A x`` by the code ``z1`` of a VAE with two latent spaces:
``q1(z1|x)`` for the task and ``q2(z2|x)`` for the rest, a decoder ``p(x|z1, z2)`` that reconstructs
the layer input, priors ``p1 = N(0, I)`` and ``p2 = N(μ_p2·1, I)``. The adapted output is
``W x + s_B · B z1``. All Gaussian terms are closed form and per token (no d×d matrices). The three
methods share these modules; only :class:`FVAEObjective` differs (DESIGN §3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

LOSS_PARTS = ("R", "K1", "K2", "G")
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass(frozen=True)
class FVAEObjective:
    """Weights of the per-layer loss ``ℓ = α·R + β·K1 + β₂·K2 − δ·G`` (to minimise).

    FVAE-LoRA: ``β₂ = 0`` (q2 has no KL: the paper's design); VAE2LAT: ``δ = 0, β₂ = β = 1``;
    β-VAE2LAT: ``δ = 0, β₂ = β = 10``.
    """

    alpha: float = 1.0
    beta: float = 1.0
    beta_z2: float = 0.0
    delta: float = 1.0

    @classmethod
    def for_method(cls, method: str, alpha: float = 1.0, beta: float | None = None,
                   delta: float = 1.0) -> FVAEObjective:
        if method == "fvae":
            return cls(alpha, 1.0 if beta is None else beta, 0.0, delta)
        if method in ("vae2lat", "bvae2lat"):
            b = (10.0 if method == "bvae2lat" else 1.0) if beta is None else beta
            return cls(alpha, b, b, 0.0)
        raise ValueError(
            f"no FVAE objective for method {method!r}; expected fvae, vae2lat, bvae2lat")

    def __call__(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = self.alpha * parts["R"] + self.beta * parts["K1"]
        if self.beta_z2:
            loss = loss + self.beta_z2 * parts["K2"]
        if self.delta:
            loss = loss - self.delta * parts["G"]
        return loss


class GaussianEncoder(nn.Module):
    """``x ↦ (μ, log σ²)``: ``Linear(d→h) → ReLU → Dropout`` then two zero-initialised heads."""

    def __init__(self, in_features: int, hidden: int, latent: int, dropout: float,
                 logvar_clamp: float) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.mean = nn.Linear(hidden, latent)
        self.logvar = nn.Linear(hidden, latent)
        self.logvar_clamp = logvar_clamp
        for head in (self.mean, self.logvar):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        logvar = self.logvar(h).clamp(-self.logvar_clamp, self.logvar_clamp)
        return self.mean(h), logvar

    def mean_only(self, x: torch.Tensor) -> torch.Tensor:
        """The eval path: μ(x) without touching the log-variance head."""
        return self.mean(self.trunk(x))

    def inference_parameters(self) -> int:
        return sum(p.numel() for m in (self.trunk, self.mean) for p in m.parameters())


class GaussianDecoder(nn.Module):
    """``p(x|z) = N(g(z), diag(s²))``: ``g`` an MLP, ``s`` one learned per-dimension scale.

    ``s = exp(log_scale)`` is strictly positive by construction and starts at 1 (the released code
    learns ``s`` unconstrained, which can cross zero and give NaN log-densities).
    """

    def __init__(self, latent: int, hidden: int, layers: int, out_features: int,
                 dropout: float) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        width = latent
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        blocks.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*blocks)
        self.log_scale = nn.Parameter(torch.zeros(out_features))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)

    def negative_log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``−log p(x|z)`` per token, summed over the input dims: shape ``x.shape[:-1]``.

        The output Linear and the Gaussian density run as one fused step in fp32
        (:class:`_LinearGaussianNLL`), also under autocast."""
        hidden = self.net[:-1](z)
        last = self.net[-1]
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        return _LinearGaussianNLL.apply(x.to(dtype), hidden.to(dtype), last.weight.to(dtype),
                                        last.bias.to(dtype), self.log_scale.to(dtype))


class _LinearGaussianNLL(torch.autograd.Function):
    """``−log N(x; h Wᵀ + b, diag(s²))`` per token, summed over the last dim;
    ``s = exp(log_scale)`` per input dim.

    The decoder's output layer and the density in one autograd node, written out because this
    is the widest part of FVAE-LoRA's training step (tokens × d, like the adapted layer itself):
    the residual comes straight out of one ``addmm`` (``x − h Wᵀ``), the standardised residual
    ``u = (x − μ)/s`` is formed in place and is the only (…, d) tensor kept for backward (autograd
    would keep the mean, the residual and its square), and backward needs three passes over it.
    Gradients: ``∂/∂μ = −u/s``, ``∂/∂x = u/s``, ``∂/∂log s = 1 − u²`` (per token, times the incoming
    gradient).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            d = x.shape[-1]
            x2, h2 = x.reshape(-1, d), hidden.reshape(-1, hidden.shape[-1])
            u = torch.addmm(x2, h2, weight.t(), alpha=-1.0).sub_(bias).mul_(torch.exp(-log_scale))
            nll = (0.5 * torch.linalg.vector_norm(u, dim=-1).square() + log_scale.sum()
                   + d * _HALF_LOG_2PI)
        ctx.save_for_backward(u, h2, weight, log_scale)
        ctx.shapes = (x.shape, hidden.shape)
        return nll.reshape(x.shape[:-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        u, h2, weight, log_scale = ctx.saved_tensors
        x_shape, hidden_shape = ctx.shapes
        need_x, need_h, need_w, need_b, need_s = ctx.needs_input_grad
        g = grad.reshape(-1, 1)
        grad_res = u * g  # ∂/∂(x − μ) · s, per token
        grad_log_scale = grad.sum() - (grad_res * u).sum(0) if need_s else None
        grad_res.mul_(torch.exp(-log_scale))  # ∂/∂x = −∂/∂μ
        grad_x = grad_res.reshape(x_shape) if need_x else None
        grad_h = (grad_res @ weight).neg_().reshape(hidden_shape) if need_h else None
        grad_w = (grad_res.t() @ h2).neg_() if need_w else None
        grad_b = grad_res.sum(0).neg_() if need_b else None
        return grad_x, grad_h, grad_w, grad_b, grad_log_scale


def gaussian_kl_to_standard(mean: torch.Tensor, logvar: torch.Tensor,
                            prior_mean: float = 0.0) -> torch.Tensor:
    """``KL(N(μ, σ²) ‖ N(m, I))`` per token, summed over the latent dims (closed form)."""
    return 0.5 * ((mean - prior_mean).square() + logvar.exp() - 1.0 - logvar).sum(-1)


class FVAEAdapter(nn.Module):
    """The FVAE-LoRA delta ``s_B · B z1`` of one adapted output slice, plus its VAE loss.

    Training (``self.training``): ``z1``/``z2`` are reparameterised samples; the forward pass also
    computes the per-layer loss parts R, K1, K2, G (means over tokens) and stores them in
    ``self.loss_parts`` and the weighted loss in ``self.loss`` for the model to collect.
    Eval: ``z1 = μ1(x)``; only encoder 1's trunk and mean head and ``B`` run.
    Shapes: ``x`` (..., in_features) → delta (..., out_features).
    """

    kind = "fvae"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 16,
        *,
        objective: FVAEObjective | None = None,
        encoder_hidden: int = 16,
        decoder_hidden: int = 128,
        decoder_layers: int = 3,
        dropout: float = 0.1,
        mu_p2: float = 1.5,
        b_init_std: float = 0.02,
        output_scale: float = 0.5,
        logvar_clamp: float = 20.0,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"FVAE rank (latent size) must be >= 1, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.objective = objective or FVAEObjective()
        self.mu_p2 = float(mu_p2)
        self.output_scale = float(output_scale)
        self.encoder1 = GaussianEncoder(in_features, encoder_hidden, rank, dropout, logvar_clamp)
        self.encoder2 = GaussianEncoder(in_features, encoder_hidden, rank, dropout, logvar_clamp)
        self.decoder = GaussianDecoder(2 * rank, decoder_hidden, decoder_layers, in_features,
                                       dropout)
        self.lora_B = nn.Parameter(torch.randn(out_features, rank) * b_init_std)
        self.loss: torch.Tensor | None = None
        self.loss_parts: dict[str, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.output_scale * (self.encoder1.mean_only(x) @ self.lora_B.t())
        z1, parts = self.sample_and_score(x)
        self.loss_parts = parts
        self.loss = self.objective(parts)
        return self.output_scale * (z1 @ self.lora_B.t())

    def sample_and_score(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One reparameterised sample of z1 (returned) and the loss parts, means over tokens.

        ``R = −log p(x|z1, z2)`` (one sample of each, summed over input dims);
        ``K1 = KL(q1‖p1)``, ``K2 = KL(q2‖p2)`` summed over latent dims;
        ``G = mean_j E[z1_j²] − mean_j E[(z2_j − μ_p2)²]`` with closed-form expectations
        ``E[(z − m)²] = (μ − m)² + σ²`` — the released one-sample estimate, in expectation.
        """
        mean1, logvar1 = self.encoder1(x)
        mean2, logvar2 = self.encoder2(x)
        var1, var2 = logvar1.exp(), logvar2.exp()
        z1 = mean1 + (0.5 * logvar1).exp() * torch.randn_like(mean1)
        z2 = mean2 + (0.5 * logvar2).exp() * torch.randn_like(mean2)
        nll = self.decoder.negative_log_likelihood(x, torch.cat([z1, z2], dim=-1))
        parts = {
            "R": nll.mean(),
            "K1": gaussian_kl_to_standard(mean1, logvar1).mean(),
            "K2": gaussian_kl_to_standard(mean2, logvar2, self.mu_p2).mean(),
            "G": (mean1.square() + var1).mean() - ((mean2 - self.mu_p2).square() + var2).mean(),
        }
        return z1, parts

    def eval_factors(self) -> tuple[torch.Tensor, torch.Tensor, bool, torch.Tensor,
                                    torch.Tensor]:
        """The eval delta ``s_B·B·μ1(x)`` as ``W_out · ReLU(W_in x + b_in) + b_out``.

        ``μ1(x) = W_μ h + b_μ`` with ``h = ReLU(W1 x + b1)`` is affine in ``h``, so the mean head
        folds into B: ``W_out = s_B·B·W_μ`` (out, hidden) and ``b_out = s_B·B·b_μ`` (out);
        ``W_in = W1`` (hidden, in), ``b_in = b1``. Built from the live parameters (autograd
        tracked), never stored, so they cannot go stale. Dropout is the identity at eval.
        """
        trunk, head = self.encoder1.trunk[0], self.encoder1.mean
        scaled_b = self.lora_B * self.output_scale
        return trunk.weight, trunk.bias, True, scaled_b @ head.weight, scaled_b @ head.bias

    def latents(self, x: torch.Tensor, sigma: bool = False) -> dict[str, torch.Tensor]:
        """The posterior means ``μ1(x)`` and ``μ2(x)``, each (..., r), for latent analysis; with
        ``sigma`` also the posterior standard deviations ``exp(log σ²/2)`` as ``sigma:z1`` and
        ``sigma:z2`` (same shapes), for collapse checks."""
        if not sigma:
            return {"z1": self.encoder1.mean_only(x), "z2": self.encoder2.mean_only(x)}
        out = {}
        for key, encoder in (("z1", self.encoder1), ("z2", self.encoder2)):
            mean, logvar = encoder(x)
            out[key], out[f"sigma:{key}"] = mean, (0.5 * logvar).exp()
        return out

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError(
            "FVAE-LoRA adapters cannot be merged into the base weight: z1 = μ1(x) is a non-linear "
            "function of x (ReLU encoder), so no dense update equals it; use LoRA to merge"
        )

    def inference_parameters(self) -> int:
        return self.encoder1.inference_parameters() + self.lora_B.numel()
