"""The one training entrypoint: ``python launch/train.py [group=option ...] [key=value ...]``.

Single process, ``torchrun --nproc_per_node=N launch/train.py ...``, or ``-m`` sweeps through any
Hydra launcher (``hydra/launcher=local``, ``submitit_local``, ``slurm``, ``slurm_cpu``; ``local``
is registered from ``launch/hydra_plugins/``, on ``sys.path`` beside this file). The work is in
`stds.run.life.trainer.train`; this file only wires Hydra to it (``resume=`` points Hydra's run
directory at the run it continues: `stds.cli.resume_arg`).
"""

import atexit
import gc
import os
import sys

import hydra
from omegaconf import DictConfig

from stds.cli.entry import report_errors, run_hydra_main
from stds.cli.resume_arg import resume_argv
from stds.run.setup.config import register_configs
from stds.run.life.signals import RunStopped
from stds.run.life.trainer import train

register_configs()


def _argv(argv: list[str]) -> list[str]:
    """``hydra.run.dir`` set for ``resume=``; under torchrun, ranks other than 0 make no run directory of their own
    (rank 0's directory is given to every rank by `stds.run.life.trainer.train`)."""
    argv = report_errors(lambda: resume_argv(argv))
    if int(os.environ.get("RANK", "0")) > 0:
        argv = argv + ["hydra.run.dir=.", "hydra/job_logging=stdout"]
    return argv


def _train(cfg: DictConfig) -> float:
    # At exit, the interpreter's last garbage collections walk every object torch and the run left:
    # 1 to 2 s on 2 busy CPUs, while a SLURM job keeps its allocation. Frozen at exit, they are skipped
    # (0.2 s). Nothing is lost: the run has closed its files, and logging flushes in its own exit
    # hook, registered earlier, so it runs after this one. Once per process (a sweep in one process
    # calls this per point).
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
    try:
        return train(cfg)
    except RunStopped as stop:  # SIGTERM / SIGINT / SIGUSR2 after last.pt was written
        print(stop, file=sys.stderr, flush=True)
        sys.exit(128 + stop.signum)


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Train one run in Hydra's output directory; returns the final test top-1 accuracy."""
    return report_errors(lambda: _train(cfg))


if __name__ == "__main__":
    sys.argv[1:] = _argv(sys.argv[1:])
    run_hydra_main(main)
