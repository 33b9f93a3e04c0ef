r"""The Omni-Perception Loss of OPPO: evidence-token routing and the masked-input divergence.

Eqs. (9)-(11), docs/method.md, section 5. A completion's <think> clauses are routed to the
modality whose cues they state (Eq. 9, from matching/matcher.py's clause-cue similarities); the
tokens whose characters fall in those clauses (matching/alignment.py) are the evidence tokens.
On them the policy's log-probs under the full input x are compared with its log-probs under x\v
(video masked) and x\a (audio masked) (Eq. 10), and the loss rewards a large divergence: a
visual claim that is as likely without the video did not come from the video (Eq. 11). An
entropy term and a per-token clamp keep that unbounded objective in check. The masked log-probs
are constants (form (a) of Eq. 10, rollout.masked_logprobs) or, with `--masked_grad`, carry
gradient (form (b), variants/masked_grad.py).
Losses are pure functions of tensors returning `(loss, metrics)`; shapes as in oppo.py: N
completions, C right-padded completion positions, `mask` (N, C) 1 on response tokens. Metrics
are detached 0-dim tensors over this call's tokens alone.
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from corpora import decompose
from matching import alignment

MODALITIES = ("visual", "acoustic")


def _best_similarity(S: Tensor) -> Tensor:
    """max_j S[k, j] for each clause k, (K,); -inf for every clause when there are no cues."""
    if S.shape[1] == 0:
        return torch.full((S.shape[0],), float("-inf"), device=S.device)  # (K,)
    return S.max(dim=1).values  # (K,)


# Eq. (9)
def route_clauses(S_visual, S_acoustic, tau: float = 0.5) -> list:
    """Route each clause k: "visual" iff max_j S^v[k, j] > tau and > max_j S^a[k, j];
    "acoustic" symmetrically; None (neutral) otherwise, ties included.

    S_visual (K, Jv), S_acoustic (K, Ja) cosine similarities of K clauses to the cues; a modality
    without cues (J = 0) counts as -inf. S^e plays no part: an emotion conclusion that matches no
    visual or acoustic cue stays neutral.
    """
    Sv = torch.as_tensor(S_visual).float()  # (K, Jv)
    Sa = torch.as_tensor(S_acoustic).float()  # (K, Ja)
    if Sv.dim() != 2 or Sa.dim() != 2 or Sv.shape[0] != Sa.shape[0]:
        raise ValueError(
            "perception_loss.route_clauses: `S_visual` and `S_acoustic` must be (K, J) "
            f"with the same K; got {tuple(Sv.shape)} and {tuple(Sa.shape)}"
        )
    best_v = _best_similarity(Sv)  # (K,)
    best_a = _best_similarity(Sa)  # (K,)
    is_visual = ((best_v > tau) & (best_v > best_a)).tolist()
    is_acoustic = ((best_a > tau) & (best_a > best_v)).tolist()
    routes = []
    for visual, acoustic in zip(is_visual, is_acoustic):
        if visual:
            routes.append("visual")
        elif acoustic:
            routes.append("acoustic")
        else:
            routes.append(None)
    return routes


# Eq. (9), the openers
def route_openers(text, spans, routes):
    """The routes with each neutral clause that opens a modality's section ("In the video",
    "In the audio": a clause of its own, which matches no cue) routed to that modality: the
    decision to open a sentence about m is part of e^m. spans: the clauses' character spans in
    `text`; routes: route_clauses' output."""
    out = []
    for (start, end), route in zip(spans, routes):
        lead = decompose.lead_in(text[start:end])
        if route is None and lead in MODALITIES:
            route = lead
        out.append(route)
    return out


def _overlaps(token_spans: Tensor, clause_spans: Tensor) -> Tensor:
    """(T,) bool: which of T token spans [start, end) overlap any of K clause spans."""
    token_start = token_spans[:, None, 0]  # (T, 1)
    token_end = token_spans[:, None, 1]  # (T, 1)
    clause_start = clause_spans[None, :, 0]  # (1, K)
    clause_end = clause_spans[None, :, 1]  # (1, K)
    # two half-open intervals overlap when each starts before the other ends
    token_starts_first = token_start < clause_end  # (T, K)
    clause_starts_first = clause_start < token_end  # (T, K)
    # an empty token span (a skipped special token) overlaps nothing
    non_empty = token_start < token_end  # (T, 1)
    overlap = token_starts_first & clause_starts_first & non_empty  # (T, K)
    return overlap.any(dim=1)  # (T,)


# Eq. (9)
def evidence_masks(
    tokenizer, completion_ids: Tensor, mask: Tensor, sims, tau: float = 0.5, texts=None
):
    """Token masks e^v, e^a (N, C) float: 1 where a token's characters overlap a clause routed
    to that modality (route_clauses, its section openers included: route_openers), 0 elsewhere
    and on padding.

    completion_ids (N, C) generated ids; mask (N, C) marks the ids that were decoded (with
    skip_special_tokens=True) into completion i; sims[i] has `.spans` (clause character spans
    in that string) and `.S` {"visual": (K, Jv), "acoustic": (K, Ja), ...} (matcher.Sim).
    texts (optional list of the completion strings) checks that the decodes agree.
    """
    N, C = completion_ids.shape
    if tuple(mask.shape) != (N, C) or len(sims) != N:
        raise ValueError(
            f"perception_loss.evidence_masks: `mask` {tuple(mask.shape)} and "
            f"len(sims)={len(sims)} must match completion_ids {(N, C)}"
        )
    evidence = {}
    for m in MODALITIES:
        evidence[m] = torch.zeros(N, C, device=completion_ids.device)  # (N, C)
    for i, sim in enumerate(sims):
        routes = route_clauses(sim.S["visual"], sim.S["acoustic"], tau)
        if len(routes) != len(sim.spans):
            raise ValueError(
                f"perception_loss.evidence_masks: sims[{i}] has {len(sim.spans)} clause spans "
                f"but {len(routes)} rows in S"
            )
        positions = mask[i].bool().nonzero().squeeze(1)  # (T,)
        ids = completion_ids[i, positions].tolist()
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if texts is not None and text != texts[i]:
            raise ValueError(
                f"perception_loss.evidence_masks: completion {i} does not decode to texts[{i}]"
            )
        routes = route_openers(text, sim.spans, routes)
        # no evidence clause: no alignment needed
        if not any(routes):
            continue
        char_spans = alignment.token_char_spans(tokenizer, ids)
        token_spans = torch.tensor(char_spans, dtype=torch.long).view(-1, 2)  # (T, 2)
        for m in MODALITIES:
            routed = [span for span, route in zip(sim.spans, routes) if route == m]
            clause_spans = torch.tensor(routed, dtype=torch.long).view(-1, 2)  # (K_m, 2)
            is_evidence = _overlaps(token_spans, clause_spans)  # (T,)
            evidence[m][i, positions] = is_evidence.float().to(evidence[m].device)  # (T,)
    return evidence["visual"], evidence["acoustic"]


@dataclass
class Evidence:
    """What the Omni-Perception Loss reads besides the policy's log-probs, (N, C) each."""

    # e^v and e^a, Eq. (9): 1 on the tokens of clauses routed to vision (audio)
    visual: Tensor
    acoustic: Tensor
    # pi_old(o_t | x\v, o_<t) and pi_old(o_t | x\a, o_<t), Eq. (10) in form (a), on the rows
    # with evidence (0 on the others, never read); unread in form (b)
    logp_no_video: Tensor
    logp_no_audio: Tensor
    # form (b), --masked_grad: (x\v, x\a) themselves, which the update scores with gradient
    masked: tuple | None = None


# Eq. (10)
def token_divergence(logp: Tensor, masked_logp: Tensor, clamp: float = 10.0) -> Tensor:
    """d_t = min(exp(u) - u - 1, clamp), u = masked_logp - logp: the k3 estimator of oppo.k3,
    KL(pi(.|x) || pi(.|x\\m)) per token, clamped against "KL hacking" (PAPO).

    (N, C) each. In form (a) masked_logp is a constant (a no-grad pass of the pre-update
    policy); in form (b) it carries gradient, and so does d through it.
    """
    # cap u where d already exceeds the clamp (d(log(2c + 2)) >= c): exp cannot overflow, and
    # the clamp's zero gradient never meets an inf from exp (0 * inf = NaN)
    u = (masked_logp - logp).clamp(max=math.log(2 * clamp + 2))  # (N, C)
    return (torch.exp(u) - u - 1).clamp(max=clamp)  # (N, C)


# Eq. (11), one modality
def masked_kl(logp: Tensor, masked_logp, e: Tensor, response: Tensor, clamp: float, n=None):
    """KL^m = sum_t e^m_t d^m_t / max(1, n), n the evidence count (default this call's).

    logp (N, C) with padding zeroed; masked_logp (N, C) or None (the term is 0); e (N, C)
    evidence mask; response (N, C) 1.0 on response tokens.
    """
    if masked_logp is None:
        return logp.new_zeros(())
    # evidence never sits on padding
    e = e.to(logp.dtype) * response  # (N, C)
    masked_logp = masked_logp.masked_fill(response == 0, 0.0)  # (N, C)
    d = token_divergence(logp, masked_logp, clamp)  # (N, C)
    # 0 / 1 when there is no m-evidence
    n = e.sum() if n is None else torch.as_tensor(n, dtype=e.dtype, device=e.device)
    return (e * d).sum() / n.clamp(min=1)


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
    num_evidence=(None, None),
    num_tokens=None,
    masked_grad: bool = False,
):
    """L_op = -gamma (KL^v + KL^a) + eta H, H = -mean_t logp_t over all response tokens.

    logp (N, C) full-input log-probs with gradient; mv_logp, ma_logp (N, C) log-probs with the
    video / audio masked (Eq. 10), or None to drop that term; e_v, e_a (N, C) evidence masks
    (Eq. 9); mask (N, C). num_evidence = (n_v, n_a) and num_tokens: global counts across ranks
    and micro-batches (default: this call's), so micro-batch losses sum to the batch loss.
    masked_grad: form (b) of Eq. (10), the gradient reaches mv_logp and ma_logp too; False, form
    (a): they are constants. Returns (loss, metrics); the metrics are over this call's tokens
    (`perception_metrics`).
    """
    N, C = logp.shape
    _check_shapes((N, C), mv_logp=mv_logp, ma_logp=ma_logp, e_v=e_v, e_a=e_a, mask=mask)
    response = mask.bool().to(logp.dtype)  # (N, C) 1.0 on response tokens, 0.0 on padding
    # garbage at padding gets neither value nor gradient
    logp = logp.masked_fill(response == 0, 0.0)  # (N, C)
    if not masked_grad:
        mv_logp = None if mv_logp is None else mv_logp.detach()
        ma_logp = None if ma_logp is None else ma_logp.detach()
    n_v, n_a = num_evidence
    kl_v = masked_kl(logp, mv_logp, e_v, response, clamp, n_v)
    kl_a = masked_kl(logp, ma_logp, e_a, response, clamp, n_a)
    n = (
        response.sum()
        if num_tokens is None
        else torch.as_tensor(num_tokens, dtype=logp.dtype, device=logp.device)
    )
    H = -(logp * response).sum() / n.clamp(min=1)
    loss = -gamma * (kl_v + kl_a) + eta * H
    metrics = perception_metrics(logp, mv_logp, ma_logp, e_v, e_a, response, gamma, eta, clamp)
    return loss, metrics


@torch.no_grad()
def perception_metrics(logp, mv_logp, ma_logp, e_v, e_a, response, gamma, eta, clamp):
    """L_op's parts over this call's tokens alone, detached 0-dim tensors (the loss itself is
    normalised by global counts); the arguments as perception_loss has them."""
    n = response.sum().clamp(min=1)
    n_v = (e_v.to(logp.dtype) * response).sum()
    n_a = (e_a.to(logp.dtype) * response).sum()
    kl_v = masked_kl(logp, mv_logp, e_v, response, clamp)
    kl_a = masked_kl(logp, ma_logp, e_a, response, clamp)
    entropy = -(logp * response).sum() / n
    return {
        "op_loss": -gamma * (kl_v + kl_a) + eta * entropy,
        "kl_visual": kl_v,
        "kl_acoustic": kl_a,
        "n_visual": n_v,
        "n_acoustic": n_a,
        "share_visual": n_v / n,
        "share_acoustic": n_a / n,
        "entropy": entropy,
    }


def _check_shapes(shape, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(
                f"perception_loss.perception_loss: `{name}` has shape {tuple(t.shape)}, "
                f"expected {shape}"
            )
