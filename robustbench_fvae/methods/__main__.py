"""``python -m robustbench_fvae.methods``: the table of every registered method (what it trains,
defaults, search space, probe codes, parameter counts measured on the offline backbone).

``--write`` updates README.md and docs/methods.md (between ``<!-- methods:begin -->`` and
``<!-- methods:end -->``); ``--check`` exits 1 when they differ from the registry.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from robustbench_fvae.cli import EXIT_FAILURE, EXIT_OK, ArgumentParser, command

from .table import TARGETS, method_rows, methods_block, stale_files, with_methods_block


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m robustbench_fvae.methods",
                            usage="%(prog)s [--write | --check] [--root DIR]",
                            description="The table of every registered method.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true",
                      help=f"write the table into {' and '.join(TARGETS)}")
    mode.add_argument("--check", action="store_true",
                      help="exit 1 if the committed tables differ from the registry")
    parser.add_argument("--root", default=".", metavar="DIR",
                        help="repository root holding README.md and docs/ (default: .)")
    args = parser.parse_args(argv)
    root = Path(args.root)
    for name in TARGETS if (args.write or args.check) else ():
        if not (root / name).is_file():
            raise FileNotFoundError(f"{root / name} not found; give the repository root "
                                    "with --root")
    block = methods_block(method_rows())
    if args.check:
        stale = stale_files(block, root)
        if stale:
            print(f"stale methods table in {', '.join(stale)}: run python -m "
                  "robustbench_fvae.methods --write", file=sys.stderr)
            return EXIT_FAILURE
        return EXIT_OK
    if args.write:
        for name in TARGETS:
            path = root / name
            path.write_text(with_methods_block(path.read_text(encoding="utf-8"), block,
                                               name), encoding="utf-8")
            print(f"wrote the methods table into {path}")
        return EXIT_OK
    print(block, end="")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
