"""``sapod check``: is a node alive? Judged by watching its heartbeat counter move,
on this machine's clock, never by comparing timestamps written elsewhere."""

from __future__ import annotations

import time

from sapod import paths
from sapod.config import Config
from sapod.errors import Rejected
from sapod.peers import GONE
from sapod.schema import Peer, parse_peer
from sapod.store import read_json


def _read(cfg: Config) -> Peer | None:
    doc = read_json(paths.peer_file(cfg.root, cfg.node_id))
    return None if doc is None else parse_peer(doc, cfg.node_id)


def _first_look(cfg: Config, sleep: float) -> tuple[Peer | None, str]:
    """The heartbeat file, or why there is none. A file missing or torn at the first
    look (mid-replace on some network mounts) is looked at again for one heartbeat."""
    deadline = time.monotonic() + cfg.heartbeat_interval
    while True:
        try:
            peer = _read(cfg)
            why = f"no heartbeat file at {paths.peer_file(cfg.root, cfg.node_id)}"
        except Rejected as exc:
            peer, why = None, f"heartbeat file unreadable: {exc.reason}"
        if peer is not None or time.monotonic() >= deadline:
            return peer, f"{cfg.node_id}: {why}"
        time.sleep(sleep)


def check_node(cfg: Config, sleep: float = 0.2) -> tuple[bool, str]:
    """(healthy, one-line reason). Waits up to three heartbeats plus a second: one
    for a readable heartbeat file, two more and a second for its beat to move."""
    first, why = _first_look(cfg, sleep)
    if first is None:
        return False, why
    if first.status in GONE:
        return False, f"{cfg.node_id}: {first.status} (round {first.round}, phase {first.phase})"
    window = 2 * cfg.heartbeat_interval + 1.0
    deadline = time.monotonic() + window
    while time.monotonic() < deadline:
        time.sleep(sleep)
        try:
            now = _read(cfg)
        except Rejected:
            continue  # mid-replace on some mounts; try again
        if now is not None and (now.instance, now.beat) != (first.instance, first.beat):
            if now.status in GONE:
                return False, f"{cfg.node_id}: {now.status}"
            state = "degraded" if now.status == "degraded" else "alive"
            return state == "alive", (f"{cfg.node_id}: {state}, {now.role} round {now.round} phase {now.phase} "
                                      f"beat {now.beat}")
    return False, f"{cfg.node_id}: heartbeat has not moved for {window:.0f}s (beat {first.beat}, phase {first.phase})"
