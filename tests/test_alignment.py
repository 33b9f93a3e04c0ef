"""alignment.py against an independent byte-level alignment written out in tests/small_bpe.py.

The tokenizer is tests/small_bpe.py's: a token can end in the middle of a multi-byte character.
"""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from small_bpe import MULTIBYTE, naive_char_sets, train_tokenizer  # noqa: E402

from matching import alignment  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


# ---- Eq. (9) character alignment


def test_token_char_spans_exact_on_multibyte(tokenizer):
    eos = tokenizer.eos_token_id
    ids = [eos] + tokenizer.encode(MULTIBYTE) + [eos, eos]  # special tokens around: empty spans
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert "xÃ" in tokens  # precondition: a token holding 'x' and the first byte of 'é'
    # precondition: '中' split into its 3 bytes
    assert sum(t in ("ä", "¸", "Ń") for t in tokens) == 3
    spans = alignment.token_char_spans(tokenizer, ids)
    expected, text = naive_char_sets(tokenizer, ids)
    assert text == MULTIBYTE
    assert [set(range(s, e)) for s, e in spans] == expected
    assert spans[0][0] == spans[0][1] and spans[-1][0] == spans[-1][1]
    # the byte-level path and the generic prefix-decoding path agree
    assert alignment._spans_from_prefixes(tokenizer, ids, text) == spans
    assert alignment._spans_from_bytes(tokenizer, ids, text) == spans


def test_token_char_spans_cut_inside_a_character(tokenizer):
    ids = tokenizer.encode("ok 中文")[:-1]  # generation stopped after 2 of the 3 bytes of '文'
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert text.endswith("\ufffd")
    spans = alignment.token_char_spans(tokenizer, ids)
    # both bytes overlap the broken character
    assert spans[-1] == spans[-2] == (len(text) - 1, len(text))
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
    spans = alignment.token_char_spans(t, ids)
    assert [text[s:e] for s, e in spans] == ["the", " face", " looks", " tense", ",", " é中"]


def test_token_char_spans_with_model_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from synthetic.tiny import build_tiny

    tok = AutoTokenizer.from_pretrained(build_tiny(tmp_path / "tiny"))
    text = "<think>The face looks tense, é 中文 😀.</think><answer>angry</answer>"
    ids = tok.encode(text, add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
    spans = alignment.token_char_spans(tok, ids)
    decoded = tok.decode(ids, skip_special_tokens=True)
    assert decoded == text and spans[-1][0] == spans[-1][1]
    assert [set(range(s, e)) for s, e in spans] == naive_char_sets(tok, ids)[0]
    assert alignment._spans_from_prefixes(tok, ids, decoded) == spans


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
        spans = alignment.token_char_spans(tokenizer, ids)
        assert len(spans) == len(ids) and all(0 <= s <= e <= len(text) for s, e in spans)
        assert all(b[0] >= a[0] for a, b in zip(spans, spans[1:]))  # starts never go back
        # every character covered
        assert set().union(*(range(s, e) for s, e in spans)) == set(range(len(text)))
        if "\ufffd" not in text:
            assert [set(range(s, e)) for s, e in spans] == naive_char_sets(tokenizer, ids)[0]
            assert alignment._spans_from_prefixes(tokenizer, ids, text) == spans
        else:
            assert trial % 2  # only random ids give invalid bytes
