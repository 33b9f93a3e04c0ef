"""OPPO training: SFT cold start, then GRPO with the Omni-Perception Reward and Loss.

    python train.py                        # CPU default: tiny thinker + synthetic world, SFT then OPPO
    torchrun --nproc_per_node=2 train.py   # the same on 2 CPU processes (gloo, FSDP2)
    torchrun --nproc_per_node=8 train.py --model /models/Qwen2.5-Omni-7B \\
        --data mer/train.jsonl --val_data mer/val.jsonl --test_data mer/test.jsonl

Each OPPO step (SPEC sections 2-5): 1. rollout (G completions per clip, reference log-probs),
2. reward (Eqs. 1-4), 3. advantage (Eq. 5), 4. update (evidence routing and masked log-probs,
Eqs. 9-10; the loss, Eqs. 6-12). Ablations are switches: `--perception_reward False
--perception_loss False` is plain GRPO. Many processes (FSDP2, global sums) are in parallel.py.
"""

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import HfArgumentParser

import checkpoint
import data
import eval as evaluation
import flops
import model as policy_lib
import oppo
import parallel
import perception_loss
import reward
import rollout
import synth


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    model: str = arg(
        "", "local Qwen2.5-Omni(-Thinker) directory; empty: the tiny thinker in runs/tiny"
    )
    profile: str = arg(
        "",
        "defaults for the fields left unset: cpu (tiny model) or real (3B/7B, SPEC section 6); "
        "empty: real with --model, else cpu",
    )
    data: str = arg(
        "", "train manifest (JSON lines, SPEC section 8); empty: the synthetic world in runs/synth"
    )
    val_data: str = arg(
        "", "validation manifest for periodic evaluation; empty: the synthetic val split"
    )
    test_data: str = arg("", "test manifest for the final table; empty: the synthetic test split")
    out: str = arg("runs/oppo", "output directory: <out>/<stage>/{ckpt,final,log.jsonl}")
    stages: str = arg("sft,oppo", "comma-separated stages to run, in order: sft (cold start), oppo")
    init: str = arg(
        "",
        "weights to start the first stage from (default: --model); later stages start from the previous stage's export",
    )
    resume: bool = arg(False, "continue each stage from its last checkpoint in <out>/<stage>/ckpt")
    seed: int = arg(
        0, "random seed; rank r seeds with seed + r so ranks sample different completions"
    )
    frames: int = arg(None, "video frames per clip (CPU 4, real 8)")
    # SFT cold start
    sft_steps: int = arg(None, "SFT optimizer steps (CPU 900, real 1000)")
    sft_batch: int = arg(None, "SFT clips per step, global over ranks (CPU 16, real 64)")
    sft_lr: float = arg(None, "SFT learning rate (CPU 1e-3, real 1e-5)")
    # OPPO
    steps: int = arg(None, "OPPO steps, one update per rollout (CPU 120, real 500)")
    batch: int = arg(None, "clips per OPPO step, global over ranks (B; CPU 4, real 64)")
    G: int = arg(8, "completions per clip (G, Eq. 5)")
    lr: float = arg(None, "OPPO learning rate (CPU 1e-4, real 1e-6)")
    weight_decay: float = arg(0.01, "AdamW weight decay")
    grad_clip: float = arg(1.0, "gradient-norm clip")
    warmup: int = arg(None, "linear warm-up steps of each stage (CPU 30, real 10)")
    temperature: float = arg(1.0, "sampling temperature")
    top_p: float = arg(1.0, "nucleus sampling p")
    max_new_tokens: int = arg(None, "completion cap (CPU 96, real 512)")
    micro_batch: int = arg(None, "clips per forward/backward in the update (CPU 4, real 1)")
    beta: float = arg(
        None,
        "beta: weight of the k3 KL to the reference, Eq. (7); 0 drops the reference model (CPU 0.0, real 0.04)",
    )
    eps_low: float = arg(0.2, "eps_low of the clipped surrogate, Eq. (6)")
    eps_high: float = arg(0.28, "eps_high of the clipped surrogate, Eq. (6)")
    agg: str = arg("token-mean", "Eq. (8) aggregation: token-mean or seq-mean")
    scale_std: bool = arg(True, "Eq. (5) divide advantages by the group std (False: Dr. GRPO)")
    perception_reward: bool = arg(
        True, "ablation: add the Omni-Perception Reward w_op * R_op, Eq. (4)"
    )
    perception_loss: bool = arg(True, "ablation: add the Omni-Perception Loss L_op, Eq. (11)")
    w_fmt: float = arg(0.1, "w_fmt, weight of the format reward, Eq. (4)")
    w_op: float = arg(0.5, "w_op, weight of the Omni-Perception Reward, Eq. (4)")
    tau: float = arg(0.5, "tau, cue-recovery and routing threshold, Eqs. (3) and (9)")
    gamma: float = arg(
        None,
        "gamma, weight of the masked KL in L_op, Eq. (11) (0.02; 0.2 collapsed the tiny model)",
    )
    eta: float = arg(None, "eta, weight of the entropy term in L_op, Eq. (11)")
    rho: float = arg(
        0.9, "rho, fraction of a modality's features zeroed in x\\v and x\\a (SPEC section 5)"
    )
    clamp: float = arg(10.0, "per-token clamp of the masked divergence d, Eq. (10)")
    embedder: str = arg(
        "",
        "sentence-embedding model directory for Eqs. (3)/(9); empty: all-MiniLM-L6-v2 (offline package)",
    )
    # bookkeeping
    save_every: int = arg(50, "steps between sharded checkpoints")
    eval_every: int = arg(0, "steps between validation evaluations (0: only at the end)")
    eval_limit: int = arg(200, "validation/test clips evaluated (0: all)")
    bf16: bool = arg(
        None, "bf16 compute with fp32 master weights and reduction (default: on with CUDA)"
    )
    activation_checkpointing: bool = arg(
        False, "recompute decoder layers in backward to save memory"
    )
    cache_inputs: bool = arg(
        None, "keep every clip's processed prompt tensors in memory (CPU on: small clips; real off)"
    )


CPU = dict(
    frames=4,
    sft_steps=900,
    sft_batch=16,
    sft_lr=1e-3,
    steps=120,
    batch=4,
    lr=1e-4,
    warmup=30,
    max_new_tokens=96,
    micro_batch=4,
    beta=0.0,
    gamma=0.02,
    eta=0.03,
    cache_inputs=True,
)
REAL = dict(
    frames=8,
    sft_steps=1000,
    sft_batch=64,
    sft_lr=1e-5,
    steps=500,
    batch=64,
    lr=1e-6,
    warmup=10,
    max_new_tokens=512,
    micro_batch=1,
    beta=0.04,
    gamma=0.02,
    eta=0.03,
    cache_inputs=False,
)


# ---------------------------------------------------------------- setup
def setup(args):
    """Process group (parallel.py), profile defaults for the fields left unset, seed + rank."""
    rank, world, device = parallel.init()
    args.profile = args.profile or ("real" if args.model else "cpu")
    if args.profile not in ("cpu", "real"):
        raise ValueError(f"--profile must be cpu or real, got {args.profile!r}")
    for k, v in (REAL if args.profile == "real" else CPU).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.bf16 = device.type == "cuda" if args.bf16 is None else args.bf16
    torch.manual_seed(args.seed + rank)  # ranks must sample different completions for their clips
    return rank, world, device


def default_assets(args, master):
    """`python train.py` with no paths: build the synthetic world and the tiny thinker if absent."""
    if not args.data:
        args.data, args.val_data, args.test_data = (f"runs/synth/{s}.jsonl" for s in synth.SPLITS)
        if master:
            synth.ensure_world("runs/synth", frames=args.frames)
    dist.barrier()
    if not args.model:
        args.model = policy_lib.TINY_DIR
        if master and not (Path(args.model) / "config.json").exists():
            policy_lib.build_tiny(
                args.model, seed=0, corpus=data.corpus(data.load_manifest(args.data))
            )
    dist.barrier()


def clip_indices(n, B, step, seed, rank, world):
    """This rank's clips of global batch `step`. Epochs are seeded permutations, so the data
    position is the step itself and a resumed run sees exactly the clips it would have seen."""
    idx = []
    for k in range(step * B, (step + 1) * B):
        epoch, i = divmod(k, n)
        idx.append(
            int(torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919 * epoch))[i])
        )
    return idx[rank::world]


# ---------------------------------------------------------------- the two stages
def sft_step(args, policy, processor, recs, media, world):
    """Cold start: cross-entropy on the reference reasoning + answer (target tokens only)."""
    tok = processor.tokenizer
    tgt = tok(
        [data.target_text(r) + "<|im_end|>" for r in recs],
        add_special_tokens=False,
        padding=True,
        padding_side="right",
        return_tensors="pt",
    )
    ids, mask = (
        tgt["input_ids"].to(media["input_ids"].device),
        tgt["attention_mask"].to(media["input_ids"].device),
    )
    (n_tok,) = parallel.global_sum(mask.sum())
    video, audio, blank = parallel.encode_media(
        policy, media
    )  # blank: 0, see parallel.encode_media
    logp = rollout.logprobs(
        policy, rollout.expand(media, 1, video, audio, rollout.positions(policy, media)), ids
    )
    loss = -(logp * mask).sum() / n_tok + blank  # token-mean over the global batch
    (loss * world).backward()  # FSDP averages gradients over ranks; n_tok is already global
    return {
        "loss": loss.item() * world,
        "tokens": n_tok,
        "flops": flops.step_flops(
            policy,
            len(recs),
            float(media["attention_mask"].sum()),
            float(mask.sum()),
            generate=False,
        ),
    }


def oppo_step(args, policy, ref, processor, matcher, recs, media, cache, world, step):
    tok, G, t = processor.tokenizer, args.G, {"start": time.perf_counter()}
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
        micro_batch=args.micro_batch * G,
    )
    t["rollout"] = time.perf_counter()
    # 2. reward, Eqs. (1)-(4); cue similarities are needed by the reward and by the loss's routing
    total, parts = reward.compute_rewards(
        roll.texts,
        roll.records,
        matcher,
        w_fmt=args.w_fmt,
        w_op=args.w_op if args.perception_reward else 0.0,
        tau=args.tau,
        use_op=args.perception_reward or args.perception_loss,
    )
    t["reward"] = time.perf_counter()
    # 3. advantage, Eq. (5): a clip's G rows are all on this rank
    # rewards are computed on the CPU; the loss reads them beside the log-probs
    adv, m_adv = oppo.group_advantages(
        total.to(roll.completion_ids.device), G, scale_std=args.scale_std
    )
    metrics = {k: float(v) for k, v in m_adv.items()}
    # 4. update, Eqs. (6)-(12): evidence routing (Eq. 9), pi_old under x\v and x\a on the rows that
    # have evidence (Eq. 10), then the loss, normalised by global counts so every rank and micro-batch agrees
    mask = roll.completion_mask.float()  # (N, C)
    e_v = e_a = mv_logp = ma_logp = torch.zeros_like(mask)
    if args.perception_loss:
        e_v, e_a = perception_loss.evidence_masks(tok, roll.completion_ids, mask, parts["sims"])
        mv_logp, ma_logp = rollout.masked_logprobs(
            policy,
            roll,
            e_v.any(1),
            e_a.any(1),
            rho=args.rho,
            seed=args.seed + step,
            micro_batch=args.micro_batch * G,
        )
    t["masked"] = time.perf_counter()
    n_tok, n_seq, n_v, n_a = parallel.global_sum(mask.sum(), len(mask), e_v.sum(), e_a.sum())
    mb = args.micro_batch
    for c in range(0, len(recs), mb):
        rows = slice(c * G, min(c + mb, len(recs)) * G)  # the last micro-batch may be short
        sub = (
            media
            if mb >= len(recs)
            else {
                k: v.to(mask.device)
                for k, v in data.encode(  # the batch's device
                    processor, recs[c : c + mb], cache=cache, frames=args.frames
                ).items()
            }
        )
        video, audio, blank = parallel.encode_media(policy, sub)
        inputs = rollout.expand(
            sub, G, video, audio, roll.positions if sub is media else rollout.positions(policy, sub)
        )
        logp = rollout.logprobs(policy, inputs, roll.completion_ids[rows])  # (n, C), with gradient
        pg, m = oppo.policy_loss(
            logp,
            logp.detach(),
            roll.ref_logp[rows] if args.beta > 0 else None,
            adv[rows],
            mask[rows],
            beta=args.beta,
            eps_low=args.eps_low,
            eps_high=args.eps_high,
            agg=args.agg,
            num_tokens=n_tok,
            num_seqs=n_seq,
        )
        op = None
        if args.perception_loss:
            op, m_op = perception_loss.perception_loss(
                logp,
                mv_logp[rows],
                ma_logp[rows],
                e_v[rows],
                e_a[rows],
                mask[rows],
                gamma=args.gamma,
                eta=args.eta,
                clamp=args.clamp,
                num_evidence=(n_v, n_a),
                num_tokens=n_tok,
            )
            m.update(m_op)
        loss = oppo.total_loss(pg, op) + blank  # Eq. (12)
        (loss * world).backward()  # FSDP averages gradients over ranks; the normalisers are global
        m["loss"] = (
            loss.detach() * world
        )  # x world: the mean over ranks (mean_metrics) is the global loss
        for (
            k,
            v,
        ) in (
            m.items()
        ):  # the loss adds up over micro-batches (global normalisers), the rest averages
            w = 1.0 if k == "loss" else (rows.stop - rows.start) / len(mask)
            metrics[k] = metrics.get(k, 0.0) + float(v) * w
    t["update"] = time.perf_counter()
    metrics.update(
        {f"rewards/{k}": float(v.mean()) for k, v in parts.items() if torch.is_tensor(v)}
    )
    metrics.update(
        {
            "rewards/total": float(total.mean()),
            "completion_length": float(mask.sum(1).mean()),
            "tokens": n_tok,
            "n_visual": n_v,
            "n_acoustic": n_a,
            "sample": roll.texts[0],
        }
    )
    metrics.update(
        {
            f"time/{k}": t[k] - t[p] for p, k in zip(t, list(t)[1:])
        },  # rollout, reward, masked, update
        **{f"time/rollout_{k}": v for k, v in roll.timings.items()},
    )
    metrics["masked_rows"] = float(
        e_v.any(1).sum() + e_a.any(1).sum()
    )  # rows scored under x\v or x\a
    metrics["flops"] = flops.step_flops(
        policy,
        len(mask),
        float(media["attention_mask"].sum()) * G,
        float(mask.sum()),
        (args.beta > 0) + metrics["masked_rows"] / len(mask),
    )  # no-grad passes
    return metrics


def run_stage(stage, args, init, rank, world, device, matcher):
    """Train one stage from the weights in `init`; returns the directory of its export."""
    master, out = rank == 0, Path(args.out) / stage
    if args.resume and (out / "final" / "config.json").exists():
        return out / "final"  # finished before
    policy, processor = policy_lib.load_policy(init)
    parallel.shard(policy, device, args.bf16, args.activation_checkpointing)
    ref = None
    if stage == "oppo" and args.beta > 0:  # Eq. (7) needs pi_ref; beta = 0 never loads it
        ref = parallel.shard(
            policy_lib.load_policy(init)[0].requires_grad_(False), device, args.bf16
        )
    total_steps, B, lr = (
        (args.sft_steps, args.sft_batch, args.sft_lr)
        if stage == "sft"
        else (args.steps, args.batch, args.lr)
    )
    if B % world:
        raise ValueError(
            f"--{'sft_' if stage == 'sft' else ''}batch {B} must be divisible by the {world} ranks"
        )
    optim = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min(1.0, (s + 1) / max(1, args.warmup))
    )
    start = 0
    if args.resume and (last := checkpoint.latest(out / "ckpt")) is not None:
        start = checkpoint.load(last, policy, optim)
        sched.last_epoch = start - 1
        sched.step()
    recs, cache = parallel.load_manifest(args.data), {} if args.cache_inputs else None
    if master:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.trim_log(
            out / "log.jsonl", start
        )  # steps after the checkpoint run again: log them once
    log = open(out / "log.jsonl", "a") if master else None
    bar = tqdm(
        range(start, total_steps), desc=stage, disable=not master, initial=start, total=total_steps
    )
    for step in bar:
        t0 = time.perf_counter()
        batch = [recs[i] for i in clip_indices(len(recs), B, step, args.seed, rank, world)]
        media = {
            k: v.to(device)
            for k, v in data.encode(processor, batch, cache=cache, frames=args.frames).items()
        }
        policy.train()
        if stage == "sft":
            m = sft_step(args, policy, processor, batch, media, world)
        else:
            m = oppo_step(args, policy, ref, processor, matcher, batch, media, cache, world, step)
        if world > 1:
            policy.reshard()  # the root, gathered through the backward (encode_media): its sharded grads
        gnorm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
        gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
        finite = math.isfinite(gnorm) and math.isfinite(
            parallel.global_sum(m["loss"])[0]
        )  # same verdict on every rank
        if finite:
            optim.step()
        optim.zero_grad(set_to_none=True)
        sched.step()
        dt = time.perf_counter() - t0
        m.update(
            {
                "step": step + 1,
                "grad_norm": gnorm,
                "skipped": not finite,
                "lr": sched.get_last_lr()[0],
                "time/step": dt,
                "tokens_per_s": m["tokens"] / dt,
                "flops_per_s": m.pop("flops") / dt,
            }
        )
        m.update(
            {"mfu": m["flops_per_s"] / flops.peak()} if flops.peak() else {}
        )  # a known GPU's dense bf16 peak
        m.update(parallel.mean_metrics(m, world))
        if master:
            strict = {
                k: str(v) if isinstance(v, float) and not math.isfinite(v) else v
                for k, v in m.items()
            }
            log.write(json.dumps(strict) + "\n")  # "nan", not NaN: strict JSON
            log.flush()
            bar.set_postfix(
                loss=f"{m['loss']:.3f}",
                **({"reward": f"{m['rewards/total']:.2f}"} if stage == "oppo" else {}),
            )
        if (step + 1) % args.save_every == 0 or step + 1 == total_steps:
            checkpoint.save(out / "ckpt", step + 1, policy, optim)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            report = evaluation.evaluate(
                policy,
                processor,
                parallel.load_manifest(args.val_data)[: args.eval_limit or None],
                matcher,
                frames=args.frames,
                max_new_tokens=args.max_new_tokens,
                progress=False,
            )
            if master:
                log.write(json.dumps({"step": step + 1, "eval": evaluation.summary(report)}) + "\n")
    checkpoint.export(policy, processor, out / "final")
    return out / "final"


def main(args):
    rank, world, device = setup(args)
    default_assets(args, rank == 0)
    matcher = reward.Matcher(
        args.embedder or None, device=device
    )  # rewards, routing, eval's cue recovery
    init = args.init or args.model
    for stage in args.stages.split(","):
        init = run_stage(stage, args, init, rank, world, device, matcher)
    policy, processor = policy_lib.load_policy(init)
    policy = parallel.shard(policy, device, args.bf16, args.activation_checkpointing)
    report = evaluation.evaluate(
        policy,
        processor,
        parallel.load_manifest(args.test_data)[: args.eval_limit or None],
        matcher,
        frames=args.frames,
        max_new_tokens=args.max_new_tokens,
    )
    if rank == 0:
        evaluation.save_report(report, Path(args.out) / "test_report.json")
        print(evaluation.table(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(HfArgumentParser(Args).parse_args_into_dataclasses()[0])
