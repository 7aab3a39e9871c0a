"""The Grad R prior against hand-computed updates, with Adam, SGD, AdamW, a GradScaler and DDP;
what `build_optimization` gives the optimizer (``gradr_optimize``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.conftest import compose_train
from stds.errors import ConfigError
from stds.method.gradr import attach_gradr_prior
from stds.run.setup.optim import build_optimization
from stds.method.sparse import pruned_parameters, sparsify

THETA0 = [0.33, -0.20, 0.02, -0.04, 0.12]
LR = 0.1
ALPHA = 0.5  # lr·α = 0.05
STEPS = 3

# Adam with eps = 0 and a constant gradient g moves θ by exactly lr·sign(g) every step.
ADAM_GRAD = [1.0, -1.0, -1.0, 1.0, 1.0]
# SGD moves θ by -lr·g = [-0.05, 0.10, 0.20, -0.10, -0.05] every step.
SGD_GRAD = [0.5, -1.0, -2.0, 1.0, 0.5]

# The published rules, s = sign(θ) before each optimizer step:
#   sign_preserving: θ ← s·max(s·θ_opt − 0.05, 0);   plain: θ ← θ_opt − 0.05·s
EXPECTED = {
    # Adam 1: θ_opt [0.23, -0.10, 0.12, -0.14, 0.02], s [+, -, +, -, +] -> [0.18, -0.05, 0.07, -0.09, 0]
    # Adam 2: θ_opt [0.08, 0.05, 0.17, -0.19, -0.10], s [+, -, +, -, 0] -> [0.03, 0, 0.12, -0.14, 0]
    #   (θ1 crossed 0: set to 0; θ4 was at 0: stays at 0)
    # Adam 3: θ_opt [-0.07, 0.10, 0.22, -0.24, -0.10], s [+, 0, +, -, 0] -> [0, 0, 0.17, -0.19, 0]
    # (shrinking θ_opt by |·| − 0.05, the old rule, ends at [-0.02, 0.05, 0.17, -0.19, -0.10])
    ("adam", "sign_preserving"): [0.0, 0.0, 0.17, -0.19, 0.0],
    # Adam 1: θ_opt as above, −0.05·[+, -, +, -, +] -> [0.18, -0.05, 0.07, -0.09, -0.03]
    # Adam 2: θ_opt [0.08, 0.05, 0.17, -0.19, -0.13], s [+, -, +, -, -] -> [0.03, 0.10, 0.12, -0.14, -0.08]
    # Adam 3: θ_opt [-0.07, 0.20, 0.22, -0.24, -0.18], s [+, +, +, -, -]
    ("adam", "plain"): [-0.12, 0.15, 0.17, -0.19, -0.13],
    # SGD 1: θ_opt [0.28, -0.10, 0.22, -0.14, 0.07], s [+, -, +, -, +] -> [0.23, -0.05, 0.17, -0.09, 0.02]
    # SGD 2: θ_opt [0.18, 0.05, 0.37, -0.19, -0.03], s [+, -, +, -, +] -> [0.13, 0, 0.32, -0.14, 0]
    # SGD 3: θ_opt [0.08, 0.10, 0.52, -0.24, -0.05], s [+, 0, +, -, 0] -> [0.03, 0, 0.47, -0.19, 0]
    # (the old rule ends at [0.03, 0.05, 0.47, -0.19, 0])
    ("sgd", "sign_preserving"): [0.03, 0.0, 0.47, -0.19, 0.0],
    # SGD 1 as above (no sign changes); SGD 2: θ_opt [0.18, 0.05, 0.37, -0.19, -0.03],
    # s [+, -, +, -, +] -> [0.13, 0.10, 0.32, -0.14, -0.08]; SGD 3: θ_opt [0.08, 0.20, 0.52, -0.24, -0.13]
    ("sgd", "plain"): [0.03, 0.15, 0.47, -0.19, -0.08],
}


def make_optimizer(kind: str, params: list[nn.Parameter], lr: float | torch.Tensor = LR) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, eps=0.0)
    return torch.optim.SGD(params, lr=lr)


def linear_step(theta: nn.Parameter, grad: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    (grad * theta).sum().backward()  # dL/dθ = grad
    optimizer.step()


@pytest.mark.parametrize("lr", [LR, torch.tensor(LR)], ids=["lr_number", "lr_tensor"])
@pytest.mark.parametrize(("opt_kind", "variant"), sorted(EXPECTED))
def test_three_steps_by_hand(opt_kind: str, variant: str, lr: float | torch.Tensor) -> None:
    theta = nn.Parameter(torch.tensor(THETA0))
    grad = torch.tensor(ADAM_GRAD if opt_kind == "adam" else SGD_GRAD)
    optimizer = make_optimizer(opt_kind, [theta], lr)
    prior = attach_gradr_prior(optimizer, [theta], ALPHA, variant)
    assert prior.active
    for _ in range(STEPS):
        linear_step(theta, grad, optimizer)
    expected = torch.tensor(EXPECTED[(opt_kind, variant)])
    torch.testing.assert_close(theta.detach(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("lr", [0.01, torch.tensor(0.01)], ids=["lr_number", "lr_tensor"])
def test_adam_step_that_flips_or_starts_at_zero_gives_zero(lr: float | torch.Tensor) -> None:
    """One default Adam step with gradient +1 moves every θ by -0.01 (m̂/√v̂ = 1, eps 1e-8):
    θ_opt = [-0.0099, -0.01, -0.007, 0.49]; s = [+, 0, +, +]; lr·α = 0.005;
    θ = s·max(s·θ_opt − 0.005, 0) = [0, 0, 0, 0.485]
    (sign(θ_opt)·max(|θ_opt| − 0.005, 0) would be [-0.0049, -0.005, -0.002, 0.485])."""
    theta = nn.Parameter(torch.tensor([1e-4, 0.0, 3e-3, 0.5]))
    optimizer = torch.optim.Adam([theta], lr=lr)
    attach_gradr_prior(optimizer, [theta], 0.5, "sign_preserving")
    linear_step(theta, torch.ones(4), optimizer)
    assert theta[:3].tolist() == [0.0, 0.0, 0.0]
    assert theta[3].item() == pytest.approx(0.485, abs=1e-6)


def test_sign_preserving_never_flips_sign_of_the_prior() -> None:
    theta = nn.Parameter(torch.tensor([0.01, -0.01, 0.5]))
    optimizer = torch.optim.SGD([theta], lr=1.0)
    attach_gradr_prior(optimizer, [theta], 0.1, "sign_preserving")
    linear_step(theta, torch.zeros(3), optimizer)
    assert theta.tolist() == pytest.approx([0.0, 0.0, 0.4])
    assert theta[0].item() == 0.0 and theta[1].item() == 0.0


def test_uses_each_groups_current_learning_rate() -> None:
    a = nn.Parameter(torch.tensor([1.0, -1.0]))
    b = nn.Parameter(torch.tensor([1.0, -1.0]))
    optimizer = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.2}], lr=0.5)
    attach_gradr_prior(optimizer, [a, b], alpha=1.0, variant="plain")
    for param in (a, b):
        param.grad = torch.zeros(2)  # the optimizer leaves θ alone; only the prior moves it
    optimizer.step()  # shrinks a by 0.1 and b by 0.2
    optimizer.param_groups[0]["lr"] = 0.05
    optimizer.step()  # shrinks a by 0.05 and b by 0.2
    torch.testing.assert_close(a.detach(), torch.tensor([0.85, -0.85]))
    torch.testing.assert_close(b.detach(), torch.tensor([0.6, -0.6]))


def test_parameter_without_gradient_is_left_alone() -> None:
    a = nn.Parameter(torch.tensor([1.0]))
    b = nn.Parameter(torch.tensor([1.0]))
    optimizer = torch.optim.SGD([a, b], lr=0.1)
    attach_gradr_prior(optimizer, [a, b], alpha=1.0)
    a.grad = torch.zeros(1)
    optimizer.step()
    assert a.item() == pytest.approx(0.9)
    assert b.item() == 1.0


@pytest.mark.parametrize("opt_kind", ["adam", "sgd"])
@pytest.mark.parametrize("variant", ["sign_preserving", "plain"])
def test_step_skipped_by_grad_scaler_leaves_theta(variant: str, opt_kind: str) -> None:
    theta = nn.Parameter(torch.tensor(THETA0))
    # Adam with its default eps: a zero gradient gives a zero update (0 / (0 + eps))
    optim_cls = torch.optim.Adam if opt_kind == "adam" else torch.optim.SGD
    optimizer = optim_cls([theta], lr=LR)
    attach_gradr_prior(optimizer, [theta], ALPHA, variant)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)

    optimizer.zero_grad()
    scaler.scale((torch.tensor([1.0, 0.0, 0.0, 0.0, float("inf")]) * theta).sum()).backward()
    scaler.step(optimizer)  # inf gradient: skipped
    scaler.update()
    assert torch.equal(theta.detach(), torch.tensor(THETA0))
    assert scaler.get_scale() == 2.0

    optimizer.zero_grad()
    scaler.scale((torch.zeros(5) * theta).sum()).backward()
    scaler.step(optimizer)  # finite, zero gradient: the optimizer does nothing, the prior moves θ by 0.05
    if variant == "sign_preserving":
        expected = [0.28, -0.15, 0.0, 0.0, 0.07]
    else:
        expected = [0.28, -0.15, -0.03, 0.01, 0.07]
    torch.testing.assert_close(theta.detach(), torch.tensor(expected), rtol=0, atol=1e-7)


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, bias=False),  # a bias before BatchNorm gets no gradient
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(12, 6),
        nn.ReLU(),
        nn.Linear(6, 4),  # the unpruned head
    )


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 2) -> None:
    torch.manual_seed(1)
    x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 4, (8,))
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD])
def test_touches_only_pruned_theta(opt_cls: type[torch.optim.Optimizer]) -> None:
    plain, with_prior = small_net(), small_net()
    for model in (plain, with_prior):
        sparsify(model, "stmod", 0.01, exclude=("6",))
    initial = copy.deepcopy(dict(plain.named_parameters()))
    opt_plain = opt_cls(plain.parameters(), lr=0.01)
    opt_prior = opt_cls(with_prior.parameters(), lr=0.01)
    attach_gradr_prior(opt_prior, pruned_parameters(with_prior).values(), alpha=2.0)
    # one step: both see the same gradients, so they differ only by the prior
    train_steps(plain, opt_plain, steps=1)
    train_steps(with_prior, opt_prior, steps=1)

    theta_keys = {"0.parametrizations.weight.original", "4.parametrizations.weight.original"}
    params_plain = dict(plain.named_parameters())
    for name, param in with_prior.named_parameters():
        if name in theta_keys:  # the optimizer's θ moved towards 0 by lr·α = 0.02, not across it
            signs = torch.sign(initial[name].detach())
            shrunk = signs * (signs * params_plain[name].detach() - 0.02).clamp(min=0)
            torch.testing.assert_close(param.detach(), shrunk, rtol=0, atol=1e-7)
        else:  # BatchNorm, biases and the head are trained, exactly as without the prior
            assert torch.equal(param, params_plain[name]), name
            assert not torch.equal(param, initial[name]), name


def test_alpha_zero_is_the_plain_optimizer() -> None:
    plain, zero = small_net(), small_net()
    for model in (plain, zero):
        sparsify(model, "stmod", 0.01)
    opt_plain = torch.optim.Adam(plain.parameters(), lr=0.01)
    opt_zero = torch.optim.Adam(zero.parameters(), lr=0.01)
    prior = attach_gradr_prior(opt_zero, pruned_parameters(zero).values(), alpha=0.0)
    assert not prior.active
    assert not opt_zero._optimizer_step_pre_hooks and not opt_zero._optimizer_step_post_hooks
    prior.remove()
    train_steps(plain, opt_plain)
    train_steps(zero, opt_zero)
    for (name, a), b in zip(plain.state_dict().items(), zero.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_remove_detaches_the_prior() -> None:
    theta = nn.Parameter(torch.tensor([1.0]))
    optimizer = torch.optim.SGD([theta], lr=0.1)
    prior = attach_gradr_prior(optimizer, [theta], alpha=1.0, variant="plain")
    prior.remove()
    prior.remove()
    assert not prior.active
    linear_step(theta, torch.zeros(1), optimizer)
    assert theta.item() == 1.0


def test_invalid_arguments() -> None:
    theta = nn.Parameter(torch.tensor([1.0]))
    optimizer = torch.optim.SGD([theta], lr=0.1)
    with pytest.raises(ValueError, match="variant"):
        attach_gradr_prior(optimizer, [theta], 1.0, variant="l1")
    with pytest.raises(ValueError, match="alpha"):
        attach_gradr_prior(optimizer, [theta], -1.0)
    with pytest.raises(ValueError, match="no param group"):
        attach_gradr_prior(optimizer, [nn.Parameter(torch.ones(2))], 1.0)
    assert not optimizer._optimizer_step_post_hooks


def test_under_ddp_matches_single_process(tmp_path) -> None:
    reference, wrapped = small_net(), small_net()
    for model in (reference, wrapped):
        sparsify(model, "stmod", 0.01, exclude=("6",))
    store = f"file://{tmp_path / 'store'}"
    dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(wrapped)
        opt_ref = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
        opt_ddp = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        attach_gradr_prior(opt_ref, pruned_parameters(reference).values(), 1.0, "plain")
        attach_gradr_prior(opt_ddp, pruned_parameters(ddp).values(), 1.0, "plain")
        train_steps(reference, opt_ref)
        train_steps(ddp, opt_ddp)
    finally:
        dist.destroy_process_group()
    pairs = zip(reference.state_dict().items(), wrapped.state_dict().values(), strict=True)
    for (name, a), b in pairs:
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=name)


THETA_NAMES = {"0.parametrizations.weight.original", "4.parametrizations.weight.original"}


def build_from_config(*overrides: str) -> tuple[nn.Sequential, torch.optim.Optimizer]:
    """`small_net` with its conv and first linear pruned, and the optimizer the config builds."""
    cfg = compose_train("sparse=stmod", "scheduler=constant", "alpha_gr=0.5", "lr=0.01", *overrides)
    model = small_net()
    sparsify(model, "stmod", 0.01, exclude=("6",))
    optimizer, _ = build_optimization(cfg, model)
    return model, optimizer


def optimized_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> set[str]:
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return {name for name, param in model.named_parameters() if id(param) in ids}


@pytest.mark.parametrize("optimizer_name", ["adam", "sgd"])
def test_gradr_optimize_pruned_gives_the_optimizer_only_theta(optimizer_name: str) -> None:
    """The published Grad R: BatchNorm ("1.*"), biases ("4.bias") and the dense head ("6.*") are
    not in the optimizer and keep their values over a step; θ moves."""
    model, optimizer = build_from_config(f"optimizer={optimizer_name}", "gradr_optimize=pruned")
    assert optimized_names(model, optimizer) == THETA_NAMES
    before = copy.deepcopy(dict(model.named_parameters()))
    train_steps(model, optimizer, steps=1)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) != (name in THETA_NAMES), name


@pytest.mark.parametrize("overrides", [(), ("gradr_optimize=all",)])
def test_by_default_every_parameter_is_trained(overrides: tuple[str, ...]) -> None:
    """The default, ``gradr_optimize=all``: every parameter is optimised and moves."""
    model, optimizer = build_from_config("optimizer=adam", *overrides)
    assert optimized_names(model, optimizer) == {name for name, _ in model.named_parameters()}
    before = copy.deepcopy(dict(model.named_parameters()))
    train_steps(model, optimizer, steps=1)
    for name, param in model.named_parameters():
        assert not torch.equal(param, before[name]), name


def test_gradr_optimize_pruned_without_pruned_layers_is_a_config_error() -> None:
    cfg = compose_train("sparse=stmod", "alpha_gr=0.5", "gradr_optimize=pruned")
    with pytest.raises(ConfigError, match="gradr_optimize=pruned but no layer is pruned"):
        build_optimization(cfg, small_net())


def test_prior_follows_a_fused_optimizer_skip_without_reading_the_device():
    """Under an fp16 GradScaler a fused optimizer is always called and skips inside its kernel;
    the prior reads the scaler's ``found_inf`` as a tensor and leaves θ as it is on such a step."""
    theta = torch.nn.Parameter(torch.tensor([1e-4, 0.0, 3e-3, 0.5]))
    optimizer = torch.optim.Adam([theta], lr=0.01, fused=True)
    assert optimizer._step_supports_amp_scaling
    attach_gradr_prior(optimizer, [theta], 0.5, "sign_preserving")
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    scaler.scale(torch.ones(()))  # the scaler's state is made by its first scale()
    theta.grad = torch.tensor([1.0, float("inf"), 1.0, 1.0])
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(theta.detach(), torch.tensor([1e-4, 0.0, 3e-3, 0.5]))
    theta.grad = torch.ones(4)
    scaler.scale(torch.ones(()))
    scaler.step(optimizer)
    # the brief's one-step case: Adam moves each θ by -0.01, the prior (lr·α = 0.005) zeroes the
    # three that crossed or sat at 0
    assert theta.detach().tolist() == pytest.approx([0.0, 0.0, 0.0, 0.485], abs=1e-7)


@pytest.mark.parametrize("optimizer, rule", [("adam", "sign_preserving"), ("sgd", "plain")])
def test_a_run_built_with_alpha_attaches_the_prior_to_its_optimizer(tiny_cfg, tmp_path, optimizer, rule):
    """With every gradient zero the optimizer moves nothing (Adam: m = v = 0; SGD: no momentum yet),
    so one step leaves exactly the prior: |θ| shrinks by lr·α (not past 0 for Adam's rule)."""
    from stds.method.sparse import pruned_parameters
    from stds.run.setup.build import build_run, prepare_config
    from stds.run.setup.distributed import DistEnv

    lr, alpha = 0.01, 10.0  # lr·α = 0.1 > some |θ| = |w0| + 0.05
    cfg = prepare_config(tiny_cfg("scheduler=constant", "flat_width=0.05", f"alpha_gr={alpha}", f"lr={lr}",
                                  f"optimizer={optimizer}"))
    run = build_run(cfg, DistEnv(0, 0, 1, torch.device("cpu")), tmp_path)
    thetas = pruned_parameters(run.core)
    before = {name: theta.detach().clone() for name, theta in thetas.items()}
    for parameter in run.core.parameters():
        parameter.grad = torch.zeros_like(parameter)
    run.optimizer.step()
    amount = lr * alpha
    for name, theta in thetas.items():
        old = before[name]
        if rule == "sign_preserving":
            expected = old.sign() * (old.abs() - amount).clamp(min=0)
        else:
            expected = old - old.sign() * amount
        torch.testing.assert_close(theta.detach(), expected, rtol=0, atol=1e-7)
    assert any((before[n].abs() < amount).any() for n in before)  # the rules differ on this run
