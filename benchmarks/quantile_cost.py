"""Cost of the target schedule's recompute of d (the |θ| quantile) on realistic θ counts.

``scheduler=target`` sets d to the k-th smallest |θ| over every pruned layer each
``target_every_steps`` steps (`stds.method.target.kth_smallest_abs`) and holds d in between. This
times, on the θ of the real models (their shapes and initialisation):

- ``recompute``: one `kth_smallest_abs` call at S = 0.9 as the schedule runs it (on a CPU into
  its kept buffer), median of ``--repeats`` calls, with the alternatives it was chosen over
  (``torch.kthvalue``, ``torch.sort``; ``torch.topk`` on CUDA), each on a fresh ``torch.cat``;
- ``held step``: a `TargetSparsitySchedule.step` between recomputes;
- ``keep``: `keep_unpruned`, the extra pass of a recompute in the hold that moves d
  (``scheduler.hold_keeps_weights``), median of ``--repeats`` calls;
- the amortised cost per training step at intervals 1, 10 and 100, and, with ``--step-ms``, its
  share of a training step of that setup (e.g. from ``benchmarks/RESULTS.md``).

    python benchmarks/quantile_cost.py
    python benchmarks/quantile_cost.py --setups sew_resnet18 --step-ms sew_resnet18=1418
    python benchmarks/quantile_cost.py --threads 1   # a busy 2-core CPU: no waits on a 2nd thread
    python benchmarks/quantile_cost.py --threads 1 --skip-alternatives   # the schedule's own costs only
    python benchmarks/quantile_cost.py --smoke   # seconds: the digits net only, one call each

Runs on CUDA when it is available (times include a synchronisation), else on the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from hydra.utils import instantiate

from common import compose, uptime
from stds.method.target import TargetSparsitySchedule, keep_unpruned, kth_smallest_abs, wanted_count
from stds.method.sparse import pruned_parameters, sparsify

SPARSITY = 0.9
INTERVALS = (1, 10, 100)

SETUPS = {
    "digits": ["model=digits_net", "dataset=digits"],
    "cifar10_c64": ["experiment=cifar10_stds", "dataset=fake", "model.channels=64"],
    "cifar10": ["experiment=cifar10_stds", "dataset=fake"],
    "sew_resnet18": ["experiment=imagenet_stds", "dataset=fake", "dataset.num_classes=1000"],
}
"""Setup -> config overrides; cifar10_c64 is the CPU step-time benchmark's shrunk CIFAR10Net."""


def thetas_of(setup: str, device: torch.device) -> list[torch.Tensor]:
    """The θ of every pruned layer of the setup's model, freshly initialised (seed 0)."""
    cfg = compose(SETUPS[setup])
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    exclude = cfg.sparse.exclude if cfg.sparse.exclude is not None else model.prune_exclude
    sparsify(model, "stmod", 0.0, exclude=tuple(exclude))
    return [theta.detach().to(device) for theta in pruned_parameters(model).values()]


def median_s(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def alternatives(thetas: list[torch.Tensor], k: int) -> dict[str, Callable[[], float]]:
    """The ways to find the k-th smallest |θ| that `kth_smallest_abs` was chosen over."""
    flat = lambda: torch.cat([t.abs().flatten() for t in thetas])  # noqa: E731
    ways = {
        "kthvalue": lambda: float(flat().kthvalue(k).values),
        "sort": lambda: float(flat().sort().values[k - 1]),
    }
    if thetas[0].is_cuda:  # the n - k + 1 largest, whose smallest is the k-th smallest
        ways["topk"] = lambda: float(flat().topk(flat().numel() - k + 1).values.min())
    return ways


def held_step_s() -> float:
    """Seconds of one `TargetSparsitySchedule.step` between recomputes (mean of 10,000)."""
    model = torch.nn.Linear(2, 2)
    sparsify(model, "stmod", 0.0)
    schedule = TargetSparsitySchedule(SPARSITY, total_steps=10**9, every=10**6).attach(model)
    started = time.perf_counter()
    for step in range(1, 10_001):
        schedule.step(step)
    return (time.perf_counter() - started) / 10_000


def measure(setup: str, repeats: int, device: torch.device, step_ms: float | None,
            with_alternatives: bool = True) -> dict:
    """Recompute time, the hold's keep pass, alternatives and amortised per-step cost for one setup."""
    thetas = thetas_of(setup, device)
    numel = sum(t.numel() for t in thetas)
    k = wanted_count(SPARSITY, numel)
    scratch = thetas[0].new_empty(numel) if device.type == "cpu" else None  # as the schedule keeps it
    result = {"setup": setup, "numel": numel, "device": str(device),
              "recompute_ms": 1e3 * median_s(lambda: kth_smallest_abs(thetas, k, scratch), repeats, device)}
    expected = kth_smallest_abs(thetas, k, scratch)
    # old == new: a move of 0, which makes the same passes over θ as any move and leaves θ as it is
    result["keep_ms"] = 1e3 * median_s(lambda: keep_unpruned(thetas, expected, expected), repeats, device)
    for name, fn in (alternatives(thetas, k) if with_alternatives else {}).items():
        assert fn() == expected, name  # every way finds the same value
        result[f"{name}_ms"] = 1e3 * median_s(fn, repeats, device)
    result["held_step_us"] = 1e6 * held_step_s()
    for every in INTERVALS:
        per_step = result["recompute_ms"] / every
        result[f"every_{every}_ms_per_step"] = per_step
        if step_ms:
            result[f"every_{every}_share"] = per_step / step_ms
    return result


def table(results: list[dict]) -> str:
    """Markdown table of ``measure`` results."""
    ways = [w for w in ("kthvalue", "sort", "topk") if any(f"{w}_ms" in r for r in results)]
    head = ["setup", "pruned θ", "recompute (ms)", "keep pass (ms)", *[f"{w} (ms)" for w in ways], "held step (µs)",
            *[f"per step, every {e} (ms)" for e in INTERVALS], "share of a step, every 10"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        share = r.get("every_10_share")
        cells = [r["setup"], f"{r['numel']:,}", f"{r['recompute_ms']:.2f}", f"{r['keep_ms']:.2f}",
                 *[f"{r[f'{w}_ms']:.1f}" if f"{w}_ms" in r else "" for w in ways],
                 f"{r['held_step_us']:.2f}", *[f"{r[f'every_{e}_ms_per_step']:.3f}" for e in INTERVALS],
                 f"{100 * share:.2f}%" if share is not None else "(no --step-ms)"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--step-ms", nargs="*", default=[], metavar="SETUP=MS",
                        help="a training step's time per setup, for the share column")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--skip-alternatives", action="store_true",
                        help="time only the schedule's own recompute and keep pass (not kthvalue, sort, topk)")
    parser.add_argument("--smoke", action="store_true",
                        help="a check that it runs: the digits net only (58,144 θ), one timed call each")
    args = parser.parse_args()
    if args.smoke:
        args.setups, args.repeats = ["digits"], 1
    if args.threads:
        torch.set_num_threads(args.threads)
    step_ms = {key: float(value) for key, value in (item.split("=", 1) for item in args.step_ms)}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = [measure(setup, args.repeats, device, step_ms.get(setup), not args.skip_alternatives)
               for setup in args.setups]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}; load: {uptime()}")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
