"""A Policy over any transformers causal LM (hub id or local directory), trained with GRPO.

torch and transformers are imported here only: this module is imported by workers alone.

Departures from textbook GRPO beyond those listed in ``sapod.grpo``:

1. One gradient step per round on freshly generated data (mu = 1), so
   ``old_logp = logp.detach()``: the ratio is exactly 1, clipping never fires and the
   update is the plain token-level policy gradient. Completions shared by other nodes were
   sampled by *their* models, yet are trained on as if on-policy, with no importance
   correction (SAPO's choice).
2. Completions arrive as text and are re-tokenized with this node's tokenizer, truncated to
   ``max_new_tokens``, so the tokens trained on may differ from the ones sampled. A
   completion that ended with an end-of-sequence token (``Group.finished``; carried in the
   rollouts file for peers' completions) gets this node's eos (the tokenizer's) appended
   and trained on like its text, as TRL trains the eos of completions that end with one, so
   the model learns when to stop; one that ran into the token limit gets none. The eos is
   not appended where the re-tokenized text already fills ``max_new_tokens`` (it would
   follow cut text), and it is the tokenizer's eos whichever of the model's eos ids ended
   the sample.
3. Groups whose rewards are all equal are dropped before the forward pass; they would add
   zero gradient but would count in the token normaliser.
4. Sampling uses temperature/top_p and disables the checkpoint's top_k (and a repetition
   penalty, if any); log-probs for training (and the reference's) are taken at the sampling
   temperature, ``log_softmax(logits / T)`` as in TRL, but without top_p's truncation.
5. With ``beta > 0`` the reference model is a frozen copy of the weights loaded at
   construction (the base model); ``load`` does not replace it.
6. A step whose gradient norm is not finite is not applied (gradients are dropped).
7. Dropout is off in training too (the model stays in eval mode), as TRL's
   ``disable_dropout`` does.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import DynamicCache

from sapod.advantages import group_advantages, has_signal
from sapod.errors import ConfigError
from sapod.grpo import CLIP_HIGH, CLIP_LOW, LossStats, completion_logprobs, token_loss
from sapod.logs import get_logger
from sapod.policy.hfload import load_pretrained, load_weights, one_line, padding_warning_off
from sapod.prompts import format_prompt
from sapod.types import Generation, Group, TaskItem

# With a static KV cache, prompts are left-padded to a multiple of this many tokens, so the
# cache's shape, and the compiled decoding graph with it, repeats from round to round.
STATIC_BUCKET = 64


class HFPolicy:
    """GRPO on a transformers causal LM.

    ``compile_generation`` decodes with a static KV cache, which transformers compiles
    (torch.compile, CUDA graphs) on CUDA; on other devices the static cache runs
    uncompiled. Prompts are then left-padded to a multiple of ``STATIC_BUCKET`` tokens and
    encoded once per sample (no shared prefill); the samples are the same as without it for
    the same seed. The first call at each padded length compiles. ``"auto"``: on CUDA, for a
    model that takes a static cache. After a compiled call fails, the policy goes without.
    """

    def __init__(
        self,
        model_name_or_path: str,
        *,
        system_prompt: str,
        max_new_tokens: int = 256,
        learning_rate: float = 1e-6,
        temperature: float = 1.0,
        top_p: float = 1.0,
        clip_low: float = CLIP_LOW,
        clip_high: float = CLIP_HIGH,
        beta: float = 0.0,
        max_grad_norm: float = 1.0,
        micro_batch_size: int = 8,
        device: str | None = None,
        name: str | None = None,
        compile_generation: bool | str = False,
    ):
        if max_new_tokens < 1 or micro_batch_size < 1 or temperature <= 0 or not 0 < top_p <= 1:
            raise ConfigError(
                "need max_new_tokens >= 1, micro_batch_size >= 1, temperature > 0, 0 < top_p <= 1"
            )
        if compile_generation not in (True, False, "auto"):
            raise ConfigError(f"compile_generation must be True, False or 'auto', not {compile_generation!r}")
        self.name = name or model_name_or_path
        self.system_prompt = system_prompt
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_p = temperature, top_p
        self.clip_low, self.clip_high, self.beta = clip_low, clip_high, beta
        self.max_grad_norm = max_grad_norm
        self.micro_batch_size = micro_batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.tokenizer, self.model = load_pretrained(model_name_or_path)
        tok = self.tokenizer
        self.model.to(self.device).eval()
        static_ok = (getattr(self.model, "_can_compile_fullgraph", False)
                     or getattr(self.model, "_supports_static_cache", False))
        if compile_generation is True and not static_ok:
            raise ConfigError(f"COMPILE_GENERATION: {type(self.model).__name__} ({model_name_or_path}) does not "
                              "support a static KV cache in this transformers version")
        if compile_generation == "auto":  # only where it is compiled: uncompiled, a static cache is slower
            compile_generation = static_ok and self.device.type == "cuda"
        self.compile_generation = bool(compile_generation)

        cfg = self.model.config
        max_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        self._max_prompt = max_pos - max_new_tokens if max_pos else None
        if self._max_prompt is not None and self._max_prompt < 1:
            raise ConfigError(
                f"max_new_tokens={max_new_tokens} leaves no room for a prompt ({max_pos} positions)"
            )
        # chat templates carry their own BOS; tokenizing them with special tokens would double it
        self._add_special = not getattr(tok, "chat_template", None)
        eos = self.model.generation_config.eos_token_id
        eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        self._eos_ids = sorted({i for i in [*eos, tok.eos_token_id] if i is not None})
        # appended to finished completions in training (None: no eos known, nothing appended)
        self._stop_id = tok.eos_token_id if tok.eos_token_id is not None else next(
            (i for i in eos if i is not None), None)
        self._keep_arg = "logits_to_keep" in inspect.signature(self.model.forward).parameters

        self.learning_rate = learning_rate
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=learning_rate)
        self._ref = None
        if beta > 0:
            self._ref = copy.deepcopy(self.model).eval().requires_grad_(False)

    # -- helpers -------------------------------------------------------------------------

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _prompt_kwargs(self) -> dict:
        kw = {"add_special_tokens": self._add_special}
        if self._max_prompt is not None:
            kw.update(truncation=True, max_length=self._max_prompt)
        return kw

    def _prompt(self, question: str) -> str:
        return format_prompt(self.tokenizer, question, self.system_prompt)

    def _is_eos(self, new: torch.Tensor) -> torch.Tensor:
        return torch.isin(new, torch.tensor(self._eos_ids, dtype=new.dtype, device=new.device))

    def _lengths(self, new: torch.Tensor) -> torch.Tensor:
        """Generated tokens per row: up to and including the first eos, else the non-pad ones."""
        is_eos = self._is_eos(new)
        first = is_eos.int().argmax(dim=1)
        non_pad = (new != self.tokenizer.pad_token_id).sum(dim=1)
        return torch.where(is_eos.any(dim=1), first + 1, non_pad)

    def _finished(self, new: torch.Tensor) -> list[bool]:
        """Per row: whether it ended with an eos rather than at ``max_new_tokens``. generate
        stops a row at its first eos and pads it after, so any eos in a row is its end (a
        pad equal to an eos only ever follows one)."""
        return self._is_eos(new).any(dim=1).tolist()

    def _shared_prefill(self, enc, g: int) -> dict:
        """Inputs for one generate call over I prompts x G samples that encodes each prompt once.

        ``num_return_sequences`` would copy every prompt G times before the forward pass,
        so a long prompt would be encoded G times. Instead the prompts (all but their last
        token) go through the model once, the cache is repeated G times per row, and
        generate continues from it: the same samples for the same seed, at 1/G of the
        prompt cost. Models whose cache cannot be repeated fall back to plain copies.
        """
        ids, attn = enc["input_ids"], enc["attention_mask"]
        plain = {"input_ids": ids.repeat_interleave(g, 0), "attention_mask": attn.repeat_interleave(g, 0)}
        if ids.shape[1] < 2:
            return plain
        # transformers renamed ``past_key_values`` to ``cache``; take whichever this one has.
        name = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        try:
            cache = DynamicCache(config=self.model.config)
            positions = (attn.cumsum(-1) - 1).clamp(min=0)
            self.model(input_ids=ids[:, :-1], attention_mask=attn[:, :-1], position_ids=positions[:, :-1],
                       use_cache=True, **{name: cache})
            cache.batch_repeat_interleave(g)
        except (TypeError, ValueError, AttributeError, NotImplementedError):
            return plain
        return {**plain, name: cache}

    def _bucketed(self, enc, g: int) -> dict:
        """I x G rows for a static cache: each prompt copied G times, left-padded to a multiple
        of STATIC_BUCKET tokens (at most the longest prompt the model takes)."""
        ids, attn = enc["input_ids"], enc["attention_mask"]
        length = -(-ids.shape[1] // STATIC_BUCKET) * STATIC_BUCKET
        if self._max_prompt is not None:
            length = max(ids.shape[1], min(length, self._max_prompt))
        extra = length - ids.shape[1]
        ids = torch.nn.functional.pad(ids, (extra, 0), value=self.tokenizer.pad_token_id)
        attn = torch.nn.functional.pad(attn, (extra, 0), value=0)
        return {"input_ids": ids.repeat_interleave(g, 0), "attention_mask": attn.repeat_interleave(g, 0)}

    # -- Policy --------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, items: Sequence[TaskItem], num_generations: int, seed: int) -> Generation:
        if not items or num_generations < 1:
            return Generation(completions=[[] for _ in items], tokens=0)
        prompts = [self._prompt(item.question) for item in items]
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, **self._prompt_kwargs()).to(self.device)
        self.model.eval()
        if self.compile_generation:
            inputs = self._bucketed(enc, num_generations)
            try:
                out = self._sample(inputs, seed, cache_implementation="static")
            except Exception as exc:  # a compiler or CUDA-graph failure must not end a days-long run
                self.compile_generation = False
                torch._dynamo.reset()
                get_logger().warning("compile_generation_failed", error=f"{type(exc).__name__}: {one_line(exc)[:300]}",
                                     detail="generating without a static cache from now on")
        if not self.compile_generation:
            inputs = self._shared_prefill(enc, num_generations)
            out = self._sample(inputs, seed)
        new = out[:, inputs["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        rows = [slice(i * num_generations, (i + 1) * num_generations) for i in range(len(items))]
        finished = self._finished(new)
        return Generation(completions=[texts[r] for r in rows], tokens=int(self._lengths(new).sum()),
                          finished=[finished[r] for r in rows])

    def _sample(self, inputs: dict, seed: int, **extra) -> torch.Tensor:
        # Global seeding is safe: a process's nodes all generate on one executor thread.
        torch.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed_all(seed)
        # No autocast, unlike training: decoding a few rows is bound by kernel launches, which
        # autocast's casts add to (README, Performance: fp32 + TF32 against bf16 autocast).
        with padding_warning_off():
            return self.model.generate(
                **inputs, **extra, do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=0,
                repetition_penalty=1.0, max_new_tokens=self.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self._eos_ids,
            )

    def train_step(self, groups: Sequence[Group]) -> dict[str, float]:
        seqs: list[tuple[list[int], list[int], float]] = []  # prompt ids, completion ids, advantage
        used = 0
        for group in groups:
            if not len(group.completions) == len(group.rewards) == len(group.finished):
                raise ValueError("group has a different number of completions, rewards and finished flags")
            if not has_signal(group.rewards):
                continue
            used += 1
            prompt_text = self._prompt(group.item.question)
            prompt = self.tokenizer(prompt_text, **self._prompt_kwargs())["input_ids"]
            for text, adv, done in zip(group.completions, group_advantages(group.rewards), group.finished):
                # split_special_tokens: a literal "<|im_end|>" in the text is text (it was decoded
                # without special tokens), not the control token
                ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
                if done and self._stop_id is not None and len(ids) < self.max_new_tokens:
                    ids = [*ids, self._stop_id]  # its stop is trained on too (the mask, not the id, says so)
                ids = ids[: self.max_new_tokens]
                if ids:
                    seqs.append((prompt, ids, adv))
        total = sum(len(c) for _, c, _ in seqs)
        if total == 0:
            return {"loss": 0.0, "grad_norm": 0.0, "tokens": 0, "clip_frac": 0.0, "groups": used}

        # similar lengths share a micro-batch: less padding
        seqs.sort(key=lambda s: len(s[0]) + len(s[1]))
        stats, loss_sum = LossStats(), 0.0
        # The model stays in eval mode: dropout (GPT-2 ships 0.1) would make the log-probs
        # trained on differ from those of the policy that sampled, and the KL to the
        # reference nonzero before any update.
        for start in range(0, len(seqs), self.micro_batch_size):
            # every micro-batch divides by the step's token count, so summed gradients
            # equal those of one big batch
            loss, st = self._micro_batch_loss(seqs[start : start + self.micro_batch_size], total)
            loss.backward()
            loss_sum += float(loss.detach())
            stats = stats + st
        params = self.model.parameters()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))
        if math.isfinite(grad_norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        out = {
            "loss": loss_sum,
            "grad_norm": grad_norm,
            "tokens": total,
            "clip_frac": stats.clip_frac,
            "groups": used,
        }
        if self.beta > 0:
            out["kl"] = stats.kl
        return out

    def _micro_batch_loss(self, batch, normalizer: int) -> tuple[torch.Tensor, LossStats]:
        # Prompts left-padded, completions right-padded: every completion starts at column P,
        # so the logits we need are one contiguous block of C positions.
        p_len = max(len(p) for p, _, _ in batch)
        c_len = max(len(c) for _, c, _ in batch)
        rows = len(batch)
        ids = torch.full((rows, p_len + c_len), self.tokenizer.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        mask = torch.zeros(rows, c_len)
        for r, (p, c, _) in enumerate(batch):
            ids[r, p_len - len(p) : p_len] = torch.tensor(p)
            ids[r, p_len : p_len + len(c)] = torch.tensor(c)
            attn[r, p_len - len(p) : p_len + len(c)] = 1
            mask[r, : len(c)] = 1
        ids, attn, mask = ids.to(self.device), attn.to(self.device), mask.to(self.device)
        targets = ids[:, p_len:]
        adv = torch.tensor([a for _, _, a in batch], device=self.device)

        logp = self._logprobs(self.model, ids, attn, targets, mask, c_len)
        ref = None
        if self._ref is not None:
            with torch.no_grad():
                ref = self._logprobs(self._ref, ids, attn, targets, mask, c_len)
        return token_loss(
            logp, logp.detach(), adv, mask, self.clip_low, self.clip_high,
            beta=self.beta, ref_logp=ref, normalizer=normalizer,
        )

    def _logprobs(self, model, ids, attn, targets, mask, c_len: int) -> torch.Tensor:
        inputs, attn_in = ids[:, :-1], attn[:, :-1]  # the last column predicts nothing we train on
        # positions as generate assigns them under left padding
        pos = (attn_in.cumsum(-1) - 1).clamp(min=0)
        kw = {"logits_to_keep": c_len} if self._keep_arg else {}
        with self._autocast():
            logits = model(input_ids=inputs, attention_mask=attn_in, position_ids=pos, **kw).logits
        return completion_logprobs(logits[:, -c_len:], targets, mask, temperature=self.temperature)

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        self.model.save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)
        torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")

    def load(self, directory: Path) -> None:
        """Weights from the directory's safetensors; optimizer state if optimizer.pt exists.

        The learning rate stays the configured one, not the one saved with the optimizer,
        so a node restarted with a new LEARNING_RATE uses it."""
        directory = Path(directory)
        load_weights(self.model, directory)
        opt = directory / "optimizer.pt"
        if opt.exists():
            # onto the CPU: Adam moves its moments to each parameter's device but leaves the step
            # counts where they load, and counts on a GPU cost a device sync per tensor per step
            self.optimizer.load_state_dict(torch.load(opt, map_location="cpu", weights_only=True))
            for group in self.optimizer.param_groups:
                group["lr"] = self.learning_rate

    def weights_fingerprint(self) -> str:
        """sha256 over parameter names and bytes, in module order."""
        h = hashlib.sha256()
        for name, p in self.model.named_parameters():
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

