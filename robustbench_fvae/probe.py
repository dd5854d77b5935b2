"""``python -m robustbench_fvae.probe RUN_DIR``: what the latent spaces of a trained run encode.

Linear probes of the label y and the spurious attribute a from each adapted layer's pooled codes —
z1 and z2 (FVAE family), LoRA's A x, and the frozen backbone's input features (once per adapted
module) as a reference — fitted with group-balanced sample weights on train (or val), scored on
test by group-balanced accuracy; collapse checks of every latent (active units, per-dimension
std, posterior σ), with controls on every row (module input, an untrained random projection,
the code at initialisation); t-SNE maps of the test codes. Writes probes.csv (columns layer,
latent, target, acc, …), probe.json, probes.png and tsne_*.png; and, unless --no-evidence, the
token-level information rates (information.csv, information_summary.csv), update sizes
(updates.csv) and interventions on the update (interventions.csv), and loss_parts.png.

``python -m robustbench_fvae.probe --dataset NAME`` probes the frozen backbone instead (every
block's output, no run needed): how hard the label and the spurious attribute are to read off
the pretrained features, i.e. the dataset's difficulty for that backbone.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .cli import (
    EXIT_OK,
    ArgumentParser,
    add_data_root_option,
    add_device_option,
    add_progress_option,
    command,
)

# Same values as analysis.latents / analysis.tsne, kept here so --help needs no torch import.
DEFAULT_MAX_IMAGES = 5000
DEFAULT_TSNE_MAX = 2000


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m robustbench_fvae.probe",
        description="What the latent spaces of a trained run encode: linear probes of the label y "
                    "and the spurious attribute a from z1, z2 (FVAE family), LoRA's A x and the "
                    "backbone's features, fitted with group-balanced weights, scored on test by "
                    "group-balanced accuracy; collapse checks (active units, std, posterior "
                    "sigma); t-SNE maps. Writes probes.csv, probe.json, probes.png and "
                    "tsne_*.png.")
    parser.add_argument("run_dir", metavar="RUN_DIR", nargs="?",
                        help="a finished run's folder (the last line printed by "
                             "robustbench_fvae.run); or give --dataset instead")
    parser.add_argument("--dataset", default=None, metavar="NAME",
                        help="no run: probe the frozen backbone's block outputs on this dataset "
                             "(how hard y and the spurious a are before fine-tuning); default "
                             "out: runs/probes/NAME/BACKBONE")
    add_data_root_option(parser, "data", "with --dataset: the data root (default: data)")
    parser.add_argument("--backbone", default=None,
                        help="with --dataset: the backbone (default: the dataset's, as in run)")
    parser.add_argument("--weights", default=None, metavar="FILE",
                        help="with --dataset: a local weights file for the backbone")
    parser.add_argument("--layers", default=None, metavar="L",
                        help="comma-separated adapted layers: names (blocks.3.attn.qkv:q), module "
                             "names (blocks.3.attn.qkv: all its targets), indices (0,5,-1) or "
                             "'all' (write --layers=-1,0 when the list starts with a minus); "
                             "default: all when they sit in <= 3 modules, else every target of "
                             "the first, middle and last adapted module")
    parser.add_argument("--pool", choices=("cls", "mean", "both"), default="mean",
                        help="token pooling: mean over patch tokens (CLS excluded; default), "
                             "the CLS token, or both concatenated")
    parser.add_argument("--max-images", type=int, default=DEFAULT_MAX_IMAGES, metavar="N",
                        help="cap per split (train and test), subsampled by group with a seed; "
                             f"0: no cap (default: {DEFAULT_MAX_IMAGES})")
    parser.add_argument("--fit-split", choices=("train", "val"), default="train",
                        help="split the probes are fitted on (C chosen by CV inside it): train "
                             "(default) or val, which the adapter never trained on (DFR-style); "
                             "scored on test either way")
    parser.add_argument("--weighting", choices=("group", "class"), default="group",
                        help="probe sample weights: group (default; every (y, a) group weighs "
                             "the same, so a probe of a cannot ride on y where they correlate) "
                             "or class (every value of the probed target weighs the same)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder (default: RUN_DIR/probe)")
    add_device_option(parser)
    parser.add_argument("--tsne-max", type=int, default=DEFAULT_TSNE_MAX, metavar="N",
                        help="test images per t-SNE map, subsampled by group; 0: no t-SNE "
                             f"(default: {DEFAULT_TSNE_MAX})")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of subsampling, CV folds, probes and t-SNE (default: 0)")
    parser.add_argument("--batch-size", type=int, default=None, metavar="B",
                        help="images per forward pass (default: the run's eval batch size)")
    parser.add_argument("--num-workers", type=int, default=None, metavar="W",
                        help="data loader workers (default: 0 on CPU, min(8, cores) on CUDA)")
    parser.add_argument("--jobs", type=int, default=0, metavar="J",
                        help="processes for probe fits and t-SNE maps; 0: min(8, cores) "
                             "(default), -1: all cores")
    parser.add_argument("--no-evidence", action="store_true",
                        help="RUN_DIR: probes only; skip the token-level information rates, "
                             "update sizes and interventions (information*.csv, updates.csv, "
                             "interventions.csv)")
    add_progress_option(parser)
    return parser


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.run_dir is None) == (args.dataset is None):
        parser.error("give either RUN_DIR (probe a trained run) or --dataset NAME (probe the "
                     "frozen backbone), not both")
    if args.run_dir is not None:
        given = [f for f in ("backbone", "weights") if getattr(args, f) is not None]
        if given:
            parser.error(f"--{given[0]} goes with --dataset; a run's backbone is in its record")
    elif args.layers is not None:
        parser.error("--layers goes with RUN_DIR; --dataset probes every block's output")
    elif args.no_evidence:
        parser.error("--no-evidence goes with RUN_DIR; --dataset probes a frozen backbone")
    # Imported late so that --help and argument errors are instant.
    from .analysis.probe_runs import probe_backbone, probe_run

    common = dict(pool=args.pool, max_images=args.max_images or None, out=args.out,
                  device=args.device, tsne_max=args.tsne_max, seed=args.seed,
                  num_workers=args.num_workers, n_jobs=args.jobs or min(8, os.cpu_count() or 1),
                  progress=not args.no_progress, fit_split=args.fit_split,
                  weighting=args.weighting)
    # Errors end in cli.command: one line, exit 2 for bad input, 1 for the rest.
    if args.run_dir is not None:
        result = probe_run(args.run_dir, layers=args.layers, batch_size=args.batch_size,
                           evidence=not args.no_evidence, **common)
    else:
        result = probe_backbone(args.dataset, data_root=args.data_root,
                                backbone=args.backbone, weights=args.weights,
                                batch_size=args.batch_size or 256, **common)
    print(result.out_dir)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
