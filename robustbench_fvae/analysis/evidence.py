"""The latent evidence of one trained run beyond probe accuracies: token-level information rates,
update sizes with the parameters' displacement from initialisation, and interventions.

:func:`measure_evidence` runs :mod:`.updates` on validation and test, rebuilds nothing itself
(the caller passes the initial model), runs :mod:`.interventions` on test with the replica's
twins, and writes four files to the probe folder:

* ``information.csv`` — per split, slice, latent and unit: the token-level KL split into
  ``offset + data + sigma`` (``data = data_image + data_position``), the unit's capacity term,
  and ``collapsed`` (``data`` < ``threshold``), all in nats per token (:mod:`.information`);
* ``information_summary.csv`` — the same per slice and latent, summed over units, with
  ``active_units`` (units not collapsed), ``collapsed`` (the slice's data KL under the threshold),
  the minibatch MI estimate with its cap ``log M`` and the Gaussian-capacity bound;
* ``updates.csv`` — per slice: the median over test tokens of ‖update‖/‖Wx+b‖ and of its
  image-dependent part, the 90th percentile, and the displacement of the slice's parameters from
  their initialisation (:data:`~.updates.UPDATE_COLUMNS`);
* ``interventions.csv`` — :data:`~.interventions.INTERVENTION_COLUMNS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .information import COLLAPSE_NATS, slice_is_collapsed
from .interventions import (
    INTERVENTION_COLUMNS,
    format_intervention_table,
    intervention_logits,
    intervention_rows,
)
from .updates import UPDATE_COLUMNS, measure_updates, parameter_displacement

INFORMATION_COLUMNS = ("split", "layer", "latent", "unit", "kl", "offset", "data", "data_image",
                       "data_position", "sigma", "capacity", "collapsed")
SUMMARY_COLUMNS = ("split", "layer", "latent", "units", "active_units", "collapsed", "kl",
                   "offset", "data", "data_image", "data_position", "sigma", "capacity_bound",
                   "mi_estimate", "mi_cap", "mi_tokens")


def information_summary(units: Sequence[dict], mi: Sequence[dict], split: str,
                        threshold: float = COLLAPSE_NATS) -> list[dict]:
    """One row of :data:`SUMMARY_COLUMNS` per (layer, latent) of the per-unit rows ``units``."""
    estimates = {(r["layer"], r["latent"]): r for r in mi}
    grouped: dict[tuple[str, str], list[dict]] = {}
    for r in units:
        grouped.setdefault((r["layer"], r["latent"]), []).append(r)
    rows = []
    for key, members in grouped.items():
        data = np.array([m["data"] for m in members])
        total = {k: float(sum(m[k] for m in members))
                 for k in ("kl", "offset", "data", "data_image", "data_position", "sigma")}
        rows.append({"split": split, "layer": key[0], "latent": key[1], "units": len(members),
                     "active_units": int((data >= threshold).sum()),
                     "collapsed": slice_is_collapsed(data, threshold), **total,
                     "capacity_bound": float(sum(m["capacity"] for m in members)),
                     **{k: estimates[key][k] for k in ("mi_estimate", "mi_cap", "mi_tokens")}})
    return rows


def measure_evidence(model, initial_model, splits: dict, twins: dict, layers: Sequence[str],
                     indices: dict[str, np.ndarray], out_dir: Path, *, batch_size: int,
                     device, seed: int = 0, progress: bool = False,
                     threshold: float = COLLAPSE_NATS, log=print) -> dict:
    """Measure and write the four files (module docstring) for ``layers`` of ``model`` on
    ``splits[s][indices[s]]`` for ``s`` in val and test; ``twins`` maps twin kinds to splits in
    test's order (may be empty: the twin interventions are then skipped). Returns
    ``{"summary": rows of information_summary.csv, "interventions": rows}``."""
    from ..record.io import write_csv_atomic

    units, summary, sizes = [], [], None
    means = None
    for split in ("val", "test"):
        log(f"token-level information and update sizes on {len(indices[split])} {split} images")
        measured = measure_updates(model, splits[split], layers, indices[split],
                                   batch_size=batch_size, device=device, seed=seed,
                                   progress=progress)
        rows = [{"split": split, **r, "collapsed": r["data"] < threshold}
                for r in measured["information"]]
        units += rows
        summary += information_summary(rows, measured["mi"], split, threshold)
        if split == "test":
            sizes, means = measured["sizes"], measured["means"]
    displacement = parameter_displacement(model, initial_model, layers)
    sizes = [{**r, **displacement[r["layer"]]} for r in sizes]
    write_csv_atomic(out_dir / "information.csv", INFORMATION_COLUMNS, units)
    write_csv_atomic(out_dir / "information_summary.csv", SUMMARY_COLUMNS, summary)
    write_csv_atomic(out_dir / "updates.csv", UPDATE_COLUMNS, sizes)
    test = splits["test"]
    idx = indices["test"]
    log(f"interventions on {len(idx)} test images"
        + (f" with the {', '.join(sorted(twins))} twins" if twins else " (no twins)"))
    clean, logits = intervention_logits(model, test, twins, layers, means, idx,
                                        batch_size=batch_size, device=device, seed=seed,
                                        progress=progress)
    rows = intervention_rows(test.y[idx], test.g[idx], clean, logits, layers, seed=seed)
    write_csv_atomic(out_dir / "interventions.csv", INTERVENTION_COLUMNS, rows)
    log("\ninterventions (paired against the unmodified model on the same test images; 95 % "
        "intervals)\n" + format_intervention_table(rows))
    return {"summary": summary, "interventions": rows, "sizes": sizes}
