"""Reading the swarm's state pointer without ever moving backwards."""

from __future__ import annotations

import os
from pathlib import Path

from sapod import paths
from sapod.errors import Rejected
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

    def read(self) -> State | None:
        # The pointer is replaced whole (new inode) on every change: on a local disk one
        # stat tells whether there is anything new to read.
        if self.trust_stat:
            try:
                st = os.stat(paths.state_file(self.root))
                ident: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
            except OSError:
                ident = None
            if ident is not None and ident == self._seen_file:
                return self.current
            self._seen_file = ident
        try:
            doc = read_json(paths.state_file(self.root))
            if doc is None:
                return self.current
            state = parse_state(doc)
        except Rejected as exc:
            if exc.reason != self._last_reason:
                self._last_reason = exc.reason
                self._log.warning("state_file_rejected", reason=exc.reason)
            return self.current
        if self.current is not None and state.order < self.current.order:
            self._log.debug("stale_state_ignored", seen=state.order, kept=self.current.order)
            return self.current
        self.current = state
        return state


def read_experiment(root: Path) -> dict | None:
    """The recorded swarm settings, or None while experiment.json is absent or bad."""
    try:
        doc = read_json(paths.experiment_file(root))
        return None if doc is None else parse_experiment(doc)
    except Rejected as exc:
        get_logger().warning("experiment_file_rejected", reason=exc.reason, schema=EXPERIMENT)
        return None
