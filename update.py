"""The update of one step: the loss on micro-batches of clips, its backward, the optimizer step.

The policy's log-probs are recomputed with gradient, `--micro_batch` clips at a time
(microbatch.py), and each micro-batch's loss is back-propagated at once, so the gradient of the
step's loss accumulates in the parameters. With `--masked_grad` (form (b) of Eq. 10) each
micro-batch's rows with evidence are also scored under x\\v and x\\a, with gradient. The losses
are normalised by global counts (tokens, sequences, evidence tokens over every rank and
micro-batch), so the micro-batches' and ranks' losses add up to the loss of the whole batch
(docs/method.md, section 4).
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
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
    # pi_old(o_t | x\v, o_<t) and pi_old(o_t | x\a, o_<t), Eq. (10), on the rows with evidence:
    # constants (form (a)); unread with --masked_grad
    logp_no_video: Tensor
    logp_no_audio: Tensor
    # form (b), --masked_grad: (x\v, x\a) themselves (rollout.masked_inputs), which `backward`
    # scores with gradient; None in form (a)
    masked: tuple | None = None


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
    scored = None
    if args.perception_loss and args.masked_grad:
        scored = scored_tokens(evidence, mask)
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
            mv_logp = evidence.logp_no_video[rows]  # (n, C)
            ma_logp = evidence.logp_no_audio[rows]  # (n, C)
            if args.masked_grad:
                # Eq. (10), form (b): these clips under x\v and x\a, now, with gradient
                mv_logp, ma_logp, zero = masked_branch(policy, roll, evidence, c0, c1, video, audio)
                blank = blank + zero
            # Eqs. (9)-(11)
            op_loss, op_parts = perception_loss.perception_loss(
                logp,
                mv_logp,
                ma_logp,
                evidence.visual[rows],
                evidence.acoustic[rows],
                mask[rows],
                gamma=args.gamma,
                eta=args.eta,
                clamp=args.clamp,
                num_evidence=(n_v, n_a),
                num_tokens=n_tok,
                masked_grad=args.masked_grad,
                eta_masked=args.eta_masked,
                num_scored=scored,
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


# ---------------------------------------------------------------- form (b) of Eq. (10)
def scored_tokens(evidence, mask):
    """The normalisers of H^v and H^a (perception_loss): the response tokens of the rows with
    visual (acoustic) evidence, summed over ranks."""
    visual = (mask * evidence.visual.any(1, keepdim=True)).sum()
    acoustic = (mask * evidence.acoustic.any(1, keepdim=True)).sum()
    return parallel.global_sum(visual, acoustic)


# Eq. (10), form (b)
def masked_branch(policy, roll, evidence, c0, c1, video, audio):
    """log pi_theta(o_t | x\\v, o_<t) and log pi_theta(o_t | x\\a, o_<t) of the rows of clips
    [c0, c1), (n, C) each, with gradient, on the rows with that modality's evidence (0 on the
    others), and a zero for the loss (scoring.encode_media).

    video, audio: the full-input pass's tower outputs of these clips. x\\v changes only the
    video, so only the vision tower runs again, on the masked frames, and the audio output is
    shared; x\\a the other way round.
    """
    rows = slice(c0 * roll.G, c1 * roll.G)
    no_video, no_audio = evidence.masked
    need_v = evidence.visual[rows].any(1)  # (n,)
    need_a = evidence.acoustic[rows].any(1)  # (n,)
    mv_logp, zero_v = masked_pass(policy, roll, no_video, "video", c0, c1, (video, audio), need_v)
    ma_logp, zero_a = masked_pass(policy, roll, no_audio, "audio", c0, c1, (video, audio), need_a)
    return mv_logp, ma_logp, zero_v + zero_a


def masked_pass(policy, roll, masked, modality, c0, c1, towers, need):
    """log pi_theta(o_t | x\\m, o_<t) with gradient on the rows of clips [c0, c1) flagged in
    need (n,), 0 on the others, (n, C); and a zero for the loss.

    masked: x\\m of the whole batch; towers: (video, audio) of the full-input pass. Under FSDP2
    every rank runs the same forwards (parallel.gather_towers): a rank with no row to score scores
    its first row, and the zero is 0 x its log-probs.
    """
    completion_ids = roll.completion_ids[c0 * roll.G : c1 * roll.G]  # (n, C)
    logp = torch.zeros(completion_ids.shape, device=completion_ids.device)  # (n, C)
    sharded = dist.get_world_size() > 1
    idx = need.nonzero().squeeze(1)  # (r,)
    if not len(idx) and not sharded:
        return logp, 0.0
    clips = microbatch.clips(policy, masked, c0, c1, roll.positions)
    video, audio = towers
    # the tower of the masked modality again, on x\m
    if modality == "video":
        video, zero = encode_masked(policy, clips.batch, "video")
    else:
        audio, zero = encode_masked(policy, clips.batch, "audio")
    inputs = scoring.expand(clips.batch, roll.G, video, audio, clips.positions)
    if not len(idx):
        first = torch.zeros(1, dtype=torch.long, device=need.device)  # (1,)
        unused = scoring.logprobs(policy, scoring.select(policy, inputs, first), completion_ids[:1])
        return logp, zero + 0 * unused.sum()
    scored = scoring.logprobs(policy, scoring.select(policy, inputs, idx), completion_ids[idx])
    return logp.index_put((idx,), scored), zero  # (n, C)


def encode_masked(policy, batch, modality):
    """The tower of `modality` on a masked batch, with gradient, and a zero for the loss: under
    FSDP2 a rank whose clips lack the modality runs the tower on a blank input (as
    scoring.encode_media does)."""
    if modality == "video":
        out = scoring.encode_video(policy, batch)
    else:
        out = scoring.encode_audio(policy, batch)
    if out is not None or dist.get_world_size() == 1:
        return out, 0.0
    device = batch["input_ids"].device
    if modality == "video":
        blank = scoring.blank_video(policy, device).pooler_output[0]
    else:
        blank = scoring.blank_audio(policy, device).last_hidden_state
    return None, 0 * blank.sum()


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
