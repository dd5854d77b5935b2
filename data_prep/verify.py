"""Check a dataset folder: layout, CSV columns, images, and group counts per split.

    python data_prep/verify.py NAME [--root DIR] [--sample N] [--spurious-strength RHO]

Prints a table of group counts (rows: groups; columns: train/val/test) and exits 0 when every
check passes; otherwise prints one line per problem and exits 2 (bad input: the data; the exit
codes of every command are in robustbench_fvae/cli.py). NAME is one of waterbirds,
celeba, animals, synth-waterbirds, synth-celeba, synth-animals. Real datasets are expected under
DIR, replicas under DIR/synth (DIR/synth/rho-RHO for a non-default --spurious-strength). For a
replica it also prints its spurious strength and checks the counterfactual test images.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import robustbench_fvae  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from robustbench_fvae.cli import EXIT_BAD_INPUT, EXIT_OK, ArgumentParser, command, fail
from robustbench_fvae.data import DatasetError, dataset_names, verify_dataset


@command
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python data_prep/verify.py",
        usage="%(prog)s NAME [--root DIR] [--sample N] [--spurious-strength RHO]",
        description="Check a dataset folder and print its group counts per split.",
        epilog=f"datasets: {', '.join(dataset_names())}",
    )
    parser.add_argument("name", metavar="NAME", help="dataset name")
    parser.add_argument("--root", default="data", help="data root (default: ./data)")
    parser.add_argument(
        "--sample", type=int, default=16, help="images per split to decode fully (default: 16)"
    )
    parser.add_argument(
        "--spurious-strength", type=float, default=None, metavar="RHO",
        help="synth-* only: check the replica built at this spurious strength (default: the "
             "default replica)")
    args = parser.parse_args(argv)
    try:
        report = verify_dataset(args.name, args.root, sample_per_split=args.sample,
                                strength=args.spurious_strength)
    except (DatasetError, ValueError) as err:
        return fail(err)
    print(report.render())
    return EXIT_OK if report.ok else EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
