"""``fvae`` (FVAE-LoRA, Kumar et al., NeurIPS 2025) and its ablations ``vae2lat`` and
``bvae2lat`` (β-VAE2LAT).

The three share the adapter (robustbench_fvae/adapters/fvae.py); they differ only in the weights
of the per-layer loss ``ℓ = α·R + β·K1 + β₂·K2 − δ·G`` that joins the task loss as
``λ_task·task + λ_fvae·mean_over_layers(ℓ)`` (paper Eq. 6 as released):

* FVAE-LoRA: ``β₂ = 0`` (q2 has no KL, the paper's design), ``β`` default 1, ``δ`` as set;
* VAE2LAT: ``δ = 0``, ``β₂ = β``, default 1;
* β-VAE2LAT: ``δ = 0``, ``β₂ = β``, default 10.

``probe`` reads the codes z1 and z2.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from robustbench_fvae.config import ConfigError

from .registry import Method, get_method, register_method
from .search import ADAPTER_LR_SPACE, ALPHA_SPACE

if TYPE_CHECKING:
    import torch
    from torch import nn

    from robustbench_fvae.adapters import FVAEObjective
    from robustbench_fvae.config import AdapterConfig, RunConfig

FVAE_SETTINGS = ("rank", "targets", "alpha", "beta", "mu_p2", "encoder_hidden",
                 "decoder_hidden", "decoder_layers", "fvae_dropout", "b_init_std",
                 "output_scale", "logvar_clamp", "lambda_task", "lambda_fvae")


def fvae_objective(method: str, cfg: AdapterConfig) -> FVAEObjective:
    """The per-layer loss weights of ``method`` (``fvae``, ``vae2lat``, ``bvae2lat``) under
    ``cfg``."""
    from robustbench_fvae.adapters import FVAEObjective

    beta = get_method(method).setting(cfg, "beta")
    if method == "fvae":
        return FVAEObjective(cfg.alpha, beta, 0.0, cfg.delta)
    return FVAEObjective(cfg.alpha, beta, beta, 0.0)


def make_fvae(method: str, cfg: AdapterConfig, in_features: int, out_features: int
              ) -> nn.Module:
    from robustbench_fvae.adapters import FVAEAdapter

    return FVAEAdapter(
        in_features, out_features, cfg.rank, objective=fvae_objective(method, cfg),
        encoder_hidden=cfg.encoder_hidden, decoder_hidden=cfg.decoder_hidden,
        decoder_layers=cfg.decoder_layers, dropout=cfg.fvae_dropout, mu_p2=cfg.mu_p2,
        b_init_std=cfg.b_init_std, output_scale=cfg.output_scale, logvar_clamp=cfg.logvar_clamp,
    )


def _prepare(method: str, model: nn.Module, cfg: RunConfig) -> list[str]:
    from .setup import inject_slices

    return inject_slices(model, partial(make_fvae, method), cfg.adapter)


def fvae_loss(model: nn.Module, task: torch.Tensor, cfg: RunConfig
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``λ_task·task + λ_fvae·mean_over_adapted_layers(ℓ)`` (paper Eq. 6 as released) and the
    logged parts: R, K1, K2, G as means over layers and per layer as ``"<part>@<layer>"``, and
    ``aux`` (the mean ℓ)."""
    from robustbench_fvae.adapters import collect_aux_loss

    aux, parts = collect_aux_loss(model, per_layer=True)
    if aux is None:
        raise RuntimeError("FVAE method ran no adapter in training mode; call model.train()")
    parts["aux"] = aux
    return cfg.adapter.lambda_task * task + cfg.adapter.lambda_fvae * aux.float(), parts


def _check_bounded(cfg: AdapterConfig) -> None:
    """With the closed forms, the z1 part of ``β·K1 − δ·G`` per dimension is
    ``(β/2 − δ/r)·E[z1²] + …``; the objective is bounded below only when ``β > 2δ/r``."""
    beta = get_method("fvae").setting(cfg, "beta")
    if not beta > 2.0 * cfg.delta / cfg.rank:
        raise ConfigError(
            f"beta={beta} <= 2*delta/rank={2.0 * cfg.delta / cfg.rank:g}: the FVAE-LoRA objective "
            "is unbounded below (the repulsive term outgrows KL(q1||p1)); raise beta or lower delta"
        )


register_method(Method(
    name="fvae", label="FVAE-LoRA",
    summary="LoRA whose code is z1 of a two-latent VAE (z1: task, z2: the rest)",
    trains="adapters", default_lr=5e-3, prepare=partial(_prepare, "fvae"),
    # The paper's Appendix G ranges: KL weight β in [1, 10], the repulsion δ around its
    # recommended 1, and the reconstruction weight α.
    search_space={**ADAPTER_LR_SPACE, **ALPHA_SPACE,
                  "beta": {"log_uniform": [1.0, 10.0]}, "delta": {"choice": [0.5, 1.0, 2.0]}},
    defaults={"beta": 1.0}, codes=("z1", "z2"), loss=fvae_loss, validate=_check_bounded,
    accepts=(*FVAE_SETTINGS, "delta"),
))
# The ablations keep what defines them (β = 1 and β = 10) and search α beside the learning rate.
register_method(Method(
    name="vae2lat", label="VAE2LAT",
    summary="ablation: both latents with a KL to their priors, no repulsion (beta 1)",
    trains="adapters", default_lr=5e-3, prepare=partial(_prepare, "vae2lat"),
    search_space={**ADAPTER_LR_SPACE, **ALPHA_SPACE}, defaults={"beta": 1.0},
    codes=("z1", "z2"), loss=fvae_loss, accepts=FVAE_SETTINGS,
))
register_method(Method(
    name="bvae2lat", label=r"$\beta$-VAE2LAT",
    summary="ablation: VAE2LAT with beta 10",
    trains="adapters", default_lr=5e-3, prepare=partial(_prepare, "bvae2lat"),
    search_space={**ADAPTER_LR_SPACE, **ALPHA_SPACE}, defaults={"beta": 10.0},
    codes=("z1", "z2"), loss=fvae_loss, accepts=FVAE_SETTINGS,
))
