"""The table step of ``benchmarks/target_frontier.py``: read the finished runs under a directory
(``metrics.json``, ``metrics.jsonl``, ``train.log``, ``checkpoints/last.pt`` and the saved
``.hydra/config.yaml``, each read as data), summarise them per variant and S, and write the
Markdown table and the plot. The frontier at S is interpolated linearly in (reached sparsity,
test top-1) between the two D runs of the same seed that bracket S.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import statistics
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

LAST = 5  # epochs averaged in the "last 5" column
ALPHAS_FILE = "gradr_alphas.json"  # Grad R's alpha chosen per S by the gradr step: {variant: {S: {alpha, ...}}}


def target_name(ramp: str, ramp_until: float, keep_weights: bool, lr_floor: float | None = None) -> str:
    """``<ramp>@<ramp_until>``, with ``-shrink`` for the hold without kept weights (none without a hold)
    and ``+cos<floor>`` for ``lr_scheduler=hold_cosine`` (the learning rate annealed over the hold)."""
    name = f"{ramp}@{ramp_until:g}" + ("" if keep_weights or ramp_until >= 1.0 else "-shrink")
    return name if lr_floor is None else f"{name}+cos{lr_floor:g}"


def hold_lr_floor(cfg: dict) -> float | None:
    """The floor of a run's ``lr_scheduler=hold_cosine``, or None for any other learning-rate schedule."""
    factor = (cfg.get("lr_scheduler") or {}).get("lr_lambda") or {}
    if not isinstance(factor, dict) or not str(factor.get("_target_", "")).endswith(".HoldCosine"):
        return None
    return float(factor.get("floor", 0.0))




def gmp_name(ramp: str, ramp_until: float, scope: str) -> str:
    """``gmp:<ramp>@<ramp_until>`` (each layer to S) or ``gmp-global:...``."""
    return f"gmp{'-global' if scope == 'global' else ''}:{ramp}@{ramp_until:g}"


def gradr_name(mu: float) -> str:
    """``gradr:<mu>``: Grad R with the constant threshold mu, its prior alpha swept."""
    return f"gradr:{mu:g}"


def variant_of(cfg: dict) -> str:
    """The variant name of a finished run from its saved config."""
    scheduler = cfg["scheduler"]
    if float(cfg.get("alpha_gr") or 0.0) > 0 and scheduler["kind"] == "constant":
        return gradr_name(float(cfg["flat_width"]))
    if cfg.get("sparse", {}).get("method") == "gmp":
        return gmp_name(scheduler["ramp"], float(scheduler.get("ramp_until", 1.0)), cfg["sparse"].get("scope") or "layer")
    if scheduler["kind"] != "target":
        return "frontier" if scheduler["kind"] == "sine" and scheduler.get("ramp_until", 1.0) == 1.0 else ""
    until = float(scheduler.get("ramp_until", 1.0))
    # absent: the run is older than the key, and its hold moved every weight with d
    return target_name(scheduler["ramp"], until, bool(scheduler.get("hold_keeps_weights", False)), hold_lr_floor(cfg))



def finished_runs(out: Path) -> list[tuple[dict, dict, list[dict], Path]]:
    """(saved config, metrics.json, metrics.jsonl records, run dir) of every finished run under ``out``."""
    runs = []
    for metrics_path in sorted(out.rglob("metrics.json")):
        run_dir = metrics_path.parent
        config_path = run_dir / ".hydra" / "config.yaml"
        if not config_path.exists():
            continue
        metrics = json.loads(metrics_path.read_text())
        if metrics.get("epoch") != metrics.get("epochs_planned"):
            continue
        cfg = OmegaConf.to_container(OmegaConf.load(config_path), resolve=False)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
        runs.append((cfg, metrics, records, run_dir))
    return runs


def point_key(cfg: dict) -> tuple[str, int, float]:
    """(variant, seed, swept value) of a run: D for the frontier, alpha for Grad R, S for a target
    run (nan for a run of none of them, whose variant is "")."""
    name = variant_of(cfg)
    kind = name.partition(":")[0]
    value = cfg["flat_width"] if kind == "frontier" else cfg["alpha_gr"] if kind == "gradr" else cfg.get("target_sparsity")
    return name, int(cfg["seed"]), math.nan if value is None else float(value)



def spread(values: list[float]) -> dict:
    """n, mean, sample standard deviation (0 for one value), min and max of ``values``."""
    return {"n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def point(metrics: dict, records: list[dict]) -> dict:
    """What the table keeps of one run: final test top-1, reached sparsity, last-epochs mean, d."""
    last = [r["test_acc1"] for r in records if "test_acc1" in r][-LAST:]
    return {"acc": metrics["test_acc1"], "sparsity": metrics["sparsity"], "d": metrics["d"],
            "last": statistics.fmean(last), "best": metrics["best_test_acc1"]}


def collect(out: Path) -> dict[str, dict[float, dict[int, dict]]]:
    """variant -> swept value -> seed -> `point` (the newest run of a point wins); target runs
    with a hold also carry `hold_stats`."""
    table: dict[str, dict[float, dict[int, dict]]] = {}
    for cfg, metrics, records, run_dir in finished_runs(out):
        name, seed, value = point_key(cfg)
        if not name:
            continue
        row = point(metrics, records)
        # how d moved in the hold: STDS target runs only (GMP's d is the last recompute's largest pruned |w|)
        if not name.startswith(("frontier", "gmp", "gradr")) and float(cfg["scheduler"].get("ramp_until", 1.0)) < 1.0:
            row["hold"] = hold_stats(cfg, records, run_dir)
        table.setdefault(name, {}).setdefault(value, {})[seed] = row
    return by_chosen_alpha(table, out / ALPHAS_FILE)


def by_chosen_alpha(table: dict, chosen_path: Path) -> dict:
    """Grad R rows re-keyed from alpha to the S each alpha was chosen for (``gradr_alphas.json``,
    written by the gradr step); Grad R runs of an alpha chosen for no S are left out."""
    chosen = json.loads(chosen_path.read_text()) if chosen_path.is_file() else {}
    for name in [n for n in table if n.startswith("gradr:")]:
        runs = table.pop(name)
        rows = {float(target): {seed: {**p, "alpha": row["alpha"]} for seed, p in runs[row["alpha"]].items()}
                for target, row in chosen.get(name, {}).items() if row["alpha"] in runs}
        if rows:
            table[name] = rows
    return table


def d_trace(records: list[dict], run_dir: Path) -> list[tuple[int, float]]:
    """(step, d) from the epoch records (full precision) and the train.log step lines (every
    ``logging.log_every_steps`` steps, d with 4 significant digits), in step order."""
    pattern = re.compile(r" step (\d+)/\d+ .* d ([-+.e\d]+) \|")
    trace = {r["step"]: r["d"] for r in records}
    log_path = run_dir / "train.log"
    for line in log_path.read_text().splitlines() if log_path.exists() else []:
        match = pattern.search(line)
        if match and int(match[1]) not in trace:
            trace[int(match[1])] = float(match[2])
    return sorted(trace.items())


def hold_stats(cfg: dict, records: list[dict], run_dir: Path) -> dict:
    """How d moved in the hold of a target run, from its logged d and final θ.

    ``falls``: logged values of d in the hold below the value logged before; ``max_fall``: the
    largest such fall relative to the value before; ``never_decrease_sparsity``: the share of
    the final θ with |θ| <= the highest d of the hold, the sparsity a d that never decreases would
    give at the end with these θ, and ``frozen_sparsity`` the same for d frozen at the ramp's end
    (first order: the training path would differ).
    """
    import torch

    steps_per_epoch = records[0]["step"] // records[0]["epoch"]
    hold_from = float(cfg["scheduler"]["ramp_until"]) * steps_per_epoch * int(cfg["epochs"])
    ds = [d for step, d in d_trace(records, run_dir) if step >= hold_from]
    falls = [(a - b) / a for a, b in itertools.pairwise(ds) if b < a]
    model = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]
    thetas = torch.cat([v.abs().reshape(-1) for k, v in model.items() if k.endswith(".weight.original")])
    return {"logged": len(ds), "falls": len(falls), "max_fall": max(falls, default=0.0),
            "d_max": max(ds), "d_end": ds[-1], "rise": ds[-1] / ds[0] - 1,
            "never_decrease_sparsity": float((thetas <= max(ds)).double().mean()),
            "frozen_sparsity": float((thetas <= ds[0]).double().mean())}


def frontier_at(frontier: dict[float, dict[int, dict]], target: float, field: str) -> dict[int, float]:
    """Seed -> ``field`` of its D runs interpolated linearly in reached sparsity at ``target``;
    only seeds whose runs reach below and above ``target`` count."""
    seeds = sorted({seed for by_seed in frontier.values() for seed in by_seed})
    values = {}
    for seed in seeds:
        pts = sorted((p["sparsity"], p[field]) for by_seed in frontier.values()
                     for s, p in by_seed.items() if s == seed)
        xs, ys = [x for x, _ in pts], [y for _, y in pts]
        if len(xs) >= 2 and xs[0] <= target <= xs[-1]:
            values[seed] = float(np.interp(target, xs, ys))
    return values


def summarise(table: dict) -> dict:
    """The JSON the Markdown and the plot are made from: per variant and S (or D), spreads."""
    summary: dict = {"frontier_points": {}, "frontier": {}, "target": {}}
    frontier = table.get("frontier", {})
    for width, by_seed in sorted(frontier.items()):
        summary["frontier_points"][f"{width:g}"] = {
            key: spread([p[key] for p in by_seed.values()]) for key in ("acc", "sparsity", "last")}
        summary["frontier_points"][f"{width:g}"]["seeds"] = sorted(by_seed)
    targets = sorted({v for name, rows in table.items() if name != "frontier" for v in rows})
    for target in targets:
        per_seed = {key: frontier_at(frontier, target, key) for key in ("acc", "last")}
        summary["frontier"][f"{target:g}"] = {
            key: spread(list(vals.values())) if vals else None for key, vals in per_seed.items()}
        summary["frontier"][f"{target:g}"]["per_seed"] = per_seed
    for name, rows in sorted(table.items()):
        if name == "frontier":
            continue
        for target, by_seed in sorted(rows.items()):
            summary["target"].setdefault(name, {})[f"{target:g}"] = {
                key: spread([p[key] for p in by_seed.values()]) for key in ("acc", "sparsity", "last", "d", "best")}
            summary["target"][name][f"{target:g}"]["seeds"] = sorted(by_seed)
            if name.startswith("gradr:"):
                summary["target"][name][f"{target:g}"]["alpha"] = next(iter(by_seed.values()))["alpha"]
            summary["target"][name][f"{target:g}"]["per_seed"] = {
                key: {seed: p[key] for seed, p in sorted(by_seed.items())} for key in ("acc", "last", "sparsity")}
            holds = [(p["hold"], p["sparsity"]) for p in by_seed.values() if "hold" in p]
            if holds:
                summary.setdefault("hold", {}).setdefault(name, {})[f"{target:g}"] = {
                    "runs": len(holds), "logged": sum(h["logged"] for h, _ in holds),
                    "falls": sum(h["falls"] for h, _ in holds),
                    "max_fall": max(h["max_fall"] for h, _ in holds),
                    "rise_min": min(h["rise"] for h, _ in holds), "rise_max": max(h["rise"] for h, _ in holds),
                    "frozen_min": min(h["frozen_sparsity"] for h, _ in holds),
                    "d_end_over_d_max_min": min(h["d_end"] / h["d_max"] for h, _ in holds),
                    "never_decrease_excess": max(h["never_decrease_sparsity"] - s for h, s in holds)}
    return summary


def pct(cell: dict | None, key: str = "mean") -> str:
    """A spread's field in percent with two decimals, or a dash."""
    return "–" if cell is None else f"{100 * cell[key]:.2f}"


def cell(stats: dict | None) -> str:
    """``mean ± std (min–max, n)`` in percent."""
    if stats is None:
        return "not bracketed"
    return f"{pct(stats)} ± {pct(stats, 'std')} ({pct(stats, 'min')}–{pct(stats, 'max')}, n={stats['n']})"


def label(name: str, row: dict) -> str:
    """A table row's method: ``target <variant>``, ``GMP ...`` or ``Grad R mu=..., alpha=...``."""
    if name.startswith("gradr:"):
        return f"Grad R μ={name.partition(':')[2]}, α={row['alpha']:g}"
    return name.replace("gmp-global:", "GMP global ").replace("gmp:", "GMP per layer ") if name.startswith("gmp") \
        else f"target {name}"


def methods_markdown(summary: dict) -> str:
    """Per S, every variant's reached sparsity, final and best-epoch test top-1 (mean ± std, range)."""
    lines = ["| S | method | reached sparsity (mean, min–max) | final test top-1 % | best-epoch test top-1 % |",
             "|---|---|---|---|---|"]
    for target in sorted({t for rows in summary["target"].values() for t in rows}, key=float):
        for name, rows in sorted(summary["target"].items()):
            if target in rows:
                row = rows[target]
                lines.append(f"| {target} | {label(name, row)} | {row['sparsity']['mean']:.4f} "
                             f"({row['sparsity']['min']:.4f}–{row['sparsity']['max']:.4f}) | {cell(row['acc'])} | "
                             f"{cell(row['best']) if 'best' in row else '–'} |")
    return "\n".join(lines) + "\n"


def markdown(summary: dict) -> str:
    """The table (target variants against the interpolated frontier) and the D runs it came from."""
    lines = [("| S | schedule | reached sparsity (mean, max) | test top-1 % | gap to D frontier (points) "
              "| last 5 epochs % | gap, last 5 (points) |"), "|---|---|---|---|---|---|---|"]
    for target in sorted(summary["frontier"], key=float):
        front = summary["frontier"][target]
        lines.append(f"| {target} | D frontier (interpolated) | {target} | {cell(front['acc'])} | | "
                     f"{cell(front['last'])} | |")
        for name, rows in sorted(summary["target"].items()):
            if target not in rows:
                continue
            row = rows[target]
            gap, gap_last = (("–" if front[key] is None else f"{100 * (row[key]['mean'] - front[key]['mean']):+.2f}")
                             for key in ("acc", "last"))
            reached = f"{row['sparsity']['mean']:.5f}, {row['sparsity']['max']:.5f}"
            lines.append(f"| {target} | {label(name, row)} | {reached} | {cell(row['acc'])} | {gap} | "
                         f"{cell(row['last'])} | {gap_last} |")
    lines += ["", "| D (sine) | reached sparsity | test top-1 % | last 5 epochs % |", "|---|---|---|---|"]
    for width, row in sorted(summary["frontier_points"].items(), key=lambda kv: float(kv[0])):
        lines.append(f"| {width} | {row['sparsity']['mean']:.4f} ({row['sparsity']['min']:.4f}–"
                     f"{row['sparsity']['max']:.4f}) | {cell(row['acc'])} | {cell(row['last'])} |")
    if summary.get("hold"):
        lines += ["", ("| hold of | S | runs | values of d logged in the hold | of them below the one before | "
                       "largest fall of d | rise of d over the hold | final θ's sparsity at the d of the ramp's end (min) | "
                       "sparsity a never-decreasing d would end above S (max, points) |"),
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, rows in sorted(summary["hold"].items()):
            for target, h in sorted(rows.items(), key=lambda kv: float(kv[0])):
                lines.append(f"| {name} | {target} | {h['runs']} | {h['logged']} | {h['falls']} | "
                             f"{100 * h['max_fall']:.2f}% | {100 * h['rise_min']:+.1f}% to {100 * h['rise_max']:+.1f}% | "
                             f"{h['frozen_min']:.4f} | "
                             f"{100 * h['never_decrease_excess']:.3f} |")
    return "\n".join(lines) + "\n\n" + methods_markdown(summary)


def plot(summary: dict, path: Path) -> None:
    """Test top-1 against reached sparsity: the D runs and each target variant, mean ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    pts = sorted(summary["frontier_points"].values(), key=lambda r: r["sparsity"]["mean"])
    if pts:
        ax.errorbar([100 * r["sparsity"]["mean"] for r in pts], [100 * r["acc"]["mean"] for r in pts],
                    yerr=[100 * r["acc"]["std"] for r in pts], color="black", marker="o", capsize=3,
                    label="sine D schedule (hand-picked D)")
    colors = plt.get_cmap("tab20").colors  # up to 20 variants without a repeated colour
    for i, (name, rows) in enumerate(sorted(summary["target"].items())):
        items = sorted(rows.values(), key=lambda r: r["sparsity"]["mean"])
        ax.errorbar([100 * r["sparsity"]["mean"] + 0.06 * (i - 2) for r in items],
                    [100 * r["acc"]["mean"] for r in items], yerr=[100 * r["acc"]["std"] for r in items],
                    marker="s", linestyle=":" if name.endswith("-shrink") else "--", capsize=3,
                    color=colors[i % len(colors)],
                    label=(f"Grad R μ={name.partition(':')[2]}, α chosen per S" if name.startswith("gradr:")
                           else label(name, {})) + (" (before the hold)" if name == "sine@1" else ""))
    targets = [100 * float(t) for t in summary["frontier"]]
    if targets:  # the S range: D runs far past it (a collapsed net) would squash the axis
        ax.set_xlim(min(targets) - 2.5, max(targets) + 1.5)
        shown = [100 * r["acc"]["mean"] for r in pts if ax.get_xlim()[0] <= 100 * r["sparsity"]["mean"] <= ax.get_xlim()[1]]
        shown += [100 * r["acc"]["mean"] for rows in summary["target"].values() for r in rows.values()]
        ax.set_ylim(min(shown) - 2, 100.5)
    ax.set_xlabel("reached sparsity (%)")
    ax.set_ylabel("final test top-1 (%)")
    ax.set_title("digits net, 30 epochs: each method at S" + (" against the D frontier" if pts else "")
                 + " (mean ± std over seeds)")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_table(out: Path, json_path: Path | None, md: Path | None, png: Path | None) -> str:
    """Collect ``out`` and write the summary to ``json_path`` (default <out>/table.json), the
    Markdown to ``md`` and the plot to ``png`` (those given); returns the Markdown."""
    summary = summarise(collect(out))
    Path(json_path or out / "table.json").write_text(json.dumps(summary, indent=1) + "\n")
    text = markdown(summary)
    if md:
        Path(md).write_text(text)
    if png:
        plot(summary, Path(png))
    return text
