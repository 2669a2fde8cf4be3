"""structlog set-up: JSON lines for machines, a readable console for people."""

from __future__ import annotations

import logging as stdlib_logging
import sys
from typing import Any, TextIO

import structlog

LEVELS = {
    "debug": stdlib_logging.DEBUG,
    "info": stdlib_logging.INFO,
    "warning": stdlib_logging.WARNING,
    "error": stdlib_logging.ERROR,
    "critical": stdlib_logging.CRITICAL,
}


class ReopenableFile:
    """A log file that USR1 reopens by name (after logrotate moved it)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._f: TextIO = open(path, "a", buffering=1)  # noqa: SIM115

    def write(self, text: str) -> int:
        """Write one rendered line."""
        return self._f.write(text)

    def flush(self) -> None:
        """Flush to the OS."""
        self._f.flush()

    def reopen(self) -> None:
        """Open the path again; the old file is closed."""
        new = open(self.path, "a", buffering=1)  # noqa: SIM115
        old, self._f = self._f, new
        old.close()

    def isatty(self) -> bool:
        """Log files are never terminals."""
        return False


_output: Any = None
_access_files: list[ReopenableFile] = []


def configure(log_format: str = "auto", level: str = "info", log_file: str = "") -> None:
    """Configure structlog once for the process."""
    global _output
    _output = ReopenableFile(log_file) if log_file else sys.stderr
    fmt = log_format
    if fmt == "auto":
        fmt = "console" if _output.isatty() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=_output.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks if fmt == "json" else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, 20)),
        logger_factory=structlog.WriteLoggerFactory(file=_output),
        cache_logger_on_first_use=False,
    )


def reopen() -> None:
    """Reopen the log file and access log files (USR1); stderr is left alone."""
    if isinstance(_output, ReopenableFile):
        _output.reopen()
    for f in _access_files:
        f.reopen()


def access_logger(path: str, **bound: Any) -> Any:
    """A logger for the access log: the daemon's own (``"-"``) or JSON lines in ``path``."""
    if path == "-":
        return get_logger(**bound)
    out = next((f for f in _access_files if f.path == path), None)
    if out is None:
        out = ReopenableFile(path)
        _access_files.append(out)
    return structlog.wrap_logger(
        structlog.WriteLogger(file=out),  # type: ignore[arg-type]
        processors=[
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
    ).bind(**bound)


def get_logger(**bound: Any) -> Any:
    """A structlog logger with ``bound`` context."""
    return structlog.get_logger("flypool").bind(**bound)
