"""Files are data, all the way down (issue 29): no interpolation of any shape is resolved from a
file read back, no symlink is followed out of a run or sweep directory nor written through, one
damaged file marks one run, a fresh start leaves nothing of an older run, CIFAR-10 batches build
arrays only from their bytes, and folder walks do not follow directory symlinks."""

from __future__ import annotations

import json
import logging
import os
import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from stds.errors import CheckpointError, StdsError
from stds.results.collect import collect_runs, read_run
from stds.results.pruned import export_run, write_output
from stds.results.sweep import write_report
from stds.run.files.atomic import write_atomic
from stds.run.files.checkpoint import FORMAT_VERSION
from stds.run.files.rebuild import load_saved_yaml, sparsified_model
from stds.run.files.rundir import RunLock
from stds.run.files.safe import LogFile, UnsafeFileError, open_append, read_text

SECRET = "hunter2-of-the-user"
NESTED = ["${${r}:STDS_T29}", "${oc.${e}:STDS_T29}", "${oc.env:${v}}", "x${oc.env:STDS_T29}",
          "${oc.env:STDS_T29}", "${oc.decode:'${oc.env:STDS_T29}'}"]
"""Interpolations of every shape; with r: oc.env, e: env, v: STDS_T29 each would read the variable."""

CONFIG = ("T: 4\nr: oc.env\ne: env\nv: STDS_T29\nflat_width: 0.1\nalpha_gr: 0.0\nepochs: 1\n"
          "dataset:\n  _target_: stds.data.digits\n  in_channels: 1\n  num_classes: 10\n  image_size: 8\n"
          "sparse:\n  method: stmod\nscheduler:\n  kind: sine\n"
          "model:\n  _target_: stds.models.DigitsNet\n  T: ${T}\n  in_channels: ${dataset.in_channels}\n"
          "  num_classes: ${dataset.num_classes}\n  image_size: ${dataset.image_size}\n")


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv("STDS_T29", SECRET)


def _run(path: Path, config: str = CONFIG, metrics: str | None = '{"test_acc1": 0.5, "sparsity": 0.5, "epoch": 1}',
         **files: str) -> Path:
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(config)
    if metrics is not None:
        (path / "metrics.json").write_text(metrics)
    for name, text in files.items():
        (path / name.replace("__", "/")).write_text(text)
    return path


# ------------------------------------------------------------------ no interpolation of any shape

def test_saved_config_references_to_its_own_keys_are_followed_by_stds(tmp_path):
    config = load_saved_yaml(_run(tmp_path / "run") / ".hydra" / "config.yaml")
    assert config["model"] == {"_target_": "stds.models.DigitsNet", "T": 4, "in_channels": 1,
                               "num_classes": 10, "image_size": 8}


@pytest.mark.parametrize("shape", NESTED + ["${a}\na: ${b}\nb: ${a}", "${missing.key}", "${dataset}"])
def test_saved_config_refuses_an_interpolation_of_any_shape(tmp_path, secret_env, shape):
    path = _run(tmp_path / "run", CONFIG.replace("image_size: ${dataset.image_size}", f"image_size: {shape}")
                ) / ".hydra" / "config.yaml"
    with pytest.raises(CheckpointError) as caught:
        load_saved_yaml(path)
    line = str(caught.value)
    assert "model.image_size" in line and str(path) in line and "\n" not in line and SECRET not in line


@pytest.mark.parametrize("shape", NESTED[:2])
def test_export_never_writes_an_environment_value(tmp_path, secret_env, shape):
    """A checkpoint without its config falls back to .hydra/config.yaml: a nested interpolation
    there once put the variable's value into pruned.pt."""
    run = _run(tmp_path / "run", CONFIG.replace("  _target_: stds.data.digits\n", f"  _target_: stds.data.digits\n  root: '{shape}'\n"))
    (run / "checkpoints").mkdir()
    torch.save({"format_version": FORMAT_VERSION, "model": {}}, run / "checkpoints" / "last.pt")
    with pytest.raises(CheckpointError, match="dataset.root holds an interpolation") as caught:
        export_run(run, verbose=False)
    assert SECRET not in str(caught.value) and not (run / "pruned.pt").exists()


def test_the_report_runs_no_resolver_of_a_sweeps_hydra_yaml(tmp_path):
    calls = []
    OmegaConf.register_new_resolver("stds_t29_probe", lambda *args: calls.append(args) or "x", replace=True)
    sweep = tmp_path / "sweep"
    for number, study in ((0, "${stds_t29_probe:a}"), (1, "${${r}:b}")):
        _run(sweep / str(number), **{".hydra__hydra.yaml": (
            "r: stds_t29_probe\nhydra:\n  sweep:\n    subdir: ${hydra.job.num}\n  job:\n    num: 3\n"
            f"  sweeper:\n    _target_: x.OptunaSweeper\n    study_name: '{study}'\n"
            "    objectives:\n      test_acc1: maximize\n")})
    _run(sweep / "2", **{".hydra__hydra.yaml": "hydra:\n  sweep:\n    subdir: ${hydra.job.num}\n  job:\n    num: 2\n"
                         "  sweeper:\n    _target_: x.OptunaSweeper\n    study_name: s\n"
                         "    objectives:\n      test_acc1: maximize\n"})
    runs = collect_runs([sweep])
    write_report(runs, sweep)
    assert calls == []
    by_name = {run.path.name: run for run in runs}
    assert [by_name[n].status for n in "012"] == ["damaged", "damaged", "finished"]
    assert "hydra.sweeper.study_name holds an interpolation" in by_name["0"].error
    assert by_name["2"].trial == 2  # ${hydra.job.num}: a reference to a key of the file, followed


# ------------------------------------------------------------------ writes never follow a symlink

def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's own file\n")
    return victim


def test_the_report_replaces_planted_symlinks_instead_of_writing_through_them(tmp_path):
    victim = _victim(tmp_path)
    run = _run(tmp_path / "run")
    for name in ("report.md", "report.csv", "report.png"):
        (run / name).symlink_to(victim)
    paths = write_report(collect_runs([run]), run)
    assert victim.read_text() == "the user's own file\n"
    assert all(path.is_file() and not path.is_symlink() for path in paths.values())


def test_export_writes_replace_a_symlink_and_refuse_a_directory(tmp_path):
    victim = _victim(tmp_path)
    (tmp_path / "model.nir").symlink_to(victim)
    write_output(tmp_path / "model.nir", b"graph")
    assert victim.read_text() == "the user's own file\n" and (tmp_path / "model.nir").read_bytes() == b"graph"
    (tmp_path / "out").mkdir()
    with pytest.raises(StdsError, match="is a directory") as caught:
        write_output(tmp_path / "out", b"graph")
    assert "\n" not in str(caught.value) and sorted(p.name for p in tmp_path.iterdir()) == ["model.nir", "out", "victim.txt"]
    with pytest.raises(StdsError, match=r"cannot write .*victim.txt/model.nir .*--out"):
        write_output(victim / "model.nir", b"graph")  # a folder that cannot be made: one line


def test_locks_and_appends_refuse_a_planted_symlink(tmp_path):
    from stds.cli.study.lock import sweep_lock
    from stds.errors import RunDirError

    victim = _victim(tmp_path)
    for folder, name in (("run", ".lock"), ("sweep", ".search.lock"), ("run2", "metrics.jsonl")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).symlink_to(victim)
    with pytest.raises(RunDirError, match=r"\.lock .*symlink"):
        RunLock(tmp_path / "run").acquire()
    with pytest.raises(StdsError, match=r"\.search\.lock is a symlink"):
        with sweep_lock(tmp_path / "sweep"):
            pass
    with pytest.raises(UnsafeFileError, match="symlink"):
        open_append(tmp_path / "run2" / "metrics.jsonl")
    os.link(victim, tmp_path / "run" / "hard")
    with pytest.raises(UnsafeFileError, match="hard link"):
        open_append(tmp_path / "run" / "hard")
    assert victim.read_text() == "the user's own file\n"


def test_train_log_is_not_appended_through_a_planted_symlink(tmp_path, capsys):
    victim = _victim(tmp_path)
    (tmp_path / "train.log").symlink_to(victim)
    handler = LogFile(str(tmp_path / "train.log"))
    handler.emit(logging.LogRecord("x", logging.INFO, "f", 1, "a log line", None, None))
    handler.close()
    assert victim.read_text() == "the user's own file\n"
    assert "train.log is a symlink" in capsys.readouterr().err
    handler = LogFile(str(tmp_path / "real.log"))
    handler.emit(logging.LogRecord("x", logging.INFO, "f", 1, "a log line", None, None))
    handler.close()
    assert (tmp_path / "real.log").read_text() == "a log line\n"


# ------------------------------------------------------------------ reads stay inside the directory

def test_a_symlinked_error_txt_is_never_republished(tmp_path):
    from stds.run.measure.objectives import trial_outcome

    secret_file = tmp_path / "credentials"
    secret_file.write_text(f"password={SECRET}\n")
    sweep = tmp_path / "sweep"
    bad = _run(sweep / "0", metrics=None)
    (bad / "error.txt").symlink_to(secret_file)
    _run(sweep / "1")
    paths = write_report(collect_runs([sweep]), sweep)
    written = paths["csv"].read_text() + paths["md"].read_text()
    assert SECRET not in written and "damaged" in written and "error.txt is a symlink" in written
    outcome = trial_outcome(bad, ["test_acc1"], {})
    assert SECRET not in outcome.error and "symlink" in outcome.error


def test_submitit_logs_are_read_only_inside_the_sweep(tmp_path):
    secret_dir = tmp_path / "elsewhere" / "77"
    secret_dir.mkdir(parents=True)
    (secret_dir / "77_0_log.err").write_text(f"Submitted job triggered an exception\nRuntimeError: {SECRET}\n")
    sweep = tmp_path / "sweep"
    run = _run(sweep / "0", metrics=None, **{".hydra__hydra.yaml": (
        f"hydra:\n  launcher:\n    submitit_folder: {tmp_path / 'elsewhere'}/%j\n  job:\n    id: '77'\n")})
    assert read_run(run).status == "running"  # the folder outside the sweep is not read
    (sweep / ".submitit").symlink_to(tmp_path / "elsewhere")
    assert read_run(run).status == "running"  # nor is a .submitit that leads out of it
    (sweep / ".submitit").unlink()
    (sweep / ".submitit").mkdir()
    (sweep / ".submitit" / "77").mkdir()
    (sweep / ".submitit" / "77" / "77_0_log.err").symlink_to(secret_dir / "77_0_log.err")
    record = read_run(run)
    assert SECRET not in record.error and "symlink" in record.error


def test_a_symlinked_hydra_folder_or_fifo_marks_the_run(tmp_path):
    outside = _run(tmp_path / "outside")
    run = tmp_path / "sweep" / "0"
    run.mkdir(parents=True)
    (run / ".hydra").symlink_to(outside / ".hydra")
    fifo = _run(tmp_path / "sweep" / "1", metrics=None)
    os.mkfifo(fifo / "metrics.json")
    records = {r.path.name: r for r in (read_run(run), read_run(fifo))}
    assert records["0"].status == "damaged" and "leads outside" in records["0"].error
    assert records["1"].status == "damaged" and "not a regular file" in records["1"].error
    (outside / "link").symlink_to(outside / "metrics.json")  # even one that stays inside
    with pytest.raises(UnsafeFileError, match="link is a symlink"):
        read_text(outside / "link", outside)
    (outside / "big").write_bytes(b"x" * 100)
    with pytest.raises(UnsafeFileError, match="100 bytes, more than the 99"):
        read_text(outside / "big", outside, limit=99)


# ------------------------------------------------------------------ one bad file marks one run

@pytest.mark.parametrize("files, reason", [
    ({"metrics.json": '{"test_acc1": 0.5, "warnings": 7}'}, "warnings is int, not a list of strings"),
    ({"metrics.json": '{"test_acc1": 0.5, "firing_rates": [1]}'}, "firing_rates is a list"),
    ({"metrics.json": '{"test_acc1": "0.9"}'}, "test_acc1 is a string, not a number"),
    ({"metrics.json": '{"test_acc1": 0.5, "epoch": 1.5}'}, "epoch is 1.5, not a whole number"),
    ({"metrics.json": '{"test_acc1": 0.97, "spars'}, "metrics.json is not complete JSON"),
    ({"metrics.json": "[1, 2]"}, "metrics.json is a list, not a JSON object"),
    ({"metrics.json": "[" * 50000}, "metrics.json nests deeper than any stds file"),
    ({"error.txt/x": "a folder where a file belongs"}, "error.txt is not a regular file"),
    ({".hydra__overrides.yaml": "flat_width: 1"}, "overrides.yaml is not a list"),
    ({".hydra__hydra.yaml": "hydra:\n  sweeper:\n    _target_: x.OptunaSweeper\n    objectives: {test_acc1: maximize}\n"
                            "    constraints: {sparsity: {min: abc}}\n"}, "constraints.sparsity.min is 'abc'"),
    ({".hydra__hydra.yaml": "hydra:\n  job: {id: [1]}\n"}, None),
    ({".hydra__hydra.yaml": "hydra:\n  sweep: {subdir: '²'}\n  sweeper:\n    _target_: x.OptunaSweeper\n"
                            "    objectives: {test_acc1: maximize}\n"}, None),
    ({".hydra__config.yaml": "flat_width: [1]\n"}, "flat_width is a list, not a number"),
    ({".hydra__config.yaml": "a: [unclosed\n"}, "config.yaml is not YAML"),
])
def test_one_damaged_file_marks_its_run_and_the_others_are_reported(tmp_path, files, reason):
    sweep = tmp_path / "sweep"
    _run(sweep / "0")
    bad = _run(sweep / "1", metrics=None if "metrics.json" in files else '{"test_acc1": 0.4}')
    for name, text in files.items():
        (bad / name.replace("__", "/")).parent.mkdir(parents=True, exist_ok=True)
        (bad / name.replace("__", "/")).write_text(text)
    runs = {r.path.name: r for r in collect_runs([sweep])}
    write_report(list(runs.values()), sweep)
    assert runs["0"].status == "finished" and runs["0"].test_acc1 == 0.5
    if reason is None:  # read as nothing special: not a trial, or a trial without a number
        assert runs["1"].status == "finished" and runs["1"].trial is None
        return
    assert runs["1"].status == "damaged" and reason in runs["1"].error and "\n" not in runs["1"].error
    assert f"damaged: {runs['1'].error}" in (sweep / "report.md").read_text()


# ------------------------------------------------------------------ CIFAR-10 batches

def _batch_pickle(path: Path, shape: tuple, data: bytes, ndarray_call: bool = False) -> Path:
    """A protocol-2 pickle of {'data': <array>, 'labels': []}: numpy's own layout, or a call of
    numpy.ndarray(shape) (uninitialised memory of any size)."""
    import numpy.core.multiarray  # noqa: F401 - the name numpy pickles arrays under

    class Planted:
        def __reduce__(self):
            if ndarray_call:
                return (np.ndarray, (shape, np.dtype("u1")))
            return (np.core.multiarray._reconstruct, (np.ndarray, (0,), b"b"),
                    (1, shape, np.dtype("u1"), False, data))

    path.write_bytes(pickle.dumps({"data": Planted(), "labels": []}, protocol=2))
    return path


@pytest.mark.parametrize("kind", ["ndarray call", "short data"])
def test_a_cifar10_batch_cannot_allocate_more_than_its_bytes(tmp_path, kind):
    from stds.data.datasets import CIFAR10BatchError, read_cifar10_batch

    path = _batch_pickle(tmp_path / "data_batch_1", (20000, 3072), b"x" * 16, ndarray_call=kind == "ndarray call")
    assert path.stat().st_size < 400
    tracemalloc.start()
    try:
        with pytest.raises(CIFAR10BatchError) as caught:
            read_cifar10_batch(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, peak  # 20000 x 3072 bytes were never allocated
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


# ------------------------------------------------------------------ folder walks and smaller items

def test_folder_walks_do_not_follow_a_directory_symlink_loop(tmp_path):
    from PIL import Image

    from stds.data.images import BadImages
    from stds.data.vision import ImageFiles, image_files

    for split in ("train", "val"):
        for name in ("a", "b"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (4, 4)).save(folder / f"{i}.png")
        (tmp_path / split / "a" / "loop").symlink_to(tmp_path / split)
    assert len(image_files([tmp_path / "train", tmp_path / "val"])) == 12
    assert len(ImageFiles(str(tmp_path / "train"), None, BadImages()).samples) == 6


def test_init_from_a_checkpoint_whose_config_has_no_model_is_one_line(tmp_path):
    from stds.run.life.resume import _weights_of

    path = tmp_path / "last.pt"
    torch.save({"format_version": FORMAT_VERSION, "model": {}, "config": {"sparse": {"method": "stmod"}}}, path)
    with pytest.raises(CheckpointError, match="no model mapping") as caught:
        _weights_of(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)
    model = {"_target_": "stds.models.DigitsNet", "T": 2, "in_channels": 1, "num_classes": 10, "image_size": 8}
    with pytest.raises(CheckpointError, match="sparse.exclude is not a list"):
        sparsified_model({"model": model, "sparse": {"exclude": 3}}, path)


def test_write_atomic_keeps_the_usual_permissions(tmp_path):
    write_atomic(tmp_path / "a.txt", "x")
    mask = os.umask(0o022)
    os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_write_that_must_not_replace_keeps_what_is_there_file_or_link(tmp_path):
    from stds.run.life.trainer import _write_error
    from stds.run.setup.distributed import RanksLost

    victim, error = _victim(tmp_path), tmp_path / "error.txt"
    _write_error(tmp_path, RanksLost("rank 0 of 2 stopped answering", (0,)), replace=False)  # a survivor's line
    assert error.read_text() == "RanksLost: rank 0 of 2 stopped answering\n"
    with pytest.raises(FileExistsError):
        write_atomic(error, "a second line\n", replace=False)
    _write_error(tmp_path, RuntimeError("another survivor"), replace=False)
    assert error.read_text() == "RanksLost: rank 0 of 2 stopped answering\n"  # the first stays, whole
    (tmp_path / "planted").symlink_to(victim)
    with pytest.raises(FileExistsError):
        write_atomic(tmp_path / "planted", "x", replace=False)  # nothing written through the link
    assert victim.read_text() == "the user's own file\n" and (tmp_path / "planted").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["error.txt", "planted", "victim.txt"]  # no temporaries


def test_train_log_handler_is_the_no_follow_one():
    from tests.conftest import compose_train

    handlers = compose_train(hydra=True).hydra.job_logging.handlers
    assert handlers.file["class"] == "stds.run.files.safe.LogFile"


# ------------------------------------------------------------------ a fresh start, a refused resume

@pytest.mark.slow
def test_a_fresh_start_sets_an_older_run_aside_and_a_refused_resume_changes_nothing(tiny_cfg, tmp_path):
    from stds.run.life.trainer import train

    run = tmp_path / "run"
    train(tiny_cfg("epochs=1", "flat_width=0.1"), run)
    (run / "error.txt").write_text("RuntimeError: an older failure\n")
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "train.log"}
    with pytest.raises(CheckpointError, match="flat_width"):
        train(tiny_cfg("epochs=1", "flat_width=0.2"), run)  # refused: nothing in the directory changes
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "train.log"}
    assert after == before
    old = json.loads((run / "metrics.json").read_text())
    (run / "checkpoints" / "last.pt").unlink()  # no checkpoint to resume: the next start is fresh
    with pytest.raises(CheckpointError, match="init_from"):
        train(tiny_cfg("epochs=1", f"init_from={tmp_path / 'missing.pt'}"), run)
    [previous] = run.glob("previous-*")
    assert json.loads((previous / "metrics.json").read_text()) == old and (previous / "tb").is_dir()
    assert not (run / "metrics.json").exists() and not (run / "tb").exists()
    record = read_run(run)
    assert record.status == "failed" and "init_from" in record.error and record.test_acc1 is None


# ------------------------------------------------------------------ checkpoints are read as run files

def _planted_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    """A run directory whose ``checkpoints/last.pt`` is a symlink to a loadable checkpoint elsewhere."""
    elsewhere = tmp_path / "elsewhere.pt"
    torch.save({"format_version": FORMAT_VERSION, "model": {}, "config": {}}, elsewhere)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").symlink_to(elsewhere)
    return run, elsewhere


def test_a_symlinked_checkpoint_is_refused_not_loaded(tmp_path):
    from stds.run.files.checkpoint import load
    from stds.run.life.resume import _weights_of, resumed_config

    run, elsewhere = _planted_checkpoint(tmp_path)
    path = run / "checkpoints" / "last.pt"
    with pytest.raises(UnsafeFileError, match="last.pt is a symlink") as caught:
        load(path, run)
    assert "\n" not in str(caught.value)
    with pytest.raises(UnsafeFileError, match="symlink"):
        resumed_config(OmegaConf.create({}), run)  # resume=<run dir> reads the checkpoint's config
    with pytest.raises(CheckpointError, match=r"^init_from: .*last.pt is a symlink"):
        _weights_of(path)
    assert load(elsewhere)["format_version"] == FORMAT_VERSION  # the file itself loads


def test_a_checkpoint_folder_that_leads_out_of_the_run_is_refused(tmp_path):
    from stds.run.files.checkpoint import load

    outside = tmp_path / "outside"
    outside.mkdir()
    torch.save({"format_version": FORMAT_VERSION, "model": {}, "config": {}}, outside / "last.pt")
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(outside)
    with pytest.raises(UnsafeFileError, match="leads outside"):
        load(run / "checkpoints" / "last.pt", run)
    with pytest.raises(CheckpointError, match="does not exist"):
        load(run / "missing.pt", run)


def test_export_finished_refuses_a_symlinked_checkpoint_and_replaces_a_planted_pruned_pt(tmp_path, capsys):
    from types import SimpleNamespace

    from stds.results.pruned import _plain_mtime, export_finished

    run, _ = _planted_checkpoint(tmp_path)
    victim = _victim(tmp_path)
    (run / "pruned.pt").symlink_to(victim)
    assert _plain_mtime(run / "pruned.pt") == -1.0  # a link is never stat'ed through
    assert export_finished([SimpleNamespace(path=str(run), status="finished")]) == []
    err = capsys.readouterr().err
    assert "not exported" in err and "last.pt is a symlink" in err and len(err.splitlines()) == 1
    assert victim.read_text() == "the user's own file\n" and (run / "pruned.pt").is_symlink()


def test_export_finished_replaces_a_planted_pruned_pt_newer_than_the_checkpoint(tiny_cfg, tmp_path):
    from stds.results.pruned import export_finished
    from stds.run.life.trainer import train

    run = tmp_path / "run"
    train(tiny_cfg("epochs=1", "flat_width=0.1"), run)
    victim = _victim(tmp_path)
    (run / "pruned.pt").symlink_to(victim)  # newer than last.pt: a stat through it would skip the export
    assert export_finished([read_run(run)]) == [run / "pruned.pt"]
    assert not (run / "pruned.pt").is_symlink() and victim.read_text() == "the user's own file\n"
    assert torch.load(run / "pruned.pt", weights_only=True)["storage"]["pruned"]["numel"] > 0
