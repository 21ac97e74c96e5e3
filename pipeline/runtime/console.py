"""What a person sees on the console, and where the rest goes: the run's log file.

At the default verbosity the console holds what a person needs: the command's own lines (stage
headings, summary tables: printed, not logged), progress lines (INFO records of the
`dinoseg.progress` loggers, e.g. training's epochs), our WARNING and ERROR log records, and one
progress bar per Ray Data run when the terminal is interactive (none in CI or a pipe). Everything
else goes to the run's log file, `log_path()`, which the CLI names at the end:

- our INFO records (what `--verbose` shows on the console);
- Ray's own logs: `ray.init`'s, Ray Data's execution plans, "Full logs are in ..." and the
  progress it logs instead of bars when stdout is not a terminal;
- Python warnings (deprecations, library notices), as `py.warnings` records;
- the line the driver's core worker prints, once per process, about the first actor it creates
  with constructor arguments in the object store (see `_absorb_actor_argument_notice`).

Worker processes' stdout and stderr are not forwarded to the driver (`log_to_driver=False`): they
stay in Ray's session folder, which the log file names. Every log record a worker process makes
is redacted as the driver's are (`model.redact.redact_this_process`, the workers' setup hook);
what a worker prints without logging (a task's traceback as Ray writes it) is not. `configure(verbose=True)` (the CLI's
`--verbose`) shows our INFO records and leaves Ray's output as Ray prints it, forwarding included.

The CLI calls `configure` once, at start. A process that never does (a library user, `python -m`
without the CLI) gets the default, quiet, when `pipeline.runtime.start_ray` first starts or joins
Ray. Ray is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time

from model.redact import RedactingFilter

log = logging.getLogger(__name__)

CONSOLE_FORMAT = "%(levelname)s %(name)s: %(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d]: %(message)s"
LOG_FOLDER = "dinoseg-logs"  # under the temporary folder: one file per process that logs anything
LOG_LINE_PREFIX = "full log: "  # `log_line()`: the CLI's last line
HIDDEN_BY_DEFAULT = ("ray", "py.warnings")  # loggers (and their children) kept off the quiet console
WORKER_SETUP_HOOK = "model.redact.redact_this_process"  # run by every Ray worker process as it starts
PROGRESS = "dinoseg.progress"  # INFO records of this logger (and its children) are progress lines: always shown

_state: dict = {"configured": False, "verbose": False, "path": None, "handlers": [], "absorbed": False}


class _Console(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (pytest's capture, a redirect)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _ConsoleFormat(logging.Formatter):
    """Progress lines as they are; other records with their level and logger."""

    def __init__(self):
        super().__init__(CONSOLE_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return (
            record.getMessage()
            if _under(record, PROGRESS) and record.levelno == logging.INFO
            else super().format(record)
        )


def _under(record: logging.LogRecord, name: str) -> bool:
    return record.name == name or record.name.startswith(name + ".")


def _quiet_console(record: logging.LogRecord) -> bool:
    """What the default console shows: warnings and errors, and progress lines; never Ray's own
    records or Python warnings (those go to the log file)."""
    if any(_under(record, n) for n in HIDDEN_BY_DEFAULT):
        return False
    return record.levelno >= logging.WARNING or _under(record, PROGRESS)


def configure(verbose: bool = False, log_file: str | None = None) -> str:
    """Set up the console and the run's log file for this process (once, at start; calling it
    again replaces the earlier set-up). Returns the log file's path, created at its first record."""
    root = logging.getLogger()
    for handler in _state["handlers"]:
        root.removeHandler(handler)
        handler.close()
    consoles = (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
    for handler in list(root.handlers):  # a logging.basicConfig() console: this one replaces it
        if type(handler) is logging.StreamHandler and handler.stream in consoles:
            root.removeHandler(handler)
    path = log_file or os.path.join(
        tempfile.gettempdir(), LOG_FOLDER, f"dinoseg-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    to_file = logging.FileHandler(path, delay=True, encoding="utf-8")
    to_file.setLevel(logging.INFO)
    to_file.setFormatter(logging.Formatter(FILE_FORMAT))
    console = _Console()
    console.setLevel(logging.INFO)
    console.setFormatter(_ConsoleFormat())
    if not verbose:
        console.addFilter(_quiet_console)
    for handler in (console, to_file):  # URLs without user-info or query values: no credentials kept
        handler.addFilter(RedactingFilter())
    root.addHandler(console)
    root.addHandler(to_file)
    root.setLevel(logging.INFO)
    logging.captureWarnings(not verbose)  # warnings -> "py.warnings" records -> the log file
    _state.update(configured=True, verbose=verbose, path=path, handlers=[console, to_file])
    return path


def log_to_file(message: str, error: BaseException, name: str = "dinoseg.cli") -> None:
    """`message` with `error`'s traceback, in the run's log file only (redacted like every record):
    a command that ends in one sentence on the console still leaves the whole story behind."""
    ensure_configured()
    to_file = next((h for h in _state["handlers"] if isinstance(h, logging.FileHandler)), None)
    if to_file is None:
        return
    record = logging.getLogger(name).makeRecord(
        name, logging.ERROR, __file__, 0, message, None, (type(error), error, error.__traceback__)
    )
    to_file.handle(record)  # its filters (RedactingFilter) apply
    to_file.flush()


def ensure_configured() -> None:
    """The default set-up (quiet), unless `configure` ran already."""
    if not _state["configured"]:
        configure(verbose=False)


def is_verbose() -> bool:
    return bool(_state["verbose"])


def log_path() -> str | None:
    """The run's log file, once something was written to it (None before, or without `configure`)."""
    path = _state["path"]
    return path if path and os.path.exists(path) else None


def log_line() -> str | None:
    """The line a command ends with, naming the run's log file (None when nothing was logged)."""
    path = log_path()
    return f"{LOG_LINE_PREFIX}{path}" if path else None


def interactive() -> bool:
    """Progress bars redraw in place only on a terminal; Ray Data checks stdout, they go to stderr."""
    try:
        return sys.stdout.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def ray_init_options() -> dict:
    """`ray.init` keyword arguments for this verbosity; call just before `ray.init`.

    Ray's driver logger gets no handler of its own (configure_logging=False): at the default
    verbosity its records go up to ours (the log file; the quiet console drops them), including
    the ones `ray.init` logs while it starts."""
    ensure_configured()
    if not is_verbose():
        logging.getLogger("ray").propagate = True
    return {
        "configure_logging": False,
        "log_to_driver": is_verbose(),
        # worker processes' log records lose their URLs' credentials too (in the session's logs)
        "runtime_env": {"worker_process_setup_hook": WORKER_SETUP_HOOK},
    }


def after_ray_init() -> None:
    """Ray Data's logger and progress bars for this verbosity, and the run's log names Ray's
    session folder (worker output, Ray Data's own log)."""
    import ray.data

    session = _session_logs()
    if session:
        log.info("Ray's session logs (workers' stdout/stderr, raylet, ray-data.log): %s", session)
    if is_verbose():
        return
    # Ray Data's logger writes to the session's ray-data.log and to the console (INFO and up):
    # the console handler goes, its records go up to ours
    to_our_handlers("ray.data")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = interactive()  # else Ray Data logs its progress (to the log file)
    ctx.enable_operator_progress_bars = False  # one bar per run, not one per operator
    _absorb_actor_argument_notice()


def _session_logs() -> str | None:
    try:
        import ray._private.worker as worker

        node = worker._global_node  # not public API: only to name the folder
        return os.path.join(node.get_session_dir_path(), "logs") if node is not None else None
    except Exception:  # noqa: BLE001 - the folder is a hint in the log, nothing depends on it
        return None


def _absorb_actor_argument_notice() -> None:
    """Send the core worker's 'constructor arguments in the object store' line to the log file.

    The driver's core worker prints it (an ERROR, to the process's stderr, not through Python's
    logging) for the first actor the process creates that may restart and has constructor
    arguments in the object store (ray-project/ray#53727), and never again in that process. Ray
    Data 2.60 creates every actor-pool actor that way whatever its arguments' size: it puts the
    DataContext and the map transformer in the object store and passes the references
    (`ActorPoolMapOperator._start_actor`); the driver owns them and keeps them for the whole run,
    so pool actors still restart (tests/jobs/test_segment.py kills one). Creating one such actor
    here, with stderr pointed at the log file, spends that one line there."""
    if _state["absorbed"] or not _state["path"]:
        return
    import ray

    @ray.remote(num_cpus=0, max_restarts=1)
    class _ArgumentInTheObjectStore:
        def __init__(self, arg):
            pass

    log.info(
        "the core worker's notice about actor constructor arguments in the object store follows (see %s)", __name__
    )
    for handler in _state["handlers"]:
        handler.flush()
    try:
        sys.stderr.flush()
        target = os.open(_state["path"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    except (OSError, ValueError):  # no log file to write to, or a closed stderr: nothing to spend
        return
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all: the line goes nowhere anyway
        os.close(target)
        return
    try:
        os.dup2(target, 2)
        probe = _ArgumentInTheObjectStore.remote(ray.put(None))  # the line is printed here, synchronously
        ray.kill(probe)
        _state["absorbed"] = True
    except Exception as e:  # noqa: BLE001 - only a console line is at stake
        log.debug("could not spend the core worker's notice: %s", e)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(target)


def to_our_handlers(name: str) -> None:
    """A Ray logger that writes to the console by itself (Ray Data's, Serve's) loses its console
    handler; its records go up to ours (the log file, and the console with --verbose)."""
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            logger.removeHandler(handler)
    logger.propagate = True
