"""Logging of a training run: Python `logging` under the "bit_keras" logger, to the console and to `train.log`."""

import contextlib
import logging
import logging.handlers
import sys

import tqdm

LOGGER = logging.getLogger("bit_keras")
FILE_FORMAT = "%(asctime)s %(levelname)s %(message)s"


class _Below(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


class _Console(logging.StreamHandler):
    """A console stream whose lines go above a progress bar (tqdm's), not through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:
            self.handleError(record)


class _RunFile(logging.FileHandler):
    """`train.log`: a failed write (a full disk) is reported once on stderr, not as a traceback for every record."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.failed:
            self.failed = True
            print(
                f"warning: cannot write {self.baseFilename} ({sys.exc_info()[1]}); logging to it stopped",
                file=sys.stderr,
            )
        self.setLevel(logging.CRITICAL + 1)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # the records that did not fit, still buffered
            super().close()


class RunLog:
    """The handlers of one run, removed when it ends (see `run_logging`). Records before the log file exists (data
    loading, the plan) are kept and written first when it is added."""

    def __init__(self) -> None:
        self.handlers: list[logging.Handler] = []
        self.progress = False  # whether a progress bar may show: INFO records go to stdout, a terminal
        self.pending = logging.handlers.BufferingHandler(capacity=10_000)
        self.add(self.pending, logging.INFO)

    def add(self, handler: logging.Handler, level: int, fmt: str = "%(message)s") -> None:
        handler.setLevel(level)
        handler.setFormatter(logging.Formatter(fmt))
        LOGGER.addHandler(handler)
        self.handlers.append(handler)

    def to_file(self, path: str) -> None:
        """Also write every INFO record, timestamped, to `path` (appended: a resumed run continues its log)."""
        file = _RunFile(path, encoding="utf-8")
        self.add(file, logging.INFO, FILE_FORMAT)
        for record in self.pending.buffer:
            file.handle(record)
        LOGGER.removeHandler(self.pending)


@contextlib.contextmanager
def run_logging(verbose: int):
    """Let the run's INFO records through; print them to stdout when `verbose` (warnings and errors to stderr
    always), unless the application configured logging itself (the root logger has handlers): then they go
    there. Yields a `RunLog` whose `to_file` adds the run folder's log file."""
    run_log = RunLog()
    level = LOGGER.level
    LOGGER.setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        if verbose:
            stdout = _Console(sys.stdout)
            stdout.addFilter(_Below(logging.WARNING))
            run_log.add(stdout, logging.INFO)
            run_log.progress = sys.stdout.isatty()
        run_log.add(_Console(sys.stderr), logging.WARNING)
    try:
        yield run_log
    finally:
        for handler in run_log.handlers:
            LOGGER.removeHandler(handler)
            handler.close()
        LOGGER.setLevel(level)
