"""Every script under ``benchmarks/`` runs: each one's ``--smoke`` mode as a user starts it, and
its printed table checked against the setup it ran (so a moved import or a renamed config key
fails here, not on a GPU machine). Timing values are only checked to be finite, positive and
consistent with each other; speed is the scripts' business, not the tests'."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import HANG_S, REPO, at_once

DIGITS_THETA = 1 * 32 * 9 + 32 * 64 * 9 + 64 * 64 * 9 + 64 * 2 * 2 * 10
"""Pruned weights of the default digits net: three 3x3 convs (1 -> 32 -> 64 -> 64) and the fc
from 64 channels of 2x2 to 10 classes: 288 + 18,432 + 36,864 + 2,560 = 58,144."""


SMOKES = {  # the test that reads it -> the script and its arguments after --smoke
    "test_target_frontier_smoke_trains_both_variants_and_tables_them": ("target_frontier.py",),
    "test_step_time_smoke_runs_every_setup_and_method_through_its_child": ("step_time.py",),
    "test_amp_cpu_smoke_prints_both_speeds_and_their_ratio": ("amp_cpu.py",),
    "test_search_cost_smoke_runs_both_schedules_over_every_trial": ("search_cost.py",),
    "test_quantile_cost_smoke_times_the_digits_net": ("quantile_cost.py", "--step-ms", "digits=50"),
}


def _smoke_run(script: str, *args: str) -> subprocess.CompletedProcess:
    """``python benchmarks/<script> --smoke ARGS`` on one CPU thread (tiny tensors gain nothing from
    a second one, which a busy machine makes wait)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--smoke", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=HANG_S)


@pytest.fixture(scope="module")
def smoke(request):
    """The stdout lines of a script's smoke run, which must succeed. The smoke runs of the tests
    selected here start together on first use, two at a time, longest first: each is a fresh Python
    that spends seconds importing, and the tests read them in turn."""
    wanted = {item.name for item in request.session.items if getattr(item, "module", None) is request.module}
    pool = ThreadPoolExecutor(max_workers=2)
    runs = {SMOKES[name][0]: pool.submit(_smoke_run, *SMOKES[name]) for name in SMOKES if name in wanted}

    def lines(script: str) -> list[str]:
        assert script in runs, f"the test that reads {script} is not in SMOKES"
        proc = runs[script].result()
        assert proc.returncode == 0, f"{script} --smoke failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
        return proc.stdout.splitlines()

    yield lines
    pool.shutdown(wait=True)


def _rows(lines: list[str]) -> list[list[str]]:
    """The cells of every Markdown table row printed, header and separator rows left out."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines if line.startswith("|")]
    return [r for r in rows if not set(r[0]) <= {"-"} and r[0] not in ("setup", "S", "D (sine)", "hold of")]


def _positive(text: str) -> float:
    value = float(text.rstrip("%"))
    assert math.isfinite(value) and value > 0, text
    return value


def test_step_time_smoke_runs_every_setup_and_method_through_its_child(smoke):
    lines = smoke("step_time.py")
    assert lines[0].startswith("device: ") and "smoke" in lines[0]
    rows = {(r[0], r[1]): r for r in _rows(lines)}
    assert list(rows) == [(s, m) for s in ("cifar10", "imagenet") for m in ("dense", "stmod", "gradr")]
    batch = {"cifar10": 4, "imagenet": 2}  # step_time.SMOKE
    # spiking layers called once per step: CIFAR10Net 6 conv + 2 fc LIF; SEW ResNet-18 one after
    # the stem, two in each of its 8 blocks and one in each of the 3 downsampling shortcuts
    neurons = {"cifar10": 8, "imagenet": 1 + 2 * 8 + 3}
    cpu = lines[0].startswith("device: cpu;")
    for (setup, method), r in rows.items():
        step_ms, images_s, loop_ms, loop_images_s = (_positive(c) for c in r[2:6])
        # both printed to 0.1: batch / (step time) within the rounding of either
        assert images_s == pytest.approx(1e3 * batch[setup] / step_ms, rel=0.01, abs=0.06)
        assert loop_images_s == pytest.approx(1e3 * batch[setup] / loop_ms, rel=0.01, abs=0.06)
        step_ratio, loop_ratio = _positive(r[7]), _positive(r[8])
        if method == "dense":
            assert (step_ratio, loop_ratio) == (1.0, 1.0)
        assert r[11].startswith(f"fused {neurons[setup]}/{neurons[setup]} (")
        if cpu:  # no device kernels to count on a CPU
            assert (r[9], r[10]) == ("0", "0%")


def test_amp_cpu_smoke_prints_both_speeds_and_their_ratio(smoke):
    lines = smoke("amp_cpu.py")
    assert lines[0].startswith("load: ") and "batch 32" in lines[1]
    speed = {}
    for amp in ("false", "bf16"):
        (line,) = [l for l in lines if l.startswith(f"amp={amp}: ")]
        speed[amp] = _positive(line.split()[1])
    (ratio,) = [l for l in lines if l.startswith("amp=false / amp=bf16: ")]
    assert _positive(ratio.split()[3]) == pytest.approx(speed["false"] / speed["bf16"], rel=0.01)


def test_quantile_cost_smoke_times_the_digits_net(smoke):
    lines = smoke("quantile_cost.py")
    (row,) = _rows(lines)
    setup, numel, recompute, keep, kthvalue, sort, held, *per_step, share = row
    assert (setup, numel) == ("digits", f"{DIGITS_THETA:,}")
    for value in (recompute, keep, kthvalue, sort, held):
        _positive(value)
    recompute_ms = float(recompute)
    # per step at intervals 1, 10, 100: the recompute over the interval; the share: every 10 over 50 ms
    assert [float(v) for v in per_step] == pytest.approx([recompute_ms, recompute_ms / 10, recompute_ms / 100],
                                                         abs=0.006)
    assert float(share.rstrip("%")) == pytest.approx(100 * recompute_ms / 10 / 50, abs=0.006)


def test_target_frontier_smoke_trains_both_variants_and_tables_them(smoke):
    lines = smoke("target_frontier.py")
    rows = _rows(lines)
    front, target = rows[0], next(r for r in rows if r[1] == "target sine@0.5")
    d_runs = {r[0]: r for r in rows if len(r) == 4}
    (hold,) = [r for r in rows if r[0] == "sine@0.5"]
    assert front[:3] == ["0.9", "D frontier (interpolated)", "0.9"]
    assert target[:2] == ["0.9", "target sine@0.5"]
    # scheduler=target zeroes the nearest count to S = 0.9 of the 58,144 θ: 52,330 of them
    assert target[2] == f"{52330 / DIGITS_THETA:.5f}, {52330 / DIGITS_THETA:.5f}"
    assert sorted(d_runs) == ["0", "2"]
    assert d_runs["0"][1] == "0.0000 (0.0000–0.0000)"  # d = 0 zeroes no weight
    s_high = float(d_runs["2"][1].split()[0])
    acc_low, acc_high = (float(d_runs[k][2].split()[0]) for k in "02")
    assert 0.9 <= s_high <= 1.0
    # the frontier at 0.9: linear between (0, top-1 at D = 0) and (s_high, top-1 at D = 2)
    assert float(front[3].split()[0]) == pytest.approx(acc_low + 0.9 / s_high * (acc_high - acc_low), abs=0.01)
    assert float(target[4]) == pytest.approx(float(target[3].split()[0]) - float(front[3].split()[0]), abs=0.015)
    # 2 epochs of 2 steps, the hold from step 0.5 * 4 = 2: d logged at steps 2, 3 and 4 of one run
    assert hold[1:4] == ["0.9", "1", "3"]
    assert _positive(lines[-1].split()[2]) and lines[-1].startswith("[target_frontier] plot: ")
    # Grad R at S = 0.9: alpha 30, then a third of it (30 ended above S) or three times (below); the closer chosen
    tried = [line.split("alpha_gr=")[1].split() for line in lines if "tried alpha_gr=" in line]
    (a1, *_, s1), (a2, *_, s2) = tried
    assert float(a1) == 30.0 and float(a2) == (10.0 if float(s1) >= 0.9 else 90.0)
    chosen, reached = (a1, s1) if abs(float(s1) - 0.9) <= abs(float(s2) - 0.9) else (a2, s2)
    (gradr,) = [r for r in rows if r[1].startswith("Grad R") and len(r) == 5]  # the methods table
    assert gradr[:3] == ["0.9", f"Grad R μ=0.05, α={float(chosen):g}", f"{reached} ({reached}–{reached})"]


def _script(script: str, *args: str) -> list[str]:
    """The stdout lines of ``python benchmarks/<script> ARGS``, which must succeed."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, check=False,
                          capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, f"{script} {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc.stdout.splitlines()


def _slots(lines: list[str]) -> dict[str, list[float]]:
    """schedule -> [trials, slots, sum of trial times, wall, utilisation] of search_cost.py's table."""
    return {r[0]: [float(c) for c in r[1:]] for r in _rows(lines) if r[0] in ("asynchronous", "batches")}


def test_search_cost_smoke_runs_both_schedules_over_every_trial(smoke):
    """benchmarks/search_cost.py --smoke: both schedules ran the 4 stand-ins (0.2, 0.05, 0.15 and
    0.1 s); each utilisation is its printed sum / (2 slots x wall)."""
    table = _slots(smoke("search_cost.py"))
    assert sorted(table) == ["asynchronous", "batches"]
    for trials, slots, busy, wall, utilisation in table.values():
        assert (trials, slots) == (4, 2)
        assert busy >= 0.5  # every process lives at least its sleep: 0.2 + 0.05 + 0.15 + 0.1
        assert 0 < utilisation <= 1
        assert utilisation == pytest.approx(busy / (2 * wall), abs=0.002 + 0.01 / wall)
    # the batches wait for the slower of each pair: max(0.2, 0.05) + max(0.15, 0.1)
    assert table["batches"][3] >= 0.35
    assert table["asynchronous"][3] >= 0.25  # 0.5 s of trials on 2 slots


def _job_log(sweep: Path, job: str, start_s: int, end_s: int) -> None:
    """A submitit job log as a job writes it: started at 20:00:<start_s>, ending at <end_s>."""
    folder = sweep / ".submitit" / job
    folder.mkdir(parents=True)
    (folder / f"{job}_0_log.err").write_text(
        f"submitit INFO (2026-12-06 20:00:{start_s:02d},000) - Starting with JobEnvironment(job_id={job})\n"
        f"[2026-12-06 20:00:{start_s + 1:02d},000][stds.run.life.epoch][INFO] - run directory: ...\n"
        f"submitit INFO (2026-12-06 20:00:{end_s:02d},500) - Exiting after successful completion\n")


def test_search_cost_reads_slot_utilisation_from_the_jobs_logs(tmp_path):
    """--train ... --read: run times from the submitit logs. Asynchronous on 2 slots: jobs over
    0-10, 0-6, 6-12 and 10-14 s (each log's end at .5 s): 4 x 0.5 + 26 = 28 s busy in 14.5 s,
    28 / 29 = 0.966; batches 0-10, 0-6 | 10-16, 10-14: 28 s busy in 16.5 s, 28 / 33 = 0.848."""
    for name, spans in (("async", [(0, 10), (0, 6), (6, 12), (10, 14)]),
                        ("batches", [(0, 10), (0, 6), (10, 16), (10, 14)])):
        for job, (start, end) in enumerate(spans):
            _job_log(tmp_path / name, str(100 + job), start, end)
    table = _slots(_script("search_cost.py", "--train", "slurm", "--n-jobs", "2", "--out", str(tmp_path), "--read"))
    assert table["asynchronous"] == [4, 2, 28.0, 14.5, round(28 / 29, 3)]
    assert table["batches"] == [4, 2, 28.0, 16.5, round(28 / 33, 3)]


def _trial(sweep: Path, number: int, epochs: int, metrics: dict | None) -> None:
    """A trial's run directory: one metrics.jsonl record per epoch trained, and its metrics.json."""
    run = sweep / str(number)
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in range(1, epochs + 1)))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps({**metrics, "epoch": epochs}))


def test_search_cost_tables_epochs_to_the_answer_from_the_trials(tmp_path):
    """--epochs --read: epochs from metrics.jsonl, the best feasible (sparsity >= 0.9, not pruned)
    final test_acc1. Without the pruner 8 + 8 + 8 = 24 epochs, best 0.93 (trial 1; trial 0 is
    infeasible); with it 8 + 3 (pruned, though 0.97) + 8 + 2 (failed) = 21: 1 - 21/24 = 12.5%
    fewer, best 0.925 (trial 2): -0.50 points."""
    none, pruner = tmp_path / "none_seed0", tmp_path / "pruner_seed0"
    for number, acc, sparsity in ((0, 0.95, 0.85), (1, 0.93, 0.92), (2, 0.90, 0.95)):
        _trial(none, number, 8, {"test_acc1": acc, "sparsity": sparsity})
    _trial(pruner, 0, 8, {"test_acc1": 0.96, "sparsity": 0.85})
    _trial(pruner, 1, 3, {"test_acc1": 0.97, "sparsity": 0.93, "pruned": True})
    _trial(pruner, 2, 8, {"test_acc1": 0.925, "sparsity": 0.91})
    _trial(pruner, 3, 2, None)
    read = [sys.executable, str(REPO / "benchmarks" / "search_cost.py"), "--epochs", "--seeds", "0", "--out",
            str(tmp_path), "--read"]
    whole, first = at_once(read, [*read, "--first", "2"])
    assert whole.returncode == first.returncode == 0, whole.stderr + first.stderr
    lines = whole.stdout.splitlines()
    rows = [r for r in _rows(lines) if r[0] == "0"]
    assert rows == [["0", "none", "3", "0", "0", "24", "0.9300 (1)"], ["0", "pruner", "4", "1", "1", "21", "0.9250 (2)"]]
    assert "epochs: 21 with the pruner, 24 without: 12.5% fewer" in lines
    assert "best feasible test_acc1, pruner minus none (points): -0.50; mean -0.50" in lines
    # --first 2: trials 0 and 1 only: 16 against 11 epochs (31.2% fewer); best 0.93 against none
    lines = first.stdout.splitlines()
    assert [r[5:] for r in _rows(lines) if r[0] == "0"] == [["16", "0.9300 (1)"], ["11", "none"]]
    assert "epochs: 11 with the pruner, 16 without: 31.2% fewer" in lines
    assert "best feasible test_acc1, pruner minus none (points): ; no seed has a feasible trial in both" in lines


def test_target_frontier_names_the_cosine_hold_and_reads_it_back(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from frontier_table import variant_of
    from target_frontier import parse_variant

    variant = parse_variant("cubic@0.35+cos0.05")
    assert variant.name == "cubic@0.35+cos0.05"
    assert variant.overrides([0.99]) == ["scheduler=target", "scheduler.ramp=cubic", "scheduler.ramp_until=0.35",
                                         "lr_scheduler=hold_cosine", "lr_scheduler.lr_lambda.floor=0.05",
                                         "scheduler.hold_keeps_weights=true", "target_sparsity=0.99"]
    saved = {"scheduler": {"kind": "target", "ramp": "cubic", "ramp_until": 0.35, "hold_keeps_weights": True},
             "lr_scheduler": {"_target_": "torch.optim.lr_scheduler.LambdaLR",
                              "lr_lambda": {"_target_": "stds.run.setup.lr.HoldCosine", "floor": 0.05}}}
    assert variant_of(saved) == variant.name
    assert variant_of({**saved, "lr_scheduler": {"_target_": "torch.optim.lr_scheduler.ConstantLR"}}) == "cubic@0.35"
    with pytest.raises(SystemExit, match=r"\+cos<floor>"):
        parse_variant("gmp:cubic@0.5+cos0")


def test_gradr_alpha_steps_out_then_interpolates_log_alpha_in_log_connectivity(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from gradr_alpha import closest, next_alpha, rounded

    assert next_alpha([], 0.9, start=0.123456) == 0.123 == rounded(0.123456)
    assert next_alpha([(0.1, 0.5)], 0.9, start=1.0) == 0.3  # below S: three times the largest alpha
    assert next_alpha([(0.1, 0.5), (0.3, 0.7)], 0.9, start=1.0) == 0.9
    assert next_alpha([(0.3, 0.97), (0.6, 0.99)], 0.9, start=1.0) == 0.1  # above: a third of the smallest
    # bracketed by (0.04, 0.8) and (0.16, 0.95): log(1 - 0.9) lies halfway between log 0.2 and log 0.05,
    # so alpha = sqrt(0.04 * 0.16) = 0.08; the runs further out (0.01, 0.3) and (1, 0.999) play no part
    tried = [(0.01, 0.3), (0.04, 0.8), (0.16, 0.95), (1.0, 0.999)]
    assert next_alpha(tried, 0.9, start=1.0) == 0.08
    assert closest(tried, 0.9) == (0.16, 0.95)
    # above S only a run that pruned everything: the bracket (0.09, 1) halved in log alpha, sqrt(0.09 * 1)
    assert next_alpha([(0.09, 0.98), (1.0, 1.0)], 0.99, start=1.0) == 0.3
    assert closest([(0.2, 0.85), (0.1, 0.95)], 0.9) == (0.1, 0.95)  # a tie: the smaller alpha


def _saved_run(run_dir: Path, config: dict, acc: float, sparsity: float) -> None:
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    (run_dir / "metrics.json").write_text(json.dumps({"epoch": 2, "epochs_planned": 2, "test_acc1": acc,
                                                      "sparsity": sparsity, "d": 0.05, "best_test_acc1": acc + 0.01}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "step": 10 * e, "test_acc1": acc}) + "\n"
                                                   for e in (1, 2)))


def test_gradr_runs_are_tabled_at_the_s_their_alpha_was_chosen_for(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from frontier_table import ALPHAS_FILE, collect, methods_markdown, summarise

    gradr = {"scheduler": {"kind": "constant"}, "sparse": {"method": "stmod"}, "flat_width": 0.05}
    for seed, alpha, acc, sparsity in [(0, 0.08, 0.96, 0.91), (1, 0.08, 0.94, 0.89), (0, 0.3, 0.7, 0.98)]:
        _saved_run(tmp_path / f"a{alpha}" / str(seed), {**gradr, "alpha_gr": alpha, "seed": seed}, acc, sparsity)
    (tmp_path / ALPHAS_FILE).write_text(json.dumps({"gradr:0.05": {"0.9": {"alpha": 0.08}}}))
    table = collect(tmp_path)
    assert sorted(table) == ["gradr:0.05"] and sorted(table["gradr:0.05"]) == [0.9]  # alpha 0.3: chosen for no S
    row = summarise(table)["target"]["gradr:0.05"]["0.9"]
    assert row["alpha"] == 0.08 and row["acc"]["mean"] == pytest.approx(0.95)
    assert row["best"]["mean"] == pytest.approx(0.96) and row["sparsity"]["min"] == 0.89
    assert methods_markdown(summarise(table)).splitlines()[2] == (
        "| 0.9 | Grad R μ=0.05, α=0.08 | 0.9000 (0.8900–0.9100) | 95.00 ± 1.41 (94.00–96.00, n=2) | "
        "96.00 ± 1.41 (95.00–97.00, n=2) |")
    (tmp_path / ALPHAS_FILE).unlink()
    assert collect(tmp_path) == {}  # without the choices, alpha is no S
