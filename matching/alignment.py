"""Token-to-character alignment of generated ids: which characters of the decoded text each token
produced. The evidence tokens of Eq. (9) (docs/method.md, section 5) are those whose characters
overlap an evidence clause, so the alignment is exact, not a proportional guess.
"""

from bisect import bisect_left, bisect_right


def _byte_decoder() -> dict:
    """GPT-2's byte-level alphabet, inverted: printable character -> the byte it stands for."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    byte_values = printable[:]
    code_points = printable[:]
    # the 68 unprintable bytes are shifted to 256, 257, ...
    shifted = 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            code_points.append(256 + shifted)
            shifted += 1
    return {chr(c): b for b, c in zip(byte_values, code_points)}


_BYTE_DECODER = _byte_decoder()


def _special_ids(tokenizer) -> set:
    """The ids that decode(..., skip_special_tokens=True) skips."""
    special = set(tokenizer.all_special_ids)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    for i, token in added.items():
        if getattr(token, "special", False):
            special.add(i)
    return special


def _token_bytes(tokenizer, ids: list) -> list:
    """The UTF-8 bytes each token contributes to the decoded text (b"" for a skipped token)."""
    special = _special_ids(tokenizer)
    pieces = []
    for i, token in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
        if i in special:
            # skipped by skip_special_tokens=True
            pieces.append(b"")
        elif all(c in _BYTE_DECODER for c in token):
            pieces.append(bytes(_BYTE_DECODER[c] for c in token))
        else:
            # an added token outside the byte alphabet is decoded as its own UTF-8 (tokenizers'
            # ByteLevel decoder)
            pieces.append(token.encode("utf-8"))
    return pieces


def _spans_from_bytes(tokenizer, ids: list, text: str):
    """Byte-level BPE path, O(C): each token's bytes, then the characters those bytes touch.
    Returns None when the bytes do not reproduce `text` (not a byte-level decoder, cleanup, or
    invalid UTF-8 such as a completion cut inside a character)."""
    pieces = _token_bytes(tokenizer, ids)
    if "\ufffd" in text:
        return None
    if b"".join(pieces).decode("utf-8", errors="replace") != text:
        return None
    # starts[c] = byte offset of character c; starts[-1] = total bytes
    starts = [0]
    for ch in text:
        starts.append(starts[-1] + len(ch.encode("utf-8")))
    spans = []
    lo = 0
    for piece in pieces:
        hi = lo + len(piece)
        if hi == lo:
            c = bisect_left(starts, lo)
            spans.append((c, c))
        else:
            # from the character holding byte lo to the one holding byte hi - 1
            first = bisect_right(starts, lo) - 1
            end = bisect_left(starts, hi)
            spans.append((first, end))
        lo = hi
    return spans


def _spans_from_prefixes(tokenizer, ids: list, text: str):
    """Any-tokenizer path, O(C^2): decode every prefix; token k adds the characters on which
    prefix k+1 first agrees with the full text, plus the character it leaves half-written
    (a trailing U+FFFD: the prefix ends inside a multi-byte character). A U+FFFD that stands
    for invalid bytes in the text is shared with the token after it."""
    prefix_ids = [ids[:k] for k in range(1, len(ids) + 1)]
    prefixes = tokenizer.batch_decode(prefix_ids, skip_special_tokens=True)
    if prefixes and prefixes[-1] != text:
        raise ValueError("alignment.token_char_spans: the prefixes do not decode to the full text")
    special = _special_ids(tokenizer)
    spans = []
    # characters of `text` settled by the tokens so far, and the previous prefix
    agreed = 0
    previous = ""
    for k, (i, prefix) in enumerate(zip(ids, prefixes)):
        # n: the length of the longest start of `prefix` that `text` starts with
        n = min(len(prefix), len(text))
        while not text.startswith(prefix[:n]):
            n -= 1
        if n == len(prefix) and prefix.endswith("\ufffd"):
            # the text's own U+FFFD may still be a character in the making
            n -= 1
        if n < agreed:
            raise ValueError(
                f"alignment.token_char_spans: decoding is not prefix-stable at token {k} "
                f"(prefix {prefix!r} retracts characters of {text[:agreed]!r})"
            )
        if i in special and prefix == previous:
            # skipped by skip_special_tokens=True
            spans.append((agreed, agreed))
        else:
            half_written = n < len(prefix) and prefix[n] == "\ufffd"
            spans.append((agreed, n + int(half_written)))
        agreed = n
        previous = prefix
    return spans


# Eq. (9): exact character-to-token alignment
def token_char_spans(tokenizer, ids) -> list:
    """[(start, end)) of each token's characters in tokenizer.decode(ids, skip_special_tokens=True).

    Tokens that split a multi-byte character (byte-level BPE) each overlap that character;
    skipped special tokens get empty spans. Token k's span starts where the complete characters
    of tokens < k end, so the spans cover the text and overlap only on split characters.
    """
    ids = [int(i) for i in ids]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    spans = _spans_from_bytes(tokenizer, ids, text)
    if spans is None:
        spans = _spans_from_prefixes(tokenizer, ids, text)
    return spans
