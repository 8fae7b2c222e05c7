"""The GRPO loss as pure functions over tensors: no model, no I/O.

Departures from textbook GRPO (DeepSeekMath, Shao et al. 2024, outcome supervision):

1. Token-level normalisation (DAPO): the loss is the sum over every completion token of
   the batch divided by the total number of completion tokens, not the mean over tokens
   of each completion followed by the mean over completions. Long completions therefore
   weigh in proportion to their length. ``normalizer`` lets a caller that splits a step
   into micro-batches divide by the token count of the whole step.
2. Asymmetric clipping ("clip-higher", DAPO): the ratio is clamped to
   ``[1 - clip_low, 1 + clip_high]`` with defaults 0.2 / 0.28 instead of a symmetric ε.
3. No KL penalty by default (``beta = 0.0``), hence no reference model. With ``beta > 0``
   the textbook k3 estimator ``exp(ref - logp) - (ref - logp) - 1`` is added per token.
   The KL term is added to the per-token loss and normalised with it (as in DAPO/TRL),
   rather than inside a per-sequence mean.
4. Advantages come from ``sapod.advantages.group_advantages``: ``(r - mean) / (std + 1e-4)``
   with the *population* std (the paper does not say which std, nor adds an eps). A group
   whose rewards are all equal gets all-zero advantages and so no gradient.
5. Log-probs are those of the sampling temperature, ``log_softmax(logits / T)`` (as TRL does),
   so the gradient is the policy gradient of the distribution sampled from; top-p is not
   folded in (nor is it in TRL).

How a policy uses these (one update per round, so ``old_logp = logp.detach()``) is
documented in ``sapod.policy.hf``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sapod.advantages import group_advantages

CLIP_LOW = 0.2
CLIP_HIGH = 0.28


@dataclass(frozen=True)
class LossStats:
    """Counts that add up across micro-batches; ratios are derived at the end."""

    tokens: int = 0  # completion tokens (mask sum)
    clipped: int = 0  # tokens whose clipped term won the min, so they carry no gradient
    kl_sum: float = 0.0  # sum of per-token k3 (0 when beta == 0)

    def __add__(self, other: LossStats) -> LossStats:
        return LossStats(
            self.tokens + other.tokens, self.clipped + other.clipped, self.kl_sum + other.kl_sum
        )

    @property
    def clip_frac(self) -> float:
        return self.clipped / self.tokens if self.tokens else 0.0

    @property
    def kl(self) -> float:
        return self.kl_sum / self.tokens if self.tokens else 0.0


def sequence_advantages(rewards_per_group: Sequence[Sequence[float]]) -> torch.Tensor:
    """Group-relative advantages of every completion, groups concatenated: shape [sum(G)]."""
    flat = [a for rewards in rewards_per_group for a in group_advantages(rewards)]
    return torch.tensor(flat, dtype=torch.float32)


def completion_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    chunk: int = 1024,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log softmax(logits / temperature) at the target per position, shape of ``targets``;
    0 where ``mask`` is 0. In fp32 (float64 for float64 logits).

    ``logits[..., t, :]`` must already be the prediction for ``targets[..., t]`` (shifted).
    Only rows under the mask are computed, ``chunk`` rows at a time, so at most one
    chunk is upcast to fp32 at once instead of a full fp32 [batch, seq, vocab] copy next
    to its log_softmax, in backward too (``_ChunkedLogprobs``). ``logit - logsumexp``
    equals log_softmax gathered at the target.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, not {temperature!r}")
    vocab = logits.size(-1)
    rows = logits.reshape(-1, vocab)
    tgt = targets.reshape(-1)
    keep = None
    if mask is not None:
        keep = mask.reshape(-1).bool()
        rows, tgt = rows[keep], tgt[keep]
    out = _ChunkedLogprobs.apply(rows, tgt, chunk, 1.0 / temperature)
    if keep is None:
        return out.view(targets.shape)
    full = out.new_zeros(keep.shape).masked_scatter(keep, out)
    return full.view(targets.shape)


class _ChunkedLogprobs(torch.autograd.Function):
    """``z[target] - logsumexp(z)`` per row for ``z = scale * logits``, upcast ``chunk`` rows at a time.

    Plain autograd would keep every chunk's fp32 copy for logsumexp's backward, so the
    whole fp32 array after all; here backward upcasts again, chunk by chunk, from the
    saved logits (gradient: scale * (one-hot(target) - softmax(z))). The compute dtype is
    fp32, or the input's if wider (float64 stays float64).
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, targets: torch.Tensor, chunk: int, scale: float) -> torch.Tensor:
        ctx.save_for_backward(rows, targets)
        ctx.chunk, ctx.scale = chunk, scale
        dtype = torch.promote_types(rows.dtype, torch.float32)
        out = torch.empty(rows.size(0), dtype=dtype, device=rows.device)
        for s in range(0, rows.size(0), chunk):
            block = rows[s : s + chunk].to(dtype)
            if scale != 1.0:
                block = block * scale
            out[s : s + chunk] = block.gather(1, targets[s : s + chunk, None]).squeeze(1) - block.logsumexp(-1)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows, targets = ctx.saved_tensors
        scale = ctx.scale
        dtype = torch.promote_types(rows.dtype, torch.float32)
        out = torch.empty_like(rows)
        for s in range(0, rows.size(0), ctx.chunk):
            g = grad[s : s + ctx.chunk, None].to(dtype) * scale
            block = rows[s : s + ctx.chunk].to(dtype)
            if scale != 1.0:
                block = block * scale
            block = -torch.softmax(block, dim=-1) * g
            block.scatter_add_(1, targets[s : s + ctx.chunk, None], g)
            out[s : s + ctx.chunk] = block
        return out, None, None, None


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || ref): exp(ref - logp) - (ref - logp) - 1 >= 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = CLIP_LOW,
    clip_high: float = CLIP_HIGH,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    normalizer: float | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """Clipped-surrogate GRPO loss summed over masked tokens / ``normalizer``.

    ``logp``, ``old_logp``, ``mask`` (and ``ref_logp``): [batch, tokens]. ``advantages``:
    [batch] (broadcast to every token of its completion) or [batch, tokens].
    ``normalizer`` defaults to the masked token count of this batch.
    """
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype)
    if adv.dim() == logp.dim() - 1:
        adv = adv.unsqueeze(-1)
    ratio = torch.exp(logp - old_logp)
    clipped_ratio = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = -torch.min(ratio * adv, clipped_ratio * adv)
    kl_sum = 0.0
    if beta > 0.0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + beta * kl
        kl_sum = float((kl.detach() * mask).sum())
    tokens = int(mask.sum().item())
    denom = float(normalizer) if normalizer is not None else float(max(tokens, 1))
    loss = (per_token * mask).sum() / denom
    with torch.no_grad():
        # the min picks the clipped term (zero gradient) exactly in these two regions
        hit = ((ratio > 1.0 + clip_high) & (adv > 0)) | ((ratio < 1.0 - clip_low) & (adv < 0))
        clipped = int((hit.to(mask.dtype) * mask).sum().item())
    return loss, LossStats(tokens=tokens, clipped=clipped, kl_sum=kl_sum)
