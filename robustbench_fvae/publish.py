"""Copy finished run records into a published results folder (no weights, no checkpoints).

A published run keeps the ``<out>/<dataset>/<method>/<hash>/`` layout and the files the report
and the results page read — ``config.json``, ``metrics.json``, ``history.jsonl``, ``done`` —
plus the tables its ``probe/`` folder holds (:data:`PROBE_FILES`, when the run was probed), and,
when asked, its validation and test predictions as ``predictions_<split>.csv.gz``: the
class columns exact, the probabilities rounded to :data:`PROB_DECIMALS` decimals (accuracies,
worst-group accuracy and their bootstrap intervals recompute exactly; ECE to that rounding), so
that a results folder of a few hundred runs stays a few MB. ``report`` reads a published folder
as any runs folder; :func:`robustbench_fvae.record.schema.read_predictions` reads the ``.gz`` files.
"""

from __future__ import annotations

import csv
import gzip
import io
import shutil
from collections.abc import Iterable
from pathlib import Path

from robustbench_fvae.record import schema, view
from robustbench_fvae.record.io import write_bytes_atomic

PUBLISHED_FILES = (schema.CONFIG_FILE, schema.METRICS_FILE, schema.HISTORY_FILE,
                   schema.DONE_FILE)
PROB_DECIMALS = 3
# What `probe` wrote (robustbench_fvae/analysis/probes.py, evidence.py) that the latents page
# reads: tables only, no figures.
PROBE_DIR = "probe"
PROBE_FILES = ("probe.json", "probes.csv", "sensitivity.csv", "information.csv",
               "information_summary.csv", "updates.csv", "interventions.csv")


def packed_predictions(path: Path) -> bytes:
    """The gzip bytes of predictions CSV ``path`` with probabilities at PROB_DECIMALS decimals
    (deterministic: no file name or time in the gzip header)."""
    pred = schema.read_predictions(path)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    k = pred["prob"].shape[1]
    writer.writerow([*schema.PREDICTION_COLUMNS, *(f"prob_{i}" for i in range(k))])
    for i in range(len(pred["index"])):
        writer.writerow([*(int(pred[c][i]) for c in schema.PREDICTION_COLUMNS),
                         *(f"{p:.{PROB_DECIMALS}f}" for p in pred["prob"][i])])
    return gzip.compress(buf.getvalue().encode("utf-8"), compresslevel=9, mtime=0)


def published_dir(dest_root: str | Path, dataset: str, method: str, run_hash: str) -> Path:
    """Where a run is (or would be) published: ``dest_root/<dataset>/<method>/<hash>/``."""
    return Path(dest_root) / dataset / method / run_hash


def publish_run(run_dir: str | Path, dest_root: str | Path, *, predictions: bool) -> Path:
    """Copy finished run ``run_dir`` to ``dest_root/<dataset>/<method>/<hash>/``; returns the
    copy. Refuses (ValueError) a run that is not done. Files already there are replaced."""
    rec = view.load_run(run_dir)
    if not rec.done:
        raise ValueError(f"{run_dir} is not a finished run (no {schema.DONE_FILE} marker); "
                         "finish it before publishing")
    dest = published_dir(dest_root, str(rec.dataset), str(rec.method), Path(run_dir).name)
    dest.mkdir(parents=True, exist_ok=True)
    for name in PUBLISHED_FILES:
        if name != schema.DONE_FILE:
            shutil.copyfile(Path(run_dir) / name, dest / name)
    if predictions:
        for split in schema.PREDICTION_SPLITS:
            source = schema.predictions_path(run_dir, split)
            write_bytes_atomic(dest / f"predictions_{split}.csv.gz",
                                       packed_predictions(source))
    probed = Path(run_dir) / PROBE_DIR
    if (probed / "probe.json").is_file():
        (dest / PROBE_DIR).mkdir(exist_ok=True)
        for name in PROBE_FILES:
            if (probed / name).is_file():
                shutil.copyfile(probed / name, dest / PROBE_DIR / name)
    # the marker last, copied as it was: a half-copied run is never read as finished
    shutil.copyfile(Path(run_dir) / schema.DONE_FILE, dest / schema.DONE_FILE)
    return dest


def publish_runs(run_dirs: Iterable[str | Path], dest_root: str | Path, *, predictions: bool
                 ) -> list[Path]:
    """:func:`publish_run` of every directory in ``run_dirs``; returns the copies."""
    return [publish_run(d, dest_root, predictions=predictions) for d in run_dirs]
