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
import functools
import itertools
import os
import threading
from pathlib import Path
from typing import Any

from sapod.logs import get_logger

# inotify also reports reads (open, close without writing). Every node re-reads the
# folder it watches when woken, so waking on reads would have nodes wake each other
# in a loop.
READ_EVENTS = frozenset({"opened", "closed_no_write"})


@functools.cache  # one list per process: every watch of every node passes the same
def _event_filter() -> tuple | None:
    """The events that can mean new data: a file or folder created, moved in, deleted, or
    closed after writing (a writer that does not rename). Given to watchdog, it narrows the
    kernel's inotify mask, so reads, in-place modifications and attribute changes (every
    node reading every peer's file) never reach the observer thread. None where watchdog
    has no such classes (every event then arrives and READ_EVENTS are dropped here)."""
    try:
        from watchdog.events import (DirCreatedEvent, DirDeletedEvent, DirMovedEvent, FileClosedEvent,
                                     FileCreatedEvent, FileDeletedEvent, FileMovedEvent)
    except ImportError:  # pragma: no cover - older watchdog
        return None
    return (FileCreatedEvent, FileMovedEvent, FileDeletedEvent, FileClosedEvent, DirCreatedEvent,
            DirMovedEvent, DirDeletedEvent)


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


_SERIALS = itertools.count()


def _hidden(name: str | bytes) -> bool:
    return name.startswith("." if isinstance(name, str) else b".")


class _Folder:
    """The one watchdog handler of a watched folder: wakes every Watcher subscribed to it.

    An event costs one call here however many nodes watch the folder, and at most one
    hop onto each event loop until that loop has run it: a round's files make dozens of
    events, and with one handler (and one wake-up) per node per event, N nodes in one
    process would do N x events work on the observer's thread and the loop.
    """

    def __init__(self) -> None:
        self.by_loop: dict[asyncio.AbstractEventLoop, set[Watcher]] = {}
        self._scheduled: set[asyncio.AbstractEventLoop] = set()  # loops with a wake-up pending
        self.serial = next(_SERIALS)  # never reused, unlike id(): see folder_version
        self.changes = 0  # events that passed the filters

    @property
    def watchers(self) -> set[Watcher]:
        return set().union(*self.by_loop.values())

    @property
    def loops(self) -> dict[asyncio.AbstractEventLoop, int]:
        """Subscribers per event loop."""
        return {loop: len(ws) for loop, ws in self.by_loop.items()}

    def subscribe(self, w: Watcher) -> None:
        self.by_loop.setdefault(w.loop, set()).add(w)

    def unsubscribe(self, w: Watcher) -> None:
        mine = self.by_loop.get(w.loop, set())
        mine.discard(w)
        if not mine:
            self.by_loop.pop(w.loop, None)

    # watchdog's dispatch protocol (runs on the observer's thread)
    def dispatch(self, event: Any) -> None:
        if event.event_type in READ_EVENTS:
            return
        # A hidden name is one of our temp files (or an .nfs leftover): creating and writing it
        # means nothing yet; the rename that publishes it arrives as a move to the real name.
        names = (os.path.basename(event.src_path), os.path.basename(getattr(event, "dest_path", "") or ""))
        if all(not name or _hidden(name) for name in names):
            return
        self.changes += 1
        for loop in tuple(self.by_loop):
            # Set before the hop is scheduled, cleared by the hop before it wakes anyone:
            # an event that finds it set is followed by a wake-up that sees its effect.
            if loop not in self._scheduled:
                self._scheduled.add(loop)
                try:
                    loop.call_soon_threadsafe(self._wake, loop)
                except RuntimeError:  # that loop is closed
                    self._scheduled.discard(loop)

    def _wake(self, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduled.discard(loop)
        for w in tuple(self.by_loop.get(loop, ())):
            w.wake()


class _SharedObserver:
    """One inotify observer per process, shared by every node in it.

    watchdog opens one inotify instance per watched folder, and a user may hold only
    128 of them: with one observer per node, a box running many nodes would run out.
    Shared, the nodes watching the same folder (the state folder, this round's
    rollouts) share one watch and one handler (a _Folder), dropped when its last
    node lets go.
    """

    _lock = threading.Lock()
    _observer: Any = None
    _watches: dict[str, tuple[Any, _Folder]] = {}
    _users = 0

    @classmethod
    def _start(cls) -> Any:
        from watchdog.observers.inotify import InotifyObserver

        observer = InotifyObserver()
        observer.daemon = True
        observer.start()
        return observer

    @classmethod
    def _schedule(cls, handler: _Folder, folder: str) -> Any:
        events = _event_filter()
        if events is not None:
            try:
                return cls._observer.schedule(handler, folder, recursive=False, event_filter=events)
            except TypeError:  # a watchdog without event_filter: all events, filtered in dispatch
                pass
        return cls._observer.schedule(handler, folder, recursive=False)

    @classmethod
    def acquire(cls) -> None:
        with cls._lock:
            if cls._observer is None:
                cls._observer = cls._start()
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
        with cls._lock:
            if cls._observer is None or cls._observer.is_alive():
                return False
            old, cls._observer = cls._observer, cls._start()
            watches, cls._watches = cls._watches, {}
            for folder, (_, handler) in watches.items():
                try:
                    cls._watches[folder] = (cls._schedule(handler, folder), handler)
                except OSError:
                    pass  # the folder is gone; the node re-watches what it needs
        try:
            old.stop()
        except Exception:  # noqa: BLE001 - a dead observer may fail to stop; it is already gone
            pass
        return True

    @classmethod
    def add(cls, watcher: Watcher, folder: str) -> None:
        with cls._lock:
            if folder not in cls._watches:
                Path(folder).mkdir(parents=True, exist_ok=True)  # a watch needs the folder
                handler = _Folder()
                cls._watches[folder] = (cls._schedule(handler, folder), handler)
            cls._watches[folder][1].subscribe(watcher)

    @classmethod
    def remove(cls, watcher: Watcher, folder: str) -> None:
        with cls._lock:
            if cls._observer is None or folder not in cls._watches:
                return
            watch, handler = cls._watches[folder]
            handler.unsubscribe(watcher)
            if not handler.by_loop:
                del cls._watches[folder]
                cls._observer.unschedule(watch)


def folder_version(folder: str) -> tuple[int, int] | None:
    """A value that changes whenever a file in ``folder`` is published, moved or deleted,
    for a folder this process watches with inotify now; None for any other folder.

    Read it before listing the folder: while it is unchanged, that listing is still
    whole, since any change after the listing began makes an event that changes it (a
    reader that takes an old listing in the moment before the event arrives is woken
    by that event and looks again). Events can be lost (a kernel queue overflow), so a
    reader should not trust an equal version for long.
    """
    entry = _SharedObserver._watches.get(folder)
    if entry is None or _SharedObserver._observer is None:
        return None
    handler = entry[1]
    return handler.serial, handler.changes


class Watcher:
    """Watches a small, changing set of folders (never a whole tree) and wakes a waiter."""

    def __init__(self, mode: str, loop: asyncio.AbstractEventLoop):
        self.mode = mode
        self.loop = loop
        self._wake = asyncio.Event()
        self._active = mode == "inotify"
        self._folders: set[str] = set()
        self.degraded = False
        self._log = get_logger()
        if self._active:
            _SharedObserver.acquire()

    def wake(self) -> None:
        """On the loop's thread: something changed in a watched folder."""
        self._wake.set()

    def watch(self, folders: list[Path]) -> None:
        """Watch exactly these folders (creating them), dropping the others."""
        if not self._active:
            return
        wanted = {str(f) for f in folders}
        if wanted == self._folders:
            return
        for old in self._folders - wanted:
            try:
                _SharedObserver.remove(self, old)
            except (KeyError, ValueError, OSError):
                pass
            self._folders.discard(old)
        for folder in wanted - self._folders:
            try:
                _SharedObserver.add(self, folder)
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
            if self._active and _SharedObserver.revive():
                self._log.warning("observer_restarted", folders=len(self._folders))
            return False
        finally:
            self._wake.clear()

    def close(self) -> None:
        if self._active:
            self.watch([])
            self._active = False
            _SharedObserver.release()
