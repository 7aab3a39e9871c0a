"""``scheduler=target``: d as the |θ| quantile for a wanted sparsity, by hand, held, resumed, under DDP."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from stds.run.setup.config import validate
from stds.errors import ConfigError
from stds.method.schedule import ThresholdSchedule
from stds.method.target import TargetSparsitySchedule, kth_smallest_abs, wanted_count
from stds.run.setup.build import build_threshold_schedule
from tests.conftest import ddp_sgd_steps, model_d, run_history, run_metrics, whole_and_split
from stds.method.sparse import pruned_layers, pruned_parameters, sparsify, sparsity

# three pruned layers of 4, 3 and 6 weights; two θ are exactly 0 and 0.1 appears four times
HAND_THETA = ([0.0, -0.3, 0.1, 0.1], [0.2, -0.1, 0.5], [0.0, 0.4, -0.7, 0.25, -0.1, 0.9])
# sorted |θ|: 0 0 | .1 .1 .1 .1 | .2 .25 .3 .4 .5 .7 .9  (13 values)
# k -> (the k-th smallest |θ|, #{|θ| <= it}): more than k only where ties (zeros included) force it
HAND_CASES = {0: (0.0, 2), 1: (0.0, 2), 2: (0.0, 2), 3: (0.1, 6), 6: (0.1, 6), 7: (0.2, 7),
              9: (0.3, 9), 12: (0.7, 12), 13: (0.9, 13)}


def f32(x: float) -> float:
    """x rounded to float32, as θ holds it."""
    return float(torch.tensor(x, dtype=torch.float32))


def hand_model() -> nn.Module:
    """Linear(2, 2), Linear(3, 1) and Conv2d(1, 2, 1x3) without biases, with θ = HAND_THETA."""
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(3, 1, bias=False),
                          nn.Conv2d(1, 2, (1, 3), bias=False))
    sparsify(model, "stmod", 0.0)
    with torch.no_grad():
        for theta, values in zip(pruned_parameters(model).values(), HAND_THETA, strict=True):
            theta.copy_(torch.tensor(values).reshape(theta.shape))
    return model


def hand_thetas() -> list[torch.Tensor]:
    return [torch.tensor(values) for values in HAND_THETA]


@pytest.mark.parametrize("k", sorted(HAND_CASES))
def test_kth_smallest_abs_by_hand(k: int) -> None:
    d, _ = HAND_CASES[k]
    assert kth_smallest_abs(hand_thetas(), k) == f32(d)


@pytest.mark.parametrize("k", [1, 3, 6, 7, 9, 12])
def test_schedule_prunes_the_wanted_count_or_the_ties(k: int) -> None:
    model = hand_model()
    # constant ramp: S is asked from step 0; S = k/13 asks for exactly k zeros
    schedule = TargetSparsitySchedule(k / 13, total_steps=10, ramp="constant").attach(model)
    d, zeros = HAND_CASES[k]
    assert schedule.step(0) == f32(d)
    assert model_d(model) == f32(d)
    assert sparsity(model)["zeros"] == zeros
    assert schedule.metrics() == {"d": f32(d), "target_sparsity": k / 13}


def test_k_out_of_range_and_layers_of_another_dtype() -> None:
    with pytest.raises(ValueError, match=r"\[0, 13\]"):
        kth_smallest_abs(hand_thetas(), 14)
    with pytest.raises(ValueError, match="scratch"):
        kth_smallest_abs(hand_thetas(), 3, scratch=torch.empty(12))
    scratch = torch.empty(13)
    assert kth_smallest_abs(hand_thetas(), 9, scratch) == f32(0.3)
    assert kth_smallest_abs(hand_thetas(), 3, scratch) == f32(0.1)  # reused: overwritten
    doubles = [t.double() for t in hand_thetas()]
    assert kth_smallest_abs(doubles, 8) == 0.25  # float64 θ: no rounding to float32


def test_wanted_count_is_the_nearest_count() -> None:
    assert wanted_count(0.9, 10) == 9  # 0.9 * 10 = 9.000000000000002: not 10
    assert wanted_count(0.5, 13) == 7  # 6.5: halves up
    assert wanted_count(0.9, 13) == 12  # 11.7
    assert wanted_count(0.0, 13) == 0 and wanted_count(1.0, 13) == 13
    with pytest.raises(ValueError, match="sparsity"):
        wanted_count(1.5, 13)


def test_cpu_select_equals_kthvalue_with_ties_and_zeros() -> None:
    generator = torch.Generator().manual_seed(0)
    layers = [torch.round(torch.randn(n, generator=generator) * 20) / 20 for n in (1000, 37, 4096)]
    values = torch.cat([t.abs() for t in layers])
    assert int((values == 0).sum()) > 100  # many exact zeros and many ties
    for k in (1, 50, 2000, 4567, values.numel()):
        assert kth_smallest_abs(layers, k) == float(values.kthvalue(k).values)
        assert kth_smallest_abs(layers, k) == float(np.sort(values.numpy())[k - 1])


# S = 0.8 over 4 steps: the fractions of test_schedule's EXPECTED table times 0.8
@pytest.mark.parametrize(("ramp", "expected"), [
    ("linear", [0.0, 0.2, 0.4, 0.6, 0.8, 0.8]),
    ("sine", [0.0, 0.8 * 0.14644661, 0.4, 0.8 * 0.85355339, 0.8, 0.8]),
])
def test_wanted_sparsity_follows_the_ramp(ramp: str, expected: list[float]) -> None:
    schedule = TargetSparsitySchedule(0.8, total_steps=4, ramp=ramp)
    assert [schedule.wanted(s) for s in (0, 1, 2, 3, 4, 9)] == pytest.approx(expected, abs=1e-8)
    assert schedule.at(0) == 0.0 and schedule.d == 0.0


def _sorted_abs(model: nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().abs().flatten() for t in pruned_parameters(model).values()]).sort().values


def test_d_is_held_between_recomputes_and_recomputed_at_the_last_step() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 5))  # 150 pruned weights
    sparsify(model, "stmod", 0.0)
    schedule = TargetSparsitySchedule(0.7, total_steps=7, ramp="linear", every=3).attach(model)
    thetas = list(pruned_parameters(model).values())
    for step in range(1, 8):
        with torch.no_grad():  # θ moves between steps as training would move it
            for theta in thetas:
                theta.mul_(1.01).add_(0.001)
        before = schedule.d
        d = schedule.step(step)
        if step in (3, 6, 7):  # multiples of 3, and total_steps
            k = wanted_count(0.7 * step / 7, 150)
            assert d == float(_sorted_abs(model)[k - 1])
            assert schedule.metrics()["target_sparsity"] == pytest.approx(0.7 * step / 7)
            assert sparsity(model)["zeros"] == k  # random θ: no ties
        else:
            assert d == before
    assert sparsity(model)["total"] == pytest.approx(0.7, abs=1 / 300)


def test_d_never_decreases_and_nan_holds_it() -> None:
    model = hand_model()
    schedule = TargetSparsitySchedule(9 / 13, total_steps=2, ramp="constant").attach(model)
    assert schedule.step(0) == f32(0.3)
    with torch.no_grad():
        for theta in pruned_parameters(model).values():
            theta.mul_(0.5)  # the 9th smallest |θ| is now 0.15: below d
    assert schedule.step(1) == f32(0.3)
    assert sparsity(model)["zeros"] == 11  # |θ| <= 0.3 after halving: 0 0 .05x4 .1 .125 .15 .2 .25
    with torch.no_grad():
        pruned_parameters(model)["0"][0, 0] = float("nan")
    assert schedule.step(2) == f32(0.3)


def _train(schedule: ThresholdSchedule, model: nn.Module, first: int, last: int) -> None:
    """Full-batch SGD steps ``first..last`` on fixed data, the schedule stepped after each."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.0)
    inputs = torch.linspace(-1, 1, 64 * 6).reshape(64, 6)
    targets = torch.sin(3 * inputs[:, :2])
    for step in range(first, last + 1):
        loss = ((model(inputs) - targets) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step(step)


def _net(ramp: str = "sine", ramp_until: float = 1.0) -> tuple[nn.Module, TargetSparsitySchedule]:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
    schedule = TargetSparsitySchedule(0.8, total_steps=40, ramp=ramp, every=3, ramp_until=ramp_until)
    sparsify(model, "stmod", schedule.at(0))
    return model, schedule.attach(model)


# stopped between recomputes (every 3): in today's full ramp, mid-ramp before a hold at step 20
# of 40, and in that hold
@pytest.mark.parametrize(("ramp", "ramp_until", "stop"), [("sine", 1.0, 20), ("cubic", 0.5, 14),
                                                          ("cubic", 0.5, 31), ("sine", 0.75, 35)])
def test_resume_mid_interval_ends_bitwise_as_the_uninterrupted_run(ramp: str, ramp_until: float, stop: int) -> None:
    whole, whole_schedule = _net(ramp, ramp_until)
    _train(whole_schedule, whole, 1, 40)
    first, first_schedule = _net(ramp, ramp_until)
    _train(first_schedule, first, 1, stop)
    assert first_schedule.holding(stop) == (stop > ramp_until * 40)
    saved = {"model": first.state_dict(), "schedule": first_schedule.state_dict()}
    assert all(type(value) is float for value in saved["schedule"].values())  # plain numbers
    resumed, resumed_schedule = _net(ramp, ramp_until)
    resumed.load_state_dict(saved["model"])
    resumed_schedule.load_state_dict(saved["schedule"])
    resumed_schedule.step(stop)  # what the loop does after loading
    _train(resumed_schedule, resumed, stop + 1, 40)
    assert resumed_schedule.d == whole_schedule.d > 0
    assert resumed_schedule.metrics() == whole_schedule.metrics()
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert sparsity(whole)["total"] == pytest.approx(0.8, abs=1 / 256)


# S = 0.8 over 8 steps, reached at step 4 (ramp_until = 0.5) and held: cubic at x = 1/4, 1/2 of 4
def test_wanted_sparsity_reaches_s_at_ramp_until_and_holds_it() -> None:
    schedule = TargetSparsitySchedule(0.8, total_steps=8, ramp="cubic", ramp_until=0.5)
    assert [schedule.wanted(s) for s in range(9)] == pytest.approx(
        [0.0, 0.8 * 0.578125, 0.8 * 0.875, 0.8 * 0.984375, 0.8, 0.8, 0.8, 0.8, 0.8], abs=1e-12)
    assert [schedule.holding(s) for s in (3, 4, 5, 8)] == [False, False, True, True]


def test_in_the_hold_d_follows_the_quantile_down_and_keeps_s() -> None:
    model = hand_model()
    # constant ramp, hold from step 2 on (ramp_until = 0.5 of 4 steps); S = 9/13 asks for 9 zeros;
    # the bare rule: θ itself is not moved (keep_weights=False)
    schedule = TargetSparsitySchedule(9 / 13, total_steps=4, ramp="constant", ramp_until=0.5,
                                      keep_weights=False).attach(model)
    assert schedule.step(2) == f32(0.3)
    with torch.no_grad():
        for theta in pruned_parameters(model).values():
            theta.mul_(0.5)  # the 9th smallest |θ| is now 0.15: below d, as in the ramp test above
    assert schedule.step(3) == f32(0.3) * f32(0.5)  # the ramp would hold 0.3 and 11 zeros
    assert sparsity(model)["zeros"] == 9
    with torch.no_grad():
        for theta in pruned_parameters(model).values():
            theta.mul_(4.0)  # the 9th smallest is now 0.6: d rises with it
    assert schedule.step(4) == f32(0.3) * f32(0.5) * 4
    assert sparsity(model)["zeros"] == 9
    with torch.no_grad():
        for theta in pruned_parameters(model).values():
            theta.fill_(float("nan"))
    assert schedule.step(4) == f32(0.3) * f32(0.5) * 4  # a NaN quantile: d held, not lowered


def _weights(model: nn.Module) -> list[float]:
    """w of every pruned layer, one list in layer order."""
    return [x for layer in pruned_layers(model).values() for x in layer.weight.detach().flatten().tolist()]


def _set(model: nn.Module, layer: int, index: int, value: float) -> None:
    with torch.no_grad():
        list(pruned_parameters(model).values())[layer].view(-1)[index] = value


def test_hold_keeps_the_unpruned_weights_when_d_moves_up_and_down() -> None:
    model = hand_model()
    schedule = TargetSparsitySchedule(9 / 13, total_steps=4, ramp="constant", ramp_until=0.5).attach(model)
    assert schedule.keep_weights  # the default
    assert schedule.step(2) == f32(0.3)  # not yet in the hold: θ untouched
    assert _weights(model) == pytest.approx([0, 0, 0, 0] + [0, 0, 0.2] + [0, 0.1, -0.4, 0, 0, 0.6], abs=1e-6)
    # a pruned weight regrows: 0.1 -> 0.8, w = 0.5; the 9th smallest |θ| is now 0.4, so d rises by 0.1
    _set(model, 0, 2, 0.8)
    assert schedule.step(3) == f32(0.4)
    # |θ| > 0.4 move out by 0.1 (0.5, -0.7, 0.8, 0.9 -> 0.6, -0.8, 0.9, 1.0); 0.4 is pruned, not moved
    thetas = [x for t in pruned_parameters(model).values() for x in t.detach().flatten().tolist()]
    assert thetas == pytest.approx([0, -0.3, 0.9, 0.1] + [0.2, -0.1, 0.6] + [0, 0.4, -0.8, 0.25, -0.1, 1.0], abs=1e-6)
    # every weight unpruned before and after keeps its w; the one at the threshold is pruned
    assert _weights(model) == pytest.approx([0, 0, 0.5, 0] + [0, 0, 0.2] + [0, 0, -0.4, 0, 0, 0.6], abs=1e-6)
    assert sparsity(model)["zeros"] == 9
    # an unpruned weight drifts in: -0.8 -> -0.05; the 9th smallest is 0.3, so d falls by 0.1 (last step)
    _set(model, 2, 2, -0.05)
    assert schedule.step(4) == f32(0.3)
    # |θ| > 0.4 move in by 0.1 (0.9, 0.6, 1.0 -> 0.8, 0.5, 0.9); 0.4 is revived with w = 0.1
    assert _weights(model) == pytest.approx([0, 0, 0.5, 0] + [0, 0, 0.2] + [0, 0.1, 0, 0, 0, 0.6], abs=1e-6)
    assert sparsity(model)["zeros"] == 9


def test_without_kept_weights_a_move_of_d_shifts_every_unpruned_weight() -> None:
    model = hand_model()
    schedule = TargetSparsitySchedule(9 / 13, total_steps=4, ramp="constant", ramp_until=0.5,
                                      keep_weights=False).attach(model)
    schedule.step(2)
    _set(model, 0, 2, 0.8)
    assert schedule.step(3) == f32(0.4)
    # the same regrowth as above, but every unpruned w shrinks by the 0.1 that d rose
    assert _weights(model) == pytest.approx([0, 0, 0.4, 0] + [0, 0, 0.1] + [0, 0, -0.3, 0, 0, 0.5], abs=1e-6)


@pytest.mark.parametrize("keep_weights", [True, False])
def test_trained_net_holds_s_at_every_step_of_the_hold(keep_weights: bool) -> None:
    model, schedule = _net("cubic", 0.5)
    schedule.keep_weights = keep_weights
    schedule.every = 1
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    inputs = torch.linspace(-1, 1, 64 * 6).reshape(64, 6)
    targets = torch.sin(3 * inputs[:, :2])
    n = sum(theta.numel() for theta in pruned_parameters(model).values())
    ds, regrown = [], 0
    for step in range(1, 41):
        loss = ((model(inputs) - targets) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step > 20:
            regrown += sparsity(model)["zeros"] < wanted_count(0.8, n)  # before d is recomputed
        before = torch.tensor(_weights(model))
        ds.append(schedule.step(step))
        after = torch.tensor(_weights(model))
        if step >= 20:
            assert sparsity(model)["zeros"] == wanted_count(0.8, n), step  # random θ: no ties
        if step > 20 and ds[-1] != ds[-2]:
            both = (before != 0) & (after != 0)
            moved = (after[both] - before[both]).abs().max().item()
            if keep_weights:
                assert moved < 1e-6, step  # the unpruned weights are as they were
            else:  # each unpruned w moved towards 0 by the rise of d (or away by its fall)
                assert moved == pytest.approx(abs(ds[-1] - ds[-2]), abs=1e-6), step
    assert regrown > 0 and len(set(ds[19:])) > 1  # weights regrew in the hold and d moved to hold S


def _ddp_worker(rank: int, store: str, out: str, ramp_until: float) -> None:
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
        sparsify(model, "stmod", 0.0)
        schedule = TargetSparsitySchedule(0.75, total_steps=6, ramp="linear", ramp_until=ramp_until).attach(model)
        ddp = nn.parallel.DistributedDataParallel(model)
        inputs = torch.randn(16, 8, generator=torch.Generator().manual_seed(100 + rank))  # per-rank data
        ds = ddp_sgd_steps(ddp, inputs, schedule)
        thetas = [t.detach().clone() for t in pruned_parameters(model).values()]
        torch.save({"d": ds, "thetas": thetas}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("ramp_until", [1.0, 0.5])  # 0.5: steps 4 to 6 are the hold, d may fall there
def test_ddp_ranks_compute_the_same_d_without_communication(tmp_path, ramp_until: float) -> None:
    # spawn, not fork: a fork after OpenMP threads have started can hang the children
    mp.spawn(_ddp_worker, args=(f"file://{tmp_path / 'store'}", str(tmp_path), ramp_until), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["d"] == rank1["d"] and rank0["d"][-1] > 0
    assert rank0["d"][:3] == sorted(rank0["d"][:3]) and (ramp_until == 0.5 or rank0["d"] == sorted(rank0["d"]))
    n = sum(t.numel() for t in rank0["thetas"])
    assert rank0["d"][-1] == kth_smallest_abs(rank1["thetas"], wanted_count(0.75, n))


def _validate(tiny_cfg, *overrides: str) -> None:
    validate(tiny_cfg(*overrides))


@pytest.mark.parametrize(("overrides", "message"), [
    (("scheduler=target",), "needs target_sparsity in"),
    (("scheduler=target", "target_sparsity=1.0"), "target_sparsity"),
    (("scheduler=target", "target_sparsity=0"), "target_sparsity"),
    (("scheduler=target", "target_sparsity=0.9", "sparse=identity"), "sparse=identity"),
    (("scheduler=target", "target_sparsity=0.9", "alpha_gr=1e-3"), "alpha_gr=0.001"),
    (("scheduler=target", "target_sparsity=0.9", "scheduler.ramp=cosine"), "scheduler.ramp='cosine'"),
    (("scheduler=target", "target_sparsity=0.9", "target_every_steps=0"), "target_every_steps=0"),
    (("target_sparsity=0.9",), "only by scheduler=target"),
    (("scheduler.ramp=linear",), "scheduler.ramp=linear is used only"),
    (("scheduler.hold_keeps_weights=false",), "scheduler.hold_keeps_weights=False is used only by scheduler=target"),
])
def test_config_errors_name_the_key(tiny_cfg, overrides, message) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        _validate(tiny_cfg, *overrides)
    assert "\n" not in str(raised.value)


def test_config_builds_the_target_schedule_and_ignores_flat_width(tiny_cfg) -> None:
    cfg = tiny_cfg("scheduler=target", "target_sparsity=0.95", "scheduler.ramp=linear",
                   "target_every_steps=7", "flat_width=null")
    validate(cfg)
    schedule = build_threshold_schedule(cfg, total_steps=100)
    assert isinstance(schedule, TargetSparsitySchedule)
    assert (schedule.target, schedule.ramp, schedule.every, schedule.kind) == (0.95, "linear", 7, "target")
    default = tiny_cfg("scheduler=target", "target_sparsity=0.9")
    assert OmegaConf.to_container(default.scheduler) == {"kind": "target", "ramp": "cubic", "ramp_until": 0.5,
                                                         "hold_keeps_weights": True}
    built = build_threshold_schedule(default, 100)
    assert (built.ramp, built.ramp_until, built.keep_weights) == ("cubic", 0.5, True)
    off = tiny_cfg("scheduler=target", "target_sparsity=0.9", "scheduler.hold_keeps_weights=false")
    validate(off)
    assert build_threshold_schedule(off, 100).keep_weights is False
    assert type(build_threshold_schedule(tiny_cfg(), 100)) is ThresholdSchedule
    # target_every_steps=null: total_steps // 1000, at least 1
    assert [build_threshold_schedule(default, total).every for total in (44, 1999, 2000, 500_000)] == [1, 1, 2, 500]


# end to end through stds.run.life.trainer.train on the embedded digits (needs the loop's checkpoint wiring)

@pytest.mark.slow
def test_digits_run_with_a_hold_keeps_s_at_every_epoch_end(tiny_cfg, tmp_path) -> None:
    from stds.run.life.trainer import train

    # 2 epochs of 22 steps, S reached at step 11 (ramp_until = 0.25), recomputed every step
    train(tiny_cfg("scheduler=target", "target_sparsity=0.9", "scheduler.ramp=cubic",
                   "scheduler.ramp_until=0.25"), tmp_path)
    history = run_history(tmp_path)
    n = 58_144  # pruned weights of the digits net
    for record in history:
        assert record["target_sparsity"] == 0.9
        assert abs(record["sparsity"] - 0.9) <= 1 / (2 * n) + 1e-12  # no ties at this d
    assert history[-1]["d"] != history[0]["d"]  # d moved in the hold to keep S


def test_changing_ramp_until_on_resume_is_refused() -> None:
    from stds.run.life.resume import changed_keys

    saved = {"scheduler": {"kind": "target", "ramp": "cubic", "ramp_until": 0.5}}
    now = {"scheduler": {"kind": "target", "ramp": "cubic", "ramp_until": 0.75}}
    assert changed_keys(saved, now) == [("scheduler.ramp_until", 0.5, 0.75)]
    # a checkpoint from before ramp_until (no key) resumes with the default 1: not a change
    assert changed_keys({"scheduler": {"kind": "sine"}}, {"scheduler": {"kind": "sine", "ramp_until": 1.0}}) == []


def test_a_target_checkpoint_older_than_hold_keeps_weights_resumes_with_the_rule_it_ran() -> None:
    from stds.run.life.resume import as_it_ran, changed_keys

    old = {"scheduler": {"kind": "target", "ramp": "cubic", "ramp_until": 0.5}, "seed": 0}
    # its hold moved every weight with d: false; resuming under today's default true is a change
    assert as_it_ran(old)["scheduler"]["hold_keeps_weights"] is False
    now = {"scheduler": {**old["scheduler"], "hold_keeps_weights": True}, "seed": 0}
    assert changed_keys(as_it_ran(old), now) == [("scheduler.hold_keeps_weights", False, True)]
    assert "hold_keeps_weights" not in old["scheduler"]  # the checkpoint's dict is not changed
    for other in ({"scheduler": {"kind": "sine"}}, {"scheduler": {**now["scheduler"], "hold_keeps_weights": True}}):
        assert as_it_ran(other) == other  # a D schedule, or a checkpoint that has the key


@pytest.mark.slow
def test_digits_run_ends_at_the_target_sparsity(tiny_cfg, tmp_path) -> None:
    from stds.run.life.trainer import train

    train(tiny_cfg("scheduler=target", "target_sparsity=0.9", "target_every_steps=5"), tmp_path)
    metrics, history = run_metrics(tmp_path), run_history(tmp_path)
    assert abs(metrics["sparsity"] - 0.9) <= 0.005
    assert history[-1]["target_sparsity"] == 0.9 and history[-1]["d"] > 0
    assert metrics["d"] == history[-1]["d"]
    # the defaults (cubic, ramp_until 0.5): the ramp ends at step 0.5 * 44 = 22, the first epoch's
    # last; the recomputes at steps 15 and 20 ask for the cubic at x = 15/22 and 20/22 (TensorBoard's
    # scalar, logged every 5 steps, and the first epoch's record), the one at step 25 is in the hold
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    wanted = {e.step: e.value for e in events.Scalars("target_sparsity")}
    assert wanted[15] == pytest.approx(0.9 * (1 - (1 - 15 / 22) ** 3), rel=1e-6)
    assert wanted[20] == pytest.approx(0.9 * (1 - (2 / 22) ** 3), rel=1e-6)
    assert history[0]["target_sparsity"] == pytest.approx(wanted[20], rel=1e-6)
    assert wanted[25] == pytest.approx(0.9) and history[1]["target_sparsity"] == 0.9
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["schedule"] == {"d": history[-1]["d"], "target_sparsity": 0.9}


@pytest.mark.slow
# 3 epochs of 22 steps: killed after step 30 (last checkpoint at 28, mid-ramp of the full ramp,
# between recomputes at 25 and 30) or after step 40 (last checkpoint at 35, in the hold that
# starts after step 33 = 0.5 * 66)
@pytest.mark.parametrize(("ramp_until", "kill_after"), [
    (1.0, 30), (0.5, 40)])
def test_digits_run_resumed_mid_epoch_ends_as_the_uninterrupted_one(
        tiny_cfg, tmp_path, monkeypatch, ramp_until: float, kill_after: int) -> None:
    overrides = ("scheduler=target", "target_sparsity=0.8", "target_every_steps=5", "epochs=3",
                 "checkpoint_every_steps=7", f"scheduler.ramp={'sine' if ramp_until == 1 else 'cubic'}",
                 f"scheduler.ramp_until={ramp_until}")
    whole, split = whole_and_split(tiny_cfg(*overrides), tmp_path, monkeypatch, kill_after)
    assert split["schedule"] == whole["schedule"]
    assert run_metrics(tmp_path / "split")["d"] == run_metrics(tmp_path / "whole")["d"]


def test_resume_dir_of_an_older_target_run_rebuilds_its_hold_rule(tiny_cfg, tmp_path, monkeypatch) -> None:
    import stds.run.life.resume as resume_module
    from stds.run.files import checkpoint as ckpt
    from stds.run.setup.config import to_plain

    cfg = tiny_cfg("scheduler=target", "target_sparsity=0.9", "scheduler.ramp_until=0.5")
    saved = to_plain(cfg)
    del saved["scheduler"]["hold_keeps_weights"]  # written before the key existed
    (tmp_path / "checkpoints").mkdir()
    ckpt.save_atomic({"format_version": ckpt.FORMAT_VERSION, "config": saved}, tmp_path / "checkpoints" / ckpt.LAST)
    monkeypatch.setattr(resume_module, "_given_keys", lambda cfg: [])  # `resume=DIR` and no other key
    rebuilt = resume_module.resumed_config(cfg, tmp_path)
    assert rebuilt.scheduler.hold_keeps_weights is False  # the rule it ran, not today's default
    assert build_threshold_schedule(rebuilt, 100).keep_weights is False
