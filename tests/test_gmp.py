"""Gradual magnitude pruning (``sparse=gmp``): masks against a hand-computed magnitude order, no
regrowth, the ramp's counts, the config's refusals, and a digits run that trains, resumes
bitwise, reports and exports like the other methods."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn

from stds.errors import ConfigError
from stds.method.gmp import MagnitudeMask, MagnitudePruningSchedule
from stds.method.target import wanted_count
from stds.method.sparse import pruned_parameters, sparsify, sparsity
from stds.run.setup.build import build_threshold_schedule, prepare_config
from tests.conftest import TINY, compose_train, ddp_sgd_steps, whole_and_split

# layer a: |θ| 0.5 0.1 0.3 0.05; layer b: |θ| 0.7 0.9 0.8
HAND = ([0.5, -0.1, 0.3, 0.05], [-0.7, 0.9, 0.8])


def _hand_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 1, bias=False), nn.Linear(3, 1, bias=False))
    with torch.no_grad():
        for layer, values in zip(model, HAND):
            layer.weight.copy_(torch.tensor([values]))
    sparsify(model, "gmp")
    return model


def _masks(model: nn.Module) -> list[list[bool]]:
    return [layer.parametrizations.weight[0].mask.reshape(-1).tolist() for layer in model]


@pytest.mark.parametrize(("scope", "expected"), [
    # each layer to 0.5: a drops 0.05 and 0.1 (k = 2 of 4); b drops 0.7 and 0.8 (k = round(1.5) = 2 of 3)
    ("layer", [[True, False, True, False], [False, True, False]]),
    # 0.5 of all 7 weights: k = round(3.5) = 4, the four smallest |θ| are all of layer a
    ("global", [[False, False, False, False], [True, True, True]]),
])
def test_masks_follow_the_magnitude_order(scope, expected):
    model = _hand_model()
    schedule = MagnitudePruningSchedule(0.5, total_steps=4, ramp="linear", every=4, scope=scope).attach(model)
    assert schedule.step(1) == 0.0 and _masks(model) == [[True] * 4, [True] * 3]  # between recomputes
    schedule.step(4)
    assert _masks(model) == expected
    assert schedule.d == pytest.approx(0.8 if scope == "layer" else 0.5)  # the largest |w| pruned (float32)
    w = [layer.weight.detach().reshape(-1).tolist() for layer in model]
    assert w == [pytest.approx([v if keep else 0.0 for v, keep in zip(values, mask)]) for values, mask in zip(HAND, expected)]


def test_the_ramp_prunes_exact_counts_and_masked_weights_never_return():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 5))
    sparsify(model, "gmp")
    schedule = MagnitudePruningSchedule(0.8, total_steps=40, ramp="cubic", every=5, ramp_until=0.5).attach(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    previous = [torch.ones(200, dtype=torch.bool), torch.ones(50, dtype=torch.bool)]
    for step in range(1, 41):
        optimizer.zero_grad()
        model(torch.randn(8, 20)).pow(2).mean().backward()
        for layer, mask in zip((model[0], model[2]), previous):  # no gradient reaches a pruned θ
            grad = layer.parametrizations.weight.original.grad.reshape(-1)
            assert torch.all(grad[~mask] == 0)
        optimizer.step()
        schedule.step(step)
        masks = [layer.parametrizations.weight[0].mask.reshape(-1) for layer in (model[0], model[2])]
        assert all(torch.all(old | ~new) for old, new in zip(previous, masks))  # none set again
        previous = [m.clone() for m in masks]
        if step % 5 == 0:  # S · (1 − (1 − x)³), x = step / 20, capped at 1
            x = min(step / 20, 1.0)
            wanted = 0.8 * (1 - (1 - x) ** 3)
            assert [int((~m).sum()) for m in masks] == [wanted_count(wanted, 200), wanted_count(wanted, 50)]
    assert sparsity(model)["layers"] == {"0": 0.8, "2": 0.8}


def test_config_refusals_name_the_key_and_the_fix():
    with pytest.raises(ConfigError, match=r"^sparse=gmp prunes to a sparsity on the target schedule .*"
                                          r"add scheduler=target target_sparsity=<S>$"):
        prepare_config(compose_train(*TINY, "sparse=gmp"))
    with pytest.raises(ConfigError, match=r"^sparse.scope=global is used only by sparse=gmp"):
        prepare_config(compose_train(*TINY, "sparse.scope=global"))
    with pytest.raises(ConfigError, match=r"^sparse.scope='rows' is not valid"):
        prepare_config(compose_train(*TINY, "sparse=gmp", "scheduler=target", "target_sparsity=0.9",
                                     "sparse.scope=rows"))
    with pytest.raises(ConfigError, match=r"^scheduler.kind='magnitude' is not valid"):
        prepare_config(compose_train(*TINY, "scheduler.kind=magnitude"))
    cfg = prepare_config(compose_train(*TINY, "sparse=gmp", "scheduler=target", "target_sparsity=0.9"))
    built = build_threshold_schedule(cfg, 100)
    assert type(built) is MagnitudePruningSchedule and built.scope == "layer" and built.ramp == "cubic"


GMP = ("sparse=gmp", "scheduler=target", "target_sparsity=0.8", "target_every_steps=5", "epochs=3",
       "checkpoint_every_steps=7")


@pytest.mark.slow
# 3 epochs of 22 steps, the ramp to step 33: killed after step 30 (last checkpoint at 28, mid-ramp)
# or after step 40 (last checkpoint at 35, in the hold)
@pytest.mark.parametrize("kill_after", [30, 40])
def test_a_gmp_run_resumed_mid_epoch_ends_as_the_uninterrupted_one(tmp_path, monkeypatch, kill_after):
    whole, split = whole_and_split(compose_train(*TINY, *GMP), tmp_path, monkeypatch, kill_after)
    assert split["schedule"] == whole["schedule"]
    metrics = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    masks = {name: v for name, v in whole["model"].items() if name.endswith(".mask")}
    zeros = sum(int((~m).sum()) for m in masks.values())
    assert zeros == sum(wanted_count(0.8, m.numel()) for m in masks.values())  # each layer to S
    assert metrics["sparsity"] == pytest.approx(zeros / sum(m.numel() for m in masks.values()))

    from stds.results.pruned import export_run
    from stds.results.sweep import collect_runs, write_report

    row = next(csv.DictReader(write_report(collect_runs([tmp_path / "whole"]), tmp_path / "report")["csv"].open()))
    assert row["method"] == "GMP" and float(row["sparsity"]) == pytest.approx(metrics["sparsity"])
    blob = torch.load(export_run(tmp_path / "whole", verbose=False), weights_only=True)
    plain_zeros = sum(int((blob["state_dict"][k.replace(".parametrizations.weight.0.mask", ".weight")] == 0).sum())
                      for k in masks)
    assert plain_zeros == zeros
    import nir

    from stds.results.nir_file import export_nir, zero_weights

    written = export_nir(tmp_path / "whole", verbose=False)
    graph = nir.read(written.path)
    assert zero_weights(graph, graph.metadata["pruned_layers"].split(",")) == zeros == written.zeros_in_run


def test_pruned_parameters_of_a_gmp_model_are_its_thetas():
    model = _hand_model()
    thetas = pruned_parameters(model)
    assert [t.reshape(-1).tolist() for t in thetas.values()] == [pytest.approx(v) for v in HAND]
    assert all(isinstance(layer.parametrizations.weight[0], MagnitudeMask) for layer in model)


def _ddp_worker(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
        sparsify(model, "gmp")
        schedule = MagnitudePruningSchedule(0.75, total_steps=6, ramp="linear", ramp_until=0.5,
                                            scope="global").attach(model)
        ddp = nn.parallel.DistributedDataParallel(model)
        inputs = torch.randn(16, 8, generator=torch.Generator().manual_seed(100 + rank))  # per-rank data
        ddp_sgd_steps(ddp, inputs, schedule)
        masks = [layer.parametrizations.weight[0].mask.clone() for layer in (model[0], model[2])]
        torch.save({"masks": masks, "d": schedule.d}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_prune_the_same_weights_without_communication(tmp_path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(f"file://{tmp_path / 'store'}", str(tmp_path)), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(rank0["masks"], rank1["masks"])) and rank0["d"] == rank1["d"]
    assert sum(int((~m).sum()) for m in rank0["masks"]) == wanted_count(0.75, 8 * 32 + 32 * 4)
