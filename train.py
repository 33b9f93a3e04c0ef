"""OPPO training: SFT cold start, then GRPO with the Omni-Perception Reward and Loss.

    python train.py                        # CPU: tiny thinker + synthetic world, SFT then OPPO
    torchrun --nproc_per_node=2 train.py   # the same on 2 CPU processes (gloo, FSDP2)
    torchrun --nproc_per_node=8 train.py --model /models/Qwen2.5-Omni-7B \\
        --data mer/train.jsonl --val_data mer/val.jsonl --test_data mer/test.jsonl

Each OPPO step (`oppo_step`, docs/method.md, sections 2-5): 1. rollout, 2. reward, 3. advantage,
4. evidence routing and masked log-probs, 5. update, 6. masked rollouts (`--masked_rollouts`),
7. metrics. Ablations are switches: `--perception_reward False --perception_loss False` is plain
GRPO. The flags are in runtime/config.py, their profiles in runtime/profiles.py; what only
matters with several processes (FSDP2, global sums) in runtime/parallel.py.
"""

import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import eval as evaluation
import oppo
import perception_loss
import reward
import rollout
from matching.matcher import Matcher
from metrics import report
from runtime import (
    checkpoint,
    config,
    flops,
    health,
    logs,
    optim,
    parallel,
    preempt,
    preflight,
    rundir,
    validate,
)
from runtime.run_flags import parse_args
from thinker import batching, encoders, microbatch, scoring
from variants import masked_grad, masked_rollout


def clip_indices(n, B, step, seed, rank, world):
    """This rank's clips of global batch `step`. Epochs are seeded permutations, so the data
    position is the step itself and a resumed run sees exactly the clips it would have seen."""
    idx = []
    for k in range(step * B, (step + 1) * B):
        epoch, i = divmod(k, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919 * epoch))
        idx.append(int(order[i]))
    return idx[rank::world]


# ---------------------------------------------------------------- the two stages
def sft_step(args, policy, processor, recs, media):
    """Cold start: cross-entropy on the reference reasoning + answer (target tokens only)."""
    targets = [batching.target_text(r) + "<|im_end|>" for r in recs]
    tokens = processor.tokenizer(
        targets, add_special_tokens=False, padding=True, padding_side="right", return_tensors="pt"
    )
    device = media["input_ids"].device
    ids = tokens["input_ids"].to(device)  # (B, C)
    mask = tokens["attention_mask"].to(device)  # (B, C)
    (n_tok,) = parallel.global_sum(mask.sum())
    pos = scoring.positions(policy, media)
    loss = 0.0
    # --sft_micro_batch clips a forward (0: all); each one's loss is its share of the token-mean
    # over the global batch, so their gradients add up to the batch's
    for c0, c1 in microbatch.ranges(len(recs), args.sft_micro_batch or None):
        clips = microbatch.clips(policy, media, c0, c1, pos)
        towers = encoders.encode_media(policy, clips.batch)
        inputs = scoring.expand(clips.batch, 1, towers.video, towers.audio, clips.positions)
        logp = scoring.logprobs(policy, inputs, ids[c0:c1])  # (n, C)
        loss = loss + parallel.backward(-(logp * mask[c0:c1]).sum() / n_tok, towers)
    prompt_tokens = float(media["attention_mask"].sum())
    completion_tokens = float(mask.sum())
    return {
        # each rank's loss is its share of the global one: x world, the mean over ranks is it
        "loss": loss.item() * dist.get_world_size(),
        "tokens": n_tok,
        "flops": flops.step_flops(
            policy, len(recs), prompt_tokens, completion_tokens, generate=False
        ),
    }


def oppo_step(
    args, policy, ref, processor, matcher, recs, media, step, labels=None, inventory=None
):
    """One OPPO step on this rank's B clips: the gradient of its loss, and its metrics. `labels`:
    the run's label space (corpora/labels.py) of the accuracy reward; `inventory`: the training
    records' cues, for the masked rollouts."""
    clock = logs.Clock()
    # 1. rollout: G completions per clip, and their reference log-probs (Eq. 7) when beta > 0
    roll = rollout.rollout(
        policy,
        processor,
        recs,
        media,
        args.G,
        ref=ref if args.beta > 0 else None,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        micro_batch=args.micro_batch,
    )
    clock.lap("rollout")
    # 2. reward, Eqs. (1)-(4); the cue similarities also feed the routing of phase 4
    total, parts = reward.compute_rewards(
        roll.texts,
        roll.records,
        matcher,
        w_fmt=args.w_fmt,
        w_op=args.w_op if args.perception_reward else 0.0,
        tau=args.tau,
        use_op=args.perception_reward or args.perception_loss,
        labels=labels,
    )
    clock.lap("reward")
    # a non-finite reward part skips the step, named (runtime/health.py), instead of the run
    total, nonfinite = health.finite_rewards(roll.records, total, parts)
    # 3. advantage, Eq. (5): a clip's G rows are all on this rank; the rewards come from the CPU
    rewards = total.to(roll.completion_ids.device)  # (N,)
    adv, adv_metrics = oppo.group_advantages(rewards, args.G, scale_std=args.scale_std)
    # 4. evidence routing (Eq. 9), then pi_old under x\v and x\a on its rows (Eq. 10)
    evidence = find_evidence(args, policy, processor, roll, parts["sims"], step)
    clock.lap("masked")
    # 5. update, Eqs. (6)-(12), normalised by global counts
    loss_metrics = oppo.update(args, policy, roll, adv, evidence)
    clock.lap("update")
    # 6. masked rollouts (variants/masked_rollout.py): samples under x\v and x\a, claims penalised
    masked = {}
    if args.masked_rollouts:
        masked = masked_rollout.run(args, policy, processor, matcher, recs, media, step, inventory)
    # 7. metrics of the step, for this rank's rows
    metrics = logs.oppo_metrics(
        args, policy, roll, (total, parts), evidence, clock, adv_metrics, loss_metrics, masked
    )
    if nonfinite:
        # the optimizer skips a step whose loss is not finite, on every rank
        metrics.update(loss=float("nan"), nonfinite_rewards=nonfinite)
    return metrics


def find_evidence(args, policy, processor, roll, sims, step):
    """Phase 4 of a step: the evidence tokens e^v, e^a (Eq. 9) and pi_old under x\\v and x\\a on
    the rows that have them (Eq. 10), as a perception_loss.Evidence; all 0 without the loss."""
    mask = roll.completion_mask.float()  # (N, C)
    zero = torch.zeros_like(mask)  # (N, C)
    if not args.perception_loss:
        return perception_loss.Evidence(zero, zero, zero, zero)
    tok = processor.tokenizer
    e_v, e_a = perception_loss.evidence_masks(tok, roll.completion_ids, mask, sims, args.tau)
    # the masks are drawn per step: every pass of a step masks alike, and a resume draws the same
    seed = args.seed + step
    if args.masked_grad:
        # form (b) of Eq. (10): the update scores x\v and x\a itself, with gradient
        masked = masked_grad.masked_inputs(roll, e_v, e_a, args.rho, seed)
        return perception_loss.Evidence(e_v, e_a, zero, zero, masked)
    mv_logp, ma_logp = rollout.masked_logprobs(
        policy, roll, e_v.any(1), e_a.any(1), args.rho, seed, args.micro_batch
    )
    return perception_loss.Evidence(e_v, e_a, mv_logp, ma_logp)


# ---------------------------------------------------------------- a stage
def run_stage(stage, args, init, device, matcher, manifests, changes):
    """Train one stage from the weights in `init`; returns the directory of its export. Arguments
    changed on --resume (rundir.check_resume) reopen a finished stage: more steps continue it."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(args.out) / stage
    if args.resume and not changes.get(stage) and (out / "final" / "config.json").exists():
        # finished before
        return out / "final"
    policy, ref, processor = load_models(stage, args, init, device)
    total_steps, B, lr = args.steps, args.batch, args.lr
    if stage == "sft":
        total_steps, B, lr = args.sft_steps, args.sft_batch, args.sft_lr
    optimizer, schedule = optim.optimizer(policy, lr, args.weight_decay, args.warmup)
    start = 0
    if args.resume:
        start = checkpoint.resume(out / "ckpt", policy, optimizer, schedule)
    recs = preflight.stage_records(stage, args, manifests, policy, processor)
    rundir.start_stage(args, stage, start, recs, changes.get(stage), rank == 0)
    cache = {} if args.cache_inputs else None
    # the masked rollouts route claims against the cues of the records loaded above
    inventory = masked_rollout.training_inventory(recs) if args.masked_rollouts else None
    log = logs.Log(out / "log.jsonl", start, rank == 0, args.tensorboard)
    steps = range(start, total_steps)
    bar = tqdm(steps, desc=stage, disable=rank != 0, initial=start, total=total_steps)
    for step in preempt.deferred(bar):
        began = time.perf_counter()
        batch = [recs[i] for i in clip_indices(len(recs), B, step, args.seed, rank, world)]
        encoded = batching.encode(processor, batch, cache=cache, frames=args.frames)
        media = {key: value.to(device) for key, value in encoded.items()}
        policy.train()
        if stage == "sft":
            metrics = sft_step(args, policy, processor, batch, media)
        else:
            metrics = oppo_step(
                args, policy, ref, processor, matcher, batch, media, step, recs.labels, inventory
            )
        # the learning rate this step used: optimizer_step moves the schedule on
        lr = schedule.get_last_lr()[0]
        gnorm, finite = optim.optimizer_step(
            policy, optimizer, schedule, metrics["loss"], args.grad_clip
        )
        metrics = logs.finish_step(metrics, time.perf_counter() - began, lr, gnorm, finite)
        metrics = health.note_skipped(metrics, finite, batch, stage, step + 1)
        metrics.update(parallel.mean_metrics(metrics, world))
        # an int, after the mean over ranks that makes every number a float
        metrics["step"] = step + 1
        log.write(metrics)
        if rank == 0:
            bar.set_postfix(logs.progress(metrics))
        if (step + 1) % args.save_every == 0 or step + 1 == total_steps:
            checkpoint.save(out / "ckpt", step + 1, policy, optimizer)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            val_report = report_on(args, policy, processor, manifests["val"], matcher, False)
            log.write({"step": step + 1, "eval": report.summary(val_report)})
        # a SIGTERM or SIGINT during the step: its checkpoint, then exit (runtime/preempt.py)
        preempt.stop_if_asked(out, step + 1, policy, optimizer)
    log.close()
    health.refuse_untrained(out / "log.jsonl", stage, total_steps)
    checkpoint.export(policy, processor, out / "final")
    return out / "final"


def load_models(stage, args, init, device):
    """(policy, reference or None, processor) of a stage, sharded (runtime/parallel.py)."""
    policy, processor = parallel.load(init, device, args.bf16, args.activation_checkpointing)
    ref = None
    # Eq. (7) needs pi_ref; beta = 0 never loads it
    if stage == "oppo" and args.beta > 0:
        ref = parallel.load(init, device, args.bf16)[0].requires_grad_(False)
    return policy, ref, processor


def report_on(args, policy, processor, records, matcher, progress=True):
    """eval.py's report on the first --eval_limit records of a loaded manifest (0: all), in its
    label space."""
    return evaluation.evaluate(
        policy,
        processor,
        records[: args.eval_limit or None],
        matcher,
        max_new_tokens=args.max_new_tokens,
        theta=args.theta,
        tau=args.tau,
        frames=args.frames,
        progress=progress,
        samples=args.eval_samples,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        labels=records.labels,
    )


def main(args):
    rank, world, device = parallel.init()
    config.apply_profile(args, device)
    validate.check(args, world)
    # ranks must sample different completions for their clips, and runs of other seeds others
    torch.manual_seed(parallel.rank_seed(args.seed, rank))
    preflight.require_manifests(args)
    preflight.default_assets(args, rank == 0)
    # rewards, routing, eval's cue recovery
    matcher = Matcher(args.embedder or None, device=device)
    # before the first step: the output directory, the resumed arguments, every manifest
    with rundir.locked(args.out), preempt.handled():
        # the manifests first: they set the label space and the SFT steps of --sft_epochs
        manifests = preflight.load_manifests(args)
        changes = rundir.check_resume(args)
        init = args.init or args.model
        for stage in args.stages.split(","):
            init = run_stage(stage, args, init, device, matcher, manifests, changes)
        policy, processor = parallel.load(init, device, args.bf16, args.activation_checkpointing)
        test_report = report_on(args, policy, processor, manifests["test"], matcher)
        test_report["manifests"] = preflight.summary(args, manifests)
        if rank == 0:
            print(report.table(test_report))
            report.save(test_report, Path(args.out) / "test_report.json")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(parse_args(config.Args))
