"""``fusedres`` command line: ``fusedres check``, ``fusedres bench`` and ``fusedres tune``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fusedres", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    from . import check

    check.add_arguments(sub.add_parser("check", help="convert a torchvision model, check numerics and speed"))

    from .bench import cli as bench_cli

    bench_cli.add_arguments(sub.add_parser("bench", help="benchmark blocks and models against eager / torch.compile"))

    from . import tune

    tune.add_arguments(sub.add_parser("tune", help="autotune the Triton tiles of some models into a tile table"))

    args = parser.parse_args(argv)
    if args.command == "check":
        return check.run(args)
    if args.command == "tune":
        return tune.run(args)
    return bench_cli.run(args)


if __name__ == "__main__":
    sys.exit(main())
