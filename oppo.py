"""The GRPO update of OPPO: group-relative advantage, clipped surrogate, k3 KL, aggregation.

Eqs. (5)-(8) and (12) (docs/method.md, sections 3 and 4) as pure functions of tensors that return
`(loss, metrics)`: no model calls and no torch.distributed, so each can be read beside the
equations and tested without a model. The Omni-Perception Loss, Eqs. (9)-(11), is in
perception_loss.py. At the end, `update`: the step's loss, Eq. (12), back-propagated over
micro-batches of clips, with the policy's log-probs recomputed with gradient.
Shapes: N completions in the (micro-)batch, the G samples of each prompt contiguous (N = B * G);
C completion positions, right-padded, `mask` (N, C) is 1 on response tokens and 0 on padding.
Metrics are detached 0-dim tensors computed over this call's tokens alone; the losses take
global counts (`num_tokens`, `num_seqs`) so micro-batch and per-rank losses sum to the batch loss.

Where this implementation departs from or fills in the paper: docs/method.md, section 11.
"""

import torch
import torch.distributed as dist
from torch import Tensor

import perception_loss
from runtime import parallel
from thinker import encoders, microbatch, scoring
from variants import masked_grad

AGGREGATIONS = ("token-mean", "seq-mean")


def _check_shape(fn: str, name: str, t, shape) -> None:
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"oppo.{fn}: `{name}` has shape {tuple(t.shape)}, expected {tuple(shape)}")


def normaliser(n, local: Tensor) -> Tensor:
    """The count a loss is divided by: the global count `n` when given (int or tensor), else
    `local`; at least 1."""
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
        return (x * mask).sum() / normaliser(num_tokens, mask.sum())
    if agg == "seq-mean":
        per_seq = (x * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # (N,)
        return per_seq.sum() / normaliser(num_seqs, mask.new_tensor(float(x.shape[0])))
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
    response = (~pad).to(logp.dtype)  # (N, C) 1.0 on response tokens, 0.0 on padding
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
    loss = aggregate(pg + beta * kl, response, agg, num_tokens, num_seqs)

    n = response.sum().clamp(min=1)  # local response-token count, for the diagnostics only
    with torch.no_grad():
        metrics = {
            "pg_loss": aggregate(pg, response, agg),  # over this call's tokens, like every metric
            "kl": (kl * response).sum() / n,
            "clip_ratio/low_mean": (clipped_low * response).sum() / n,
            "clip_ratio/high_mean": (clipped_high * response).sum() / n,
            "clip_ratio/region_mean": ((clipped_low | clipped_high) * response).sum() / n,
            "ratio_mean": (ratio * response).sum() / n,
            # -log pi of the sampled tokens is a one-sample estimate of the policy's entropy
            "entropy": -(logp * response).sum() / n,
        }
    return loss, metrics


# Eq. (12)
def total_loss(pg_loss: Tensor, op_loss=None) -> Tensor:
    """L = agg(pg_t + beta kl_t) + L_op: `pg_loss` is policy_loss's output (KL included),
    `op_loss` perception_loss's, or None for plain GRPO."""
    return pg_loss if op_loss is None else pg_loss + op_loss


# ---------------------------------------------------------------- the update
# Eq. (12), over micro-batches
def update(args, policy, roll, adv, evidence):
    """Back-propagate the step's loss L = agg(pg_t + beta kl_t) + L_op, `--micro_batch` clips
    at a time: each micro-batch's loss is back-propagated at once, so the gradient of the step's
    loss accumulates in the parameters.

    roll: rollout.Rollout; adv (N,) from group_advantages; evidence: perception_loss.Evidence.
    Every term is normalised by global counts (tokens, sequences, evidence tokens over every rank
    and micro-batch), so the micro-batches' and ranks' losses add up to the batch's loss.
    Returns the metrics: "loss", summed over micro-batches and times the world size (the mean
    over ranks is the global loss), and each loss part, a mean weighted by rows.
    """
    mask = roll.completion_mask.float()  # (N, C)
    e_v, e_a = evidence.visual, evidence.acoustic
    counts = parallel.global_sum(mask.sum(), len(mask), e_v.sum(), e_a.sum())
    B = len(roll.media["input_ids"])
    metrics = {"loss": 0.0}
    for c0, c1 in microbatch.ranges(B, args.micro_batch):
        loss, parts, towers = microbatch_loss(args, policy, roll, adv, evidence, counts, c0, c1)
        loss = parallel.backward(loss, *towers)
        # each part is a mean over this micro-batch's rows: weighted by their share of the batch
        for key, value in parts.items():
            metrics[key] = metrics.get(key, 0.0) + float(value) * (c1 - c0) / B
        metrics["loss"] += float(loss * dist.get_world_size())
    # the global counts the losses were normalised by
    n_tok, _, n_v, n_a = counts
    metrics.update(tokens=n_tok, n_visual=n_v, n_acoustic=n_a)
    return metrics


# Eq. (12)
def microbatch_loss(args, policy, roll, adv, evidence, counts, c0, c1):
    """L of clips [c0, c1) and their G rows each, with gradient: (loss, parts, the passes'
    thinker.encoders.Towers). counts: global (tokens, sequences, e^v tokens, e^a tokens)."""
    n_tok, n_seq, n_v, n_a = counts
    rows = slice(c0 * roll.G, c1 * roll.G)
    mask = roll.completion_mask[rows].float()  # (n, C)
    clips = microbatch.clips(policy, roll.media, c0, c1, roll.positions)
    towers = [encoders.encode_media(policy, clips.batch)]
    inputs = scoring.expand(clips.batch, roll.G, towers[0].video, towers[0].audio, clips.positions)
    logp = scoring.logprobs(policy, inputs, roll.completion_ids[rows])  # (n, C)
    ref_logp = roll.ref_logp[rows] if args.beta > 0 else None  # (n, C)
    # Eqs. (6)-(8); one update per rollout, so pi_old is pi_theta itself, detached
    pg_loss, parts = policy_loss(
        logp,
        logp.detach(),
        ref_logp,
        adv[rows],
        mask,
        beta=args.beta,
        eps_low=args.eps_low,
        eps_high=args.eps_high,
        agg=args.agg,
        num_tokens=n_tok,
        num_seqs=n_seq,
    )
    if not args.perception_loss:
        return total_loss(pg_loss), parts, towers
    mv_logp = evidence.logp_no_video[rows]  # (n, C)
    ma_logp = evidence.logp_no_audio[rows]  # (n, C)
    if args.masked_grad:
        # Eq. (10) in form (b): these clips under x\v and x\a, now, with gradient
        branch = masked_grad.branch(policy, roll, evidence, c0, c1, towers[0])
        mv_logp, ma_logp = branch.logp_no_video, branch.logp_no_audio
        towers += branch.towers
    # Eqs. (9)-(11)
    op_loss, op_parts = perception_loss.perception_loss(
        logp,
        mv_logp,
        ma_logp,
        evidence.visual[rows],
        evidence.acoustic[rows],
        mask,
        gamma=args.gamma,
        eta=args.eta,
        clamp=args.clamp,
        num_evidence=(n_v, n_a),
        num_tokens=n_tok,
        masked_grad=args.masked_grad,
    )
    parts.update(op_parts)
    if args.masked_grad:
        op_loss = op_loss + masked_grad.entropy_term(args.eta_masked, branch, parts)
    return total_loss(pg_loss, op_loss), parts, towers
