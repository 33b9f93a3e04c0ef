"""oppo.py against naive loops written out here, plus the invariants of Eqs. (5)-(8), (12)."""

import math
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import oppo  # noqa: E402


def _batch(N=6, C=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(N, C, generator=g, dtype=dtype) * 3
    # ratios on both sides of the clip
    old = logp + 0.3 * torch.randn(N, C, generator=g, dtype=dtype)
    ref = logp + 0.5 * torch.randn(N, C, generator=g, dtype=dtype)
    adv = torch.randn(N, generator=g, dtype=dtype)
    lengths = torch.randint(1, C + 1, (N,), generator=g)
    lengths[0] = C
    mask = (torch.arange(C)[None, :] < lengths[:, None]).to(dtype)  # right padding, uneven lengths
    return logp, old, ref, adv, mask


# ---- Eq. (5)


def naive_advantages(rewards, G, scale_std=True, eps=1e-4):
    out = []
    for b in range(len(rewards) // G):
        group = [float(x) for x in rewards[b * G : (b + 1) * G]]
        mean = sum(group) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (G - 1)) if G > 1 else 0.0
        for x in group:
            if all(y == group[0] for y in group):
                out.append(0.0)
            else:
                out.append((x - mean) / (std + eps) if scale_std else x - mean)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("scale_std", [True, False])
def test_group_advantages_match_loop(scale_std):
    g = torch.Generator().manual_seed(1)
    rewards = torch.rand(20, generator=g, dtype=torch.float64)
    rewards[4:8] = 0.7  # one equal-reward group
    adv, metrics = oppo.group_advantages(rewards, G=4, scale_std=scale_std)
    assert_close(adv, naive_advantages(rewards, 4, scale_std))
    assert_close(adv.view(5, 4).sum(dim=1), torch.zeros(5, dtype=torch.float64))  # sum 0 per group
    assert_close(metrics["frac_reward_zero_std"], torch.tensor(0.2))
    # the Bessel-corrected std is torch.std's
    assert_close(metrics["reward_std"], rewards.view(5, 4).std(dim=1).mean())


def test_equal_rewards_give_exact_zero_never_nan():
    # eight format-only rewards of 0.1 (float32): their mean is not exactly 0.1, so r - mean is
    # rounding noise that the std division would blow up
    rewards = torch.tensor([0.1] * 8 + [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert not torch.equal(rewards[:8] - rewards[:8].mean(), torch.zeros(8))  # precondition
    adv, metrics = oppo.group_advantages(rewards, G=8)
    assert torch.equal(adv[:8], torch.zeros(8))
    assert adv[8] > 0 and adv[9] < 0
    assert metrics["frac_reward_zero_std"] == 0.5
    # G = 1: std undefined
    adv1, metrics1 = oppo.group_advantages(torch.tensor([0.0, 1.0, 2.0]), G=1)
    assert torch.equal(adv1, torch.zeros(3)) and metrics1["frac_reward_zero_std"] == 1.0
    advi, _ = oppo.group_advantages(torch.tensor([1, 1, 0, 1]), G=2)  # integer rewards
    assert advi.dtype == torch.float32 and advi[0] == 0 and advi[2] < 0 < advi[3]
    for m in (metrics, metrics1):
        assert all(torch.isfinite(v) for v in m.values())


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match="multiple of G"):
        oppo.group_advantages(torch.zeros(5), G=2)
    with pytest.raises(ValueError, match="NaN"):
        oppo.group_advantages(torch.tensor([0.0, float("nan")]), G=2)


# ---- Eqs. (6)-(8)


def naive_policy_loss(logp, old, ref, adv, mask, beta, eps_low, eps_high, agg):
    per_seq, total, count = [], 0.0, 0
    for i in range(logp.shape[0]):
        seq_total, seq_count = 0.0, 0
        for t in range(logp.shape[1]):
            if mask[i, t] == 0:
                continue
            ratio = torch.exp(logp[i, t] - old[i, t])
            unclipped = ratio * adv[i]
            lo, hi = ratio.new_tensor(1 - eps_low), ratio.new_tensor(1 + eps_high)
            clipped = min(max(ratio, lo), hi) * adv[i]
            term = -min(unclipped, clipped)
            if beta:
                diff = ref[i, t] - logp[i, t]
                term = term + beta * (torch.exp(diff) - diff - 1)
            seq_total, seq_count = seq_total + term, seq_count + 1
        total, count = total + seq_total, count + seq_count
        per_seq.append(seq_total / max(seq_count, 1))
    return total / count if agg == "token-mean" else sum(per_seq) / len(per_seq)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean"])
@pytest.mark.parametrize("beta", [0.04, 0.0])
def test_policy_loss_matches_loop(agg, beta):
    logp, old, ref, adv, mask = _batch()
    a = logp.clone().requires_grad_()
    loss, metrics = oppo.policy_loss(
        a, old, ref, adv, mask, beta=beta, eps_low=0.2, eps_high=0.28, agg=agg
    )
    loss.backward()
    b = logp.clone().requires_grad_()
    expected = naive_policy_loss(b, old, ref, adv, mask, beta, 0.2, 0.28, agg)
    expected.backward()
    assert_close(loss, expected)
    assert_close(a.grad, b.grad)
    n = mask.sum()
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    assert_close(metrics["kl"], (kl * mask).sum() / n)
    assert_close(metrics["entropy"], -(logp * mask).sum() / n)
    assert_close(metrics["ratio_mean"], (torch.exp(logp - old) * mask).sum() / n)
    pg_only = naive_policy_loss(logp, old, ref, adv, mask, 0.0, 0.2, 0.28, agg)
    assert_close(metrics["pg_loss"], pg_only)


def test_k3_invariants():
    g = torch.Generator().manual_seed(2)
    p, q = torch.randn(1000, generator=g) * 5, torch.randn(1000, generator=g) * 5
    assert (oppo.k3(q, p) >= 0).all()
    assert torch.equal(oppo.k3(p, p), torch.zeros(1000))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean"])
def test_ratio_one_gives_minus_advantage_times_weight(agg):
    logp, _, _, adv, mask = _batch(seed=3)
    x = logp.clone().requires_grad_()
    loss, metrics = oppo.policy_loss(x, None, None, adv, mask, beta=0.0, agg=agg)
    loss.backward()
    # each token's aggregation weight: 1 / all tokens, or 1 / (its sequence's tokens * N)
    weight = (
        mask / mask.sum()
        if agg == "token-mean"
        else mask / mask.sum(1, keepdim=True) / mask.shape[0]
    )
    assert_close(loss, -(adv[:, None] * weight).sum())
    assert_close(x.grad, -adv[:, None] * weight)  # d ratio / d logp = 1 at ratio 1
    assert metrics["ratio_mean"] == 1 and metrics["clip_ratio/region_mean"] == 0


def test_clipping_bites_exactly_where_it_should():
    eps_low, eps_high, d = 0.2, 0.28, 1e-6
    ratios = torch.tensor(
        [0.5, 0.8 - d, 0.8 + d, 1.0, 1.28 - d, 1.28 + d, 2.0], dtype=torch.float64
    )
    old = torch.zeros(2, 7, dtype=torch.float64)
    logp = ratios.log().repeat(2, 1).requires_grad_()
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.ones(2, 7, dtype=torch.float64)
    loss, metrics = oppo.policy_loss(
        logp, old, None, adv, mask, beta=0.0, eps_low=eps_low, eps_high=eps_high
    )
    loss.backward()
    # A > 0: only ratios above 1 + eps_high are clipped; A < 0: only ratios below 1 - eps_low
    bites = torch.tensor([[0, 0, 0, 0, 0, 1, 1], [1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    free_grad = -adv[:, None] * ratios[None, :] / 14  # d(-A r / n) / d logp
    assert_close(logp.grad, torch.where(bites, torch.zeros_like(free_grad), free_grad))
    assert_close(metrics["clip_ratio/high_mean"], torch.tensor(2 / 14, dtype=torch.float64))
    assert_close(metrics["clip_ratio/low_mean"], torch.tensor(2 / 14, dtype=torch.float64))
    assert_close(metrics["clip_ratio/region_mean"], torch.tensor(4 / 14, dtype=torch.float64))
    expected = (
        torch.where(bites, -adv[:, None] * ratios.clamp(0.8, 1.28), -adv[:, None] * ratios).sum()
        / 14
    )
    assert_close(loss, expected)
    # exactly at the boundaries both terms are equal and nothing counts as clipped
    at = torch.tensor([[1 - eps_low, 1 + eps_high]] * 2, dtype=torch.float64)
    pg, low, high = oppo.clipped_surrogate(
        at, torch.tensor([-1.0, 1.0], dtype=torch.float64), eps_low, eps_high
    )
    assert_close(pg, -torch.tensor([[-1.0], [1.0]], dtype=torch.float64) * at)
    assert not low.any() and not high.any()


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean"])
def test_padding_never_changes_the_loss(agg):
    logp, old, ref, adv, mask = _batch(seed=4)
    N, C = logp.shape
    garbage = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e4])
    pad = lambda x: torch.cat([x, garbage.to(x.dtype).repeat(N, 1)], dim=1)  # noqa: E731
    a = logp.clone().requires_grad_()
    loss_a, metrics_a = oppo.policy_loss(a, old, ref, adv, mask, agg=agg)
    loss_a.backward()
    b = pad(logp).requires_grad_()
    mask_b = torch.cat([mask, torch.zeros(N, 4, dtype=mask.dtype)], 1)
    loss_b, metrics_b = oppo.policy_loss(b, pad(old), pad(ref), adv, mask_b, agg=agg)
    loss_b.backward()
    assert_close(loss_a, loss_b)
    assert_close(a.grad, b.grad[:, :C])
    assert torch.equal(b.grad[:, C:], torch.zeros(N, 4, dtype=b.dtype))
    for k in metrics_a:
        assert_close(metrics_a[k], metrics_b[k])


def test_token_mean_and_seq_mean_differ_on_uneven_lengths():
    # with ratio 1 and no KL, pg_t = -A_i: sequences of 1 and 3 tokens with A = +1, -1
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 0, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, -1.0])
    token, _ = oppo.policy_loss(logp, None, None, adv, mask, beta=0.0, agg="token-mean")
    seq, _ = oppo.policy_loss(logp, None, None, adv, mask, beta=0.0, agg="seq-mean")
    assert_close(token, torch.tensor(-(1 * 1 + (-1) * 3) / 4))  # every token weighs 1/4: 0.5
    assert_close(seq, torch.tensor(-(1 + (-1)) / 2))  # every sequence weighs 1/2: 0


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean"])
def test_micro_batches_with_global_counts_sum_to_the_batch_loss(agg):
    logp, old, ref, adv, mask = _batch(N=8, seed=5)
    full = logp.clone().requires_grad_()
    loss_full, _ = oppo.policy_loss(full, old, ref, adv, mask, agg=agg)
    loss_full.backward()
    parts = logp.clone().requires_grad_()
    total = 0.0
    for rows in (slice(0, 3), slice(3, 8)):  # uneven micro-batches
        loss, _ = oppo.policy_loss(
            parts[rows],
            old[rows],
            ref[rows],
            adv[rows],
            mask[rows],
            agg=agg,
            num_tokens=mask.sum(),
            num_seqs=8,
        )
        loss.backward()
        total = total + loss.detach()
    assert_close(total, loss_full.detach())
    assert_close(parts.grad, full.grad)


def test_empty_mask_gives_zero_not_nan():
    logp = torch.randn(2, 3, requires_grad=True)
    for agg in ("token-mean", "seq-mean"):
        loss, metrics = oppo.policy_loss(
            logp, None, None, torch.ones(2), torch.zeros(2, 3), beta=0.0, agg=agg
        )
        assert loss == 0 and all(torch.isfinite(v) for v in metrics.values())


def test_policy_loss_bad_input():
    logp, old, ref, adv, mask = _batch()
    with pytest.raises(ValueError, match="ref_logp"):
        oppo.policy_loss(logp, old, None, adv, mask, beta=0.04)
    with pytest.raises(ValueError, match="`mask` has shape"):
        oppo.policy_loss(logp, old, ref, adv, mask[:, :2])
    with pytest.raises(ValueError, match="`adv` has shape"):
        oppo.policy_loss(logp, old, ref, adv[:2], mask)
    with pytest.raises(ValueError, match="agg"):
        oppo.policy_loss(logp, old, ref, adv, mask, agg="sum")


# ---- Eq. (12)


def test_total_loss():
    pg, op = torch.tensor(1.5), torch.tensor(-0.25)
    assert oppo.total_loss(pg, op) == 1.25
    assert oppo.total_loss(pg) is pg
