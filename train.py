"""OPPO training: SFT cold start, then GRPO with the Omni-Perception Reward and Loss.

    python train.py                        # CPU: tiny thinker + synthetic world, SFT then OPPO
    torchrun --nproc_per_node=2 train.py   # the same on 2 CPU processes (gloo, FSDP2)
    torchrun --nproc_per_node=8 train.py --model /models/Qwen2.5-Omni-7B \\
        --data mer/train.jsonl --val_data mer/val.jsonl --test_data mer/test.jsonl

Each OPPO step (`oppo_step`, docs/method.md, sections 2-5): 1. rollout, 2. reward, 3. advantage,
4. evidence routing and masked log-probs, 5. update, 6. masked rollouts (`--masked_rollouts`),
7. metrics. Ablations are switches: `--perception_reward False --perception_loss False` is plain
GRPO. The flags and their profiles are in config.py; what only matters with several processes
(FSDP2, global sums) in parallel.py.
"""

import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import HfArgumentParser

import batching
import checkpoint
import config
import eval as evaluation
import masked_rollout
import model
import oppo
import parallel
import perception_loss
import preflight
import report
import reward
import rollout
import rundir
import scoring
import update
from matcher import Matcher
from tools import flops


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
def sft_step(args, policy, processor, recs, media, world):
    """Cold start: cross-entropy on the reference reasoning + answer (target tokens only)."""
    targets = [batching.target_text(r) + "<|im_end|>" for r in recs]
    tokens = processor.tokenizer(
        targets, add_special_tokens=False, padding=True, padding_side="right", return_tensors="pt"
    )
    device = media["input_ids"].device
    ids = tokens["input_ids"].to(device)  # (B, C)
    mask = tokens["attention_mask"].to(device)  # (B, C)
    (n_tok,) = parallel.global_sum(mask.sum())
    # blank: 0, see scoring.encode_media
    video, audio, blank = scoring.encode_media(policy, media)
    pos = scoring.positions(policy, media)
    logp = scoring.logprobs(policy, scoring.expand(media, 1, video, audio, pos), ids)  # (B, C)
    # token-mean over the global batch
    loss = -(logp * mask).sum() / n_tok + blank
    loss.backward()
    prompt_tokens = float(media["attention_mask"].sum())
    return {
        # each rank's loss is its share of the global one: x world, the mean over ranks is it
        "loss": loss.item() * world,
        "tokens": n_tok,
        "flops": flops.step_flops(
            policy, len(recs), prompt_tokens, float(mask.sum()), generate=False
        ),
    }


def oppo_step(args, policy, ref, processor, matcher, recs, media, world, step):
    """One OPPO step on this rank's B clips: the gradient of its loss, and its metrics."""
    G = args.G
    start = time.perf_counter()
    # 1. rollout: G completions per clip, and their reference log-probs (Eq. 7) when beta > 0
    roll = rollout.rollout(
        policy,
        processor,
        recs,
        media,
        G,
        ref=ref if args.beta > 0 else None,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        micro_batch=args.micro_batch,
    )
    rolled_out = time.perf_counter()
    # 2. reward, Eqs. (1)-(4); the cue similarities also feed the routing of phase 4
    total, parts = reward.compute_rewards(
        roll.texts,
        roll.records,
        matcher,
        w_fmt=args.w_fmt,
        w_op=args.w_op if args.perception_reward else 0.0,
        tau=args.tau,
        use_op=args.perception_reward or args.perception_loss,
    )
    rewarded = time.perf_counter()
    # 3. advantage, Eq. (5): a clip's G rows are all on this rank
    # rewards are computed on the CPU; the loss reads them beside the log-probs
    rewards = total.to(roll.completion_ids.device)  # (N,)
    adv, adv_metrics = oppo.group_advantages(rewards, G, scale_std=args.scale_std)
    # 4. evidence routing (Eq. 9), then pi_old under x\v and x\a on the rows that have
    # evidence (Eq. 10); without the perception loss, no token is evidence
    mask = roll.completion_mask.float()  # (N, C)
    e_v = e_a = mv_logp = ma_logp = torch.zeros_like(mask)
    masked_inputs = None
    if args.perception_loss:
        tok = processor.tokenizer
        e_v, e_a = perception_loss.evidence_masks(tok, roll.completion_ids, mask, parts["sims"])
    if args.perception_loss and args.masked_grad:
        # form (b) of Eq. (10): the update scores x\v and x\a itself, with gradient
        masked_inputs = rollout.masked_inputs(roll.media, args.rho, args.seed + step)
    elif args.perception_loss:
        mv_logp, ma_logp = rollout.masked_logprobs(
            policy,
            roll,
            e_v.any(1),
            e_a.any(1),
            rho=args.rho,
            seed=args.seed + step,
            micro_batch=args.micro_batch,
        )
    evidence = update.Evidence(e_v, e_a, mv_logp, ma_logp, masked_inputs)
    routed = time.perf_counter()
    # 5. update, Eqs. (6)-(12), normalised by global counts so that every rank and micro-batch
    # agrees: the gradient of the step's loss, accumulated over micro-batches of clips
    counts = parallel.global_sum(mask.sum(), len(mask), e_v.sum(), e_a.sum())
    n_tok, n_seq, n_v, n_a = counts
    loss_metrics = update.backward(args, policy, roll, adv, evidence, counts, world)
    updated = time.perf_counter()
    # 6. masked rollouts (masked_rollout.py): samples under x\v and x\a, their claims penalised
    masked = {}
    if args.masked_rollouts:
        masked = masked_rollout.backward(args, policy, processor, matcher, recs, media, world, step)
    # 7. metrics of the step, for this rank's rows
    metrics = {key: float(value) for key, value in adv_metrics.items()}
    metrics.update(loss_metrics)
    for key, value in parts.items():
        if torch.is_tensor(value):
            metrics[f"rewards/{key}"] = float(value.mean())
    metrics["rewards/total"] = float(total.mean())
    metrics["completion_length"] = float(mask.sum(1).mean())
    metrics["tokens"] = n_tok
    metrics["n_visual"] = n_v
    metrics["n_acoustic"] = n_a
    metrics["sample"] = roll.texts[0]
    metrics["time/rollout"] = rolled_out - start
    metrics["time/reward"] = rewarded - rolled_out
    metrics["time/masked"] = routed - rewarded
    metrics["time/update"] = updated - routed
    for phase, seconds in roll.timings.items():
        metrics[f"time/rollout_{phase}"] = seconds
    # rows scored under x\v or x\a
    metrics["masked_rows"] = float(e_v.any(1).sum() + e_a.any(1).sum())
    # the no-grad passes: the reference when beta > 0, and the masked rows' share of a pass,
    # which form (b) trains (a forward and a backward: three forwards' FLOPs)
    masked_passes = metrics["masked_rows"] / len(mask) * (3 if args.masked_grad else 1)
    scoring_passes = (args.beta > 0) + masked_passes
    prompt_tokens = float(media["attention_mask"].sum()) * G
    metrics["flops"] = flops.step_flops(
        policy, len(mask), prompt_tokens, float(mask.sum()), scoring_passes
    )
    # the masked rollouts' loss and FLOPs are the step's too
    metrics["loss"] += masked.pop("loss", 0.0)
    metrics["flops"] += masked.pop("flops", 0.0)
    metrics.update(masked)
    return metrics


def run_stage(stage, args, init, rank, world, device, matcher, manifests, changes):
    """Train one stage from the weights in `init`; returns the directory of its export. Arguments
    changed on --resume (rundir.check_resume) reopen a finished stage: more steps continue it."""
    master = rank == 0
    changed = changes.get(stage)
    out = Path(args.out) / stage
    if args.resume and not changed and (out / "final" / "config.json").exists():
        # finished before
        return out / "final"
    policy, processor = model.load_policy(init)
    parallel.shard(policy, device, args.bf16, args.activation_checkpointing)
    ref = None
    # Eq. (7) needs pi_ref; beta = 0 never loads it
    if stage == "oppo" and args.beta > 0:
        ref = model.load_policy(init)[0].requires_grad_(False)
        ref = parallel.shard(ref, device, args.bf16)
    total_steps, B, lr = args.steps, args.batch, args.lr
    if stage == "sft":
        total_steps, B, lr = args.sft_steps, args.sft_batch, args.sft_lr
    if B % world:
        flag = "--sft_batch" if stage == "sft" else "--batch"
        raise ValueError(f"{flag} {B} must be divisible by the {world} ranks")
    optim, sched = update.optimizer(policy, lr, args.weight_decay, args.warmup)
    start = 0
    if args.resume:
        start = checkpoint.resume(out / "ckpt", policy, optim, sched)
    recs = preflight.stage_records(stage, manifests, policy, processor)
    rundir.start_stage(args, stage, start, recs, changed, master)
    cache = {} if args.cache_inputs else None
    log = checkpoint.Log(out / "log.jsonl", start, master)
    steps = range(start, total_steps)
    bar = tqdm(steps, desc=stage, disable=not master, initial=start, total=total_steps)
    for step in bar:
        began = time.perf_counter()
        batch = [recs[i] for i in clip_indices(len(recs), B, step, args.seed, rank, world)]
        encoded = batching.encode(processor, batch, cache=cache, frames=args.frames)
        media = {key: value.to(device) for key, value in encoded.items()}
        policy.train()
        if stage == "sft":
            metrics = sft_step(args, policy, processor, batch, media, world)
        else:
            metrics = oppo_step(args, policy, ref, processor, matcher, batch, media, world, step)
        # the learning rate this step used: optimizer_step moves the schedule on
        metrics["lr"] = sched.get_last_lr()[0]
        gnorm, finite = update.optimizer_step(policy, optim, sched, metrics["loss"], args.grad_clip)
        seconds = time.perf_counter() - began
        metrics["grad_norm"] = gnorm
        metrics["skipped"] = not finite
        metrics["time/step"] = seconds
        metrics["tokens_per_s"] = metrics["tokens"] / seconds
        metrics["flops_per_s"] = metrics.pop("flops") / seconds
        # a known GPU's dense bf16 peak
        if flops.peak():
            metrics["mfu"] = metrics["flops_per_s"] / flops.peak()
        metrics.update(parallel.mean_metrics(metrics, world))
        # an int, after the mean over ranks that makes every number a float
        metrics["step"] = step + 1
        log.write(metrics)
        if master:
            postfix = {"loss": f"{metrics['loss']:.3f}"}
            if stage == "oppo":
                postfix["reward"] = f"{metrics['rewards/total']:.2f}"
            bar.set_postfix(postfix)
        if (step + 1) % args.save_every == 0 or step + 1 == total_steps:
            checkpoint.save(out / "ckpt", step + 1, policy, optim)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            val_report = evaluate(args, policy, processor, manifests["val"], matcher, False)
            log.write({"step": step + 1, "eval": report.summary(val_report)})
    checkpoint.export(policy, processor, out / "final")
    return out / "final"


def evaluate(args, policy, processor, records, matcher, progress=True):
    """eval.py on the first --eval_limit records of a loaded manifest (0: all)."""
    return evaluation.evaluate(
        policy,
        processor,
        records[: args.eval_limit or None],
        matcher,
        frames=args.frames,
        max_new_tokens=args.max_new_tokens,
        progress=progress,
    )


def main(args):
    rank, world, device = parallel.init()
    config.apply_profile(args, device)
    # ranks must sample different completions for their clips
    torch.manual_seed(args.seed + rank)
    preflight.require_manifests(args)
    preflight.default_assets(args, rank == 0)
    # rewards, routing, eval's cue recovery
    matcher = Matcher(args.embedder or None, device=device)
    # before the first step: the output directory, the resumed arguments, every manifest
    with rundir.locked(args.out):
        changes = rundir.check_resume(args)
        manifests = preflight.load_manifests(args)
        init = args.init or args.model
        for stage in args.stages.split(","):
            init = run_stage(stage, args, init, rank, world, device, matcher, manifests, changes)
        policy, processor = model.load_policy(init)
        policy = parallel.shard(policy, device, args.bf16, args.activation_checkpointing)
        test_report = evaluate(args, policy, processor, manifests["test"], matcher)
        test_report["manifests"] = preflight.summary(args, manifests)
        if rank == 0:
            print(report.table(test_report))
            report.save(test_report, Path(args.out) / "test_report.json")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(HfArgumentParser(config.Args).parse_args_into_dataclasses()[0])
