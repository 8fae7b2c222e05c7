"""Reading the swarm's state pointer without ever moving backwards."""

from __future__ import annotations

import os
from pathlib import Path

from sapod import paths
from sapod.errors import Rejected, Unreadable
from sapod.logs import get_logger
from sapod.schema import EXPERIMENT, State, parse_experiment, parse_state
from sapod.store import read_json


class StateReader:
    """Accepts a state only if its (epoch, seq) is not before the last one accepted.

    A stale mount cache or a paused old coordinator can show an older state; it is
    ignored, so no reader ever sees the swarm go backwards.
    """

    def __init__(self, root: Path, trust_stat: bool = False):
        self.root = root
        # Only on a local disk does a stat see every change: NFS and FUSE mounts cache
        # attributes for up to a minute, and only an open revalidates them.
        self.trust_stat = trust_stat
        self.current: State | None = None
        self._last_reason: str | None = None
        self._log = get_logger()
        self._seen_file: tuple[int, int, int] | None = None
        # Why the last read found no usable state, None if it found one or no file.
        self.problem: Rejected | None = None

    def read(self) -> State | None:
        path = paths.state_file(self.root)
        if self.trust_stat:
            # The pointer is replaced whole (new inode) on every change: on a local disk one
            # stat tells whether there is anything new to read.
            try:
                st = os.stat(path)
                ident: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
            except OSError:
                ident = None
            if ident is not None and ident == self._seen_file:
                return self.current
            self._seen_file = ident
            got = _parsed_once(path, ident)
        else:
            got = _parse(path)
        self.problem = got if isinstance(got, Rejected) else None
        if isinstance(got, Unreadable):
            self._seen_file = None  # an I/O error passes: read this version again next time
        if got is None:
            return self.current
        if isinstance(got, Rejected):
            if got.reason != self._last_reason:
                self._last_reason = got.reason
                self._log.warning("state_file_rejected", reason=got.reason)
            return self.current
        if self.current is not None and got.order < self.current.order:
            self._log.debug("stale_state_ignored", seen=got.order, kept=self.current.order)
            return self.current
        self.current = got
        return got


def _parse(path: Path) -> State | Rejected | None:
    try:
        doc = read_json(path)
        return None if doc is None else parse_state(doc)
    except Rejected as exc:
        return exc


# The pointer as parsed from one version of the file (path -> (inode, mtime, size), what it
# held), shared by the readers of a process on a local disk: it changes once a round and
# every node of a process (a demo, a benchmark) reads it then.
_PARSED: dict[Path, tuple[tuple[int, int, int], State | Rejected]] = {}


def _parsed_once(path: Path, ident: tuple[int, int, int] | None) -> State | Rejected | None:
    if ident is None:
        return _parse(path)
    hit = _PARSED.get(path)
    if hit is not None and hit[0] == ident:
        return hit[1]
    got = _parse(path)
    if got is not None and not isinstance(got, Unreadable):  # gone since the stat, or an I/O error
        _PARSED[path] = (ident, got)
    return got


def read_experiment(root: Path, strict: bool = False) -> dict | None:
    """The recorded swarm settings, or None while experiment.json is absent or bad.
    ``strict``: a file that is there but unusable raises Rejected (Unreadable for an
    I/O error) instead."""
    try:
        doc = read_json(paths.experiment_file(root))
        return None if doc is None else parse_experiment(doc)
    except Rejected as exc:
        if strict:
            raise
        get_logger().warning("experiment_file_rejected", reason=exc.reason, schema=EXPERIMENT)
        return None
