"""Who is in the swarm and who is alive, judged without trusting anyone's clock.

A peer is alive while its heartbeat counter keeps changing: we note the time of
each change on *our own* monotonic clock and call the peer dead once the counter
has stood still for PEER_TIMEOUT. Wall-clock timestamps from other boxes are
never compared.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sapod import paths
from sapod.errors import Rejected
from sapod.logs import get_logger
from sapod.schema import Peer, parse_peer
from sapod.store import list_node_entries, read_each, read_json

GONE = ("stopped", "finished")


@dataclass
class _Seen:
    peer: Peer
    changed_at: float  # our monotonic clock when (instance, beat) last changed


class PeerTable:
    _shared: weakref.WeakValueDictionary[tuple[str, float], PeerTable] = weakref.WeakValueDictionary()
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls, root: Path, timeout: float, concurrent: bool = False) -> PeerTable:
        """One table per (folder, timeout) for all the nodes of a process.

        Every node needs the same view of peers/, judged on the same clock; with N
        nodes in one process, separate tables would read N heartbeats N times over.
        """
        key = (str(root), timeout)
        with cls._shared_lock:
            table = cls._shared.get(key)
            if table is None:
                table = cls._shared[key] = cls(root, timeout, concurrent=concurrent)
            return table

    def __init__(self, root: Path, timeout: float, clock: Callable[[], float] = time.monotonic,
                 concurrent: bool = False):
        self.root = root
        self.timeout = timeout
        self.clock = clock
        self.concurrent = concurrent  # read the heartbeats several at a time (a network mount)
        self._seen: dict[str, _Seen] = {}
        self._rejected: dict[str, str] = {}
        self._log = get_logger()
        self._refreshed_at: float | None = None
        self._lock = threading.Lock()
        # live() per role, kept until the next refresh (a new version) or the first live
        # peer's deadline: (version, deadline, peers).
        self._version = 0
        self._live: dict[str | None, tuple[int, float, frozenset[str]]] = {}

    def refresh(self, max_age: float = 0.0) -> None:
        """Re-read peers/, unless the last read is younger than ``max_age`` seconds.

        Reading every heartbeat on every file event costs N reads per event, N^2 per
        round; heartbeats only move every HEARTBEAT_INTERVAL anyway.
        """
        with self._lock:  # nodes of one process may share this table from I/O threads
            self._refresh(max_age)

    def _refresh(self, max_age: float) -> None:
        now = self.clock()
        if self._refreshed_at is not None and now - self._refreshed_at < max_age:
            return
        self._refreshed_at = now
        files = [(node_id, path) for node_id, (path, _) in list_node_entries(paths.peers_dir(self.root)).items()]

        def fetch(item: tuple[str, str]) -> Peer | None:
            doc = read_json(item[1])
            return None if doc is None else parse_peer(doc, item[0])

        for (node_id, _), peer in zip(files, read_each(fetch, files, self.concurrent)):
            if peer is None:
                continue
            if isinstance(peer, Rejected):
                if self._rejected.get(node_id) != peer.reason:  # log each new reason once
                    self._rejected[node_id] = peer.reason
                    self._log.warning("peer_file_rejected", peer=node_id, reason=peer.reason)
                continue
            self._rejected.pop(node_id, None)
            seen = self._seen.get(node_id)
            if seen is None or (seen.peer.instance, seen.peer.beat) != (peer.instance, peer.beat):
                self._seen[node_id] = _Seen(peer, now)
            else:
                seen.peer = peer
        self._version += 1  # after the changes: a live() computed meanwhile is not kept

    def peers(self) -> dict[str, Peer]:
        return {k: v.peer for k, v in self._seen.items()}

    def _alive_until(self, seen: _Seen | None) -> float:
        """When, on our clock, this peer counts as dead unless its beat moves (-inf: gone)."""
        if seen is None or seen.peer.status in GONE:
            return float("-inf")
        return seen.changed_at + self.timeout

    def alive(self, node_id: str) -> bool:
        return self.clock() < self._alive_until(self._seen.get(node_id))

    def live(self, role: str | None = "worker") -> frozenset[str]:
        """The peers of ``role`` (any role for None) that are alive now.

        Every node of a process asks on every wake; the answer only changes at a
        refresh or when a live peer's heartbeat goes stale, so it is kept until then.
        """
        now, version = self.clock(), self._version
        cached = self._live.get(role)
        if cached is not None and cached[0] == version and now < cached[1]:
            return cached[2]
        seen = list(self._seen.items())  # one step under the GIL: an I/O thread may be refreshing
        until = {k: self._alive_until(v) for k, v in seen if role is None or v.peer.role == role}
        live = frozenset(k for k, t in until.items() if now < t)
        deadline = min((until[k] for k in live), default=float("inf"))
        self._live[role] = (version, deadline, live)
        return live

    def age(self, node_id: str) -> float | None:
        """Seconds since we saw this peer's heartbeat move, on our clock."""
        seen = self._seen.get(node_id)
        return None if seen is None else self.clock() - seen.changed_at
