"""The one training entrypoint: ``python launch/train.py [group=option ...] [key=value ...]``.

Single process, ``torchrun --nproc_per_node=N launch/train.py ...``, or ``-m`` sweeps through any
Hydra launcher (``hydra/launcher=submitit_local``, ``slurm``, ``slurm_cpu``). The work is in
`stds.train.train`; this file only wires Hydra to it.
"""

import hydra
from omegaconf import DictConfig

from stds.cli import report_errors, run_hydra_main
from stds.config import register_configs
from stds.train import train

register_configs()


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Train one run in Hydra's output directory; returns the final test top-1 accuracy."""
    return report_errors(lambda: train(cfg))


if __name__ == "__main__":
    run_hydra_main(main)
