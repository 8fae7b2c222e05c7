"""Exceptions with a meaning for the node; each maps to an exit code or a logged reason."""

from __future__ import annotations


class SapodError(Exception):
    """Base class."""


class ConfigError(SapodError):
    """A bad setting; the CLI prints it on one line and exits 2."""


class StartupError(SapodError):
    """The node cannot start (shared folder unusable, model cannot load); exit 3."""


class ModelLoadError(StartupError):
    """The model or tokenizer cannot be loaded."""


class Displaced(SapodError):
    """Another daemon owns this NODE_ID, or a newer coordinator took over; exit 4."""


class Stopping(SapodError):
    """A stop request arrived while the node waited or retried; it winds down and exits 0."""


class Rejected(SapodError):
    """Peer data that is not accepted; ``reason`` says why, for the log."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Unreadable(Rejected):
    """The file could not be opened or read (an I/O error, often passing on a network
    mount), as opposed to read and found wanting; ``errno`` is the error's."""

    def __init__(self, reason: str, errno: int | None = None):
        super().__init__(reason)
        self.errno = errno

    def as_oserror(self, path: object) -> OSError:
        """The error to raise where a caller should retry (see Node.steady)."""
        return OSError(self.errno or 0, f"{path}: {self.reason}")
