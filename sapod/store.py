"""Atomic writes and suspicious reads of the shared folder.

Writers publish with temp file + fsync + ``os.replace`` so readers see either nothing
or the whole file. Readers treat anything odd (missing, torn, too big, not JSON,
NaN/Infinity) as "not there" or as a rejection with a reason; they never crash.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from sapod.errors import Rejected

NODE_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
NODE_ID_RE = re.compile(rf"^{NODE_ID_PATTERN}$")
NODE_FILE_RE = re.compile(rf"^({NODE_ID_PATTERN})\.json$")

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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    IO["files_written"] += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    # The leading dot keeps the temp name from ever matching a reader's name pattern.
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, dumps(obj))


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
    return obj


def read_json(path: Path, max_bytes: int = SMALL_FILE_MAX) -> dict[str, Any] | None:
    """The parsed object, None when the file is absent, Rejected when it is bad.

    Opens without following symlinks and checks the size before reading, so a
    peer's 100 MB file or a link out of the folder costs one stat.
    """
    IO["reads"] += 1
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise Rejected(f"cannot open: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not _is_regular(st.st_mode):
            raise Rejected("not a regular file")
        if st.st_size > max_bytes:
            raise Rejected(f"too large: {st.st_size} bytes > {max_bytes}")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise Rejected(f"cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise Rejected(f"too large: more than {max_bytes} bytes")
    if not data:
        raise Rejected("empty file")
    return parse_json_bytes(data)


def _is_regular(mode: int) -> bool:
    import stat

    return stat.S_ISREG(mode)


def list_node_files(directory: Path) -> dict[str, Path]:
    """``{node_id: path}`` for entries named exactly ``{node_id}.json``.

    Conflict copies (``w1 (1).json``), temp files, ``.nfs*`` leftovers, symlinks
    and folders are ignored. A missing folder is an empty listing.
    """
    IO["listings"] += 1
    found: dict[str, Path] = {}
    try:
        with os.scandir(directory) as it:
            for entry in it:
                m = NODE_FILE_RE.match(entry.name)
                if not m or not valid_node_id(m.group(1)):
                    continue
                try:
                    if entry.is_symlink() or not entry.is_file(follow_symlinks=False):
                        continue
                except OSError:
                    continue
                found[m.group(1)] = Path(entry.path)
    except FileNotFoundError:
        return {}
    return found
