#!/usr/bin/env python3
"""Regenerate the README's results section from the committed runs in ``benchmarks/results/``.

For every device (and run label: the suite, or the mode), the newest ``*.json`` written by
``fusedres bench --results-dir benchmarks/results`` is rendered as a table, followed by its
plot (the ``.png`` of the same name) when present.  Only the text between
``<!-- results:begin -->`` and ``<!-- results:end -->`` is replaced; the script fails, naming
the markers, if they are missing.

    python scripts/render_results.py            # rewrite README.md
    python scripts/render_results.py --check    # exit 1 if README.md is out of date
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from fusedres.bench import report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--check", action="store_true", help="do not write; exit 1 if the section is out of date")
    args = p.parse_args(argv)

    if not args.readme.is_file():
        print(f"render_results: --readme {args.readme} does not exist", file=sys.stderr)
        return 2
    try:
        found = report.latest_results(args.results)
    except ValueError as exc:
        print(f"render_results: {exc}", file=sys.stderr)
        return 2
    if not found:
        print(f"render_results: no result files (*.json) in --results {args.results}", file=sys.stderr)
        return 2
    entries = []
    for res, path in found:
        png = path.with_suffix(".png")
        rel = Path(os.path.relpath(png, args.readme.parent)).as_posix() if png.is_file() else None
        entries.append((res, rel))
    text = args.readme.read_text()
    try:
        new = report.replace_section(text, report.render_markdown(entries))
    except ValueError as exc:
        print(f"render_results: {args.readme}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if new != text:
            print(f"render_results: {args.readme} is out of date; run scripts/render_results.py", file=sys.stderr)
            return 1
        return 0
    if new != text:
        args.readme.write_text(new)
    print(f"render_results: {len(entries)} table(s) written to {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
