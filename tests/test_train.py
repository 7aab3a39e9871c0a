"""The training loop, in process: metric files, the threshold schedule, resume, bad input."""


import pytest

from tests.conftest import kill_after_steps, run_history, run_metrics
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import stds.run.life.loop as train_module
from stds.run.files import checkpoint as ckpt
from stds.errors import CheckpointError, ConfigError, NonFiniteLossError
from stds.method.schedule import threshold_at
from stds.run.life.trainer import train


def test_run_writes_metrics_tensorboard_and_checkpoints(tiny_cfg, tmp_path):
    result = train(tiny_cfg("flat_width=0.1", "logging.synops=true", "logging.synops_samples=4"), tmp_path)
    metrics = run_metrics(tmp_path)
    assert result == metrics["test_acc1"]
    assert metrics["epoch"] == metrics["epochs_planned"] == 2
    steps = (1797 - 360) // 64  # 1437 training digits, drop_last
    assert metrics["step"] == 2 * steps
    for key in ("test_acc1", "test_acc5", "best_test_acc1", "sparsity"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["test_acc5"] >= metrics["test_acc1"]
    assert metrics["best_test_acc1"] == max(r["test_acc1"] for r in run_history(tmp_path))
    assert [r["epoch"] for r in run_history(tmp_path)] == [1, 2]
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 2 * steps
    assert (tmp_path / "checkpoints" / "best.pt").exists()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert {"test_acc1", "test_acc5", "train_loss", "sparsity", "d", "step_loss", "images_per_s", "ms_per_step",
            "data_wait_share", "eta_epoch_s", "eta_run_s", "epoch_time_s", "eval_time_s",
            "train_images_per_s"} <= set(tags["scalars"])
    assert [e.value for e in events.Scalars("test_acc1")] == pytest.approx(
        [r["test_acc1"] for r in run_history(tmp_path)])
    assert any(tag.startswith("theta/") for tag in tags["histograms"])
    # the static stem conv (1 -> 32, 3x3, padding 1) on 8x8 digits: 64 positions x its non-zero weights
    theta = state["model"]["stem.0.parametrizations.weight.original"]
    d = float(state["model"]["stem.0.parametrizations.weight.0.d"])
    assert metrics["first_layer_macs"] == 64 * int((theta.abs() > d).sum())
    assert metrics["synops"] > 0 and set(metrics["firing_rates"]) >= {"features.0", "features.3"}
    assert all(0.0 <= rate <= 1.0 for rate in metrics["firing_rates"].values())


@pytest.mark.slow
def test_threshold_follows_the_schedule_after_every_step(tiny_cfg, tmp_path):
    cfg = tiny_cfg("flat_width=0.4", "scheduler=linear")
    train(cfg, tmp_path)
    history = run_history(tmp_path)
    total = history[-1]["step"]
    for record in history:
        assert record["d"] == pytest.approx(0.4 * record["step"] / total)
    assert history[-1]["d"] == pytest.approx(0.4)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    d_buffers = [v for k, v in state["model"].items() if k.endswith("parametrizations.weight.0.d")]
    assert d_buffers and all(float(v) == pytest.approx(0.4) for v in d_buffers)
    assert threshold_at(total // 2, total, 0.4, "linear") == pytest.approx(0.2)


@pytest.mark.slow
def test_sparsity_reported_matches_the_weights(tiny_cfg, tmp_path):
    train(tiny_cfg("flat_width=0.3"), tmp_path)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    zeros = numel = 0
    for key, theta in state["model"].items():
        if key.endswith("parametrizations.weight.original"):
            d = state["model"][key.replace("original", "0.d")]
            w = torch.sign(theta) * torch.clamp(theta.abs() - d, min=0)
            zeros += int((w == 0).sum())
            numel += w.numel()
    assert run_metrics(tmp_path)["sparsity"] == pytest.approx(zeros / numel)


def _stop_after(monkeypatch, calls: int):
    kill_after_steps(monkeypatch, calls)


SAME = ("test_acc1", "test_acc5", "best_test_acc1", "sparsity", "step", "epoch", "d")


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("checkpoint_every_steps=7",)], ids=["per-epoch", "mid-epoch"])
def test_interrupted_run_resumes_to_the_same_result(tiny_cfg, tmp_path, monkeypatch, extra):
    overrides = ("epochs=3", "flat_width=0.3", *extra)
    train(tiny_cfg(*overrides), tmp_path / "whole")
    _stop_after(monkeypatch, 30)  # 22 steps per epoch: killed in the second epoch
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(*overrides), tmp_path / "split")
    assert not (tmp_path / "split" / "metrics.json").exists()
    monkeypatch.undo()
    train(tiny_cfg(*overrides), tmp_path / "split")
    whole, split = run_metrics(tmp_path / "whole"), run_metrics(tmp_path / "split")
    assert {k: split[k] for k in SAME} == {k: whole[k] for k in SAME}
    strip = lambda rs: [{k: r[k] for k in ("epoch", "step", "test_acc1", "train_loss")} for r in rs]
    assert strip(run_history(tmp_path / "split")) == strip(run_history(tmp_path / "whole"))


@pytest.mark.slow
def test_corrupt_checkpoint_is_an_error_not_a_fresh_start(tiny_cfg, tmp_path):
    last = tmp_path / "checkpoints" / "last.pt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="last.pt"):
        train(tiny_cfg(), tmp_path)
    assert last.read_bytes() == b"not a checkpoint"
    assert "CheckpointError" in (tmp_path / "error.txt").read_text()


@pytest.mark.slow
def test_checkpoint_of_another_experiment_is_refused(tiny_cfg, tmp_path):
    train(tiny_cfg("epochs=1", "flat_width=0.3"), tmp_path)
    with pytest.raises(CheckpointError, match="flat_width"):
        train(tiny_cfg("epochs=2", "flat_width=0.5"), tmp_path)


@pytest.mark.slow
def test_nan_loss_stops_with_epoch_and_step_and_keeps_last_checkpoint(tiny_cfg, tmp_path, monkeypatch):
    real = train_module.loss_fn
    calls = {"n": 0}

    def poisoned(kind, scores, labels):
        loss = real(kind, scores, labels)
        if not torch.is_grad_enabled():  # evaluation
            return loss
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == 30 else loss  # step 30 is in epoch 2

    monkeypatch.setattr(train_module, "loss_fn", poisoned)
    with pytest.raises(NonFiniteLossError, match="epoch 2, step 30"):
        train(tiny_cfg("logging.log_every_steps=1000"), tmp_path)
    state = ckpt.load(tmp_path / "checkpoints" / "last.pt")
    assert state["epoch"] == 1 and all(
        torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert "epoch 2, step 30" in (tmp_path / "error.txt").read_text()


@pytest.mark.slow
def test_grad_r_run_with_constant_threshold(tiny_cfg, tmp_path):
    train(tiny_cfg("scheduler=constant", "flat_width=0.05", "alpha_gr=0.5", "epochs=1"), tmp_path)
    history = run_history(tmp_path)
    assert history[0]["d"] == pytest.approx(0.05)


@pytest.mark.slow
def test_amp_true_trains_in_bf16_on_cpu(tiny_cfg, tmp_path):
    """amp=true is fp16, which a CPU runs as bf16: the convolutions compute in bf16, and a training
    step from the same start gives a loss near fp32's but not equal to it (bf16 rounding); a whole
    run under amp ends with finite figures."""
    from stds.run.setup.build import build_run, prepare_config
    from stds.run.setup.distributed import DistEnv

    losses = {}
    for amp in ("true", "false"):
        cfg = prepare_config(tiny_cfg(f"amp={amp}", "flat_width=0.05"))
        run = build_run(cfg, DistEnv(0, 0, 1, torch.device("cpu")), tmp_path / amp)
        dtypes = []
        conv = next(m for m in run.core.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
        images, labels = next(iter(run.train_loader))
        losses[amp], _ = train_module.train_step(run, images, labels)
        assert dtypes == [torch.bfloat16 if amp == "true" else torch.float32]
    assert cfg.amp == "false" and losses["true"] != losses["false"]
    assert float(losses["true"]) == pytest.approx(float(losses["false"]), rel=0.05)
    train(tiny_cfg("amp=true", "flat_width=0.05", "epochs=1"), tmp_path / "run")
    metrics = run_metrics(tmp_path / "run")
    assert metrics["epoch"] == 1 and 0.0 <= metrics["test_acc1"] <= 1.0 and 0.0 < metrics["sparsity"] < 1.0


@pytest.mark.parametrize(
    "override, key",
    [("flat_width=-1", "flat_width"), ("alpha_gr=-0.1", "alpha_gr"), ("T=0", "T"), ("epochs=0", "epochs"),
     ("scheduler.kind=quartic", "scheduler.kind"), ("device=tpu", "device")],
)
def test_bad_values_name_the_key(tiny_cfg, tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        train(tiny_cfg(override), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_missing_dataset_root_names_the_key(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match="dataset.root"):
        train(tiny_cfg("dataset=cifar10", f"dataset.root={tmp_path}/nowhere"), tmp_path)


@pytest.mark.slow
def test_a_fully_pruned_run_says_so_in_the_log_and_metrics(tiny_cfg, tmp_path, caplog):
    # the default D = 0.5 over 2 short epochs prunes every weight of the digits net
    train(tiny_cfg("flat_width=0.5"), tmp_path)
    metrics = run_metrics(tmp_path)
    assert metrics["sparsity"] == 1.0
    expected = ("every weight is pruned (sparsity 1.0) at epoch 2: flat_width=0.5 is too large for 2 "
                "epochs; lower flat_width (e.g. flat_width=0.05), train more epochs, or ask for a sparsity "
                "with scheduler=target target_sparsity=0.9")
    assert metrics["warnings"] == [expected]
    assert expected in caplog.text
    assert "lower lr" not in caplog.text  # the pruning, not the learning rate, is the cause


@pytest.mark.slow
def test_throughput_is_logged_and_written(tiny_cfg, tmp_path, caplog):
    caplog.set_level("INFO", logger="stds.run.life.loop")
    train(tiny_cfg("logging.log_every_steps=10"), tmp_path)
    steps = (1797 - 360) // 64
    for record in run_history(tmp_path):
        assert "time_s" not in record
        assert 0 < record["eval_time_s"] < record["epoch_time_s"]
        train_s = record["epoch_time_s"] - record["eval_time_s"]
        assert record["train_images_per_s"] * train_s == pytest.approx(steps * 64, rel=1e-6)
    lines = [r.getMessage() for r in caplog.records if "img/s" in r.getMessage() and "ETA epoch" in r.getMessage()]
    assert len(lines) == 2 * (steps // 10) + 2  # every 10 steps, and at the end of each epoch
    assert "ms/step" in lines[0] and "data " in lines[0]


@pytest.mark.parametrize("value, normalized, dtype", [
    ("true", "fp16", torch.bfloat16), ("fp16", "fp16", torch.bfloat16), ("bf16", "bf16", torch.bfloat16),
    ("false", "false", None)])
def test_amp_values_and_their_autocast_dtype_on_cpu(tiny_cfg, value, normalized, dtype):
    from stds.run.setup.build import amp_dtype, prepare_config

    cfg = prepare_config(tiny_cfg(f"amp={value}"))
    assert cfg.amp == normalized
    assert amp_dtype(cfg, torch.device("cpu")) is dtype  # no fast fp16 on a CPU: bf16 there
    assert amp_dtype(cfg, torch.device("cuda")) is {"fp16": torch.float16, "bf16": torch.bfloat16,
                                                     "false": None}[normalized]


def test_amp_unknown_value_names_the_key(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match="amp='fp8' is not valid; use amp=false, amp=fp16 or amp=bf16"):
        train(tiny_cfg("amp=fp8"), tmp_path)
