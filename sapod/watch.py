"""File events as hints: inotify read on the event loop, or none.

Events only wake the loop early; the node always re-reads what it needs and
rescans every POLL_INTERVAL anyway, because inotify never sees writes made by
other machines on network mounts. In poll mode nothing is watched at all: the
rescan *is* the polling, and it reads only the few files the current phase needs
(watchdog's PollingObserver would walk and stat whole trees, and stops for good on
one I/O error).
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import os
import struct
from pathlib import Path

from sapod.logs import get_logger

try:  # watchdog's libc bindings; the events are read here, on the event loop (see _Inotify)
    from watchdog.observers.inotify_c import InotifyConstants as IN
    from watchdog.observers.inotify_c import inotify_add_watch, inotify_init, inotify_rm_watch
except Exception:  # noqa: BLE001 - not Linux, or a libc without inotify: poll mode only
    IN = None

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
    fstype = mount_fstype(shared, mounts)
    if requested == "inotify" and is_remote(fstype):
        return "inotify", (f"requested on a {fstype} mount, where inotify sees only this machine's writes: "
                           "other machines' files are found by the rescans every POLL_INTERVAL")
    if requested != "auto":
        return requested, "requested"
    if is_remote(fstype):
        return "poll", f"{fstype} mount"
    if IN is None:  # pragma: no cover - platforms without inotify
        return "poll", "inotify unavailable"
    return "inotify", f"{fstype} mount"


_SERIALS = itertools.count()

# What can mean new data: a file or folder created, moved in or out, deleted, or closed
# after writing (a writer that does not rename); and the watched folder itself going.
# Not reads (open, close without writing), in-place modifications or attribute changes:
# every node reads every peer's file, and waking on reads would have nodes wake each
# other in a loop.
_MASK = 0 if IN is None else (IN.IN_CREATE | IN.IN_MOVED_TO | IN.IN_MOVED_FROM | IN.IN_DELETE | IN.IN_CLOSE_WRITE
                               | IN.IN_DELETE_SELF | IN.IN_MOVE_SELF | IN.IN_ONLYDIR)
_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name


def _hidden(name: bytes) -> bool:
    return name.startswith(b".")


class _Folder:
    """One watched folder of an event loop's inotify instance, shared by every Watcher of
    that loop that watches it: an event costs one look here however many nodes watch."""

    def __init__(self, wd: int) -> None:
        self.wd = wd
        self.watchers: set[Watcher] = set()
        self.serial = next(_SERIALS)  # never reused, unlike id(): see folder_version
        self.changes = 0  # events that passed the filters


class _Inotify:
    """One inotify instance per event loop, read on the loop itself (``add_reader``).

    No threads: the kernel queues a folder's events on one descriptor, and the loop
    reads them when it is readable, between its other callbacks. (watchdog's observer
    passes each event through three threads and two queues before a handler could hop
    back onto the loop; with many nodes in a process that traffic, and the threads'
    contention for the interpreter, cost more than the nodes' own file work.) A user may
    hold only 128 inotify instances; a loop holds one, however many nodes it runs.
    """

    _by_loop: dict[asyncio.AbstractEventLoop, _Inotify] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        fd = inotify_init()
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init: {os.strerror(err)}")
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)
        self.fd, self.loop = fd, loop
        self.folders: dict[str, _Folder] = {}
        self._by_wd: dict[int, _Folder] = {}
        self.users = 0
        self.closed = False
        loop.add_reader(fd, self._readable)

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _Inotify:
        for gone in [lp for lp in cls._by_loop if lp.is_closed()]:  # a loop closed with watches open
            cls._by_loop.pop(gone).close()
        inst = cls._by_loop.get(loop)
        if inst is None or inst.closed:
            inst = cls._by_loop[loop] = cls(loop)
        return inst

    def add(self, watcher: Watcher, folder: str) -> None:
        f = self.folders.get(folder)
        if f is None:
            Path(folder).mkdir(parents=True, exist_ok=True)  # a watch needs the folder
            wd = inotify_add_watch(self.fd, os.fsencode(folder), _MASK)
            if wd < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"inotify_add_watch: {os.strerror(err)}", folder)
            # The same folder under another name (a symlink) is the same watch.
            f = self._by_wd.get(wd) or _Folder(wd)
            self._by_wd[wd] = self.folders[folder] = f
        f.watchers.add(watcher)

    def remove(self, watcher: Watcher, folder: str) -> None:
        f = self.folders.get(folder)
        if f is None:
            return
        f.watchers.discard(watcher)
        if not f.watchers:
            self._drop(f)
            inotify_rm_watch(self.fd, f.wd)  # an error means the watch is gone already

    def _drop(self, f: _Folder) -> list[str]:
        """Forget ``f`` and the names it was watched under (returned)."""
        names = [name for name, g in self.folders.items() if g is f]
        for name in names:
            del self.folders[name]
        if self._by_wd.get(f.wd) is f:
            del self._by_wd[f.wd]
        return names

    def _readable(self) -> None:
        touched: dict[_Folder, None] = {}  # folders with events that passed the filters
        woken: set[Watcher] = set()  # watchers woken whatever they expect (lost events, folders)
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # nothing left to read from: everyone rescans now and
                get_logger().warning("inotify_failed", error=str(exc))  # moves to a new one
                for f in self._by_wd.values():
                    woken |= f.watchers
                self.close()
                break
            self._parse(buf, touched, woken)
        for f in touched:
            for w in f.watchers:
                if w not in woken:
                    w.changed(f)
        for w in woken:
            w.wake()

    def _parse(self, buf: bytes, touched: dict[_Folder, None], woken: set[Watcher]) -> None:
        i, end = 0, len(buf)
        while i + 16 <= end:
            wd, mask, _, length = _HEADER.unpack_from(buf, i)
            name = buf[i + 16:i + 16 + length].rstrip(b"\0")
            i += 16 + length
            if mask & IN.IN_Q_OVERFLOW:  # events were lost: everyone looks again
                for f in self._by_wd.values():
                    f.changes += 1
                    woken |= f.watchers
                continue
            f = self._by_wd.get(wd)
            if f is None:
                continue
            if mask & IN.IN_IGNORED:  # the folder went (or its watch was removed)
                for name in self._drop(f):
                    for w in f.watchers:
                        w.lost(name)
                woken |= f.watchers
            elif name and _hidden(name):
                # One of our temp files (or an .nfs leftover): creating and writing it means
                # nothing yet; the rename that publishes it arrives as a move to the real name.
                continue
            f.changes += 1
            touched[f] = None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._by_loop.get(self.loop) is self:
            del self._by_loop[self.loop]
        if not self.loop.is_closed():
            self.loop.remove_reader(self.fd)
        os.close(self.fd)  # drops every watch with it
        self.folders, self._by_wd = {}, {}


def folder_version(folder: str) -> tuple[int, int] | None:
    """A value that changes whenever a file in ``folder`` is published, moved or deleted,
    for a folder this process watches with inotify now; None for any other folder.

    Read it before listing the folder: while it is unchanged, that listing is still
    whole, since any change after the listing began makes an event that changes it (a
    reader that takes an old listing in the moment before the event arrives is woken
    by that event and looks again). Events can be lost (a kernel queue overflow), so a
    reader should not trust an equal version for long.
    """
    for inst in tuple(_Inotify._by_loop.values()):
        f = inst.folders.get(folder)
        if f is not None:
            return f.serial, f.changes
    return None


class Watcher:
    """Watches a small, changing set of folders (never a whole tree) and wakes a waiter."""

    def __init__(self, mode: str, loop: asyncio.AbstractEventLoop):
        self.mode = mode
        self.loop = loop
        self._woken = False
        self._waiter: asyncio.Future[bool] | None = None
        self._folders: set[str] = set()
        self._inotify: _Inotify | None = None
        self._expected: dict[_Folder, int] = {}  # folder -> its change count worth waking for
        self.degraded = False
        self.error: str | None = None  # why, when degraded
        self._log = get_logger()
        if mode == "inotify":
            try:
                self._inotify = _Inotify.of(loop)
                self._inotify.users += 1
            except OSError as exc:  # e.g. the user's 128 inotify instances are taken
                self.degraded, self.error = True, str(exc)
                self._log.warning("inotify_unavailable", error=self.error)

    def wake(self) -> None:
        """On the loop's thread: something changed in a watched folder."""
        self._woken = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(True)

    def changed(self, folder: _Folder) -> None:
        """On the loop's thread: ``folder`` has new events. Wakes the waiter unless it
        expects more events from that folder than have come (see ``expect``)."""
        target = self._expected.get(folder)
        if target is None or folder.changes >= target:
            self.wake()

    def expect(self, folder: str, since: tuple[int, int] | None, events: int) -> None:
        """For the next ``wait`` only: events in ``folder`` wake it only once ``events``
        of them have come since ``since`` (a ``folder_version`` taken before the listing
        the waiter judged by). A waiter that needs ``events`` more files needs at least
        that many events, since each file that appears makes one, so fewer cannot be
        worth a look: with N nodes waiting for N peers' files, each file would otherwise
        wake all N of them, N x N wakes a round. Events of its other folders, lost
        events and the rescan timeout wake it as before."""
        f = self._inotify.folders.get(folder) if self._inotify is not None else None
        if f is None or since is None or since[0] != f.serial or events <= 0:
            return
        target = since[1] + events
        if f.changes >= target:
            self._woken = True  # enough have come already: look now
        else:
            self._expected[f] = target

    def lost(self, folder: str) -> None:
        """The watch of ``folder`` is gone (the folder was deleted or moved): the next
        ``watch`` that names it watches it afresh."""
        self._folders.discard(folder)

    def watch(self, folders: list[Path]) -> None:
        """Watch exactly these folders (creating them), dropping the others."""
        if self._inotify is not None and self._inotify.closed:
            self._reattach()
        if self._inotify is None:
            return
        wanted = {str(f) for f in folders}
        if wanted == self._folders:
            return
        for old in self._folders - wanted:
            try:
                self._inotify.remove(self, old)
            except OSError:
                pass
            self._folders.discard(old)
        for folder in wanted - self._folders:
            try:
                self._inotify.add(self, folder)
                self._folders.add(folder)
            except OSError as exc:
                # Without the watch the rescan still finds everything, only later.
                self.degraded, self.error = True, str(exc)
                self._log.warning("watch_failed", folder=folder, error=self.error)

    async def wait(self, timeout: float) -> bool:
        """Until an event or ``timeout`` seconds; True if an event woke us."""
        if not self._woken:
            fut = self._waiter = self.loop.create_future()
            timer = self.loop.call_later(timeout, _expire, fut)
            try:
                await fut
            finally:
                timer.cancel()
                self._waiter = None
        self._expected.clear()
        woke, self._woken = self._woken, False
        if not woke and self._inotify is not None and self._inotify.closed:
            self.watch([Path(f) for f in self._folders])  # on a new instance
        return woke

    def _reattach(self) -> None:
        """The loop's inotify instance failed: move to a new one, watching nothing yet
        (or to none, degraded, if no instance can be had: rescans go on)."""
        assert self._inotify is not None
        self._inotify.users -= 1
        self._inotify, self._folders = None, set()
        try:
            self._inotify = _Inotify.of(self.loop)
        except OSError as exc:
            self.degraded, self.error = True, str(exc)
            self._log.warning("inotify_unavailable", error=self.error)
            return
        self._inotify.users += 1
        self._log.warning("inotify_restarted")

    def close(self) -> None:
        inst, self._inotify = self._inotify, None
        if inst is None:
            return
        if not inst.closed:
            for folder in self._folders:
                inst.remove(self, folder)
        self._folders = set()
        inst.users -= 1
        if inst.users == 0:
            inst.close()


def _expire(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(False)
