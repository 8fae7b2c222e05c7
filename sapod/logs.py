"""Logging: structlog configured once; JSON lines for machines, a console view for people.

Context (node, role, round, stage) is bound through contextvars, so every line a
node's task logs carries it, and the GPU executor copies the context into its
thread. Also the append-only JSONL records each node keeps in the shared folder.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import aiofiles
import structlog

from sapod.store import IO, dumps

_configured = False


def configure_logging(fmt: str = "auto", level: str = "info", stream: Any = None) -> None:
    """Configure structlog once per process (later calls change the level and format only)."""
    global _configured
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
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    _configured = True


def get_logger(name: str = "sapod") -> Any:
    return structlog.get_logger(name)


async def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line; a failure to write a record is logged, never fatal."""
    IO["appends"] += 1
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        async with aiofiles.open(path, "ab") as fh:
            await fh.write(dumps(record) + b"\n")
    except OSError as exc:
        get_logger().warning("record_not_written", path=str(path), error=str(exc))
