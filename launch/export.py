"""Export a run's pruned network:
``python launch/export.py RUN_DIR [--format pt|nir] [--dt S] [--check] [--readers R,...]
[--min-agreement F] [--check-images N] [--which last|best] [--out PATH]``.

``--format pt`` (default) writes ``pruned.pt`` (the weights w with their zeros as a plain state
dict, and the config) and prints the per-layer sparsity and the size of the weights stored
sparsely (`stds.results.pruned`). ``--format nir`` writes ``model.nir``, the network as a NIR
graph for neuromorphic toolchains (`stds.results.nir`), neuron parameters for a step of ``--dt``
seconds; ``--check`` then loads that file in the public NIR readers (SpikingJelly, Norse, snnTorch)
and runs them on the run's test set against `stds` (`stds.results.nir_check`); it exits 1 when a
reader does not load the file or predicts the class `stds` predicts on fewer than
``--min-agreement`` of the images. See ``docs/reports.md`` and ``docs/nir.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stds.cli.entry import print_error
from stds.errors import StdsError
from stds.results.pruned import export_run
from stds.results.nir import DT
from stds.results.nir_check import READERS, check_run, format_check
from stds.results.nir_file import export_nir


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
    parser.add_argument("--dt", type=float, default=DT, metavar="S",
                        help=f"with --format nir: seconds per time step the neuron parameters are "
                             f"written for (default {DT}: SpikingJelly's default, snnTorch's fixed dt)")
    parser.add_argument("--check", action="store_true",
                        help="with --format nir: load the file in the public NIR readers, run them "
                             "on the run's test set and compare classes and spikes with stds")
    parser.add_argument("--readers", default=None, metavar="R,...",
                        help=f"with --check: readers to run and gate on (default {','.join(READERS)})")
    parser.add_argument("--min-agreement", type=float, default=None, metavar="F",
                        help="with --check: fail below this fraction of images with the same class "
                             "(default 1.0: every image)")
    parser.add_argument("--check-images", type=int, default=None, metavar="N",
                        help="with --check: only the first N test images (default: all)")
    args = parser.parse_args(argv)
    _validate(parser, args)
    return args


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One line per bad option; fills in the check's defaults."""
    check_options = [option for option, value in (("--check-images", args.check_images),
                     ("--readers", args.readers), ("--min-agreement", args.min_agreement))
                     if value is not None]
    if (args.check or check_options) and args.format != "nir":
        parser.error("--check and --check-images need --format nir")
    if check_options and not args.check:
        parser.error(f"{', '.join(check_options)} need --check")
    args.readers = args.readers or ",".join(READERS)
    args.min_agreement = 1.0 if args.min_agreement is None else args.min_agreement
    if args.check_images is not None and args.check_images < 1:
        parser.error(f"--check-images={args.check_images} is not valid; give N >= 1")
    if not 0.0 <= args.min_agreement <= 1.0:
        parser.error(f"--min-agreement={args.min_agreement} is not valid; give 0 <= F <= 1")
    if not args.dt > 0:
        parser.error(f"--dt={args.dt} is not valid; give seconds per step > 0")
    unknown = sorted(set(args.readers.split(",")) - set(READERS))
    if unknown:
        parser.error(f"--readers={args.readers} is not valid: {','.join(unknown)}; use some of "
                     f"{','.join(READERS)}")


def export_nir_and_check(args: argparse.Namespace) -> int:
    """``--format nir``: write the graph; with ``--check`` run it in the readers and print the
    result; 1 if the check failed."""
    written = export_nir(args.run_dir, which=args.which, out=args.out, dt=args.dt)
    if not args.check:
        return 0
    result = check_run(args.run_dir, written.path, which=args.which, readers=args.readers.split(","),
                       limit=args.check_images, min_agreement=args.min_agreement)
    print(format_check(result))
    failed = [r.reader for r in result.readers if not result.reader_passed(r)]
    if failed:
        print(f"Error: the NIR check failed for {', '.join(failed)} (not loaded, not run, or the "
              f"same class on fewer than --min-agreement={args.min_agreement} of the images); "
              "docs/nir.md lists what each reader runs", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        if args.format == "nir":
            return export_nir_and_check(args)
        else:
            export_run(args.run_dir, which=args.which, out=args.out)
    except (StdsError, OSError) as exc:
        print_error(exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
