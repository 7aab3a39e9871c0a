"""Diagnoses of runs that learn nothing: a fully pruned or over-pruned network, accuracy at chance,
accuracy that falls while sparsity rises."""

import pytest
from omegaconf import OmegaConf

from stds.run.measure.health import at_chance, chance_limit, diagnose, diagnose_run

CFG = OmegaConf.create({"dataset": {"num_classes": 10}, "flat_width": 0.5, "epochs": 2, "lr": 0.002,
                        "scheduler": {"kind": "sine"}})


PRUNED_FIX = ("{head}: flat_width=0.5 is too large for 2 epochs; lower flat_width (e.g. flat_width=0.05), "
              "train more epochs, or ask for a sparsity with scheduler=target target_sparsity=0.9")


def _record(**values):
    return {"epoch": 2, "test_acc1": 0.95, "sparsity": 0.9, **values}


def test_healthy_epoch_has_no_warning():
    assert diagnose(_record(), CFG) == []


def test_fully_pruned_default_run_says_which_key_to_change():
    # the default flat_width=0.5 with epochs=2 on the digits: sparsity 1.0, top-1 0.0972
    warnings = diagnose(_record(sparsity=1.0, test_acc1=0.0972), CFG)
    assert warnings == [PRUNED_FIX.format(head="every weight is pruned (sparsity 1.0) at epoch 2")]


def test_fully_pruned_under_the_target_schedule_names_target_sparsity():
    cfg = OmegaConf.merge(CFG, {"scheduler": {"kind": "target"}, "target_sparsity": 0.99})
    (warning,) = diagnose(_record(sparsity=1.0), cfg)
    assert "target_sparsity=0.99" in warning and "lower target_sparsity" in warning


def test_chance_limit_is_chance_plus_half_of_it_at_most_five_points():
    assert chance_limit(10) == pytest.approx(0.1 + 0.05)
    assert chance_limit(2) == pytest.approx(0.5 + 0.05)
    assert chance_limit(1000) == pytest.approx(0.001 + 0.0005)


@pytest.mark.parametrize("acc, warned", [(0.10, True), (0.15, True), (0.1501, False), (0.0, True)])
def test_accuracy_at_chance_for_an_epoch(acc, warned):
    warnings = diagnose(_record(epoch=1, test_acc1=acc), CFG, previous=_record(epoch=0, test_acc1=0.1))
    assert bool(warnings) == warned
    assert bool(warnings) == warned
    if warned:
        assert warnings == [f"test_acc1 {acc:.4f} is at chance (1/10 = 0.1000) after epoch 1: the network "
                            "learns nothing; lower lr (now 0.002) or check the data (labels, "
                            "dataset.num_classes, normalisation)"]


def test_one_early_epoch_at_chance_is_not_warned_but_ending_there_is():
    # the digits net with batch 64 is at chance after epoch 1, then at 0.97 after epoch 2
    first = _record(epoch=1, test_acc1=0.0972)
    assert diagnose(first, CFG) == []
    assert diagnose(_record(epoch=2, test_acc1=0.9667), CFG, previous=first) == []
    (warning,) = diagnose(_record(epoch=2, test_acc1=0.0972), CFG, previous=_record(epoch=1, test_acc1=0.5))
    assert "at chance" in warning and "after epoch 2" in warning


def test_chance_on_imagenet_is_a_tenth_of_a_percent():
    cfg = OmegaConf.merge(CFG, {"dataset": {"num_classes": 1000}})
    assert at_chance(_record(epoch=2, test_acc1=0.0014), cfg) is not None
    assert at_chance(_record(epoch=2, test_acc1=0.02), cfg) is None  # one epoch of real learning


def test_plain_dict_config_works_too():
    cfg = OmegaConf.to_container(CFG)
    assert len(diagnose(_record(sparsity=1.0), cfg)) == 1


@pytest.mark.parametrize("sparsity, acc, warned", [(0.995, 0.10, True), (0.995, 0.16, False), (0.99, 0.10, False)])
def test_over_pruned_at_chance_names_the_pruning_fix_not_the_lr(sparsity, acc, warned):
    # epoch 1 alone at chance is no warning (tested above), but at sparsity > 0.99 it is over-pruning
    warnings = diagnose(_record(epoch=1, sparsity=sparsity, test_acc1=acc), CFG)
    if not warned:
        assert all("over-pruned" not in w for w in warnings)
        return
    assert warnings == [PRUNED_FIX.format(
        head=f"over-pruned: sparsity {sparsity:.4f} with test_acc1 {acc:.4f} at chance (1/10) at epoch 1")]
    # two epochs at chance over 0.99 sparsity: still the pruning warning, never "lower lr"
    (again,) = diagnose(_record(epoch=2, sparsity=sparsity, test_acc1=acc), CFG, previous=_record(test_acc1=acc))
    assert "lower lr" not in again and "lower flat_width" in again


def test_over_pruned_target_run_names_target_sparsity():
    cfg = OmegaConf.merge(CFG, {"scheduler": {"kind": "target"}, "target_sparsity": 0.999})
    (warning,) = diagnose(_record(sparsity=0.999, test_acc1=0.1), cfg)
    assert warning.endswith("target_sparsity=0.999 is more than this network keeps in 2 epochs; lower "
                            "target_sparsity or train more epochs")


def _history(*points):
    return [{"epoch": i + 1, "test_acc1": acc, "sparsity": sp, "warnings": []} for i, (acc, sp) in enumerate(points)]


def test_accuracy_falling_while_sparsity_rises_is_over_pruning():
    # the best epoch 2 (0.90 at 0.60) to the last (0.80 at 0.95): fell 0.10 > 0.05, rose 0.35 > 0.01
    history = _history((0.5, 0.1), (0.90, 0.60), (0.85, 0.90), (0.80, 0.95))
    assert diagnose_run(history, CFG) == [PRUNED_FIX.format(
        head="over-pruned: test_acc1 fell from 0.9000 at epoch 2 (sparsity 0.6000) to 0.8000 at epoch 4 "
             "(sparsity 0.9500)")]


@pytest.mark.parametrize("points", [
    ((0.90, 0.60), (0.86, 0.95)),  # fell 0.04: within the noise the warning allows
    ((0.90, 0.60), (0.80, 0.605)),  # fell, but sparsity rose only 0.005: not the pruning
    ((0.80, 0.60), (0.90, 0.95)),  # rose: healthy
    ((0.90, 0.60),),  # one epoch: nothing to compare
])
def test_no_falling_warning_for_small_drops_or_no_pruning(points):
    assert diagnose_run(_history(*points), CFG) == []


def test_no_second_warning_when_the_last_epoch_is_already_warned():
    history = _history((0.9, 0.6), (0.1, 1.0))
    history[-1]["warnings"] = ["every weight is pruned"]
    assert diagnose_run(history, CFG) == []


def test_no_weight_pruned_at_a_threshold_above_zero_is_warned():
    # lr=1e9 on the digits: after epoch 1 of 2, d = 0.25 and sparsity 0.0 (|theta| ~ 1e9)
    cfg = OmegaConf.merge(CFG, {"sparse": {"method": "stmod"}, "lr": 1e9})
    (warning,) = diagnose(_record(epoch=1, sparsity=0.0, d=0.25), cfg)
    assert warning == ("no weight is pruned (sparsity 0.0) at epoch 1 although d=0.25: every |theta| grew "
                       "past the threshold; lower lr (now 1000000000.0) or raise flat_width")
    assert diagnose(_record(sparsity=0.0, d=0.0), cfg) == []  # d = 0 prunes nothing by design
    assert diagnose(_record(sparsity=1e-6, d=0.25), cfg) == []
    dense = OmegaConf.merge(CFG, {"sparse": {"method": "identity"}})
    assert diagnose(_record(sparsity=0.0, d=0.25), dense) == []
