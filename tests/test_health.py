"""Diagnoses of runs that learn nothing: a fully pruned network, accuracy at chance."""

import pytest
from omegaconf import OmegaConf

from stds.run.health import at_chance, chance_limit, diagnose

CFG = OmegaConf.create({"dataset": {"num_classes": 10}, "flat_width": 0.5, "epochs": 2, "lr": 0.002,
                        "scheduler": {"kind": "sine"}})


def _record(**values):
    return {"epoch": 2, "test_acc1": 0.95, "sparsity": 0.9, **values}


def test_healthy_epoch_has_no_warning():
    assert diagnose(_record(), CFG) == []


def test_fully_pruned_default_run_says_which_key_to_change():
    # the default flat_width=0.5 with epochs=2 on the digits: sparsity 1.0, top-1 0.0972
    warnings = diagnose(_record(sparsity=1.0, test_acc1=0.0972), CFG)
    assert warnings == ["every weight is pruned (sparsity 1.0) at epoch 2: flat_width=0.5 is too large "
                        "for 2 epochs; lower flat_width or train longer (more epochs)"]


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
