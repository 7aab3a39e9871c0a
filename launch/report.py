"""Sweep report: ``python launch/report.py SWEEP_OR_RUN_DIR... [--out DIR] [--export]``.

Writes ``report.csv``, ``report.md`` and ``report.png`` into the first directory (or ``--out``)
and, with ``--export``, ``pruned.pt`` into every finished run that has a checkpoint. The work
is in `stds.results.sweep` and `stds.results.pruned`; see ``docs/reports.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stds.cli.entry import print_error
from stds.errors import StdsError
from stds.results.sweep import collect_runs, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Table and accuracy-connectivity plot of the runs under the given directories."
    )
    parser.add_argument("dirs", nargs="+", type=Path,
                        help="sweep or run directories (searched recursively)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the report (default: the first directory)")
    parser.add_argument("--export", action="store_true",
                        help="also write pruned.pt into every finished run with a checkpoint")
    args = parser.parse_args(argv)
    try:
        runs = collect_runs(args.dirs)
        paths = write_report(runs, args.out or args.dirs[0])
        if args.export:
            from stds.results.pruned import export_finished  # imports torch: only when asked

            export_finished(runs)
    except (StdsError, OSError) as exc:
        print_error(exc)
        return 1
    for path in paths.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
