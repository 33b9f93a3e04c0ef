r"""Eq. (10) in form (b): the masked branch trained, with the masked distribution's entropy.

In form (a) (rollout.masked_logprobs) the log-probs under x\v and x\a are constants from a
no-grad pass of the pre-update policy, so the Omni-Perception Loss moves only the full-input
policy. With `--masked_grad` the update scores x\v and x\a itself, with gradient, micro-batch by
micro-batch, on the rows with that modality's evidence: the divergence of Eq. (10) then also
pushes the masked policy away from the full-input claims, which changes what the policy writes
when a modality is missing (what faithfulness measures). As in PAPO's "double entropy", the
masked branch gets an entropy term of its own:

    L_op += eta_masked * (H^v + H^a),   H^m = mean_t H(pi_theta(. | x\m, o_<t))

over the response tokens of the rows with m-evidence, with H(p) = -sum_w p(w) log p(w) the
entropy of the masked next-token distribution itself (docs/method.md, section 5). Its estimate
-log pi(o_t | x\m) on the full-input sample's tokens would be a cross-entropy, whose descent
raises the masked probability of exactly the claims the divergence pushes down.
Shapes as in oppo.py: clips [c0, c1) own the n = (c1 - c0) * G rows of a micro-batch.
"""

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import rollout
from runtime import parallel
from thinker import encoders, microbatch, scoring


@dataclass
class MaskedInputs:
    """x\\v and x\\a of a step's batch, and the global counts of the tokens H^v and H^a average
    over (the response tokens of the rows with visual, acoustic evidence, over every rank)."""

    no_video: dict
    no_audio: dict
    scored: tuple


@dataclass
class Branch:
    """The masked branch of one micro-batch: log-probs (n, C) under x\\v and x\\a with gradient
    (0 on rows without that evidence), the sums of H over their scored tokens, and the passes'
    Towers (parallel.backward)."""

    logp_no_video: torch.Tensor
    logp_no_audio: torch.Tensor
    entropy_sums: dict
    local_counts: dict
    # MaskedInputs.scored: the global counts H^v and H^a are normalised by
    scored: tuple
    towers: list = field(default_factory=list)


def masked_inputs(roll, e_v, e_a, rho, seed):
    """MaskedInputs of a step (phase 4 of train.oppo_step), drawn as form (a)'s are."""
    no_video, no_audio = rollout.masked_inputs(roll.media, rho, seed)
    mask = roll.completion_mask.float()  # (N, C)
    visual = (mask * e_v.any(1, keepdim=True)).sum()
    acoustic = (mask * e_a.any(1, keepdim=True)).sum()
    return MaskedInputs(no_video, no_audio, tuple(parallel.global_sum(visual, acoustic)))


# Eq. (10), form (b)
def branch(policy, roll, evidence, c0, c1, towers):
    """The Branch of clips [c0, c1). towers: the full-input pass's Towers of these clips. x\\v
    changes only the video, so only the vision tower runs again, on the masked frames, and the
    audio output is shared; x\\a the other way round."""
    rows = slice(c0 * roll.G, c1 * roll.G)
    out = Branch(None, None, {}, {}, evidence.masked.scored)
    passes = (
        ("visual", "video", evidence.masked.no_video, evidence.visual[rows].any(1)),
        ("acoustic", "audio", evidence.masked.no_audio, evidence.acoustic[rows].any(1)),
    )
    for sense, modality, masked, need in passes:
        logp, entropy_sum, count, rerun = masked_rows_with_grad(
            policy, roll, masked, modality, c0, c1, towers, need
        )
        setattr(out, f"logp_no_{modality}", logp)
        out.entropy_sums[sense] = entropy_sum
        out.local_counts[sense] = count
        out.towers.append(rerun)
    return out


def masked_rows_with_grad(policy, roll, masked, modality, c0, c1, towers, need):
    """log pi_theta(o_t | x\\m, o_<t), (n, C), with gradient on the rows of clips [c0, c1)
    flagged in need (n,), 0 on the others; the sum of the masked entropies over their response
    tokens, the count of those tokens, and the re-run tower's Towers.

    Under FSDP2 a rank with no such row still scores its first row, weighted 0, so that every
    rank joins every unit's backward.
    """
    completion_ids = roll.completion_ids[c0 * roll.G : c1 * roll.G]  # (n, C)
    mask = roll.completion_mask[c0 * roll.G : c1 * roll.G].float()  # (n, C)
    logp = torch.zeros(completion_ids.shape, device=completion_ids.device)  # (n, C)
    zero = logp.new_zeros(())
    idx = need.nonzero().squeeze(1)  # (r,)
    if not len(idx) and dist.get_world_size() == 1:
        return logp, zero, zero, encoders.Towers()
    clips = microbatch.clips(policy, masked, c0, c1, roll.positions)
    # the tower of the masked modality again, on x\m; the other's output is the full pass's
    rerun = encoders.encode_tower(policy, clips.batch, modality)
    video = rerun.video if modality == "video" else towers.video
    audio = rerun.audio if modality == "audio" else towers.audio
    inputs = scoring.expand(clips.batch, roll.G, video, audio, clips.positions)
    if not len(idx):
        first = torch.zeros(1, dtype=torch.long, device=need.device)  # (1,)
        unused = scoring.logprobs(policy, scoring.select(policy, inputs, first), completion_ids[:1])
        rerun.in_graph = rerun.in_graph + 0 * unused.sum()
        return logp, zero, zero, rerun
    selected = scoring.select(policy, inputs, idx)
    scored, entropy = scoring.logprobs(policy, selected, completion_ids[idx], entropy=True)
    entropy_sum = (entropy * mask[idx]).sum()
    return logp.index_put((idx,), scored), entropy_sum, mask[idx].sum(), rerun


def entropy_term(eta_masked, branch, parts):
    """eta_masked (H^v + H^a) of one micro-batch, each H^m normalised by the global count of the
    tokens it averages over (MaskedInputs.scored), so micro-batches and ranks add up; the local
    means go into parts as masked_entropy_visual and masked_entropy_acoustic."""
    term = 0.0
    for sense, n_global in zip(("visual", "acoustic"), branch.scored):
        entropy_sum = branch.entropy_sums[sense]
        term = term + entropy_sum / max(n_global, 1.0)
        local_mean = entropy_sum.detach() / branch.local_counts[sense].clamp(min=1)
        parts[f"masked_entropy_{sense}"] = local_mean
    return eta_masked * term
