"""Run-directory safety: writable probe, one writer per directory, stale temporaries, NaN states."""

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from stds.run.files import checkpoint as ckpt
from stds.run.files import rundir
from stds.errors import RunDirError, StdsError


def test_check_writable_makes_the_folder_and_leaves_nothing(tmp_path):
    target = tmp_path / "run" / "checkpoints"
    rundir.check_writable(target)
    assert target.is_dir() and list(target.iterdir()) == []


def test_check_writable_under_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RunDirError) as info:
        rundir.check_writable(tmp_path / "afile" / "run")
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "afile" / "run") in message
    assert "hydra.run.dir=" in message


def test_check_writable_on_a_read_only_file_system(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(rundir.tempfile, "mkstemp", read_only)  # the probe is made with O_EXCL
    with pytest.raises(RunDirError, match=r"cannot write in .* \(Read-only file system\); make it writable"):
        rundir.check_writable(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 0o555 directory anyway")
def test_check_writable_on_a_chmod_read_only_folder(tmp_path):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(RunDirError, match="Permission denied"):
            rundir.check_writable(tmp_path)
    finally:
        tmp_path.chmod(0o755)


def test_remove_stale_temporaries_removes_only_interrupted_writes(tmp_path):
    folder = tmp_path / "checkpoints"
    ckpt.save_atomic({"format_version": ckpt.FORMAT_VERSION}, folder / "last.pt")
    stale = [folder / ".last.pt.k2j4_x.tmp", folder / ".best.pt.abc.tmp", folder / ".init.pt.q.tmp"]
    for path in stale:
        path.write_bytes(b"partial")
    (folder / "notes.tmp").write_text("a user's file")  # not hidden: not ours
    removed = rundir.remove_stale_temporaries(folder)
    assert sorted(removed) == sorted(stale)
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "notes.tmp"]
    assert rundir.remove_stale_temporaries(tmp_path / "missing") == []


_HOLDER = textwrap.dedent("""
    import sys, time
    from stds.run.files.rundir import RunLock
    with RunLock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
""")


@pytest.mark.slow
def test_second_process_on_the_same_run_dir_is_refused_until_the_first_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError) as info:
            with rundir.RunLock(tmp_path):
                pass
        message = str(info.value)
        assert "\n" not in message and str(tmp_path) in message
        assert f"process {holder.pid} on {socket.gethostname()} (since " in message
        assert "hydra.run.dir=" in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel dropped the dead holder's lock: this process takes it and names itself
    with rundir.RunLock(tmp_path) as lock:
        assert f"pid={os.getpid()}\n" in lock.path.read_text()
        # a third process is refused while this one holds it
        third = subprocess.run([sys.executable, "-c", _HOLDER, str(tmp_path)], capture_output=True, text=True)
        assert third.returncode != 0 and f"in use by process {os.getpid()}" in third.stderr
    with rundir.RunLock(tmp_path):  # released on exit from the block
        pass


def test_run_lock_under_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RunDirError, match=r"cannot lock .*afile/run/\.lock \(Not a directory\); make it writable"):
        rundir.RunLock(tmp_path / "afile" / "run").acquire()


def test_run_lock_error_is_a_user_error(tmp_path):
    with rundir.RunLock(tmp_path):
        with pytest.raises(StdsError):
            rundir.RunLock(tmp_path).acquire()


def test_non_finite_entries_names_nan_and_inf_in_model_and_optimizer_state():
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    assert rundir.non_finite_entries({"model": model.state_dict(), "optimizer": optimizer.state_dict()}) == []
    with torch.no_grad():
        model.weight[0, 1] = float("nan")
    optimizer.state[model.bias]["exp_avg_sq"].fill_(float("inf"))
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "best_acc1": float("-inf"), "history": [{"loss": 1.0}, {"loss": float("nan")}],
             "step": 3, "counts": torch.tensor([1, 2]), "note": "nan"}
    assert rundir.non_finite_entries(state) == [
        "model.weight", "optimizer.state.1.exp_avg_sq", "best_acc1", "history.1.loss"]


def test_lock_file_is_deleted_on_release_and_a_dead_holders_file_is_taken_over(tmp_path):
    with rundir.RunLock(tmp_path) as lock:
        assert f"pid={os.getpid()}\n" in lock.path.read_text()
    assert not (tmp_path / ".lock").exists()  # a finished run keeps no lock file
    (tmp_path / ".lock").write_text("pid=999999999\nhost=elsewhere\nstarted=yesterday\n")  # a killed holder's
    with rundir.RunLock(tmp_path) as lock:
        assert f"pid={os.getpid()}\n" in lock.path.read_text()
    assert not (tmp_path / ".lock").exists()


def test_lock_taken_on_a_file_deleted_meanwhile_moves_to_the_new_file(tmp_path, monkeypatch):
    # another holder released (and deleted) .lock between this process's open and its flock
    lock = rundir.RunLock(tmp_path)
    real_lock_file, calls = lock._lock_file, []

    def lock_then_lose_the_path():
        handle = real_lock_file()
        calls.append(handle)
        if len(calls) == 1:
            lock.path.unlink()
            lock.path.write_text("")  # the next process's new file
        return handle

    monkeypatch.setattr(lock, "_lock_file", lock_then_lose_the_path)
    with lock:
        assert len(calls) == 2 and os.fstat(calls[1].fileno()).st_ino == os.stat(lock.path).st_ino
        with pytest.raises(RunDirError, match="in use by process"):
            rundir.RunLock(tmp_path).acquire()


def test_remove_unstarted_leaves_nothing_of_its_own_and_keeps_other_files(tmp_path):
    run = tmp_path / "run"
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "error.txt", ".lock", "train.log"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    (run / "checkpoints").mkdir()
    rundir.remove_unstarted(run, [run / "train.log"])
    assert not run.exists()
    # a directory holding something else (a user's notes, a checkpoint) is kept with it
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_text("x")
    (run / "notes.txt").write_text("mine")
    (run / ".hydra").mkdir()
    rundir.remove_unstarted(run)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "notes.txt"]


def test_remove_unstarted_removes_empty_date_folders_only_inside_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "runs" / "day" / "old").mkdir(parents=True)
    for run in (tmp_path / "outputs" / "runs" / "day" / "new", tmp_path / "outputs" / "runs" / "empty" / "t"):
        (run / ".hydra").mkdir(parents=True)
        rundir.remove_unstarted(run)
    assert sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "outputs").rglob("*")) == [
        "outputs/runs", "outputs/runs/day", "outputs/runs/day/old"]
    elsewhere = tmp_path / "mine" / "run"
    elsewhere.mkdir(parents=True)
    rundir.remove_unstarted(elsewhere)
    assert (tmp_path / "mine").is_dir() and not elsewhere.exists()


def test_holds_only_unstarted(tmp_path):
    assert rundir.holds_only_unstarted(tmp_path / "missing")
    for name in (".hydra/config.yaml", "error.txt", ".lock", "train.log"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    (tmp_path / "checkpoints").mkdir()
    assert rundir.holds_only_unstarted(tmp_path, [tmp_path / "train.log"])
    assert not rundir.holds_only_unstarted(tmp_path)  # train.log is not one of its log files
    (tmp_path / "checkpoints" / "last.pt").write_text("x")
    assert not rundir.holds_only_unstarted(tmp_path, [tmp_path / "train.log"])
    (tmp_path / "checkpoints" / "last.pt").unlink()
    (tmp_path / "tb").mkdir()  # a run that trained (and was killed before its first checkpoint)
    assert not rundir.holds_only_unstarted(tmp_path, [tmp_path / "train.log"])
