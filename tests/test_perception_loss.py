"""perception_loss.py against naive loops written out here, plus the invariants of Eqs. (9)-(11).

The tokenizer is a small byte-level BPE trained here, so no test depends on model.py; it merges
across spaces and punctuation, so tokens can straddle clause boundaries, and it never saw CJK
or emoji, so those characters are split into single-byte tokens.
"""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import perception_loss as P  # noqa: E402

SENTENCE = "The face looks tense, the voice is raised. She is angry."


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    # "xé xè xê": the pair (x, first byte of é/è/ê) is the most frequent, so a token ends mid-character
    corpus = [SENTENCE, "xé xè xê xé xè xê", "un café, a smile. A café!"] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )


def bytes_to_unicode():
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def naive_char_sets(tokenizer, ids):
    """Independent of the module: each token's bytes, then every character whose bytes it holds."""
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    special = set(tokenizer.all_special_ids)
    pieces = [
        b"" if i in special else bytes(byte_of[c] for c in tokenizer.convert_ids_to_tokens(i))
        for i in ids
    ]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert b"".join(pieces).decode("utf-8") == text
    char_bytes, pos = [], 0
    for ch in text:
        char_bytes.append(set(range(pos, pos + len(ch.encode("utf-8")))))
        pos += len(ch.encode("utf-8"))
    out, pos = [], 0
    for p in pieces:
        held = set(range(pos, pos + len(p)))
        out.append({c for c, cb in enumerate(char_bytes) if cb & held})
        pos += len(p)
    return out, text


MULTIBYTE = "xé 中文 😀 café. The face looks tense, the voice"


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


# ---- Eq. (9) character alignment


def test_token_char_spans_exact_on_multibyte(tokenizer):
    eos = tokenizer.eos_token_id
    ids = [eos] + tokenizer.encode(MULTIBYTE) + [eos, eos]  # special tokens around: empty spans
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert "xÃ" in tokens  # precondition: a token holding 'x' and the first byte of 'é'
    assert (
        sum(t in ("ä", "¸", "Ń") for t in tokens) == 3
    )  # precondition: '中' split into its 3 bytes
    spans = P.token_char_spans(tokenizer, ids)
    expected, text = naive_char_sets(tokenizer, ids)
    assert text == MULTIBYTE
    assert [set(range(s, e)) for s, e in spans] == expected
    assert spans[0][0] == spans[0][1] and spans[-1][0] == spans[-1][1]
    # the byte-level path and the generic prefix-decoding path agree
    assert P._spans_from_prefixes(tokenizer, ids, text) == spans
    assert P._spans_from_bytes(tokenizer, ids, text) == spans


def test_token_char_spans_cut_inside_a_character(tokenizer):
    ids = tokenizer.encode("ok 中文")[:-1]  # generation stopped after 2 of the 3 bytes of '文'
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert text.endswith("\ufffd")
    spans = P.token_char_spans(tokenizer, ids)
    assert (
        spans[-1] == spans[-2] == (len(text) - 1, len(text))
    )  # both bytes overlap the broken char
    assert [set(range(s, e)) for s, e in spans[:-2]] == naive_char_sets(tokenizer, ids[:-2])[0]


def test_token_char_spans_non_byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "▁the": 1, "▁face": 2, "▁looks": 3, "▁tense": 4, ",": 5, "▁é中": 6}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    ids = [1, 2, 3, 4, 5, 6]
    text = t.decode(ids)
    assert text == "the face looks tense, é中"
    spans = P.token_char_spans(t, ids)
    assert [text[s:e] for s, e in spans] == ["the", " face", " looks", " tense", ",", " é中"]


def sim(spans, sv, sa):
    S = {
        "visual": torch.tensor(sv).view(len(spans), -1),
        "acoustic": torch.tensor(sa).view(len(spans), -1),
        "emotion": torch.ones(len(spans), 1),
    }
    return SimpleNamespace(spans=spans, S=S)


def test_evidence_masks_route_a_visual_clause_to_the_visual_mask(tokenizer):
    text = SENTENCE
    clauses = [
        (0, 20),
        (21, 41),
        (42, 55),
    ]  # "The face looks tense" / " the voice is raised" / " She is angry"
    assert (
        text[slice(*clauses[0])] == "The face looks tense"
        and text[slice(*clauses[2])] == " She is angry"
    )
    ids = tokenizer.encode(text) + [tokenizer.eos_token_id]
    spans = P.token_char_spans(tokenizer, ids)
    inside = next(
        k for k, (s, e) in enumerate(spans) if s > 0 and e < 20
    )  # a token inside clause 0
    ids.insert(
        inside, tokenizer.eos_token_id
    )  # a special token within the clause: decodes to nothing
    C = len(ids) + 3
    completion = torch.full((2, C), tokenizer.pad_token_id)
    completion[0, : len(ids)] = torch.tensor(ids)
    completion[1, : len(ids)] = torch.tensor(ids)
    mask = (completion != tokenizer.pad_token_id).float()
    sims = [
        sim(clauses, [0.9, 0.1, 0.2], [0.1, 0.2, 0.3]),  # clause 0 visual, the rest neutral
        sim(clauses, [0.1, 0.2, 0.3], [0.2, 0.8, 0.1]),
    ]  # clause 1 acoustic
    e_v, e_a = P.evidence_masks(tokenizer, completion, mask, sims, texts=[text, text])
    char_sets, _ = naive_char_sets(tokenizer, ids)
    want_v = [float(bool(cs & set(range(0, 20)))) for cs in char_sets]
    want_a = [float(bool(cs & set(range(21, 41)))) for cs in char_sets]
    assert e_v[0, : len(ids)].tolist() == want_v and 0 < sum(want_v) < len(ids)
    assert (
        e_v[0, inside] == 0 and e_v[0, inside - 1] == e_v[0, inside + 1] == 1
    )  # empty span overlaps nothing
    assert not e_a[0].any()  # nothing visual leaks into the acoustic mask
    assert e_a[1, : len(ids)].tolist() == want_a and not e_v[1].any()
    assert not e_v[:, len(ids) :].any() and not e_a[:, len(ids) :].any()  # padding stays 0


def test_evidence_masks_clause_boundary_inside_a_token(tokenizer):
    ids = tokenizer.encode(SENTENCE)
    spans = P.token_char_spans(tokenizer, ids)
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
    e_v, e_a = P.evidence_masks(
        tokenizer, torch.tensor([ids]), torch.ones(1, len(ids)), [sim([(c, c + 1)], [0.9], [0.0])]
    )  # the clause is the one character '中'
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert [tokens[i] for i in e_v[0].nonzero().squeeze(1).tolist()] == ["ä", "¸", "Ń"]
    assert not e_a.any()


def test_evidence_masks_with_model_tokenizer(tmp_path):
    if not (ROOT / "model.py").exists():
        pytest.skip("model.py not written yet")
    from transformers import AutoTokenizer

    from model import build_tiny

    tok = AutoTokenizer.from_pretrained(build_tiny(tmp_path / "tiny"))
    text = "<think>The face looks tense, é 中文 😀.</think><answer>angry</answer>"
    ids = tok.encode(text, add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
    spans = P.token_char_spans(tok, ids)
    decoded = tok.decode(ids, skip_special_tokens=True)
    assert decoded == text and spans[-1][0] == spans[-1][1]
    assert [set(range(s, e)) for s, e in spans] == naive_char_sets(tok, ids)[0]
    assert P._spans_from_prefixes(tok, ids, decoded) == spans


def test_token_char_spans_on_random_ids(tokenizer):
    """Random texts, and random ids as an untrained policy samples them (often invalid UTF-8)."""
    g = torch.Generator().manual_seed(0)
    pool = list("aé中😀 ,.x") + ["café", " the", "tense", "<|im_end|>"]
    for trial in range(100):
        length = int(torch.randint(1, 25, (1,), generator=g))
        if trial % 2:
            ids = torch.randint(0, len(tokenizer), (length,), generator=g).tolist()
        else:
            ids = tokenizer.encode(
                "".join(pool[j] for j in torch.randint(0, len(pool), (length,), generator=g))
            )
        text = tokenizer.decode(ids, skip_special_tokens=True)
        spans = P.token_char_spans(tokenizer, ids)
        assert len(spans) == len(ids) and all(0 <= s <= e <= len(text) for s, e in spans)
        assert all(b[0] >= a[0] for a, b in zip(spans, spans[1:]))  # starts never go back
        assert set().union(*(range(s, e) for s, e in spans)) == set(
            range(len(text))
        )  # every character covered
        if "\ufffd" not in text:
            assert [set(range(s, e)) for s, e in spans] == naive_char_sets(tokenizer, ids)[0]
            assert P._spans_from_prefixes(tokenizer, ids, text) == spans
        else:
            assert trial % 2  # only random ids give invalid bytes


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
