"""A run's checkpoint state: what `last.pt` / `best.pt` hold, how a run resumes, how one starts
from another run's weights.

The loop's state and what a checkpoint holds of it are in `stds.run.state`.

Resuming compares the checkpoint's config with the current one: keys that change the experiment
are refused with one line naming them; the keys in `SAFE_ON_RESUME` may change (``docs/resume.md``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from stds.errors import CheckpointError
from stds.method.sparse import dense_state_dict, load_dense_weights
from stds.run import checkpoint as ckpt
from stds.run.build import Run, normalize_amp
from stds.run.config import to_plain
from stds.run.rebuild import sparsified_model
from stds.run.state import EpochSums, Progress

log = logging.getLogger(__name__)

SAFE_ON_RESUME: tuple[str, ...] = (
    "logging", "loader", "checkpoint_every_steps", "device", "deterministic", "compile",
    "channels_last", "dataset.root", "dataset.download", "dataset.bad_images", "dataset.max_bad_images",
    "resume", "init_from",
)
"""Config keys (and key prefixes) that may differ between a checkpoint and the run resuming it:
where the data lies, how it is loaded, logged and checkpointed, and how the step is executed.
``init_from`` only matters when a run starts; ``deterministic=false`` gives up bit-identity."""


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


def check_compatible(run: Run, state: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint whose experiment differs from the config, naming every changed key."""
    saved = dict(state.get("config", {}))
    if "amp" in saved:  # a bool before amp took fp16 / bf16
        saved["amp"] = normalize_amp(saved["amp"])
    changed = changed_keys(saved, to_plain(run.cfg))
    if changed:
        listed = ", ".join(f"{key} ({old}, now {new})" for key, old, new in changed)
        raise CheckpointError(
            f"checkpoint {path} was written with other values of {listed}; these keys cannot change "
            "when a run resumes (docs/resume.md): restore them or use a new run directory"
        )


def resume(run: Run) -> Progress:
    """Load ``last.pt`` if the run directory has one; otherwise a fresh `Progress`."""
    path = run.ckpt_dir / ckpt.LAST
    if not path.exists():
        return Progress()
    state = ckpt.load(path)
    check_compatible(run, state, path)
    try:
        run.core.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not fit this model: {first}") from None
    run.scaler.load_state_dict(state["scaler"])
    run.lr_scheduler.load_state_dict(state["lr_scheduler"])
    if "threshold" in state:
        run.threshold.load_state_dict(state["threshold"])
    else:  # written before the schedule kept a state: d was a function of the step alone
        run.threshold.step(state["step"])
    ckpt.set_rng_state(state["rng"])
    sums = state["epoch_sums"]
    if isinstance(sums, list):  # written before the sums had names: [loss·n, correct, n]
        sums = {"loss": sums[0], "correct": sums[1], "samples": sums[2]}
    history = state.get("history") or [None]  # older checkpoints kept every epoch's record
    progress = Progress(
        epoch=state["epoch"], step=state["step"], batch_in_epoch=state["batch_in_epoch"],
        best_acc1=state["best_acc1"], best_epoch=state["best_epoch"],
        sums=EpochSums(sums["loss"], sums["correct"], int(sums["samples"])),
        last_record=state.get("last_record", history[-1]),
        pending_eval=state.get("pending_eval"),  # checkpointed before its evaluation
    )
    log.info("resumed from %s at epoch %d, step %d", path, progress.epoch, progress.step)
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
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(f"init_from={path} is not readable ({type(exc).__name__}); "
                              "give a checkpoints/*.pt or an exported pruned.pt") from None
    if isinstance(blob, dict) and "state_dict" in blob and "config" in blob:  # pruned.pt
        return blob["state_dict"]
    if isinstance(blob, dict) and blob.get("format_version") == ckpt.FORMAT_VERSION and "config" in blob:
        source = sparsified_model(blob["config"], path)
        source.load_state_dict(blob["model"])
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

def record_config(run_dir: Path, cfg: Any) -> None:
    """Write ``.hydra/config.yaml`` (and ``hydra.yaml``, ``overrides.yaml`` under Hydra).

    Hydra's own writing is off (``hydra.output_subdir: null``): the run writes these itself when
    it starts fresh or once a resume is accepted, so a refused resume leaves the files of the run
    as they were.
    """
    from hydra.core.hydra_config import HydraConfig

    out = run_dir / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    files = {"config.yaml": cfg}
    if HydraConfig.initialized():
        hydra_node = HydraConfig.get()
        files["hydra.yaml"] = OmegaConf.create({"hydra": hydra_node})
        files["overrides.yaml"] = OmegaConf.create(list(hydra_node.overrides.task))
    for name, node in files.items():
        tmp = out / f".{name}.tmp"
        OmegaConf.save(node, tmp)
        tmp.replace(out / name)


# ---------------------------------------------------------------- resume=<dir> | resume=last

RUNS_ROOT = Path("outputs") / "runs"
"""Where ``resume=last`` looks (the default ``hydra.run.dir`` lies under it), relative to the cwd."""


def _value(overrides: list[str], key: str) -> str | None:
    for item in overrides:
        if item.split("=", 1)[0].lstrip("+~") == key and "=" in item:
            return item.split("=", 1)[1]
    return None


def _saved_overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return []
    return [str(item) for item in OmegaConf.load(path)]


def latest_run(root: Path, experiment: str | None) -> Path:
    """The run under ``root`` with the newest ``checkpoints/last.pt`` whose ``experiment`` choice
    is ``experiment`` (None: runs started without a preset)."""
    candidates = []
    for last in root.glob("**/checkpoints/last.pt"):
        run_dir = last.parent.parent
        if _value(_saved_overrides(run_dir), "experiment") == experiment:
            candidates.append((last.stat().st_mtime, run_dir))
    if not candidates:
        which = f"experiment={experiment}" if experiment else "the default experiment"
        raise CheckpointError(f"resume=last: no run of {which} with checkpoints/last.pt under {root}; "
                              "give resume=<run dir> or start a new run without resume")
    return max(candidates)[1]


def resume_overrides(argv: list[str], cwd: Path | None = None) -> list[str]:
    """The command line with ``resume=<run dir>|last`` expanded: the run's saved overrides first,
    then the user's (later ones win, and `check_compatible` refuses those that change the
    experiment), then ``hydra.run.dir`` pointing at the run. Other command lines are unchanged."""
    target = _value(argv, "resume")
    if target is None or target in ("null", "None", ""):
        return argv
    if "-m" in argv or "--multirun" in argv:
        raise CheckpointError("resume= continues one run; drop -m/--multirun (each sweep point resumes in its own directory)")
    cwd = cwd or Path.cwd()
    own = [item for item in argv if _value([item], "resume") is None]
    if target == "last":
        run_dir = latest_run(cwd / RUNS_ROOT, _value(own, "experiment"))
    else:
        run_dir = (cwd / Path(target).expanduser()).resolve()
        if not (run_dir / "checkpoints" / "last.pt").exists():
            raise CheckpointError(f"resume={target}: {run_dir / 'checkpoints' / 'last.pt'} does not exist; "
                                  "give a run directory holding a checkpoint")
    given = {item.split("=", 1)[0].lstrip("+~") for item in own if "=" in item}
    given |= {"resume", "hydra.run.dir"}
    saved = [item for item in _saved_overrides(run_dir) if item.split("=", 1)[0].lstrip("+~") not in given]
    print(f"resuming {run_dir}", flush=True)
    return saved + own + [f"hydra.run.dir={run_dir}", f"resume={run_dir}"]
