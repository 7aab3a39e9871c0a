"""Export a run's pruned network:
``python launch/export.py RUN_DIR [--format pt|nir] [--check] [--which last|best] [--out PATH]``.

``--format pt`` (default) writes ``pruned.pt`` (the weights w with their zeros as a plain state
dict, and the config) and prints the per-layer sparsity and the size of the weights stored
sparsely (`stds.results.pruned`). ``--format nir`` writes ``model.nir``, the network as a NIR
graph for neuromorphic toolchains (`stds.results.nir`); ``--check`` then runs that graph in Norse
on the run's test set and prints the agreement with `stds` (`stds.results.nir_check`). See
``docs/reports.md`` and ``docs/nir.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stds.cli.entry import print_error
from stds.errors import StdsError
from stds.results.pruned import export_run
from stds.results.nir import export_nir
from stds.results.nir_check import check_run, format_check


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line; ``--check`` and ``--check-images`` only with ``--format nir``."""
    parser = argparse.ArgumentParser(description="Write <run>/pruned.pt or <run>/model.nir from a "
                                                 "run's checkpoint.")
    parser.add_argument("run_dir", type=Path, help="a run directory (holding checkpoints/)")
    parser.add_argument("--format", choices=("pt", "nir"), default="pt",
                        help="pt: pruned.pt (PyTorch state dict); nir: model.nir (NIR graph)")
    parser.add_argument("--which", choices=("last", "best"), default="last",
                        help="checkpoint to export (default: last, the final network)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output file (default: RUN_DIR/pruned.pt or RUN_DIR/model.nir)")
    parser.add_argument("--check", action="store_true",
                        help="with --format nir: run the graph in Norse on the run's test set and "
                             "compare predicted classes and spikes per layer with stds")
    parser.add_argument("--check-images", type=int, default=None, metavar="N",
                        help="with --check: only the first N test images (default: all)")
    args = parser.parse_args(argv)
    if (args.check or args.check_images is not None) and args.format != "nir":
        parser.error("--check and --check-images need --format nir")
    if args.check_images is not None and args.check_images < 1:
        parser.error(f"--check-images={args.check_images} is not valid; give N >= 1")
    return args


def export_nir_and_check(args: argparse.Namespace) -> None:
    """``--format nir``: write the graph; with ``--check`` run it in Norse and print the result."""
    written = export_nir(args.run_dir, which=args.which, out=args.out)
    if args.check:
        result = check_run(args.run_dir, written.path, which=args.which, limit=args.check_images)
        print(format_check(result))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        if args.format == "nir":
            export_nir_and_check(args)
        else:
            export_run(args.run_dir, which=args.which, out=args.out)
    except (StdsError, OSError) as exc:
        print_error(exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
