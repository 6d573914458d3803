"""``fusedres bench`` argument parsing and entry point (filled in by the benchmark suite)."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--device", default=None)


def run(args) -> int:
    raise SystemExit("fusedres bench: not built yet")
