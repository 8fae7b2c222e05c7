"""Who holds a NODE_ID: one running daemon per id, told apart by a per-start instance id.

The peer file says which instance beats under an id. A daemon starting under an id
whose beat still moves steps down; a crashed predecessor's beat stands still and is
taken over. Network mounts make the file briefly unreadable (a torn read while a
FUSE mount copies it into place) or briefly absent; neither is taken to mean that
its owner has gone.
"""

from __future__ import annotations

from pathlib import Path

from sapod import paths, schema
from sapod.errors import Displaced, Rejected
from sapod.store import read_json

ABSENT = "absent"  # no peer file
FREE = "free"  # the file is ours, or its owner said it stopped
UNSURE = "unsure"  # unreadable just now: look again


def look(root: Path, node_id: str, instance: str, *, io_errors: bool = True) -> schema.Peer | str:
    """Another daemon's heartbeat in NODE_ID's peer file, or why there is none:
    ABSENT, FREE or UNSURE. With ``io_errors`` False an OSError propagates instead
    of reading as UNSURE (the heartbeat counts those as trouble with the folder)."""
    try:
        doc = read_json(paths.peer_file(root, node_id))
        if doc is None:
            return ABSENT
        other = schema.parse_peer(doc, node_id)
    except Rejected:
        return UNSURE
    except OSError:
        if not io_errors:
            raise
        return UNSURE
    if other.instance == instance or other.status in ("stopped", "finished"):
        return FREE
    return other


def displaced(other: schema.Peer, node_id: str) -> Displaced:
    return Displaced(f"another daemon (instance {other.instance[:8]} on {other.host}, pid {other.pid}) "
                     f"owns NODE_ID {node_id}")


def still_beating(first: schema.Peer | str, now: schema.Peer | str) -> tuple[schema.Peer | str, bool]:
    """One more look while deciding whether a predecessor lives: the reference beat
    to compare later looks against, and whether the beat has moved since ``first``."""
    if isinstance(now, str):
        return first, False  # absent or unreadable for a moment: look again
    if isinstance(first, str):
        return now, False  # the first readable beat
    return first, (now.instance, now.beat) != (first.instance, first.beat)
