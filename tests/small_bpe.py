"""A small byte-level BPE tokenizer trained in the tests, and an independent character alignment.

The tokenizer merges across spaces and punctuation, so tokens can straddle clause boundaries, and
it never saw CJK or emoji, so those characters are split into single-byte tokens. Nothing here
depends on model.py.
"""

SENTENCE = "The face looks tense, the voice is raised. She is angry."
MULTIBYTE = "xé 中文 😀 café. The face looks tense, the voice"


def train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    # "xé xè xê": the pair (x, first byte of é/è/ê) is the most frequent, so a token ends in the
    # middle of a character
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
