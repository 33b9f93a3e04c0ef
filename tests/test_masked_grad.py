"""Form (b) of Eqs. (10)-(11), `--masked_grad`: the masked log-probs with gradient, and the
entropy of the masked distribution (variants/masked_grad.py).

perception_loss.perception_loss against a naive loop (value and gradient into both branches),
the sign of the masked branch's gradient, the masked entropy against -sum p log p written out
and its normalisation over micro-batches, why it is the entropy and not the cross-entropy of the
sampled tokens, one train.oppo_step on the tiny thinker whose masked passes reach the towers and
the LM, and the same update under FSDP2 on 2 processes (fsdp_masked_grad_worker.py).
"""

import unittest.mock
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from fsdp_masked_grad_worker import masked_grad_step
from torch.testing import assert_close
from train_runs import finish, torchrun

import data
import perception_loss as P
import train
from matching.matcher import Matcher
from runtime import config
from thinker import batching, model, scoring
from variants import masked_grad


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


def naive_loss(logp, mv, ma, e_v, e_a, mask, gamma, eta, clamp):
    """L_op, token by token."""
    N, C = logp.shape
    loss = 0.0
    for masked, e in ((mv, e_v), (ma, e_a)):
        divergence = 0.0
        n_evidence = 0
        for i in range(N):
            for t in range(C):
                if mask[i, t] and e[i, t]:
                    u = masked[i, t] - logp[i, t]
                    d = torch.exp(u) - u - 1
                    divergence = divergence + torch.clamp(d, max=clamp)
                    n_evidence += 1
        loss = loss - gamma * divergence / max(n_evidence, 1)
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
    loss, metrics = P.perception_loss(x, v, a, e_v, e_a, mask, masked_grad=True, **weights)
    loss.backward()
    x2, v2, a2 = with_grad(logp, mv, ma)
    expected = naive_loss(x2, v2, a2, e_v, e_a, mask, **weights)
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


def test_masked_branch_gradient_sign():
    """dL/d mv_t = -gamma e_t / n (exp(u) - 1), u = mv_t - logp_t, below the clamp: where a claim
    is already less likely under x\\v (u < 0) the gradient is positive, so gradient descent
    lowers its masked-input probability further."""
    logp, mv, ma, e_v, e_a, mask = op_batch(seed=2)
    gamma = 0.1
    v = mv.clone().requires_grad_()
    loss, _ = P.perception_loss(
        logp, v, None, e_v, e_a, mask, gamma=gamma, eta=0.0, masked_grad=True
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
    full = with_grad(logp, mv, ma)
    loss_full, _ = P.perception_loss(*full, e_v, e_a, mask, masked_grad=True)
    loss_full.backward()
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
            masked_grad=True,
        )
        loss.backward()
        total = total + loss.detach()
    assert_close(total, loss_full.detach())
    for got, want in zip(parts, full):
        assert_close(got.grad, want.grad)


# ---------------------------------------------------------------- the masked entropy
def test_masked_entropy_is_the_entropy_of_the_next_token_distribution():
    """scoring.selective_log_softmax(entropy=True): -sum_w p(w) log p(w) at every position,
    value and gradient, beside the picked log-probs it always returned."""
    g = torch.Generator().manual_seed(4)
    # float32, as the LM head's logits are scored
    logits = torch.randn(5, 3, 11, generator=g) * 3  # (n, C, V)
    ids = torch.randint(0, 11, (5, 3), generator=g)  # (n, C)
    x = logits.clone().requires_grad_()
    logp, entropy = scoring.selective_log_softmax(x, ids, chunk=2, entropy=True)
    x2 = logits.clone().requires_grad_()
    want = torch.zeros(5, 3)
    for i in range(5):
        for t in range(3):
            p = torch.softmax(x2[i, t], -1)
            want[i, t] = -(p * torch.log(p)).sum()
    assert_close(entropy, want)
    assert_close(logp, scoring.selective_log_softmax(logits, ids))
    (entropy * torch.arange(15.0).view(5, 3)).sum().backward()
    (want * torch.arange(15.0).view(5, 3)).sum().backward()
    assert_close(x.grad, x2.grad)


def test_entropy_term_is_normalised_by_the_global_scored_tokens():
    """eta_masked (H^v + H^a): each sum of entropies over a micro-batch's scored tokens divided
    by the global count of scored tokens, so micro-batches add up to the batch's mean."""
    sums = [torch.tensor(3.0), torch.tensor(5.0)]
    counts = [torch.tensor(2.0), torch.tensor(4.0)]
    scored = (6.0, 0.0)
    total = 0.0
    for s, n in zip(sums, counts):
        branch = masked_grad.Branch(
            None, None, {"visual": s, "acoustic": s * 0}, {"visual": n, "acoustic": n * 0}, scored
        )
        parts = {}
        total = total + masked_grad.entropy_term(0.5, branch, parts)
        assert_close(parts["masked_entropy_visual"], s / n)
        # no acoustic row scored: 0, never 0 / 0
        assert parts["masked_entropy_acoustic"] == 0
    assert_close(total, torch.tensor(0.5 * (3.0 + 5.0) / 6.0))


def test_entropy_not_cross_entropy_of_the_sampled_claim():
    """The regulariser's gradient step on the masked logits: the cross-entropy of the full-input
    sample's token, -log p(o_t), always raises p(o_t) under x\\m, the claim the divergence pushes
    down; the entropy itself lowers it when o_t is not the masked mode."""
    logits = torch.tensor([2.0, 0.5, 0.0, -1.0], dtype=torch.float64)
    claim = 1
    lr = 0.5
    stepped = {}
    for name in ("entropy", "cross_entropy"):
        x = logits.clone().requires_grad_()
        log_p = torch.log_softmax(x, -1)
        if name == "entropy":
            loss = -(log_p.exp() * log_p).sum()
        else:
            loss = -log_p[claim]
        loss.backward()
        stepped[name] = torch.softmax(x.detach() - lr * x.grad, -1)[claim]
    before = torch.softmax(logits, -1)[claim]
    assert stepped["cross_entropy"] > before
    assert stepped["entropy"] < before


# ---------------------------------------------------------------- one OPPO step, end to end
def some_rows_evidence(tokenizer, completion_ids, mask, sims, tau=0.5):
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
    """train.oppo_step and oppo.update sum their counts over ranks: a group of one rank."""
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
        metrics = train.oppo_step(args, policy, None, processor, matcher, records, media, 0)
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
