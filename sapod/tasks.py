"""Task sources: where questions come from, how peers' questions are re-derived, how answers score.

Provenance scheme (reasoning-gym): an item is ``(task, seed, index)`` and regenerates as
``create_dataset(task, seed=seed, size=_dataset_size(index))[index]``. ``sample(n, s)`` draws one
63-bit dataset seed from ``Random(s)`` and uses indices ``0..n-1`` under it, so a batch shares one
cached dataset per task. The seed is drawn rather than ``s`` itself because reasoning-gym derives
item ``i`` from ``Random(seed + i)``: nearby round seeds would otherwise yield overlapping items.

Torch-free; reasoning_gym and datasets are imported lazily because each costs about a second.
"""

from __future__ import annotations

import ast
import contextlib
import csv
import difflib
import functools
import io
import json
import math
import random
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from sapod.errors import Rejected
from sapod.mixes import MIXES, Overrides, thaw
from sapod.types import TaskItem

DEFAULT_TASKS = (
    "base_conversion",
    "basic_arithmetic",
    "arc_1d",
    "bf",
    "propositional_logic",
    "fraction_simplification",
    "decimal_arithmetic",
    "calendar_arithmetic",
    "binary_matrix",
)
MAX_SEED = 2**63 - 1
MAX_INDEX = 100_000
# The regex in extract_answer is quadratic on many unclosed tags; a peer can post any text.
MAX_COMPLETION_CHARS = 200_000
FILE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

# bf's generator prints progress dots to stdout; the lock keeps concurrent redirects from
# leaving sys.stdout pointing at a StringIO.
_GEN_LOCK = threading.RLock()


@runtime_checkable
class TaskSource(Protocol):
    name: str
    system_prompt: str

    def sample(self, n: int, seed: int) -> list[TaskItem]:
        """n items, the same for the same (n, seed)."""

    def check(self, task: str, seed: int, index: int, question: str, answer: str | None) -> TaskItem:
        """The authoritative item for a peer's claim, or Rejected."""

    def score(self, item: TaskItem, completion: str) -> float:
        """Reward in [0, 1]; never raises."""


def jsonable(obj: Any, _depth: int = 0) -> Any:
    """A JSON-safe copy: tuples become lists, sets sorted lists, non-finite floats None."""
    if _depth > 64:  # cycles or absurd nesting: give up on structure, keep a trace
        return str(obj)
    if obj is None or type(obj) in (bool, str):
        return obj
    if isinstance(obj, int):  # bool cannot be subclassed, so this is int or an int subclass
        return int(obj) if obj.bit_length() < 10_000 else f"<int of {obj.bit_length()} bits>"
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, str):
        return str.__str__(obj)
    if isinstance(obj, dict):
        return {(k if type(k) is str else str(k)): jsonable(v, _depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, _depth + 1) for v in obj]
    if isinstance(obj, (set, frozenset)):
        items = [jsonable(v, _depth + 1) for v in obj]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    tolist = getattr(obj, "tolist", None)  # numpy scalars and arrays
    if callable(tolist) and type(obj).__module__ == "numpy":
        try:
            return jsonable(tolist(), _depth + 1)
        except Exception:
            pass
    try:
        return str(obj)
    except Exception:
        return f"<{type(obj).__name__}>"


def _clamp_reward(value: Any) -> float:
    try:
        r = float(value)
    except Exception:
        return 0.0
    return min(1.0, max(0.0, r)) if math.isfinite(r) else 0.0


def _extract(completion: Any) -> str | None:
    if not isinstance(completion, str) or len(completion) > MAX_COMPLETION_CHARS:
        return None
    from reasoning_gym.utils import extract_answer

    return extract_answer(completion)


def _check_ints(seed: Any, index: Any, max_index: int) -> None:
    if type(seed) is not int or type(index) is not int:
        raise Rejected("seed and index must be integers")
    if not 0 <= seed <= MAX_SEED:
        raise Rejected(f"seed out of range 0..{MAX_SEED}")
    if not 0 <= index <= max_index:
        raise Rejected(f"index out of range 0..{max_index}")


@contextlib.contextmanager
def _only_rejections() -> Any:
    """A check of peer data raises Rejected and nothing else."""
    try:
        yield
    except Rejected:
        raise
    except Exception as e:
        raise Rejected(f"check failed: {type(e).__name__}") from None


def _same_claim(item: TaskItem, question: Any, answer: Any, source: str) -> TaskItem:
    if item.question != question:
        raise Rejected(f"question differs from {source}")
    if item.answer != answer:
        raise Rejected(f"answer differs from {source}")
    return item


def default_system_prompt() -> str:
    from reasoning_gym.utils import SYSTEM_PROMPTS

    return SYSTEM_PROMPTS["default"]


def _dataset_size(index: int) -> int:
    # Most generators ignore size, but some build every item up front; power-of-two buckets keep
    # that cost proportional to the index while still letting one cached dataset serve a batch.
    return max(64, 1 << index.bit_length())


@functools.lru_cache(maxsize=256)
def _rg_dataset(task: str, seed: int, size: int, overrides: Overrides) -> Any:
    """The dataset under a mix's frozen config overrides (part of the key: same seed, other items)."""
    import reasoning_gym

    with _GEN_LOCK, contextlib.redirect_stdout(io.StringIO()):
        return reasoning_gym.create_dataset(task, seed=seed, size=size, **thaw(overrides))


@functools.lru_cache(maxsize=4096)
def _rg_entry(task: str, seed: int, index: int, overrides: Overrides) -> dict[str, Any]:
    ds = _rg_dataset(task, seed, _dataset_size(index), overrides)
    with _GEN_LOCK, contextlib.redirect_stdout(io.StringIO()):
        entry = ds[index]
    return entry


@functools.lru_cache(maxsize=512)
def _verifier_evals(cls: type) -> bool:
    """True when a dataset's score_answer calls eval() on the answer it is given.

    Some reasoning-gym verifiers (binary_matrix, spiral_matrix, n_queens, ...) eval the
    answer text to parse a Python list. Answers come from peers' completions, so such
    a verifier must never see anything but a plain literal.
    """
    import inspect

    try:
        src = inspect.getsource(cls.score_answer)
    except (OSError, TypeError):
        return True  # unknown: assume the worst
    return re.search(r"(?<![\w.])eval\(", src) is not None


def _safe_for_eval(answer: str, gold: Any) -> str | None:
    """The answer in a form that eval() cannot abuse, or None when it is not a literal."""
    if answer == gold:
        return answer
    try:
        value = ast.literal_eval(answer)
        text = repr(value)  # eval(repr(literal)) rebuilds the literal and nothing else...
        ast.literal_eval(text)  # ...if it has a literal form: inf/nan repr as names, a huge int not at all
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    return text


@functools.lru_cache(maxsize=4096)
def _rg_item(task: str, seed: int, index: int, overrides: Overrides) -> TaskItem:
    """The item with JSON-safe metadata, built once (callers must not mutate it)."""
    e = _rg_entry(task, seed, index, overrides)
    meta = jsonable(e.get("metadata") or {})
    return TaskItem(task, seed, index, str(e["question"]), _answer_text(e.get("answer")), meta)


def _answer_text(value: Any) -> str | None:
    return None if value is None else str(value)


class ReasoningGymSource:
    """Procedural tasks from reasoning-gym; every node regenerates peers' items itself.

    ``overrides`` maps a task to frozen config overrides (a mix's difficulty settings); items,
    checks and scores of that task all use them. ``mix`` names the mix in ``name``.
    """

    def __init__(self, tasks: tuple[str, ...] | list[str] = DEFAULT_TASKS, *,
                 overrides: Mapping[str, Overrides] | None = None, mix: str | None = None):
        from reasoning_gym.factory import DATASETS

        names = tuple(dict.fromkeys(t.strip() for t in tasks if t.strip()))
        if not names:
            raise ValueError("no reasoning-gym tasks given")
        unknown = [t for t in names if t not in DATASETS]
        if unknown:
            valid = sorted(DATASETS)
            hints = []
            for t in unknown:
                hints += difflib.get_close_matches(t, valid, n=3)
            hints = list(dict.fromkeys(hints)) or valid[:8]
            mixes = [t for t in unknown if t in MIXES]
            raise ValueError(
                f"the task mix {mixes[0]} must be the whole TASKS setting, not part of a list" if mixes
                else f"unknown reasoning-gym task(s): {', '.join(unknown)}; valid names include "
                f"{', '.join(hints)} ({len(valid)} in all), or a mix: {', '.join(sorted(MIXES))}"
            )  # fmt: skip
        self._overrides = {t: tuple((overrides or {}).get(t, ())) for t in names}
        for t in names:  # fail at startup, not on the first round, for tasks that need a config
            try:
                _rg_dataset(t, 0, _dataset_size(0), self._overrides[t])
            except Exception as e:
                msg = " ".join(str(e).split())[:200]
                how = "its mix settings" if self._overrides[t] else "defaults"
                raise ValueError(f"reasoning-gym task {t} cannot be built with {how}: {msg}") from None
        self.tasks = names
        self.name = "reasoning_gym:" + (mix or ",".join(names))
        self.system_prompt = default_system_prompt()

    def _item(self, task: str, seed: int, index: int) -> TaskItem:
        return _rg_item(task, seed, index, self._overrides[task])

    def sample(self, n: int, seed: int) -> list[TaskItem]:
        if not 0 <= n <= MAX_INDEX + 1:
            raise ValueError(f"n must be in 0..{MAX_INDEX + 1}, got {n}")
        rng = random.Random(seed)
        ds_seed = rng.getrandbits(63)
        return [self._item(rng.choice(self.tasks), ds_seed, i) for i in range(n)]

    def check(self, task: str, seed: int, index: int, question: str, answer: str | None) -> TaskItem:
        with _only_rejections():
            if not isinstance(task, str) or task not in self.tasks:
                raise Rejected(f"unknown task {str(task)[:80]!r}")
            _check_ints(seed, index, MAX_INDEX)
            if not isinstance(question, str) or not (answer is None or isinstance(answer, str)):
                raise Rejected("question must be a string and answer a string or null")
            try:
                item = self._item(task, seed, index)
            except Exception as e:
                raise Rejected(f"regeneration failed: {type(e).__name__}") from None
            return _same_claim(item, question, answer, "the regenerated one")

    def score(self, item: TaskItem, completion: str) -> float:
        try:
            if item.task not in self.tasks:
                return 0.0
            overrides = self._overrides[item.task]
            entry = _rg_entry(item.task, item.seed, item.index, overrides)
            if str(entry["question"]) != item.question:  # an unchecked item: nothing to score against
                return 0.0
            answer = _extract(completion)
            if answer is None:
                return 0.0
            ds = _rg_dataset(item.task, item.seed, _dataset_size(item.index), overrides)
            if _verifier_evals(type(ds)):
                answer = _safe_for_eval(answer, entry.get("answer"))
                if answer is None:
                    return 0.0
            return _clamp_reward(ds.score_answer(answer, entry))
        except Exception:
            return 0.0


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
        with _only_rejections():
            if not isinstance(task, str) or task != self.name:
                raise Rejected(f"unknown task {str(task)[:80]!r}")
            _check_ints(seed, index, len(self._rows) - 1)
            if seed != 0:
                raise Rejected("file tasks have seed 0")
            return _same_claim(self._item(index), question, answer, "the file's row")

    def score(self, item: TaskItem, completion: str) -> float:
        try:
            gold = item.answer
            answer = _extract(completion)
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
        out.append((str(q), _answer_text(row.get("answer")), jsonable(extra)))
    if not out:
        raise ValueError(f"task file {path} has no row with a question")
    return out


def _load_rows(path: Path, kind: str) -> list[dict[str, Any]]:
    from datasets import Features, Value, disable_progress_bars, load_dataset

    disable_progress_bars()  # a bar on stderr would break the JSON log stream

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


def make_task_source(spec: str | None) -> TaskSource:
    """None/""/"default": the nine SAPO tasks; a mix name (``sapod.mixes``): its tasks at its
    settings; "a,b": a reasoning-gym subset; a path: a file."""
    if spec is None or spec.strip() in ("", "default"):
        return ReasoningGymSource(DEFAULT_TASKS)
    spec = spec.strip()
    if spec in MIXES:
        mix = MIXES[spec]
        return ReasoningGymSource([t for t, _ in mix], overrides=dict(mix), mix=spec)
    path = Path(spec).expanduser()
    looks_like_file = path.suffix.lower() in FILE_SUFFIXES or "/" in spec or "\\" in spec
    if looks_like_file:
        if not path.exists():
            raise ValueError(f"task file not found: {spec}")
        return FileSource(path)
    return ReasoningGymSource(spec.split(","))
