"""perception_loss.py against naive loops written out here, plus the invariants of Eqs. (9)-(11).

The tokenizer is tests/small_bpe.py's byte-level BPE, so no test depends on model.py.
"""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from small_bpe import MULTIBYTE, SENTENCE, naive_char_sets, train_tokenizer  # noqa: E402

import perception_loss as P  # noqa: E402
from matching import alignment  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


# ---- Eq. (9) routing


def test_route_clauses_by_hand():
    Sv = torch.tensor([[0.8, 0.1], [0.2, 0.3], [0.45, 0.0], [0.7, 0.6], [0.9, 0.0]])
    Sa = torch.tensor([[0.3], [0.9], [0.49], [0.7], [0.95]])
    assert P.route_clauses(Sv, Sa, tau=0.5) == ["visual", "acoustic", None, None, "acoustic"]
    # a modality without cues (J = 0) never wins and never blocks the other
    assert P.route_clauses(torch.zeros(2, 0), torch.tensor([[0.6], [0.4]])) == ["acoustic", None]
    assert P.route_clauses(torch.zeros(0, 3), torch.zeros(0, 0)) == []
    with pytest.raises(ValueError, match="same K"):
        P.route_clauses(torch.zeros(2, 1), torch.zeros(3, 1))


def test_route_clauses_match_loop():
    g = torch.Generator().manual_seed(0)
    Sv, Sa = torch.rand(50, 4, generator=g), torch.rand(50, 3, generator=g)
    expected = []
    for k in range(50):
        bv, ba = max(Sv[k].tolist()), max(Sa[k].tolist())
        expected.append(
            "visual" if bv > 0.5 and bv > ba else "acoustic" if ba > 0.5 and ba > bv else None
        )
    assert P.route_clauses(Sv, Sa, 0.5) == expected


# ---- Eq. (9) evidence tokens


def sim(spans, sv, sa):
    S = {
        "visual": torch.tensor(sv).view(len(spans), -1),
        "acoustic": torch.tensor(sa).view(len(spans), -1),
        "emotion": torch.ones(len(spans), 1),
    }
    return SimpleNamespace(spans=spans, S=S)


def test_evidence_masks_route_a_visual_clause_to_the_visual_mask(tokenizer):
    text = SENTENCE
    # "The face looks tense" / " the voice is raised" / " She is angry"
    clauses = [(0, 20), (21, 41), (42, 55)]
    assert (
        text[slice(*clauses[0])] == "The face looks tense"
        and text[slice(*clauses[2])] == " She is angry"
    )
    ids = tokenizer.encode(text) + [tokenizer.eos_token_id]
    spans = alignment.token_char_spans(tokenizer, ids)
    # a token inside clause 0
    inside = next(k for k, (s, e) in enumerate(spans) if s > 0 and e < 20)
    # a special token within the clause: decodes to nothing
    ids.insert(inside, tokenizer.eos_token_id)
    C = len(ids) + 3
    completion = torch.full((2, C), tokenizer.pad_token_id)
    completion[0, : len(ids)] = torch.tensor(ids)
    completion[1, : len(ids)] = torch.tensor(ids)
    mask = (completion != tokenizer.pad_token_id).float()
    sims = [
        # clause 0 visual, the rest neutral
        sim(clauses, [0.9, 0.1, 0.2], [0.1, 0.2, 0.3]),
        # clause 1 acoustic
        sim(clauses, [0.1, 0.2, 0.3], [0.2, 0.8, 0.1]),
    ]
    e_v, e_a = P.evidence_masks(tokenizer, completion, mask, sims, texts=[text, text])
    char_sets, _ = naive_char_sets(tokenizer, ids)
    want_v = [float(bool(cs & set(range(0, 20)))) for cs in char_sets]
    want_a = [float(bool(cs & set(range(21, 41)))) for cs in char_sets]
    assert e_v[0, : len(ids)].tolist() == want_v and 0 < sum(want_v) < len(ids)
    # an empty span overlaps nothing
    assert e_v[0, inside] == 0 and e_v[0, inside - 1] == e_v[0, inside + 1] == 1
    assert not e_a[0].any()  # nothing visual leaks into the acoustic mask
    assert e_a[1, : len(ids)].tolist() == want_a and not e_v[1].any()
    assert not e_v[:, len(ids) :].any() and not e_a[:, len(ids) :].any()  # padding stays 0


def test_evidence_masks_clause_boundary_inside_a_token(tokenizer):
    ids = tokenizer.encode(SENTENCE)
    spans = alignment.token_char_spans(tokenizer, ids)
    k = next(i for i, (s, e) in enumerate(spans) if e - s >= 3)  # a multi-character token
    cut = spans[k][0] + 1
    completion, mask = torch.tensor([ids]), torch.ones(1, len(ids))
    clauses = sim([(0, cut), (cut, len(SENTENCE))], [0.9, 0.0], [0.0, 0.9])  # visual, then acoustic
    e_v, e_a = P.evidence_masks(tokenizer, completion, mask, [clauses])
    assert e_v[0, k] == 1 and e_a[0, k] == 1  # the straddling token overlaps both clauses
    assert e_v[0, :k].all() and not e_v[0, k + 1 :].any()
    assert e_a[0, k:].all() and not e_a[0, :k].any()


def test_evidence_masks_multibyte_clause(tokenizer):
    ids = tokenizer.encode(MULTIBYTE)
    c = MULTIBYTE.index("中")
    # the clause is the one character '中'
    clause = sim([(c, c + 1)], [0.9], [0.0])
    e_v, e_a = P.evidence_masks(tokenizer, torch.tensor([ids]), torch.ones(1, len(ids)), [clause])
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert [tokens[i] for i in e_v[0].nonzero().squeeze(1).tolist()] == ["ä", "¸", "Ń"]
    assert not e_a.any()


def test_openers_are_evidence_of_their_modality():
    """route_openers: a neutral clause that opens the video's or the audio's section is routed to
    that modality; the text's opener, a clause routed already and other neutral ones stay."""
    text = "In the video, a smile. In the audio, calm. In the text, nothing. It is clear"
    spans = [(0, 12), (14, 21), (23, 35), (37, 41), (43, 54), (56, 63), (65, 76)]
    clauses = [text[a:b] for a, b in spans]
    assert clauses[0] == "In the video" and clauses[4] == "In the text"
    routes = [None, "visual", None, None, None, None, None]
    assert P.route_openers(text, spans, routes) == [
        "visual",
        "visual",
        "acoustic",
        None,
        None,
        None,
        None,
    ]
    # an opener already routed by Eq. (9) keeps its route
    assert P.route_openers(text, spans[:1], ["acoustic"]) == ["acoustic"]


def test_evidence_masks_take_the_opener_with_its_clause(tokenizer):
    text = "In the audio, the voice is raised"
    ids = tokenizer.encode(text)
    clauses = sim([(0, 12), (14, len(text))], [0.1, 0.1], [0.1, 0.9])
    e_v, e_a = P.evidence_masks(tokenizer, torch.tensor([ids]), torch.ones(1, len(ids)), [clauses])
    char_sets, _ = naive_char_sets(tokenizer, ids)
    # every token but the comma's and its space's
    want = [float(bool(cs & (set(range(0, 12)) | set(range(14, len(text)))))) for cs in char_sets]
    assert e_a[0].tolist() == want and not e_v.any()


# ---- Eq. (10)


def test_token_divergence_matches_formula_and_is_nonnegative():
    g = torch.Generator().manual_seed(1)
    logp = (-torch.rand(200, generator=g, dtype=torch.float64) * 8).requires_grad_()
    masked = -torch.rand(200, generator=g, dtype=torch.float64) * 8
    d = P.token_divergence(logp, masked, clamp=10.0)
    d.sum().backward()
    u = masked - logp.detach()
    raw = torch.exp(u) - u - 1
    assert_close(d, raw.clamp(max=10.0))
    assert (raw > 10).any() and (raw < 10).any()  # both sides of the clamp are exercised
    # d d / d logp = 1 - exp(u) below the clamp, 0 above it
    assert_close(logp.grad, torch.where(raw < 10, 1 - torch.exp(u), torch.zeros_like(u)))
    assert (d >= 0).all()
    assert torch.equal(P.token_divergence(masked, masked), torch.zeros(200, dtype=torch.float64))


def test_token_divergence_finite_for_extreme_logprobs():
    logp = torch.tensor([-500.0, -1e-3, -30.0], requires_grad=True)
    masked = torch.tensor([0.0, -500.0, -30.0])
    d = P.token_divergence(logp, masked, clamp=10.0)
    d.sum().backward()
    assert d.tolist() == [10.0, 10.0, 0.0]
    assert torch.isfinite(logp.grad).all() and logp.grad[:2].eq(0).all()


# ---- Eq. (11)


def _op_batch(N=5, C=6, seed=2):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(N, C, generator=g, dtype=torch.float64) * 4
    mv = logp + torch.randn(N, C, generator=g, dtype=torch.float64)
    ma = logp + 2 * torch.randn(N, C, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, C + 1, (N,), generator=g)
    mask = (torch.arange(C)[None] < lengths[:, None]).double()
    e_v = (torch.rand(N, C, generator=g) < 0.4).double() * mask
    e_a = (torch.rand(N, C, generator=g) < 0.3).double() * mask * (1 - e_v)
    return logp, mv, ma, e_v, e_a, mask


def naive_perception_loss(logp, mv, ma, e_v, e_a, mask, gamma, eta, clamp):
    kls = []
    for masked, e in ((mv, e_v), (ma, e_a)):
        total, count = 0.0, 0
        for i in range(logp.shape[0]):
            for t in range(logp.shape[1]):
                if e[i, t] and mask[i, t]:
                    u = masked[i, t] - logp[i, t]
                    total, count = (
                        total + min(torch.exp(u) - u - 1, torch.tensor(clamp, dtype=u.dtype)),
                        count + 1,
                    )
        kls.append(total / max(count, 1))
    h_total, n = 0.0, 0
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if mask[i, t]:
                h_total, n = h_total - logp[i, t], n + 1
    return -gamma * (kls[0] + kls[1]) + eta * h_total / n


def test_perception_loss_matches_loop():
    logp, mv, ma, e_v, e_a, mask = _op_batch()
    a = logp.clone().requires_grad_()
    loss, metrics = P.perception_loss(a, mv, ma, e_v, e_a, mask, gamma=0.5, eta=0.3, clamp=2.0)
    loss.backward()
    b = logp.clone().requires_grad_()
    expected = naive_perception_loss(b, mv, ma, e_v, e_a, mask, 0.5, 0.3, 2.0)
    expected.backward()
    assert_close(loss, expected)
    assert_close(a.grad, b.grad)
    assert_close(metrics["op_loss"], loss.detach())  # local counts are the global ones here
    assert metrics["n_visual"] == e_v.sum() and metrics["n_acoustic"] == e_a.sum()
    assert_close(metrics["share_visual"], e_v.sum() / mask.sum())
    assert_close(metrics["entropy"], -(logp * mask).sum() / mask.sum())
    assert_close(
        metrics["kl_visual"],
        (-naive_perception_loss(logp, mv, ma, e_v, 0 * e_a, mask, 1.0, 0.0, 2.0)),
    )


def test_gradient_flows_only_through_full_input_logprobs():
    logp, mv, ma, e_v, e_a, mask = _op_batch(seed=3)
    x, mv, ma = (t.clone().requires_grad_() for t in (logp, mv, ma))
    loss, _ = P.perception_loss(x, mv, ma, e_v, e_a, mask)
    loss.backward()
    assert mv.grad is None and ma.grad is None
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_no_evidence_gives_zero_kl_not_nan():
    logp, mv, ma, _, _, mask = _op_batch(seed=4)
    zeros = torch.zeros_like(mask)
    x = logp.clone().requires_grad_()
    loss, metrics = P.perception_loss(x, mv, None, zeros, zeros, mask, gamma=0.02, eta=0.03)
    loss.backward()
    assert_close(loss, 0.03 * -(logp * mask).sum() / mask.sum())  # only the entropy term is left
    assert metrics["kl_visual"] == 0 and metrics["kl_acoustic"] == 0
    assert all(torch.isfinite(v) for v in metrics.values()) and torch.isfinite(x.grad).all()


def test_padding_never_changes_the_perception_loss():
    logp, mv, ma, e_v, e_a, mask = _op_batch(seed=5)
    N, C = logp.shape
    garbage = torch.tensor([float("nan"), float("inf"), -1e4], dtype=torch.float64).repeat(N, 1)
    ones = torch.ones(N, 3, dtype=torch.float64)  # evidence flags on padding must be ignored too
    a = logp.clone().requires_grad_()
    loss_a, metrics_a = P.perception_loss(a, mv, ma, e_v, e_a, mask)
    loss_a.backward()
    b = torch.cat([logp, garbage], 1).requires_grad_()
    cat = lambda x, y: torch.cat([x, y], 1)  # noqa: E731
    loss_b, metrics_b = P.perception_loss(
        b, cat(mv, garbage), cat(ma, garbage), cat(e_v, ones), cat(e_a, ones), cat(mask, 0 * ones)
    )
    loss_b.backward()
    assert_close(loss_a, loss_b)
    assert_close(a.grad, b.grad[:, :C])
    assert torch.equal(b.grad[:, C:], torch.zeros(N, 3, dtype=torch.float64))
    for k in metrics_a:
        assert_close(metrics_a[k], metrics_b[k])


def test_micro_batches_with_global_counts_sum_to_the_batch_loss():
    logp, mv, ma, e_v, e_a, mask = _op_batch(N=8, seed=6)
    full = logp.clone().requires_grad_()
    loss_full, _ = P.perception_loss(full, mv, ma, e_v, e_a, mask)
    loss_full.backward()
    parts = logp.clone().requires_grad_()
    total = 0.0
    for r in (slice(0, 3), slice(3, 8)):
        loss, _ = P.perception_loss(
            parts[r],
            mv[r],
            ma[r],
            e_v[r],
            e_a[r],
            mask[r],
            num_evidence=(e_v.sum(), e_a.sum()),
            num_tokens=int(mask.sum()),
        )
        loss.backward()
        total = total + loss.detach()
    assert_close(total, loss_full.detach())
    assert_close(parts.grad, full.grad)


def test_perception_loss_bad_input():
    logp, mv, ma, e_v, e_a, mask = _op_batch()
    with pytest.raises(ValueError, match="`e_a` has shape"):
        P.perception_loss(logp, mv, ma, e_v, e_a[:, :2], mask)
