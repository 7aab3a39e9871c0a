"""Property test of issue 29: run and sweep directories with random plantings (interpolations of
every shape in the strings of every YAML file, symlinks in and out of the directory, wrong types
in every field of ``metrics.json``, truncated files) go through the report, export, ``init_from=``,
``resume=`` and a search's settling: never a traceback (one line, or the run marked), no byte of a
file outside the directory and no environment value in any output, no write outside the output."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from stds.errors import StdsError
from stds.results.collect import collect_runs
from stds.results.pruned import export_run
from stds.results.sweep import write_report
from stds.run.files.checkpoint import FORMAT_VERSION
from stds.run.files.rebuild import load_saved_yaml
from stds.run.life.resume import _weights_of, resumed_config
from stds.run.measure.objectives import trial_outcome
from tests.test_files_are_data import CONFIG, NESTED

SECRET_ENV, SECRET_FILE = "env-value-29-never-shown", "file-byte-29-never-shown"
SHAPES = NESTED + ["${T}", "${r}", "${oc.env:STDS_T29,x}", "${foo:${oc.env:STDS_T29}}", "$${oc.env:STDS_T29}",
                   "${oc.create:{a: ${oc.env:STDS_T29}}}", "${oc.env:'STDS_T29'}"]
HYDRA = {"hydra": {"sweep": {"subdir": "${hydra.job.num}"}, "job": {"num": 0, "id": "7"},
                   "launcher": {"submitit_folder": "${hydra.sweep.dir}/.submitit/%j"},
                   "sweeper": {"_target_": "x.OptunaSweeper", "study_name": "s", "storage": None,
                               "objectives": {"test_acc1": "maximize"}, "constraints": {"sparsity": {"min": 0.1}},
                               "params": {"flat_width": "interval(0.1, 1)"}}}}
METRICS = {"test_acc1": 0.5, "test_acc5": 0.9, "sparsity": 0.5, "epoch": 1, "epochs_planned": 1, "d": 0.1,
           "synops": 10.0, "best_test_acc1": 0.5, "best_epoch": 1, "warnings": ["w"],
           "firing_rates": {"a": 0.1}, "first_layer_macs": 3.0}
WRONG = st.one_of(st.text(max_size=5), st.booleans(), st.lists(st.integers(), max_size=2),
                  st.dictionaries(st.text(max_size=2), st.integers(), max_size=2), st.integers())
LINKABLE = ["metrics.json", "metrics.jsonl", "error.txt", ".hydra/hydra.yaml", ".hydra/overrides.yaml",
            ".hydra/config.yaml", "report.md", "report.csv", "report.png", ".lock"]


def _leaves(node, prefix=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, (*prefix, key))
    else:
        yield prefix


def _planted(tree, picks, draw_shape):
    """``tree`` with the leaves whose index is in ``picks`` replaced by an interpolation."""
    tree = json.loads(json.dumps(tree))
    for index, path in enumerate(list(_leaves(tree))):
        if index in picks:
            node = tree
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = draw_shape()
    return tree


@st.composite
def plantings(draw):
    shape = lambda: draw(st.sampled_from(SHAPES))  # noqa: E731
    pick = lambda: set(draw(st.lists(st.integers(0, 30), max_size=4)))  # noqa: E731
    metrics = dict(METRICS)
    for key in draw(st.lists(st.sampled_from(sorted(METRICS)), max_size=3)):
        metrics[key] = draw(WRONG)
    return {
        "config": _planted(yaml.safe_load(CONFIG), pick(), shape),
        "hydra": _planted(HYDRA, pick(), shape),
        "overrides": [draw(st.sampled_from(["flat_width=0.1", "hydra.x=${now:%H}"] + [f"lr={s}" for s in SHAPES]))],
        "metrics": None if draw(st.booleans()) else json.dumps(metrics),
        "cut": draw(st.sampled_from([None, "metrics.json", ".hydra/hydra.yaml", ".hydra/config.yaml"])),
        "links": draw(st.lists(st.sampled_from(LINKABLE), max_size=3, unique=True)),
        "dir_link": draw(st.sampled_from([None, ".hydra", ".submitit"])),
        "fifo": draw(st.sampled_from([None, "metrics.json", "error.txt", ".hydra/hydra.yaml", "report.md"])),
        "error": draw(st.sampled_from([None, "RuntimeError: boom\n"])),
        "ckpt_link": draw(st.booleans()),  # every checkpoint read (export, resume=, init_from=) a symlink out
    }


def _build(root: Path, plan: dict) -> tuple[Path, Path]:
    outside = root / "outside"
    (outside / ".hydra").mkdir(parents=True)
    for name in ("secret.txt", ".hydra/config.yaml", ".hydra/hydra.yaml", "7_0_log.err"):
        (outside / name).write_text(f"RuntimeError: {SECRET_FILE}\n")
    run = root / "sweep" / "0"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    files = {".hydra/config.yaml": yaml.safe_dump(plan["config"]), ".hydra/hydra.yaml": yaml.safe_dump(plan["hydra"]),
             ".hydra/overrides.yaml": yaml.safe_dump(plan["overrides"]), "metrics.json": plan["metrics"],
             "metrics.jsonl": json.dumps(METRICS) + "\n", "error.txt": plan["error"]}
    for name, text in files.items():
        if text is not None:
            (run / name).write_text(text[: len(text) // 2] if name == plan["cut"] else text)
    for name in plan["links"]:  # the report's own files are planted where it writes: the sweep
        where = run.parent if name.startswith("report") else run
        (where / name).unlink(missing_ok=True)
        (where / name).symlink_to(outside / "secret.txt")
    if plan["fifo"] is not None and plan["fifo"] not in plan["links"]:
        where = run.parent if plan["fifo"].startswith("report") else run
        (where / plan["fifo"]).unlink(missing_ok=True)
        os.mkfifo(where / plan["fifo"])  # a reader that opened it would wait forever
    if plan["dir_link"] == ".hydra":
        os.rename(run / ".hydra", root / "moved")
        (run / ".hydra").symlink_to(outside / ".hydra")
    elif plan["dir_link"] == ".submitit":
        (root / "sweep" / ".submitit").symlink_to(outside)
    torch.save({"format_version": FORMAT_VERSION, "model": {}}, run / "checkpoints" / "last.pt")
    torch.save({"format_version": FORMAT_VERSION, "model": {}, "config": {"model": {"_target_": SECRET_FILE}}},
               outside / "secret.pt")  # a loaded config names its _target_ in the refusal
    if plan["ckpt_link"]:
        (run / "checkpoints" / "last.pt").unlink()
        (run / "checkpoints" / "last.pt").symlink_to(outside / "secret.pt")
    return run, outside


def _checkpoint(path: Path, state: dict, plan: dict, outside: Path) -> None:
    """``state`` saved at ``path``, or ``path`` a symlink to the outside checkpoint (``ckpt_link``)."""
    if plan["ckpt_link"]:
        path.symlink_to(outside / "secret.pt")
    else:
        torch.save(state, path)


def _snapshot(folder: Path) -> dict:
    return {p: (p.read_bytes() if p.is_file() and not p.is_symlink() else os.readlink(p) if p.is_symlink() else None)
            for p in folder.rglob("*")}


def _outputs(run: Path, out: Path, plan: dict, tiny: object, capsys, outside: Path) -> list[str]:
    """Every text the readers produce: error lines, reports, configs they return."""
    said = []
    runs = collect_runs([run.parent])
    said += [f"{r.status} {r.error} {r.overrides} {r.dataset} {r.model} {r.method}" for r in runs]
    said += [p.read_bytes().decode("latin1") for p in write_report(runs, run.parent).values()]
    calls = [lambda: load_saved_yaml(run / ".hydra" / "config.yaml"), lambda: export_run(run, verbose=False),
             lambda: trial_outcome(run, ["test_acc1"], {}).error]
    out.mkdir()
    ckpt = out / "planted.pt"
    _checkpoint(ckpt, {"format_version": FORMAT_VERSION, "model": {}, "config": plan["config"]}, plan, outside)
    calls += [lambda: _weights_of(ckpt)]
    (out / "resume" / "checkpoints").mkdir(parents=True)
    _checkpoint(out / "resume" / "checkpoints" / "last.pt", {"format_version": FORMAT_VERSION,
                                                            "config": plan["config"]}, plan, outside)
    calls += [lambda: OmegaConf.to_yaml(resumed_config(tiny, out / "resume"))]
    for call in calls:
        try:
            said.append(str(call()))
        except StdsError as exc:  # one line naming the file; anything else is a traceback: the test fails
            assert "\n" not in str(exc), str(exc)
            said.append(str(exc))
    captured = capsys.readouterr()
    return said + [captured.out, captured.err]


def _check(plan: dict, tiny: object, capsys) -> None:
    os.environ["STDS_T29"] = SECRET_ENV
    try:
        with tempfile.TemporaryDirectory() as folder:
            root = Path(folder)
            run, outside = _build(root, plan)
            before = _snapshot(outside)
            out = root / "out"
            said = "\n".join(_outputs(run, out, plan, tiny, capsys, outside))
            assert SECRET_ENV not in said and SECRET_FILE not in said
            assert _snapshot(outside) == before  # nothing written outside the directories
    finally:
        del os.environ["STDS_T29"]


_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@seed(29)
@settings(max_examples=12, **_SETTINGS)
@given(plan=plantings())
def test_planted_directories_are_read_as_data(plan, tiny_cfg, capsys):
    _check(plan, tiny_cfg("epochs=1"), capsys)


@pytest.mark.slow
@seed(2929)
@settings(max_examples=150, **_SETTINGS)
@given(plan=plantings())
def test_planted_directories_are_read_as_data_many(plan, tiny_cfg, capsys):
    _check(plan, tiny_cfg("epochs=1"), capsys)
