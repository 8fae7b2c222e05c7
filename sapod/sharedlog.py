"""A node's stdout and stderr copied into the shared folder (logs/{node}/stdout.log, stderr.log),
as in the original layout, so that a Colab user can read a node's log from Drive.

Writes are buffered and flushed from a background thread every few seconds (each
write costs an API call on Drive), and each file is capped: at the cap it becomes
``.1`` (replacing the older copy) and a new file starts. Failures to write never
reach the node; the copy is best effort.
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from typing import Any, TextIO

FLUSH_INTERVAL = 5.0
MAX_BUFFER = 1 << 20  # drop the oldest output rather than grow without bound while the mount is down


class SharedLogFile:
    def __init__(self, path: Path, max_bytes: int, flush_interval: float = FLUSH_INTERVAL):
        self.path = path
        self.max_bytes = max_bytes
        self.flush_interval = flush_interval
        self._buf: list[str] = []
        self._size = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name=f"sharedlog-{path.name}", daemon=True)
        self._thread.start()

    def write(self, text: str) -> None:
        with self._lock:
            self._buf.append(text)
            self._size += len(text)
            self._trim()

    def _trim(self) -> None:
        while self._size > MAX_BUFFER and len(self._buf) > 1:
            self._size -= len(self._buf.pop(0))

    def flush(self) -> None:
        with self._lock:
            data, self._buf, self._size = "".join(self._buf), [], 0
        if not data:
            return
        if not self._append(data):
            self.errors += 1
            with self._lock:  # kept for the next flush, ahead of what came meanwhile
                self._buf.insert(0, data)
                self._size += len(data)
                self._trim()

    def _append(self, data: str) -> bool:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            encoded = data.encode("utf-8", "replace")
            try:
                current = self.path.stat().st_size
            except FileNotFoundError:
                current = 0
            if current and current + len(encoded) > self.max_bytes:
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            with open(self.path, "ab") as fh:
                fh.write(encoded[-self.max_bytes:])
        except OSError:
            return False
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.flush()


class Tee(io.TextIOBase):
    """Writes to the real stream and to a shared copy; looks like the real stream otherwise."""

    def __init__(self, primary: TextIO, copy: SharedLogFile):
        self.primary = primary
        self.copy = copy

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.primary.write(text)

    def flush(self) -> None:
        self.primary.flush()

    def isatty(self) -> bool:
        return self.primary.isatty()

    def fileno(self) -> int:
        return self.primary.fileno()

    @property
    def encoding(self) -> Any:  # type: ignore[override]
        return getattr(self.primary, "encoding", "utf-8")


def capture_to_shared(logs_dir: Path, max_bytes: int) -> list[SharedLogFile]:
    """Replace sys.stdout and sys.stderr by tees into ``logs_dir``; returns the files to close."""
    import sys

    out = SharedLogFile(logs_dir / "stdout.log", max_bytes)
    err = SharedLogFile(logs_dir / "stderr.log", max_bytes)
    sys.stdout = Tee(sys.stdout, out)  # type: ignore[assignment]
    sys.stderr = Tee(sys.stderr, err)  # type: ignore[assignment]
    return [out, err]


def release(files: list[SharedLogFile]) -> None:
    import sys

    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, Tee):
            setattr(sys, name, stream.primary)
    for f in files:
        f.close()
