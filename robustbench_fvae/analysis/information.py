"""How much information a Gaussian posterior code carries, measured **per token** (the VAE of
FVAE-LoRA and its ablations encodes each token separately; pooling tokens first, as the older
``active_units`` did, cuts the variance of the code 4–20× and can read an informative unit as
dead).

For one adapted slice, a latent with posterior ``q(z|x_t) = N(μ_t, diag σ_t²)`` per token ``t``
(all tokens of all evaluated images, CLS included, as in training) and a prior ``N(m·1, I)``, the
KL of unit ``j`` averaged over tokens splits exactly into three non-negative parts (nats per
token):

``KL_j = offset_j + data_j + sigma_j`` with

* ``offset_j = ½ (mean_t μ_tj − m)²`` — a constant shift of the code, the same for every token;
* ``data_j = ½ Var_t(μ_tj)`` — the **data-dependent** part: how far the posterior means of
  different tokens are spread, in units of the prior's scale. It splits further (law of total
  variance, positions weighted by their token counts) into ``data_image_j`` = ½ the mean over
  positions of the variance over images at that position (what the image changes) and
  ``data_position_j`` = ½ the variance of the per-position means (what the position alone
  changes);
* ``sigma_j = ½ mean_t (σ_tj² − 1 − log σ_tj²)`` — the σ mismatch: zero when σ = 1.

A unit is **collapsed** when ``data_j`` is below :data:`COLLAPSE_NATS` (its code does not move
with the input, whatever its σ); a slice when the sum over units is.

Two estimates of the information ``I(x_token; z)`` sit beside it:

* :func:`gaussian_capacity_bound` — ``Σ_j ½ [log(Var_t μ_tj + mean_t σ_tj²) − mean_t log σ_tj²]``,
  an upper bound: ``h(z) ≤`` the entropy of a Gaussian of ``z``'s covariance, whose log-det is at
  most the sum of the log variances (Hadamard), and ``h(z|x) = Σ_j mean_t ½ log(2πe σ_tj²)``;
* :func:`minibatch_mutual_information` — the minibatch Monte-Carlo estimate on ``M`` tokens:
  ``mean_i [log q(z_i|x_i) − log (1/M) Σ_k q(z_i|x_k)]`` with ``z_i ~ q(·|x_i)``. It cannot
  exceed ``log M`` (the cap is reported with it), so it is informative only well below the cap.

All functions are pure (arrays in, numbers out); :class:`PosteriorMoments` accumulates the
per-position sums batch by batch so that no per-token array of a whole split is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

COLLAPSE_NATS = 0.01  # data-dependent KL (nats per token) below which a unit carries nothing
DEFAULT_MI_TOKENS = 2048  # tokens of the minibatch MI estimate: its cap is log(2048) = 7.6 nats


class InformationError(ValueError):
    """Arrays of the wrong shape, or no tokens to measure."""


@dataclass
class PosteriorMoments:
    """Running per-position sums of a posterior code over images.

    ``update(mu, logvar)`` takes (B, T, r) arrays (B images, T token positions, r units);
    every call must have the same T and r.
    """

    count: np.ndarray | None = None  # (T,) images seen per position
    sum_mu: np.ndarray | None = None  # (T, r)
    sum_mu2: np.ndarray | None = None  # (T, r)
    sum_var: np.ndarray | None = None  # (T, r) of σ²
    sum_logvar: np.ndarray | None = None  # (T, r)

    def update(self, mu: np.ndarray, logvar: np.ndarray) -> None:
        mu = np.asarray(mu, dtype=np.float64)
        logvar = np.asarray(logvar, dtype=np.float64)
        if mu.ndim != 3 or mu.shape != logvar.shape:
            raise InformationError(f"mu and logvar must be (B, T, r) of one shape; got "
                                   f"{mu.shape} and {logvar.shape}")
        if self.count is None:
            t, r = mu.shape[1:]
            self.count = np.zeros(t)
            self.sum_mu, self.sum_mu2, self.sum_var, self.sum_logvar = (
                np.zeros((t, r)) for _ in range(4))
        elif mu.shape[1:] != self.sum_mu.shape:
            raise InformationError(f"batch of shape {mu.shape} after batches of (·, "
                                   f"{self.sum_mu.shape[0]}, {self.sum_mu.shape[1]})")
        self.count += mu.shape[0]
        self.sum_mu += mu.sum(0)
        self.sum_mu2 += (mu * mu).sum(0)
        self.sum_var += np.exp(logvar).sum(0)
        self.sum_logvar += logvar.sum(0)

    def rates(self, prior_mean: float = 0.0) -> dict[str, np.ndarray]:
        """Per unit (r,), nats per token: ``kl``, ``offset``, ``data``, ``data_image``,
        ``data_position``, ``sigma`` (module docstring; ``kl = offset + data + sigma``), and
        ``capacity``, the unit's term of :func:`gaussian_capacity_bound`."""
        if self.count is None or self.count.sum() == 0:
            raise InformationError("no tokens were accumulated")
        n_p = self.count[:, None]
        total = float(self.count.sum())
        mean_p = self.sum_mu / n_p  # (T, r)
        var_p = np.maximum(self.sum_mu2 / n_p - mean_p ** 2, 0.0)  # over images, per position
        weight = n_p / total
        mean = (weight * mean_p).sum(0)
        var_image = (weight * var_p).sum(0)
        var_position = (weight * (mean_p - mean) ** 2).sum(0)
        var = var_image + var_position
        mean_var = self.sum_var.sum(0) / total
        mean_logvar = self.sum_logvar.sum(0) / total
        sigma = 0.5 * (mean_var - 1.0 - mean_logvar)
        offset = 0.5 * (mean - prior_mean) ** 2
        return {"kl": offset + 0.5 * var + sigma, "offset": offset, "data": 0.5 * var,
                "data_image": 0.5 * var_image, "data_position": 0.5 * var_position,
                "sigma": sigma,
                "capacity": 0.5 * (np.log(var + mean_var) - mean_logvar)}


def gaussian_capacity_bound(mu: np.ndarray, logvar: np.ndarray) -> float:
    """Upper bound on ``I(x_token; z)`` in nats from per-token posteriors ``mu``, ``logvar``
    (N tokens, r) (module docstring)."""
    moments = PosteriorMoments()
    moments.update(np.asarray(mu)[:, None, :], np.asarray(logvar)[:, None, :])
    return float(moments.rates()["capacity"].sum())


def minibatch_mutual_information(mu: np.ndarray, logvar: np.ndarray, seed: int = 0
                                 ) -> tuple[float, float]:
    """``(estimate, cap)`` in nats: the minibatch Monte-Carlo estimate of ``I(x; z)`` over the
    ``M`` tokens given (rows of ``mu``, ``logvar``: (M, r)), one sample ``z_i ~ q(·|x_i)`` per
    token (seeded), and its cap ``log M``. The aggregate posterior is the mixture of the ``M``
    posteriors, so the estimate lies in ``[0, log M]`` up to sampling noise."""
    mu = np.asarray(mu, dtype=np.float64)
    logvar = np.asarray(logvar, dtype=np.float64)
    if mu.ndim != 2 or mu.shape != logvar.shape or len(mu) < 2:
        raise InformationError(f"mu and logvar must be (M >= 2, r) of one shape; got {mu.shape} "
                               f"and {logvar.shape}")
    m = len(mu)
    rng = np.random.RandomState(seed)
    std = np.exp(0.5 * logvar)
    z = mu + std * rng.standard_normal(mu.shape)
    inv_var = np.exp(-logvar)  # (M, r)
    # log q(z_i | x_k) for all i, k, up to the constant −r/2·log 2π that cancels in the ratio
    log_q = np.empty((m, m))
    for start in range(0, m, 256):
        zi = z[start:start + 256, None, :]  # (b, 1, r)
        log_q[start:start + 256] = -0.5 * (((zi - mu[None]) ** 2) * inv_var[None]
                                           + logvar[None]).sum(-1)
    own = np.diag(log_q)
    peak = log_q.max(axis=1)
    mixture = peak + np.log(np.exp(log_q - peak[:, None]).mean(axis=1))
    return float(np.mean(own - mixture)), math.log(m)


def collapsed_units(data: np.ndarray, threshold: float = COLLAPSE_NATS) -> np.ndarray:
    """Boolean (r,): units whose data-dependent KL ``data`` (nats per token) is below
    ``threshold``."""
    return np.asarray(data) < threshold


def slice_is_collapsed(data: np.ndarray, threshold: float = COLLAPSE_NATS) -> bool:
    """A slice is collapsed when its units' data-dependent KL sums to less than ``threshold``."""
    return float(np.sum(data)) < threshold
