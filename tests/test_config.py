"""The composed config: every group option, every preset, the schema's checks."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from hydra.errors import ConfigCompositionException

from tests.conftest import CONF, compose_train
from stds.errors import ConfigError
from stds.run.setup.build import prepare_config


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_default_is_stds_on_digits():
    cfg = compose_train()
    assert cfg.dataset._target_ == "stds.data.digits"
    assert cfg.model._target_.endswith("DigitsNet")
    assert cfg.sparse.method == "stmod" and cfg.scheduler.kind == "sine"
    assert cfg.alpha_gr == 0.0 and cfg.device == "auto"


@pytest.mark.parametrize("group", ["sparse", "scheduler", "optimizer", "lr_scheduler", "dataset", "model"])
def test_every_option_of_every_group_composes(group):
    options = _options(group)
    assert options, group
    for option in options:
        cfg = compose_train(f"{group}={option}")
        assert OmegaConf.select(cfg, group) is not None


def test_optimizers_and_lr_schedules_instantiate_with_the_parameters():
    params = [torch.nn.Parameter(torch.zeros(2))]
    for opt in _options("optimizer"):
        for sched in _options("lr_scheduler"):
            cfg = compose_train(f"optimizer={opt}", f"lr_scheduler={sched}", "lr=0.05")
            optimizer = instantiate(cfg.optimizer)(params=params)
            assert optimizer.param_groups[0]["lr"] == 0.05
            instantiate(cfg.lr_scheduler)(optimizer=optimizer)


def test_cosine_t_max_follows_epochs_unless_set():
    assert compose_train("epochs=7", "lr_scheduler=cosine").lr_scheduler.T_max == 7
    # the ImageNet presets set T_max: ${epochs} too: the cosine ends at the last epoch of any length
    assert compose_train("experiment=imagenet_dense", "epochs=3").lr_scheduler.T_max == 3


PAPER = {
    "cifar10_dense": dict(T=8, lr=1e-4, batch_size=16, epochs=2048, amp="fp16", loss="mse", method="identity"),
    "cifar10_stds": dict(T=8, lr=1e-4, batch_size=16, epochs=2048, amp="fp16", loss="mse", method="stmod"),
    "cifar10_gradr": dict(T=8, lr=1e-4, batch_size=16, epochs=2048, amp="fp16", loss="mse", method="stmod"),
    "imagenet_dense": dict(T=4, lr=0.1, batch_size=32, epochs=320, amp="fp16", loss="ce", method="identity"),
    "imagenet_stds": dict(T=4, lr=0.1, batch_size=32, epochs=320, amp="fp16", loss="ce", method="stmod"),
    "imagenet_gradr": dict(T=4, lr=0.1, batch_size=32, epochs=320, amp="fp16", loss="ce", method="stmod"),
}
GIVEN = {"imagenet_stds": ["flat_width=0.6"], "imagenet_gradr": ["flat_width=0.05", "alpha_gr=2e-5"],
         "cifar10_gradr": ["flat_width=0.5", "alpha_gr=1e-3"]}
# the Grad R presets train only the pruned theta, as published (docs/gradr.md)
GRADR_OPTIMIZE = {"cifar10_gradr": "pruned", "imagenet_gradr": "pruned"}


@pytest.mark.parametrize("preset", sorted(PAPER))
def test_presets_hold_the_paper_settings(preset):
    cfg = compose_train(f"experiment={preset}", *GIVEN.get(preset, []))
    want = PAPER[preset]
    got = dict(T=cfg.T, lr=cfg.lr, batch_size=cfg.batch_size, epochs=cfg.epochs, amp=cfg.amp,
               loss=cfg.loss.value, method=cfg.sparse.method)
    assert got == want
    if preset.startswith("cifar10"):
        assert cfg.model._target_.endswith("CIFAR10Net") and cfg.optimizer._target_ == "torch.optim.Adam"
        assert cfg.dataset._target_ == "stds.data.cifar10"
    else:
        assert cfg.optimizer._target_ == "torch.optim.SGD" and cfg.optimizer.momentum == 0.9
        assert cfg.lr_scheduler.T_max == 320 and cfg.model.connect_f == "ADD"
    kind = {"cifar10_stds": "sine", "imagenet_stds": "sine"}.get(preset, "constant")
    assert cfg.scheduler.kind == kind
    assert cfg.gradr_optimize.value == GRADR_OPTIMIZE.get(preset, "all")
    assert set(PAPER) == set(_options("experiment"))


@pytest.mark.parametrize(
    "preset, key", [("imagenet_stds", "flat_width"), ("imagenet_gradr", "flat_width"), ("imagenet_gradr", "alpha_gr"),
                    ("cifar10_gradr", "flat_width"), ("cifar10_gradr", "alpha_gr")]
)
def test_presets_that_need_a_value_say_which(preset, key):
    others = [o for o in GIVEN[preset] if not o.startswith(key)]
    with pytest.raises(ConfigError, match=f"{key} is not set"):
        prepare_config(compose_train(f"experiment={preset}", "dataset=digits", *others))


@pytest.mark.parametrize(
    "overrides, message",
    [(["sparse=identity", "alpha_gr=0"], "gradr_optimize=pruned trains only pruned weights and sparse=identity"),
     (["alpha_gr=0"], "gradr_optimize=pruned is the published Grad R baseline and alpha_gr=0")],
)
def test_gradr_optimize_pruned_needs_pruning_and_grad_r(overrides, message):
    with pytest.raises(ConfigError, match=message):
        prepare_config(compose_train("gradr_optimize=pruned", *overrides))
    assert prepare_config(compose_train("gradr_optimize=pruned", "alpha_gr=0.1")).gradr_optimize.value == "pruned"
    assert "gradr_optimize=some" in _compose_error("gradr_optimize=some")


def test_unknown_option_fails_at_compose_time_naming_the_group():
    with pytest.raises(ConfigCompositionException, match="sparse"):
        compose_train("sparse=magic")


def _compose_error(*overrides: str) -> str:
    with pytest.raises(ConfigCompositionException) as info:
        compose_train(*overrides)
    return f"{info.value} {info.value.__cause__}"


def test_an_unregistered_method_is_refused_with_the_registered_ones():
    with pytest.raises(ConfigError) as info:
        prepare_config(compose_train("sparse.method=magic"))
    assert str(info.value).startswith("sparse.method='magic' is not valid; use one of gmp, identity, st, stmod (")


def test_wrong_types_fail_at_compose_time():
    assert "T=abc" in _compose_error("T=abc")
    assert "flat_widht" in _compose_error("flat_widht=1")


def test_relative_dataset_root_becomes_absolute(tmp_path, monkeypatch):
    (tmp_path / "data" / "cifar10").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    cfg = prepare_config(compose_train("dataset=cifar10"))
    assert Path(cfg.dataset.root) == tmp_path / "data" / "cifar10"


@pytest.mark.parametrize("override", ["flat_width=nan", "flat_width=inf", "alpha_gr=nan", "alpha_gr=inf",
                                      "lr=nan", "lr=inf"])
def test_nan_and_inf_are_refused_naming_the_key(override):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as info:
        prepare_config(compose_train(override))
    assert str(info.value) == f"{key}={value} is not a finite number; set {key}=<a finite value>"


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf"])
def test_collective_timeout_must_be_a_positive_number_of_seconds(value):
    with pytest.raises(ConfigError) as info:
        prepare_config(compose_train(f"distributed.timeout_s={value}"))
    assert str(info.value).startswith(f"distributed.timeout_s={float(value)} must be a number of seconds > 0")
    assert prepare_config(compose_train("distributed.timeout_s=30")).distributed.timeout_s == 30


def test_unknown_key_and_wrong_type_against_the_schema_are_config_errors():
    from stds.run.setup.config import typed_config

    with pytest.raises(ConfigError, match=r"^flat_widht is not a config key; check its spelling"):
        typed_config({"flat_widht": 1})
    with pytest.raises(ConfigError, match=r"^T: Value 'abc' .* give T a value of its type$"):
        typed_config({"T": "abc"})
    assert typed_config({"T": 8}).T == 8


@pytest.mark.parametrize("override, key, message", [
    ("model.neuron.kind=bogus", "model", "model.neuron.kind='bogus' is not valid; use one of lif, if"),
    ("model.neuron.backend=cupy", "model", "model.neuron.backend='cupy': SpikingJelly 2.x has no CuPy backend; "
     "its fused CUDA/Triton kernels are used automatically on GPU with backend=auto; set model.neuron.backend=auto"),
    ("dataset.test_fraction=0", "dataset", "dataset.test_fraction=0 is not valid; use a value in (0, 1)"),
    ("+model.foo=1", "model", "model: DigitsNet.__init__() got an unexpected keyword argument 'foo'; "
     "remove or rename that key of model"),
])
def test_instantiate_node_gives_the_one_line_error_not_hydras_wrapper(override, key, message):
    from stds.run.setup.config import instantiate_node

    cfg = compose_train(override)
    with pytest.raises(ConfigError) as info:
        instantiate_node(cfg[key], key)
    assert str(info.value) == message
    assert isinstance(instantiate_node(compose_train()[key], key), object)  # the default builds
