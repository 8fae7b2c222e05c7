"""Task files: fixed question/answer rows from a local JSONL, JSON, Parquet or CSV file.

An item is ``(file:<name>, 0, row)``: a peer's claim is checked against this node's own
copy of the row, so nodes of one swarm must have the same file. ``datasets`` is imported
only when a file is read.
"""

from __future__ import annotations

import csv
import functools
import math
import random
from pathlib import Path
from typing import Any

from sapod.errors import Rejected
from sapod.taskbase import (answer_text, check_ints, default_system_prompt, extract_answer, jsonable, only_rejections,
                            same_claim)
from sapod.types import TaskItem

FILE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _as_number(text: str) -> float | None:
    try:
        x = float(text)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


class FileSource:
    """Fixed question/answer rows from a local file; index is the row number, seed is always 0."""

    def __init__(self, path: str | Path):
        path = Path(path)
        kind = FILE_SUFFIXES.get(path.suffix.lower())
        if kind is None:
            raise ValueError(f"unsupported task file type {path.suffix!r}; use {', '.join(FILE_SUFFIXES)}")
        if not path.is_file():
            raise ValueError(f"task file not found: {path}")
        st = path.stat()
        self._rows = _file_rows(path.resolve(), kind, st.st_mtime_ns, st.st_size)
        self.name = f"file:{path.name}"
        self.system_prompt = default_system_prompt()

    def __len__(self) -> int:
        return len(self._rows)

    def _item(self, index: int) -> TaskItem:
        q, a, meta = self._rows[index]
        return TaskItem(task=self.name, seed=0, index=index, question=q, answer=a, metadata=dict(meta))

    def sample(self, n: int, seed: int) -> list[TaskItem]:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = random.Random(seed)
        count = len(self._rows)
        # Without replacement while the file allows it, so one batch has no repeated question.
        idx = rng.sample(range(count), n) if n <= count else [rng.randrange(count) for _ in range(n)]
        return [self._item(i) for i in idx]

    def check(self, task: str, seed: int, index: int, question: str, answer: str | None) -> TaskItem:
        with only_rejections():
            if not isinstance(task, str) or task != self.name:
                raise Rejected(f"unknown task {str(task)[:80]!r}")
            check_ints(seed, index, len(self._rows) - 1)
            if seed != 0:
                raise Rejected("file tasks have seed 0")
            return same_claim(self._item(index), question, answer, "the file's row")

    def score(self, item: TaskItem, completion: str) -> float:
        try:
            gold = item.answer
            answer = extract_answer(completion)
            if gold is None or answer is None:
                return 0.0
            if answer == gold.strip():
                return 1.0
            a, g = _as_number(answer), _as_number(gold.strip())
            if a is not None and g is not None and math.isclose(a, g, rel_tol=1e-6, abs_tol=0.0):
                return 1.0
            return 0.0
        except Exception:
            return 0.0


@functools.lru_cache(maxsize=8)
def _file_rows(path: Path, kind: str, mtime_ns: int, size: int) -> list[tuple[str, str | None, dict[str, Any]]]:
    """(question, answer, metadata) per usable row of a task file; ValueError when unusable.

    Kept by (path, kind, mtime, size): the nodes of one process (a demo, a benchmark)
    share one copy, read once, and a file changed on disk is read again. Never modified.
    """
    rows = _load_rows(path, kind)
    if not rows:
        raise ValueError(f"task file {path} has no rows")
    missing = [c for c in ("question", "answer") if c not in rows[0]]
    if missing:
        raise ValueError(f"task file {path} lacks column(s) {', '.join(missing)}; needs question and answer")
    out = []
    for row in rows:
        q = row.get("question")
        if q is None or str(q) == "":
            continue  # unusable; skipping keeps indices stable for identical files
        extra = {k: v for k, v in row.items() if k not in ("question", "answer")}
        out.append((str(q), answer_text(row.get("answer")), jsonable(extra)))
    if not out:
        raise ValueError(f"task file {path} has no row with a question")
    return out


def _load_rows(path: Path, kind: str) -> list[dict[str, Any]]:
    from datasets import Features, Value, disable_progress_bars, load_dataset

    disable_progress_bars()  # a bar on stderr would break the JSON log stream

    if path.stat().st_size == 0:
        raise ValueError(f"task file {path} is empty")
    kwargs: dict[str, Any] = {}
    if kind == "csv":
        # All columns as text, so "007" or "1.50" reach the verifier as written, not as floats.
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), None)
        if not header:
            raise ValueError(f"task file {path} is empty")
        kwargs["features"] = Features({c: Value("string") for c in header})
    try:
        ds = load_dataset(kind, data_files=str(path), split="train", **kwargs)
    except Exception as e:
        msg = " ".join(str(e).split())[:200]
        raise ValueError(f"cannot read task file {path}: {type(e).__name__}: {msg}") from None
    return ds.to_list()
