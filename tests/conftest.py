"""Shared fixtures: compose the real config, shrink it, send outputs to tmp_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
TRAIN = REPO / "launch" / "train.py"

HANG_S = 1800
"""Subprocess time limit: only a hang guard (a loaded 2-core machine runs a test many times slower;
pytest-timeout's per-test limit in pyproject.toml is the same)."""

# a short run on the embedded digits: seconds on 2 CPU cores
TINY = ("dataset=digits", "epochs=2", "batch_size=64", "logging.log_every_steps=5", "logging.synops=false")


def compose_train(*overrides: str, hydra: bool = False) -> DictConfig:
    """``conf/train.yaml`` composed with ``overrides`` (and the ``hydra`` node if asked)."""
    from stds.run.setup.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra)


def user_env(env: dict | None = None) -> dict:
    """This environment as a user's shell has it (no ``HYDRA_FULL_ERROR``, unbuffered output), plus ``env``."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return full_env


def run_train(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: int = HANG_S):
    """``python launch/train.py ARGS`` as a user runs it; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, str(TRAIN), *args],
        cwd=cwd, env=user_env(env), capture_output=True, text=True, timeout=timeout,
    )


def at_once(*commands: list[str], cwd: Path = REPO, env: dict | None = None,
            timeout: int = HANG_S) -> list[subprocess.CompletedProcess]:
    """Independent commands started together, their CompletedProcesses in the order given: each is a
    fresh Python that spends seconds importing, and the test process would leave the second core idle."""
    full_env = user_env(env)
    procs = [subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for cmd in commands]
    done = []
    try:
        for cmd, proc in zip(commands, procs):
            out, err = proc.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


def run_metrics(run_dir: Path) -> dict:
    """A finished run's final figures (``metrics.json``)."""
    path = run_dir / "metrics.json"
    assert path.is_file(), f"{run_dir} has no metrics.json: {sorted(p.name for p in run_dir.iterdir())}" \
        if run_dir.is_dir() else f"{run_dir} does not exist"
    return json.loads(path.read_text())


def run_history(run_dir: Path) -> list[dict]:
    """A run's records (``metrics.jsonl``), one per line."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def last_weights(run_dir: Path) -> dict:
    """The model weights of a run's ``checkpoints/last.pt``."""
    from stds.run.files import checkpoint

    return checkpoint.load(run_dir / "checkpoints" / checkpoint.LAST)["model"]


@pytest.fixture
def tiny_cfg():
    """A composed config for a run of a few seconds (extra overrides appended)."""
    return lambda *overrides: compose_train(*TINY, *overrides)


def kill_after_steps(monkeypatch, steps: int) -> None:
    """Make the loop's training step raise KeyboardInterrupt (as a kill would) once ``steps``
    optimizer steps have run; ``monkeypatch.undo()`` restores it."""
    import stds.run.life.loop as loop_module

    real = loop_module.train_step
    calls = {"n": 0}

    def step_or_die(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > steps:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop_module, "train_step", step_or_die)


def whole_and_split(cfg, tmp_path: Path, monkeypatch, kill_after: int) -> tuple[dict, dict]:
    """``cfg`` trained uninterrupted (``tmp_path/whole``) and killed after ``kill_after`` optimizer
    steps then run again (``tmp_path/split``); the two final ``last.pt`` states, whole first, with
    every weight of the model checked equal."""
    import torch

    from stds.run.life.trainer import train

    train(cfg, tmp_path / "whole")
    kill_after_steps(monkeypatch, kill_after)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "split")
    monkeypatch.undo()
    train(cfg, tmp_path / "split")
    whole, split = (torch.load(tmp_path / run / "checkpoints" / "last.pt", weights_only=True)
                    for run in ("whole", "split"))
    for key, value in whole["model"].items():
        assert torch.equal(split["model"][key], value), key
    return whole, split


def model_d(model) -> float:
    """The one threshold d that every reparameterization of ``model`` holds (read from its buffers)."""
    from stds.method.sparse import reparams

    values = {float(reparam.d) for reparam in reparams(model)}
    assert len(values) == 1, f"the pruned layers hold different thresholds: {sorted(values)}"
    return values.pop()


def ddp_sgd_steps(ddp, inputs, schedule, steps: int = 6, lr: float = 0.5) -> list[float]:
    """``steps`` plain SGD steps of the DDP model ``ddp`` on ``inputs`` (DDP averages the gradients
    over the ranks), ``schedule.step`` after each; the values it returned. SGD by hand: a
    torch.optim import costs seconds in each spawned process."""
    import torch

    values = []
    for step in range(1, steps + 1):
        ddp.zero_grad()
        ddp(inputs).pow(2).mean().backward()
        with torch.no_grad():
            for parameter in ddp.parameters():
                parameter -= lr * parameter.grad
        values.append(schedule.step(step))
    return values
