"""The private APIs of our pinned dependencies that `stds` relies on still look as they did when
tested (pyproject.toml pins the ranges); each failure names the API in one line."""

from __future__ import annotations

import inspect

import pytest
import torch
from spikingjelly.activation_based import neuron

from stds.errors import ConfigError
from stds.models import neurons
from stds.models.neurons import MATERIALIZE_STATES_PARAMETERS, check_spikingjelly_contract, make_neuron


def test_spikingjelly_materialize_states_has_the_tested_signature():
    api = "spikingjelly.activation_based.neuron.BaseNode.materialize_states"
    assert hasattr(neuron.BaseNode, "materialize_states"), f"{api} is gone"
    names = tuple(inspect.signature(neuron.BaseNode.materialize_states).parameters)
    assert names == MATERIALIZE_STATES_PARAMETERS, f"{api}{names} changed"
    check_spikingjelly_contract()


def test_spikingjelly_materialize_states_returns_one_state_per_state():
    node = neuron.LIFNode(step_mode="m")
    assert hasattr(node, "_neuron_precision"), "spikingjelly BaseNode._neuron_precision is gone"
    x = torch.zeros(2, 3, 4)
    out = node.materialize_states((x,), (0.0,), "m")
    assert isinstance(out, tuple) and len(out) == 1, "BaseNode.materialize_states no longer returns (v,)"
    assert out[0].shape == x.shape[1:], "BaseNode.materialize_states no longer shapes v as one time step"


def test_a_changed_contract_is_one_line_naming_the_api(monkeypatch):
    def other(self, inputs, step_mode):  # a future signature
        return ()

    monkeypatch.setattr(neuron.BaseNode, "materialize_states", other)
    with pytest.raises(ConfigError, match=r"^spikingjelly\.activation_based\.neuron\.BaseNode\.materialize_states"
                                          r"\('self', 'inputs', 'step_mode'\) is not \(inputs, states, step_mode\)"):
        make_neuron(kind="lif", backend="auto")
    assert isinstance(make_neuron(kind="lif", backend="torch"), neuron.SimpleLIFNode)  # the way around it
    assert neurons.check_spikingjelly_contract is check_spikingjelly_contract


def test_torch_dispatch_guard_used_by_synops_exists():
    assert hasattr(torch._C, "_ExcludeDispatchKeyGuard"), "torch._C._ExcludeDispatchKeyGuard is gone"
    assert hasattr(torch._C.DispatchKey, "Python"), "torch._C.DispatchKey.Python is gone"


def test_submitit_plugin_classes_used_by_the_local_launcher_exist():
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher

    assert callable(getattr(LocalLauncher, "launch", None)), "hydra_submitit_launcher LocalLauncher.launch is gone"
    assert "timeout_min" in BaseQueueConf.__dataclass_fields__, "BaseQueueConf.timeout_min is gone"
