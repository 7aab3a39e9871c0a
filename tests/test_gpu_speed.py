"""Training speed (issue 10), checked where it can be.

On every machine: under autocast every spiking neuron keeps the float32 state SpikingJelly needs
for its fused kernel (the per-time-step fallback cannot come back unnoticed), channels_last gives
the default layout's numbers, ``compile`` trains as eager does, the config keys are checked.
On CUDA only (skipped elsewhere, with the reason): kernel launches per training step, no host
synchronisation inside a step, and fp16 / bf16 steps that train.
"""

from __future__ import annotations

import copy
import functools
import time

import pytest
import torch
from spikingjelly.activation_based import functional, surrogate
from torch import nn

from tests.conftest import compose_train
from stds.run.setup import accel
from stds.run.setup.distributed import DistEnv
from stds.errors import ConfigError
from stds.models import CIFAR10Net, DigitsNet, SEWResNet, make_neuron
from stds.models.neurons import SURROGATES, fused_kernel_condition
from stds.method.sparse import sparsify
from stds.run.setup.build import build_run, prepare_config
from stds.run.life.loop import train_step

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (kernel counts, syncs, fp16)")

# ---------------------------------------------------------------- the fused-kernel condition


def _fused_ops_in(call) -> int:
    """Calls of SpikingJelly's fused LIF / IF operators while ``call()`` runs (CPU profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    return sum(1 for e in prof.events() if e.name in accel.FUSED_NEURON_OPS)


class _RenamedATan(surrogate.ATan):
    """An ATan SpikingJelly does not know by name: its functions must run the reference loop."""


@pytest.mark.parametrize("kind", ["lif", "if"])
def test_fused_kernel_condition_is_the_one_spikingjelly_applies(kind):
    # ground truth: whether lif_multi_step / if_multi_step really called the fused operator
    run = functional.lif_multi_step if kind == "lif" else functional.if_multi_step
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    seen = set()
    for surrogate_function in (surrogate.ATan(alpha=2.0), surrogate.Erf(alpha=2.0), _RenamedATan()):
        for x_dtype in dtypes:
            for v_dtype in (torch.float32, torch.bfloat16, torch.float64):
                x = torch.full((3, 2, 2), 0.7, dtype=x_dtype)
                v = torch.zeros(2, 2, dtype=v_dtype)
                fused = _fused_ops_in(lambda: run(x, v, surrogate_function=surrogate_function))
                expected = fused_kernel_condition(x_dtype, v, surrogate_function)
                assert (fused == 1) == expected, (x_dtype, v_dtype, type(surrogate_function))
                seen.add(expected)
    assert seen == {True, False}


def test_every_configurable_surrogate_can_take_the_fused_kernel():
    from spikingjelly._ops.surrogate import _surrogate_spec  # SpikingJelly's own check

    for name in SURROGATES:
        node = make_neuron("if", surrogate=name, surrogate_alpha=3.0)
        assert _surrogate_spec(node.surrogate_function) is not None, name
        assert fused_kernel_condition(torch.float16, torch.zeros(1), node.surrogate_function)


SMALL = {
    # small shapes of the three model families; each neuron runs once per forward
    "digits": (lambda neuron: DigitsNet(T=2, neuron=neuron), (2, 1, 8, 8)),
    "cifar10net": (
        lambda neuron: CIFAR10Net(T=2, in_channels=3, image_size=8, channels=4, hidden=16,
                                  voting=2, num_classes=3, neuron=neuron),
        (2, 3, 8, 8),
    ),
    "sew_resnet18": (lambda neuron: SEWResNet(depth=18, T=2, num_classes=10, width=8, neuron=neuron),
                     (2, 3, 32, 32)),
}


def _small_model(name: str, kind: str) -> tuple[nn.Module, torch.Tensor]:
    build, shape = SMALL[name]
    torch.manual_seed(0)
    model = build(functools.partial(make_neuron, kind))
    sparsify(model, "stmod", d=0.01)
    return model.train(), torch.rand(shape) * 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["lif", "if"])
@pytest.mark.parametrize("name", SMALL)
def test_every_neuron_takes_the_fused_kernel_under_autocast(name, kind, dtype):
    model, images = _small_model(name, kind)
    n_neurons = len(accel.NeuronPathProbe(model).neurons)

    def step():
        with torch.autocast("cpu", dtype=dtype):
            scores = model(images)
        scores.float().sum().backward()

    with accel.NeuronPathProbe(model) as probe:
        fused_ops = _fused_ops_in(step)
    assert probe.calls == n_neurons > 0
    assert probe.fallback == []  # names each neuron that fell back, with its dtypes
    assert fused_ops == n_neurons  # the operator really ran, once per neuron
    assert all(node.v.dtype == torch.float32 for node in probe.neurons.values())


def test_real_config_amp_step_takes_the_fused_kernel(tiny_cfg, tmp_path):
    # bf16 autocast on a CPU; narrow layers (this CPU has no fast bf16 convolution)
    cfg = prepare_config(tiny_cfg("amp=true", "batch_size=16", "model.channels=[8,8,8]"))
    run = build_run(cfg, DistEnv(0, 0, 1, torch.device("cpu")), tmp_path)
    images, labels = next(iter(run.train_loader))
    with accel.NeuronPathProbe(run.core) as probe:
        profile = accel.profile_step(lambda: train_step(run, images, labels), "cpu")
    assert probe.calls == 3 and probe.fallback == []  # the digits net's three LIF layers
    assert profile.fused_neuron_ops == 3
    assert profile.kernels == 0 and profile.gpu_busy_s == 0.0 and profile.wall_s > 0


# ---------------------------------------------------------------- channels_last


@pytest.mark.parametrize("name", SMALL)
def test_channels_last_gives_the_default_layouts_outputs_and_gradients(name):
    default, images = _small_model(name, "lif" if name != "sew_resnet18" else "if")
    last = accel.apply_layout(copy.deepcopy(default), torch.device("cpu"), True)
    first_conv = next(m for m in last.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.parametrizations.weight.original.is_contiguous(
        memory_format=torch.channels_last
    )
    batch = accel.to_device_batch(images, "cpu", channels_last=True)
    assert batch.is_contiguous(memory_format=torch.channels_last) and torch.equal(batch, images)
    outputs = []
    for model, x in ((default, images), (last, batch)):
        torch.manual_seed(1)  # the same dropout masks
        scores = model(x)
        (scores * torch.linspace(0.5, 1.5, scores.shape[1])).sum().backward()
        outputs.append((scores, {n: p.grad for n, p in model.named_parameters()}))
        functional.reset_net(model)
    (scores, grads), (scores_cl, grads_cl) = outputs
    assert torch.allclose(scores, scores_cl, atol=1e-5)
    for key, grad in grads.items():
        assert torch.allclose(grad, grads_cl[key], rtol=1e-4, atol=1e-5), key


def test_repeat_over_time_keeps_the_layout_and_the_values():
    model = DigitsNet(T=3)
    x = torch.arange(2 * 4 * 3 * 3, dtype=torch.float32).reshape(2, 4, 3, 3)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    seq, seq_cl = model.repeat_over_time(x), model.repeat_over_time(x_cl)
    assert seq.shape == seq_cl.shape == (3, 2, 4, 3, 3)
    assert torch.equal(seq, seq_cl) and all(torch.equal(seq[t], x) for t in range(3))
    assert all(seq_cl[t].is_contiguous(memory_format=torch.channels_last) for t in range(3))


def test_channels_last_setting_resolves_per_device_and_model():
    conv_model, mlp = DigitsNet(T=1), nn.Sequential(nn.Linear(2, 2))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert accel.resolve_channels_last("auto", conv_model, cuda) is True
    assert accel.resolve_channels_last("auto", conv_model, cpu) is False
    assert accel.resolve_channels_last("auto", mlp, cuda) is False
    assert accel.resolve_channels_last(True, conv_model, cpu) is True  # "True" from a bool
    assert accel.resolve_channels_last("false", conv_model, cuda) is False


def test_speed_keys_are_in_the_config_and_checked():
    cfg = prepare_config(compose_train())
    assert cfg.channels_last == "auto" and cfg.compile is False
    assert prepare_config(compose_train("channels_last=true", "compile=true")).compile is True
    with pytest.raises(ConfigError, match=r"channels_last='sideways'.*auto, true, false"):
        prepare_config(compose_train("channels_last=sideways"))
    with pytest.raises(Exception, match="compile"):
        compose_train("compile=maybe")  # the schema's bool refuses it when composing


# ---------------------------------------------------------------- torch.compile


@pytest.mark.slow
def test_compiled_training_steps_match_eager(tiny_cfg, tmp_path):
    # the digits net with stmod, three optimizer steps with a changing threshold d; inductor
    # compiles C++ kernels on the CPU: about 40 s the first time (cached afterwards)
    env = DistEnv(0, 0, 1, torch.device("cpu"))
    eager = build_run(prepare_config(tiny_cfg("flat_width=0.2")), env, tmp_path / "a")
    compiled = build_run(prepare_config(tiny_cfg("flat_width=0.2", "compile=true")), env, tmp_path / "b")
    assert isinstance(compiled.model, torch._dynamo.eval_frame.OptimizedModule)
    assert not isinstance(eager.model, torch._dynamo.eval_frame.OptimizedModule)
    images, labels = next(iter(eager.train_loader))
    started = time.perf_counter()
    for step in range(3):
        losses = [train_step(run, images, labels)[0] for run in (eager, compiled)]
        assert torch.allclose(losses[0], losses[1], rtol=1e-5, atol=1e-6), step
        for run in (eager, compiled):
            run.threshold.step(step + 1)
    assert eager.threshold.d > 0  # d moved, without recompiling (sparse.py reads the buffer)
    for (name, p), q in zip(eager.core.named_parameters(), compiled.core.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), name
    print(f"compiled 3 steps in {time.perf_counter() - started:.1f} s")


# ---------------------------------------------------------------- CUDA


def _cuda_run(tmp_path, *overrides: str):
    """The CIFAR10Net STDS preset at benchmark shape (C = 32), on the GPU, with its batch."""
    cfg = prepare_config(compose_train(
        "experiment=cifar10_stds", "dataset=fake", "model.channels=32", "batch_size=16",
        "loss=mse", "logging.synops=false", *overrides,
    ))
    run = build_run(cfg, DistEnv(0, 0, 1, torch.device("cuda")), tmp_path)
    torch.manual_seed(0)
    images, labels = run.to_device(torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,)))
    assert run.channels_last  # channels_last=auto on CUDA for a convolutional model
    return run, images, labels


def _kernels_per_step(tmp_path, T: int) -> accel.StepProfile:
    run, images, labels = _cuda_run(tmp_path / f"T{T}", "amp=fp16", f"T={T}")
    for _ in range(3):
        train_step(run, images, labels)
    return accel.profile_step(lambda: train_step(run, images, labels), torch.device("cuda"))


@needs_cuda
def test_amp_step_launches_a_bounded_number_of_kernels(tmp_path):
    # measured on an H100 for this network at T = 8 with fp16 autocast: 281 kernels per step on
    # the fused path, 1,621 on the per-time-step fallback (about 21 kernels per neuron and time
    # step). The fused operator runs all T steps in one launch, so the count must not grow with
    # T: from T = 2 to T = 8 the fallback adds about 6 * 8 neurons * 21 = 1,000 kernels.
    long, short = _kernels_per_step(tmp_path, 8), _kernels_per_step(tmp_path, 2)
    assert long.fused_neuron_ops == short.fused_neuron_ops == 8  # 6 conv + 2 fc LIF layers
    assert long.kernels < 600, long
    assert long.kernels - short.kernels < 8, (long, short)


@needs_cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_step_never_waits_on_the_gpu(tmp_path, amp):
    # fp16 relies on the fused optimizer stds.run.setup.optim builds on CUDA (with a plain one GradScaler
    # reads found_inf on the host)
    run, images, labels = _cuda_run(tmp_path, f"amp={amp}")
    train_step(run, images, labels)  # cuDNN and allocator warm-up outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(2):
            train_step(run, images, labels)
            run.threshold.step(step + 2)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.parametrize("kind", ["lif", "if"])
def test_fused_neurons_keep_each_steps_channels_last_layout_on_cuda(kind):
    # the CUDA / Triton operators allocate their outputs like their input, so channels_last
    # carries from conv to conv (the CPU operator stacks its steps and returns NCHW)
    node = make_neuron(kind).cuda()
    nchw = torch.rand(4, 2, 8, 5, 5, device="cuda") * 2
    nhwc = nchw.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    assert torch.equal(nchw, nhwc) and nhwc[0].is_contiguous(memory_format=torch.channels_last)
    spikes = node(nhwc.half())
    functional.reset_net(node)
    assert spikes[0].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(spikes, node(nchw.half()))


def _losses_on_a_fixed_batch(tmp_path, device: str, amp: str, steps: int, *extra: str) -> list[float]:
    cfg = prepare_config(compose_train(
        "dataset=digits", "batch_size=32", "logging.synops=false", f"amp={amp}", "flat_width=0.05",
        *extra,
    ))
    run = build_run(cfg, DistEnv(0, 0, 1, torch.device(device)), tmp_path)
    images, labels = run.to_device(*next(iter(run.train_loader)))
    losses = []
    for step in range(steps):
        loss, _ = train_step(run, images, labels)
        run.threshold.step(step + 1)
        losses.append(loss)
    return [float(loss) for loss in losses]


def test_bf16_steps_train_on_cpu(tmp_path):
    # bf16 on a CPU (amp=true); narrow layers: this CPU has no fast bf16 convolution
    losses = _losses_on_a_fixed_batch(tmp_path, "cpu", "true", 10, "model.channels=[8,8,8]", "lr=0.01")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert max(losses[-3:]) < 0.9 * losses[0], losses


@needs_cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_steps_train_on_cuda(tmp_path, amp):
    losses = _losses_on_a_fixed_batch(tmp_path, "cuda", amp, 20, "lr=0.01")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert max(losses[-3:]) < 0.9 * losses[0], losses
