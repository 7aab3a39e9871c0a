"""The training loop: `train(cfg, run_dir)` builds everything from a composed config and trains.

Per step: the static batch goes through the spiking model (which repeats it over T and averages
over T), loss, backward, optimizer step (the Grad R prior follows through the optimizer's step
hook), ``reset_net``, then the threshold d for the next step. Per epoch: learning-rate step,
evaluation, sparsity, metrics, checkpoint. A run directory that already holds
``checkpoints/last.pt`` resumes from it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig, MissingMandatoryValue, OmegaConf, open_dict
from spikingjelly.activation_based import functional
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from stds import checkpoint as ckpt
from stds import distributed, loaders
from stds.config import to_plain, validate
from stds.errors import CheckpointError, ConfigError, NonFiniteLossError, StdsError
from stds.optim import build_optimization
from stds.metrics import MetricsWriter, correct_topk, loss_fn
from stds.schedule import ThresholdSchedule, build_threshold_schedule
from stds.sparse import sparsify, sparsity
from stds.synops import FiringRates, count_synops

log = logging.getLogger(__name__)

# keys whose change makes a checkpoint belong to another experiment
_RESUME_KEYS = ("model", "sparse", "scheduler", "flat_width", "alpha_gr", "T", "loss")


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    batch_in_epoch: int = 0  # batches of the current epoch already trained (mid-epoch checkpoint)
    best_acc1: float = -1.0
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    epoch_sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])


@dataclass
class Run:
    """Everything a run is built from its config."""

    cfg: DictConfig
    env: distributed.DistEnv
    run_dir: Path
    core: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: torch.amp.GradScaler
    train_loader: torch.utils.data.DataLoader
    test_loader: torch.utils.data.DataLoader
    steps_per_epoch: int
    total_steps: int
    threshold: ThresholdSchedule
    writer: MetricsWriter | None = None

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def flat_width(self, step: int) -> float:
        """The threshold d after ``step`` optimizer steps."""
        return self.threshold.at(step)


def _absolute_roots(cfg: DictConfig) -> None:
    """Relative dataset roots are relative to where the user started the run."""
    root = cfg.dataset.get("root")
    if root is not None:
        with open_dict(cfg):
            cfg.dataset.root = to_absolute_path(str(Path(str(root)).expanduser()))


def prepare_config(cfg: DictConfig) -> DictConfig:
    """The config merged onto the schema, interpolations resolved once, checked by `validate`."""
    from stds.config import TrainConfig

    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True, enum_to_str=True)
    except MissingMandatoryValue as exc:
        raise ConfigError(f"{exc.full_key} has no value (???); set {exc.full_key}=<value>") from None
    typed = OmegaConf.merge(OmegaConf.structured(TrainConfig), plain)
    _absolute_roots(typed)
    validate(typed)
    return typed


def _set_determinism(cfg: DictConfig, env: distributed.DistEnv) -> None:
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = env.device.type == "cuda"


def build_model(cfg: DictConfig, device: torch.device, d0: float) -> nn.Module:
    """The model of ``cfg.model`` with the reparameterization of ``cfg.sparse`` registered."""
    model = instantiate(cfg.model)
    exclude = cfg.sparse.exclude
    if exclude is None:
        exclude = getattr(model, "prune_exclude", ())
    names = sparsify(model, str(cfg.sparse.method.value), flat_width=d0, exclude=tuple(exclude))
    log.info("pruned layers (%d): %s", len(names), ", ".join(names))
    return model.to(device)


def build_run(cfg: DictConfig, env: distributed.DistEnv, run_dir: Path) -> Run:
    """Datasets, loaders, model, optimizer, schedules: everything from the config."""
    splits = instantiate(cfg.dataset)
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
    total_steps = steps_per_epoch * cfg.epochs
    torch.manual_seed(cfg.seed)
    threshold = build_threshold_schedule(cfg, total_steps)
    core = build_model(cfg, env.device, threshold.at(0))
    threshold.attach(core)
    model = core
    if env.distributed:
        ids = [env.device.index] if env.device.type == "cuda" else None
        model = DistributedDataParallel(core, device_ids=ids)
    optimizer, lr_scheduler = build_optimization(cfg, core)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and env.device.type == "cuda")
    return Run(cfg, env, run_dir, core, model, optimizer, lr_scheduler, scaler, train_loader,
               test_loader, steps_per_epoch, total_steps, threshold)


def _autocast(run: Run) -> contextlib.AbstractContextManager:
    if not run.cfg.amp:
        return contextlib.nullcontext()
    dtype = torch.float16 if run.env.device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=run.env.device.type, dtype=dtype)


def _state(run: Run, progress: Progress) -> dict[str, Any]:
    return {
        "format_version": ckpt.FORMAT_VERSION,
        "model": run.core.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "lr_scheduler": run.lr_scheduler.state_dict(),
        "epoch": progress.epoch,
        "step": progress.step,
        "batch_in_epoch": progress.batch_in_epoch,
        "best_acc1": progress.best_acc1,
        "best_epoch": progress.best_epoch,
        "history": progress.history,
        "epoch_sums": progress.epoch_sums,
        "rng": ckpt.rng_state(),
        "config": to_plain(run.cfg),
    }


def save(run: Run, progress: Progress, best: bool = False) -> None:
    """Write ``last.pt`` (and ``best.pt``) atomically, on rank 0 only."""
    if not run.env.is_main:
        return
    state = _state(run, progress)
    ckpt.save_atomic(state, run.ckpt_dir / ckpt.LAST)
    if best:
        ckpt.save_atomic(state, run.ckpt_dir / ckpt.BEST)


def _check_compatible(run: Run, state: dict[str, Any], path: Path) -> None:
    current = to_plain(run.cfg)
    saved = state.get("config", {})
    changed = [k for k in _RESUME_KEYS if saved.get(k) != current.get(k)]
    if changed:
        raise CheckpointError(
            f"checkpoint {path} was written with other values of {', '.join(changed)}; "
            "use a new run directory or restore those values"
        )


def resume(run: Run) -> Progress:
    """Load ``last.pt`` if the run directory has one; otherwise a fresh `Progress`."""
    path = run.ckpt_dir / ckpt.LAST
    if not path.exists():
        return Progress()
    state = ckpt.load(path)
    _check_compatible(run, state, path)
    try:
        run.core.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not fit this model: {first}") from None
    run.scaler.load_state_dict(state["scaler"])
    run.lr_scheduler.load_state_dict(state["lr_scheduler"])
    ckpt.set_rng_state(state["rng"])
    fields = ("epoch", "step", "batch_in_epoch", "best_acc1", "best_epoch", "history", "epoch_sums")
    progress = Progress(**{k: state[k] for k in fields})
    log.info("resumed from %s at epoch %d, step %d", path, progress.epoch, progress.step)
    return progress


def _batches(run: Run, progress: Progress) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    loaders.start_epoch(run.train_loader, progress.epoch, run.cfg.seed, progress.batch_in_epoch)
    iterable: Any = run.train_loader
    if run.env.is_main and run.cfg.logging.progress_bar and sys.stderr.isatty():
        from tqdm import tqdm

        iterable = tqdm(iterable, desc=f"epoch {progress.epoch + 1}/{run.cfg.epochs}", leave=False)
    non_blocking = run.env.device.type == "cuda"
    for images, labels in iterable:
        yield images.to(run.env.device, non_blocking=non_blocking), labels.to(
            run.env.device, non_blocking=non_blocking
        )


def _raise_non_finite(progress: Progress, bad_step: int) -> None:
    raise NonFiniteLossError(
        f"the loss became NaN or inf at epoch {progress.epoch + 1}, step {bad_step}; "
        "the last good checkpoint is kept; lower lr or set amp=false"
    )


def train_step(run: Run, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step; returns the (detached) loss and the number of correct samples."""
    with _autocast(run):
        scores = run.model(images)
    loss = loss_fn(run.cfg.loss, scores, labels)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)  # the Grad R prior runs in the optimizer's step hook
    run.scaler.update()
    functional.reset_net(run.core)
    return loss.detach(), correct_topk(scores.detach(), labels, 1)


def train_epoch(run: Run, progress: Progress) -> dict[str, float]:
    """Train one epoch (or its rest, after a mid-epoch resume); returns its train loss and top-1."""
    run.model.train()
    sums = torch.tensor(progress.epoch_sums, dtype=torch.float64, device=run.env.device)
    first_bad = torch.full((), -1, dtype=torch.long, device=run.env.device)
    every = max(run.cfg.logging.log_every_steps, 1)
    for images, labels in _batches(run, progress):
        loss, correct = train_step(run, images, labels)
        progress.step += 1
        progress.batch_in_epoch += 1
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), progress.step, first_bad)
        sums += torch.stack([loss.double() * labels.numel(), correct.double(), torch.tensor(
            float(labels.numel()), dtype=torch.float64, device=sums.device)])
        run.threshold.step(progress.step)
        if progress.step % every == 0 or progress.batch_in_epoch == run.steps_per_epoch:
            if int(first_bad) >= 0:
                _raise_non_finite(progress, int(first_bad))
            _log_step(run, progress, float(loss))
        ckpt_every = run.cfg.checkpoint_every_steps
        if ckpt_every and progress.step % ckpt_every == 0 and progress.batch_in_epoch < run.steps_per_epoch:
            progress.epoch_sums = sums.tolist()
            save(run, progress)
    if int(first_bad) >= 0:
        _raise_non_finite(progress, int(first_bad))
    sums = distributed.all_reduce_sum(sums, run.env)
    loss_sum, correct, count = sums.tolist()
    return {"train_loss": loss_sum / max(count, 1), "train_acc1": correct / max(count, 1)}


def _log_step(run: Run, progress: Progress, loss: float) -> None:
    lr = run.optimizer.param_groups[0]["lr"]
    d = run.flat_width(progress.step)
    if run.writer is not None:
        run.writer.train_step(progress.step, loss, lr, d)
    if run.env.is_main and not sys.stderr.isatty():
        log.info("epoch %d step %d loss %.4f lr %.3g d %.4g", progress.epoch + 1, progress.step, loss, lr, d)


def _sync_buffers(run: Run) -> None:
    """Give every rank rank 0's BatchNorm statistics, so all ranks evaluate the same network."""
    if run.env.distributed:
        for buffer in run.core.buffers():
            torch.distributed.broadcast(buffer, src=0)


@torch.no_grad()
def evaluate(run: Run) -> dict[str, Any]:
    """Top-1/top-5 and loss over the whole test set (reduced over ranks), firing rates and SynOps."""
    _sync_buffers(run)
    run.core.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=run.env.device)
    extras: dict[str, Any] = {"synops": None, "first_layer_macs": None}
    with FiringRates(run.core) as rates:
        for index, (images, labels) in enumerate(run.test_loader):
            images, labels = images.to(run.env.device), labels.to(run.env.device)
            with _autocast(run):
                scores = run.core(images)
            loss = loss_fn(run.cfg.loss, scores, labels)
            sums += torch.stack([loss.double() * labels.numel(), correct_topk(scores, labels, 1).double(),
                                 correct_topk(scores, labels, 5).double(),
                                 torch.tensor(float(labels.numel()), dtype=torch.float64, device=sums.device)])
            functional.reset_net(run.core)
            if index == 0 and run.env.is_main and run.cfg.logging.synops:
                extras.update(_synops(run, images))
        firing = rates.rates()
    sums = distributed.all_reduce_sum(sums, run.env)
    loss_sum, top1, top5, count = sums.tolist()
    return {"test_loss": loss_sum / count, "test_acc1": top1 / count, "test_acc5": top5 / count,
            "firing_rates": firing, **extras}


def _synops(run: Run, images: torch.Tensor) -> dict[str, Any]:
    with _autocast(run):
        counts = count_synops(run.core, images[: max(run.cfg.logging.synops_samples, 1)])
    functional.reset_net(run.core)
    return {"synops": counts["synops"], "first_layer_macs": counts["first_layer_macs"]}


def finish_epoch(run: Run, progress: Progress, train_stats: dict[str, float]) -> dict[str, Any]:
    """Learning-rate step, evaluation, metrics and checkpoints at the end of an epoch."""
    started = time.monotonic()
    run.lr_scheduler.step()
    test_stats = evaluate(run)
    progress.epoch += 1
    progress.batch_in_epoch = 0
    progress.epoch_sums = [0.0, 0.0, 0.0]
    sp = sparsity(run.core)
    record = {"epoch": progress.epoch, "step": progress.step, "lr": run.optimizer.param_groups[0]["lr"],
              "flat_width": run.flat_width(progress.step), **train_stats, **test_stats,
              "sparsity": sp["total"], "sparsity_layers": sp["layers"],
              "time_s": time.monotonic() - started}
    progress.history.append(record)
    best = record["test_acc1"] > progress.best_acc1
    if best:
        progress.best_acc1, progress.best_epoch = record["test_acc1"], progress.epoch
    save(run, progress, best=best)
    if run.writer is not None:
        run.writer.epoch(record)
        every = run.cfg.logging.histogram_every_epochs
        if every and (progress.epoch % every == 0 or progress.epoch == run.cfg.epochs):
            run.writer.histograms(run.core, progress.step)
    log.info("epoch %d/%d: test top-1 %.4f top-5 %.4f sparsity %.4f d %.4g", progress.epoch,
             run.cfg.epochs, record["test_acc1"], record["test_acc5"], record["sparsity"], record["flat_width"])
    return record


def fingerprint(model: nn.Module) -> torch.Tensor:
    """Per-tensor sums of the parameters and buffers: equal on every rank when they are in sync."""
    tensors = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
    return torch.stack([t.detach().double().sum() for t in tensors])


def ranks_in_sync(run: Run) -> bool:
    """True when every rank holds exactly the same weights as rank 0."""
    if not run.env.distributed:
        return True
    mine = fingerprint(run.core)
    gathered = [torch.empty_like(mine) for _ in range(run.env.world_size)]
    torch.distributed.all_gather(gathered, mine)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def summary(run: Run, progress: Progress) -> dict[str, Any]:
    """The figures of ``metrics.json``."""
    last = progress.history[-1]
    return {
        "world_size": run.env.world_size, "ranks_in_sync": ranks_in_sync(run),
        "test_acc1": last["test_acc1"], "test_acc5": last["test_acc5"],
        "best_test_acc1": progress.best_acc1, "best_epoch": progress.best_epoch,
        "sparsity": last["sparsity"], "sparsity_layers": last["sparsity_layers"],
        "synops": last.get("synops"), "first_layer_macs": last.get("first_layer_macs"),
        "firing_rates": last.get("firing_rates", {}),
        "epoch": progress.epoch, "epochs_planned": run.cfg.epochs, "step": progress.step,
        "flat_width": last["flat_width"],
    }


def _write_error(run_dir: Path, exc: BaseException) -> None:
    message = " ".join(str(exc).split()) or type(exc).__name__
    (run_dir / "error.txt").write_text(f"{type(exc).__name__}: {message}\n")


def fit(run: Run) -> float:
    """Resume if possible, train the remaining epochs, write ``metrics.json``; the final top-1."""
    progress = resume(run)
    run.threshold.step(progress.step)
    if run.env.is_main:
        run.writer = MetricsWriter(run.run_dir, purge_step=progress.step or None)
        run.writer.rewrite_history(progress.history)
    while progress.epoch < run.cfg.epochs:
        train_stats = train_epoch(run, progress)
        finish_epoch(run, progress, train_stats)
    _sync_buffers(run)
    result = summary(run, progress)
    if run.writer is not None:
        run.writer.final(result)
        run.writer.close()
    return float(result["test_acc1"])


def train(cfg: DictConfig, run_dir: Path | str | None = None) -> float:
    """Train the run described by ``cfg`` in ``run_dir`` (Hydra's output dir by default).

    Returns the final test top-1 accuracy (a fraction), the objective of sweeps.
    """
    cfg = prepare_config(cfg)
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir
    run_dir = Path(run_dir)
    env = distributed.setup(cfg.device)
    # every rank works in rank 0's directory (a `${now:...}` name may differ between processes)
    run_dir = Path(distributed.broadcast_object(str(run_dir), env))
    if not env.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "error.txt").unlink(missing_ok=True)
        _set_determinism(cfg, env)
        result = fit(build_run(cfg, env, run_dir))
    except BaseException as exc:
        if env.is_main and not isinstance(exc, KeyboardInterrupt):
            _write_error(run_dir, exc)
        raise
    # only after success: a rank that failed leaves its peers inside a collective, and the
    # launcher (torchrun, submitit) ends them; waiting for them here would hang
    distributed.teardown(env)
    return result
