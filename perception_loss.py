r"""The Omni-Perception Loss of OPPO: evidence-token routing and the masked-input divergence.

SPEC.md Eqs. (9)-(11). A completion's <think> clauses are routed to the modality whose cues they
state (Eq. 9, from reward.py's clause-cue similarity matrices); the tokens whose characters fall in
those clauses are the evidence tokens. On them the policy's log-probs under the full input x are
compared with its log-probs under x\v (video masked) and x\a (audio masked) (Eq. 10), and the loss
rewards a large divergence: a visual claim that is as likely without the video did not come from
the video (Eq. 11). An entropy term and a per-token clamp keep that unbounded objective in check.
Losses are pure functions of tensors returning `(loss, metrics)`; shapes as in oppo.py: N
completions, C right-padded completion positions, `mask` (N, C) 1 on response tokens. Metrics
are detached 0-dim tensors over this call's tokens alone.
"""

import math
from bisect import bisect_left, bisect_right

import torch
from torch import Tensor

MODALITIES = ("visual", "acoustic")


# Eq. (9)
def route_clauses(S_visual, S_acoustic, tau: float = 0.5) -> list:
    """Route each clause k: "visual" iff max_j S^v[k, j] > tau and > max_j S^a[k, j];
    "acoustic" symmetrically; None (neutral) otherwise, ties included.

    S_visual (K, Jv), S_acoustic (K, Ja) cosine similarities of K clauses to the cues; a modality
    without cues (J = 0) counts as -inf. S^e plays no part: an emotion conclusion that matches no
    visual or acoustic cue stays neutral.
    """
    Sv, Sa = (
        torch.as_tensor(S_visual).float(),
        torch.as_tensor(S_acoustic).float(),
    )  # (K, Jv), (K, Ja)
    if Sv.dim() != 2 or Sa.dim() != 2 or Sv.shape[0] != Sa.shape[0]:
        raise ValueError(
            "perception_loss.route_clauses: `S_visual` and `S_acoustic` must be (K, J) "
            f"with the same K; got {tuple(Sv.shape)} and {tuple(Sa.shape)}"
        )
    none = torch.full((Sv.shape[0],), float("-inf"), device=Sv.device)  # (K,)
    best_v = Sv.max(dim=1).values if Sv.shape[1] else none  # (K,)
    best_a = Sa.max(dim=1).values if Sa.shape[1] else none  # (K,)
    visual = ((best_v > tau) & (best_v > best_a)).tolist()
    acoustic = ((best_a > tau) & (best_a > best_v)).tolist()
    return ["visual" if v else "acoustic" if a else None for v, a in zip(visual, acoustic)]


def _byte_decoder() -> dict:
    """GPT-2's byte-level alphabet, inverted: printable character -> the byte it stands for."""
    bs = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:  # the 68 unprintable bytes are shifted to 256, 257, ...
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_DECODER = _byte_decoder()


def _special_ids(tokenizer) -> set:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {
        i for i, t in added.items() if getattr(t, "special", False)
    }


def _spans_from_bytes(tokenizer, ids: list, text: str):
    """Byte-level BPE path, O(C): each token's bytes, then the characters those bytes touch.
    Returns None when the bytes do not reproduce `text` (not a byte-level decoder, cleanup, or
    invalid UTF-8 such as a completion cut inside a character)."""
    special = _special_ids(tokenizer)
    pieces = []
    for i, tok in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
        if i in special:
            pieces.append(b"")  # skipped by skip_special_tokens=True
        elif all(c in _BYTE_DECODER for c in tok):
            pieces.append(bytes(_BYTE_DECODER[c] for c in tok))
        else:  # an added token outside the byte alphabet is decoded as its own UTF-8 (tokenizers' ByteLevel)
            pieces.append(tok.encode("utf-8"))
    if "\ufffd" in text or b"".join(pieces).decode("utf-8", errors="replace") != text:
        return None
    starts = [0]  # starts[c] = byte offset of character c; starts[-1] = total bytes
    for ch in text:
        starts.append(starts[-1] + len(ch.encode("utf-8")))
    spans, lo = [], 0
    for piece in pieces:
        hi = lo + len(piece)
        if hi == lo:
            c = bisect_left(starts, lo)
            spans.append((c, c))
        else:  # from the character holding byte lo to the one holding byte hi - 1
            spans.append((bisect_right(starts, lo) - 1, bisect_left(starts, hi)))
        lo = hi
    return spans


def _spans_from_prefixes(tokenizer, ids: list, text: str):
    """Any-tokenizer path, O(C^2): decode every prefix; token k adds the characters on which
    prefix k+1 first agrees with the full text, plus the character it leaves half-written
    (a trailing U+FFFD: the prefix ends inside a multi-byte character). A U+FFFD that stands
    for invalid bytes in the text is shared with the token after it."""
    prefixes = tokenizer.batch_decode(
        [ids[:k] for k in range(1, len(ids) + 1)], skip_special_tokens=True
    )
    if prefixes and prefixes[-1] != text:
        raise ValueError(
            "perception_loss.token_char_spans: the prefixes do not decode to the full text"
        )
    special = _special_ids(tokenizer)
    spans, agreed, previous = [], 0, ""
    for k, (i, pre) in enumerate(zip(ids, prefixes)):
        n = min(len(pre), len(text))
        while not text.startswith(pre[:n]):
            n -= 1
        if n == len(pre) and pre.endswith("\ufffd"):
            n -= 1  # the text's own U+FFFD may still be a character in the making
        if n < agreed:
            raise ValueError(
                f"perception_loss.token_char_spans: decoding is not prefix-stable at token {k} "
                f"(prefix {pre!r} retracts characters of {text[:agreed]!r})"
            )
        if i in special and pre == previous:  # skipped by skip_special_tokens=True
            spans.append((agreed, agreed))
        else:
            half = int(n < len(pre) and pre[n] == "\ufffd")
            spans.append((agreed, n + half))
        agreed, previous = n, pre
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
    return spans if spans is not None else _spans_from_prefixes(tokenizer, ids, text)


# Eq. (9)
def evidence_masks(
    tokenizer, completion_ids: Tensor, mask: Tensor, sims, tau: float = 0.5, texts=None
):
    """Token masks e^v, e^a (N, C) float: 1 where a token's characters overlap a clause routed
    to that modality, 0 elsewhere and on padding.

    completion_ids (N, C) generated ids; mask (N, C) marks the ids that were decoded (with
    skip_special_tokens=True) into completion i; sims[i] has `.spans` (clause character spans
    in that string) and `.S` {"visual": (K, Jv), "acoustic": (K, Ja), ...} (reward.Matcher).
    texts (optional list of the completion strings) checks that the decodes agree.
    """
    N, C = completion_ids.shape
    if tuple(mask.shape) != (N, C) or len(sims) != N:
        raise ValueError(
            f"perception_loss.evidence_masks: `mask` {tuple(mask.shape)} and len(sims)={len(sims)} "
            f"must match completion_ids {(N, C)}"
        )
    e = {m: torch.zeros(N, C, device=completion_ids.device) for m in MODALITIES}  # (N, C) each
    for i, sim in enumerate(sims):
        routes = route_clauses(sim.S["visual"], sim.S["acoustic"], tau)
        if len(routes) != len(sim.spans):
            raise ValueError(
                f"perception_loss.evidence_masks: sims[{i}] has {len(sim.spans)} clause spans "
                f"but {len(routes)} rows in S"
            )
        if not any(routes):
            continue  # no evidence clause: skip the decode
        pos = mask[i].bool().nonzero().squeeze(1)  # (T,)
        ids = completion_ids[i, pos].tolist()
        if texts is not None and tokenizer.decode(ids, skip_special_tokens=True) != texts[i]:
            raise ValueError(
                f"perception_loss.evidence_masks: completion {i} does not decode to texts[{i}]"
            )
        tok = torch.tensor(token_char_spans(tokenizer, ids), dtype=torch.long).view(-1, 2)  # (T, 2)
        for m in MODALITIES:
            cl = torch.tensor([s for s, r in zip(sim.spans, routes) if r == m], dtype=torch.long)
            cl = cl.view(-1, 2)  # (K_m, 2) character spans of the clauses routed to m
            overlap = (
                (tok[:, None, 0] < cl[None, :, 1])
                & (cl[None, :, 0] < tok[:, None, 1])  # (T, K_m)
                & (tok[:, None, 0] < tok[:, None, 1])
            )  # an empty span overlaps nothing
            e[m][i, pos] = overlap.any(dim=1).float().to(e[m].device)  # (T,)
    return e["visual"], e["acoustic"]


# Eq. (10)
def token_divergence(logp: Tensor, masked_logp: Tensor, clamp: float = 10.0) -> Tensor:
    """d_t = min(exp(u) - u - 1, clamp), u = masked_logp - logp: the k3 estimator of oppo.k3,
    KL(pi(.|x) || pi(.|x\\m)) per token, clamped against "KL hacking" (PAPO).

    (N, C) each. masked_logp is a constant (no-grad forward of the pre-update policy).
    """
    # cap u where d already exceeds the clamp (d(log(2c + 2)) >= c): exp cannot overflow, and
    # the clamp's zero gradient never meets an inf from exp (0 * inf = NaN)
    u = (masked_logp.detach() - logp).clamp(max=math.log(2 * clamp + 2))  # (N, C)
    return (torch.exp(u) - u - 1).clamp(max=clamp)  # (N, C)


def _count(n, local: Tensor) -> Tensor:
    n = local if n is None else torch.as_tensor(n, dtype=local.dtype, device=local.device)
    return n.clamp(min=1)


# Eq. (11)
def perception_loss(
    logp: Tensor,
    mv_logp,
    ma_logp,
    e_v: Tensor,
    e_a: Tensor,
    mask: Tensor,
    gamma: float = 0.02,
    eta: float = 0.03,
    clamp: float = 10.0,
    num_evidence=None,
    num_tokens=None,
):
    """L_op = -gamma (KL^v + KL^a) + eta H, KL^m = sum_t e^m_t d^m_t / max(1, sum_t e^m_t),
    H = -mean_t logp_t over all response tokens.

    logp (N, C) full-input log-probs with gradient; mv_logp, ma_logp (N, C) log-probs with the
    video / audio masked, or None to drop that term; e_v, e_a (N, C) evidence masks; mask (N, C).
    num_evidence = (n_v, n_a) and num_tokens: global counts across ranks and micro-batches
    (default: this call's), so micro-batch losses sum to the batch loss.
    """
    N, C = logp.shape
    for name, t in (
        ("mv_logp", mv_logp),
        ("ma_logp", ma_logp),
        ("e_v", e_v),
        ("e_a", e_a),
        ("mask", mask),
    ):
        if t is not None and tuple(t.shape) != (N, C):
            raise ValueError(
                f"perception_loss.perception_loss: `{name}` has shape {tuple(t.shape)}, "
                f"expected {(N, C)}"
            )
    pad = ~mask.bool()  # (N, C)
    m = (~pad).to(logp.dtype)  # (N, C)
    logp = logp.masked_fill(pad, 0.0)  # (N, C) garbage at padding gets neither value nor gradient
    n_glob = (None, None) if num_evidence is None else num_evidence

    kl, kl_local, n_local = {}, {}, {}
    for mod, masked, e, n_g in zip(MODALITIES, (mv_logp, ma_logp), (e_v, e_a), n_glob):
        e = e.to(logp.dtype) * m  # (N, C) evidence never sits on padding
        n_local[mod] = e.sum()
        if masked is None:
            kl[mod] = kl_local[mod] = logp.new_zeros(())
            continue
        d = token_divergence(logp, masked.detach().masked_fill(pad, 0.0), clamp)  # (N, C)
        s = (e * d).sum()
        kl[mod] = s / _count(n_g, n_local[mod])  # 0 when there is no m-evidence
        kl_local[mod] = s.detach() / n_local[mod].clamp(min=1)
    H = -(logp * m).sum() / _count(num_tokens, m.sum())
    loss = -gamma * (kl["visual"] + kl["acoustic"]) + eta * H

    n = m.sum().clamp(min=1)
    entropy = (-(logp * m).sum() / n).detach()
    metrics = {
        # over this call's tokens, like every metric; the loss uses the global counts
        "op_loss": -gamma * (kl_local["visual"] + kl_local["acoustic"]) + eta * entropy,
        "kl_visual": kl_local["visual"],
        "kl_acoustic": kl_local["acoustic"],
        "n_visual": n_local["visual"],
        "n_acoustic": n_local["acoustic"],
        "share_visual": n_local["visual"] / n,
        "share_acoustic": n_local["acoustic"] / n,
        "entropy": entropy,
    }
    return loss, metrics
