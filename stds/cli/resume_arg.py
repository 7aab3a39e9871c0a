"""``resume=<run dir>|last`` on the command line: Hydra is pointed at the run's own directory.

The run itself is continued by the library (`stds.run.life.trainer.train` reads ``cfg.resume``, takes the
run's saved config from its checkpoint and puts the keys given now on top). Here only
``hydra.run.dir`` is set, before Hydra starts, so that Hydra's log goes into that directory
instead of a new empty one; nothing of the run's saved files enters the command line.
"""

from __future__ import annotations

from stds.errors import CheckpointError
from stds.run.life.resume import find_run, runs_root


def _key(item: str) -> str:
    return item.partition("=")[0].lstrip("+~")


def _value(argv: list[str], key: str) -> str | None:
    for item in argv:
        if "=" in item and _key(item) == key:
            return item.partition("=")[2]
    return None


def resume_argv(argv: list[str]) -> list[str]:
    """``argv`` with ``hydra.run.dir`` and ``resume`` set to the run ``resume=`` names; ``last`` is
    looked up under the fixed part of the ``hydra.run.dir`` given (default ``outputs/runs``), for
    the ``experiment`` given. Other command lines are returned unchanged."""
    target = _value(argv, "resume")
    if target is None or target in ("null", "None", ""):
        return argv
    if "-m" in argv or "--multirun" in argv:
        raise CheckpointError("resume= continues one run; drop -m/--multirun "
                              "(each sweep point resumes in its own directory)")
    run_dir = find_run(target, runs_root(_value(argv, "hydra.run.dir")), _value(argv, "experiment"))
    print(f"resuming {run_dir}", flush=True)
    own = [item for item in argv if _key(item) not in ("resume", "hydra.run.dir")]
    return own + [f"hydra.run.dir={run_dir}", f"resume={run_dir}"]
