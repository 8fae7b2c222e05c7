"""Task sources: sampling, regeneration of peers' items, and scoring."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sapod import tasks
from sapod.errors import Rejected
from sapod.mixes import MIXES, freeze, thaw
from sapod.tasks import (
    DEFAULT_TASKS,
    MAX_INDEX,
    MAX_SEED,
    FileSource,
    ReasoningGymSource,
    TaskSource,
    jsonable,
    make_task_source,
)
from sapod.types import TaskItem


@pytest.fixture(scope="module")
def src() -> ReasoningGymSource:
    return make_task_source(None)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def items(src):
    return src.sample(40, 1234)


def gold(item: TaskItem) -> str:
    return f"<answer>{item.answer}</answer>"


# --- reasoning-gym source -------------------------------------------------------------


def test_default_spec_has_the_nine_tasks_and_rg_prompt(src):
    """None/""/"default" give the nine SAPO tasks and reasoning-gym's default system prompt."""
    from reasoning_gym.utils import SYSTEM_PROMPTS

    assert src.tasks == DEFAULT_TASKS and len(DEFAULT_TASKS) == 9
    assert src.system_prompt == SYSTEM_PROMPTS["default"]
    assert make_task_source("").tasks == make_task_source("default").tasks == DEFAULT_TASKS
    assert isinstance(src, TaskSource)


@pytest.mark.parametrize("task", DEFAULT_TASKS)
def test_each_default_task_samples_regenerates_and_scores_gold(task):
    """Every default task samples, check() regenerates it exactly, and its gold answer scores 1."""
    s = ReasoningGymSource([task])
    for item in s.sample(4, 99):
        assert item.task == task
        again = s.check(item.task, item.seed, item.index, item.question, item.answer)
        assert again == item
        json.dumps(item.metadata, allow_nan=False)
        if item.answer is not None:
            assert s.score(item, gold(item)) == 1.0
        assert s.score(item, "<answer>wrong-xyzzy</answer>") < 1.0
        assert s.score(item, "no tags at all") == 0.0


def test_sample_is_deterministic_and_covers_all_tasks(src):
    """sample(n, seed) repeats exactly for the same arguments and spreads over every task."""
    a, b = src.sample(200, 5), src.sample(200, 5)
    assert a == b
    assert src.sample(200, 6) != a
    assert {i.task for i in a} == set(DEFAULT_TASKS)
    assert all(0 <= i.seed <= MAX_SEED and 0 <= i.index <= MAX_INDEX for i in a)


def test_regeneration_survives_cache_clear(src, items):
    """Provenance alone regenerates an item: clearing the caches changes nothing."""
    tasks._rg_entry.cache_clear()
    tasks._rg_dataset.cache_clear()
    for it in items[:10]:
        assert src.check(it.task, it.seed, it.index, it.question, it.answer) == it


def test_regeneration_is_the_same_in_another_process(items):
    """A fresh interpreter with another hash seed regenerates the same questions and answers."""
    claims = [[i.task, i.seed, i.index, i.question, i.answer] for i in items[:12]]
    code = (
        "import json,sys\nfrom sapod.tasks import make_task_source\ns=make_task_source(None)\n"
        "for t,se,ix,q,a in json.load(sys.stdin): s.check(t,se,ix,q,a)\nprint('ok')\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(claims), capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


def test_generation_does_not_write_to_stdout(capfd):
    """bf's generator prints progress dots; sampling must keep stdout clean for the daemon."""
    ReasoningGymSource(["bf"]).sample(3, 4242)
    assert capfd.readouterr().out == ""


def test_check_rejects_forgeries_with_a_reason(src, items):
    """Forged question/answer, unknown task and out-of-range seed/index are Rejected with a reason."""
    it = next(i for i in items if i.answer is not None)
    bad = [
        (it.task, it.seed, it.index, it.question + " ", it.answer),
        (it.task, it.seed, it.index, it.question, it.answer + "0"),
        (it.task, it.seed, it.index, it.question, None),
        ("no_such_task", it.seed, it.index, it.question, it.answer),
        ("composite", it.seed, it.index, it.question, it.answer),
        (it.task, it.seed, -1, it.question, it.answer),
        (it.task, it.seed, MAX_INDEX + 1, it.question, it.answer),
        (it.task, it.seed, 10**30, it.question, it.answer),
        (it.task, -1, it.index, it.question, it.answer),
        (it.task, 2**63, it.index, it.question, it.answer),
        (it.task, str(it.seed), it.index, it.question, it.answer),
        (it.task, it.seed, True, it.question, it.answer),
        (it.task, it.seed, it.index, None, it.answer),
    ]
    for claim in bad:
        with pytest.raises(Rejected) as e:
            src.check(*claim)
        assert e.value.reason, claim


def test_check_accepts_items_without_gold_answer():
    """propositional_logic items carry answer None; check accepts None and rejects an invented one."""
    s = ReasoningGymSource(["propositional_logic"])
    it = s.sample(1, 3)[0]
    assert it.answer is None
    assert s.check(it.task, it.seed, it.index, it.question, None) == it
    with pytest.raises(Rejected):
        s.check(it.task, it.seed, it.index, it.question, "P")


def test_check_accepts_the_extreme_seed_and_index():
    """Seed 2**63-1 and index MAX_INDEX are inside the bounds and regenerate."""
    s = ReasoningGymSource(["basic_arithmetic"])
    it = s._item("basic_arithmetic", MAX_SEED, MAX_INDEX)
    assert s.check(it.task, MAX_SEED, MAX_INDEX, it.question, it.answer) == it


def test_answer_extraction_last_tag_wins_and_strips(src, items):
    """The last <answer> tag is scored, surrounding whitespace is ignored, no tag scores 0."""
    it = next(i for i in items if i.task == "basic_arithmetic")
    assert src.score(it, f"<answer>nope</answer> thinking... <answer>  {it.answer}\n </answer>") == 1.0
    assert src.score(it, f"<answer>{it.answer}</answer> <answer>nope</answer>") < 1.0
    assert src.score(it, f"the answer is {it.answer}") == 0.0
    assert src.score(it, f"<answer>{it.answer}") == 0.0


def test_score_never_raises_and_stays_in_range(src, items, monkeypatch):
    """Verifier exceptions, NaN or out-of-range rewards, odd inputs all give a reward in [0, 1]."""
    it = next(i for i in items if i.answer is not None)
    ds = tasks._rg_dataset(it.task, it.seed, tasks._dataset_size(it.index), ())
    for result, expected in ((float("nan"), 0.0), (float("inf"), 0.0), (7.0, 1.0), (-3.0, 0.0), ("x", 0.0)):
        monkeypatch.setattr(ds, "score_answer", lambda a, e, r=result: r)
        assert src.score(it, gold(it)) == expected
    monkeypatch.setattr(ds, "score_answer", lambda a, e: 1 / 0)
    assert src.score(it, gold(it)) == 0.0
    monkeypatch.undo()
    assert src.score(it, None) == 0.0  # type: ignore[arg-type]
    assert src.score(it, "<answer>" * 10 + "x" * (tasks.MAX_COMPLETION_CHARS + 1)) == 0.0
    foreign = TaskItem("no_such_task", 0, 0, "q", "a")
    assert src.score(foreign, "<answer>a</answer>") == 0.0
    tampered = TaskItem(it.task, it.seed, it.index, "another question", it.answer)
    assert src.score(tampered, gold(it)) == 0.0


def test_subset_spec_and_unknown_names():
    """"a, b" selects a subset; unknown names raise a one-line ValueError that lists valid names."""
    s = make_task_source(" bf, basic_arithmetic ,bf")
    assert s.tasks == ("bf", "basic_arithmetic")
    assert {i.task for i in s.sample(30, 1)} == {"bf", "basic_arithmetic"}
    with pytest.raises(ValueError) as e:
        make_task_source("basic_arithmetc,nonsense_task")
    msg = str(e.value)
    assert "\n" not in msg and "nonsense_task" in msg and "basic_arithmetic" in msg
    with pytest.raises(ValueError):
        make_task_source("composite")  # registered, but unusable without a config
    with pytest.raises(ValueError):
        make_task_source(",")


def test_module_import_is_light():
    """Importing sapod.tasks pulls in neither torch nor reasoning_gym (both are slow)."""
    code = "import sys, sapod.tasks, sapod.sampling; print('torch' in sys.modules, 'reasoning_gym' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr[-2000:]


# --- named mixes -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def easy() -> ReasoningGymSource:
    return make_task_source("easy")  # type: ignore[return-value]


def test_easy_mix_resolves_by_name(easy):
    """TASKS=easy gives the mix's tasks in table order, named after the mix."""
    assert isinstance(easy, ReasoningGymSource)
    assert easy.tasks == tuple(t for t, _ in MIXES["easy"])
    assert easy.name == "reasoning_gym:easy"
    assert make_task_source(" easy ").tasks == easy.tasks
    assert {i.task for i in easy.sample(200, 3)} == set(easy.tasks)


def test_easy_mix_items_follow_the_overrides(easy):
    """Items are generated at the mix's settings, not reasoning-gym's defaults."""
    arith = ReasoningGymSource(["basic_arithmetic"], overrides=dict(MIXES["easy"]))
    default = ReasoningGymSource(["basic_arithmetic"])
    ours, theirs = arith.sample(30, 8), default.sample(30, 8)
    assert all(re.fullmatch(r"Calculate (\d|10) [+-] (\d|10)\.", i.question) for i in ours), ours[0].question
    assert [i.question for i in ours] != [i.question for i in theirs]
    assert [(i.seed, i.index) for i in ours] == [(i.seed, i.index) for i in theirs]


def test_easy_mix_check_accepts_genuine_and_rejects_forged(easy):
    """check() regenerates under the overrides: genuine claims pass, forged or default-config ones do not."""
    items = easy.sample(40, 11)
    tasks._rg_entry.cache_clear()
    tasks._rg_dataset.cache_clear()
    tasks._rg_item.cache_clear()
    for it in items:
        assert easy.check(it.task, it.seed, it.index, it.question, it.answer) == it
    it = next(i for i in items if i.task == "basic_arithmetic")
    with pytest.raises(Rejected, match="question"):
        easy.check(it.task, it.seed, it.index, it.question + " ", it.answer)
    with pytest.raises(Rejected, match="answer"):
        easy.check(it.task, it.seed, it.index, it.question, it.answer + "0")
    plain = ReasoningGymSource(["basic_arithmetic"])
    with pytest.raises(Rejected, match="question"):  # same provenance, other config
        plain.check(it.task, it.seed, it.index, it.question, it.answer)
    other = plain.sample(1, 5)[0]
    with pytest.raises(Rejected, match="question"):
        easy.check(other.task, other.seed, other.index, other.question, other.answer)
    with pytest.raises(Rejected, match="unknown task"):
        easy.check("bf", it.seed, it.index, it.question, it.answer)


def test_easy_mix_scores_with_the_overrides(easy):
    """Gold scores 1 under the mix, a wrong answer less; a source without the overrides scores it 0."""
    plain = ReasoningGymSource(list(easy.tasks))
    for it in easy.sample(60, 12):
        assert easy.score(it, gold(it)) == 1.0, it
        assert easy.score(it, "<answer>wrong-xyzzy</answer>") < 1.0
        assert plain.score(it, gold(it)) == 0.0  # its regenerated question differs: nothing to score
    frac = next(i for i in easy.sample(60, 12) if i.task == "fraction_simplification")
    assert 0.0 < easy.score(frac, "<answer>99/98</answer>") < 1.0  # partial credit keeps groups apart


def test_easy_mix_regenerates_in_another_process(easy):
    """The overrides are part of provenance everywhere: a fresh interpreter checks the same claims."""
    claims = [[i.task, i.seed, i.index, i.question, i.answer] for i in easy.sample(14, 21)]
    code = (
        "import json,sys\nfrom sapod.tasks import make_task_source\ns=make_task_source('easy')\n"
        "for t,se,ix,q,a in json.load(sys.stdin): s.check(t,se,ix,q,a)\nprint('ok')\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="777")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(claims), capture_output=True,
                         text=True, env=env, timeout=60)  # fmt: skip
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_unknown_or_misused_mix_names_are_clear_errors():
    """A misspelt mix is an unknown task (the message names the mixes); a mix inside a list is refused."""
    with pytest.raises(ValueError) as e:
        make_task_source("eazy")
    msg = str(e.value)
    assert "\n" not in msg and "eazy" in msg and "easy" in msg
    with pytest.raises(ValueError, match="whole TASKS"):
        make_task_source("easy,bf")


def test_freeze_is_hashable_and_order_free():
    """Frozen overrides are hashable cache keys, equal whatever the dict order; mutable values fail."""
    a = freeze({"b": [1, [2, 3]], "a": ("x",)})
    assert a == freeze({"a": ["x"], "b": (1, (2, 3))}) == (("a", ("x",)), ("b", (1, (2, 3))))
    assert hash(a) == hash(freeze(thaw(a)))
    with pytest.raises(TypeError):
        freeze({"a": {"nested": 1}})
    for _, overrides in MIXES["easy"]:
        hash(overrides)
    assert len({t for t, _ in MIXES["easy"]}) == len(MIXES["easy"])  # one config per task


# --- file source -----------------------------------------------------------------------


@pytest.fixture()
def jsonl_path(tmp_path):
    rows = [
        {"question": "What is 2+2?", "answer": 4, "level": 1},
        {"question": "Capital of France?", "answer": "Paris", "level": 2},
        {"question": "Half of 1?", "answer": "0.5", "level": 3},
    ]
    p = tmp_path / "qa.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def test_loading_a_task_file_prints_no_progress_bar(jsonl_path, tmp_path):
    """datasets' "Generating train split" bar would land in a node's JSON log stream on stderr."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf")}  # a fresh cache: the split is generated
    res = subprocess.run([sys.executable, "-c", "import sys; from sapod.tasks import make_task_source; "
                          "print(len(make_task_source(sys.argv[1])))", str(jsonl_path)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0 and res.stdout.strip() == "3", res.stderr[-2000:]
    assert "Generating" not in res.stderr and "examples/s" not in res.stderr, res.stderr[-2000:]


def test_file_source_jsonl_exact_and_numeric(jsonl_path):
    """A jsonl file scores exact (stripped) matches and numerically equal answers as 1."""
    s = make_task_source(str(jsonl_path))
    assert isinstance(s, FileSource) and s.name == "file:qa.jsonl" and len(s) == 3
    by_q = {it.question: it for it in s.sample(3, 0)}
    assert len(by_q) == 3
    four, paris, half = by_q["What is 2+2?"], by_q["Capital of France?"], by_q["Half of 1?"]
    assert four.task == "file:qa.jsonl" and four.seed == 0 and four.answer == "4"
    assert four.metadata == {"level": 1}
    assert s.score(four, "<answer> 4.0 </answer>") == 1.0
    assert s.score(four, "<answer>4.0000001</answer>") == 1.0
    assert s.score(four, "<answer>4.01</answer>") == 0.0
    assert s.score(half, "<answer>.5</answer>") == 1.0
    assert s.score(paris, "<answer>Paris</answer>") == 1.0
    assert s.score(paris, "<answer>paris</answer>") == 0.0
    assert s.score(paris, "Paris") == 0.0
    assert s.score(TaskItem("file:qa.jsonl", 0, 0, "q", None), "<answer>x</answer>") == 0.0


def test_file_source_sampling_and_check(jsonl_path):
    """File sampling is deterministic; check regenerates rows and rejects bad provenance."""
    s = make_task_source(str(jsonl_path))
    assert s.sample(10, 7) == s.sample(10, 7)
    assert all(0 <= it.index < 3 for it in s.sample(10, 7))
    it = s.sample(1, 1)[0]
    assert s.check(it.task, 0, it.index, it.question, it.answer) == it
    for claim in [
        ("file:other.jsonl", 0, it.index, it.question, it.answer),
        (it.task, 1, it.index, it.question, it.answer),
        (it.task, 0, 3, it.question, it.answer),
        (it.task, 0, -1, it.question, it.answer),
        (it.task, 0, it.index, "forged", it.answer),
        (it.task, 0, it.index, it.question, "forged"),
    ]:
        with pytest.raises(Rejected):
            s.check(*claim)


def test_file_source_csv_keeps_text(tmp_path):
    """CSV answers stay text as written ("007"), and numeric matching still applies."""
    p = tmp_path / "qa.csv"
    p.write_text('question,answer\nAgent?,007\n"Sum, please: 1+2",3\n')
    s = make_task_source(str(p))
    items = {it.question: it for it in s.sample(2, 0)}
    agent = items["Agent?"]
    assert agent.answer == "007"
    assert s.score(agent, "<answer>007</answer>") == 1.0
    assert s.score(agent, "<answer>7</answer>") == 1.0  # numerically equal
    assert s.score(items["Sum, please: 1+2"], "<answer>3</answer>") == 1.0


def test_file_source_errors(tmp_path):
    """Missing columns, missing files, empty files and unknown suffixes raise a clear ValueError."""
    p = tmp_path / "noanswer.jsonl"
    p.write_text(json.dumps({"question": "q", "solution": "a"}) + "\n")
    with pytest.raises(ValueError, match="answer"):
        make_task_source(str(p))
    with pytest.raises(ValueError, match="not found"):
        make_task_source(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="not found"):
        make_task_source("no/such/dir/questions.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError):
        make_task_source(str(tmp_path / "empty.csv"))
    (tmp_path / "q.txt").write_text("question,answer\n")
    with pytest.raises(ValueError, match="unsupported"):
        make_task_source(str(tmp_path / "q.txt"))


# --- jsonable and property tests -------------------------------------------------------

_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()
    | st.decimals(allow_nan=True)
    | st.fractions()
    | st.complex_numbers()
    | st.binary()
)
_hashable = st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.tuples(st.integers(), st.text())
_values = st.recursive(
    _leaves,
    lambda inner: st.lists(inner, max_size=4)
    | st.tuples(inner, inner)
    | st.sets(_hashable, max_size=4)
    | st.frozensets(st.integers(), max_size=4)
    | st.dictionaries(_hashable, inner, max_size=4),
    max_leaves=20,
)


@given(_values)
@settings(max_examples=300, deadline=None)
def test_jsonable_output_is_strict_json(value):
    """jsonable(x) always survives json.dumps(allow_nan=False) and is a fixed point."""
    out = jsonable(value)
    text = json.dumps(out, allow_nan=False)
    assert jsonable(out) == out
    assert json.loads(text) == out


def test_jsonable_examples():
    """Tuples become lists, sets sorted lists, non-finite floats None, keys and odd objects str."""
    assert jsonable({"t": (1, 2), "s": {3, 1, 2}, "n": math.nan, 5: math.inf, "d": Decimal("1.5")}) == {
        "t": [1, 2],
        "s": [1, 2, 3],
        "n": None,
        "5": None,
        "d": "1.5",
    }
    assert jsonable(Fraction(1, 3)) == "1/3"
    loop: list = []
    loop.append(loop)
    json.dumps(jsonable(loop), allow_nan=False)


_claim_task = st.sampled_from(DEFAULT_TASKS) | st.text(max_size=20)
_claim_seed = st.integers(min_value=-5, max_value=50) | st.integers(min_value=-(2**70), max_value=2**70)
_claim_index = st.integers(min_value=-3, max_value=40) | st.integers(min_value=-(2**70), max_value=2**70)


@given(
    task=_claim_task,
    seed=_claim_seed | st.text(max_size=5) | st.none() | st.floats(),
    index=_claim_index | st.text(max_size=5) | st.booleans(),
    question=st.text(max_size=50) | st.none() | st.integers(),
    answer=st.none() | st.text(max_size=20) | st.integers(),
)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_check_only_ever_raises_rejected(src, task, seed, index, question, answer):
    """Arbitrary peer claims either check out or raise Rejected; nothing else escapes."""
    try:
        item = src.check(task, seed, index, question, answer)
    except Rejected as e:
        assert isinstance(e.reason, str) and e.reason
    else:
        assert (item.question, item.answer) == (question, answer)


def test_verifiers_that_eval_never_see_code(tmp_path):
    """A peer's answer is never executed by a verifier that evals (binary_matrix); literals still score."""
    from sapod.tasks import make_task_source

    src = make_task_source("binary_matrix")
    item = src.sample(1, 5)[0]
    marker = tmp_path / "pwned"
    attack = f"<answer>__import__('pathlib').Path({str(marker)!r}).write_text('x')</answer>"
    assert src.score(item, attack) == 0.0
    assert not marker.exists()
    assert src.score(item, f"<answer>{item.answer}</answer>") == 1.0
    as_list = repr([[int(x) for x in row.split()] for row in item.answer.splitlines()])
    assert src.score(item, f"<answer>{as_list}</answer>") == 0.1  # the verifier's partial credit for a list


def test_a_task_file_is_read_once_per_process_until_it_changes(jsonl_path, monkeypatch):
    """Nodes of one process share a task file's rows; a file changed on disk is read again."""
    import sapod.taskfile as tasks_mod

    reads = []
    real = tasks_mod._load_rows
    monkeypatch.setattr(tasks_mod, "_load_rows", lambda path, kind: reads.append(path) or real(path, kind))
    tasks_mod._file_rows.cache_clear()
    a, b = make_task_source(str(jsonl_path)), make_task_source(str(jsonl_path))
    assert len(reads) == 1 and a.sample(3, 0) == b.sample(3, 0)
    jsonl_path.write_text(jsonl_path.read_text() + json.dumps({"question": "1+1?", "answer": 2}) + "\n")
    c = make_task_source(str(jsonl_path))
    assert len(reads) == 2 and len(c) == 4 and len(a) == 3


def test_only_rejections_turns_any_error_of_a_check_into_a_rejection() -> None:
    from sapod.taskbase import only_rejections

    with pytest.raises(Rejected, match="^check failed: KeyError$") as caught:
        with only_rejections():
            {}["missing"]
    assert caught.value.__suppress_context__
    with pytest.raises(Rejected, match="^seed out of range$"):
        with only_rejections():
            raise Rejected("seed out of range")
    with pytest.raises(KeyboardInterrupt):  # not an error of the check: passes through
        with only_rejections():
            raise KeyboardInterrupt
    with only_rejections():
        value = 1
    assert value == 1


def test_task_spec_problem_says_what_a_node_could_not_use(tmp_path, monkeypatch):
    """The coordinator's check of a new run's TASKS, in a child process: sapod's own task sets and a
    task file that is not here are not checked (no child at all); bad names and files are."""
    good = tmp_path / "t.jsonl"
    good.write_text('{"question": "1+1?", "answer": "2"}\n')
    (tmp_path / "bad.jsonl").write_text("not json\n")
    assert tasks.task_spec_problem("basic_arithmetic,bf") is None
    assert tasks.task_spec_problem(str(good)) is None
    assert "unknown reasoning-gym task(s): nope" in tasks.task_spec_problem("nope")
    assert "cannot read task file" in tasks.task_spec_problem(str(tmp_path / "bad.jsonl"))

    def no_child(*args, **kwargs):
        raise AssertionError("no check needed")

    monkeypatch.setattr(tasks.subprocess, "run", no_child)
    for spec in (None, "", "default", "easy", str(tmp_path / "elsewhere.jsonl")):
        assert tasks.task_spec_problem(spec) is None
