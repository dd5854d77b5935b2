"""FVAE-LoRA (Kumar et al., NeurIPS 2025) and its ablations VAE2LAT and β-VAE2LAT.

One :class:`FVAEAdapter` replaces LoRA's ``A x`` by the code ``z1`` of a VAE with two latent spaces:
``q1(z1|x)`` for the task and ``q2(z2|x)`` for the rest, a decoder ``p(x|z1, z2)`` that reconstructs
the layer input, priors ``p1 = N(0, I)`` and ``p2 = N(μ_p2·1, I)``. The adapted output is
``W x + s_B · B z1``. All Gaussian terms are closed form and per token (no d×d matrices). The three
methods share these modules; only :class:`FVAEObjective` differs (docs/methods.md).
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

    Each method's weights are set in robustbench_fvae/methods/fvae.py (FVAE-LoRA: ``β₂ = 0``;
    VAE2LAT: ``δ = 0, β₂ = β = 1``; β-VAE2LAT: ``δ = 0, β₂ = β = 10``).
    """

    alpha: float = 1.0
    beta: float = 1.0
    beta_z2: float = 0.0
    delta: float = 1.0

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

        Dropout follows the module's mode (its masks drawn as the modules would draw them); the
        whole decoder and the density run as one fp32 node (:class:`_DecoderGaussianNLL`), also
        under autocast."""
        tokens = x.reshape(-1, x.shape[-1])
        masks = decoder_keep_masks([self], tokens.shape[0], tokens)
        for mask in masks:
            mask.draw(0)
        return decoder_nll([self], tokens, z.reshape(1, -1, z.shape[-1]),
                           masks).reshape(x.shape[:-1])

    def dropouts(self) -> list[nn.Dropout]:
        """The hidden layers' dropout modules, in order."""
        return [m for m in self.net if isinstance(m, nn.Dropout)]


class KeepMasks:
    """The dropout keep masks of K modules applied at one place (one hidden layer of K adapters),
    drawn into one (K, rows, cols) buffer of ``like``'s dtype and device.

    ``draw(k)`` draws module k's mask as the module would draw it for a (rows, cols) input, by
    torch's rules: one ``bernoulli_(1 − p)`` in training with ``0 < p < 1`` (kept units scaled by
    ``1/(1 − p)``); no draw in eval or with ``p = 0`` (ones), nor with ``p = 1`` (zeros). The
    caller draws in the order the modules would run. ``values`` is None when none of the K
    modules draws (all the identity).
    """

    def __init__(self, dropouts: Sequence[nn.Dropout], rows: int, cols: int,
                 like: torch.Tensor) -> None:
        self.dropouts = list(dropouts)
        self.values = (like.new_empty(len(self.dropouts), rows, cols)
                       if any(d.training and d.p > 0 for d in self.dropouts) else None)
        self.scales = [1.0] * len(self.dropouts)

    def draw(self, k: int) -> None:
        dropout, values = self.dropouts[k], self.values
        if values is None:
            return
        if not dropout.training or dropout.p == 0:
            values[k].fill_(1.0)
        elif dropout.p == 1:
            values[k].zero_()
        else:
            values[k].bernoulli_(1.0 - dropout.p)
            self.scales[k] = 1.0 / (1.0 - dropout.p)

    def scale(self) -> float | torch.Tensor:
        """The kept units' scales: one float when the K agree, else a (K, 1, 1) tensor."""
        if len(set(self.scales)) == 1:
            return self.scales[0]
        return torch.tensor(self.scales, dtype=self.values.dtype,
                            device=self.values.device).view(-1, 1, 1)


def decoder_keep_masks(decoders: Sequence[GaussianDecoder], tokens: int, like: torch.Tensor
                       ) -> list[KeepMasks]:
    """Undrawn :class:`KeepMasks` of K decoders of one shape, one per hidden layer in layer
    order, each for ``tokens`` rows."""
    width = decoders[0].net[0].out_features
    return [KeepMasks(layer, tokens, width, like)
            for layer in zip(*(dec.dropouts() for dec in decoders))]


def _times(t: torch.Tensor, factor: float | torch.Tensor, in_place: bool = True
           ) -> torch.Tensor:
    """``t · factor``, skipping the pass when ``factor`` is the float 1."""
    if isinstance(factor, float) and factor == 1.0:
        return t
    return t.mul_(factor) if in_place else t * factor


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack`` along a new first dim; a view (no copy) for a single tensor."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(list(tensors))


def decoder_nll(decoders: Sequence[GaussianDecoder], tokens: torch.Tensor, z: torch.Tensor,
                masks: Sequence[KeepMasks]) -> torch.Tensor:
    """``−log p_k(x|z_k)`` of K decoders of one shape at once, per token, summed over the input
    dims: ``tokens`` (T, d) the target they share, ``z`` (K, T, i), ``masks`` the hidden layers'
    drawn :class:`KeepMasks`, in layer order. Returns (K, T). Runs in (at least) fp32, also
    under autocast."""
    dtype = torch.promote_types(z.dtype, torch.float32)
    linears = [[m for m in dec.net if isinstance(m, nn.Linear)] for dec in decoders]
    params = []
    for layer in zip(*linears):
        params.append(_stack([lin.weight for lin in layer]).transpose(1, 2).to(dtype))
        params.append(_stack([lin.bias for lin in layer]).unsqueeze(1).to(dtype))
    log_scale = _stack([dec.log_scale for dec in decoders]).to(dtype)
    values = tuple(None if m.values is None else m.values.to(dtype) for m in masks)
    scales = tuple(m.scale() for m in masks)
    return _DecoderGaussianNLL.apply(tokens.to(dtype), z.to(dtype), log_scale, values, scales,
                                     *params)


class _DecoderGaussianNLL(torch.autograd.Function):
    """``−log N(x; g_k(z_k), diag(s_k²))`` per decoder k and token, summed over the last dim, for
    K decoders of one shape at once; ``g_k`` the decoder MLP (hidden layers Linear → ReLU →
    dropout, then the output Linear), ``s_k = exp(log_scale_k)`` per input dim.

    Inputs: ``x`` (T, d), the target all K decoders share; ``z`` (K, T, i); ``log_scale`` (K, d);
    ``masks``: per hidden layer a 0/1 keep mask (K, T, h), or None for no dropout; ``scales``: per
    hidden layer the kept units' scale ``1/(1 − p)``, a float or a (K, 1, 1) tensor; then per
    Linear its weight transposed (K, in, out) and its bias (K, 1, out). Output (K, T).

    Written out because the decoder is most of FVAE-LoRA's training cost, as one node over the
    K slices of a layer (batched matmuls, not K sets of small ones):
    - each hidden layer keeps only its output ``ĥ = ReLU(a)·mask`` for backward (autograd would
      keep the ReLU output, the mask and the product), and ``ĥ > 0`` exactly where the gradient
      passes, so ReLU and dropout go back in one ``threshold_backward`` pass;
    - the dropout scale ``1/(1 − p)`` rides on the next layer's (small) weight, not on the
      (T, h) activations;
    - the standardised residual ``u = (x − μ)/s`` comes out of one broadcast ``addcmul`` and one
      ``baddbmm``, and is the only (K, T, d) tensor kept; ``∂/∂μ = −u/s``, ``∂/∂x = Σ_k u_k/s_k``,
      ``∂/∂log s = 1 − u²`` (per token, times the incoming gradient).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, z: torch.Tensor, log_scale: torch.Tensor,
                masks: tuple[torch.Tensor | None, ...], scales: tuple[float | torch.Tensor, ...],
                *params: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            d = x.shape[-1]
            weights = list(params[0::2])
            # Weights as applied: each layer's carries the previous dropout's scale.
            for i, scale in enumerate(scales, start=1):
                weights[i] = _times(weights[i], scale, in_place=False)
            outputs = [z]
            for i, mask in enumerate(masks):
                h = torch.baddbmm(params[2 * i + 1], outputs[-1], weights[i]).relu_()
                outputs.append(h if mask is None else h.mul_(mask))
            inv_scale = torch.exp(-log_scale).unsqueeze(1)  # (K, 1, d)
            u = torch.addcmul(params[-1] * -inv_scale, x, inv_scale).baddbmm_(
                outputs[-1], weights[-1] * inv_scale, alpha=-1.0)
            nll = (0.5 * torch.linalg.vector_norm(u, dim=-1).square()
                   + log_scale.sum(-1, keepdim=True) + d * _HALF_LOG_2PI)
        ctx.save_for_backward(u, log_scale, *outputs, *weights)
        ctx.layers = len(weights)
        ctx.scales = scales
        return nll

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        n = ctx.layers
        u, log_scale, *rest = ctx.saved_tensors
        outputs, weights = rest[:n], rest[n:]
        need = ctx.needs_input_grad
        with torch.autocast(grad.device.type, enabled=False):
            grad_res = u * grad.unsqueeze(-1)  # ∂/∂(x − μ) · s, per token
            grad_log_scale = (grad.sum(-1, keepdim=True) - (grad_res * u).sum(1)
                              if need[2] else None)
            grad_res.mul_(torch.exp(-log_scale).unsqueeze(1))  # ∂/∂x_k = −∂/∂μ_k
            # One slice: a view (a sum over a size-1 dim would still be a full reduction pass).
            grad_x = ((grad_res[0] if len(grad_res) == 1 else grad_res.sum(0)) if need[0]
                      else None)
            grad_params: list[torch.Tensor | None] = [None] * (2 * n)
            # ∂/∂ (output of layer i), from the last layer down; for the output layer it is
            # ∂/∂μ = −grad_res, whose sign goes onto the (narrower) products instead.
            grad_out, sign = grad_res, -1.0
            for i in range(n - 1, -1, -1):
                if i < n - 1:  # through this hidden layer's dropout and ReLU
                    grad_out = torch.ops.aten.threshold_backward(grad_out, outputs[i + 1], 0)
                scale = ctx.scales[i - 1] if i > 0 else 1.0
                grad_params[2 * i] = _times(outputs[i].transpose(1, 2) @ grad_out, sign * scale)
                grad_params[2 * i + 1] = _times(grad_out.sum(1, keepdim=True), sign)
                if i > 0 or need[1]:
                    grad_out = _times(grad_out @ weights[i].transpose(1, 2), sign)
                sign = 1.0
        grad_z = grad_out if need[1] else None
        return grad_x, grad_z, grad_log_scale, None, None, *grad_params


class FVAEAdapter(nn.Module):
    """The FVAE-LoRA delta ``s_B · B z1`` of one adapted output slice, plus its VAE loss.

    Training (``self.training``): ``z1``/``z2`` are reparameterised samples; the forward pass also
    computes the per-layer loss parts R, K1, K2, G (means over tokens) and stores them in
    ``self.loss_parts`` and the weighted loss in ``self.loss`` for the model to collect. It is
    :func:`training_deltas` for this adapter alone; an :class:`~.inject.AdaptedLinear` with
    several FVAE slices (q, k, v of one ``qkv``) runs them as one batch, with the same values.
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
        return training_deltas([self], x)[0]

    def sample_and_score(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One reparameterised sample of z1 (returned) and the loss parts, means over tokens
        (:func:`sample_and_score_batch` for this adapter alone)."""
        return sample_and_score_batch([self], x)[0]

    def batch_key(self) -> tuple:
        """Adapters with equal keys can train as one batch (:func:`sample_and_score_batch`):
        the same input width, latent size, encoder and decoder shapes and log-variance clamps."""
        return (self.in_features, self.rank, self.encoder1.trunk[0].out_features,
                tuple(m.out_features for m in self.decoder.net if isinstance(m, nn.Linear)),
                self.encoder1.logvar_clamp, self.encoder2.logvar_clamp)

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


def sample_and_score_batch(adapters: Sequence[FVAEAdapter], x: torch.Tensor
                           ) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """For each of K adapters reading the same input ``x`` (…, d) (equal :meth:`batch_key`s),
    one reparameterised sample of z1 (…, r) and its loss parts, means over tokens:

    ``R = −log p(x|z1, z2)`` (one sample of each, summed over input dims);
    ``K1 = KL(q1‖p1)``, ``K2 = KL(q2‖p2)`` summed over latent dims;
    ``G = mean_j E[z1_j²] − mean_j E[(z2_j − μ_p2)²]`` with closed-form expectations
    ``E[(z − m)²] = (μ − m)² + σ²`` — the released one-sample estimate, in expectation.

    The 2K encoders run as one computation: one matmul for all trunks, one batched matmul for
    all heads, every Gaussian term once; the K decoders and their densities as one node
    (:class:`_DecoderGaussianNLL`). Parameters are read directly, so forward hooks on the
    submodules do not fire. The random draws are made first, in the order and shapes of running
    the adapters one after the other as modules (per adapter: encoder 1's then encoder 2's
    dropout, z1's then z2's noise, the decoder's dropouts), in the input's dtype, so the values
    equal the per-module formulation up to float rounding.
    """
    first = adapters[0]
    if any(a.batch_key() != first.batch_key() for a in adapters):
        raise ValueError("FVAE adapters of different shapes cannot be scored as one batch")
    k, r = len(adapters), first.rank
    tokens = x.reshape(-1, first.in_features)
    t = tokens.shape[0]
    encoders = [e for a in adapters for e in (a.encoder1, a.encoder2)]
    trunks = [e.trunk[0] for e in encoders]
    noise = tokens.new_empty(2 * k, t, r)
    encoder_keep = KeepMasks([e.trunk[2] for e in encoders], t, trunks[0].out_features, tokens)
    decoder_keep = decoder_keep_masks([a.decoder for a in adapters], t, tokens)
    for i in range(k):
        encoder_keep.draw(2 * i)
        encoder_keep.draw(2 * i + 1)
        noise[2 * i].normal_()  # as randn_like(μ) of each encoder would draw it
        noise[2 * i + 1].normal_()
        for masks in decoder_keep:
            masks.draw(i)

    hidden = torch.addmm(torch.cat([m.bias for m in trunks]), tokens,
                         torch.cat([m.weight for m in trunks]).t()).relu_()
    hidden = hidden.view(t, 2 * k, -1).transpose(0, 1)  # (2K, T, h)
    if encoder_keep.values is not None:
        hidden = hidden * encoder_keep.values.mul_(encoder_keep.scale()).to(hidden.dtype)
    heads_w = torch.stack([torch.cat([e.mean.weight, e.logvar.weight]).t() for e in encoders])
    heads_b = torch.stack([torch.cat([e.mean.bias, e.logvar.bias]) for e in encoders])
    stats = torch.baddbmm(heads_b.unsqueeze(1), hidden, heads_w)  # (2K, T, 2r)
    clamp = first.encoder1.logvar_clamp
    mean, logvar = stats[..., :r], stats[..., r:].clamp(-clamp, clamp)
    z = torch.addcmul(mean, torch.exp(0.5 * logvar), noise.to(mean.dtype))  # (2K, T, r)
    decoder_in = z.view(k, 2, t, r).transpose(1, 2).reshape(k, t, 2 * r)  # [z1, z2] per token
    nll = decoder_nll([a.decoder for a in adapters], tokens, decoder_in, decoder_keep)
    prior = mean.new_zeros(k, 2, 1, 1)
    for i, adapter in enumerate(adapters):
        prior[i, 1] = adapter.mu_p2
    prior = prior.view(2 * k, 1, 1)
    second_moment = (mean - prior).square() + logvar.exp()  # E[(z − m)²] per dim
    kl = 0.5 * (second_moment - 1.0 - logvar).sum(-1).mean(-1)  # (2K,)
    moments = second_moment.mean((1, 2))
    lead = x.shape[:-1]
    return [(z[2 * i].reshape(*lead, r),
             {"R": nll[i].mean(), "K1": kl[2 * i], "K2": kl[2 * i + 1],
              "G": moments[2 * i] - moments[2 * i + 1]}) for i in range(k)]


def training_deltas(adapters: Sequence[FVAEAdapter], x: torch.Tensor) -> list[torch.Tensor]:
    """The training forward of K FVAE adapters reading the same input, as one batch
    (:func:`sample_and_score_batch`): each adapter's delta ``s_B · B z1`` (…, out), its loss parts
    stored in ``loss_parts`` and its weighted loss in ``loss``, as K module calls would."""
    deltas = []
    for adapter, (z1, parts) in zip(adapters, sample_and_score_batch(adapters, x)):
        adapter.loss_parts = parts
        adapter.loss = adapter.objective(parts)
        deltas.append(adapter.output_scale * (z1 @ adapter.lora_B.t()))
    return deltas
