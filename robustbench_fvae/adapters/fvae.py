"""FVAE-LoRA (Kumar et al., NeurIPS 2025) and its ablations VAE2LAT and β-VAE2LAT.

One :class:`FVAEAdapter` replaces LoRA's ``A x`` by the code ``z1`` of a VAE with two latent spaces:
``q1(z1|x)`` for the task and ``q2(z2|x)`` for the rest, a decoder ``p(x|z1, z2)`` that reconstructs
the layer input, priors ``p1 = N(0, I)`` and ``p2 = N(μ_p2·1, I)``. The adapted output is
``W x + s_B · B z1``. All Gaussian terms are closed form and per token (no d×d matrices). The three
methods share these modules; only :class:`FVAEObjective` differs (DESIGN §3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
            inv_scale = torch.exp(-log_scale)
            # u = x/s − b/s − h (W/s)ᵀ: one elementwise pass, then the matmul accumulates in place.
            u = torch.addcmul(bias * -inv_scale, x2, inv_scale).addmm_(
                h2, (weight * inv_scale.unsqueeze(1)).t(), alpha=-1.0)
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


def _dropout_each(hidden: torch.Tensor, dropouts: Sequence[nn.Dropout]) -> torch.Tensor:
    """``dropouts[k]`` applied to ``hidden[k]`` (shape (K, …)) as K module calls would apply
    them: one Bernoulli draw per slice, in order, scaled by ``1/(1 − p)``; by torch's rules, no
    draw for a module in eval or with ``p = 0``, and zeros without a draw for ``p = 1``."""
    drawn = [d.training and d.p > 0 for d in dropouts]
    if not any(drawn):
        return hidden
    keep = torch.ones(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    for k, (dropout, draw) in enumerate(zip(dropouts, drawn)):
        if draw and dropout.p == 1:
            keep[k] = 0.0
        elif draw:
            keep[k].bernoulli_(1.0 - dropout.p).div_(1.0 - dropout.p)
    return hidden * keep


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

        Both encoders run as one computation over a leading axis of 2 (z1, z2): one matmul for
        the two trunks, one batched matmul for the four heads, and every Gaussian term once for
        both, from the encoders' own parameters (read directly, so forward hooks on the encoder
        submodules do not fire here). The random draws are those of running encoder 1 then
        encoder 2 as modules (trunk dropout 1, 2, then noise 1, 2), in the same order and shapes,
        so the values equal the per-encoder formulation up to float rounding.
        """
        r = self.rank
        tokens = x.reshape(-1, self.in_features)
        encoders = (self.encoder1, self.encoder2)
        trunks = [e.trunk[0] for e in encoders]
        hidden = torch.addmm(torch.cat([t.bias for t in trunks]), tokens,
                             torch.cat([t.weight for t in trunks]).t()).relu_()
        hidden = hidden.view(-1, 2, trunks[0].out_features).transpose(0, 1)  # (2, T, h)
        hidden = _dropout_each(hidden, [e.trunk[2] for e in encoders])
        heads_w = torch.stack([torch.cat([e.mean.weight, e.logvar.weight]).t() for e in encoders])
        heads_b = torch.stack([torch.cat([e.mean.bias, e.logvar.bias]) for e in encoders])
        stats = torch.baddbmm(heads_b.unsqueeze(1), hidden, heads_w)  # (2, T, 2r)
        clamp = self.encoder1.logvar_clamp
        mean, logvar = stats[..., :r], stats[..., r:].clamp(-clamp, clamp)
        noise = torch.empty(mean.shape, dtype=mean.dtype, device=mean.device)
        for k in range(2):  # one draw per encoder, as randn_like(mean_k) would
            noise[k].normal_()
        z = torch.addcmul(mean, torch.exp(0.5 * logvar), noise)  # (2, T, r)
        nll = self.decoder.negative_log_likelihood(tokens, z.transpose(0, 1).reshape(-1, 2 * r))
        prior = mean.new_zeros(2, 1, 1)
        prior[1] = self.mu_p2
        second_moment = (mean - prior).square() + logvar.exp()  # E[(z − m)²] per dim
        kl = 0.5 * (second_moment - 1.0 - logvar).sum(-1).mean(-1)  # (2,)
        moments = second_moment.mean((1, 2))
        parts = {"R": nll.mean(), "K1": kl[0], "K2": kl[1], "G": moments[0] - moments[1]}
        return z[0].reshape(*x.shape[:-1], r), parts

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
