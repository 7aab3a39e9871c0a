"""Runs users can pick up again: crash safety of the run directory, refused and accepted changes on
resume, warm starts, NaN never saved, stop signals that save first."""

from __future__ import annotations

import os
from pathlib import Path
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

import stds.run.life.loop as train_module
from stds.run.files import checkpoint as ckpt
from stds.run.setup import distributed
from stds.errors import CheckpointError, NonFiniteLossError, RunDirError
from stds.run.measure.evaluate import evaluate
from stds.results.pruned import export_run
from stds.cli.resume_arg import resume_argv
from stds.run.life.resume import changed_keys, init_from, latest_run, runs_root
from stds.run.setup.build import build_run, prepare_config
from stds.run.files.rundir import RunLock
from stds.run.life.signals import RunStopped
from stds.run.life.trainer import train
from tests.conftest import (HANG_S, REPO, TRAIN, kill_after_steps, last_weights, run_history, run_metrics,
                            run_train)

STEPS = (1797 - 360) // 64  # optimizer steps per epoch of the tiny digits run


def _same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ crash safety

@pytest.mark.slow
def test_kill_while_best_is_written_leaves_a_best_checkpoint_after_resume(tiny_cfg, tmp_path, monkeypatch):
    cfg = ("epochs=2", "sparse=identity", "scheduler=constant", "flat_width=0")  # top-1 0.10, then 0.97
    real = ckpt.save_atomic

    def killed_at_second_best(state, path):
        if path.name == ckpt.BEST and state["epoch"] == 2:
            raise KeyboardInterrupt("killed while writing best.pt")
        return real(state, path)

    monkeypatch.setattr(ckpt, "save_atomic", killed_at_second_best)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(*cfg), tmp_path / "run")
    # last.pt holds epoch 2 as trained but not evaluated: the epoch whose best.pt was lost is
    # evaluated again on resume, which writes best.pt
    state = ckpt.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["epoch"] == 2 and state["pending_eval"] is not None
    monkeypatch.undo()
    train(tiny_cfg(*cfg), tmp_path / "run")
    metrics = run_metrics(tmp_path / "run")
    best = ckpt.load(tmp_path / "run" / "checkpoints" / "best.pt")
    assert best["epoch"] == metrics["best_epoch"]
    assert best["last_record"]["test_acc1"] == metrics["best_test_acc1"]


@pytest.mark.slow
def test_stale_temporaries_are_removed_when_a_run_starts(tiny_cfg, tmp_path):
    (tmp_path / "checkpoints").mkdir(parents=True)
    stale = [tmp_path / "checkpoints" / ".last.pt.x1y2.tmp", tmp_path / "checkpoints" / ".best.pt.abc.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    train(tiny_cfg("epochs=1"), tmp_path)
    assert not any(path.exists() for path in stale)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


@pytest.mark.slow
def test_a_second_process_on_the_same_run_directory_is_refused(tiny_cfg, tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunDirError, match=f"in use by process {os.getpid()}"):
            train(tiny_cfg("epochs=1"), tmp_path)
    assert not (tmp_path / "error.txt").exists()  # the holder's directory is not marked failed
    assert not (tmp_path / "checkpoints" / "last.pt").exists()


# ------------------------------------------------------------------ what may change on resume

@pytest.mark.parametrize("override, key", [
    ("epochs=3", "epochs"), ("batch_size=32", "batch_size"), ("lr=0.01", "lr"), ("seed=1", "seed"),
    ("flat_width=0.2", "flat_width"), ("amp=bf16", "amp"), ("T=2", "T"),
])
@pytest.mark.slow
def test_a_resume_that_changes_the_experiment_is_refused_naming_the_key(tiny_cfg, tmp_path, override, key):
    train(tiny_cfg("epochs=1", "flat_width=0.1"), tmp_path)
    before = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(CheckpointError, match=rf"other values of (.*, )?{key} \(\S+, now \S+\)") as info:
        train(tiny_cfg("epochs=1", "flat_width=0.1", override), tmp_path)
    assert "\n" not in str(info.value)
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == before


@pytest.mark.slow
def test_safe_keys_may_change_on_resume(tiny_cfg, tmp_path):
    train(tiny_cfg("epochs=1"), tmp_path)
    train(tiny_cfg("epochs=1", "logging.log_every_steps=3", "checkpoint_every_steps=5",
                   "loader.eval_batch_size=100", "deterministic=false"), tmp_path)
    assert run_metrics(tmp_path)["epoch"] == 1


def test_changed_keys_lists_only_unsafe_differences():
    saved = {"lr": 0.1, "epochs": 3, "logging": {"log_every_steps": 5}, "dataset": {"root": "/a", "name": "x"}}
    current = {"lr": 0.2, "epochs": 3, "logging": {"log_every_steps": 9}, "dataset": {"root": "/b", "name": "y"},
               "new_key": 1}
    assert changed_keys(saved, current) == [("dataset.name", "x", "y"), ("lr", 0.1, 0.2)]


@pytest.mark.slow
def test_refused_resume_leaves_the_saved_config_as_it_was(tmp_path):
    run_dir = tmp_path / "run"
    first = run_train("dataset=digits", "epochs=1", "batch_size=64", "flat_width=0.05",
                      "logging.synops=false", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr[-2000:]
    saved = {name: (run_dir / ".hydra" / name).read_text() for name in ("config.yaml", "overrides.yaml")}
    refused = run_train("dataset=digits", "epochs=1", "batch_size=64", "flat_width=0.1",
                        "logging.synops=false", f"hydra.run.dir={run_dir}")
    assert refused.returncode == 1
    error_lines = [line for line in refused.stderr.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1 and "flat_width (0.05, now 0.1)" in error_lines[0]
    assert {name: (run_dir / ".hydra" / name).read_text() for name in saved} == saved
    assert yaml.safe_load(saved["config.yaml"])["flat_width"] == 0.05


# ------------------------------------------------------------------ resume= and resume=last

def test_resume_argv_points_hydra_at_the_run_and_takes_nothing_from_its_files(tmp_path, monkeypatch):
    run_dir = tmp_path / "outputs" / "runs" / "2026-01-01" / "10-00-00"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"x")
    (run_dir / ".hydra").mkdir()
    # a planted override must never reach the command line Hydra parses
    (run_dir / ".hydra" / "overrides.yaml").write_text(
        "- experiment=cifar10_stds\n- +hydra.callbacks.x._target_=os.system\n")
    monkeypatch.chdir(tmp_path)
    argv = resume_argv([f"resume={run_dir}", "epochs=6", "hydra.run.dir=elsewhere"])
    assert argv == ["epochs=6", f"hydra.run.dir={run_dir}", f"resume={run_dir}"]
    assert resume_argv(["epochs=6"]) == ["epochs=6"]
    with pytest.raises(CheckpointError, match="resume=nowhere"):
        resume_argv(["resume=nowhere"])
    with pytest.raises(CheckpointError, match="drop -m"):
        resume_argv(["-m", "resume=last"])


@pytest.mark.parametrize("pattern, root", [
    (None, "outputs/runs"),
    ("outputs/runs/${now:%Y-%m-%d}/${now:%H-%M-%S}", "outputs/runs"),
    ("/scratch/runs/${now:%H-%M-%S}", "/scratch/runs"),
    ("/scratch/me/run1", "/scratch/me/run1"),
    ("${oc.env:SCRATCH}/runs", "."),
])
def test_runs_root_is_the_fixed_part_of_the_run_dir(pattern, root):
    assert runs_root(pattern) == Path(root)


def test_the_runs_root_default_is_the_fixed_part_of_train_yaml():
    pattern = yaml.safe_load((REPO / "conf" / "train.yaml").read_text())["hydra"]["run"]["dir"]
    assert runs_root(pattern) == runs_root(None)


def test_resume_last_picks_the_newest_run_of_the_same_experiment(tmp_path):
    root = tmp_path / "runs"
    made = {}
    for name, experiment, age in [("a", "cifar10_stds", 30), ("b", "cifar10_stds", 10), ("c", None, 5),
                                  ("d", "cifar10_dense", 1)]:
        run_dir = root / name
        (run_dir / "checkpoints").mkdir(parents=True)
        last = run_dir / "checkpoints" / "last.pt"
        last.write_bytes(b"x")
        stamp = time.time() - age
        os.utime(last, (stamp, stamp))
        (run_dir / ".hydra").mkdir()
        lines = [f"- experiment={experiment}\n"] if experiment else []
        (run_dir / ".hydra" / "overrides.yaml").write_text("".join(lines) + "- epochs=2\n")
        made[name] = run_dir
    assert latest_run(root, "cifar10_stds") == made["b"]
    assert latest_run(root, None) == made["c"]
    with pytest.raises(CheckpointError, match="no run of experiment=imagenet_stds"):
        latest_run(root, "imagenet_stds")


@pytest.mark.slow
def test_sigterm_saves_then_resume_last_finishes_bit_identical(tmp_path):
    """A cluster user's scratch run directory: ``resume=last`` with the same ``hydra.run.dir``
    override finds the newest run under its fixed part and continues it there."""
    args = ("dataset=digits", "epochs=3", "batch_size=64", "flat_width=0.1", "logging.synops=false")
    whole = tmp_path / "whole"
    assert run_train(*args, f"hydra.run.dir={whole}").returncode == 0
    work = tmp_path / "work"
    work.mkdir()
    scratch = f"hydra.run.dir={tmp_path}/scratch/runs/${{now:%H-%M-%S}}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.Popen([sys.executable, str(TRAIN), *args, scratch], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + HANG_S
    while not list(tmp_path.glob("scratch/runs/*/metrics.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # into the second epoch
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=HANG_S)
    (run_dir,) = [p.parent for p in tmp_path.glob("scratch/runs/*/checkpoints")]
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert not (run_dir / "metrics.json").exists(), "the run finished before the signal"
    stopped = [line for line in stderr.splitlines() if line.startswith("stopped by SIGTERM")]
    assert len(stopped) == 1 and f"resume={run_dir}" in stopped[0]
    state = ckpt.load(run_dir / "checkpoints" / "last.pt")
    assert state["step"] > STEPS  # saved in the second epoch, not only at the end of the first
    resumed = run_train("resume=last", scratch, cwd=work)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert len(list(tmp_path.glob("scratch/runs/*"))) == 1  # continued in its own directory
    assert not (work / "outputs").exists()
    where = stopped[0].split(" in ", 1)[1].split(";")[0]  # "epoch 2/3, step N": one numbering
    assert f"resumed from {run_dir / 'checkpoints' / 'last.pt'} in {where}" in resumed.stdout + resumed.stderr
    assert _same_weights(last_weights(run_dir), last_weights(whole))
    keep = ("test_acc1", "best_test_acc1", "sparsity", "step", "epoch", "d")
    assert {k: run_metrics(run_dir)[k] for k in keep} == {k: run_metrics(whole)[k] for k in keep}
    assert [r["step"] for r in run_history(run_dir)] == [STEPS, 2 * STEPS, 3 * STEPS]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_finishes_the_step_and_saves(tiny_cfg, tmp_path, monkeypatch, signum):
    real = train_module.train_step
    calls = {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        result = real(*args, **kwargs)
        if calls["n"] == 30:
            signal.raise_signal(signum)  # arrives during step 30
        return result

    monkeypatch.setattr(train_module, "train_step", step)
    with pytest.raises(RunStopped, match=f"stopped by {signal.Signals(signum).name} in epoch 2/2, step 30"):
        train(tiny_cfg("epochs=2"), tmp_path)
    state = ckpt.load(tmp_path / "checkpoints" / "last.pt")
    assert (state["step"], state["batch_in_epoch"]) == (30, 30 - STEPS)
    assert not (tmp_path / "error.txt").exists()
    assert signal.getsignal(signum) is not None  # handlers restored after the run


# ------------------------------------------------------------------ NaN never saved

@pytest.mark.parametrize("overrides", [
    ("loss=mse", "lr=1e20", "flat_width=0.05", "checkpoint_every_steps=7"),
    ("loss=ce", "lr=1e30", "flat_width=0.05"),
])
@pytest.mark.slow
def test_a_non_finite_state_never_reaches_a_checkpoint(tiny_cfg, tmp_path, overrides):
    with pytest.raises(NonFiniteLossError, match="NaN or inf"):
        train(tiny_cfg("epochs=2", *overrides), tmp_path)
    last = tmp_path / "checkpoints" / "last.pt"
    if last.exists():
        state = ckpt.load(last)
        tensors = list(state["model"].values()) + [
            v for s in state["optimizer"]["state"].values() for v in s.values() if torch.is_tensor(v)]
        assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())
    assert "NaN or inf" in (tmp_path / "error.txt").read_text()
    assert not (tmp_path / "metrics.json").exists()


# ------------------------------------------------------------------ warm starts

def _evaluate_fresh(cfg, run_dir, source=None):
    cfg = prepare_config(cfg)
    run = build_run(cfg, distributed.setup("cpu"), run_dir)
    if source is not None:
        init_from(run, str(source))
    return evaluate(run)["test_acc1"]


@pytest.mark.slow
@pytest.mark.parametrize("form", ["checkpoint", "pruned.pt"])
def test_init_from_a_dense_run_starts_at_its_accuracy(tiny_cfg, tmp_path, form):
    dense = tmp_path / "dense"
    accuracy = train(tiny_cfg("epochs=2", "sparse=identity", "scheduler=constant", "flat_width=0"), dense)
    source = dense / "checkpoints" / "last.pt" if form == "checkpoint" else export_run(dense, verbose=False)
    # a constant threshold D > 0: theta = sign(w)(|w| + D), so w (and the accuracy) is kept
    stds_cfg = tiny_cfg("scheduler=constant", "flat_width=0.05")
    assert _evaluate_fresh(stds_cfg, tmp_path / "cold") < accuracy - 0.2
    assert _evaluate_fresh(stds_cfg, tmp_path / "warm", source) == pytest.approx(accuracy, abs=2e-3)


@pytest.mark.slow
def test_init_from_run_through_train_and_a_bad_source(tiny_cfg, tmp_path):
    dense = tmp_path / "dense"
    accuracy = train(tiny_cfg("epochs=2", "sparse=identity", "scheduler=constant", "flat_width=0"), dense)
    source = dense / "checkpoints" / "last.pt"
    train(tiny_cfg("epochs=1", "scheduler=constant", "flat_width=0.05", f"init_from={source}"), tmp_path / "warm")
    assert run_history(tmp_path / "warm")[0]["test_acc1"] > accuracy - 0.1
    with pytest.raises(CheckpointError, match="init_from=.*does not fit"):
        train(tiny_cfg("epochs=1", "model.channels=[8,16,16]", f"init_from={source}"), tmp_path / "bad")
    with pytest.raises(CheckpointError, match="init_from=.*does not exist"):
        train(tiny_cfg("epochs=1", f"init_from={tmp_path / 'none.pt'}"), tmp_path / "none")


# ------------------------------------------------------------------ torchrun: one run, one directory

@pytest.mark.slow
def test_torchrun_makes_one_run_directory(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with socket_port() as port:
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
             str(TRAIN), "epochs=1", "batch_size=64", "device=cpu", "logging.synops=false"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_S,
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [p for p in tmp_path.glob("outputs/runs/*/*") if p.is_dir()]
    assert len(runs) == 1, runs
    assert run_metrics(runs[0])["world_size"] == 2
    assert (runs[0] / ".hydra" / "config.yaml").exists()


class socket_port:
    """A free TCP port for torchrun's rendezvous."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.slow
def test_throughput_after_a_mid_epoch_resume_counts_only_this_process(tiny_cfg, tmp_path, monkeypatch):
    """Resumed after 5 of the epoch's 22 batches: the epoch's images/s is the 17 batches this
    process trained over the time it trained them (rate × train time = 17 × 64 images)."""
    kill_after_steps(monkeypatch, STEPS + 5)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg("flat_width=0.05", "checkpoint_every_steps=1"), tmp_path)
    monkeypatch.undo()
    assert ckpt.load(tmp_path / "checkpoints" / "last.pt")["batch_in_epoch"] == 5
    train(tiny_cfg("flat_width=0.05", "checkpoint_every_steps=1"), tmp_path)
    record = run_history(tmp_path)[-1]
    train_s = record["epoch_time_s"] - record["eval_time_s"]
    assert record["epoch"] == 2
    assert record["train_images_per_s"] * train_s == pytest.approx((STEPS - 5) * 64, rel=1e-6)


@pytest.mark.slow
def test_train_with_resume_in_the_config_continues_that_run(tiny_cfg, tmp_path, monkeypatch, caplog):
    """The library resumes from ``cfg.resume`` (no command line involved): the run continues in
    its own directory, ``run_dir`` given or not, and ends as an uninterrupted run."""
    args = ("flat_width=0.1", "checkpoint_every_steps=1")
    train(tiny_cfg(*args), tmp_path / "whole")
    kill_after_steps(monkeypatch, STEPS + 3)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(*args), tmp_path / "run")
    monkeypatch.undo()
    with caplog.at_level("INFO"):
        train(tiny_cfg(*args, f"resume={tmp_path / 'run'}"), tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists()
    assert f"in epoch 2/2, step {STEPS + 3}" in caplog.text
    assert _same_weights(last_weights(tmp_path / "run"), last_weights(tmp_path / "whole"))
    assert [r["step"] for r in run_history(tmp_path / "run")] == [STEPS, 2 * STEPS]
    caplog.clear()
    with caplog.at_level("INFO"):  # finished: says so, and how to train on
        train(tiny_cfg(*args, f"resume={tmp_path / 'run'}"))
    assert "already finished its 2 epochs" in caplog.text and "init_from=" in caplog.text


def test_resume_refuses_a_checkpoint_whose_config_was_planted(tiny_cfg, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    state = {"format_version": ckpt.FORMAT_VERSION, "model": {},
             "config": {"dataset": {"root": "${oc.env:HOME}"}}}
    ckpt.save_atomic(state, tmp_path / "checkpoints" / "last.pt")
    with pytest.raises(CheckpointError, match=r"last.pt: config key dataset.root holds an interpolation"):
        train(tiny_cfg(f"resume={tmp_path}"), tmp_path / "other")


@pytest.mark.slow
def test_a_resume_error_is_printed_once(tmp_path):
    proc = run_train("resume=nowhere", cwd=tmp_path)
    assert proc.returncode == 1
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "resume=nowhere" in line]
    assert len(lines) == 1 and lines[0].startswith("Error: resume=nowhere: "), lines
    assert not (tmp_path / "outputs").exists()  # no run directory for a run that never started
