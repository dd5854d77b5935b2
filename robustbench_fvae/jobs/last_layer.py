"""The job of a derived run that refits a finished run's last layer on its frozen penultimate
features (DFR is one: robustbench_fvae/dfr.py).

A kind of refit supplies only what is its own (:class:`LastLayerRefit`): the facts reports show
(:class:`~robustbench_fvae.record.derived.DerivedFacts`), its hashed settings, and ``fit``, which
turns the validation split's features into a head. This module does the rest, the same for every
kind: it checks the parent, names the run (a hash of the parent's hash and the settings, beside
the parent as ``OUT/<dataset>/<method>/<hash>``), holds it through
:func:`robustbench_fvae.record.store.run_job`, extracts the features of val, test and the
replica's counterfactual twins with the parent's selected weights, checks that the parent's own
head reproduces its recorded predictions on them, evaluates the new head, and writes the record:
``config.json`` with the ``derived`` block, the prediction files, the kind's files and
``metrics.json``. Adding a kind of last-layer refit is adding one file (docs/design.md).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..cli import ArgumentParser, add_device_option, add_lock_options, positive_int
from ..config import canonical_json
from ..progress import print_line
from ..record import schema, store, view
from ..record.derived import DerivedFacts
from ..record.io import write_bytes_atomic, write_json_atomic

if TYPE_CHECKING:
    from ..data.base import GroupSplit


class DerivedRunError(ValueError):
    """The parent is not a finished run a derived run can start from, or a setting is out of
    range (bad input, exit 2)."""


@dataclass(frozen=True)
class HeadFit:
    """A fitted head and what the record says of it.

    ``predict_proba``: (N, D) float features → (N, K) class probabilities; ``n_params``: its
    trained parameters; ``record``: fields added to the record's ``derived`` block; ``metrics``:
    the kind's own block of ``metrics.json`` (under the kind's algorithm name); ``files``: extra
    files of the run (name → bytes), e.g. the head's weights.
    """

    predict_proba: Callable[[np.ndarray], np.ndarray]
    n_params: int
    record: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    files: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class LastLayerRefit:
    """One kind of last-layer refit with its settings.

    ``settings`` are hashed (with the parent's config hash) into the run's name and recorded as
    ``derived.settings``; ``uses_group_labels`` and ``val_note`` go to ``metrics.json``;
    ``fit(features, val)`` fits the head on the validation split's (N, D) features.
    """

    facts: DerivedFacts
    settings: Mapping[str, Any]
    uses_group_labels: list[str]
    val_note: str
    fit: Callable[[np.ndarray, GroupSplit], HeadFit]


@dataclass
class DerivedResult:
    run_dir: Path
    metrics: dict[str, Any]
    skipped: bool = False


def derived_hash(parent_hash: str, settings: Mapping[str, Any]) -> str:
    """First 12 hex digits of sha256(parent config hash + canonical JSON of the settings)."""
    return hashlib.sha256((parent_hash + canonical_json(settings)).encode()).hexdigest()[:12]


def default_out(parent_dir: Path) -> Path:
    """The parent's output folder: ``OUT`` of ``OUT/<dataset>/<method>/<hash>``."""
    return parent_dir.resolve().parents[2]


def check_parent(parent_dir: str | Path) -> view.RunRecord:
    """The parent's record, or :class:`DerivedRunError` naming what is wrong with it."""
    path = Path(parent_dir)
    if not (path / schema.CONFIG_FILE).is_file():
        raise DerivedRunError(f"not a run directory: {path} (no {schema.CONFIG_FILE}; give the "
                              "folder printed on the last line of `python -m "
                              "robustbench_fvae.run`)")
    rec = view.load_run(path)
    if rec.derived:
        train = rec.config.get("config", {}).get("train", {})
        parent = (rec.config.get("derived") or {}).get("parent_dir", "its parent")
        raise DerivedRunError(f"{path} is a {train.get('algorithm', 'derived')} run itself; "
                              f"give the run it was derived from ({parent})")
    if not rec.done or rec.metrics is None:
        raise DerivedRunError(f"{path} is unfinished (no done marker): finish it first by "
                              "rerunning its `python -m robustbench_fvae.run` command")
    return rec


def run_last_layer(parent_dir: str | Path, refit: LastLayerRefit, *,
                   out: str | Path | None = None, device: str = "auto", force: bool = False,
                   batch_size: int | None = None, wait: bool = False,
                   log: Callable[[str], None] = print_line) -> DerivedResult:
    """Make (or find) the ``refit`` run of the finished run ``parent_dir``. Idempotent: a
    finished one is not redone unless ``force``; another live process holding it raises
    :class:`store.RunInUseError`, or with ``wait`` is waited for (as ``run --wait``)."""
    parent_dir = Path(parent_dir)
    parent = check_parent(parent_dir)
    digest = derived_hash(str(parent.config_hash or parent_dir.name), refit.settings)
    out_root = Path(out) if out is not None else default_out(parent_dir)
    rdir = out_root / str(parent.dataset) / str(parent.method) / digest
    # resume=False: a refit has no checkpoint; a killed one's leftovers are removed.
    job = store.run_job(
        rdir, lambda: _run_held(parent, refit, rdir, out_root, digest, device=device,
                                batch_size=batch_size, log=log),
        force=force, wait=wait, resume=False, redo="redo", log=log)
    return DerivedResult(job.run_dir, job.metrics, skipped=job.skipped)


def _run_held(parent: view.RunRecord, refit: LastLayerRefit, rdir: Path, out_root: Path,
              digest: str, *, device: str, batch_size: int | None,
              log: Callable[[str], None]) -> dict[str, Any]:
    """The body of :func:`run_last_layer` (see store.run_job): fit, write the record's files
    but metrics.json and ``done``, return the metrics."""
    import torch

    from ..data import is_replica
    from ..engine.evaluate import penultimate_features
    from ..engine.model import load_trained_model, resolve_device
    from ..methods.setup import classifier_head
    from ..metrics import constant_predictor, counterfactual_record, evaluate_split
    from ..stem_cache import counterfactual_inputs

    facts = refit.facts
    dev = resolve_device(device)
    model, cfg, splits = load_trained_model(parent.path, device=str(dev))
    head = classifier_head(model)
    if not isinstance(head, torch.nn.Linear):
        raise DerivedRunError(f"the run's classifier head is a {type(head).__name__}, not a "
                              f"Linear layer: {facts.label} retrains a linear last layer")
    bs = batch_size or cfg.train.eval_batch_size or 64
    workers = cfg.num_workers if cfg.num_workers is not None else (
        0 if dev.type == "cpu" else min(8, os.cpu_count() or 1))

    def features(split: GroupSplit) -> np.ndarray:
        return penultimate_features(model, split, batch_size=bs, device=dev,
                                    num_workers=workers)

    start = time.perf_counter()
    feats = {s: features(splits[s]) for s in ("val", "test")}
    val, test = splits["val"], splits["test"]
    log(f"{facts.label} on {parent.path}: {feats['val'].shape[1]}-d penultimate features of "
        f"{len(val)} val and {len(test)} test images; device {dev}")

    # The parent's own head on these features must reproduce its recorded test predictions;
    # anything less means the features are not what the head reads (or bf16 noise on CUDA).
    with torch.inference_mode():
        parent_prob = torch.softmax(head(torch.from_numpy(feats["test"]).to(dev)).float(),
                                    dim=-1).cpu().numpy()
    recorded = schema.read_predictions(schema.predictions_path(parent.path, "test"))
    agreement = float(np.mean(parent_prob.argmax(1) == recorded["pred"]))
    prob_gap = float(np.abs(parent_prob - recorded["prob"]).max())
    if agreement < 0.99:
        log(f"warning: the parent's head on the extracted features agrees with its recorded "
            f"test predictions on only {agreement:.3f} of the images")

    fit = refit.fit(feats["val"], val)
    outputs = {}
    for name in ("val", "test"):
        prob = fit.predict_proba(feats[name])
        outputs[name] = (prob, prob.argmax(axis=1))
    info = parent.dataset_info
    split_metrics = {
        name: evaluate_split(split.y, split.a, split.g, outputs[name][1], outputs[name][0],
                             info["groups"], info["train_group_counts"])
        for name, split in (("val", val), ("test", test))}
    counterfactual = None
    if is_replica(cfg.dataset):
        try:
            twins = counterfactual_inputs(cfg.dataset, cfg.data_root, test,
                                          cfg.train.spurious_strength)
        except FileNotFoundError:  # a replica without counterfactual images (a test fixture)
            twins = None
        if twins is not None:
            probs = {k: fit.predict_proba(features(twin)) for k, twin in twins.items()}
            counterfactual = counterfactual_record(twins, probs, test.attribute_names)
    fit_time = time.perf_counter() - start

    pm = parent.metrics or {}
    config = {k: v for k, v in parent.config.items() if k not in ("environment", "derived")}
    # This record is written now, epochs counted from 1 (the parent's were converted on reading),
    # so it carries the current version even when the parent's record is older.
    config["record_version"] = schema.RECORD_VERSION
    config["config_hash"] = digest
    config["config"] = dict(config.get("config", {}), out=str(out_root), device=str(dev))
    config["config"]["train"] = dict(config["config"].get("train", {}),
                                     algorithm=facts.algorithm)
    config["derived"] = {
        **facts.record_fields(), "parent_dir": str(parent.path.resolve()),
        "parent_hash": parent.config_hash, "parent_selection": pm.get("selection"),
        "parent_selected_epoch": pm.get("selected_epoch"), "settings": dict(refit.settings),
        **fit.record}
    config["environment"] = schema.environment_info(device=str(dev))
    alarms = [f"constant predictor on {s}" for s, (_, pred) in outputs.items()
              if constant_predictor(pred)]
    metrics: dict[str, Any] = {
        "selection": facts.algorithm,
        "selection_description": facts.selection_description,
        "selected_epoch": pm.get("selected_epoch"),
        "val": split_metrics["val"],
        "test": split_metrics["test"],
        "params": {"trainable": fit.n_params,
                   "inference": int((pm.get("params") or {}).get("inference", 0))},
        "uses_group_labels": list(refit.uses_group_labels),
        "notes": refit.val_note,
        "alarms": alarms,
        facts.algorithm: {**fit.metrics, "feature_dim": int(feats["val"].shape[1]),
                          "parent_head_agreement_test": agreement,
                          "parent_head_max_prob_diff_test": prob_gap},
        "parent": {"run_dir": str(parent.path.resolve()), "selection": pm.get("selection"),
                   "selected_epoch": pm.get("selected_epoch"),
                   "test_worst_group_acc": (pm.get("test") or {}).get("worst_group_acc"),
                   "test_avg_acc": (pm.get("test") or {}).get("avg_acc")},
        "train_time_s": round(fit_time, 2),
    }
    if counterfactual is not None:
        metrics["counterfactual"] = counterfactual

    rdir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(rdir / schema.CONFIG_FILE, config)
    for name, split in (("val", val), ("test", test)):
        prob, pred = outputs[name]
        schema.write_predictions_csv(schema.predictions_path(rdir, name), np.arange(len(split)),
                                     split.y, split.a, split.g, pred, prob)
    for name, data in fit.files.items():
        write_bytes_atomic(rdir / name, data)
    return metrics  # written to metrics.json by store.run_job


# ---------------------------------------------------------------- command line


def last_layer_parser(prog: str, usage: str, description: str, kind: str
                      ) -> argparse.ArgumentParser:
    """The options every last-layer refit command shares: the parent run, ``--out``,
    ``--device``, ``--batch-size``, ``--force`` and ``--wait``; a kind adds its own."""
    parser = ArgumentParser(prog=prog, usage=usage, description=description,
                            epilog="Exit codes: 0 done (also already done), 1 runtime failure, "
                                   "2 bad input.")
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="a finished run's folder (the last line printed by "
                             "robustbench_fvae.run); not a derived run itself")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help=f"output folder; the {kind} run goes to "
                             "OUT/<dataset>/<method>/<hash> (default: the parent's output "
                             "folder)")
    add_device_option(parser)
    parser.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                        help="images per forward pass (default: the run's eval batch size)")
    add_lock_options(parser, f"this {kind} run")
    return parser


def summary_lines(metrics: Mapping[str, Any]) -> list[str]:
    """The refit's val/test numbers beside the parent's test numbers, the counterfactual
    metrics and the alarms, as printed after a run."""
    p = metrics.get("parent") or {}
    lines = [f"{'split':6} {'WG':>6} {'avg':>6} {'adj_avg':>7} {'mean_grp':>8} {'ECE':>6}"]
    for split in ("val", "test"):
        m = metrics[split]
        lines.append(f"{split:6} {m['worst_group_acc']:6.3f} {m['avg_acc']:6.3f} "
                     f"{m['adj_avg_acc']:7.3f} {m['mean_group_acc']:8.3f} {m['ece']:6.3f}"
                     + ("  (trained on: not a selection signal)" if split == "val" else ""))
    if isinstance(p.get("test_worst_group_acc"), (int, float)):
        lines.append(f"parent test: WG {p['test_worst_group_acc']:.3f} avg "
                     f"{p['test_avg_acc']:.3f} (selected by {p.get('selection')})")
    cf = metrics.get("counterfactual")
    if cf:
        lines.append(f"counterfactual test: core-only acc {cf['core_only_acc']:.3f}, background "
                     f"reliance {cf['background_reliance']:.3f}")
    lines.extend(f"ALARM: {a}" for a in metrics.get("alarms", []))
    return lines
