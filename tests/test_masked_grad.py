"""Form (b) of Eqs. (10)-(11), `--masked_grad`: the masked log-probs with gradient.

perception_loss.perception_loss against a naive loop (value and gradient into both branches,
the masked-branch entropy included), the sign of the masked branch's gradient, one
train.oppo_step on the tiny thinker whose masked passes reach the towers and the LM, and the
same update under FSDP2 on 2 processes (fsdp_masked_grad_worker.py).
"""

import unittest.mock
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from fsdp_masked_grad_worker import masked_grad_step
from torch.testing import assert_close
from train_runs import finish, torchrun

import batching
import config
import data
import model
import perception_loss as P
import train
from matcher import Matcher


def op_batch(N=6, C=7, seed=0):
    """Log-probs, masked log-probs, evidence masks and response mask, float64."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(N, C, generator=g, dtype=torch.float64) * 4
    mv = logp + torch.randn(N, C, generator=g, dtype=torch.float64)
    ma = logp + 2 * torch.randn(N, C, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, C + 1, (N,), generator=g)
    mask = (torch.arange(C)[None] < lengths[:, None]).double()
    e_v = (torch.rand(N, C, generator=g) < 0.4).double() * mask
    e_a = (torch.rand(N, C, generator=g) < 0.3).double() * mask * (1 - e_v)
    # a row without evidence of either modality: scored under neither masking
    e_v[0] = 0
    e_a[0] = 0
    return logp, mv, ma, e_v, e_a, mask


def naive_loss(logp, mv, ma, e_v, e_a, mask, gamma, eta, eta_masked, clamp):
    """L_op of form (b), token by token."""
    N, C = logp.shape
    loss = 0.0
    for masked, e in ((mv, e_v), (ma, e_a)):
        divergence = 0.0
        n_evidence = 0
        entropy = 0.0
        n_scored = 0
        for i in range(N):
            row_has_evidence = any(e[i, t] and mask[i, t] for t in range(C))
            for t in range(C):
                if not mask[i, t]:
                    continue
                if e[i, t]:
                    u = masked[i, t] - logp[i, t]
                    d = torch.exp(u) - u - 1
                    divergence = divergence + torch.clamp(d, max=clamp)
                    n_evidence += 1
                if row_has_evidence:
                    entropy = entropy - masked[i, t]
                    n_scored += 1
        loss = loss - gamma * divergence / max(n_evidence, 1)
        loss = loss + eta_masked * entropy / max(n_scored, 1)
    full_entropy = 0.0
    n_tokens = 0
    for i in range(N):
        for t in range(C):
            if mask[i, t]:
                full_entropy = full_entropy - logp[i, t]
                n_tokens += 1
    return loss + eta * full_entropy / n_tokens


def with_grad(*tensors):
    return [t.clone().requires_grad_() for t in tensors]


def test_value_and_gradient_into_both_branches_match_the_loop():
    logp, mv, ma, e_v, e_a, mask = op_batch()
    weights = dict(gamma=0.5, eta=0.3, clamp=1.0)
    x, v, a = with_grad(logp, mv, ma)
    loss, metrics = P.perception_loss(
        x, v, a, e_v, e_a, mask, masked_grad=True, eta_masked=0.2, **weights
    )
    loss.backward()
    x2, v2, a2 = with_grad(logp, mv, ma)
    expected = naive_loss(x2, v2, a2, e_v, e_a, mask, eta_masked=0.2, **weights)
    expected.backward()
    assert_close(loss, expected)
    for got, want in ((x, x2), (v, v2), (a, a2)):
        assert_close(got.grad, want.grad)
    # both branches, and both sides of the clamp, are exercised
    assert v.grad.abs().sum() > 0 and a.grad.abs().sum() > 0
    u = torch.cat([(mv - logp)[e_v.bool()], (ma - logp)[e_a.bool()]])
    d = torch.exp(u) - u - 1
    assert (d > 1.0).any() and (d < 1.0).any()
    # the metrics: this call's counts are the global ones here
    assert_close(metrics["op_loss"], loss.detach())
    scored_v = e_v.any(1, keepdim=True) * mask
    assert_close(metrics["masked_entropy_visual"], -(mv * scored_v).sum() / scored_v.sum())


def test_switch_off_sends_no_gradient_to_the_masked_branch():
    logp, mv, ma, e_v, e_a, mask = op_batch(seed=1)
    x, v, a = with_grad(logp, mv, ma)
    loss, metrics = P.perception_loss(x, v, a, e_v, e_a, mask, masked_grad=False, eta_masked=1.0)
    loss.backward()
    assert v.grad is None and a.grad is None
    assert "masked_entropy_visual" not in metrics
    # and the value is form (a)'s: the masked entropy weight is unused
    x2 = logp.clone().requires_grad_()
    loss_a, _ = P.perception_loss(x2, mv, ma, e_v, e_a, mask)
    assert torch.equal(loss, loss_a)
    loss_a.backward()
    assert torch.equal(x.grad, x2.grad)
    # token_divergence alone: form (a) keeps the masked log-probs constant
    d = P.token_divergence(logp, mv.clone().requires_grad_())
    assert d.grad_fn is None


def test_masked_branch_gradient_sign():
    """dL/d mv_t = -gamma e_t / n (exp(u) - 1), u = mv_t - logp_t, below the clamp: where a claim
    is already less likely under x\\v (u < 0) the gradient is positive, so gradient descent
    lowers its masked-input probability further."""
    logp, mv, ma, e_v, e_a, mask = op_batch(seed=2)
    gamma = 0.1
    v = mv.clone().requires_grad_()
    loss, _ = P.perception_loss(
        logp, v, None, e_v, e_a, mask, gamma=gamma, eta=0.0, masked_grad=True, eta_masked=0.0
    )
    loss.backward()
    u = mv - logp
    e = e_v * mask
    expected = -gamma * e / e.sum() * (torch.exp(u) - 1)
    assert_close(v.grad, expected)
    below = e.bool() & (u < 0)
    above = e.bool() & (u > 0)
    assert below.any() and above.any()
    assert (v.grad[below] > 0).all() and (v.grad[above] < 0).all()
    # one step of gradient descent lowers the masked log-prob where u < 0
    assert (v.detach() - v.grad)[below].lt(mv[below]).all()


def test_micro_batches_with_global_counts_sum_to_the_batch_loss():
    logp, mv, ma, e_v, e_a, mask = op_batch(N=8, seed=3)
    kwargs = dict(masked_grad=True, eta_masked=0.1)
    full = with_grad(logp, mv, ma)
    loss_full, _ = P.perception_loss(*full, e_v, e_a, mask, **kwargs)
    loss_full.backward()
    scored = [(mask * e.any(1, keepdim=True)).sum() for e in (e_v, e_a)]
    parts = with_grad(logp, mv, ma)
    total = 0.0
    for r in (slice(0, 3), slice(3, 8)):
        loss, _ = P.perception_loss(
            *(t[r] for t in parts),
            e_v[r],
            e_a[r],
            mask[r],
            num_evidence=(e_v.sum(), e_a.sum()),
            num_tokens=int(mask.sum()),
            num_scored=scored,
            **kwargs,
        )
        loss.backward()
        total = total + loss.detach()
    assert_close(total, loss_full.detach())
    for got, want in zip(parts, full):
        assert_close(got.grad, want.grad)


# ---------------------------------------------------------------- one OPPO step, end to end
def some_rows_evidence(tokenizer, completion_ids, mask, sims):
    """Stands in for perception_loss.evidence_masks: visual evidence on the even rows' tokens,
    acoustic on the rows 1 mod 4; the others have none."""
    rows = torch.arange(len(mask))[:, None]  # (N, 1)
    e_v = mask * (rows % 2 == 0)  # (N, C)
    e_a = mask * (rows % 4 == 1)  # (N, C)
    return e_v, e_a


def grads(policy):
    out = {}
    for name, param in policy.named_parameters():
        if param.grad is not None:
            out[name] = param.grad.clone()
    return out


@pytest.fixture
def one_process():
    """train.oppo_step and update.backward sum their counts over ranks: a group of one rank."""
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if owned:
        dist.destroy_process_group()


@pytest.fixture
def step_setup(tiny_dir, synth_dir, one_process):
    policy, processor = model.load_policy(tiny_dir)
    records = data.load_manifest(synth_dir / "train.jsonl")
    both = [r for r in records if r.get("video") and r.get("audio")][:2]
    media = batching.encode(processor, both, frames=4)
    args = config.Args(profile="cpu", G=4, max_new_tokens=6, batch=2, micro_batch=2)
    config.apply_profile(args, torch.device("cpu"))
    # the loss weights large enough that the masked branch's share of the gradient shows
    args = replace(args, gamma=1.0, eta_masked=0.5)
    return policy.train(), processor, Matcher(), both, media, args


def run_step(policy, processor, matcher, records, media, args):
    """train.oppo_step with the routing forced (some_rows_evidence), seeded: its gradient."""
    policy.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    routing = unittest.mock.patch.object(P, "evidence_masks", some_rows_evidence)
    with routing:
        metrics = train.oppo_step(args, policy, None, processor, matcher, records, media, 1, 0)
    return metrics, grads(policy)


def test_oppo_step_trains_the_masked_branch(step_setup):
    """The same step in both forms: the completions and form (a)'s constants are the same, so
    what form (b) adds to the gradient is the masked passes' own, which reaches both towers and
    the LM; everything stays finite."""
    policy, processor, matcher, records, media, args = step_setup
    off, grad_off = run_step(policy, processor, matcher, records, media, args)
    form_b = replace(args, masked_grad=True)
    on, grad_on = run_step(policy, processor, matcher, records, media, form_b)
    assert off["masked_rows"] == on["masked_rows"] == 4 + 2
    assert "masked_entropy_visual" in on and "masked_entropy_visual" not in off
    assert all(torch.isfinite(g).all() for g in grad_on.values())
    assert torch.isfinite(torch.tensor(on["loss"]))
    parts = {"vision tower": "visual.", "audio tower": "audio_tower.", "LM": "layers."}
    for part, key in parts.items():
        names = [name for name in grad_on if key in name]
        difference = sum(float((grad_on[n] - grad_off[n]).abs().sum()) for n in names)
        size = sum(float(grad_off[n].abs().sum()) for n in names)
        assert names and difference > 0.1 * size, part


def test_fsdp_ranks_sum_to_the_one_process_gradient(tiny_dir, synth_dir, tmp_path, one_process):
    """2 ranks under torchrun, where one rank has no row to score under x\\v (x\\a) and some
    clips lack the masked medium, finish (no rank waits on a forward the other skipped) with the
    one process's loss and gradient."""
    out = tmp_path / "fsdp.pt"
    worker = "tests/fsdp_masked_grad_worker.py"
    proc = torchrun(worker, tiny_dir, synth_dir, out)
    loss, grads = masked_grad_step(tiny_dir, synth_dir)
    finish(proc)
    fsdp_loss, fsdp_grads = torch.load(out)
    assert_close(fsdp_loss, loss)
    assert fsdp_grads.keys() == grads.keys()
    for name, grad in grads.items():
        if grad is None:
            assert fsdp_grads[name] is None, name
            continue
        assert_close(fsdp_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
