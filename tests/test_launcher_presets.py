"""The SLURM launcher presets, composed from the real config and run through the real launcher
class with submitit's executor mocked; the sbatch script is rendered by submitit's own Slurm executor.

No SLURM is needed: every test runs with the SLURM client tools hidden from PATH (so a laptop and the
CI machine, which has a local cluster, run the same thing), and the rendering executor is told that
`srun` exists, which is the only check it makes on the machine before writing the script.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from unittest import mock

import pytest
import submitit
from submitit.slurm.slurm import SlurmExecutor
from hydra.core.utils import JobReturn, JobStatus
from hydra.utils import instantiate
from omegaconf import DictConfig

from tests.conftest import compose_train

SWEEP = ["flat_width=0.1", "flat_width=0.6", "flat_width=0.8"]
SLURM_TOOLS = ("srun", "sbatch", "sinfo", "squeue", "scontrol", "scancel", "sacct")


@pytest.fixture(autouse=True)
def no_slurm_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drop every PATH directory holding a SLURM client tool: the tests must not depend on one."""
    kept = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if not any(Path(d, tool).exists() for tool in SLURM_TOOLS)]
    monkeypatch.setenv("PATH", os.pathsep.join(kept))
    assert all(shutil.which(tool) is None for tool in SLURM_TOOLS)


def _compose(tmp_path: Path, *overrides: str) -> DictConfig:
    return compose_train(f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.job.name=train", *overrides, hydra=True)


def _launch(cfg: DictConfig, sweep: list[str] = SWEEP):
    """Run the configured launcher over one job per sweep value; returns (AutoExecutor mock, returns)."""
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=mock.Mock(), task_function=mock.Mock(), config=cfg)
    with mock.patch.object(submitit, "AutoExecutor") as auto:
        executor = auto.return_value

        def map_array(fn, *columns):
            jobs = []
            for overrides in columns[0]:
                ret = JobReturn(overrides=overrides, status=JobStatus.COMPLETED, _return_value=0.5)
                jobs.append(mock.Mock(results=mock.Mock(return_value=[ret])))
            return jobs

        executor.map_array.side_effect = map_array
        returns = launcher.launch([[value] for value in sweep], initial_job_idx=0)
    return auto, returns


def _params(auto) -> dict:
    auto.return_value.update_parameters.assert_called_once()
    return auto.return_value.update_parameters.call_args.kwargs


def _sbatch(tmp_path: Path, auto) -> str:
    """The job script submitit writes for the parameters the launcher asked for."""
    init = auto.call_args.kwargs
    # SlurmExecutor refuses to be built unless `srun` is found (its `affinity`); rendering the script
    # runs nothing on a cluster, so tell it srun is there (2 is what it returns when it is).
    with mock.patch.object(SlurmExecutor, "affinity", return_value=2):
        executor = submitit.AutoExecutor(
            cluster="slurm", folder=tmp_path / "render", slurm_max_num_timeout=init["slurm_max_num_timeout"]
        )
    executor.update_parameters(**_params(auto))
    return executor._executor._make_submission_file_text("python -u job.py", "uid")


def test_slurm_default_is_one_node_with_eight_gpus_and_eight_tasks(tmp_path):
    cfg = _compose(tmp_path, "hydra/launcher=slurm")
    auto, returns = _launch(cfg)

    init = auto.call_args.kwargs
    assert init["cluster"] == "slurm"
    assert init["folder"] == f"{tmp_path / 'sweep'}/.submitit/%j"
    assert init["slurm_max_num_timeout"] == 3
    params = _params(auto)
    assert params["nodes"] == 1
    assert params["gpus_per_node"] == 8
    assert params["tasks_per_node"] == 8
    assert params["cpus_per_task"] == 8
    assert params["mem_gb"] == 256
    assert params["timeout_min"] == 1440
    assert params["slurm_signal_delay_s"] == 120
    assert params["name"] == "train"
    for key in ("partition", "account", "qos", "constraint"):
        assert params[f"slurm_{key}"] is None

    # one job per sweep point, submitted as one array, results gathered in order
    auto.return_value.map_array.assert_called_once()
    columns = auto.return_value.map_array.call_args.args[1:]
    assert list(columns[0]) == [[v] for v in SWEEP]
    assert list(columns[2]) == [0, 1, 2]  # job numbers -> sweep subdirectories 0, 1, 2
    assert [r.overrides for r in returns] == [[v] for v in SWEEP]

    script = _sbatch(tmp_path, auto)
    assert "#SBATCH --nodes=1\n" in script
    assert "#SBATCH --gpus-per-node=8\n" in script
    assert "#SBATCH --ntasks-per-node=8\n" in script
    assert "#SBATCH --cpus-per-task=8\n" in script
    assert "#SBATCH --mem=256GB\n" in script
    assert "#SBATCH --signal=USR2@120\n" in script
    assert "#SBATCH --partition" not in script and "#SBATCH --account" not in script
    assert "export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK" in script


def test_slurm_command_line_overrides_reach_the_executor(tmp_path):
    cfg = _compose(
        tmp_path,
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.nodes=2",
        "hydra.launcher.account=proj42",
        "hydra.launcher.qos=high",
        "hydra.launcher.constraint=a100",
        "hydra.launcher.timeout_min=90",
        "hydra.launcher.max_num_timeout=5",
        "hydra.launcher.signal_delay_s=300",
        "hydra.launcher.mem_gb=500",
        "hydra.launcher.cpus_per_task=12",
    )
    auto, _ = _launch(cfg)

    assert auto.call_args.kwargs["slurm_max_num_timeout"] == 5
    params = _params(auto)
    assert params["slurm_partition"] == "gpu"
    assert params["nodes"] == 2
    assert params["slurm_account"] == "proj42"
    assert params["slurm_qos"] == "high"
    assert params["slurm_constraint"] == "a100"
    assert params["timeout_min"] == 90
    assert params["slurm_signal_delay_s"] == 300
    assert params["mem_gb"] == 500
    assert params["cpus_per_task"] == 12
    # untouched keys keep the preset's values
    assert params["gpus_per_node"] == 8 and params["tasks_per_node"] == 8

    script = _sbatch(tmp_path, auto)
    for line in ("--partition=gpu", "--nodes=2", "--account=proj42", "--qos=high", "--constraint=a100",
                 "--time=90", "--signal=USR2@300", "--mem=500GB", "--cpus-per-task=12"):
        assert f"#SBATCH {line}\n" in script


def test_slurm_cpu_asks_for_one_cpu_task_and_no_gpu(tmp_path):
    cfg = _compose(tmp_path, "hydra/launcher=slurm_cpu")
    auto, _ = _launch(cfg, ["flat_width=0.2"])

    params = _params(auto)
    assert params["gpus_per_node"] is None
    assert params["tasks_per_node"] == 1
    assert params["cpus_per_task"] == 1
    assert params["mem_gb"] == 2
    assert params["nodes"] == 1
    assert auto.call_args.kwargs["slurm_max_num_timeout"] == 3  # inherited from `slurm`

    script = _sbatch(tmp_path, auto)
    assert "--gpus-per-node" not in script  # null leaves the request out; 0 would still send it
    assert "#SBATCH --ntasks-per-node=1\n" in script
    assert "#SBATCH --cpus-per-task=1\n" in script
    assert "#SBATCH --mem=2GB\n" in script


def test_slurm_cpu_with_two_tasks_for_ddp(tmp_path):
    cfg = _compose(tmp_path, "hydra/launcher=slurm_cpu", "hydra.launcher.tasks_per_node=2")
    auto, _ = _launch(cfg, ["flat_width=0.2"])
    assert _params(auto)["tasks_per_node"] == 2
    assert "#SBATCH --ntasks-per-node=2\n" in _sbatch(tmp_path, auto)


def test_gpus_zero_is_rendered_but_null_is_not(tmp_path):
    """Why the CPU preset uses null: submitit passes 0 on to sbatch as a GPU request."""
    cfg = _compose(tmp_path, "hydra/launcher=slurm_cpu", "hydra.launcher.gpus_per_node=0")
    auto, _ = _launch(cfg, ["flat_width=0.2"])
    assert "#SBATCH --gpus-per-node=0\n" in _sbatch(tmp_path, auto)


@pytest.mark.parametrize("launcher", ["submitit_local", "submitit_slurm"])
def test_plugin_presets_still_compose(tmp_path, launcher):
    cfg = _compose(tmp_path, f"hydra/launcher={launcher}")
    assert cfg.hydra.launcher._target_.endswith("LocalLauncher" if launcher == "submitit_local" else "SlurmLauncher")
    auto, returns = _launch(cfg, ["flat_width=0.2", "flat_width=0.3"])
    assert auto.call_args.kwargs["cluster"] == launcher.removeprefix("submitit_")
    assert len(returns) == 2
