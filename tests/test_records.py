"""No record lost, no traceback where a line belongs: the checkpoint comes before the evaluation,
a record the checkpoint holds is written back on resume, a run directory that cannot be written
is one line naming it (TensorBoard's writer thread included), and resuming stays bit-identical."""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest
import torch
from tensorboard.summary.writer import record_writer

import stds.run.life.epoch as epoch_module
import stds.run.life.loop as loop_module
from tests.conftest import HANG_S, REPO, last_weights, run_history, run_metrics
from stds.errors import RunDirError
from stds.run.files import checkpoint as ckpt
from stds.run.life.trainer import train
from stds.run.measure.metrics import MetricsWriter


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


KEEP = ("epoch", "step", "test_acc1", "test_loss", "sparsity", "d", "train_loss", "lr")


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """An uninterrupted 2-epoch digits run to compare resumed runs with."""
    from tests.conftest import TINY, compose_train

    run_dir = tmp_path_factory.mktemp("whole")
    train(compose_train(*TINY), run_dir)
    return run_dir


@pytest.mark.slow
def test_an_evaluation_that_fails_once_loses_no_training(tiny_cfg, tmp_path, monkeypatch, whole):
    real, calls = epoch_module.evaluate, []

    def fails_at_the_second(run):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("evaluation died")
        return real(run)

    monkeypatch.setattr(epoch_module, "evaluate", fails_at_the_second)
    with pytest.raises(RuntimeError, match="evaluation died"):
        train(tiny_cfg(), tmp_path)
    state = ckpt.load(tmp_path / "checkpoints" / "last.pt")
    assert state["epoch"] == 2 and state["pending_eval"]["train_loss"] > 0  # epoch 2 trained and saved
    assert [r["epoch"] for r in run_history(tmp_path)] == [1]
    monkeypatch.setattr(loop_module, "train_step", lambda *a, **k: pytest.fail("trained again"))
    train(tiny_cfg(), tmp_path)  # resumes: evaluates epoch 2 only
    monkeypatch.undo()
    assert _same(last_weights(tmp_path), last_weights(whole))
    kept = [[{k: r[k] for k in KEEP} for r in run_history(d)] for d in (tmp_path, whole)]
    assert kept[0] == kept[1]
    assert run_metrics(tmp_path)["test_acc1"] == run_history(whole)[-1]["test_acc1"]


@pytest.mark.slow
def test_a_record_in_the_checkpoint_but_not_in_the_file_is_written_back(tiny_cfg, tmp_path, monkeypatch, whole):
    real = MetricsWriter.epoch

    def killed_before_the_line(self, record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt("killed between the checkpoint and metrics.jsonl")
        return real(self, record)

    monkeypatch.setattr(MetricsWriter, "epoch", killed_before_the_line)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()
    assert ckpt.load(tmp_path / "checkpoints" / "last.pt")["last_record"]["epoch"] == 1
    monkeypatch.undo()
    train(tiny_cfg(), tmp_path)
    records = run_history(tmp_path)
    assert [r["epoch"] for r in records] == [1, 2]
    assert [{k: r[k] for k in KEEP} for r in records] == [{k: r[k] for k in KEEP} for r in run_history(whole)]


def test_restore_writes_only_a_missing_record(tmp_path):
    writer = MetricsWriter(tmp_path)
    first = {"epoch": 1, "step": 10, "test_acc1": 0.5}
    writer.restore(None)
    writer.restore(first)
    writer.restore(first)
    writer.restore({"epoch": 2, "step": 20, "test_acc1": 0.6})
    writer.close()
    assert [r["epoch"] for r in run_history(tmp_path)] == [1, 2]


def _read_only_events(monkeypatch) -> None:
    def refused(self, data):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(record_writer.RecordWriter, "write", refused)


def test_a_failing_event_writer_is_one_line_without_the_thread_traceback(tmp_path, monkeypatch, capfd):
    writer = MetricsWriter(tmp_path)
    _read_only_events(monkeypatch)
    with pytest.raises(RunDirError) as caught:
        for step in range(1, 20):  # the writer thread fails; the next write (or flush) meets its error
            writer.epoch({"epoch": step, "step": step, "test_acc1": 0.5})
    line = str(caught.value)
    assert "\n" not in line and str(tmp_path / "tb") in line and "Read-only file system" in line
    assert f"resume={tmp_path}" in line
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.slow
def test_a_run_directory_that_fails_mid_run_resumes_bit_identical(tiny_cfg, tmp_path, monkeypatch, whole):
    real = MetricsWriter.epoch

    def read_only_at_epoch_two(self, record):
        if record["epoch"] == 2:
            _read_only_events(monkeypatch)
        return real(self, record)

    monkeypatch.setattr(MetricsWriter, "epoch", read_only_at_epoch_two)
    with pytest.raises(RunDirError, match="Read-only file system"):
        train(tiny_cfg(), tmp_path)
    assert not (tmp_path / "error.txt").exists()
    monkeypatch.undo()  # the directory is writable again
    train(tiny_cfg(), tmp_path)
    assert _same(last_weights(tmp_path), last_weights(whole))
    assert [r["step"] for r in run_history(tmp_path)] == [r["step"] for r in run_history(whole)]


_NO_LOG_FILE = """\
import errno, logging, runpy, sys
run_dir = sys.argv[1]
real = logging.FileHandler._open
def refused(self):
    if self.baseFilename.startswith(run_dir):
        raise PermissionError(errno.EACCES, "Permission denied", self.baseFilename)
    return real(self)
logging.FileHandler._open = refused  # as a chmod 0o555 directory does for a user other than root
from stds.run.files.safe import LogFile  # train.log's handler (opens with O_NOFOLLOW)
LogFile._open = refused
sys.argv = [sys.argv[2], "hydra.run.dir=" + run_dir, "epochs=1"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_an_existing_read_only_run_directory_is_one_line(tmp_path):
    script = tmp_path / "no_log_file.py"
    script.write_text(_NO_LOG_FILE)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    done = subprocess.run([sys.executable, str(script), str(run_dir), str(REPO / "launch" / "train.py")],
                          capture_output=True, text=True, timeout=HANG_S, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip() == (f"Error: cannot write in {run_dir} (its log file train.log): Permission "
                                   "denied; make it writable (chmod u+w, free disk space) or set "
                                   "hydra.run.dir=<a writable directory>")
