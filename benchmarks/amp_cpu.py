"""Mixed precision on a CPU: training images/s of the digits net with ``amp=false`` against
``amp=bf16`` (``amp=fp16`` runs as bf16 on a CPU), the figures of the loop's warning.

Both settings are built once and then timed in alternating rounds (so a change of machine load
hits both alike); each round times ``--steps`` optimizer steps of `stds.run.life.loop.train_step` on
one batch already in memory. Prints the median images/s of each and their ratio, with the load.

    python benchmarks/amp_cpu.py --steps 20 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import compose_train  # noqa: E402  (the real config, composed as the tests do)

from stds.run.setup import distributed  # noqa: E402
from stds.run.setup.build import build_run, prepare_config  # noqa: E402
from stds.run.life.loop import train_step  # noqa: E402


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
    args = parser.parse_args()
    env = distributed.setup("cpu")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for amp in ("false", "bf16"):
            runs[amp] = build_run(prepare_config(compose_train(f"amp={amp}", "flat_width=0.05")), env, Path(tmp))
    images, labels = next(iter(runs["false"].train_loader))
    speeds: dict[str, list[float]] = {amp: [] for amp in runs}
    for amp, run in runs.items():
        _images_per_s(run, images, labels, 2)  # warm-up
    for _ in range(args.rounds):
        for amp, run in runs.items():
            speeds[amp].append(_images_per_s(run, images, labels, args.steps))
    median = {amp: statistics.median(values) for amp, values in speeds.items()}
    print(f"load {os.getloadavg()[0]:.2f} (1 min), {torch.get_num_threads()} threads, batch {images.shape[0]}")
    for amp, value in median.items():
        print(f"amp={amp}: {value:.0f} images/s (rounds: {', '.join(f'{v:.0f}' for v in speeds[amp])})")
    print(f"amp=bf16 is {median['false'] / median['bf16']:.1f} times slower")


if __name__ == "__main__":
    main()
