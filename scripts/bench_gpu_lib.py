"""Helpers of scripts/bench_gpu.py: the model shapes, building models with random weights (no hub),
a tokenizer trained on task text, device timing helpers and progress lines; and its shared_process
part (several compiled policies in one process)."""

from __future__ import annotations

import gc
import json
import shutil
import sys
import time
from pathlib import Path

import torch

SHAPES = {  # name -> (config class, full shape, smoke shape)
    "gpt2-124m": ("GPT2Config", dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
                  dict(n_layer=2, n_embd=64, n_head=2, vocab_size=512, n_positions=1024, bos_token_id=0,
                       eos_token_id=0)),
    "qwen2.5-0.5b": ("Qwen2Config", dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                                         tie_word_embeddings=True),
                     dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=128, vocab_size=512, tie_word_embeddings=True)),
}


def say(*parts) -> None:
    """One progress line on stderr per measured cell, so a run cut short still shows its figures."""
    print("bench_gpu:", *parts, file=sys.stderr, flush=True)


def err(exc: BaseException) -> dict:
    return {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}


def build(name: str, smoke: bool, dev, vocab: int | None = None):
    import transformers

    cls, full, tiny = SHAPES[name]
    kw = dict(tiny if smoke else full, **({"vocab_size": vocab} if vocab else {}))
    torch.manual_seed(0)
    with torch.device(dev):  # initialise on the device: random init of a 150k vocab is slow on CPU
        return transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**kw))


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak_gib(dev) -> float | None:
    """Peak GPU memory since the last ``free``, GiB (None off CUDA)."""
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None


def free(dev) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def make_tokenizer(vocab_size: int, corpus: list[str]):
    """A byte-level BPE (like sapod:tiny's) padded with filler tokens to exactly vocab_size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=min(vocab_size, 2048), special_tokens=[eos], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # A real-size vocab keeps the embedding and LM head at the model's shape; fillers are never
    # produced by encoding but decode to plain text, so the random model's samples stay valid.
    spec = json.loads(bpe.to_str())
    vocab, i = spec["model"]["vocab"], 0
    while len(vocab) < vocab_size:
        vocab.setdefault(f"Ġfill{i}", len(vocab))
        i += 1
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token=eos,
                                   pad_token=eos, model_max_length=1024, clean_up_tokenization_spaces=False)


def model_dir(a, folder: Path, name: str = "gpt2-124m", source=None) -> int:
    """A model of one of SHAPES with random weights and a BPE tokenizer trained on task text, saved
    as a model folder sapod loads by path (``source``'s prompts, the nine default tasks unless
    given). Its parameter count."""
    from sapod.tasks import make_task_source

    source = source or make_task_source("")
    tok = make_tokenizer(SHAPES[name][2 if a.smoke else 1]["vocab_size"],
                         [source.system_prompt] * 10 + [i.question for i in source.sample(200, 1)])
    model = build(name, a.smoke, "cpu", vocab=len(tok))
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = cfg.bos_token_id = cfg.pad_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def shared_process(a, dev) -> dict:
    """``--shared-nodes`` GPT-2-shaped policies with COMPILE_GENERATION=true in one process, as
    ``sapod experiment`` runs its nodes on one GPU thread: each generates I=2 x G=4 in turn for
    ``--shared-rounds`` rounds on new questions. Reports each call's seconds and how many graphs
    dynamo compiled for all of them (instances of one model class share compiled graphs)."""
    import statistics
    import tempfile

    import torch._dynamo
    from torch._dynamo.utils import counters

    from sapod.policy.hf import HFPolicy
    from sapod.tasks import make_task_source

    torch._dynamo.reset()
    counters.clear()
    source, tmp = make_task_source(""), Path(tempfile.mkdtemp(prefix="sapod-bench-"))
    try:
        model_dir(a, tmp, "gpt2-124m", source)
        policies = [HFPolicy(str(tmp), system_prompt=source.system_prompt, max_new_tokens=a.new_tokens,
                             device=str(dev), compile_generation=True) for _ in range(a.shared_nodes)]
        secs = []
        for r in range(a.shared_rounds):
            for k, policy in enumerate(policies):
                sync(dev)
                t0 = time.perf_counter()
                policy.generate(source.sample(2, 1000 + 10 * r + k), 4, seed=r)
                sync(dev)
                secs.append(time.perf_counter() - t0)
                say("shared process", f"round {r} node {k}: generate {secs[-1]:.2f} s",
                    "(static cache)" if policy.compile_generation else "(fell back to the dynamic cache)")
        res = {"nodes": a.shared_nodes, "rounds": a.shared_rounds, "generate_s": secs,
               "median_s": statistics.median(secs), "max_s": max(secs),
               "graphs_compiled": int(counters["stats"].get("unique_graphs", 0)),
               "all_still_static": all(p.compile_generation for p in policies),
               "recompile_limit": torch._dynamo.config.recompile_limit, "peak_mem_gib": peak_gib(dev)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    policies = None
    free(dev)
    return res
