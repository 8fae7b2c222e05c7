"""Task sources: where questions come from, how peers' questions are re-derived, how answers score.

``make_task_source`` turns a TASKS setting into a source: the reasoning-gym tasks here, a
task file (``sapod.taskfile``). What every source shares is in ``sapod.taskbase``.

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
import difflib
import functools
import io
import random
import re
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sapod.errors import Rejected
from sapod.mixes import MIXES, Overrides, thaw
from sapod.taskbase import (MAX_COMPLETION_CHARS, MAX_SEED, TaskSource, answer_text, check_ints, clamp_reward,
                            default_system_prompt, extract_answer, jsonable, only_rejections, same_claim)
from sapod.taskfile import FILE_SUFFIXES, FileSource
from sapod.types import TaskItem

__all__ = ["DEFAULT_TASKS", "FILE_SUFFIXES", "MAX_COMPLETION_CHARS", "MAX_INDEX", "MAX_SEED", "FileSource",
           "ReasoningGymSource", "TaskSource", "default_system_prompt", "jsonable", "make_task_source"]

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
MAX_INDEX = 100_000

# bf's generator prints progress dots to stdout; the lock keeps concurrent redirects from
# leaving sys.stdout pointing at a StringIO.
_GEN_LOCK = threading.RLock()


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
    return TaskItem(task, seed, index, str(e["question"]), answer_text(e.get("answer")), meta)


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
        with only_rejections():
            if not isinstance(task, str) or task not in self.tasks:
                raise Rejected(f"unknown task {str(task)[:80]!r}")
            check_ints(seed, index, MAX_INDEX)
            if not isinstance(question, str) or not (answer is None or isinstance(answer, str)):
                raise Rejected("question must be a string and answer a string or null")
            try:
                item = self._item(task, seed, index)
            except Exception as e:
                raise Rejected(f"regeneration failed: {type(e).__name__}") from None
            return same_claim(item, question, answer, "the regenerated one")

    def score(self, item: TaskItem, completion: str) -> float:
        try:
            if item.task not in self.tasks:
                return 0.0
            overrides = self._overrides[item.task]
            entry = _rg_entry(item.task, item.seed, item.index, overrides)
            if str(entry["question"]) != item.question:  # an unchecked item: nothing to score against
                return 0.0
            answer = extract_answer(completion)
            if answer is None:
                return 0.0
            ds = _rg_dataset(item.task, item.seed, _dataset_size(item.index), overrides)
            if _verifier_evals(type(ds)):
                answer = _safe_for_eval(answer, entry.get("answer"))
                if answer is None:
                    return 0.0
            return clamp_reward(ds.score_answer(answer, entry))
        except Exception:
            return 0.0


def make_task_source(spec: str | None) -> TaskSource:
    """None/""/"default": the nine SAPO tasks; a mix name (``sapod.mixes``): its tasks at its
    settings; "a,b": a reasoning-gym subset; a path: a file."""
    if spec is None or spec.strip() in ("", "default"):
        return ReasoningGymSource(DEFAULT_TASKS)
    spec = spec.strip()
    if spec in MIXES:
        mix = MIXES[spec]
        return ReasoningGymSource([t for t, _ in mix], overrides=dict(mix), mix=spec)
    path = _file_spec(spec)
    if path is not None:
        if not path.exists():
            raise ValueError(f"task file not found: {spec}")
        return FileSource(path)
    return ReasoningGymSource(spec.split(","))


def _file_spec(spec: str) -> Path | None:
    """The task file a TASKS value names, if it names one rather than tasks or a mix."""
    path = Path(spec).expanduser()
    return path if path.suffix.lower() in FILE_SUFFIXES or "/" in spec or "\\" in spec else None


_CHECK = """import sys
from sapod.tasks import make_task_source
try:
    make_task_source(sys.argv[1])
except ValueError as exc:
    sys.exit("sapod-tasks: " + " ".join(str(exc).split()))
"""


def task_spec_problem(spec: str | None, timeout: float = 300.0) -> str | None:
    """Why a node could not use TASKS=``spec``, or None. Checked in a child process, so the
    caller (a coordinator, which keeps to a small footprint) never imports reasoning-gym or
    datasets. The nine default tasks and the mixes are sapod's own and need no check; a
    task file that is not here is not checked either (a coordinator may run where the
    workers' files are not). None as well if the check itself cannot run."""
    spec = (spec or "").strip()
    if spec in ("", "default") or spec in MIXES:
        return None
    path = _file_spec(spec)
    if path is not None and not path.exists():
        return None
    try:
        res = subprocess.run([sys.executable, "-c", _CHECK, spec], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    said = [line for line in res.stderr.splitlines() if line.startswith("sapod-tasks: ")]
    return said[-1].removeprefix("sapod-tasks: ") if res.returncode and said else None
