r"""Masked rollouts: completions sampled with a modality masked, their claims of it penalised.

docs/method.md, section 5. The Omni-Perception Loss (Eqs. 9-11) scores completions sampled from
the full input x; faithfulness F^m (section 7) counts what the policy claims when modality m is
absent. With `--masked_rollouts Gm` every OPPO step also samples Gm completions per clip under
x\v and under x\a (rho = 1, the evaluation's mask), rewards each by minus its own CHAIR^m (its
claims routed by Eq. 9 against the training set's whole cue inventory, as eval.py routes the
test set's) plus the format reward, and adds the GRPO surrogate of those samples, scored under
the masked input with gradient, to the step's loss:

    r_i  = -n^m_i / max(1, n^v_i + n^a_i) + w_fmt * R_fmt(o_i)
    A_i  = (r_i - mean_g r) / (std_g r + eps)                      over the clip's Gm samples
    L^m  = agg(pg_t), pg_t of Eq. (6) with beta = 0                 under x\m, own token count
    L    = L_GRPO + L_op + w_mr * (L^v + L^a)

The samples come from the pre-update policy, like the main rollout: their backward joins the
step's gradient before its one optimizer step. Shapes as in oppo.py: N = B * Gm rows, the Gm
samples of a clip contiguous, C completion positions.
"""

import functools
import time

import torch
import torch.distributed as dist

import data
import oppo
import reward
import rollout
from metrics import perception
from runtime import flops, parallel
from thinker import batching, encoders, microbatch, scoring

# each masked modality, and the claims that its absence makes unfounded
CLAIM = {"video": "visual", "audio": "acoustic"}


def modalities(args):
    """The masked modalities of --masked_rollout_modalities, in order; a clear error otherwise."""
    if args.masked_rollouts < 2:
        raise ValueError(
            f"--masked_rollouts {args.masked_rollouts}: the group advantage (Eq. 5) needs at "
            "least 2 samples a clip; 0 turns masked rollouts off"
        )
    names = [name.strip() for name in args.masked_rollout_modalities.split(",")]
    if any(name not in CLAIM for name in names) or len(set(names)) < len(names):
        raise ValueError(
            f"--masked_rollout_modalities {args.masked_rollout_modalities!r}: a comma-separated "
            f"subset of {', '.join(CLAIM)}, each at most once"
        )
    return names


def training_inventory(records):
    """Every visual and every acoustic cue of the training records (train.run_stage passes the
    ones it loaded before the first step)."""
    return perception.cue_inventory([record.get("cues") or {} for record in records])


@functools.cache
def manifest_inventory(manifest):
    """training_inventory of the manifest --data, read on rank 0 once per path: for a caller
    that holds no loaded records (tools/bench.py)."""
    if not manifest:
        raise ValueError("--masked_rollouts routes claims against the cues of --data: it is empty")
    return training_inventory(parallel.from_rank0(data.load_manifest, manifest))


# Eq. (9), then the reward r_i
def claim_rewards(texts, sims, modality, tau=0.5, w_fmt=0.1):
    """r_i = -n^m_i / max(1, n^v_i + n^a_i) + w_fmt * R_fmt(o_i) for N completions.

    sims[i] holds completion i's clause-cue matrices against the cue inventory (matcher.Sim);
    each clause counts as the claim Eq. (9) routes it to. Returns (rewards, claim shares,
    formats), (N,) each.
    """
    if len(texts) != len(sims):
        raise ValueError(f"masked_rollout.claim_rewards: {len(texts)} texts, {len(sims)} sims")
    shares = []
    formats = []
    for text, sim in zip(texts, sims):
        counts = perception.claims(sim, tau)
        claimed = counts["visual"] + counts["acoustic"]
        shares.append(counts[CLAIM[modality]] / max(1, claimed))
        formats.append(reward.format_reward(text))
    share = torch.tensor(shares, dtype=torch.float32)  # (N,)
    fmt = torch.tensor(formats, dtype=torch.float32)  # (N,)
    return -share + w_fmt * fmt, share, fmt


# Eqs. (6)-(8)
def backpropagate(args, policy, roll, adv):
    """Back-propagate w_mr * agg(pg_t) of the samples under x\\m, `--micro_batch` clips at a time.

    roll.media is the masked batch: its towers run again with gradient. The loss is normalised by
    this rollout's global token (sequence) count. Returns the loss, summed over micro-batches,
    times world: the mean over ranks is the global loss.
    """
    G = roll.G
    mask = roll.completion_mask.float()  # (N, C)
    n_tok, n_seq = parallel.global_sum(mask.sum(), len(mask))
    total = 0.0
    for c0, c1 in microbatch.ranges(len(roll.media["input_ids"]), args.micro_batch):
        rows = slice(c0 * G, c1 * G)
        clips = microbatch.clips(policy, roll.media, c0, c1, roll.positions)
        towers = encoders.encode_media(policy, clips.batch)
        inputs = scoring.expand(clips.batch, G, towers.video, towers.audio, clips.positions)
        logp = scoring.logprobs(policy, inputs, roll.completion_ids[rows])  # (n, C)
        pg_loss, _ = oppo.policy_loss(
            logp,
            logp.detach(),
            None,
            adv[rows],
            mask[rows],
            beta=0.0,
            eps_low=args.eps_low,
            eps_high=args.eps_high,
            agg=args.agg,
            num_tokens=n_tok,
            num_seqs=n_seq,
        )
        loss = parallel.backward(args.masked_rollout_weight * pg_loss, towers)
        total += float(loss) * dist.get_world_size()
    return total


def run(args, policy, processor, matcher, recs, media, step, inventory=None):
    """The masked rollouts of one step on this rank's B clips: sample, reward, back-propagate.

    media is the B clips' processed batch of the main rollout; inventory the training records'
    cues (`training_inventory`; None: read from --data). Returns the metrics: "loss" and
    "flops", to add to the step's, and per masked modality m the mean claim share, format, rows
    sampled, share of rows with a non-zero advantage, and seconds.
    """
    masked_modalities = modalities(args)
    if inventory is None:
        inventory = manifest_inventory(args.data)
    Gm = args.masked_rollouts
    metrics = {"loss": 0.0, "flops": 0.0}
    for modality in masked_modalities:
        start = time.perf_counter()
        # x\m as evaluation masks it: all of m's features zeroed, the layout of x kept
        masked = batching.mask_modality(media, modality, rho=1.0, seed=args.seed + step)
        roll = rollout.rollout(
            policy,
            processor,
            recs,
            masked,
            Gm,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
        )
        sims = matcher.similarities(roll.texts, [inventory] * len(roll.texts))
        rewards, share, fmt = claim_rewards(roll.texts, sims, modality, args.tau, args.w_fmt)
        # rewards are computed on the CPU; the loss reads them beside the log-probs
        rewards = rewards.to(roll.completion_ids.device)  # (N,)
        adv, _ = oppo.group_advantages(rewards, Gm, scale_std=args.scale_std)
        metrics["loss"] += backpropagate(args, policy, roll, adv)
        completion_tokens = float(roll.completion_mask.sum())
        prompt_tokens = float(masked["attention_mask"].sum()) * Gm
        metrics["flops"] += flops.step_flops(
            policy, len(roll.texts), prompt_tokens, completion_tokens
        )
        name = f"masked_rollouts/{modality}"
        metrics[f"{name}_claim_share"] = float(share.mean())
        metrics[f"{name}_format"] = float(fmt.mean())
        metrics[f"{name}_rows"] = len(roll.texts)
        metrics[f"{name}_rows_with_signal"] = float((adv != 0).float().mean())
        metrics[f"{name}_sample"] = roll.texts[0]
        metrics[f"{name}_time"] = time.perf_counter() - start
    return metrics
