"""Counterfactual sensitivity of a latent: how far its code moves when the object or the background
is removed from a test image (issue 12, item 3; the replicas' core-only and background-only
twins of every test image, :func:`robustbench_fvae.data.counterfactual_splits`).

For a latent with pooled test codes ``c_i`` (N, D), the codes ``c_i^core`` of the same images'
*core-only* twins (the silhouette on a neutral ground: background removed) and ``c_i^bg`` of their
*background-only* twins (the background alone: object removed):

* ``spread`` = the mean Euclidean distance between the codes of two different test images,
  ``mean_{i≠j} ‖c_i − c_j‖`` — the scale a shift is measured against;
* ``shift_core_only`` = ``mean_i ‖c_i − c_i^core‖ / spread``: how much the code moves when the
  background is removed (0: not at all; 1: as far as to a random other test image);
* ``shift_background_only`` = ``mean_i ‖c_i − c_i^bg‖ / spread``: the same when the object is
  removed;
* ``ratio`` = ``shift_background_only / shift_core_only``: above 1 the code follows the object
  more than the background (what a task code should do on these replicas), below 1 the reverse;
  ``inf`` when removing the background does not move it at all.

Each shift comes with a 95 % interval (``_low``/``_high``): the normal approximation of a mean
of the N per-image shifts, the spread held fixed. Read a code's ratio beside the module input's
(``backbone``) and the untrained random projection's (``random``) of the same layer: a ratio
above those is what training added.

A latent without spread (a constant code) gets NaN shifts and ratio: it carries nothing to move.
Pure functions over arrays; the wiring to a run is in :mod:`.probes`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SENSITIVITY_COLUMNS = ("layer", "latent", "shift_core_only", "shift_core_only_low",
                       "shift_core_only_high", "shift_background_only",
                       "shift_background_only_low", "shift_background_only_high", "ratio",
                       "spread", "n")
PAIR_CHUNK = 512  # rows per block of the pairwise-distance mean (bounds memory to 512·N floats)


class SensitivityError(ValueError):
    """Code arrays of different shapes, or too few images."""


def mean_pairwise_distance(X: np.ndarray) -> float:
    """``mean_{i≠j} ‖x_i − x_j‖`` over the rows of ``X`` (N ≥ 2, D), exact, in row blocks."""
    X = np.asarray(X, dtype=np.float64)
    n = len(X)
    if n < 2:
        raise SensitivityError(f"the spread needs at least 2 images, got {n}")
    sq = (X * X).sum(1)
    total = 0.0
    for start in range(0, n, PAIR_CHUNK):
        block = X[start:start + PAIR_CHUNK]
        d2 = sq[start:start + PAIR_CHUNK, None] + sq[None, :] - 2.0 * block @ X.T
        total += float(np.sqrt(np.clip(d2, 0.0, None)).sum())  # the diagonal adds ~0
    return total / (n * (n - 1))


def counterfactual_sensitivity(codes: np.ndarray, core_only: np.ndarray,
                               background_only: np.ndarray) -> dict[str, float]:
    """Shifts of one latent's codes (module docstring). All three arrays (N, D), row ``i`` the
    same test image. Returns ``shift_core_only``, ``shift_background_only``, ``ratio``,
    ``spread`` (unnormalised, in code units) and ``n``."""
    codes, core_only, background_only = (np.asarray(a, dtype=np.float64)
                                          for a in (codes, core_only, background_only))
    if codes.ndim != 2 or codes.shape != core_only.shape or codes.shape != background_only.shape:
        raise SensitivityError(f"codes, core-only and background-only codes must be (N, D) of one "
                               f"shape; got {codes.shape}, {core_only.shape}, "
                               f"{background_only.shape}")
    spread = mean_pairwise_distance(codes)
    if spread <= 1e-12:
        empty = {f"{k}{end}": math.nan for k in ("shift_core_only", "shift_background_only")
                 for end in ("", "_low", "_high")}
        return {**empty, "ratio": math.nan, "spread": spread, "n": len(codes)}
    out = {}
    for key, twin in (("shift_core_only", core_only), ("shift_background_only",
                                                       background_only)):
        per_image = np.linalg.norm(codes - twin, axis=1) / spread
        mean = float(per_image.mean())
        half = 1.959963984540054 * float(per_image.std(ddof=1)) / math.sqrt(len(per_image))
        out.update({key: mean, f"{key}_low": mean - half, f"{key}_high": mean + half})
    core, background = out["shift_core_only"], out["shift_background_only"]
    ratio = background / core if core > 0 else (math.inf if background > 0 else math.nan)
    return {**out, "ratio": ratio, "spread": spread, "n": len(codes)}


def sensitivity_rows(codes: dict[tuple[str, str], np.ndarray],
                     core_only: dict[tuple[str, str], np.ndarray],
                     background_only: dict[tuple[str, str], np.ndarray]) -> list[dict]:
    """One row per ``(layer, latent)`` of ``codes`` (in its order): the keys of
    :data:`SENSITIVITY_COLUMNS`."""
    missing = [k for k in codes if k not in core_only or k not in background_only]
    if missing:
        raise SensitivityError(f"counterfactual codes lack {missing}")
    return [{"layer": k[0], "latent": k[1],
             **counterfactual_sensitivity(codes[k], core_only[k], background_only[k])}
            for k in codes]


def write_sensitivity_csv(rows: Sequence[dict], path: str | Path) -> Path:
    """``sensitivity.csv`` with :data:`SENSITIVITY_COLUMNS`, written atomically."""
    from ..record.io import write_csv_atomic

    return write_csv_atomic(path, SENSITIVITY_COLUMNS, rows)


def format_sensitivity_table(rows: Sequence[dict]) -> str:
    """Rows layer × latent: the two normalised shifts and their ratio."""
    width = max([len("layer")] + [len(r["layer"]) for r in rows])
    head = (f"{'layer':{width}}  {'latent':8}  {'bg removed':>10}  {'obj removed':>11}  "
            f"{'ratio':>6}")
    lines = [head, "-" * len(head)]
    previous = None
    for r in rows:
        shown = r["layer"] if r["layer"] != previous else ""
        previous = r["layer"]
        lines.append(f"{shown:{width}}  {r['latent']:8}  {_fmt(r['shift_core_only']):>10}  "
                     f"{_fmt(r['shift_background_only']):>11}  {_fmt(r['ratio']):>6}")
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.3f}")
