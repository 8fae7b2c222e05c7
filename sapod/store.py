"""Atomic writes and suspicious reads of the shared folder.

Writers publish with temp file + fsync + ``os.replace`` so readers see either nothing
or the whole file. Readers treat anything odd (missing, torn, too big, not JSON,
NaN/Infinity) as "not there" or as a rejection with a reason; they never crash.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import threading
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import structlog

from sapod import failpoints
from sapod.errors import Rejected, Unreadable

NODE_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
# \Z, not $: "$" also matches before a trailing newline ("w1.json\n" is not w1's file).
NODE_ID_RE = re.compile(rf"^{NODE_ID_PATTERN}\Z")
NODE_FILE_RE = re.compile(rf"^({NODE_ID_PATTERN})\.json\Z")

# Operations on the shared folder, counted for benchmarks (each one costs an API call on Drive).
IO: Counter[str] = Counter()

# Caps before parsing: a peer cannot make us read (or allocate) more than this.
SMALL_FILE_MAX = 64 * 1024
ROLLOUT_FILE_MAX = 16 * 1024 * 1024


def valid_node_id(node_id: str) -> bool:
    return bool(NODE_ID_RE.match(node_id)) and not node_id.endswith(".json")


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode()


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not every filesystem (FUSE, some NFS) supports fsync on a directory
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Publish ``data`` at ``path`` whole or not at all (temp file + ``os.replace``).

    ``durable`` adds fsync of the file before the rename and of the folder after it,
    so the write survives a power cut. A heartbeat, rewritten every few seconds and
    read suspiciously, does without: an fsync can cost milliseconds on a busy disk.
    Plain ``os`` calls, no file object: each system call is a moment another thread
    can take the interpreter, and a buffered file adds three (fstat, ioctl, lseek).
    """
    IO["files_written"] += 1
    failpoints.hit("write")
    # The leading dot keeps the temp name from ever matching a reader's name pattern.
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{_temp_tag()}"
    try:
        fd = open_creating_parents(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            write_all(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


_TEMP_SEQ = itertools.count()
_TEMP_SALT = uuid.uuid4().int


def _temp_tag() -> str:
    """8 hex digits, unique within the process and unlikely to repeat across processes,
    without a system call per write (``uuid4`` reads the kernel's random source)."""
    return f"{(_TEMP_SALT + next(_TEMP_SEQ) * 0x9E3779B1) & 0xFFFFFFFF:08x}"


def open_creating_parents(path: Path, flags: int) -> int:
    """``os.open(path, flags | O_CLOEXEC)`` (a file descriptor), making the missing parent
    folders only when the open says they are missing: the folder almost always exists,
    and a mkdir per write is a needless call on a network mount."""
    flags |= getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags, 0o666)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, flags, 0o666)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def atomic_write_json(path: Path, obj: Any, durable: bool = True) -> None:
    atomic_write_bytes(path, dumps(obj), durable)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def parse_json_bytes(data: bytes) -> dict[str, Any]:
    """Strict JSON object: no NaN/Infinity, UTF-8 only. Raises Rejected."""
    try:
        obj = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise Rejected(f"not valid JSON: {str(exc)[:120]}") from None
    if not isinstance(obj, dict):
        raise Rejected(f"expected a JSON object, got {type(obj).__name__}")
    if _SURROGATE_ESCAPE.search(data) and not _encodable(obj):
        raise Rejected("a string holds an unpaired surrogate (\\ud800-\\udfff escape)")
    return obj


# json decodes an unpaired "\ud800" escape to a str that no UTF-8 writer can encode: taken
# in, it would make a tally, a log or a tokenizer fail later, far from the file.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _encodable(obj: Any) -> bool:
    stack = [obj]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    return False
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return True


def read_json(path: str | Path, max_bytes: int = SMALL_FILE_MAX) -> dict[str, Any] | None:
    """The parsed object, None when the file is absent, Rejected when it is bad.

    Opens without following symlinks and checks the size before reading, so a
    peer's 100 MB file or a link out of the folder costs one stat.
    """
    return read_json_sized(path, max_bytes)[0]


def read_json_sized(path: str | Path, max_bytes: int = SMALL_FILE_MAX) -> tuple[dict[str, Any] | None, int]:
    """``read_json`` and the number of bytes read."""
    IO["reads"] += 1
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None, 0
    except OSError as exc:
        raise Unreadable(f"cannot open: {exc.strerror or exc}", exc.errno) from None
    try:
        st = os.fstat(fd)
        if not _is_regular(st.st_mode):
            raise Rejected("not a regular file")
        if st.st_size > max_bytes:
            raise Rejected(f"too large: {st.st_size} bytes > {max_bytes}")
        data = _read_at_most(fd, max_bytes + 1, st.st_size)
    except OSError as exc:
        raise Unreadable(f"cannot read: {exc.strerror or exc}", exc.errno) from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise Rejected(f"too large: more than {max_bytes} bytes")
    if not data:
        raise Rejected("empty file")
    return parse_json_bytes(data), len(data)


T = TypeVar("T")
R = TypeVar("R")

# Reads of several files at once, for nodes on a network mount: shared by the nodes of
# a process, so together they never have more than this many reads in flight.
READ_CONCURRENCY = 8
_read_pool: ThreadPoolExecutor | None = None
_read_pool_lock = threading.Lock()


def set_read_concurrency(n: int) -> None:
    """How many reads ``read_each`` keeps in flight at once, from the next call on."""
    global READ_CONCURRENCY, _read_pool
    with _read_pool_lock:
        READ_CONCURRENCY, old, _read_pool = n, _read_pool, None
    if old is not None:
        old.shutdown(wait=False)


def read_each(fn: Callable[[T], R], items: Sequence[T], concurrent: bool) -> list[R | Rejected]:
    """``[fn(x) for x in items]``, in order, a peer's bad file (``Rejected``) as its value;
    any other exception is raised. With ``concurrent``, up to READ_CONCURRENCY at a time:
    on a network mount each file read is a round trip (an API call on Drive), and a
    round's peer files land together, so reading them one after another would cost the
    round N round trips."""
    global _read_pool

    def one(x: T) -> R | Rejected:
        try:
            return fn(x)
        except Rejected as exc:
            return exc

    if not concurrent or len(items) < 2:
        return [one(x) for x in items]
    with _read_pool_lock:
        if _read_pool is None:
            _read_pool = ThreadPoolExecutor(READ_CONCURRENCY, thread_name_prefix="sapod-read")
        pool = _read_pool
    return list(pool.map(one, items))


def _read_at_most(fd: int, limit: int, size_hint: int) -> bytes:
    """Up to ``limit`` bytes, to end of file. Sized by the file's size: asking ``os.read``
    for the whole limit would allocate it (16 MB for a rollouts file) on every read."""
    chunks = []
    want = min(size_hint + 1, limit)
    while limit > 0:
        chunk = os.read(fd, want)
        if not chunk:
            break
        chunks.append(chunk)
        limit -= len(chunk)
        want = min(65536, limit)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _is_regular(mode: int) -> bool:
    import stat

    return stat.S_ISREG(mode)


def list_node_files(directory: Path) -> dict[str, Path]:
    """``{node_id: path}`` for entries named exactly ``{node_id}.json``.

    Conflict copies (``w1 (1).json``), temp files, ``.nfs*`` leftovers, symlinks
    and folders are ignored. A missing folder is an empty listing.
    """
    return {node: Path(path) for node, (path, _) in list_node_entries(directory).items()}


def list_node_entries(directory: Path) -> dict[str, tuple[str, int]]:
    """Like ``list_node_files``, with each file's inode number (free from the listing).

    Paths are plain strings: this runs on every wake of every node, and building a
    Path per entry costs more than the listing itself.
    """
    IO["listings"] += 1
    found: dict[str, tuple[str, int]] = {}
    try:
        failpoints.hit("list")
        with os.scandir(directory) as it:
            for entry in it:
                node = _node_of(entry.name)
                if node is None:
                    if not entry.name.startswith("."):  # our temp files, .nfs* leftovers: silently
                        _ignored(entry.path, "name is not {node_id}.json")
                    continue
                try:
                    if entry.is_symlink() or not entry.is_file(follow_symlinks=False):
                        _ignored(entry.path, "symlink" if entry.is_symlink() else "not a regular file")
                        continue
                except OSError:
                    continue
                found[node] = (entry.path, entry.inode())
    except FileNotFoundError:
        return {}
    return found


@functools.lru_cache(maxsize=16384)
def _node_of(name: str) -> str | None:
    """The node id a file named ``{node_id}.json`` belongs to, None for any other name
    (memoised: every node lists the same names round after round)."""
    m = NODE_FILE_RE.match(name)
    return m.group(1) if m and valid_node_id(m.group(1)) else None


_IGNORED: OrderedDict[str, None] = OrderedDict()
_IGNORED_MAX = 4096
_LOCK = threading.Lock()


def _ignored(path: str, reason: str) -> None:
    """Log once per path that an entry is ignored (conflict copies, strays, links).
    The memory is bounded and forgets the least recently listed paths first: one
    that stays in a folder listed every round is never logged again."""
    with _LOCK:
        if path in _IGNORED:
            _IGNORED.move_to_end(path)
            return
        _IGNORED[path] = None
        if len(_IGNORED) > _IGNORED_MAX:
            _IGNORED.popitem(last=False)
    structlog.get_logger("sapod").info("entry_ignored", path=path, reason=reason)


class WriteOnceCache:
    """Parsed write-once files (rollouts), shared by every node of a process.

    Keyed by (path, inode): a file published with ``os.replace`` gets a new inode,
    so a replaced file is read again. With N nodes in one process, each peer file is
    opened and parsed once per process instead of once per node. Only files that
    parsed are kept: a rejected one may be a file still syncing in place (FUSE
    mounts keep the inode), so it is read again next time.

    Only the files of the ``max_folders`` folders most recently read from are kept
    (a folder is one round's rollouts: a node reads the open round's, a late one the
    round before), and at most ``max_bytes`` of them: a node that runs for days
    keeps a few rounds' worth, not every round's until the byte bound, which parsed
    is several times larger in memory than on disk.
    """

    def __init__(self, max_bytes: int = 64 * 1024 * 1024, max_folders: int = 4):
        self.max_bytes = max_bytes
        self.max_folders = max_folders
        self._items: OrderedDict[tuple[str, int], tuple[Any, int]] = OrderedDict()
        self._folders: OrderedDict[str, list[tuple[str, int]]] = OrderedDict()  # folder -> its keys
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, path: str, inode: int, load: Callable[[str], tuple[Any, int]]) -> Any:
        """``load(path) -> (value, size)``; an exception value (Rejected) is re-raised."""
        key = (path, inode)
        # No lock to look up (a dict lookup is atomic) and no reordering on a hit: files
        # are write-once and a round's are read together, so dropping the oldest first is
        # as good as least recently used, and a hit stays cheap with N nodes in a process.
        hit = self._items.get(key)
        if hit is not None:
            IO["cache_hits"] += 1  # a read a node running alone would have made
        else:
            hit = load(path)
            if hit[0] is None:  # not there yet: nothing to remember
                return None
            if isinstance(hit[0], Rejected):
                raise hit[0]
            with self._lock:
                if key in self._items:  # another thread read it meanwhile
                    return self._items[key][0]
                self._add(key, hit)
        return hit[0]

    def _add(self, key: tuple[str, int], hit: tuple[Any, int]) -> None:
        folder = os.path.dirname(key[0])
        keys = self._folders.get(folder)
        if keys is None:
            keys = self._folders[folder] = []
            while len(self._folders) > self.max_folders:
                for old in self._folders.popitem(last=False)[1]:
                    self._drop(old)
        keys.append(key)
        self._items[key] = hit
        self._bytes += hit[1]
        while self._bytes > self.max_bytes and len(self._items) > 1:
            self._drop(next(iter(self._items)))

    def _drop(self, key: tuple[str, int]) -> None:
        """Forget one file (its folder's key list keeps the name; dropping it twice is harmless)."""
        gone = self._items.pop(key, None)
        if gone is not None:
            self._bytes -= gone[1]
