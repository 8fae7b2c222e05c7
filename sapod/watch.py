"""File events as hints: watchdog (inotify) bridged onto the event loop, or none.

Events only wake the loop early; the node always re-reads what it needs and
rescans every POLL_INTERVAL anyway, because inotify never sees writes made by
other machines on network mounts. In poll mode there is no observer at all: the
rescan *is* the polling, and it reads only the few files the current phase needs
(watchdog's PollingObserver would walk and stat whole trees, and stops for good on
one I/O error).
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

from sapod.logs import get_logger

# inotify also reports reads (open, close without writing). Every node re-reads the
# folder it watches when woken, so waking on reads would have nodes wake each other
# in a loop.
READ_EVENTS = frozenset({"opened", "closed_no_write"})

NETWORK_FS = ("nfs", "nfs4", "cifs", "smb", "smbfs", "smb3", "9p", "afs", "ceph", "glusterfs", "lustre",
              "davfs", "sshfs", "virtiofs")


def mount_fstype(path: Path, mounts: str = "/proc/self/mounts") -> str:
    """The filesystem type of the mount that holds ``path`` (longest matching mount point)."""
    try:
        target = os.path.realpath(path)
        best, fstype = "", "unknown"
        with open(mounts, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, fstype = mnt, parts[2]
        return fstype
    except OSError:
        return "unknown"


def is_remote(fstype: str) -> bool:
    """Network and FUSE filesystems (Drive, rclone, gcsfuse, NFS, SMB, ...), or one we cannot tell."""
    return fstype == "unknown" or fstype.startswith("fuse") or fstype in NETWORK_FS


def pick_watch_mode(requested: str, shared: Path, mounts: str = "/proc/self/mounts") -> tuple[str, str]:
    """(mode, reason). ``auto`` polls on network and FUSE mounts, where inotify is blind."""
    if requested != "auto":
        return requested, "requested"
    fstype = mount_fstype(shared, mounts)
    if is_remote(fstype):
        return "poll", f"{fstype} mount"
    try:
        from watchdog.observers.inotify import InotifyObserver  # noqa: F401
    except Exception:  # pragma: no cover - platforms without inotify
        return "poll", "inotify unavailable"
    return "inotify", f"{fstype} mount"


class _SharedObserver:
    """One inotify observer per process, shared by every node in it.

    watchdog opens one inotify instance per watched folder, and a user may hold only
    128 of them: with one observer per node, a box running many nodes would run out.
    Shared, the nodes watching the same folder (the state folder, this round's
    rollouts) share one watch, which is dropped when its last node lets go.
    """

    _lock = threading.Lock()
    _observer: Any = None
    _watches: dict[str, tuple[Any, set[Any]]] = {}
    _users = 0

    @classmethod
    def acquire(cls) -> None:
        from watchdog.observers.inotify import InotifyObserver

        with cls._lock:
            if cls._observer is None:
                cls._observer = InotifyObserver()
                cls._observer.daemon = True
                cls._observer.start()
            cls._users += 1

    @classmethod
    def release(cls) -> None:
        with cls._lock:
            cls._users -= 1
            if cls._users == 0 and cls._observer is not None:
                cls._observer.stop()
                cls._observer.join(timeout=2)
                cls._observer, cls._watches = None, {}

    @classmethod
    def revive(cls) -> bool:
        """Restart a dead observer thread with every watch it had. True if it was dead.

        The observer thread can die (an inotify error, a watched folder vanishing under
        it); without this, file events would stop for good and only rescans be left.
        """
        from watchdog.observers.inotify import InotifyObserver

        with cls._lock:
            if cls._observer is None or cls._observer.is_alive():
                return False
            old, cls._observer = cls._observer, InotifyObserver()
            cls._observer.daemon = True
            cls._observer.start()
            watches, cls._watches = cls._watches, {}
            for folder, (_, handlers) in watches.items():
                watch = None
                for handler in handlers:
                    try:
                        if watch is None:
                            watch = cls._observer.schedule(handler, folder, recursive=False)
                            cls._watches[folder] = (watch, set())
                        else:
                            cls._observer.add_handler_for_watch(handler, watch)
                        cls._watches[folder][1].add(handler)
                    except OSError:
                        break  # the folder is gone; the node re-watches what it needs
        try:
            old.stop()
        except Exception:  # noqa: BLE001 - a dead observer may fail to stop; it is already gone
            pass
        return True

    @classmethod
    def add(cls, handler: Any, folder: str) -> None:
        with cls._lock:
            if folder in cls._watches:
                watch, handlers = cls._watches[folder]
                cls._observer.add_handler_for_watch(handler, watch)
            else:
                watch, handlers = cls._observer.schedule(handler, folder, recursive=False), set()
                cls._watches[folder] = (watch, handlers)
            handlers.add(handler)

    @classmethod
    def remove(cls, handler: Any, folder: str) -> None:
        with cls._lock:
            if cls._observer is None or folder not in cls._watches:
                return
            watch, handlers = cls._watches[folder]
            handlers.discard(handler)
            if handlers:
                cls._observer.remove_handler_for_watch(handler, watch)
            else:
                del cls._watches[folder]
                cls._observer.unschedule(watch)


class Watcher:
    """Watches a small, changing set of folders (never a whole tree) and wakes a waiter."""

    def __init__(self, mode: str, loop: asyncio.AbstractEventLoop):
        self.mode = mode
        self._loop = loop
        self._wake = asyncio.Event()
        self._handler: Any = None
        self._folders: set[str] = set()
        self.degraded = False
        self._log = get_logger()
        if mode == "inotify":
            from watchdog.events import FileSystemEventHandler

            watcher = self

            class _Bridge(FileSystemEventHandler):
                # Runs on the observer's thread: hand over to the loop, do nothing else.
                def on_any_event(self, event: Any) -> None:
                    if event.event_type in READ_EVENTS:
                        return
                    watcher._loop.call_soon_threadsafe(watcher._wake.set)

            self._handler = _Bridge()
            _SharedObserver.acquire()

    def watch(self, folders: list[Path]) -> None:
        """Watch exactly these folders (creating them), dropping the others."""
        if self._handler is None:
            return
        wanted = {str(f) for f in folders}
        for old in self._folders - wanted:
            try:
                _SharedObserver.remove(self._handler, old)
            except (KeyError, ValueError, OSError):
                pass
            self._folders.discard(old)
        for folder in wanted - self._folders:
            try:
                Path(folder).mkdir(parents=True, exist_ok=True)
                _SharedObserver.add(self._handler, folder)
                self._folders.add(folder)
            except OSError as exc:
                # Without the watch the rescan still finds everything, only later.
                self.degraded = True
                self._log.warning("watch_failed", folder=folder, error=str(exc))

    async def wait(self, timeout: float) -> bool:
        """Until an event or ``timeout`` seconds; True if an event woke us."""
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            if self._handler is not None and _SharedObserver.revive():
                self._log.warning("observer_restarted", folders=len(self._folders))
            return False
        finally:
            self._wake.clear()

    def close(self) -> None:
        if self._handler is not None:
            self.watch([])
            self._handler = None
            _SharedObserver.release()
