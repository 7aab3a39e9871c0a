"""What a run is built from its config: `prepare_config`, then `build_run`.

`build_run` turns a checked config into a `Run`: datasets and loaders, the spiking model with its
reparameterizations, the threshold schedule, the optimizer (with the Grad R prior), the
learning-rate schedule and the mixed-precision set-up. The training loop (`stds.run.life.loop`) only uses
what it finds in the `Run`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, MissingMandatoryValue, OmegaConf, open_dict
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from stds.run.setup import distributed
from stds.data import loaders
from stds.run.setup.accel import apply_layout, maybe_compile, resolve_channels_last, to_device_batch
from stds.run.setup.config import instantiate_node, typed_config, validate
from stds.errors import ConfigError, StdsError
from stds.run.setup.optim import build_optimization
from stds.method.schedule import TARGET_KIND, ScheduleArgs, ThresholdSchedule, build_schedule
from stds.method.sparse import REPARAMS, sparsify

log = logging.getLogger(__name__)

AMP_DTYPES = {"false": None, "fp16": torch.float16, "bf16": torch.bfloat16}
"""``amp`` values after `prepare_config` and the autocast dtype each one asks for."""


@dataclass(frozen=True)
class RunSettings:
    """The config values the loop, the epoch's end and the evaluation read, as plain values: the
    config stops here (`settings_of`), and what runs the epochs sees no `DictConfig`."""

    epochs: int
    seed: int
    loss: str  # ce | mse
    amp: str  # false | fp16 | bf16 (after `prepare_config`)
    compile: bool
    log_every_steps: int
    checkpoint_every_steps: int
    progress_bar: bool
    histogram_every_epochs: int
    synops: bool
    synops_samples: int
    energy_ac_pj: float
    energy_mac_pj: float
    trial: bool = False  # a search's trial (``trial.number`` set): reports to the study's pruner


def settings_of(cfg: DictConfig) -> RunSettings:
    """`RunSettings` read from a checked config."""
    return RunSettings(
        epochs=int(cfg.epochs), seed=int(cfg.seed), loss=str(getattr(cfg.loss, "value", cfg.loss)),
        amp=str(cfg.amp), compile=bool(cfg.compile), log_every_steps=int(cfg.logging.log_every_steps),
        checkpoint_every_steps=int(cfg.checkpoint_every_steps), progress_bar=bool(cfg.logging.progress_bar),
        histogram_every_epochs=int(cfg.logging.histogram_every_epochs), synops=bool(cfg.logging.synops),
        synops_samples=int(cfg.logging.synops_samples), energy_ac_pj=float(cfg.logging.energy_ac_pj),
        energy_mac_pj=float(cfg.logging.energy_mac_pj),
        trial=cfg.get("trial") is not None and cfg.trial.get("number") is not None)


@dataclass
class Run:
    """Everything a run is built from its config (``cfg``: kept for the checkpoint and the health
    checks; the loop reads ``settings``)."""

    cfg: DictConfig
    settings: RunSettings
    env: distributed.DistEnv
    run_dir: Path
    core: nn.Module  # the model the checkpoint saves (no DDP wrapper)
    model: nn.Module  # what the training step calls (``core``, or DDP around it)
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: torch.amp.GradScaler
    threshold: ThresholdSchedule
    train_loader: torch.utils.data.DataLoader
    test_loader: torch.utils.data.DataLoader
    steps_per_epoch: int
    amp_dtype: torch.dtype | None
    channels_last: bool = False  # the model's weights, and so its input batches, are NHWC
    bad_images: Any = None  # the datasets' `stds.data.images.BadImages` (image folders), or None

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.epochs

    @property
    def images_per_step(self) -> int:
        """Training images per optimizer step over all ranks (a number the host knows)."""
        return self.cfg.batch_size * self.env.world_size

    def to_device(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch on the run's device (asynchronous from pinned memory), in the model's layout."""
        non_blocking = self.env.device.type == "cuda"
        return (to_device_batch(images, self.env.device, self.channels_last),
                labels.to(self.env.device, non_blocking=non_blocking))

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to the run's ``amp`` dtype, or nothing with ``amp=false``."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.env.device.type, dtype=self.amp_dtype)


def _absolute_roots(cfg: DictConfig) -> None:
    """Relative dataset roots are relative to where the user started the run."""
    root = cfg.dataset.get("root")
    if root is not None:
        with open_dict(cfg):
            cfg.dataset.root = to_absolute_path(str(Path(str(root)).expanduser()))


def normalize_amp(value: Any) -> str:
    """``amp`` as one of ``false``, ``fp16``, ``bf16`` (``true`` is fp16, as the original's flag)."""
    text = str(value).strip().lower()
    aliases = {"false": "false", "0": "false", "none": "false", "off": "false",
               "true": "fp16", "1": "fp16", "fp16": "fp16", "float16": "fp16",
               "bf16": "bf16", "bfloat16": "bf16"}
    if text not in aliases:
        raise ConfigError(f"amp={value!r} is not valid; use amp=false, amp=fp16 or amp=bf16 (amp=true is fp16)")
    return aliases[text]


def prepare_config(cfg: DictConfig) -> DictConfig:
    """The config merged onto the schema, interpolations resolved once, checked by `validate`."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True, enum_to_str=True)
    except MissingMandatoryValue as exc:
        raise ConfigError(f"{exc.full_key} has no value (???); set {exc.full_key}=<value>") from None
    typed = typed_config(plain)
    typed.amp = normalize_amp(typed.amp)
    _absolute_roots(typed)
    validate(typed)
    return typed


def set_determinism(cfg: DictConfig, env: distributed.DistEnv) -> None:
    """``deterministic=true``: deterministic algorithms (bit-identical resume); else cuDNN's autotuner."""
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = env.device.type == "cuda"


def amp_dtype(cfg: DictConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``cfg.amp`` on ``device``: fp16 is bf16 on a CPU (no fast fp16 there)."""
    dtype = AMP_DTYPES[cfg.amp]
    if dtype is torch.float16 and device.type != "cuda":
        return torch.bfloat16
    return dtype


def build_model(cfg: DictConfig, device: torch.device, d0: float) -> nn.Module:
    """The model of ``cfg.model`` with the reparameterization of ``cfg.sparse`` registered."""
    model = instantiate_node(cfg.model, "model")
    exclude = cfg.sparse.exclude
    if exclude is None:
        exclude = getattr(model, "prune_exclude", ())
    names = sparsify(model, str(cfg.sparse.method), d=d0, exclude=tuple(exclude))
    log.info("pruned layers (%d): %s", len(names), ", ".join(names))
    return model.to(device)


def build_threshold_schedule(cfg: DictConfig, total_steps: int) -> ThresholdSchedule:
    """The run's threshold schedule: the config read here, the method given plain values.

    ``scheduler.kind`` names a `stds.method.schedule.SCHEDULE_KINDS` entry: a ramp (d follows
    ``flat_width`` · f(x)) or ``target`` (d follows the quantile of ``target_sparsity``, ramped along
    ``scheduler.ramp``, recomputed every ``target_every_steps``, null: once per thousandth of the run;
    ``scheduler.hold_keeps_weights`` absent: true). Both reach their final value at
    ``scheduler.ramp_until`` (absent: 1) of ``total_steps``. A reparameterization with a
    ``schedule_kind`` of its own (``sparse=gmp``: ``magnitude``) takes that kind, with the target's
    keys and ``sparse.scope``.
    """
    kind = REPARAMS[str(cfg.sparse.method)].schedule_kind or str(cfg.scheduler.kind)  # gmp: its own
    target = cfg.get("target_sparsity")
    if kind == TARGET_KIND:
        log.info("scheduler=target: d follows target_sparsity=%s; flat_width is ignored", target)
    keep = cfg.scheduler.get("hold_keeps_weights")
    every = cfg.get("target_every_steps")
    args = ScheduleArgs(
        final=float(cfg.flat_width or 0.0), total_steps=total_steps,
        ramp_until=float(cfg.scheduler.get("ramp_until", 1.0)),
        target=None if target is None else float(target),
        ramp=None if cfg.scheduler.get("ramp") is None else str(cfg.scheduler.ramp),
        every=None if every is None else int(every), keep_weights=True if keep is None else bool(keep),
        scope=cfg.sparse.get("scope"))
    return build_schedule(kind, args)


def build_run(cfg: DictConfig, env: distributed.DistEnv, run_dir: Path) -> Run:
    """Datasets, loaders, model, optimizer, schedules: everything from the config."""
    splits = instantiate_node(cfg.dataset, "dataset")
    options = loaders.LoaderOptions(
        cfg.loader.num_workers, cfg.loader.pin_memory, cfg.loader.persistent_workers
    )
    train_loader = loaders.train_loader(
        splits.train, cfg.batch_size, options, cfg.seed, env.rank, env.world_size
    )
    eval_batch = cfg.loader.eval_batch_size or cfg.batch_size
    test_loader = loaders.eval_loader(splits.test, eval_batch, options, env.rank, env.world_size)
    steps_per_epoch = loaders.batches_per_epoch(train_loader)
    if steps_per_epoch < 1:
        raise StdsError(
            f"batch_size={cfg.batch_size} is larger than the {len(splits.train)} training samples "
            f"per process; lower batch_size"
        )
    threshold = build_threshold_schedule(cfg, steps_per_epoch * cfg.epochs)
    torch.manual_seed(cfg.seed)
    core = build_model(cfg, env.device, threshold.at(0))
    threshold.attach(core)
    channels_last = resolve_channels_last(cfg.channels_last, core, env.device)
    apply_layout(core, env.device, channels_last)  # before DDP and the optimizer (their buffers follow)
    model = core
    if env.distributed:
        ids = [env.device.index] if env.device.type == "cuda" else None
        model = DistributedDataParallel(core, device_ids=ids)
    model = maybe_compile(model, cfg.compile)
    optimizer, lr_scheduler = build_optimization(cfg, core)
    dtype = amp_dtype(cfg, env.device)
    # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16 and env.device.type == "cuda")
    return Run(cfg, settings_of(cfg), env, run_dir, core, model, optimizer, lr_scheduler, scaler, threshold,
               train_loader, test_loader, steps_per_epoch, dtype, channels_last, splits.bad_images)
