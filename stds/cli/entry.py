"""What the entrypoints share: one-line errors instead of tracebacks for problems users can fix.

The one place that formats such a line: `one_line` (the message on one line), `error_line`
(``Type: message`` for a run's ``error.txt``), `print_error` (``Error: message`` on stderr).
`report_errors` wraps the work of an entrypoint; `run_hydra_main` wraps a ``@hydra.main``
function so that Hydra's own errors (an unknown key, a bad override, a run directory that cannot
be made) end in one line too. ``HYDRA_FULL_ERROR=1`` shows the full traceback in every case.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

from stds.cli.callbacks import tidy_started_sweeps
from stds.errors import find_in_chain, one_line, user_error

log = logging.getLogger("stds")
T = TypeVar("T")

_FULL_ERROR = "HYDRA_FULL_ERROR"
_user_wants_traceback: bool | None = None  # the user's HYDRA_FULL_ERROR, read by run_hydra_main


def print_error(exc: BaseException | str) -> None:
    """Print ``Error: <message on one line>`` to stderr."""
    text = exc if isinstance(exc, str) else one_line(exc)
    print(f"Error: {text}", file=sys.stderr, flush=True)


def _traceback_wanted() -> bool:
    if _user_wants_traceback is not None:
        return _user_wants_traceback
    return os.environ.get(_FULL_ERROR) == "1"


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def report_errors(work: Callable[[], T]) -> T:
    """Run ``work``; a `StdsError` becomes one ``Error: ...`` line on stderr and exit status 1.

    A `StdsError` inside Hydra's InstantiationException counts too. In a Hydra multirun the
    error is raised on, so the launcher marks that sweep point failed and the others go on (the
    run directory keeps the line in ``error.txt``). ``HYDRA_FULL_ERROR=1`` shows the traceback.
    """
    try:
        return work()
    except Exception as exc:
        error = user_error(exc)
        if error is None or _multirun() or _traceback_wanted():
            raise
        log_to_files(one_line(error))
        print_error(error)
        sys.exit(1)


def log_to_files(message: str) -> None:
    """Write ``message`` as an error to the log files only (the run's ``train.log``): the terminal
    gets it once, from `print_error`. A log file no longer on disk (the directory of a run that
    never started, removed) is not made again."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in [*logging.getLogger().handlers, *log.handlers]:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).is_file():
            handler.handle(record)


_KEYS_HINT = "check the key's spelling (python launch/train.py --cfg job lists every key)"


def _options_text(text: str) -> str:
    """Hydra's "Could not find 'g/x'" text with its option list on one line."""
    head, _, rest = text.partition("\n\nAvailable options in ")
    if not rest:
        return head
    group, _, listing = rest.partition(":")
    options = ", ".join(line.strip() for line in listing.splitlines() if line.strip())
    return f"{head.strip()}; options in {group}: {options}"


def _omegaconf_hint(exc: BaseException) -> str:
    from omegaconf.errors import ValidationError

    key = getattr(exc, "full_key", None) or "the key"
    if isinstance(exc, ValidationError):
        return f"give {key} a value of its type"
    return _KEYS_HINT


def _hydra_error_line(exc: BaseException) -> str | None:
    """One line for Hydra's errors before the job runs (composition, override syntax)."""
    from hydra.errors import CompactHydraException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    unknown_key = (ConfigKeyError, ConfigAttributeError)
    if isinstance(exc, OverrideParseException):
        first = str(exc).split("\nSee ")[0]
        return f"cannot parse the overrides: {' '.join(first.split())}; see the override grammar at https://hydra.cc/docs/advanced/override_grammar/basic/"
    if isinstance(exc, CompactHydraException):
        text = _options_text(str(exc).split("\nConfig search path:")[0])
        cause = exc.__cause__
        if isinstance(cause, unknown_key):
            return _unknown_key_line(cause)
        if isinstance(cause, ValidationError):
            text += f" ({str(cause).splitlines()[0]}); {_omegaconf_hint(cause)}"
        return " ".join(text.replace("\t", " ").split())
    if isinstance(exc, ConfigKeyError):  # e.g. +unknown_key=1 met the schema in the job
        return _unknown_key_line(exc)
    if isinstance(exc, ValidationError):
        return f"{str(exc).splitlines()[0]}; {_omegaconf_hint(exc)}"
    return None


def _unknown_key_line(exc: BaseException) -> str:
    key = getattr(exc, "full_key", None) or "a key"
    return f"{key} is not a config key ({str(exc).splitlines()[0]}); {_KEYS_HINT}"


def _blocking_file(path: Path) -> Path | None:
    """The regular file that stands where ``path`` or one of its folders should be, if any."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def _output_dir_error_line(exc: OSError, multirun: bool) -> str:
    """One line for Hydra failing to make the run (or sweep) directory, naming the key to change."""
    key, what = ("hydra.sweep.dir", "sweep") if multirun else ("hydra.run.dir", "run")
    path = Path(str(exc.filename)) if exc.filename else None
    blocker = _blocking_file(path) if path is not None else None
    if blocker is not None:
        return f"cannot make the {what} directory {path}: {blocker} is a file; set {key}=<a directory path>"
    where = path if path is not None else "it"
    return f"cannot make the {what} directory {where} ({exc.strerror}); set {key}=<a writable directory>"


def run_hydra_main(main: Callable[[], Any], argv: list[str] | None = None) -> None:
    """Call the ``@hydra.main`` function ``main``; errors the user can fix end in one line, exit 1.

    Hydra prints its own errors (unknown key, bad override syntax, an InstantiationException) as
    several lines and exits. Here Hydra is asked to raise them instead (``HYDRA_FULL_ERROR=1`` in
    this process and the sweep jobs it starts, where `report_errors` raises anyway), and they
    become one ``Error: ...`` line: `StdsError` (also inside Hydra's
    wrappers), Hydra's composition and override errors, and an OSError from making the run
    directory before the job started. Anything else keeps its full traceback. If the user set
    ``HYDRA_FULL_ERROR=1``, nothing is caught.
    """
    global _user_wants_traceback
    argv = sys.argv[1:] if argv is None else argv
    _user_wants_traceback = os.environ.get(_FULL_ERROR) == "1"
    if _user_wants_traceback:
        try:
            main()
        finally:
            tidy_started_sweeps()
        return
    os.environ[_FULL_ERROR] = "1"
    try:
        main()
    except BrokenPipeError:  # the reader of the output left (`--help | head`): nothing to report
        _silence_stdout()
        sys.exit(1)
    except Exception as exc:
        line = _main_error_line(exc, multirun=bool({"-m", "--multirun"} & set(argv)))
        if line is None:
            raise
        print_error(line)
        sys.exit(1)
    finally:
        os.environ.pop(_FULL_ERROR, None)
        tidy_started_sweeps()  # Hydra skips its end-of-sweep callbacks after a failed point


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush meets no closed pipe either."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _raised_in_job(exc: BaseException) -> bool:
    """True when ``exc`` came out of the work `report_errors` ran (not out of Hydra's set-up)."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is report_errors.__code__:
            return True
        tb = tb.tb_next
    return False


def _log_file_error_line(exc: OSError, multirun: bool) -> str:
    """One line for Hydra failing to open the job's log file (``train.log``) in an existing run
    directory that cannot be written (logging reports it as "Unable to configure handler")."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    path = Path(str(exc.filename)) if exc.filename else None
    where = f"{path.parent} (its log file {path.name})" if path is not None else "the run directory"
    return (f"cannot write in {where}: {exc.strerror or exc}; make it writable (chmod u+w, free disk "
            f"space) or set {key}=<a writable directory>")


def _main_error_line(exc: BaseException, multirun: bool) -> str | None:
    error = user_error(exc)
    if error is not None:
        return one_line(error)
    hydra_line = _hydra_error_line(exc)
    if hydra_line is not None:
        return hydra_line
    if _raised_in_job(exc):
        return None
    if isinstance(exc, OSError):
        return _output_dir_error_line(exc, multirun)
    if isinstance(exc, ValueError) and str(exc).startswith("Only one of --run, --multirun, --cfg"):
        return ("--cfg/--info print a config and do not run, so they cannot go with -m; drop -m, e.g. "
                "python launch/train.py hparams_search=frontier --cfg hydra -p hydra.sweeper")
    cause = find_in_chain(exc, OSError, context=True)
    if isinstance(exc, ValueError) and str(exc).startswith("Unable to configure handler") and cause:
        return _log_file_error_line(cause, multirun)
    return None
