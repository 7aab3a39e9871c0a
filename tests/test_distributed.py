"""Process set-up: which ranks and addresses a SLURM task, torchrun or a plain process gets."""

import pytest
import torch

from stds.run.setup import distributed
from stds.errors import ConfigError

SLURM_TASK = {
    "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4711", "SLURM_ARRAY_JOB_ID": "4700",
    "SLURM_ARRAY_TASK_ID": "3", "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1",
    "SLURM_PROCID": "13", "SLURM_LOCALID": "5", "SLURM_JOB_NODELIST": "gpu[07-08]",
}
TORCH_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


@pytest.fixture
def clean_env(monkeypatch):
    for name in TORCH_VARS + tuple(SLURM_TASK):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_slurm_task_of_a_two_node_array_job(clean_env):
    for name, value in SLURM_TASK.items():
        clean_env.setenv(name, value)
    env_vars = distributed._submitit_env()
    assert env_vars == {
        "MASTER_ADDR": "gpu07", "MASTER_PORT": str(distributed.port_for_job("4700_3")),
        "RANK": "13", "WORLD_SIZE": "16", "LOCAL_RANK": "5",
    }


def test_port_is_per_array_task_and_stable_across_requeues():
    ports = {distributed.port_for_job(f"4700_{task}") for task in range(8)}
    assert len(ports) == 8 and all(20000 <= p <= 60000 for p in ports)
    assert distributed.port_for_job("4700_3") == distributed.port_for_job("4700_3")


def test_single_task_job_and_plain_process_are_single_process(clean_env):
    assert distributed._submitit_env() is None
    clean_env.setenv("SUBMITIT_EXECUTOR", "slurm")
    clean_env.setenv("SLURM_JOB_ID", "12")
    clean_env.setenv("SLURM_NTASKS", "1")
    assert distributed._submitit_env() is None
    env = distributed.setup("cpu")
    assert (env.rank, env.world_size, env.is_main, env.distributed) == (0, 1, True, False)
    assert env.device == torch.device("cpu")


def test_device_choice(clean_env):
    with pytest.raises(ConfigError, match="device"):
        distributed.setup("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device=cuda"):
            distributed.setup("cuda")
        assert distributed.setup("auto").device.type == "cpu"


def test_teardown_destroys_the_group_and_is_a_no_op_without_one(tmp_path):
    import torch.distributed as dist

    env = distributed.DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    distributed.teardown(env)  # nothing set up: nothing to do
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    distributed.teardown(env)
    assert not dist.is_initialized()
