"""``sapod:tiny``: a small GPT-2 built locally, because nodes may have no model hub.

The warm-up teaches the answer format, mostly on the easy mix (``TASKS=easy``, defined in
``sapod.mixes``): enough that it earns some reward there, little enough that GRPO has most of
it left to find. The build is deterministic (fixed seeds, fixed data order, fixed thread
count) and cached per ``TINY_VERSION``; bump the version whenever anything below changes the
result (the mix table included).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sapod.mixes import EASY, Overrides, thaw
from sapod.tasks import DEFAULT_TASKS

TINY_NAME = "sapod:tiny"
TINY_VERSION = 2

EOS = "<|endoftext|>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

VOCAB_SIZE = 1536
# n_positions: default prompts with the system prompt reach ~420 tokens, plus the completion.
# No dropout: it would make GRPO's old/new log-prob ratios noisy for no gain at this size.
MODEL = dict(n_layer=2, n_embd=128, n_head=4, n_positions=1024,
             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
SEED = 1234
WARMUP_STEPS = 256
BATCH = 16
LR = 3e-3
# Longer warm-up items are dropped rather than cut: a cut prompt is one generation never sees.
MAX_TRAIN_TOKENS = 384

EASY_ITEMS = 600
DEFAULT_ITEMS = 150
# (task, frozen config overrides, items). Mostly the easy mix (TASKS=easy), at the settings a
# swarm running it samples, so the model starts with some reward there and room to learn;
# a few items of each default task at its defaults so every default prompt shape is known.
WARMUP_MIX: tuple[tuple[str, Overrides, int], ...] = (
    *((task, overrides, EASY_ITEMS) for task, overrides in EASY),
    *((task, (), DEFAULT_ITEMS) for task in DEFAULT_TASKS),
)

Progress = Callable[[str, float], None]


def ensure_tiny(cache_dir: Path, *, progress: Progress | None = None) -> Path:
    """The directory of the built model, building it once per cache and version."""
    cache_dir = Path(cache_dir)
    target = cache_dir / f"tiny-v{TINY_VERSION}"
    if (target / "COMPLETE").exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir / "tiny.lock"):
        if (target / "COMPLETE").exists():  # another process built it while we waited
            return target
        tmp = cache_dir / f".tiny-v{TINY_VERSION}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            _build(tmp, progress or (lambda stage, fraction: None))
            (tmp / "COMPLETE").write_text(f"{TINY_NAME} v{TINY_VERSION}\n")
            if (target / "COMPLETE").exists():  # a builder outside our lock (other host) won
                return target
            if target.exists():  # a half-written leftover, never ours: replace it
                shutil.rmtree(target)
            try:
                os.replace(tmp, target)
            except OSError:  # non-empty target: only fine if that builder finished
                if not (target / "COMPLETE").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the atomic rename alone keeps the cache valid
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _items(task: str, overrides: Overrides, size: int, seed: int) -> list[dict[str, Any]]:
    import reasoning_gym

    # The bf interpreter prints program output on stdout; the node's stdout is not ours.
    with contextlib.redirect_stdout(io.StringIO()):
        return list(reasoning_gym.create_dataset(task, seed=seed, size=size, **thaw(overrides)))


def _gold(item: dict[str, Any]) -> str:
    # propositional_logic has no single answer; its metadata carries one valid conclusion.
    answer = item["answer"]
    return answer if answer is not None else item["metadata"]["example_answer"]


def _train_tokenizer(system_prompt: str) -> Any:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def corpus() -> Iterator[str]:
        yield from [system_prompt] * 20
        for i, task in enumerate(DEFAULT_TASKS):
            for item in _items(task, (), 300, seed=SEED + i):
                gold = _gold(item)
                yield f"Question: {item['question']}\nAnswer: {ANSWER_OPEN}{gold}{ANSWER_CLOSE}"
        for i, (task, overrides, _) in enumerate(WARMUP_MIX):
            for item in _items(task, overrides, 100, seed=SEED + 100 + i):
                yield f"{item['question']} {_gold(item)}"

    tok = Tokenizer(models.BPE())
    # One digit per token (a space may lead it): numbers stay compositional for arithmetic.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" ?\p{N}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    # Ordinary (non-special) added tokens: always one id, and kept by skip_special_tokens.
    tok.add_tokens([AddedToken(t, normalized=False) for t in (ANSWER_OPEN, ANSWER_CLOSE)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
        model_max_length=MODEL["n_positions"],
        clean_up_tokenization_spaces=False,
    )


def _warmup_examples(tokenizer: Any, system_prompt: str) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) pairs, tokenized apart exactly as generation will see them."""
    from sapod.prompts import format_prompt

    examples = []
    for i, (task, overrides, size) in enumerate(WARMUP_MIX):
        for item in _items(task, overrides, size, seed=SEED + 200 + i):
            prompt = tokenizer(format_prompt(tokenizer, item["question"], system_prompt))
            answer = tokenizer(f" {ANSWER_OPEN}{_gold(item)}{ANSWER_CLOSE}")
            p, a = prompt["input_ids"], answer["input_ids"] + [tokenizer.eos_token_id]
            if len(p) + len(a) <= MAX_TRAIN_TOKENS:
                examples.append((p, a))
    return examples


def _batches(examples: list, steps: int, gen: Any) -> Iterator[list]:
    """Shuffled batches of similar length: padding to the longest wastes a third of the time."""
    import torch

    order: list[int] = []
    while len(order) < steps * BATCH:
        order += torch.randperm(len(examples), generator=gen).tolist()
    order = order[: steps * BATCH]
    batches = []
    for w in range(0, len(order), BATCH * 8):
        chunk = sorted(order[w : w + BATCH * 8], key=lambda i: sum(map(len, examples[i])))
        batches += [chunk[b : b + BATCH] for b in range(0, len(chunk), BATCH)]
    for b in torch.randperm(len(batches), generator=gen).tolist():
        yield [examples[i] for i in batches[b]]


def _warmup(model: Any, examples: list, pad_id: int, progress: Progress) -> None:
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * max(0.1, 1 - s / WARMUP_STEPS)
    )
    model.train()
    for step, batch in enumerate(_batches(examples, WARMUP_STEPS, gen)):
        width = max(len(p) + len(a) for p, a in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        targets = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (p, a) in enumerate(batch):
            n = len(p) + len(a)
            ids[row, :n] = torch.tensor(p + a)
            targets[row, len(p) - 1 : n - 1] = torch.tensor(a)  # position t predicts token t+1
            mask[row, :n] = 1
        hidden = model.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
        # The LM head only where there is a target: prompt logits would be a third of the cost.
        sel = targets != -100
        loss = F.cross_entropy(model.lm_head(hidden[sel]), targets[sel])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        progress("warmup", (step + 1) / WARMUP_STEPS)
    model.eval()


def _build(directory: Path, progress: Progress) -> None:
    import torch
    from reasoning_gym.utils import SYSTEM_PROMPTS
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    system_prompt = SYSTEM_PROMPTS["default"]
    threads = torch.get_num_threads()
    # A fixed thread count keeps float reductions, hence the weights, identical per machine.
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    try:
        progress("tokenizer", 0.0)
        tokenizer = _train_tokenizer(system_prompt)
        progress("tokenizer", 1.0)

        progress("model", 0.0)
        eos = tokenizer.eos_token_id
        config = GPT2Config(
            vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
            **MODEL,
        )  # fmt: skip
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            model = GPT2LMHeadModel(config)
        model.generation_config.bos_token_id = eos
        model.generation_config.eos_token_id = eos
        model.generation_config.pad_token_id = eos
        examples = _warmup_examples(tokenizer, system_prompt)
        progress("model", 1.0)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            _warmup(model, examples, eos, progress)

        directory.mkdir(parents=True)
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # its tqdm bar would land on the node's stderr
        try:
            model.save_pretrained(directory)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        tokenizer.save_pretrained(directory)
        progress("save", 1.0)
    finally:
        torch.set_num_threads(threads)
