"""Logging: structlog configured once; JSON lines for machines, a console view for people.

Context (node, role, round, stage) is bound through contextvars, so every line a
node's task logs carries it, and the GPU executor copies the context into its
thread. Also the append-only JSONL records each node keeps in the shared folder.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import structlog

from sapod.store import IO, dumps, open_creating_parents, write_all


def configure_logging(fmt: str = "auto", level: str = "info", stream: Any = None) -> None:
    """Configure structlog for the process: JSON lines or the console view, at ``level``."""
    follow = stream is None or stream is sys.stdout  # whatever sys.stdout is at each write
    stream = stream or sys.stdout
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if use_json:
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors += [structlog.dev.ConsoleRenderer(colors=stream.isatty())]
    lib = logging.getLogger("watchdog")
    lib.handlers[:] = [_FromStdlib()]
    lib.propagate = False
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=_LogStream(None if follow else stream)),
        cache_logger_on_first_use=False,
    )


# The stream's reader or device is gone for good (a closed pipe or terminal): a ValueError
# (a closed file object) too.
_GONE = frozenset({errno.EPIPE, errno.EIO, errno.EBADF, errno.ENXIO})


class _LogStream:
    """The log's stream, where a write that fails ends the log, never the node.

    A reader of stdout can go away: ``sapod ... | tee`` in tmux loses tee to the Ctrl-C
    meant for sapod, a log shipper restarts, a terminal closes. A failed write then
    raised out of whatever was logging (a signal handler, a shutdown, a checkpoint).
    When the reader is gone for good the stream's descriptor is pointed at /dev/null,
    so later writes and Python's own flush at exit go nowhere quietly; any other write
    error (a full disk or pipe) costs that line only."""

    def __init__(self, stream: Any = None):
        self._stream = stream  # None: sys.stdout as it is at each write (a test's capture, say)

    def _target(self) -> Any:
        return sys.stdout if self._stream is None else self._stream

    def write(self, text: str) -> None:
        self._guard("write", text)

    def flush(self) -> None:
        self._guard("flush")

    def isatty(self) -> bool:
        return bool(self._target().isatty())

    def _guard(self, method: str, *args: Any) -> None:
        target = self._target()
        try:
            getattr(target, method)(*args)
        except (OSError, ValueError) as exc:
            if isinstance(exc, OSError) and exc.errno not in _GONE:
                return  # a full pipe or disk: this line is lost, the next may get through
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, target.fileno())
                os.close(devnull)
            except (OSError, ValueError, AttributeError):
                pass


class _FromStdlib(logging.Handler):
    """watchdog logs through the stdlib; with no handler Python prints its lines raw on
    stderr, which breaks a JSON log stream. Its messages (e.g. "InotifyEmitter.queue_events()
    called when the thread is inactive", after a watch is dropped) are benign: debug."""

    def emit(self, record: logging.LogRecord) -> None:
        get_logger(record.name).debug("library_log", logger=record.name, level=record.levelname.lower(),
                                      message=record.getMessage()[:500])


def get_logger(name: str = "sapod") -> Any:
    return structlog.get_logger(name)


def append_jsonl(path: Path, records: list[dict[str, Any]]) -> bool:
    """Append JSON lines in one write; a failure is logged, never fatal. True if written."""
    IO["appends"] += 1
    data = b"".join(_record_bytes(r) + b"\n" for r in records)
    try:
        fd = open_creating_parents(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
        return True
    except OSError as exc:
        get_logger().warning("records_not_written", path=str(path), records=len(records), error=str(exc))
        return False


def _record_bytes(record: dict[str, Any]) -> bytes:
    """A record as strict JSON; NaN and infinities (an overflowed gradient norm, say)
    become null rather than costing the row and the rest of its batch."""
    try:
        return dumps(record)
    except ValueError:
        return dumps(_finite(record))


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class RecordBuffer:
    """JSONL records held until the next flush: one append per file per round, not per event.

    Each append is a write on the shared folder (an API call on Drive), and a round
    produces a dozen records. Records that fail to write are kept for the next flush,
    up to a bound.
    """

    MAX_PENDING = 10_000

    def __init__(self) -> None:
        self._pending: dict[Path, list[dict[str, Any]]] = {}

    def add(self, path: Path, record: dict[str, Any]) -> None:
        rows = self._pending.setdefault(path, [])
        rows.append(record)
        del rows[:-self.MAX_PENDING]

    def take(self) -> dict[Path, list[dict[str, Any]]]:
        """What is pending, now no longer held here (give it to ``write_records``)."""
        pending, self._pending = self._pending, {}
        return pending

    def restore(self, failed: dict[Path, list[dict[str, Any]]]) -> None:
        """Hold rows that could not be written again, ahead of any added since."""
        for path, rows in failed.items():
            newer = self._pending.pop(path, [])
            self._pending[path] = (rows + newer)[-self.MAX_PENDING:]

    def flush(self) -> None:
        """Write what is pending (blocking: run it where file work runs)."""
        self.restore(write_records(self.take()))


def write_records(pending: dict[Path, list[dict[str, Any]]]) -> dict[Path, list[dict[str, Any]]]:
    """One append per file; returns the rows of the files that could not be written."""
    return {path: rows for path, rows in pending.items() if not append_jsonl(path, rows)}
