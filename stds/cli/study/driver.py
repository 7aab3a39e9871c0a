"""The search: keep ``n_jobs`` trials in flight, each one run launched as soon as another ends.

`Search.run` asks the study for one trial at a time and hands its overrides to a launch function
(the Hydra launcher: a local process or a SLURM job) on a thread of its own, so a slow trial holds
only its own slot. Each trial's run is linked to the study (``trial.*`` overrides,
`stds.run.life.study_link`): it records heartbeats, reports epochs to the pruner and tells the
study its own result. The search only settles what a run could not tell (it died, or its config
did not compose) from the run directory ``<sweep dir>/<trial number>``, and heartbeats its trials
while their jobs wait in a queue.

Everything lives in the study's database and the run directories, so the search may be stopped
and run again at any time: a rerun first settles this sweep directory's trials whose runs ended
unheard (their files), keeps the heartbeat of those whose run still holds its ``.lock`` or whose
SLURM job still waits or runs (`stds.cli.study.queue`), lets Optuna fail (and retry) trials whose
heartbeat stopped for ``grace_s``, then waits for the trials still running and starts new ones
until the study holds ``n_trials``; it looks again every ``heartbeat_s`` while it waits. A retry
continues the run of the trial it retries: its own run directory starts with a copy of that
run's checkpoints and resumes (`stds.run.files.rundir.continue_from`).
"""

from __future__ import annotations

import logging
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from stds.cli.jobs import job_error, reason
from stds.cli.study.lock import sweep_lock
from stds.cli.study.queue import JOB_ATTR, TAG_ATTR, QueueUnreadable, job_tag, live_job, queued_jobs
from stds.cli.study.settings import PREFIX, SearchSettings, override_value
from stds.cli.study.storage import (
    check_storage,
    default_storage,
    make_sampler,
    open_study,
    shown_url,
)
from stds.errors import ConfigError, StdsError
from stds.results.pareto import pareto_mask
from stds.run.files.rundir import continue_from, lock_is_held
from stds.run.life.study_link import REASON_ATTR, tell
from stds.run.measure.objectives import Outcome, trial_outcome

log = logging.getLogger(__name__)

__all__ = ["Search"]

RUN_DIR_ATTR, SWEEP_DIR_ATTR, NOT_RUN_ATTR, HEARTBEAT_ATTR = "run_dir", "sweep_dir", "not_run", "heartbeat_s"

LaunchFn = Callable[[list[list[str]], int], Sequence[Any]]


def _first(dist: Any) -> Any:
    """A value of a distribution: its first choice or its low end."""
    return dist.choices[0] if hasattr(dist, "choices") else dist.low


def counted(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The trials ``n_trials`` counts: not those failed and retried (the retry counts), nor those
    told without running (asked when another search had reached ``n_trials``)."""
    retried = {number for t in trials for number in RetryHeartbeatStaleTrialCallback.retry_history(t)}
    return [t for t in trials if not t.user_attrs.get(NOT_RUN_ATTR)
            and not (t.state == TrialState.FAIL and t.number in retried)]


class Search:
    """One invocation of a search: continue the study until it holds ``n_trials`` trials.

    ``launch(overrides_per_trial, first_job_index)`` runs trials (a Hydra launcher's ``launch``);
    ``validate(batch)`` composes a batch of overrides and raises if it cannot; ``slots`` caps the
    trials in flight below ``n_jobs`` (a local launcher on fewer CPUs); ``slurm_jobs``: each trial
    is a SLURM job whose comment holds the trial's `job_tag` (the launch function puts it there).
    """

    def __init__(self, settings: SearchSettings, sweep_dir: Path, fixed: Sequence[str], launch: LaunchFn,
                 sampler: Mapping[str, Any] | None = None,
                 validate: Callable[[list[list[str]]], None] | None = None, slots: int | None = None,
                 on_start: Callable[[], None] | None = None, chance: float | None = None,
                 slurm_jobs: bool = False, in_process: bool = False) -> None:
        self.settings = settings
        self.sweep_dir = Path(sweep_dir).resolve()
        self.fixed = list(fixed)
        self.launch = launch
        self.sampler_spec = sampler
        self.validate = validate
        self.slots = max(min(slots or settings.n_jobs, settings.n_jobs), 1)
        self.storage = settings.storage or default_storage(self.sweep_dir)
        self.ran: list[Outcome] = []  # outcomes of the trials this invocation launched
        self.poll_s = 1.0  # how often the study is read for trials that told it their end
        self.on_start = on_start  # called once the sweep directory is this search's (its lock held)
        self.chance = chance  # test_acc1 up to this is chance: such a trial is never on the front
        self.slurm_jobs = slurm_jobs
        # a launcher that runs trials inside this process (Hydra's basic) frees a slot only when
        # its call returns: a trial that told the study may still be ending on the shared state
        self.in_process = in_process

    def run_dir(self, number: int) -> Path:
        return self.sweep_dir / str(number)

    def run(self) -> list[dict[str, Any]]:
        """Settle what ended unheard, run trials until ``n_trials``; returns the Pareto front."""
        check_storage(self.storage)
        self._check_composes()
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        with sweep_lock(self.sweep_dir), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
            study = open_study(self.settings, self.storage)
            if self.on_start is not None:
                self.on_start()
            sampler = make_sampler(self.sampler_spec, len(study.trials))
            if sampler is not None:
                study.sampler = sampler
            self._settle_unheard(study)
            self._loop(study)
        front = self._summary(study)
        failed = [o for o in self.ran if o.values is None and not o.pruned]
        if self.ran and len(failed) == len(self.ran):
            raise StdsError(f"all {len(self.ran)} trials of this search failed; the first: {failed[0].error}")
        return front

    def _check_composes(self) -> None:
        """A bad fixed override, or a searched key the config lacks, fails here in one line,
        before any trial (each parameter at the low end of its range, or its first choice)."""
        if self.validate is None:
            return
        self.validate([self.fixed])
        sample = [f"{name}={override_value(_first(dist))}" for name, dist in self.settings.space.items()]
        try:
            self.validate([[*self.fixed, *sample]])
        except ConfigError as exc:  # it composes, and the run's own checks refuse it
            raise ConfigError(f"{PREFIX}.params: a trial's config is refused ({' '.join(sample)}): {exc}") from None
        except Exception as exc:
            raise ConfigError(f"{PREFIX}.params: a trial's config does not compose ({' '.join(sample)}): "
                              f"{reason(exc)}; search only keys of the config (python launch/train.py --cfg job)"
                              ) from None

    def _ours(self, study: optuna.Study) -> list[FrozenTrial]:
        """This sweep directory's running trials (read only from run directories inside it)."""
        return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if t.user_attrs.get(SWEEP_DIR_ATTR) == str(self.sweep_dir)]

    def _settle_unheard(self, study: optuna.Study, skip: frozenset[int] = frozenset(), say: bool = True) -> None:
        """Trials of this sweep directory whose run ended without telling the study: told now
        from their files; those whose run is alive (it holds its ``.lock``) or whose SLURM job
        still waits or runs get a heartbeat; then Optuna fails the stale. ``skip``: the trials
        this invocation launched (their launch returns when they end); ``say``: log each trial
        kept for its job in the queue."""
        queued = self._in_queue(study, say)
        for trial_id in queued.values():  # a job in the queue has no process to beat for it
            study._storage.record_heartbeat(trial_id)
        for frozen in self._ours(study):
            run_dir = self.run_dir(frozen.number)
            if frozen.number in skip or frozen.number in queued:
                continue
            # a trial of an earlier process, reopened by its id as Optuna's own ask() does
            trial = optuna.Trial(study, frozen._trial_id)
            if lock_is_held(run_dir):
                study._storage.record_heartbeat(frozen._trial_id)
            elif (run_dir / "metrics.json").is_file() or (run_dir / "error.txt").is_file():
                self._tell(study, trial, self._outcome(run_dir))
            elif HEARTBEAT_ATTR not in frozen.user_attrs:  # asked before trials had heartbeats
                self._tell(study, trial, self._outcome(run_dir, "the search stopped before this trial "
                           f"reported, and {run_dir} has no metrics.json (the job died or was stopped)"))
        optuna.storages.fail_stale_trials(study)

    def _in_queue(self, study: optuna.Study, say: bool = False) -> dict[int, int]:
        """The study's running trials whose SLURM job waits or runs (number -> trial id), of any
        sweep directory; each one's job id is recorded as found. If ``squeue`` does not answer,
        every trial launched as a SLURM job counts (none is failed while its job's state is
        unknown); where SLURM's tools are missing (a laptop), none does."""
        # only trials a search launched as SLURM jobs: a run started by a local launcher inside a
        # SLURM allocation records that allocation's job, which says nothing of the run
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        tagged = [t for t in running if t.user_attrs.get(TAG_ATTR)]
        try:
            jobs = queued_jobs() if tagged else None
        except QueueUnreadable as exc:
            log.warning("%s; the jobs of %d running trials may still run: none of them is failed now",
                        exc, len(tagged))
            return {t.number: t._trial_id for t in tagged}
        alive = {}
        for t in tagged if jobs is not None else ():
            job = live_job(jobs, t.user_attrs.get(JOB_ATTR), t.user_attrs.get(TAG_ATTR))
            if job is None:
                continue
            alive[t.number] = t._trial_id
            if say and t.user_attrs.get(SWEEP_DIR_ATTR) == str(self.sweep_dir):
                log.info("Trial %d: its SLURM job %s is %s; the trial stays running", t.number, job.job_id,
                         job.state.lower())
            if t.user_attrs.get(JOB_ATTR) != job.job_id:
                try:
                    study._storage.set_trial_user_attr(t._trial_id, JOB_ATTR, job.job_id)
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue  # it ended meanwhile
                log.info("Trial %d is SLURM job %s (%s)", t.number, job.job_id, job.state.lower())
        return alive

    def _loop(self, study: optuna.Study) -> None:
        """Keep ``slots`` trials in flight (counting this directory's live trials of an earlier
        search) until the study holds ``n_trials`` and none of them runs. A trial leaves its slot
        when its run tells the study its end (read every ``poll_s``), not when its job is seen to
        end: a SLURM job's end reaches submitit seconds later, and the next trial's job is already
        queued by then. A slot is refilled before the trial that left it is settled."""
        running: dict[Future, optuna.Trial] = {}
        ended: list[tuple[optuna.Trial, str | None]] = []
        checked = beat = time.monotonic()
        # a told trial's thread still waits for its job to end while its successor runs
        with ThreadPoolExecutor(max_workers=4 * self.slots + 4, thread_name_prefix="trial") as pool:
            while True:
                mine = {t.number for t in running.values()} | {t.number for t, _ in ended}
                adopted = [t for t in self._ours(study) if t.number not in mine]
                in_flight = list(running.values()) if self.in_process else self._untold(study, running.values())
                while len(in_flight) + len(adopted) < self.slots and (trial := self._ask(study)) is not None:
                    if self._composes(study, trial):
                        self._continue(study, trial)
                        running[pool.submit(self._launch_one, trial)] = trial
                        in_flight.append(trial)
                for trial, error in ended:
                    self._settle(study, trial, error)
                ended = []
                if not running and not adopted:
                    return
                poll = min(self.settings.heartbeat_s, self.poll_s)
                if not running:
                    time.sleep(poll)  # only earlier trials run: they tell the study themselves
                done, _ = wait(running, timeout=poll, return_when=FIRST_COMPLETED)
                ended = [(running.pop(future), future.result()) for future in done]
                if time.monotonic() - beat >= self.settings.heartbeat_s:
                    for trial in self._untold(study, running.values()):  # a queued job has no run to beat for it
                        study._storage.record_heartbeat(trial._trial_id)
                    beat = time.monotonic()
                if time.monotonic() - checked >= self.settings.heartbeat_s:
                    mine = {t.number for t in running.values()} | {t.number for t, _ in ended}
                    self._settle_unheard(study, skip=frozenset(mine), say=False)
                    checked = time.monotonic()

    @staticmethod
    def _untold(study: optuna.Study, trials: Any) -> list[optuna.Trial]:
        """Those of ``trials`` the study still holds as running (their runs have not told it an end)."""
        return [t for t in trials if study._storage.get_trial(t._trial_id).state == TrialState.RUNNING]

    def _ask(self, study: optuna.Study) -> optuna.Trial | None:
        """A new trial, or None once the study holds ``n_trials``. Two searches asking at once
        may pass ``n_trials``: the later trial is then told failed, marked ``not_run``, unrun."""
        asked = [t for t in counted(study.get_trials(deepcopy=False)) if t.state != TrialState.WAITING]
        if len(asked) >= self.settings.n_trials:  # a waiting trial (a retry) is run by the next ask
            return None
        trial = study.ask(self.settings.space)
        before = [t for t in counted(study.get_trials(deepcopy=False)) if t.number < trial.number]
        if len(before) >= self.settings.n_trials:
            trial.set_user_attr(NOT_RUN_ATTR, True)
            trial.set_user_attr(REASON_ATTR, "not run: another search reached n_trials first")
            study.tell(trial, state=TrialState.FAIL)
            return None
        trial.set_user_attr(SWEEP_DIR_ATTR, str(self.sweep_dir))
        trial.set_user_attr(RUN_DIR_ATTR, str(self.run_dir(trial.number)))
        trial.set_user_attr(HEARTBEAT_ATTR, self.settings.heartbeat_s)
        attrs = trial.user_attrs  # a retry's are a copy of the failed trial's: its own job is another
        if self.slurm_jobs or attrs.get(TAG_ATTR):
            trial.set_user_attr(TAG_ATTR, job_tag(self.sweep_dir, trial.number) if self.slurm_jobs else None)
        if attrs.get(JOB_ATTR):
            trial.set_user_attr(JOB_ATTR, None)
        study._storage.record_heartbeat(trial._trial_id)  # from now on it is ours to keep alive
        log.info("Trial %d: %s", trial.number, " ".join(self._overrides(trial)[len(self.fixed):][:len(trial.params)]))
        return trial

    def _overrides(self, trial: optuna.Trial) -> list[str]:
        """The trial's command line: the fixed overrides, its parameters, its study, its run directory."""
        params = [f"{name}={override_value(value)}" for name, value in trial.params.items()]
        # a storage URL of the user's stays out of the overrides (and the logs that print them):
        # the run reads it from its own hydra.sweeper.storage
        storage = [] if self.settings.storage else [f"trial.storage={override_value(self.storage)}"]
        link = [*storage, f"trial.study={override_value(self.settings.study_name)}", f"trial.number={trial.number}"]
        return [*self.fixed, *params, *link, f"hydra.sweep.subdir={trial.number}"]

    def _composes(self, study: optuna.Study, trial: optuna.Trial) -> bool:
        """Whether the trial can start: its config composes and its run directory is new."""
        run_dir = self.run_dir(trial.number)
        error = None
        if (run_dir / ".hydra").exists():
            error = (f"{run_dir} already holds a run that is not this study's trial {trial.number}; "
                     "give the search a new hydra.sweep.dir")
        elif self.validate is not None:
            try:
                self.validate([self._overrides(trial)])
            except Exception as exc:
                error = f"its config does not compose: {reason(exc)}"
        if error is not None:
            self.ran.append(Outcome(None, error=error))
            self._tell(study, trial, self.ran[-1])
        return error is None

    def _continue(self, study: optuna.Study, trial: optuna.Trial) -> None:
        """A retry continues the run of the trial it retries (the latest of its retry history
        that ran in this sweep directory and left ``checkpoints/last.pt``): its own run directory
        gets a copy of that run's checkpoints, metrics lines and events, and resumes from them."""
        history = RetryHeartbeatStaleTrialCallback.retry_history(study._storage.get_trial(trial._trial_id))
        for number in reversed(history):
            failed = study._storage.get_trial(
                study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number))
            if failed.user_attrs.get(SWEEP_DIR_ATTR) != str(self.sweep_dir):
                continue  # another sweep directory's run: never read from here
            try:
                copied = continue_from(self.run_dir(number), self.run_dir(trial.number))
            except (OSError, StdsError) as exc:
                log.warning("Trial %d retries trial %d, whose run cannot be continued (%s): it starts anew",
                            trial.number, number, reason(exc))
                return
            if copied is not None:
                log.info("Trial %d retries trial %d (its heartbeat stopped) and continues its run: %s/ starts "
                         "from a copy of %s", trial.number, number, self.run_dir(trial.number),
                         self.run_dir(number) / "checkpoints" / "last.pt")
                return
        if history:
            log.info("Trial %d retries trial %d, whose run left no checkpoint here: it starts anew",
                     trial.number, history[-1])

    def _launch_one(self, trial: optuna.Trial) -> str | None:
        """Run one trial (on a worker thread); the error its launcher reported, or None."""
        try:
            returns = list(self.launch([self._overrides(trial)], trial.number))
        except Exception as exc:  # e.g. a SLURM job that died without a result: read the files
            log.error("Trial %d: the launcher reported: %s", trial.number, reason(exc))
            return reason(exc)
        return job_error(returns[0]) if returns else None

    def _outcome(self, run_dir: Path, error: str | None = None) -> Outcome:
        return trial_outcome(run_dir, list(self.settings.objectives), self.settings.constraints, error)

    def _settle(self, study: optuna.Study, trial: optuna.Trial, error: str | None) -> None:
        """A launched trial ended: told from its files unless its run told the study itself."""
        frozen = study._storage.get_trial(trial._trial_id)
        if frozen.state == TrialState.RUNNING:
            self._tell(study, trial, self._outcome(self.run_dir(trial.number), error))
            frozen = study._storage.get_trial(trial._trial_id)
        if frozen.state == TrialState.COMPLETE:
            self.ran.append(Outcome(list(frozen.values)))
        else:
            pruned = frozen.state == TrialState.PRUNED
            self.ran.append(Outcome(None, error=str(frozen.user_attrs.get(REASON_ATTR, "")), pruned=pruned))
            if not pruned:
                log.warning("Trial %d failed: %s", trial.number, self.ran[-1].error)

    def _tell(self, study: optuna.Study, trial: optuna.Trial, outcome: Outcome) -> None:
        tell(study, trial, outcome, self.settings.trial_spec)

    def _at_chance(self, trial: FrozenTrial) -> bool:
        names = list(self.settings.objectives)
        return (self.chance is not None and "test_acc1" in names
                and trial.values[names.index("test_acc1")] <= self.chance)

    def _summary(self, study: optuna.Study) -> list[dict[str, Any]]:
        """Log the study's counts and its Pareto front (feasible finished trials); return the front."""
        trials = study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        ok = [t for t in done if all(v <= 0 for v in t.constraints.values())]
        at_chance = [t for t in ok if self._at_chance(t)]
        ok = [t for t in ok if t not in at_chance]
        failed = sum(t.state == TrialState.FAIL for t in trials)
        pruned = sum(t.state == TrialState.PRUNED for t in trials)
        log.info("Study %r in %s: %d trials, %d finished (%d feasible, %d of them at chance), %d pruned, %d failed, "
                 "%d running", study.study_name, shown_url(self.storage), len(trials), len(done),
                 len(ok) + len(at_chance), len(at_chance), pruned, failed, len(trials) - len(done) - failed - pruned)
        names = list(self.settings.objectives)
        front = [t for t, on in zip(ok, pareto_mask([t.values for t in ok], self.settings.maximize)) if on]
        for t in sorted(front, key=lambda t: t.number):
            values = ", ".join(f"{n}={v:.4g}" for n, v in zip(names, t.values))
            params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
            log.info("Pareto front: trial %d (%s): %s", t.number, params, values)
        return [{"number": t.number, "params": dict(t.params), "values": dict(zip(names, t.values))}
                for t in front]
