"""What every task source shares: the TaskSource protocol, the limits on what a peer may
claim, and the checks that turn a bad claim into Rejected and nothing else.

Torch-free; reasoning_gym is imported only where the system prompt is read.
"""

from __future__ import annotations

import json
import math
from typing import Any, Protocol, runtime_checkable

from sapod.errors import Rejected
from sapod.types import TaskItem

MAX_SEED = 2**63 - 1
# A bound on the text extract_answer looks at (its scan is linear; a peer can post any text).
MAX_COMPLETION_CHARS = 200_000


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


def clamp_reward(value: Any) -> float:
    try:
        r = float(value)
    except Exception:
        return 0.0
    return min(1.0, max(0.0, r)) if math.isfinite(r) else 0.0


# reasoning_gym.utils.extract_answer strips the last group of
# re.finditer(r"<answer>\s?(.*?)\s?</answer>", text, re.DOTALL). Not a regex here: on many
# "<answer>" with no "</answer>" after them, that search tries every tag and scans to the end
# from each -- quadratic, holding the GIL (10-19 s for 64 KiB of "<answer> ", every thread
# of the process frozen). Four str.find/rfind give the same answer in linear time:
#   * the tags are case-sensitive and never overlap (each has its one "<" first), so read
#     the text as a sequence of tags; the search pairs an opening with the first closing after
#     it (tags in between are text: DOTALL, not nested) and goes on after that closing;
#   * so a pair ends at each closing whose previous tag is an opening, and starts at the first
#     opening of that run. The last such closing is the first one after the last opening
#     that has a closing after it;
#   * the group's optional leading and trailing \s are whitespace that .strip() removes
#     anyway (re's \s and str.strip agree on str.isspace): the answer is the stripped text
#     between the tags.
_OPEN, _CLOSE = "<answer>", "</answer>"


def extract_answer(completion: Any) -> str | None:
    """The stripped text of the last ``<answer>...</answer>``, as reasoning_gym extracts it;
    None when there is none or the completion is not a string of at most MAX_COMPLETION_CHARS."""
    if not isinstance(completion, str) or len(completion) > MAX_COMPLETION_CHARS:
        return None
    text = str.__str__(completion)  # a plain str: a subclass's find or strip play no part
    last_close = text.rfind(_CLOSE)
    last_open = text.rfind(_OPEN, 0, last_close) if last_close >= 0 else -1
    if last_open < 0:
        return None
    end = text.find(_CLOSE, last_open + len(_OPEN))
    before = text.rfind(_CLOSE, 0, last_open)  # the run of openings that ends at last_open
    start = text.find(_OPEN, before + len(_CLOSE) if before >= 0 else 0) + len(_OPEN)
    return text[start:end].strip()


def check_ints(seed: Any, index: Any, max_index: int) -> None:
    if type(seed) is not int or type(index) is not int:
        raise Rejected("seed and index must be integers")
    if not 0 <= seed <= MAX_SEED:
        raise Rejected(f"seed out of range 0..{MAX_SEED}")
    if not 0 <= index <= max_index:
        raise Rejected(f"index out of range 0..{max_index}")


class _OnlyRejections:
    """A check of peer data raises Rejected and nothing else (a class, not a generator:
    it wraps every peer item a node checks)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        if kind is None or not issubclass(kind, Exception) or issubclass(kind, Rejected):
            return False
        raise Rejected(f"check failed: {kind.__name__}") from None


_ONLY_REJECTIONS = _OnlyRejections()


def only_rejections() -> _OnlyRejections:
    """``with only_rejections(): ...``: any exception but Rejected becomes Rejected."""
    return _ONLY_REJECTIONS


def same_claim(item: TaskItem, question: Any, answer: Any, source: str) -> TaskItem:
    if item.question != question:
        raise Rejected(f"question differs from {source}")
    if item.answer != answer:
        raise Rejected(f"answer differs from {source}")
    return item


def default_system_prompt() -> str:
    from reasoning_gym.utils import SYSTEM_PROMPTS

    return SYSTEM_PROMPTS["default"]


def answer_text(value: Any) -> str | None:
    return None if value is None else str(value)
