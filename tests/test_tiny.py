"""sapod:tiny: the locally built model, its cache, locking and determinism."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sapod.policy.tiny import TINY_VERSION, ensure_tiny

# A child process that builds with a short warm-up (the lock is under test, not the
# training) and reports whether it built or found the cache.
_CHILD = """
import json, sys
from pathlib import Path
from sapod.policy import tiny
tiny.WARMUP_STEPS = 4
calls = []
d = tiny.ensure_tiny(Path(sys.argv[1]), progress=lambda s, f: calls.append(s))
print(json.dumps({"dir": str(d), "built": bool(calls)}))
"""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tiny-cache")
    stages: list[tuple[str, float]] = []
    directory = ensure_tiny(cache, progress=lambda s, f: stages.append((s, f)))
    return cache, directory, stages


def test_complete_marker_short_circuits(tmp_path):
    """A directory with a COMPLETE marker is returned as is, without building."""
    target = tmp_path / f"tiny-v{TINY_VERSION}"
    target.mkdir()
    (target / "COMPLETE").write_text("x")
    assert ensure_tiny(tmp_path, progress=lambda s, f: pytest.fail("built")) == target


def test_warmup_trains_on_the_easy_mix():
    """The warm-up uses the swarm's easy mix at its own settings: one table, in sapod.mixes."""
    from sapod.mixes import MIXES
    from sapod.policy.tiny import WARMUP_MIX

    assert TINY_VERSION >= 2  # v1 caches predate the mix and must not be reused
    assert set(MIXES["easy"]) <= {(task, overrides) for task, overrides, _ in WARMUP_MIX}


@pytest.mark.slow
def test_build_loads_with_auto_classes(built):
    """The built directory loads with AutoModelForCausalLM/AutoTokenizer and reports progress."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache, directory, stages = built
    assert directory == cache / f"tiny-v{TINY_VERSION}"
    assert (directory / "COMPLETE").exists()
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert not getattr(tokenizer, "chat_template", None)
    assert model.config.eos_token_id == tokenizer.eos_token_id == tokenizer.pad_token_id
    assert model.config.n_positions == tokenizer.model_max_length
    assert len(tokenizer) <= model.config.vocab_size
    assert {s for s, _ in stages} >= {"tokenizer", "model", "warmup"}
    assert stages[-1][1] == 1.0


@pytest.mark.slow
def test_cached_call_is_fast(built):
    """A second call returns the cached directory quickly without calling progress."""
    cache, directory, _ = built
    start = time.monotonic()
    again = ensure_tiny(cache, progress=lambda s, f: pytest.fail("rebuilt"))
    assert again == directory
    assert time.monotonic() - start < 1.0


@pytest.mark.slow
def test_answer_tags_are_single_ordinary_tokens(built):
    """<answer> and </answer> are one token each and survive skip_special_tokens decoding."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built[1])
    for tag in ("<answer>", "</answer>"):
        ids = tokenizer.encode(tag, add_special_tokens=False)
        assert len(ids) == 1
        assert tokenizer.convert_ids_to_tokens(ids) == [tag]
    text = " <answer>3/4</answer>"
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


@pytest.mark.slow
def test_warmup_taught_answer_format(built):
    """After warm-up, sampled completions mostly contain a well-formed <answer>…</answer>."""
    import torch
    from reasoning_gym.utils import SYSTEM_PROMPTS, extract_answer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sapod.prompts import format_prompt

    model = AutoModelForCausalLM.from_pretrained(built[1]).eval()
    tokenizer = AutoTokenizer.from_pretrained(built[1])
    tokenizer.padding_side = "left"
    prompts = [
        format_prompt(tokenizer, q, SYSTEM_PROMPTS["default"])
        for q in ("Calculate 3 + 4.", "What day of the week was March 3, 2022?")
    ] * 4
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, temperature=1.0, max_new_tokens=64)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert sum(extract_answer(t) is not None for t in texts) >= len(texts) // 2


@pytest.mark.slow
def test_warmup_leaves_room_to_learn(built):
    """On TASKS=easy, sampled as a swarm samples (G=4, 48 new tokens, temperature 1), the warm-up
    model earns some reward but far from all, and many groups have unequal rewards (GRPO's signal)."""
    from sapod.policy.hf import HFPolicy
    from sapod.tasks import make_task_source

    src = make_task_source("easy")
    policy = HFPolicy(str(built[1]), system_prompt=src.system_prompt, max_new_tokens=48, device="cpu")
    items = src.sample(64, 2024)
    gen = policy.generate(items, 4, seed=2024)
    rewards = [[src.score(it, c) for c in comps] for it, comps in zip(items, gen.completions)]
    mean = sum(map(sum, rewards)) / (4 * len(items))
    assert 0.05 <= mean <= 0.30, mean
    assert sum(len(set(r)) > 1 for r in rewards) >= len(items) // 4


@pytest.mark.slow
def test_concurrent_builders_share_one_directory(tmp_path):
    """Two processes calling ensure_tiny at once end with one complete directory, built once."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = []
    for proc in procs:
        stdout, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    target = tmp_path / f"tiny-v{TINY_VERSION}"
    assert [r["dir"] for r in results] == [str(target)] * 2
    assert sum(r["built"] for r in results) == 1
    assert (target / "COMPLETE").exists() and (target / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name, "tiny.lock"]


@pytest.mark.slow
def test_build_is_deterministic(built, tmp_path):
    """A second build in another directory gives byte-identical weights and tokenizer."""
    other = ensure_tiny(tmp_path)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _sha(other / name) == _sha(built[1] / name), name
