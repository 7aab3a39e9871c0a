"""Accuracy of ``scheduler=target`` against the hand-picked-D frontier, over seeds.

Two steps: ``run`` trains the sweep points through the project's own launcher
(``python launch/train.py -m ... hydra/launcher=local``), one multirun per variant and seed, into
``--out``; ``table`` reads every finished run under ``--out`` (``metrics.json``, ``metrics.jsonl``
and the run's saved ``.hydra/config.yaml``) and writes the table (Markdown and JSON) and a plot.

Variants (``--variants``, comma-separated):

- ``frontier``: the sine D schedule at each ``--widths`` D (the hand-picked-D frontier);
- ``today``: ``scheduler=target`` with the sine ramp over the whole run (ramp_until = 1);
- ``<ramp>@<ramp_until>`` (e.g. ``sine@0.5``, ``cubic@0.75``): ``scheduler=target`` whose wanted
  sparsity reaches S at ramp_until of training and is then held (``scheduler.hold_keeps_weights``
  true, the default: a move of d in the hold leaves the unpruned weights' values as they were);
- ``gmp:<ramp>@<ramp_until>`` and ``gmp-global:<ramp>@<ramp_until>``: gradual magnitude pruning
  (``sparse=gmp``, ``sparse.scope=layer`` or ``global``) on the same ramp and hold;
- ``...+cos<floor>`` after any target variant (``cubic@0.5+cos0``, ``cubic@0.35+cos0.05``): the same
  with ``lr_scheduler=hold_cosine``, the learning rate annealed by a cosine from lr to floor · lr
  over the hold (constant before it);
- ``gradr:<mu>`` (``gradr`` step only): Grad R, ``scheduler=constant flat_width=<mu>``, its prior α
  (``alpha_gr``) searched per S on the first seed and then trained at every seed (``gradr_alpha``);
- ``<ramp>@<ramp_until>-shrink``: the same with ``scheduler.hold_keeps_weights=false``, the hold's
  rule before that key existed (every move of d moves every unpruned weight with it; d rises in
  the hold, so they shrink); a saved config without the key is this variant;

the target variants run at each ``--sparsities`` S. The frontier at S is interpolated linearly in
(reached sparsity, test top-1) between the two D runs of the same seed that bracket S; its mean
and spread are over the seeds whose D runs bracket S.

    python benchmarks/target_frontier.py run --out outputs/target_frontier --seeds 0 \\
        --variants frontier,today,sine@0.5,sine@0.75,cubic@0.5,cubic@0.75
    # Grad R at the same S: alpha_gr searched per S on seed 0, then every seed at the chosen alpha
    python benchmarks/target_frontier.py gradr --out outputs/three --mu 0.05 --seeds 0,1 \\
        --sparsities 0.9,0.98 --sweeps 2
    python benchmarks/target_frontier.py table --out outputs/target_frontier \\
        --json docs/target_frontier.json --md docs/target_frontier.md --png docs/target_frontier.png
    # another model: extra overrides after --, passed to every run
    python benchmarks/target_frontier.py run --out outputs/tf_cifar --seeds 0 -- experiment=cifar10_stds
    # a check that both steps run, in seconds (a temporary directory, Hydra's basic launcher)
    python benchmarks/target_frontier.py --smoke

A point whose run directory already holds a finished run (``metrics.json`` with every planned
epoch) is not run again, so an interrupted sweep continues where it stopped. Each multirun's
wall time is logged to ``<out>/runs.log`` with the ``uptime`` load before and after.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from common import REPO, uptime
from frontier_table import ALPHAS_FILE, finished_runs, gmp_name, gradr_name, point_key, target_name, write_table
from gradr_alpha import closest, next_alpha

SPARSITIES = (0.8, 0.9, 0.95, 0.98)
WIDTHS = (0.2, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0)
VARIANTS = ("frontier", "today", "sine@0.5", "sine@0.75", "cubic@0.35", "cubic@0.5", "cubic@0.75")

SMOKE_OVERRIDES = ["epochs=2", "dataset=fake", "dataset.in_channels=1", "dataset.image_size=8", "dataset.train_size=64",
                   "dataset.test_size=32", "logging.log_every_steps=1", "logging.synops=false"]
"""The digits net on 64 random 8x8 training images: 2 epochs of 2 steps, every step logged."""


@dataclass(frozen=True)
class Variant:
    """One line of the table: the D frontier, or a target schedule (ramp, ramp_until, hold rule)."""

    name: str
    ramp: str | None = None
    ramp_until: float = 1.0
    keep_weights: bool = True
    gmp_scope: str | None = None  # sparse=gmp with this sparse.scope (layer, global); None: STDS
    lr_floor: float | None = None  # lr_scheduler=hold_cosine with this floor; None: the run's own
    gradr_mu: float | None = None  # Grad R with this constant threshold mu; the swept value is alpha_gr

    def overrides(self, values: list[float]) -> list[str]:
        """The Hydra overrides sweeping ``values`` (D for the frontier, S otherwise)."""
        listed = ",".join(str(v) for v in values)
        if self.name == "frontier":
            return ["scheduler=sine", f"flat_width={listed}"]
        if self.gradr_mu is not None:
            return ["scheduler=constant", f"flat_width={self.gradr_mu:g}", f"alpha_gr={listed}"]
        ramp = ["scheduler=target", f"scheduler.ramp={self.ramp}", f"scheduler.ramp_until={self.ramp_until}"]
        if self.lr_floor is not None:
            ramp += ["lr_scheduler=hold_cosine", f"lr_scheduler.lr_lambda.floor={self.lr_floor}"]
        if self.gmp_scope is not None:
            return [*ramp, "sparse=gmp", f"sparse.scope={self.gmp_scope}", f"target_sparsity={listed}"]
        return [*ramp, f"scheduler.hold_keeps_weights={str(self.keep_weights).lower()}", f"target_sparsity={listed}"]

def parse_variant(text: str) -> Variant:
    """``frontier``, ``today``, ``<ramp>@<ramp_until>``, ``<ramp>@<ramp_until>-shrink``, or GMP on a
    ramp: ``gmp:<ramp>@<ramp_until>`` (each layer to S) or ``gmp-global:<ramp>@<ramp_until>``; a target
    variant may end in ``+cos<floor>`` (``lr_scheduler=hold_cosine`` with that floor)."""
    if text == "frontier":
        return Variant("frontier")
    if text.startswith("gradr:"):
        try:
            mu = float(text.removeprefix("gradr:"))
        except ValueError:
            mu = math.nan
        if not mu >= 0:
            raise SystemExit(f"--variants: {text!r}: gradr:<mu> takes Grad R's threshold mu >= 0")
        return Variant(gradr_name(mu), gradr_mu=mu)
    base, cos, floor_text = text.partition("+cos")
    if cos:
        try:
            floor = float(floor_text or "0")
        except ValueError:
            floor = math.nan
        plain = parse_variant(base)
        if not 0 <= floor <= 1 or plain.name == "frontier" or plain.gmp_scope is not None:
            raise SystemExit(f"--variants: {text!r}: +cos<floor> follows a target variant, floor in [0, 1]")
        return Variant(target_name(plain.ramp or "", plain.ramp_until, plain.keep_weights, floor), plain.ramp,
                       plain.ramp_until, plain.keep_weights, None, floor)
    if text.startswith(("gmp:", "gmp-global:")):
        kind, _, ramp_text = text.partition(":")
        stds = parse_variant(ramp_text)
        scope = "global" if kind == "gmp-global" else "layer"
        return Variant(gmp_name(stds.ramp or "", stds.ramp_until, scope), stds.ramp, stds.ramp_until, True, scope)
    if text == "today":
        text = "sine@1"
    keep = not text.endswith("-shrink")
    ramp, sep, until = text.removesuffix("-shrink").partition("@")
    try:
        until_value = float(until)
    except ValueError:
        until_value = math.nan
    if not sep or not 0 < until_value <= 1:
        raise SystemExit(f"--variants: {text!r} is not frontier, today, <ramp>@<ramp_until> or "
                         "<ramp>@<ramp_until>-shrink (ramp_until in (0, 1])")
    return Variant(target_name(ramp, until_value, keep), ramp, until_value, keep)


SMOKE = {"seeds": [0], "variants": [parse_variant("frontier"), parse_variant("sine@0.5")], "sparsities": [0.9],
         "widths": [0.0, 2.0], "sweeps": 1, "calls": 2, "launcher": "basic"}
"""The ``run`` arguments of ``--smoke``: D = 0 (no pruning) and D = 2 (nearly all) bracket S = 0.9,
and sine@0.5 holds S for its second epoch; its two multiruns run at once (a second core is not idle)."""

SMOKE_GRADR = {"mu": 0.05, "seeds": [0], "sparsities": [0.9], "start": 30.0, "tol": 0.0, "max_tries": 2,
               "sweeps": 1, "launcher": "basic"}
"""The ``gradr`` arguments of ``--smoke``: two search runs for S = 0.9 (alpha 30, then the next by
the rule), the closer one chosen; its one seed is the search seed, so nothing runs after."""


# ------------------------------------------------------------------------------------ run


def launch(out: Path, variant: Variant, seed: int, values: list[float], extra: list[str],
           launcher: str = "local") -> int:
    """One multirun of ``variant`` at ``seed`` over ``values`` through ``hydra/launcher=<launcher>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S") + "-" + "_".join(f"{v:g}" for v in values)
    sweep_dir = out / variant.name.replace("@", "_at_").replace(":", "_") / f"seed{seed}" / stamp
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "-m", f"hydra/launcher={launcher}",
           *variant.overrides(values), f"seed={seed}", "logging.progress_bar=false",
           f"hydra.sweep.dir={sweep_dir}", *extra]
    before, start = uptime(), time.monotonic()
    rc = subprocess.run(cmd, cwd=REPO, env=os.environ.copy(), check=False).returncode
    line = {"cmd": " ".join(cmd[1:]), "rc": rc, "wall_s": round(time.monotonic() - start, 1),
            "uptime_before": before, "uptime_after": uptime()}
    with (out / "runs.log").open("a") as log:
        log.write(json.dumps(line) + "\n")
    return rc


def run(args: argparse.Namespace) -> None:
    """Train every (variant, seed, value) point not finished yet under ``--out``.

    With ``--sweeps N`` > 1, N launcher calls of one point each run at once, on one thread each
    (``hydra.launcher.max_parallel=1 cpus_per_task=1``): the CPUs stay busy to the last point,
    which one multirun per variant and seed cannot when its points do not divide among them.
    Exits with status 1 after the last call when any launcher call failed.
    """
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    done = {point_key(cfg) for cfg, _, _, _ in finished_runs(out)}
    extra = list(args.extra)
    if args.sweeps > 1:
        extra = ["hydra.launcher.max_parallel=1", "hydra.launcher.cpus_per_task=1", *extra]
    tasks = []
    if any(v.gradr_mu is not None for v in args.variants):
        raise SystemExit("--variants: gradr:<mu> runs through the gradr step (its alpha is searched per S)")
    for seed in args.seeds:
        for variant in args.variants:
            grid = args.widths if variant.name == "frontier" else args.sparsities
            todo = [v for v in grid if (variant.name, seed, v) not in done]
            if todo:
                tasks += [(variant, seed, [v]) for v in todo] if args.sweeps > 1 else [(variant, seed, todo)]
    _launch_all(out, tasks, extra, max(args.sweeps, args.calls), args.launcher)


def _launch_all(out: Path, tasks: list[tuple[Variant, int, list[float]]], extra: list[str], workers: int,
                launcher: str) -> None:
    """Every (variant, seed, values) launcher call, ``workers`` at once; exit 1 after the last
    when any failed."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        calls = []
        for variant, seed, todo in tasks:
            print(f"[target_frontier] {variant.name} seed {seed}: {todo}", flush=True)
            calls.append(pool.submit(launch, out, variant, seed, todo, extra, launcher))
    failed = sum(call.result() != 0 for call in calls)
    if failed:
        raise SystemExit(f"[target_frontier] {failed} of {len(calls)} launcher calls failed; "
                         f"their commands are in {out / 'runs.log'}")


def _gradr_runs(out: Path, name: str) -> dict[tuple[int, float], float]:
    """(seed, alpha) -> reached sparsity of the finished Grad R runs of ``name`` under ``out`` (one
    pass over the directory)."""
    return {(run_seed, value): metrics["sparsity"] for cfg, metrics, _, _ in finished_runs(out)
            for run_name, run_seed, value in [point_key(cfg)] if run_name == name}


def _tried(out: Path, name: str, seed: int) -> list[tuple[float, float]]:
    """(alpha, reached sparsity) of the finished Grad R runs of ``name`` and ``seed``, by alpha."""
    return sorted((alpha, reached) for (run_seed, alpha), reached in _gradr_runs(out, name).items() if run_seed == seed)


def search_alpha(out: Path, variant: Variant, target: float, args: argparse.Namespace, extra: list[str]) -> dict:
    """Runs on the search seed (the first of ``--seeds``) until one ends within ``--tol`` of
    ``target`` or ``--max-tries`` were made for it; the α that ended closest."""
    seed, made = args.seeds[0], 0
    tried = _tried(out, variant.name, seed)  # re-read after each run: the other S's searches add theirs
    while not (tried and abs(closest(tried, target)[1] - target) <= args.tol or made >= args.max_tries):
        alpha = next_alpha(tried, target, args.start)
        if alpha in dict(tried):
            break
        if launch(out, variant, seed, [alpha], extra, args.launcher) != 0:
            raise SystemExit(f"[target_frontier] the Grad R run at alpha_gr={alpha:g} failed; "
                             f"its command is in {out / 'runs.log'}")
        tried = _tried(out, variant.name, seed)
        print(f"[target_frontier] {variant.name} S={target:g}: tried alpha_gr={alpha:g} on seed {seed}: "
              f"sparsity {dict(tried)[alpha]:.4f}", flush=True)
        made += 1
    if not tried:
        raise SystemExit(f"[target_frontier] no Grad R run for S={target:g}: --max-tries is 0")
    alpha, reached = closest(tried, target)
    return {"alpha": alpha, "search_seed": seed, "search_sparsity": reached, "tried": [list(t) for t in tried]}


def gradr(args: argparse.Namespace) -> None:
    """Grad R at each S: α searched on the first seed (``--sweeps`` S at once), written to
    ``<out>/gradr_alphas.json``, then every seed trained at the α chosen for each S."""
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    variant = parse_variant(f"gradr:{args.mu:g}")
    extra = list(args.extra)
    if args.launcher == "local":
        extra = ["hydra.launcher.max_parallel=1", "hydra.launcher.cpus_per_task=1", *extra]
    with ThreadPoolExecutor(max_workers=args.sweeps) as pool:
        found = dict(zip(args.sparsities, pool.map(lambda s: search_alpha(out, variant, s, args, extra),
                                                    args.sparsities)))
    path = out / ALPHAS_FILE
    chosen = json.loads(path.read_text()) if path.exists() else {}
    chosen.setdefault(variant.name, {}).update({f"{s:g}": row for s, row in found.items()})
    path.write_text(json.dumps(chosen, indent=1) + "\n")
    for target, row in found.items():
        print(f"[target_frontier] {variant.name} S={target:g}: alpha_gr={row['alpha']:g} "
              f"(sparsity {row['search_sparsity']:.4f} on seed {row['search_seed']})", flush=True)
    wanted = {(seed, row["alpha"]) for seed in args.seeds for row in found.values()}
    todo = sorted(wanted - _gradr_runs(out, variant.name).keys())
    _launch_all(out, [(variant, seed, [alpha]) for seed, alpha in todo], extra, args.sweeps, args.launcher)


def table(args: argparse.Namespace) -> None:
    """Collect ``--out`` and write ``--json`` (default <out>/table.json), ``--md`` and ``--png``."""
    print(write_table(Path(args.out), args.json, args.md, args.png))


def smoke() -> None:
    """Every step in seconds, in a temporary directory: the `SMOKE` points with `SMOKE_OVERRIDES`
    through Hydra's basic launcher (two processes), the `SMOKE_GRADR` search (two more), then the
    table and the plot."""
    with tempfile.TemporaryDirectory(prefix="target_frontier_smoke_") as tmp:
        run(argparse.Namespace(out=tmp, extra=SMOKE_OVERRIDES, **SMOKE))
        gradr(argparse.Namespace(out=tmp, extra=SMOKE_OVERRIDES, **SMOKE_GRADR))
        print(f"[target_frontier] load: {uptime()}")
        png = Path(tmp) / "table.png"
        table(argparse.Namespace(out=tmp, json=None, md=None, png=str(png)))
        print(f"[target_frontier] plot: {png.stat().st_size} bytes")


def floats(text: str) -> list[float]:
    """A comma-separated list of numbers."""
    values = [float(v) for v in text.split(",") if v]
    if any(not math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} holds a value that is not a finite number")
    return values


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="both steps in seconds on a tiny setup, in a temporary directory")
    sub = parser.add_subparsers(dest="command")
    run_p = sub.add_parser("run", help="train the sweep points through launch/train.py -m")
    run_p.add_argument("--out", required=True, help="directory the runs go to (one sweep dir per call)")
    run_p.add_argument("--seeds", type=lambda t: [int(v) for v in t.split(",")], default=[0, 1, 2])
    run_p.add_argument("--variants", type=lambda t: [parse_variant(v) for v in t.split(",")],
                       default=[parse_variant(v) for v in VARIANTS])
    run_p.add_argument("--sparsities", type=floats, default=list(SPARSITIES))
    run_p.add_argument("--widths", type=floats, default=list(WIDTHS), help="D values of the frontier")
    run_p.add_argument("--sweeps", type=int, default=1,
                       help="launcher calls at once (>1: each runs its points one at a time on one thread)")
    run_p.add_argument("--calls", type=int, default=1,
                       help="launcher calls at once, each one multirun of its variant and seed (with --sweeps 1)")
    run_p.add_argument("--launcher", choices=["local", "basic"], default="local",
                       help="local: the points as parallel processes; basic: one after the other in one process")
    run_p.add_argument("extra", nargs="*", help="overrides passed to every run (after --)")
    gradr_p = sub.add_parser("gradr", help="Grad R at each S: alpha_gr searched on the first seed, then every seed")
    gradr_p.add_argument("--out", required=True)
    gradr_p.add_argument("--mu", type=float, default=0.05, help="Grad R's constant threshold (flat_width)")
    gradr_p.add_argument("--seeds", type=lambda t: [int(v) for v in t.split(",")], default=[0, 1, 2])
    gradr_p.add_argument("--sparsities", type=floats, default=list(SPARSITIES))
    gradr_p.add_argument("--start", type=float, default=0.1, help="the first alpha_gr tried")
    gradr_p.add_argument("--tol", type=float, default=0.0025, help="a search run this close to S ends the search")
    gradr_p.add_argument("--max-tries", type=int, default=5, help="search runs per S at most")
    gradr_p.add_argument("--sweeps", type=int, default=2, help="runs at once, one thread each")
    gradr_p.add_argument("--launcher", choices=["local", "basic"], default="local")
    gradr_p.add_argument("extra", nargs="*", help="overrides passed to every run (after --)")
    table_p = sub.add_parser("table", help="the table and plot from the finished runs under --out")
    table_p.add_argument("--out", required=True)
    table_p.add_argument("--json", default=None)
    table_p.add_argument("--md", default=None)
    table_p.add_argument("--png", default=None)
    args = parser.parse_args()
    if args.smoke == bool(args.command):
        parser.error("give one of run, table or --smoke")
    if args.command == "run" and args.sweeps > 1 and args.launcher != "local":
        parser.error("--sweeps > 1 needs --launcher local (it sets hydra.launcher.max_parallel)")
    return args


def main() -> None:
    args = _arguments()
    if args.smoke:
        smoke()
    elif args.command == "run":
        run(args)
    elif args.command == "gradr":
        gradr(args)
    else:
        table(args)


if __name__ == "__main__":
    main()
