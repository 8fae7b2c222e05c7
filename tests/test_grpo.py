"""GRPO loss pieces against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from sapod.grpo import completion_logprobs, k3_kl, sequence_advantages, token_loss

A = 0.5 / (0.5 + 1e-4)  # advantage magnitude of rewards [1, 0]: mean 0.5, population std 0.5


def test_sequence_advantages_are_group_relative():
    """Advantages use each group's own mean and population std + 1e-4; flat groups give zeros."""
    adv = sequence_advantages([[1.0, 0.0], [2.0, 2.0, 2.0], [3.0, 1.0, 2.0, 2.0]])
    std3 = math.sqrt(0.5)  # rewards [3, 1, 2, 2]: mean 2, deviations 1, -1, 0, 0
    expected = [A, -A, 0.0, 0.0, 0.0, 1 / (std3 + 1e-4), -1 / (std3 + 1e-4), 0.0, 0.0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)


def test_loss_at_ratio_one_is_minus_token_weighted_advantage():
    """With logp == old_logp the loss is -sum(A over tokens) / tokens."""
    logp = torch.full((2, 3), -1.0)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = sequence_advantages([[1.0, 0.0]])
    loss, stats = token_loss(logp, logp, adv, mask)
    assert loss.item() == pytest.approx(-(2 * A - 3 * A) / 5, abs=1e-6)  # 0.19996
    assert stats.tokens == 5 and stats.clipped == 0 and stats.clip_frac == 0.0


def test_loss_inside_clip_range_uses_raw_ratio():
    """Ratios 1.1 (A=+1) and 0.9 (A=-1) lie inside [0.8, 1.28]: loss (2*-1.1 + 3*0.9)/5 = 0.1."""
    old = torch.zeros(2, 3)
    logp = torch.tensor([[math.log(1.1)] * 3, [math.log(0.9)] * 3])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss, stats = token_loss(logp, old, torch.tensor([1.0, -1.0]), mask)
    assert loss.item() == pytest.approx(0.1, abs=1e-6)
    assert stats.clipped == 0


def test_asymmetric_clipping_by_sign_of_advantage():
    """Ratio 1.5 with A>0 clips to 1.28, ratio 0.5 with A<0 clips to 0.8; the other two do not clip."""
    ratios = torch.tensor([1.5, 0.5, 0.5, 1.5])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    logp = ratios.log()[:, None].clone().requires_grad_(True)
    loss, stats = token_loss(logp, torch.zeros(4, 1), adv, torch.ones(4, 1))
    # per token: -1.28, -0.5 (min picks the raw 0.5), +0.8, +1.5 ; mean over 4 tokens
    assert loss.item() == pytest.approx((-1.28 - 0.5 + 0.8 + 1.5) / 4, abs=1e-6)
    assert stats.clipped == 2 and stats.clip_frac == 0.5
    loss.backward()
    # d/dlogp of -ratio*A/4 = -ratio*A/4 where unclipped, 0 where clipped
    assert logp.grad[:, 0].tolist() == pytest.approx([0.0, -0.125, 0.0, 0.375], abs=1e-6)


def test_clip_bounds_are_configurable():
    """clip_high=0.1 caps a positive-advantage ratio of 1.2 at 1.1."""
    logp = torch.tensor([[math.log(1.2)]])
    loss, stats = token_loss(logp, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1), 0.2, 0.1)
    assert loss.item() == pytest.approx(-1.1, abs=1e-6) and stats.clipped == 1


def test_masked_tokens_contribute_nothing():
    """Values under mask 0 change neither the loss nor receive gradient."""
    mask = torch.tensor([[1, 0, 0], [1, 1, 0]])
    adv = torch.tensor([1.0, -0.5])
    base = torch.tensor([[-1.0, -2.0, -3.0], [-1.5, -0.5, -2.0]])
    other = base.clone()
    other[mask == 0] = 5.0  # wildly different, still finite
    logp = other.clone().requires_grad_(True)
    loss_a, _ = token_loss(base, base - 0.1, adv, mask)
    loss_b, stats = token_loss(logp, base - 0.1, adv, mask)
    assert loss_b.item() == pytest.approx(loss_a.item(), abs=1e-7)
    loss_b.backward()
    assert torch.all(logp.grad[mask == 0] == 0) and stats.tokens == 3


def test_token_level_normalisation_weighs_long_completions_more():
    """Lengths 1 and 3 with A=+1/-1 give -(1 - 3)/4 = 0.5, where a per-sequence mean would give 0."""
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    loss, _ = token_loss(logp, logp, torch.tensor([1.0, -1.0]), mask)
    assert loss.item() == pytest.approx(0.5)


def test_normalizer_lets_micro_batches_sum_to_the_full_batch_loss():
    """Each micro-batch divided by the step's token count sums to the one-batch loss."""
    torch.manual_seed(0)
    logp, old = torch.randn(4, 5) * 0.1, torch.randn(4, 5) * 0.1
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    full, _ = token_loss(logp, old, adv, mask)
    parts = [token_loss(logp[i : i + 2], old[i : i + 2], adv[i : i + 2], mask[i : i + 2], normalizer=11)[0] for i in (0, 2)]
    assert sum(p.item() for p in parts) == pytest.approx(full.item(), abs=1e-6)


def test_per_token_advantages_are_accepted():
    """A [batch, tokens] advantage tensor is used as given instead of broadcast."""
    logp = torch.zeros(1, 2)
    loss, _ = token_loss(logp, logp, torch.tensor([[1.0, 3.0]]), torch.ones(1, 2))
    assert loss.item() == pytest.approx(-2.0)


def test_k3_kl_term_is_added_with_beta():
    """beta=0.1, logp=log .5, ref=log .25: k3 = 0.5 - ln 0.5 - 1 = 0.19315, loss = 0.1 * k3 at A=0."""
    logp = torch.full((1, 2), math.log(0.5))
    ref = torch.full((1, 2), math.log(0.25))
    k3 = 0.5 - math.log(0.5) - 1
    assert k3_kl(logp, ref)[0, 0].item() == pytest.approx(k3, abs=1e-6)
    loss, stats = token_loss(logp, logp, torch.zeros(1), torch.ones(1, 2), beta=0.1, ref_logp=ref)
    assert loss.item() == pytest.approx(0.1 * k3, abs=1e-6)
    assert stats.kl == pytest.approx(k3, abs=1e-6)
    loss0, _ = token_loss(logp, logp, torch.zeros(1), torch.ones(1, 2), beta=0.0, ref_logp=ref)
    assert loss0.item() == 0.0


def test_beta_without_reference_is_an_error():
    """beta > 0 without ref log-probs raises instead of silently dropping the KL term."""
    with pytest.raises(ValueError):
        token_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1), beta=0.1)


def test_chunked_logprobs_equal_naive_log_softmax_gather():
    """Chunked logit - logsumexp equals log_softmax + gather, values and gradients, masked or not."""
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    targets = torch.randint(0, 11, (3, 5))
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    naive = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    assert torch.allclose(completion_logprobs(logits, targets, chunk=4), naive, atol=1e-6)
    got = completion_logprobs(logits, targets, mask, chunk=2)
    assert torch.allclose(got, naive * mask, atol=1e-6)
    (g1,) = torch.autograd.grad((got * mask).sum(), logits)
    (g2,) = torch.autograd.grad((naive * mask).sum(), logits)
    assert torch.allclose(g1, g2, atol=1e-6)


def test_chunked_logprobs_upcast_half_precision_logits():
    """bf16 logits yield fp32 log-probs equal to the fp32 computation on the same values."""
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 7).to(torch.bfloat16)
    targets = torch.randint(0, 7, (2, 4))
    got = completion_logprobs(logits, targets, torch.ones(2, 4), chunk=3)
    naive = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None]).squeeze(-1)
    assert got.dtype == torch.float32 and torch.allclose(got, naive, atol=1e-6)


def test_chunked_logprobs_keep_no_fp32_copy_of_the_logits_for_backward():
    """Under autograd bf16 logits are upcast again in backward, not saved in fp32 per chunk."""
    torch.manual_seed(2)
    logits = torch.randn(8, 50, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 50, (8,))
    saved = []

    def pack(t):
        saved.append(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        got = completion_logprobs(logits, targets, torch.ones(8), chunk=3)
    assert saved and torch.float32 not in saved
    (grad,) = torch.autograd.grad(got.sum(), logits)
    wide = logits.detach().float().requires_grad_()
    (want,) = torch.autograd.grad(torch.log_softmax(wide, -1).gather(-1, targets[:, None]).sum(), wide)
    assert grad.dtype == torch.bfloat16 and torch.allclose(grad.float(), want, atol=1e-2)


def test_flat_groups_get_exactly_zero_advantages():
    """All-equal rewards give exactly 0.0, also for values like 0.1 whose float mean is off by an ulp
    (it gave -1.4e-13 for every completion: a same-signed push), and agree with has_signal."""
    from sapod.advantages import group_advantages, has_signal

    for rewards in ([0.1] * 3, [0.7] * 5, [1 / 3] * 7, [0.3], [1.0, 1.0 + 1e-12]):
        assert not has_signal(rewards)
        assert group_advantages(rewards) == [0.0] * len(rewards)
    adv = sequence_advantages([[0.1, 0.1, 0.1], [1.0, 0.0]])
    assert adv.dtype == torch.float32 and adv[:3].tolist() == [0.0, 0.0, 0.0]
    assert adv[3:].tolist() == pytest.approx([A, -A], abs=1e-6)


def test_chunked_logprobs_keep_float64_precision_and_pass_gradcheck():
    """float64 logits are computed in float64 (they were cut to fp32), so values match the plain
    log_softmax gather to 1e-12 and the custom backward passes torch.autograd.gradcheck."""
    torch.manual_seed(3)
    logits = torch.randn(3, 4, 9, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 9, (3, 4))
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 0, 1]])
    got = completion_logprobs(logits, targets, mask, chunk=2)
    naive = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1) * mask
    assert got.dtype == torch.float64 and torch.allclose(got, naive, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda x: completion_logprobs(x, targets, mask, chunk=2), (logits,))
    assert torch.autograd.gradcheck(lambda x: completion_logprobs(x, targets, mask, chunk=2, temperature=0.7),
                                    (logits,))


def test_chunked_logprobs_fold_the_sampling_temperature():
    """temperature T gives log softmax(logits / T) at the target, values and gradients (fp32 and bf16)."""
    torch.manual_seed(4)
    logits = torch.randn(2, 5, 13, requires_grad=True)
    targets = torch.randint(0, 13, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    got = completion_logprobs(logits, targets, mask, chunk=3, temperature=0.7)
    naive = torch.log_softmax(logits / 0.7, -1).gather(-1, targets[..., None]).squeeze(-1) * mask
    assert torch.allclose(got, naive, atol=1e-6)
    (g1,) = torch.autograd.grad(got.sum(), logits)
    (g2,) = torch.autograd.grad(naive.sum(), logits)
    assert torch.allclose(g1, g2, atol=1e-6)
    half = logits.detach().to(torch.bfloat16).requires_grad_()
    got_h = completion_logprobs(half, targets, mask, chunk=3, temperature=0.7)
    wide = half.detach().float().requires_grad_()
    want = torch.log_softmax(wide / 0.7, -1).gather(-1, targets[..., None]).squeeze(-1) * mask
    assert got_h.dtype == torch.float32 and torch.allclose(got_h, want, atol=1e-6)
    (gh,) = torch.autograd.grad(got_h.sum(), half)
    (gw,) = torch.autograd.grad(want.sum(), wide)
    assert gh.dtype == torch.bfloat16 and torch.allclose(gh.float(), gw, atol=1e-2)
