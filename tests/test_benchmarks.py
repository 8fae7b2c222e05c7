"""The benchmark scripts run end to end on tiny models and print their JSON; no timing assertions."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random one-layer GPT-2 with a small byte-level BPE trained here (no sapod:tiny build, no hub)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([f"Question: what is {a} plus {b}?\nAnswer: {a + b}" for a in range(20)
                             for b in range(20)], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=EOS)
    eos = tok.convert_tokens_to_ids(EOS)
    # n_positions covers the default tasks' long prompts (in a 400-token vocab) plus the completion
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=2048, vocab_size=len(tok),
                     bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bench-gpt2")
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run_script(*args: str, timeout: float) -> tuple[subprocess.CompletedProcess, dict]:
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res, json.loads(res.stdout.strip().splitlines()[-1])


def test_bench_generation_reports_both_ways_and_a_ratio(model_dir, tmp_path):
    """bench_generation.py exits 0 and its JSON has positive tokens/s for batched and sequential, and a ratio."""
    out = tmp_path / "gen.json"
    res, doc = run_script(str(SCRIPTS / "bench_generation.py"), "--model", str(model_dir), "--max-new-tokens", "8",
                          "--repeats", "1", "--json", str(out), timeout=180)
    assert json.loads(out.read_text()) == doc
    assert doc["benchmark"] == "generation" and doc["settings"]["items"] == 2 and doc["settings"]["generations"] == 4
    for way in ("batched", "sequential"):
        assert doc[way]["tokens_per_s"] > 0 and doc[way]["tokens"] > 0
    assert doc["batched"]["calls"] == 1 and doc["sequential"]["calls"] == 8
    assert doc["ratio"] > 0 and len(doc["ratios"]) == 1
    assert "ratio batched/sequential" in res.stdout


@pytest.mark.slow
def test_bench_gpu_smoke_runs_every_part_on_cpu(tmp_path):
    """bench_gpu.py --smoke exits 0 on CPU with generation, GRPO-step and swarm figures under the expected keys."""
    out = tmp_path / "gpu.json"
    res, doc = run_script(str(SCRIPTS / "bench_gpu.py"), "--smoke", "--workers", "2", "--json", str(out), timeout=400)
    assert doc["benchmark"] == "gpu" and doc["smoke"] is True and json.loads(out.read_text()) == doc
    # progress as it goes: a line per generation cell and GRPO step, one per swarm round
    assert re.search(r"bench_gpu: gpt2-124m fp32 b2 \d+ tok/s, warm-up [\d.]+ s", res.stderr), res.stderr[-2000:]
    assert re.search(r"bench_gpu: qwen2.5-0.5b grpo step fp32 [\d.]+ s", res.stderr)
    assert len(re.findall(r"bench_gpu: swarm round \d+ complete in [\d.]+ s", res.stderr)) == 2
    for model in ("gpt2-124m", "qwen2.5-0.5b"):
        gen = doc["generation"][model]
        assert set(gen) == {"fp32", "bf16_autocast", "bf16", "bf16_static_compile"}
        assert gen["fp32"]["b2"]["tokens_per_s"] > 0 and gen["fp32"]["b4"]["new_tokens_per_row"] == 16
        assert set(doc["grpo"][model]) == {"fp32", "bf16_autocast"}
        assert doc["grpo"][model]["fp32"]["seconds"] > 0
        for mode in ("compile_generation=false", "compile_generation=true"):  # sapod's node-round, both paths
            cell = doc["node_round"][model][mode]
            assert cell["generate_s"] > 0 and cell["train_s"] > 0 and cell["tokens_trained"] > 0, cell
            assert cell["node_round_s"] == pytest.approx(cell["generate_s"] + cell["train_s"])
            assert len(cell["generate_each_s"]) == 3 and cell["first_generate_s"] == cell["generate_each_s"][0]
    shared = doc["shared_process"]  # on a CPU nothing compiles; the part still runs every call
    assert shared["nodes"] == 4 and shared["rounds"] == 2 and len(shared["generate_s"]) == 8
    assert shared["graphs_compiled"] == 0 and shared["all_still_static"] is True and shared["median_s"] > 0
    assert len(re.findall(r"bench_gpu: shared process round \d node \d: generate [\d.]+ s \(static cache\)",
                          res.stderr)) == 8
    swarm = doc["swarm"]
    assert swarm["exit_codes"] == {"coordinator": 0, "w1": 0, "w2": 0}, swarm.get("stderr_tail")
    assert swarm["rounds_completed"] == 2 and swarm["median_s"] > 0 and swarm["p95_s"] >= swarm["median_s"]
    assert swarm["original_rl_swarm_s_per_round"] == 38.0 and swarm["compile_generation"] == "auto"


def test_bench_gpu_refuses_unknown_parts():
    """A misspelt part is an error (exit 2), not a run that measures nothing."""
    res = subprocess.run([sys.executable, str(SCRIPTS / "bench_gpu.py"), "--smoke", "--parts", "swram"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "unknown swram" in res.stderr


def test_bench_gpu_without_cuda_exits_2_with_a_message():
    """Without CUDA and without --smoke, bench_gpu.py exits 2 and says why."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    res = subprocess.run([sys.executable, str(SCRIPTS / "bench_gpu.py")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "no CUDA device" in res.stderr
