"""Training speed: dense vs STDS (stmod) vs Grad R, as a bare step and in the real loop.

- bare step: what the training loop does per batch (``stds.run.life.loop.train_step``: forward over T,
  loss, backward, optimizer step with the Grad R prior, ``reset_net``) plus the threshold
  update, on one batch already on the device; median of ``--steps`` after ``--warmup``;
- real loop: ``stds.run.life.loop.train_epoch`` over the run's DataLoader on ``dataset=fake`` images
  (``--loop-steps`` batches per epoch), the second epoch timed (the first warms up workers,
  cuDNN and the allocator);
- the neuron path that really ran: every spiking layer checked against the condition of
  SpikingJelly's fused kernel after a forward (`stds.run.setup.accel.NeuronPathProbe`), e.g.
  ``fused 8/8`` or ``fallback 8/8``, with SpikingJelly's CUDA implementation (cuda, triton);
- one profiled step (`stds.run.setup.accel.profile_step`): kernel launches per step and the GPU-busy
  share of its wall time (CUDA only; on a CPU both are 0).

Each (setup, method) pair runs in its own process, so its peak memory is its own.

    python benchmarks/step_time.py                      # both setups, sizes for this device
    python benchmarks/step_time.py --smoke              # seconds: tiny nets, 1 step, a child a setup
    python benchmarks/step_time.py --amp fp16           # on a GPU: the paper's setups with AMP
    python benchmarks/step_time.py --setups cifar10 --steps 10 --loop-steps 10 --json out.json
    python benchmarks/step_time.py --setups imagenet --set channels_last=false compile=true

On a CPU the setups are shrunk (fewer channels, smaller images, no loader workers; printed
with the results); the ratios to dense are what the targets are about (stmod / dense <= 1.05,
Grad R / dense <= 1.05). Config keys (``channels_last``, ``compile``, ``deterministic``, loader
settings) come from the presets and ``--set``.

``--smoke`` checks that the benchmark runs, not how fast: both setups shrunk to a few thousand
weights (`SMOKE`), 1 timed step after 1 warm-up, a loop epoch of 1 batch, one round, and the
pairs of each setup in one child process, the two children at once (so the peak memory column is
that child's peak so far).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from common import compose, uptime

if TYPE_CHECKING:  # imported where a child measures: the parent only starts children and prints their table
    import torch

METHODS = {
    "dense": ["sparse=identity", "scheduler=constant", "flat_width=0"],
    "stmod": ["sparse=stmod", "scheduler=sine", "flat_width=1.0"],
    "gradr": ["sparse=stmod", "scheduler=constant", "flat_width=0.05", "alpha_gr=1e-3"],
}

CPU_LOADER = ["loader.num_workers=0", "loader.pin_memory=false", "loader.persistent_workers=false"]

SMOKE = {
    "cifar10": ["model.channels=8", "model.hidden=16", "dataset.image_size=8", "T=2", "batch_size=4", *CPU_LOADER],
    "imagenet": ["model.width=8", "dataset.image_size=16", "dataset.num_classes=10", "T=2", "batch_size=2",
                 *CPU_LOADER],
}
"""Setup -> overrides after its own for ``--smoke``: CIFAR10Net with C = 8, SEW ResNet-18 of width 8."""


def setup_overrides(setup: str, cuda: bool) -> list[str]:
    """The paper's setup; on a CPU shrunk so that a step takes about a second."""
    if setup == "cifar10":
        base = ["experiment=cifar10_stds", "dataset=fake", "T=8", "batch_size=16", "loss=mse"]
        return base + ([] if cuda else ["model.channels=64", "dataset.image_size=32", *CPU_LOADER])
    base = ["experiment=imagenet_stds", "dataset=fake", "T=4", "batch_size=32", "dataset.num_classes=1000"]
    return base + (["dataset.image_size=224"] if cuda else ["dataset.image_size=128", "batch_size=16", *CPU_LOADER])


def _build(cfg, device: torch.device, run_dir: Path):
    """The run of ``cfg`` as the training entrypoint builds it (layout and compilation from the
    config's ``channels_last`` and ``compile``, cuDNN autotuner from ``deterministic``)."""
    from stds.run.setup.distributed import DistEnv
    from stds.run.setup.build import build_run, set_determinism

    env = DistEnv(rank=0, local_rank=0, world_size=1, device=device)
    set_determinism(cfg, env)
    return build_run(cfg, env, run_dir)


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bare_steps(run, images, labels, steps: int, warmup: int) -> list[float]:
    from stds.run.life.loop import train_step

    times = []
    for step in range(warmup + steps):
        started = time.perf_counter()
        train_step(run, images, labels)
        run.threshold.step(step + 1)
        _sync(images.device)
        if step >= warmup:
            times.append(time.perf_counter() - started)
    return times


def _neuron_path(run, images) -> str:
    """``fused k/n`` or ``fallback k/n`` of the spiking layers in one eager forward."""
    from spikingjelly.activation_based import functional

    from stds.run.setup import accel

    with accel.NeuronPathProbe(run.core) as probe, run.autocast():
        run.core(images)
    functional.reset_net(run.core)
    if probe.fallback:
        return f"fallback {len(probe.fallback)}/{probe.calls}"
    return f"fused {probe.fused_calls}/{probe.calls}"


def _loop_seconds_per_step(run) -> float:
    """Wall time per step of `train_epoch`'s second epoch (the real loop with its DataLoader)."""
    from stds.run.life.state import Progress
    from stds.run.life.loop import train_epoch

    progress = Progress()
    for epoch in range(2):
        progress.epoch, progress.batch_in_epoch = epoch, 0
        _sync(run.env.device)
        started = time.perf_counter()
        train_epoch(run, progress)
        _sync(run.env.device)
    return (time.perf_counter() - started) / run.steps_per_epoch


def measure(setup: str, method: str, args: argparse.Namespace) -> dict:
    """Bare-step and loop timings, neuron path, kernel profile and peak memory of one pair."""
    import torch

    from stds.models.neurons import neuron_implementation
    from stds.run.life.loop import train_step
    from stds.run.setup import accel
    from stds.run.setup.build import prepare_config

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    overrides = setup_overrides(setup, cuda) + (SMOKE[setup] if args.smoke else []) + args.set
    cfg = prepare_config(compose(overrides + METHODS[method] + [f"amp={args.amp}", "epochs=2"]))
    # the fake training set holds exactly one loop epoch (at least one batch)
    cfg.dataset.train_size = max(args.loop_steps, 1) * cfg.batch_size
    cfg.dataset.test_size = cfg.batch_size
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as run_dir:
        run = _build(cfg, device, Path(run_dir))
        torch.manual_seed(0)
        size = cfg.dataset.image_size
        images, labels = run.to_device(
            torch.randn(cfg.batch_size, cfg.dataset.in_channels, size, size),  # as before
            torch.randint(0, cfg.dataset.num_classes, (cfg.batch_size,)))
        times = _bare_steps(run, images, labels, args.steps, args.warmup)
        path = _neuron_path(run, images)
        profile = accel.profile_step(lambda: train_step(run, images, labels), device)
        loop_s = _loop_seconds_per_step(run) if args.loop_steps else float("nan")
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    median = statistics.median(times)
    return {
        "setup": setup, "method": method, "median_s": median,
        "images_per_s": cfg.batch_size / median, "loop_s": loop_s,
        "loop_images_per_s": cfg.batch_size / loop_s, "peak_bytes": int(peak),
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "amp": args.amp,
        "channels_last": run.channels_last, "compile": bool(cfg.compile),
        "neuron_path": path, "neuron_kernel": neuron_implementation(cfg.model.neuron.kind, device),
        "kernels_per_step": profile.kernels, "gpu_busy_share": profile.gpu_busy_share,
        "fused_neuron_ops": profile.fused_neuron_ops, "overrides": overrides,
    }


def _run_children(groups: list[list[str]], args: argparse.Namespace) -> list[dict]:
    """`measure` of each ``setup:method`` of each group, a new process per group, the processes
    at once; one JSON line per pair, in the order given. Timed runs give one group at a time."""
    procs = []
    for pairs in groups:
        cmd = [sys.executable, __file__, "--child", *pairs, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--loop-steps", str(args.loop_steps), "--amp", args.amp,
               *(["--smoke"] if args.smoke else []), "--set", *args.set]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for pairs, proc in zip(groups, procs):
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"step_time: the child {' '.join(pairs)} failed (exit {proc.returncode}):\n{err}")
        results += [json.loads(line) for line in out.strip().splitlines()[-len(pairs):]]
    return results


def _run_child(pairs: list[str], args: argparse.Namespace) -> list[dict]:
    return _run_children([pairs], args)


def _measure_all(args: argparse.Namespace) -> list[dict]:
    """One result per (setup, method): in ``args.rounds`` interleaved rounds of one child per
    pair, each pair's fastest bare step (against drifting load); with ``--smoke`` one child per
    setup, both at once (it checks that the benchmark runs, not how fast)."""
    pairs = [f"{setup}:{method}" for setup in args.setups for method in args.methods]
    if args.smoke:
        return _run_children([[p for p in pairs if p.startswith(f"{setup}:")] for setup in args.setups], args)
    runs = [r for _ in range(args.rounds) for pair in pairs for r in _run_child([pair], args)]
    return [min((r for r in runs if f"{r['setup']}:{r['method']}" == pair), key=lambda r: r["median_s"])
            for pair in pairs]


def _table(results: list[dict]) -> str:
    lines = ["| setup | method | step (ms) | step images/s | loop (ms/step) | loop images/s | "
             "peak MiB | step / dense | loop / dense | kernels/step | GPU busy | neurons |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    dense = {r["setup"]: r for r in results if r["method"] == "dense"}
    for r in results:
        base = dense.get(r["setup"])
        step_ratio = r["median_s"] / base["median_s"] if base else float("nan")
        loop_ratio = r["loop_s"] / base["loop_s"] if base else float("nan")
        lines.append(
            f"| {r['setup']} | {r['method']} | {1e3 * r['median_s']:.1f} | {r['images_per_s']:.1f} | "
            f"{1e3 * r['loop_s']:.1f} | {r['loop_images_per_s']:.1f} | {r['peak_bytes'] / 2**20:.0f} | "
            f"{step_ratio:.3f} | {loop_ratio:.3f} | {r['kernels_per_step']} | "
            f"{100 * r['gpu_busy_share']:.0f}% | {r['neuron_path']} ({r['neuron_kernel']}) |")
    return "\n".join(lines)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", nargs="+", default=["cifar10", "imagenet"], choices=["cifar10", "imagenet"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=20, help="timed bare steps (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--loop-steps", type=int, default=20,
                        help="batches per timed loop epoch (0: no loop timing)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; each pair keeps its fastest")
    parser.add_argument("--amp", choices=["false", "fp16", "bf16"], default="false",
                        help="autocast dtype (fp16 is bf16 on a CPU)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides applied after each setup's own (e.g. dataset.image_size=128)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--smoke", action="store_true",
                        help="a check that it runs, in seconds: tiny nets, 1 step, one round, one child a setup")
    parser.add_argument("--child", nargs="+", metavar="SETUP:METHOD", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.warmup, args.loop_steps, args.rounds = 1, 1, 1, 1
    return args


def main() -> None:
    args = _arguments()
    if args.child:
        for pair in args.child:
            print(json.dumps(measure(*pair.split(":"), args)), flush=True)
        return
    results = _measure_all(args)
    first = results[0]
    print(f"device: {first['device']}; torch {first['torch']}; amp {args.amp}; "
          f"channels_last {first['channels_last']}; compile {first['compile']}; steps {args.steps}; "
          f"loop epoch {args.loop_steps} batches{'; smoke' if args.smoke else ''}")
    print(f"load: {uptime()}")
    for setup in args.setups:
        print(f"{setup}: {' '.join(next(r['overrides'] for r in results if r['setup'] == setup))}")
    print(_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
