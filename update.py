"""The update of one step: the loss on micro-batches of clips, its backward, the optimizer step.

The policy's log-probs are recomputed with gradient, `--micro_batch` clips at a time
(microbatch.py), and each micro-batch's loss is back-propagated at once, so the gradient of the
step's loss accumulates in the parameters. The losses are normalised by global counts (tokens,
sequences, evidence tokens over every rank and micro-batch), so the micro-batches' and ranks'
losses add up to the loss of the whole batch (docs/method.md, section 4).
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

import microbatch
import oppo
import parallel
import perception_loss
import scoring


@dataclass
class Evidence:
    """What the Omni-Perception Loss reads besides the log-probs, (N, C) each; all 0 without it."""

    # e^v and e^a, Eq. (9): 1 on the tokens of clauses routed to vision (audio)
    visual: Tensor
    acoustic: Tensor
    # pi_old(o_t | x\v, o_<t) and pi_old(o_t | x\a, o_<t), Eq. (10), on the rows with evidence
    logp_no_video: Tensor
    logp_no_audio: Tensor


# Eq. (12)
def backward(args, policy, roll, adv, evidence, counts, world):
    """Back-propagate the step's loss L = L_GRPO + L_op, one micro-batch of clips at a time.

    adv (N,) from oppo.group_advantages; counts = (tokens, sequences, visual evidence tokens,
    acoustic evidence tokens), global sums. Returns the metrics: the loss, summed over the
    micro-batches, and the loss parts, each the mean over the micro-batches weighted by rows.
    """
    n_tok, n_seq, n_v, n_a = counts
    G = roll.G
    mask = roll.completion_mask.float()  # (N, C)
    N = len(mask)
    metrics = {}
    for c0, c1 in microbatch.ranges(len(roll.media["input_ids"]), args.micro_batch):
        rows = slice(c0 * G, c1 * G)
        clips = microbatch.clips(policy, roll.media, c0, c1, roll.positions)
        # the towers with gradient; blank is 0 (scoring.encode_media)
        video, audio, blank = scoring.encode_media(policy, clips.batch)
        inputs = scoring.expand(clips.batch, G, video, audio, clips.positions)
        logp = scoring.logprobs(policy, inputs, roll.completion_ids[rows])  # (n, C)
        ref_logp = None
        if args.beta > 0:
            ref_logp = roll.ref_logp[rows]  # (n, C)
        # Eqs. (6)-(8)
        pg_loss, parts = oppo.policy_loss(
            logp,
            logp.detach(),
            ref_logp,
            adv[rows],
            mask[rows],
            beta=args.beta,
            eps_low=args.eps_low,
            eps_high=args.eps_high,
            agg=args.agg,
            num_tokens=n_tok,
            num_seqs=n_seq,
        )
        op_loss = None
        if args.perception_loss:
            # Eqs. (9)-(11)
            op_loss, op_parts = perception_loss.perception_loss(
                logp,
                evidence.logp_no_video[rows],
                evidence.logp_no_audio[rows],
                evidence.visual[rows],
                evidence.acoustic[rows],
                mask[rows],
                gamma=args.gamma,
                eta=args.eta,
                clamp=args.clamp,
                num_evidence=(n_v, n_a),
                num_tokens=n_tok,
            )
            parts.update(op_parts)
        loss = oppo.total_loss(pg_loss, op_loss) + blank
        # gradients are summed over ranks (parallel.shard): each rank's loss is its share
        loss.backward()
        # each part is a mean over this micro-batch's rows: weighted by their share of the batch
        share = (c1 - c0) * G / N
        for key, value in parts.items():
            metrics[key] = metrics.get(key, 0.0) + float(value) * share
        # the loss adds up over micro-batches; x world: the mean over ranks is the global loss
        metrics["loss"] = metrics.get("loss", 0.0) + float(loss.detach() * world)
    return metrics


# ---------------------------------------------------------------- the optimizer
def optimizer(policy, lr, weight_decay, warmup):
    """AdamW, and a schedule that warms the learning rate up linearly over `warmup` steps."""
    optim = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, warmup)

    def warmup_factor(step):
        return min(1.0, (step + 1) / warmup)

    return optim, torch.optim.lr_scheduler.LambdaLR(optim, warmup_factor)


def optimizer_step(policy, optim, sched, loss, grad_clip):
    """Clip the gradient norm and step, unless the loss or the norm is not finite: then the
    step's gradient is dropped and the weights stay. Returns (grad norm, finite)."""
    parallel.reshard_after_step(policy)
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), grad_clip)
    # a DTensor under FSDP2
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    grad_norm = float(grad_norm)
    # the same verdict on every rank
    global_loss = parallel.global_sum(loss)[0]
    finite = math.isfinite(grad_norm) and math.isfinite(global_loss)
    if finite:
        optim.step()
    optim.zero_grad(set_to_none=True)
    sched.step()
    return grad_norm, finite
