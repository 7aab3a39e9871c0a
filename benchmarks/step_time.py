"""Median time and peak memory of one training step: dense vs STDS (stmod) vs Grad R.

A step is what the training loop does per batch: forward over T time steps, loss, backward,
optimizer step (with the Grad R prior when alpha > 0), ``reset_net`` and the threshold update.
Each (setup, method) pair runs in its own process so that its peak memory is its own.

    python benchmarks/step_time.py                      # both setups, sizes for this device
    python benchmarks/step_time.py --setups cifar10 --steps 30 --json out.json
    python benchmarks/step_time.py --setups imagenet --set dataset.image_size=64 batch_size=8

On a CPU the setups are shrunk (fewer channels, smaller images; printed with the results);
the ratios to dense are what the targets are about (stmod / dense <= 1.05, Grad R / dense <= 1.05).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from spikingjelly.activation_based import functional

REPO = Path(__file__).resolve().parents[1]

METHODS = {
    "dense": ["sparse=identity", "scheduler=constant", "flat_width=0"],
    "stmod": ["sparse=stmod", "scheduler=sine", "flat_width=1.0"],
    "gradr": ["sparse=stmod", "scheduler=constant", "flat_width=0.05", "alpha_gr=1e-3"],
}


def setup_overrides(setup: str, cuda: bool) -> list[str]:
    """The paper's setup, shrunk on a CPU so that a step takes about a second."""
    if setup == "cifar10":
        base = ["experiment=cifar10_stds", "dataset=fake", "T=8", "batch_size=16", "loss=mse"]
        return base + ([] if cuda else ["model.channels=64", "dataset.image_size=32"])
    base = ["experiment=imagenet_stds", "dataset=fake", "T=4", "batch_size=32", "dataset.num_classes=1000"]
    return base + (["dataset.image_size=224"] if cuda else ["dataset.image_size=128", "batch_size=16"])


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from stds.config import register_configs
    from stds.train import prepare_config

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return prepare_config(compose("train", overrides=overrides))


def measure(setup: str, method: str, steps: int, warmup: int, amp: bool, extra: list[str]) -> dict:
    """Time ``steps`` training steps after ``warmup`` ones; peak memory of this process."""
    from stds.models.neurons import neuron_implementation
    from stds.optim import build_optimization
    from stds.train import build_model, loss_fn
    from stds.schedule import build_threshold_schedule

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    overrides = setup_overrides(setup, cuda) + extra
    cfg = _compose(overrides + METHODS[method] + [f"amp={str(amp).lower()}"])
    torch.manual_seed(0)
    total = warmup + steps
    threshold = build_threshold_schedule(cfg, total)
    model = build_model(cfg, device, threshold.at(0))
    threshold.attach(model)
    optimizer, _ = build_optimization(cfg, model)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and cuda)
    size = cfg.dataset.image_size
    images = torch.randn(cfg.batch_size, cfg.dataset.in_channels, size, size, device=device)
    labels = torch.randint(0, cfg.dataset.num_classes, (cfg.batch_size,), device=device)
    dtype = torch.float16 if cuda else torch.bfloat16
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(total):
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            scores = model(images)
        loss = loss_fn(cfg.loss.value, scores, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        functional.reset_net(model)
        threshold.step(step + 1)
        if cuda:
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "setup": setup, "method": method, "median_s": statistics.median(times),
        "images_per_s": cfg.batch_size / statistics.median(times), "peak_bytes": int(peak),
        "device": torch.cuda.get_device_name() if cuda else "cpu", "amp": amp,
        "neuron_kernel": neuron_implementation(cfg.model.neuron.kind, device),
        "overrides": overrides,
    }


def _run_child(setup: str, method: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", setup, method, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--set", *args.set] + (["--amp"] if args.amp else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(results: list[dict]) -> str:
    lines = ["| setup | method | median step (s) | images/s | peak memory (MiB) | time / dense | neuron kernel |",
             "|---|---|---|---|---|---|---|"]
    dense = {r["setup"]: r["median_s"] for r in results if r["method"] == "dense"}
    for r in results:
        ratio = r["median_s"] / dense[r["setup"]] if r["setup"] in dense else float("nan")
        lines.append(f"| {r['setup']} | {r['method']} | {r['median_s']:.4f} | {r['images_per_s']:.1f} | "
                     f"{r['peak_bytes'] / 2**20:.0f} | {ratio:.3f} | {r['neuron_kernel']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", nargs="+", default=["cifar10", "imagenet"], choices=["cifar10", "imagenet"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--amp", action="store_true", help="fp16 autocast on CUDA, bf16 on CPU")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides applied after each setup's own (e.g. dataset.image_size=128)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", nargs=2, metavar=("SETUP", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.steps, args.warmup, args.amp, args.set)))
        return
    results = []
    for setup in args.setups:
        # interleave the methods twice and keep each one's faster run, against drifting load
        runs = [_run_child(setup, m, args) for _ in range(2) for m in args.methods]
        for method in args.methods:
            results.append(min((r for r in runs if r["method"] == method), key=lambda r: r["median_s"]))
    print(f"device: {results[0]['device']}; torch {torch.__version__}; steps {args.steps}")
    for setup in args.setups:
        print(f"{setup}: {' '.join(results[[r['setup'] for r in results].index(setup)]['overrides'])}")
    print(_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
