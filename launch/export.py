"""Export a run's pruned network: ``python launch/export.py RUN_DIR [--which last|best] [--out PATH]``.

Writes ``pruned.pt`` (the weights w with their zeros as a plain state dict, and the config) and
prints the per-layer sparsity and the size of the weights stored sparsely. The work is in
`stds.results.export`; see ``docs/reports.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stds.cli.entry import print_error
from stds.errors import StdsError
from stds.results.export import export_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write <run>/pruned.pt from a run's checkpoint.")
    parser.add_argument("run_dir", type=Path, help="a run directory (holding checkpoints/)")
    parser.add_argument("--which", choices=("last", "best"), default="last",
                        help="checkpoint to export (default: last, the final network)")
    parser.add_argument("--out", type=Path, default=None, help="output file (default: RUN_DIR/pruned.pt)")
    args = parser.parse_args(argv)
    try:
        export_run(args.run_dir, which=args.which, out=args.out)
    except (StdsError, OSError) as exc:
        print_error(exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
