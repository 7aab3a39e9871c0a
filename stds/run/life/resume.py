"""A run's checkpoint state: what `last.pt` / `best.pt` hold, how a run resumes, how one starts
from another run's weights.

The loop's state and what a checkpoint holds of it are in `stds.run.life.state`.

Resuming compares the checkpoint's config with the current one: keys that change the experiment
are refused with one line naming them; the keys in `SAFE_ON_RESUME` may change (``docs/resume.md``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from stds.errors import CheckpointError
from stds.method.schedule import TARGET_KIND
from stds.method.sparse import dense_state_dict, load_dense_weights
from stds.run.files import checkpoint as ckpt
from stds.run.setup.build import Run
from stds.run.setup.config import to_plain
from stds.run.files.atomic import write_atomic
from stds.run.files.rebuild import check_saved_config, sparsified_model
from stds.run.files.safe import UnsafeFileError, open_binary, read_yaml
from stds.run.life.state import EpochSums, Progress

log = logging.getLogger(__name__)

SAFE_ON_RESUME: tuple[str, ...] = (
    "logging", "loader", "checkpoint_every_steps", "device", "deterministic", "compile", "distributed",
    "channels_last", "dataset.root", "dataset.download", "dataset.bad_images", "dataset.max_bad_images",
    "resume", "init_from", "trial",
)
"""Config keys (and key prefixes) that may differ between a checkpoint and the run resuming it:
where the data lies, how it is loaded, logged and checkpointed, and how the step is executed.
``init_from`` only matters when a run starts; ``deterministic=false`` gives up bit-identity;
``distributed.timeout_s`` only bounds a wait; ``trial`` only names the study trial the run reports
to (a search's retry continues the failed trial's run as a new trial; ``trial.number=null`` trains
a pruned trial on without the study)."""


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _safe(key: str) -> bool:
    return any(key == safe or key.startswith(f"{safe}.") for safe in SAFE_ON_RESUME)


def changed_keys(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for every key that differs and is not safe to change.

    A key present on one side only (a key added to the schema since the checkpoint) is not a change.
    """
    old, new = _flatten(saved), _flatten(current)
    return [(k, old[k], new[k]) for k in sorted(old.keys() & new.keys())
            if old[k] != new[k] and not _safe(k)]


def as_it_ran(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config with the keys added since, where their default would change what ran.

    ``scheduler.hold_keeps_weights``: a ``scheduler=target`` checkpoint written before the key
    existed moved every unpruned weight with d in its hold, which is the value false; its default
    now is true, so without this a resumed run would change its rule silently.
    """
    scheduler = saved.get("scheduler")
    if isinstance(scheduler, dict) and scheduler.get("kind") == TARGET_KIND and "hold_keeps_weights" not in scheduler:
        return {**saved, "scheduler": {**scheduler, "hold_keeps_weights": False}}
    return saved


class ResumeRefused(CheckpointError):
    """A resume refused because the experiment would change: the run directory is left as it was
    (no ``error.txt``; docs/resume.md)."""


def check_compatible(run: Run, state: dict[str, Any], path: Path) -> None:
    """Refuse (`ResumeRefused`) a checkpoint whose experiment differs from the config, naming every
    changed key."""
    saved = as_it_ran(dict(state.get("config", {})))
    changed = changed_keys(saved, to_plain(run.cfg))
    if changed:
        listed = ", ".join(f"{key} ({old}, now {new})" for key, old, new in changed)
        raise ResumeRefused(
            f"checkpoint {path} was written with other values of {listed}; these keys cannot change "
            "when a run resumes (docs/resume.md): restore them or use a new run directory"
        )


def resume(run: Run) -> Progress:
    """Load ``last.pt`` if the run directory has one; otherwise a fresh `Progress`."""
    path = run.ckpt_dir / ckpt.LAST
    if not path.exists():
        return Progress()
    state = ckpt.load(path, run.run_dir)
    check_compatible(run, state, path)
    try:
        run.core.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not fit this model: {first}") from None
    run.scaler.load_state_dict(state["scaler"])
    run.lr_scheduler.load_state_dict(state["lr_scheduler"])
    run.threshold.load_state_dict(state["schedule"])
    ckpt.set_rng_state(state["rng"])
    sums = state["epoch_sums"]
    progress = Progress(
        epoch=state["epoch"], step=state["step"], batch_in_epoch=state["batch_in_epoch"],
        best_acc1=state["best_acc1"], best_epoch=state["best_epoch"],
        best_sparsity=float(state["best_sparsity"]),
        # the checkpoint holds the sums of every rank (`state.sums_over_ranks`): rank 0 carries them
        sums=EpochSums(sums["loss"], sums["correct"], int(sums["samples"])) if run.env.is_main else EpochSums(),
        last_record=state["last_record"],
        pending_eval=state["pending_eval"],  # checkpointed before its evaluation
    )
    log.info("resumed from %s in %s", path, progress.where(run.settings.epochs))
    return progress


def repair_best(run: Run, progress: Progress) -> None:
    """A checkpoint that names a best epoch while ``best.pt`` is missing (written by an older
    version, or ``best.pt`` deleted): the best weights are gone, so the next finished epoch is
    written as ``best.pt`` whatever its accuracy, and the log says so."""
    if progress.best_epoch and not (run.ckpt_dir / ckpt.BEST).exists():
        log.warning("checkpoints/best.pt (epoch %d) is missing; the next epoch is saved as best.pt",
                    progress.best_epoch)
        progress.best_acc1, progress.best_epoch = -1.0, 0


# ---------------------------------------------------------------- starting from other weights

def _weights_of(path: Path) -> dict[str, torch.Tensor]:
    """The plain weights (w with zeros, BatchNorm, biases) of a stds checkpoint or a ``pruned.pt``."""
    try:
        handle = open_binary(path, path.parent)  # a symlink at the name is refused, never followed
    except UnsafeFileError as exc:
        raise CheckpointError(f"init_from: {exc}") from None
    try:
        with handle:
            blob = torch.load(handle, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(f"init_from={path} is not readable ({type(exc).__name__}); "
                              "give a checkpoints/*.pt or an exported pruned.pt") from None
    if isinstance(blob, dict) and "state_dict" in blob and "config" in blob:  # pruned.pt
        if blob.get("format_version") != ckpt.PRUNED_FORMAT_VERSION:
            raise CheckpointError(f"init_from={path} is a pruned.pt of format {blob.get('format_version')}, "
                                  f"not {ckpt.PRUNED_FORMAT_VERSION}; export it again with this stds")
        return blob["state_dict"]
    if isinstance(blob, dict) and "format_version" in blob and "model" in blob and "config" in blob:
        state = ckpt.upgrade(blob, path)
        source = sparsified_model(state["config"], path)
        try:
            source.load_state_dict(state["model"])
        except (RuntimeError, KeyError, TypeError, AttributeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CheckpointError(f"init_from={path}: its weights do not fit its own config's model: {first}; "
                                  "give a checkpoints/*.pt or a pruned.pt written by stds") from None
        return dense_state_dict(source)
    raise CheckpointError(f"init_from={path} is neither a stds checkpoint nor an exported pruned.pt; "
                          "give a checkpoints/*.pt or a pruned.pt")


def init_from(run: Run, path: str) -> None:
    """Start a new run from the weights in ``path``: each pruned θ is set by the inverse of this
    run's reparameterization at its first threshold, so the initial w equals the loaded weights."""
    source = Path(path).expanduser()
    if not source.is_file():
        raise CheckpointError(f"init_from={path} does not exist; give a checkpoints/*.pt or a pruned.pt")
    weights = _weights_of(source)  # its CheckpointError (unreadable, refused config) is no misfit
    try:
        load_dense_weights(run.core, weights)
    except (RuntimeError, KeyError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"init_from={path} does not fit model={_model_name(run)}: {first}") from None
    log.info("initialised from %s", source)


def _model_name(run: Run) -> str:
    target = OmegaConf.select(run.cfg, "model._target_") or "?"
    return str(target).rsplit(".", 1)[-1]



# ---------------------------------------------------------------- the run's saved config

def record_config(run_dir: Path, cfg: Any, with_hydra: bool = True) -> None:
    """Write ``.hydra/config.yaml`` (and, under Hydra with ``with_hydra``, ``hydra.yaml`` and
    ``overrides.yaml``: the command that started the run; a ``resume=`` keeps the original ones).

    Hydra's own writing is off (``hydra.output_subdir: null``): the run writes these itself when
    it starts fresh or once a resume is accepted, so a refused resume leaves the files of the run
    as they were.
    """
    out = run_dir / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    files = {"config.yaml": cfg}
    if with_hydra and HydraConfig.initialized():
        hydra_node = HydraConfig.get()
        files["hydra.yaml"] = OmegaConf.create({"hydra": hydra_node})
        files["overrides.yaml"] = OmegaConf.create(list(hydra_node.overrides.task))
    for name, node in files.items():
        write_atomic(out / name, OmegaConf.to_yaml(node))


# ---------------------------------------------------------------- resume=<dir> | resume=last

DEFAULT_RUNS_ROOT = Path("outputs") / "runs"
"""Where ``resume=last`` looks without Hydra: the fixed part of ``conf/train.yaml``'s ``hydra.run.dir``."""


def runs_root(run_dir_pattern: str | None) -> Path:
    """The fixed leading part of a ``hydra.run.dir`` value, before its first interpolation:
    ``/scratch/runs/${now:%H-%M-%S}`` -> ``/scratch/runs``; None -> `DEFAULT_RUNS_ROOT`."""
    if not run_dir_pattern:
        return DEFAULT_RUNS_ROOT
    parts = []
    for part in Path(run_dir_pattern).expanduser().parts:
        if "${" in part:
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def _hydra_runs_root() -> Path:
    """`runs_root` of this Hydra job's ``hydra.run.dir`` as written (its interpolations unresolved)."""
    if not HydraConfig.initialized():
        return DEFAULT_RUNS_ROOT
    pattern = OmegaConf.to_container(HydraConfig.get().run, resolve=False).get("dir")
    return runs_root(str(pattern) if pattern is not None else None)


def _choice(overrides: list[str], key: str) -> str | None:
    for item in overrides:
        name, sep, value = item.partition("=")
        if sep and name.lstrip("+~") == key:
            return value
    return None


def _saved_overrides(run_dir: Path) -> list[str]:
    """The run's ``.hydra/overrides.yaml`` as plain strings (read as data, never resolved)."""
    try:
        listed = read_yaml(run_dir / ".hydra" / "overrides.yaml", run_dir)
    except OSError:  # missing, or refused (a symlink, a FIFO, not YAML): no experiment to match
        return []
    return [str(item) for item in listed] if isinstance(listed, list) else []


def latest_run(root: Path, experiment: str | None) -> Path:
    """The run under ``root`` with the newest ``checkpoints/last.pt`` whose ``experiment`` choice
    is ``experiment`` (None: runs started without a preset)."""
    candidates = []
    for last in Path(root).glob("**/checkpoints/last.pt"):
        run_dir = last.parent.parent
        if _choice(_saved_overrides(run_dir), "experiment") == experiment:
            candidates.append((last.stat().st_mtime, run_dir))
    if not candidates:
        which = f"experiment={experiment}" if experiment else "the default experiment"
        raise CheckpointError(f"resume=last: no run of {which} with checkpoints/last.pt under {root}; "
                              "give resume=<run dir> or start a new run without resume")
    return max(candidates)[1].resolve()


def find_run(target: str, root: Path, experiment: str | None) -> Path:
    """The run directory ``resume=<target>`` names: ``last`` (`latest_run` under ``root``) or a path."""
    if target == "last":
        return latest_run(root, experiment)
    run_dir = Path(target).expanduser().resolve()
    if not (run_dir / "checkpoints" / ckpt.LAST).exists():
        raise CheckpointError(f"resume={target}: {run_dir / 'checkpoints' / ckpt.LAST} does not exist; "
                              "give a run directory holding a checkpoint")
    return run_dir


def resume_target(cfg: DictConfig) -> Path | None:
    """The run directory ``cfg.resume`` names (None when it is unset), ``last`` looked up under the
    fixed part of this job's ``hydra.run.dir`` (or `DEFAULT_RUNS_ROOT`), for this experiment."""
    target = cfg.get("resume")
    if target in (None, "", "null", "None"):
        return None
    experiment = None
    if HydraConfig.initialized():
        experiment = HydraConfig.get().runtime.choices.get("experiment")
    return find_run(str(target), _hydra_runs_root(), experiment)


def _given_keys(cfg: DictConfig) -> list[str] | None:
    """The config keys the user set for this job (Hydra's task overrides; a group choice such as
    ``optimizer=sgd`` names its whole node); None without Hydra: every key of ``cfg`` counts."""
    if not HydraConfig.initialized():
        return None
    keys = []
    for item in HydraConfig.get().overrides.task:
        name = str(item).partition("=")[0].lstrip("+~")
        if name != "resume" and not name.startswith("hydra.") and OmegaConf.select(cfg, name) is not None:
            keys.append(name)
    return keys


def resumed_config(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """The config of the run in ``run_dir`` (its checkpoint's, as data: never resolved, its
    ``_target_``s allowlisted) with the keys the user gave now on top; `check_compatible` later
    refuses those that change the experiment."""
    path = run_dir / "checkpoints" / ckpt.LAST
    saved = ckpt.load(path, run_dir)["config"]
    check_saved_config(saved, path)
    merged = OmegaConf.create(as_it_ran(saved))
    given = _given_keys(cfg)
    if given is None:
        merged = OmegaConf.merge(merged, OmegaConf.create(to_plain(cfg)))
    for key in given or ():
        OmegaConf.update(merged, key, OmegaConf.select(cfg, key), merge=False, force_add=True)
    merged.resume = str(run_dir)
    return merged
