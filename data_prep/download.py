"""Put a dataset in place under a data root, then verify it.

    python data_prep/download.py NAME [--root DIR] [--manual PATH [--copy]] [--seed N]

waterbirds / celeba: downloaded through the wilds package (CodaLab bundles).
animals: the two public SpuCo tarballs (spuco_birds ≈2.8 GiB, spuco_dogs ≈2.5 GiB).
synth-*: built locally by the offline replica builder (no network), under DIR/synth.

Downloads go to a staging folder under DIR and are moved into place only once complete and
verified, so a failure leaves nothing behind. --manual PATH uses data you already have: the
dataset folder (or a folder containing it) is linked into DIR (copied with --copy) and verified.
Offline, every failure is one line naming what failed and the manual alternative.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import robustbench_fvae  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from robustbench_fvae.cli import EXIT_BAD_INPUT, EXIT_OK, ArgumentParser, command, fail
from robustbench_fvae.data import DatasetError, DownloadError, dataset_names, download_dataset


@command
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python data_prep/download.py",
        usage="%(prog)s NAME [--root DIR] [--manual PATH [--copy]]",
        description="Download (or place with --manual) a dataset under a data root and verify it.",
        epilog=f"datasets: {', '.join(dataset_names())}",
    )
    parser.add_argument("name", metavar="NAME", help="dataset name")
    parser.add_argument("--root", default="data", help="data root (default: ./data)")
    parser.add_argument(
        "--manual",
        metavar="PATH",
        help="use data already on disk: the dataset folder or a folder containing it",
    )
    parser.add_argument(
        "--copy", action="store_true", help="with --manual: copy instead of symlinking"
    )
    parser.add_argument("--seed", type=int, default=0, help="replica seed for synth-* (default 0)")
    args = parser.parse_args(argv)
    if args.copy and args.manual is None:
        parser.error("--copy only applies with --manual PATH")
    try:
        report = download_dataset(
            args.name, args.root, manual=args.manual, copy=args.copy, seed=args.seed
        )
    except DownloadError as err:  # the host or the network failed: a runtime failure
        fail(err)
        return 1
    except (DatasetError, ValueError) as err:
        return fail(err)
    print(report.render())
    return EXIT_OK if report.ok else EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
