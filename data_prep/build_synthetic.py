"""Build the offline replicas (synth-waterbirds, synth-celeba, synth-animals) under ROOT/synth/.

    python data_prep/build_synthetic.py --root data [--only synth-waterbirds] [--seed 0] [--force]
        [--spurious-strength RHO]

Each replica is written in the real dataset's on-disk layout (see
robustbench_fvae/data/synthetic.py), with core-only and background-only twins of every test image
under <folder>/counterfactual/; an existing replica is left alone unless --force. RHO (the
fraction of each class's training images on its majority background; default: the real
dataset's own) other than the default puts the replica under ROOT/synth/rho-RHO/.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from robustbench_fvae.cli import EXIT_OK, ArgumentParser, command, fail  # noqa: E402
from robustbench_fvae.data.base import DatasetError  # noqa: E402
from robustbench_fvae.data.synthetic import (  # noqa: E402
    REPLICAS,
    build_replica,
    is_built,
    read_manifest,
    replica_folders,
)


@command
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python data_prep/build_synthetic.py",
                            usage="%(prog)s [--root DIR] [--only NAME] [--spurious-strength RHO] "
                                  "[options]",
                            description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="data", help="data root; replicas go to ROOT/synth/")
    parser.add_argument("--only", action="append", choices=REPLICAS, metavar="NAME",
                        help=f"build only this replica (repeatable): {', '.join(REPLICAS)}")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    parser.add_argument("--force", action="store_true", help="rebuild replicas that exist")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every group size (default 1.0; e.g. 0.1 for a quick look)")
    parser.add_argument("--spurious-strength", type=float, default=None, metavar="RHO",
                        help="fraction of each class's training images on its majority "
                             "background, in [0.5, 1] (default: the real dataset's: waterbirds "
                             "0.95, celeba 0.943, animals 0.952)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        for name in args.only or REPLICAS:
            start = time.perf_counter()
            rho = args.spurious_strength
            existed = is_built(name, args.root, rho) and not args.force
            build_replica(name, args.root, args.seed, args.force, scale=args.scale,
                          progress=not args.quiet, strength=rho)
            folders = replica_folders(name, args.root, rho)
            manifest = read_manifest(folders[0]) or {}
            counts = manifest.get("split_group_counts", {})
            summary = "; ".join(
                f"{split} {sum(c.values())} (groups {' '.join(f'{g}:{n}' for g, n in c.items())})"
                for split, c in counts.items()
            )
            status = ("exists (--force rebuilds it)" if existed
                      else f"built in {time.perf_counter() - start:.1f}s")
            print(f"{name}: seed {manifest.get('seed')}, spurious strength "
                  f"{manifest.get('spurious_strength')} at {', '.join(map(str, folders))}, "
                  f"{status}; {summary}")
    except (DatasetError, ValueError) as err:
        return fail(err)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
