"""Mixed precision on a CPU: training images/s of the digits net with ``amp=false`` against
``amp=bf16`` (``amp=fp16`` runs as bf16 on a CPU).

Both settings are built once and then timed in alternating rounds (so a change of machine load
hits both alike); each round times ``--steps`` optimizer steps of `stds.run.life.loop.train_step` on
one batch already in memory. Prints the median images/s of each, their ratio and the load.

    python benchmarks/amp_cpu.py --steps 20 --rounds 3
    python benchmarks/amp_cpu.py --smoke     # seconds: a digits net of width 4, 1 step, 1 round
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import compose, uptime
from stds.run.life.loop import train_step
from stds.run.setup import distributed
from stds.run.setup.build import build_run, prepare_config

SMOKE = ["model.channels=[4,4,4]", "T=2", "dataset=fake", "dataset.in_channels=1", "dataset.image_size=8",
         "dataset.train_size=32", "dataset.test_size=32"]
"""Overrides of ``--smoke``: the digits net shrunk to three convs of 4 channels over 2 time steps,
on one batch of 32 random 8x8 images (no data set to load)."""


def _images_per_s(run, images, labels, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        loss, _ = train_step(run, images, labels)
    float(loss)
    return steps * images.shape[0] / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a check that it runs: a tiny net, 1 step, 1 round")
    args = parser.parse_args()
    steps, rounds, shrink = (1, 1, SMOKE) if args.smoke else (args.steps, args.rounds, [])
    env = distributed.setup("cpu")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for amp in ("false", "bf16"):
            cfg = prepare_config(compose([f"amp={amp}", "flat_width=0.05", *shrink]))
            runs[amp] = build_run(cfg, env, Path(tmp))
    images, labels = next(iter(runs["false"].train_loader))
    speeds: dict[str, list[float]] = {amp: [] for amp in runs}
    for run in runs.values():
        _images_per_s(run, images, labels, 2)  # warm-up
    for _ in range(rounds):
        for amp, run in runs.items():
            speeds[amp].append(_images_per_s(run, images, labels, steps))
    median = {amp: statistics.median(values) for amp, values in speeds.items()}
    print(f"load: {uptime()}")
    print(f"{torch.get_num_threads()} threads, batch {images.shape[0]}, {steps} steps x {rounds} rounds"
          + (" (smoke)" if args.smoke else ""))
    for amp, value in median.items():
        print(f"amp={amp}: {value:.1f} images/s (rounds: {', '.join(f'{v:.1f}' for v in speeds[amp])})")
    print(f"amp=false / amp=bf16: {median['false'] / median['bf16']:.3f} (above 1: bf16 is slower)")


if __name__ == "__main__":
    main()
