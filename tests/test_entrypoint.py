"""``launch/train.py`` as users run it: the documented commands, errors, kill and resume, DDP."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import HANG_S, REPO, TRAIN, at_once, run_metrics, run_train

FAST = ("epochs=1", "batch_size=64")


def _free_port() -> int:
    """A TCP port nothing listens on now (another checkout's tests may run beside these)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_documented_single_run(tmp_path):
    out = tmp_path / "run"
    proc = run_train("sparse=stmod", "scheduler=sine", "flat_width=2.0", *FAST, f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr
    metrics = run_metrics(out)
    assert metrics["d"] == pytest.approx(2.0)  # the sine schedule ends at D = flat_width
    assert metrics["sparsity"] > 0.9  # D = 2 prunes nearly every weight of the small net
    assert (out / ".hydra" / "config.yaml").exists()


@pytest.mark.slow
def test_documented_basic_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train("-m", "flat_width=1,2,3", *FAST, "epochs=1", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr
    widths = [run_metrics(sweep / str(i))["d"] for i in range(3)]
    assert widths == pytest.approx([1, 2, 3])


@pytest.mark.slow
def test_documented_submitit_local_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train("-m", "hydra/launcher=submitit_local", "flat_width=0.05,0.3", *FAST,
                     f"hydra.sweep.dir={sweep}", "hydra.launcher.timeout_min=10",
                     # the plugin starts both points at once with all the machine's threads each;
                     # one thread each keeps two points from fighting over a 2-core CI machine
                     env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    first, second = run_metrics(sweep / "0"), run_metrics(sweep / "1")
    assert (first["d"], second["d"]) == pytest.approx((0.05, 0.3))
    assert first["sparsity"] < second["sparsity"]
    assert list((sweep / ".submitit").iterdir())
    assert not (sweep / ".submitit" / "%j").exists()  # the empty pattern folder is tidied away


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single ``Error: ...`` line of a failed run (asserting there is exactly one, no traceback)."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


QUICK_BAD_INPUT = [  # one case of each kind: Hydra's composition, our schema, our checks
    ("sparse=magic", "Could not find 'sparse/magic'; options in 'sparse': gmp, identity, st, stmod"),
    ("flat_widht=1", "flat_widht is not a config key"),
    ("flat_width=-1", "flat_width=-1.0 must be >= 0")]


def test_bad_input_of_each_kind_is_one_line_without_traceback(tmp_path):
    # in-process tests cover the other values of each kind (tests/test_config.py, test_data.py)
    procs = at_once(*[[sys.executable, str(TRAIN), override, f"hydra.run.dir={tmp_path}/{i}/run"]
                      for i, (override, _) in enumerate(QUICK_BAD_INPUT)], cwd=tmp_path)
    for (override, expected), proc in zip(QUICK_BAD_INPUT, procs):
        assert expected in _one_error_line(proc), override
    assert not any((tmp_path / str(i) / "run").exists() for i in range(len(QUICK_BAD_INPUT)))


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, expected",
    [("alpha_gr=-1", "alpha_gr=-1.0 must be >= 0"),
     ("T=0", "T=0 must be an integer >= 1"), ("epochs=0", "epochs=0 must be an integer >= 1"),
     ("dataset=cifar10", "dataset.root="),
     ("flat_width=nan", "flat_width=nan is not a finite number; set flat_width=<a finite value>"),
     ("+flat_widht=1", "flat_widht is not a config key"),
     ("model.neuron.kind=bogus", "model.neuron.kind='bogus' is not valid; use one of lif, if"),
     ("dataset.test_fraction=0", "dataset.test_fraction=0 is not valid; use a value in (0, 1)")],
)
def test_bad_input_is_one_line_without_traceback(tmp_path, override, expected):
    proc = run_train(override, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert expected in _one_error_line(proc)


@pytest.mark.slow
def test_cifar10_root_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    proc = run_train("dataset=cifar10", f"dataset.root={tmp_path / 'afile'}", f"hydra.run.dir={tmp_path}/run")
    assert f"dataset.root={tmp_path / 'afile'} is a file, not a folder" in _one_error_line(proc)


@pytest.mark.slow
@pytest.mark.parametrize("mode, key", [("run", "hydra.run.dir"), ("sweep", "hydra.sweep.dir")])
def test_run_dir_under_a_regular_file_is_one_line(tmp_path, mode, key):
    (tmp_path / "afile").write_text("x")
    args = (("-m", "flat_width=1,2") if mode == "sweep" else ()) + (f"{key}={tmp_path / 'afile' / mode}",)
    line = _one_error_line(run_train(*args))
    assert line == (f"Error: cannot make the {mode} directory {tmp_path / 'afile' / mode}: "
                    f"{tmp_path / 'afile'} is a file; set {key}=<a directory path>")


@pytest.mark.slow
def test_hydra_full_error_still_shows_the_traceback(tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run([sys.executable, str(TRAIN), "flat_widht=1", f"hydra.run.dir={tmp_path}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigCompositionException" in proc.stderr


def _file_size_limit(limit: int):
    """For ``preexec_fn``: writes past ``limit`` bytes fail with EFBIG (Python ignores SIGXFSZ)."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.slow
def test_checkpoint_that_does_not_fit_on_disk_is_one_line(tmp_path):
    # the checkpoint (about 700 kB for the digits net with Adam) passes a 200 kB file-size limit the
    # log and metrics files stay under: its write fails part-way, as on a full disk
    out = tmp_path / "run"
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    proc = subprocess.run(
        [sys.executable, str(TRAIN), *FAST, "checkpoint_every_steps=1", "logging.synops=false",
         f"hydra.run.dir={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_S, preexec_fn=_file_size_limit(200_000),
    )
    line = _one_error_line(proc)
    assert line.startswith(f"Error: cannot write checkpoint {out / 'checkpoints' / 'last.pt'} (File too large)")
    assert "free space" in line
    assert [p.name for p in (out / "checkpoints").iterdir()] == []  # no temporary left behind


@pytest.mark.slow
def test_sigkill_mid_epoch_then_same_command_gives_the_same_result(tmp_path):
    args = ("epochs=3", "batch_size=32", "flat_width=0.3")
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_train(*args, f"hydra.run.dir={whole}").returncode == 0
    cmd = [sys.executable, str(TRAIN), *args, f"hydra.run.dir={split}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    jsonl = split / "metrics.jsonl"
    deadline = time.monotonic() + HANG_S
    while not (jsonl.exists() and jsonl.read_text().count("\n") >= 1) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # into the second epoch
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (split / "metrics.json").exists(), "the run finished before it could be killed"
    assert run_train(*args, f"hydra.run.dir={split}").returncode == 0
    keep = ("test_acc1", "test_acc5", "best_test_acc1", "sparsity", "step", "epoch", "d")
    assert {k: run_metrics(split)[k] for k in keep} == {k: run_metrics(whole)[k] for k in keep}


@pytest.mark.slow
def test_ddp_two_cpu_processes_end_with_identical_weights(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
         str(TRAIN), "epochs=2", "batch_size=32", "device=cpu", f"hydra.run.dir={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = run_metrics(out)
    assert metrics["world_size"] == 2 and metrics["ranks_in_sync"] is True
    steps = (1437 // 2) // 32  # each rank sees half of the 1437 training digits
    assert metrics["step"] == 2 * steps
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 2 * steps


@pytest.mark.slow
def test_default_run_reaches_the_promised_accuracy_and_sparsity(tmp_path):
    out = tmp_path / "default"
    started = time.monotonic()
    proc = run_train(f"hydra.run.dir={out}")
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = run_metrics(out)
    assert metrics["test_acc1"] >= 0.97 and metrics["sparsity"] >= 0.90, metrics
    print(f"default run: {elapsed:.0f} s, top-1 {metrics['test_acc1']:.4f}, sparsity {metrics['sparsity']:.4f}")


@pytest.mark.slow
def test_a_finished_run_freezes_its_objects_at_exit_and_loses_no_file(tmp_path):
    """launch/train.py registers `gc.freeze` to run at exit (the interpreter's last collections
    then skip the run's objects); an exit hook registered before the run, so run after it, sees the
    objects frozen, and every file of the run is whole."""
    probe = ("import atexit, gc, runpy, sys\n"
             "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0, flush=True))\n"
             f"sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'launch')!r}]\n"
             f"sys.argv = [{str(TRAIN)!r}, *sys.argv[1:]]\n"
             "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", probe, "dataset=digits", "epochs=1", "batch_size=64",
                           "logging.synops=false", "logging.progress_bar=false", f"hydra.run.dir={run_dir}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "frozen at exit: True"
    metrics = run_metrics(run_dir)
    assert metrics["epoch"] == 1 and 0.0 <= metrics["test_acc1"] <= 1.0
    assert "next: python launch/export.py" in (run_dir / "train.log").read_text()  # the log's last words
    events = list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
