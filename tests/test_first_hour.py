"""What a new user meets in the first hour: a run that says where it writes and how it ended,
best.pt at the run's final sparsity, warnings about slow CPU settings, compilation that says it is
compiling, progress inside every epoch, and no leftovers (no run directory for a config error,
no stale lock, no empty ``.submitit/%j``)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import stds.run.setup.build as build_module
from stds.cli.callbacks import remove_empty_pattern_folders
from stds.results.pruned import export_run
from stds.run.files import checkpoint as ckpt
from stds.run.life.loop import bar_description
from stds.run.life.trainer import train
from stds.run.measure.metrics import BEST_RULE, at_final_sparsity, best_of, replaces_best

from tests.conftest import HANG_S, REPO, TRAIN, run_history, run_metrics, user_env

STEPS = (1797 - 360) // 64  # training batches of the tiny digits run per epoch (22)


class _Lines(logging.Handler):
    """The messages of the ``stds`` loggers, as the terminal and train.log get them."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _train_logged(cfg, run_dir: Path) -> list[str]:
    handler, logger = _Lines(), logging.getLogger("stds")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        train(cfg, run_dir)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return handler.lines


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run (2 epochs of 22 steps, log interval 50 > the epoch): its directory and log."""
    from tests.conftest import TINY, compose_train

    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose_train(*TINY, "flat_width=0.05", "logging.log_every_steps=50")
    return run_dir, _train_logged(cfg, run_dir)


# ---------------------------------------------------------------- 2: where the outputs are


def test_run_directory_is_printed_at_the_start_and_a_summary_at_the_end(tiny_run):
    run_dir, lines = tiny_run
    where = run_dir.resolve()
    assert lines.index(f"run directory: {where} (train.log, metrics.json, checkpoints/, tb/)") < \
        min(i for i, line in enumerate(lines) if line.startswith("epoch 1/2"))
    metrics = run_metrics(run_dir)
    end = lines[-3:]
    assert end[0] == (f"finished 2/2 epochs: test_acc1 {metrics['test_acc1']:.4f} at sparsity "
                      f"{metrics['sparsity']:.4f}; best.pt: test_acc1 {metrics['best_test_acc1']:.4f} at epoch "
                      f"{metrics['best_epoch']} (sparsity {metrics['best_sparsity']:.4f}; the most accurate "
                      "epoch at the final sparsity, docs/metrics.md)")
    assert end[1] == (f"files: {where / 'metrics.json'}, metrics.jsonl, checkpoints/last.pt and best.pt, tb/ "
                      f"(tensorboard --logdir {where})")
    assert end[2] == (f"next: python launch/export.py {where} writes pruned.pt (--which best: from best.pt); "
                      f"python launch/train.py init_from={where / 'checkpoints' / 'last.pt'} starts a new run "
                      "from these weights")
    assert (where / "metrics.json").is_file() and (where / "checkpoints" / "last.pt").is_file()


# ---------------------------------------------------------------- 3: best.pt at the final sparsity


def test_best_is_the_most_accurate_epoch_within_five_percent_of_the_final_connectivity():
    # final sparsity 0.90 (connectivity 0.10): epochs with connectivity up to 0.105 count
    assert at_final_sparsity(0.895, 0.90) and at_final_sparsity(0.95, 0.90)
    assert not at_final_sparsity(0.894, 0.90)
    assert at_final_sparsity(0.0, 0.0)  # a dense run: every epoch counts
    history = [{"epoch": 1, "test_acc1": 0.97, "sparsity": 0.675},  # the most accurate, but dense
               {"epoch": 2, "test_acc1": 0.93, "sparsity": 0.896},
               {"epoch": 3, "test_acc1": 0.92, "sparsity": 0.90}]
    assert best_of(history)["epoch"] == 2  # 0.104 <= 0.105: at the final sparsity, and more accurate
    history[1]["sparsity"] = 0.89  # 0.11 > 0.105: too dense now
    assert best_of(history)["epoch"] == 3
    assert best_of([{**r, "sparsity": 0.0} for r in history])["epoch"] == 1  # dense: the most accurate
    assert replaces_best(0.5, 0.9, -1.0, 0.0)  # no best yet
    assert not replaces_best(0.5, 0.9, 0.6, 0.9) and replaces_best(0.7, 0.9, 0.6, 0.9)


def test_best_pt_metrics_json_and_export_agree_on_the_rule(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    metrics, history = run_metrics(run_dir), run_history(run_dir)
    chosen = best_of(history)
    assert metrics["best_rule"] == BEST_RULE
    assert (metrics["best_epoch"], metrics["best_test_acc1"], metrics["best_sparsity"]) == (
        chosen["epoch"], chosen["test_acc1"], chosen["sparsity"])
    assert at_final_sparsity(metrics["best_sparsity"], history[-1]["sparsity"])
    best = ckpt.load(run_dir / "checkpoints" / "best.pt")
    assert (best["epoch"], best["best_sparsity"]) == (metrics["best_epoch"], metrics["best_sparsity"])
    assert best["last_record"]["sparsity"] == metrics["best_sparsity"]
    exported = torch.load(export_run(run_dir, which="best", out=tmp_path / "best.pt", verbose=False),
                          weights_only=True)
    assert exported["source"]["epoch"] == metrics["best_epoch"]
    assert exported["sparsity"]["total"] == pytest.approx(metrics["best_sparsity"])


def test_docs_name_the_rule():
    text = (REPO / "docs" / "metrics.md").read_text()
    assert "`best_sparsity`" in text and "`best_rule`" in text and "within 5%" in text


# ---------------------------------------------------------------- 7: no stale lock


def test_a_finished_run_keeps_no_lock_file(tiny_run):
    run_dir, _ = tiny_run
    assert not (run_dir / ".lock").exists()
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".hydra", "checkpoints", "metrics.json", "metrics.jsonl", "tb"]


# ---------------------------------------------------------------- 8: progress


def test_an_epoch_shorter_than_the_log_interval_still_reports_while_it_runs(tiny_run):
    _, lines = tiny_run
    steps = [int(m.group(1)) for m in (re.search(r"^epoch \d/2 step (\d+)/44 ", l) for l in lines) if m]
    assert steps == [11, 22, 33, 44]  # log_every_steps=50 > 22 steps: every half epoch
    assert all("ETA epoch" in l and " run " in l for l in lines if re.match(r"^epoch \d/2 step", l))


def test_the_run_eta_is_at_the_front_of_the_progress_bar_in_a_120_column_terminal():
    from tqdm import tqdm

    out = io.StringIO()
    bar = tqdm(total=1563, file=out, ncols=120, desc=bar_description(3, 320, 123456.0), mininterval=0)
    bar.set_postfix_str("loss 1.2345 | 2345 img/s 109.2 ms/step data 3% | ETA epoch 0:02:50 run 34:17:36")
    bar.update(700)
    shown = out.getvalue().split("\r")[-1]
    assert len(shown) <= 120 and shown.startswith("epoch 3/320 ETA run 34:17:36")
    assert bar_description(1, 30, None) == "epoch 1/30"  # before the first report


# ---------------------------------------------------------------- 4, 5: slow CPU settings


def test_amp_on_a_cpu_warns_once_and_compile_says_it_is_compiling(tiny_cfg, tmp_path, monkeypatch):
    # torch.compile and autocast are replaced (a real compile takes minutes on this CPU, bf16 is
    # slow there): the lines around the first step are what is tested; tests/test_gpu_speed.py and
    # tests/test_train.py compile and autocast for real
    monkeypatch.setattr(build_module, "maybe_compile", lambda model, compile: model)
    monkeypatch.setattr(build_module.Run, "autocast", lambda self: contextlib.nullcontext())
    lines = _train_logged(tiny_cfg("epochs=1", "amp=fp16", "compile=true", "flat_width=0.05"), tmp_path)
    amp = [l for l in lines if l.startswith("amp=")]
    assert amp == ["amp=fp16 on a CPU: autocast runs as bf16 there, usually slower than amp=false "
                   "(benchmarks/amp_cpu.py compares the two on this machine); set amp=false on a CPU"]
    compiling = [i for i, l in enumerate(lines) if l.startswith("compile=true: torch.compile is compiling")]
    done = [l for l in lines if re.fullmatch(r"compile=true: compiled and ran the first step in \d+\.\d s", l)]
    first_step = min(i for i, l in enumerate(lines) if l.startswith("epoch 1/1 step"))
    assert len(compiling) == 1 and compiling[0] < first_step and len(done) == 1


def test_no_amp_or_compile_lines_without_them(tiny_run):
    _, lines = tiny_run
    assert not [l for l in lines if l.startswith(("amp=", "compile=true"))]


# ---------------------------------------------------------------- 7: nothing left of a config error


@pytest.fixture(scope="module")
def fresh_commands(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Two commands of a user's first minutes, each in its own folder, run at once: a config error
    beside an older run, and ``--help`` into a pipe whose reader has left (``--help | head``)."""
    error_dir, help_dir = tmp_path_factory.mktemp("config_error"), tmp_path_factory.mktemp("help_pipe")
    (error_dir / "outputs" / "runs" / "older").mkdir(parents=True)  # a previous run stays
    env = user_env()
    read_end, write_end = os.pipe()
    os.close(read_end)  # `--help | head` once head has left
    error = subprocess.Popen([sys.executable, str(TRAIN), "flat_width=-1"], cwd=error_dir, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    help_ = subprocess.Popen([sys.executable, str(TRAIN), "--help"], stdout=write_end, stderr=subprocess.PIPE,
                             cwd=help_dir, env=env, text=True)
    os.close(write_end)
    done = {}
    for name, folder, proc in (("error", error_dir, error), ("help", help_dir, help_)):
        out, err = proc.communicate(timeout=HANG_S)
        done[name] = (folder, subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def test_config_error_prints_once_and_leaves_no_run_directory(fresh_commands):
    tmp_path, proc = fresh_commands["error"]
    assert proc.returncode == 1
    message = "flat_width=-1.0 must be >= 0; set flat_width=<value> with value >= 0"
    assert (proc.stdout + proc.stderr).count(message) == 1, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"Error: {message}"
    assert [str(p.relative_to(tmp_path)) for p in (tmp_path / "outputs").rglob("*")] == [
        "outputs/runs", "outputs/runs/older"]


def test_config_error_in_process_removes_what_it_wrote(tiny_cfg, tmp_path):
    from stds.errors import ConfigError

    with pytest.raises(ConfigError, match="T=0"):
        train(tiny_cfg("T=0"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_empty_submitit_pattern_folders_are_removed(tmp_path):
    folder = tmp_path / ".submitit"
    for name in ("%j", "%A_%a", "123", "456"):
        (folder / name).mkdir(parents=True)
    (folder / "123" / "123_0_log.out").write_text("x")
    (folder / "456" / "%j").mkdir()  # only the folder's own children are looked at
    assert [p.name for p in remove_empty_pattern_folders(folder)] == ["%A_%a", "%j"]
    assert sorted(p.name for p in folder.iterdir()) == ["123", "456"]
    assert remove_empty_pattern_folders(tmp_path / "missing") == []


def test_sweep_progress_reads_the_loops_own_log_lines(tiny_run, tmp_path):
    from stds.cli.launcher import point_progress

    _, lines = tiny_run
    log_file = tmp_path / "train.log"
    log_file.write_text("".join(f"[2026-01-01 10:00:00,000][stds.run.life.loop][INFO] - {l}\n" for l in lines))
    last_epoch = [l for l in lines if l.startswith("epoch 2/2: ")][-1]
    acc, sparsity = re.search(r"test_acc1 (\S+) .*sparsity (\S+)", last_epoch).groups()
    eta = re.search(r"run (\S+)$", [l for l in lines if l.startswith("epoch 2/2 step 44/44")][-1]).group(1)
    assert point_progress(log_file) == f"step 44/44 ETA {eta}, epoch 2/2 test_acc1 {acc} sparsity {sparsity}"


def test_config_error_keeps_a_directory_a_run_trained_in(tiny_cfg, tmp_path):
    from stds.errors import ConfigError

    run = tmp_path / "run"
    (run / "tb").mkdir(parents=True)  # a run killed in its first epoch, before any checkpoint
    (run / ".hydra").mkdir()
    with pytest.raises(ConfigError, match="T=0"):
        train(tiny_cfg("T=0"), run)
    names = sorted(p.name for p in run.iterdir())  # the older run's tb/ is set aside, not removed
    assert names[:2] == [".hydra", "error.txt"] and len(names) == 3 and names[2].startswith("previous-")
    assert (run / names[2] / "tb").is_dir()


def test_help_into_a_closed_pipe_says_nothing_about_a_run_directory(fresh_commands):
    tmp_path, proc = fresh_commands["help"]
    assert proc.returncode == 1 and proc.stderr == "", proc.stderr
    assert not (tmp_path / "outputs").exists()
