"""Structured-config schema of ``conf/train.yaml`` and the checks Hydra cannot express.

`register_configs` stores `TrainConfig` in Hydra's ConfigStore as ``train_schema``; the primary
config lists it first in its defaults, so a key that does not exist or a value of the wrong type
(``T=abc``, ``sparse.method=foo``) fails when the config is composed, naming the key.
`validate` then checks ranges and paths (``flat_width >= 0``, an existing dataset root, ...)
and raises `stds.errors.ConfigError` with a one-line message naming the key and the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from stds.data.images import BAD_IMAGE_POLICIES
from stds.errors import ConfigError, user_error
from stds.run.setup.accel import check_channels_last
from stds.method.schedule import SCHEDULE_KINDS, SCHEDULES, TARGET_KIND, check_ramp_until
from stds.method.sparse import REPARAMS
from stds.data import DATASETS
from stds.models import MODELS
from stds.run.setup.optim_registry import LR_SCHEDULES, OPTIMIZERS


class LossKind(str, Enum):
    """Training loss: cross-entropy on scores, or MSE of scores against one-hot labels."""

    ce = "ce"
    mse = "mse"


class GradRVariant(str, Enum):
    """Grad R prior update; ``auto`` = sign_preserving for Adam/AdamW, plain otherwise."""

    auto = "auto"
    sign_preserving = "sign_preserving"
    plain = "plain"


class GradROptimize(str, Enum):
    """What the optimizer trains under Grad R: ``all`` parameters, or only the ``pruned`` θ
    (the published baseline: BatchNorm, biases and unpruned layers keep their initial values)."""

    all = "all"
    pruned = "pruned"


@dataclass
class SparseConfig:
    # a key of stds.method.sparse.REPARAMS: identity, st, stmod, or one registered with register_reparam
    method: str = "stmod"
    # sparse=gmp only: layer (each pruned layer to the wanted sparsity, Zhu and Gupta) or global
    scope: Optional[str] = None
    # fnmatch patterns of layers left dense; null = the model's own `prune_exclude`
    exclude: Optional[list[str]] = None


@dataclass
class ScheduleConfig:
    # a key of stds.method.schedule.SCHEDULE_KINDS: constant, linear, sine, cubic, target (d follows
    # target_sparsity, docs/target_sparsity.md), or a ramp registered with register_schedule
    kind: str = "sine"
    # kind=target only: the SCHEDULES key the wanted sparsity follows from 0 to target_sparsity
    ramp: Optional[str] = None
    # the share of training, in (0, 1], after which d (or target's wanted sparsity) holds its final value
    ramp_until: float = 1.0
    # kind=target only: in the hold, a move of d leaves the unpruned weights' values as they were
    # (true, conf/scheduler/target.yaml) or shrinks/grows them all by the move (false)
    hold_keeps_weights: Optional[bool] = None


@dataclass
class LoaderConfig:
    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False
    eval_batch_size: Optional[int] = None


@dataclass
class LoggingConfig:
    log_every_steps: int = 50
    histogram_every_epochs: int = 10
    synops: bool = True
    synops_samples: int = 16
    progress_bar: bool = True
    # energy_uj = (energy_ac_pj * synops + energy_mac_pj * first_layer_macs) / 1e6 (docs/metrics.md)
    energy_ac_pj: float = 0.9
    energy_mac_pj: float = 4.6


@dataclass
class TrialLinkConfig:
    """Set by a search for each trial (`stds.run.life.study_link`): the study and the trial's number."""

    storage: Optional[str] = None
    study: Optional[str] = None
    number: Optional[int] = None


@dataclass
class DistributedConfig:
    # a collective (gradient all-reduce, barrier) waiting longer than this fails the run instead of
    # hanging; then error.txt names the ranks that stopped answering (a lost node)
    timeout_s: float = 1800.0


@dataclass
class TrainConfig:
    dataset: Any = None
    model: Any = None
    sparse: SparseConfig = field(default_factory=SparseConfig)
    scheduler: ScheduleConfig = field(default_factory=ScheduleConfig)
    optimizer: Any = None
    lr_scheduler: Any = None
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    # null (as in presets whose value must be chosen) is refused by `validate`, naming the key
    flat_width: Optional[float] = 0.5
    alpha_gr: Optional[float] = 0.0
    gradr_variant: GradRVariant = GradRVariant.auto
    gradr_optimize: GradROptimize = GradROptimize.all
    T: int = 4
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    loss: LossKind = LossKind.ce
    # false | fp16 | bf16 (true = fp16); normalised by stds.run.setup.build.prepare_config
    amp: Any = False
    seed: int = 0
    deterministic: bool = True
    device: str = "auto"
    # auto (on for a convolutional model on CUDA), true or false; see stds.run.setup.accel
    channels_last: str = "auto"
    compile: bool = False  # torch.compile the training model
    checkpoint_every_steps: int = 0
    # scheduler=target: the sparsity S the run ends at (0 < S < 1), and steps between recomputes of d
    target_sparsity: Optional[float] = None
    target_every_steps: Optional[int] = None   # null: stds.method.target.default_every (1000 per run)
    # a run directory to continue (launch/train.py resolves `last`); set by the entrypoint
    resume: Optional[str] = None
    # start a new run from the weights of a checkpoint or an exported pruned.pt
    init_from: Optional[str] = None
    # a search's trial: set by the search (docs/search.md), null for a run of its own
    trial: TrialLinkConfig = field(default_factory=TrialLinkConfig)


_GROUPS = {"dataset": DATASETS, "model": MODELS, "optimizer": OPTIMIZERS, "lr_scheduler": LR_SCHEDULES}
"""The config groups whose options are registrations (`stds.registry.Buildable` entries)."""

SHIPPED_CONF = Path(__file__).resolve().parents[3] / "conf"
"""The ``conf/`` beside the package: the primary config directory of ``launch/train.py``."""


def register_configs(conf_dir: Path = SHIPPED_CONF) -> None:
    """Store the schema in Hydra's ConfigStore (called by the entrypoint and the tests), and a
    config group option for every registered reparameterization (``sparse=<name>``), and every
    registered model, dataset, optimizer and learning-rate schedule that came with its config node
    (``model=<name>``, ``dataset=<name>``, ``optimizer=<name>``, ``lr_scheduler=<name>``), unless
    ``conf_dir/<group>/<name>.yaml`` is there: the shipped files (with their comments) are what
    the built-ins select."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    nodes = [("sparse", name, {"method": name, "exclude": None}) for name in REPARAMS]
    nodes += [(group, name, dict(entry.config)) for group, registry in _GROUPS.items()
              for name, entry in registry.items() if entry.config is not None]
    for group, name, node in nodes:
        if not (conf_dir / group / f"{name}.yaml").exists():
            store.store(group=group, name=name, node=node)


_POSITIVE = ("T", "epochs", "batch_size")
_NON_NEGATIVE = ("alpha_gr", "checkpoint_every_steps")
_FINITE = ("flat_width", "alpha_gr", "lr")  # nan passes every comparison check; inf is no value


def _check_numbers(cfg: DictConfig) -> None:
    for key in ("flat_width", "alpha_gr"):
        if cfg[key] is None and not (key == "flat_width" and cfg.scheduler.kind == TARGET_KIND):
            raise ConfigError(f"{key} is not set (this preset leaves it to you); set {key}=<value>")
    for key in _FINITE:
        if cfg[key] is not None and not math.isfinite(cfg[key]):
            raise ConfigError(f"{key}={cfg[key]} is not a finite number; set {key}=<a finite value>")
    for key in _POSITIVE:
        if cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]} must be an integer >= 1; set {key}=<n> with n >= 1")
    if cfg.flat_width is not None and cfg.flat_width < 0:
        raise ConfigError(f"flat_width={cfg.flat_width} must be >= 0; set flat_width=<value> with value >= 0")
    for key in _NON_NEGATIVE:
        if cfg[key] < 0:
            raise ConfigError(f"{key}={cfg[key]} must be >= 0; set {key}=<value> with value >= 0")
    if not cfg.lr > 0:
        raise ConfigError(f"lr={cfg.lr} must be > 0; set lr=<value> with value > 0")
    for key in ("energy_ac_pj", "energy_mac_pj"):
        value = cfg.logging[key]
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"logging.{key}={value} must be a finite number >= 0 (picojoules per operation)")
    if cfg.loader.num_workers < 0:
        raise ConfigError(f"loader.num_workers={cfg.loader.num_workers} must be >= 0")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device={cfg.device!r} is not valid; use one of auto, cpu, cuda")
    timeout_s = cfg.distributed.timeout_s
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ConfigError(f"distributed.timeout_s={timeout_s} must be a number of seconds > 0; "
                          "set distributed.timeout_s=<seconds>, e.g. 1800")


def _check_method(cfg: DictConfig) -> None:
    if cfg.sparse.method not in REPARAMS:
        raise ConfigError(f"sparse.method={cfg.sparse.method!r} is not valid; use one of {REPARAMS.choices()} "
                          "(sparse=<name>; a method of your own: register_reparam)")
    if cfg.scheduler.kind not in SCHEDULE_KINDS or cfg.scheduler.kind in _reparam_kinds():
        raise ConfigError(f"scheduler.kind={cfg.scheduler.kind!r} is not valid; use one of "
                          f"{SCHEDULE_KINDS.choices()} (a ramp of your own: register_schedule)")
    ramp_until = cfg.scheduler.ramp_until
    try:
        check_ramp_until(ramp_until)  # the method's own rule, nan refused
    except ValueError:
        raise ConfigError(f"scheduler.ramp_until={ramp_until} must lie in (0, 1] (the share of training "
                          "after which the schedule holds); set scheduler.ramp_until=<fraction>, e.g. 0.75") from None
    if cfg.gradr_optimize == GradROptimize.pruned:
        _check_gradr_pruned_only(cfg)
    if cfg.alpha_gr > 0 and cfg.sparse.method == "identity":
        raise ConfigError(
            f"alpha_gr={cfg.alpha_gr} needs a pruning method; set sparse=stmod (Grad R) or alpha_gr=0"
        )


def _reparam_kinds() -> set[str]:
    """Schedule kinds that a reparameterization brings with it (``magnitude`` for gmp): not a
    ``scheduler.kind`` of their own."""
    return {cls.schedule_kind for cls in REPARAMS.values() if cls.schedule_kind}


def _check_own_schedule(cfg: DictConfig) -> None:
    """A reparameterization with a schedule of its own (``sparse=gmp``) prunes to ``target_sparsity``
    on the target schedule's keys; ``sparse.scope`` belongs to it alone."""
    method, scope = cfg.sparse.method, cfg.sparse.get("scope")
    if REPARAMS[method].schedule_kind is None:
        if scope is not None:
            raise ConfigError(f"sparse.scope={scope} is used only by sparse=gmp; add sparse=gmp or remove sparse.scope")
        return
    if cfg.scheduler.kind != TARGET_KIND:
        raise ConfigError(f"sparse={method} prunes to a sparsity on the target schedule (scheduler.kind="
                          f"{cfg.scheduler.kind}); add scheduler=target target_sparsity=<S>")
    if scope not in ("layer", "global"):
        raise ConfigError(f"sparse.scope={scope!r} is not valid; use layer (each layer to S) or global")


def _check_gradr_pruned_only(cfg: DictConfig) -> None:
    """``gradr_optimize=pruned`` trains only pruned θ under the Grad R prior: both must exist."""
    if cfg.sparse.method == "identity":
        raise ConfigError(
            "gradr_optimize=pruned trains only pruned weights and sparse=identity prunes none; "
            "set sparse=stmod or gradr_optimize=all"
        )
    if cfg.alpha_gr == 0:
        raise ConfigError(
            "gradr_optimize=pruned is the published Grad R baseline and alpha_gr=0 turns Grad R off; "
            "set alpha_gr=<alpha> > 0 or gradr_optimize=all"
        )


def _check_target(cfg: DictConfig) -> None:
    """``scheduler=target``: S in (0, 1), a pruning method, no Grad R; S only with that scheduler.

    ``flat_width`` is ignored by it (d comes from θ), so any value, null included, is accepted.
    """
    target = cfg.target_sparsity
    if cfg.scheduler.kind != TARGET_KIND:
        if target is not None:
            raise ConfigError(f"target_sparsity={target} is used only by scheduler=target; "
                              "add scheduler=target or remove target_sparsity")
        for key in ("ramp", "hold_keeps_weights"):
            if cfg.scheduler[key] is not None:
                raise ConfigError(f"scheduler.{key}={cfg.scheduler[key]} is used only by scheduler=target; "
                                  f"add scheduler=target or remove scheduler.{key}")
        return
    if target is None or not 0 < target < 1:
        raise ConfigError(f"scheduler=target needs target_sparsity in (0, 1), got {target}; "
                          "set target_sparsity=<S>, e.g. 0.9")
    if cfg.sparse.method == "identity":
        raise ConfigError("scheduler=target needs a pruning method (sparse=identity zeroes no weight); "
                          "set sparse=stmod or sparse=st")
    if cfg.alpha_gr > 0:
        raise ConfigError(f"alpha_gr={cfg.alpha_gr} is Grad R, whose threshold is the constant mu=flat_width; "
                          "scheduler=target sets d itself: set alpha_gr=0 or scheduler=constant")
    if cfg.scheduler.ramp not in SCHEDULES:
        raise ConfigError(f"scheduler.ramp={cfg.scheduler.ramp!r} is not valid; use one of {SCHEDULES.choices()}")
    if cfg.target_every_steps is not None and cfg.target_every_steps < 1:
        raise ConfigError(f"target_every_steps={cfg.target_every_steps} must be >= 1; "
                          "set target_every_steps=<n> with n >= 1, or null for the default")


def _check_dataset(cfg: DictConfig, files: bool = True) -> None:
    for key in ("_target_", "num_classes", "in_channels", "image_size"):
        if key not in cfg.dataset:
            raise ConfigError(f"dataset.{key} is missing; pick a dataset with dataset=<name>")
    policy = cfg.dataset.get("bad_images", "error")
    if policy not in BAD_IMAGE_POLICIES:
        raise ConfigError(f"dataset.bad_images={policy!r} is not valid; use {' or '.join(BAD_IMAGE_POLICIES)}")
    limit = cfg.dataset.get("max_bad_images", 0)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise ConfigError(f"dataset.max_bad_images={limit!r} must be an integer >= 0")
    root = cfg.dataset.get("root")
    if not files or root is None or cfg.dataset.get("download", False):
        return
    if not Path(str(root)).expanduser().exists():
        raise ConfigError(
            f"dataset.root={root} does not exist; set dataset.root=<path to the data>"
            + (" or dataset.download=true" if "download" in cfg.dataset else "")
        )


def _check_speed(cfg: DictConfig) -> None:
    check_channels_last(cfg.channels_last)


def validate(cfg: DictConfig, files: bool = True) -> None:
    """Check what the schema's types cannot; raise `ConfigError` naming the key and the fix.
    ``files=False`` leaves out what looks at this machine (that ``dataset.root`` exists): a
    search checks its trials' configs where it runs, and the trials may run on other nodes."""
    for key, registry in _GROUPS.items():
        if cfg.get(key) is None:
            raise ConfigError(f"{key} is not set; pick one with {key}=<name> ({registry.choices()})")
    _check_numbers(cfg)
    _check_method(cfg)
    _check_target(cfg)
    _check_own_schedule(cfg)
    _check_dataset(cfg, files)
    _check_speed(cfg)


def to_plain(cfg: DictConfig) -> dict:
    """The resolved config as a plain dict (for checkpoints and reports)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def typed_config(plain: dict) -> DictConfig:
    """``plain`` (a resolved config) merged onto `TrainConfig`; a key the schema lacks
    (``+flat_widht=1``) or a value of the wrong type is a one-line `ConfigError`."""
    from omegaconf.errors import ConfigKeyError, ValidationError

    try:
        return OmegaConf.merge(OmegaConf.structured(TrainConfig), plain)
    except ConfigKeyError as exc:
        raise ConfigError(
            f"{exc.full_key} is not a config key; check its spelling "
            "(python launch/train.py --cfg job lists every key)"
        ) from None
    except ValidationError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"{exc.full_key}: {first}; give {exc.full_key} a value of its type") from None


def instantiate_node(node: Any, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node, **kwargs)``; a `StdsError` raised inside comes out as itself.

    Hydra wraps every error of a ``_target_`` call in an InstantiationException whose message
    spans lines ("Error in call to target ...", the error's repr, "full_key: ..."). A problem the
    user can fix (`stds.errors.StdsError`, e.g. ``model.neuron.kind=bogus``) is re-raised as is,
    so it reaches the log, ``error.txt`` and the terminal as its own one line; any other error
    passes unchanged, except a key the target does not take (``+model.foo=1``), which
    becomes a `ConfigError` naming ``key``.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        error, cause = user_error(exc), exc.__cause__
        if error is not None:
            raise error from None
        if isinstance(cause, TypeError) and "unexpected keyword argument" in str(cause):
            raise ConfigError(f"{key}: {' '.join(str(cause).split())}; remove or rename that key of {key}") from exc
        raise
