"""OPPO training: SFT cold start, then GRPO with the Omni-Perception Reward and Loss.

    python train.py                        # CPU default: tiny thinker + synthetic world, SFT then OPPO
    torchrun --nproc_per_node=2 train.py   # the same on 2 CPU processes (gloo, FSDP2)
    torchrun --nproc_per_node=8 train.py --model /models/Qwen2.5-Omni-7B \\
        --data mer/train.jsonl --val_data mer/val.jsonl --test_data mer/test.jsonl

Each OPPO step (SPEC sections 2-5): 1. rollout (G completions per clip, reference and masked
log-probs), 2. reward (Eqs. 1-4), 3. advantage (Eq. 5), 4. update (Eqs. 6-12). Ablations are
switches: `--perception_reward False --perception_loss False` is plain GRPO.
"""
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from tqdm import tqdm
from transformers import HfArgumentParser

import checkpoint
import data
import eval as evaluation
import model as policy_lib
import oppo
import perception_loss
import reward
import rollout
import synth


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    model: str = arg("", "local Qwen2.5-Omni(-Thinker) directory; empty: the tiny thinker in runs/tiny")
    profile: str = arg("", "defaults for the fields left unset: cpu (tiny model) or real (3B/7B, SPEC section 6); "
                           "empty: real with --model, else cpu")
    data: str = arg("", "train manifest (JSON lines, SPEC section 8); empty: the synthetic world in runs/synth")
    val_data: str = arg("", "validation manifest for periodic evaluation; empty: the synthetic val split")
    test_data: str = arg("", "test manifest for the final table; empty: the synthetic test split")
    out: str = arg("runs/oppo", "output directory: <out>/<stage>/{ckpt,final,log.jsonl}")
    stages: str = arg("sft,oppo", "comma-separated stages to run, in order: sft (cold start), oppo")
    init: str = arg("", "weights to start the first stage from (default: --model); later stages start from the previous stage's export")
    resume: bool = arg(False, "continue each stage from its last checkpoint in <out>/<stage>/ckpt")
    seed: int = arg(0, "random seed; rank r seeds with seed + r so ranks sample different completions")
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
    beta: float = arg(None, "beta: weight of the k3 KL to the reference, Eq. (7); 0 drops the reference model (CPU 0.0, real 0.04)")
    eps_low: float = arg(0.2, "eps_low of the clipped surrogate, Eq. (6)")
    eps_high: float = arg(0.28, "eps_high of the clipped surrogate, Eq. (6)")
    agg: str = arg("token-mean", "Eq. (8) aggregation: token-mean or seq-mean")
    scale_std: bool = arg(True, "Eq. (5) divide advantages by the group std (False: Dr. GRPO)")
    perception_reward: bool = arg(True, "ablation: add the Omni-Perception Reward w_op * R_op, Eq. (4)")
    perception_loss: bool = arg(True, "ablation: add the Omni-Perception Loss L_op, Eq. (11)")
    w_fmt: float = arg(0.1, "w_fmt, weight of the format reward, Eq. (4)")
    w_op: float = arg(0.5, "w_op, weight of the Omni-Perception Reward, Eq. (4)")
    tau: float = arg(0.5, "tau, cue-recovery and routing threshold, Eqs. (3) and (9)")
    gamma: float = arg(None, "gamma, weight of the masked KL in L_op, Eq. (11) (0.02; 0.2 collapsed the tiny model)")
    eta: float = arg(None, "eta, weight of the entropy term in L_op, Eq. (11)")
    rho: float = arg(0.9, "rho, fraction of a modality's features zeroed in x\\v and x\\a (SPEC section 5)")
    clamp: float = arg(10.0, "per-token clamp of the masked divergence d, Eq. (10)")
    embedder: str = arg("", "sentence-embedding model directory for Eqs. (3)/(9); empty: all-MiniLM-L6-v2 (offline package)")
    # bookkeeping
    save_every: int = arg(50, "steps between sharded checkpoints")
    eval_every: int = arg(0, "steps between validation evaluations (0: only at the end)")
    eval_limit: int = arg(200, "validation/test clips evaluated (0: all)")
    bf16: bool = arg(None, "bf16 compute with fp32 master weights and reduction (default: on with CUDA)")
    activation_checkpointing: bool = arg(False, "recompute decoder layers in backward to save memory")
    cache_inputs: bool = arg(None, "keep every clip's processed prompt tensors in memory (CPU on: small clips; real off)")


CPU = dict(frames=4, sft_steps=900, sft_batch=16, sft_lr=1e-3, steps=120, batch=4, lr=1e-4, warmup=30,
           max_new_tokens=96, micro_batch=4, beta=0.0, gamma=0.02, eta=0.03, cache_inputs=True)
SYNTH_DIR = "runs/synth"
REAL = dict(frames=8, sft_steps=1000, sft_batch=64, sft_lr=1e-5, steps=500, batch=64, lr=1e-6, warmup=10,
            max_new_tokens=512, micro_batch=1, beta=0.04, gamma=0.02, eta=0.03, cache_inputs=False)


# ---------------------------------------------------------------- setup
def setup(args):
    """torch.distributed from torchrun's environment (a 1-process group under plain python)."""
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo")
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    args.profile = args.profile or ("real" if args.model else "cpu")
    if args.profile not in ("cpu", "real"):
        raise ValueError(f"--profile must be cpu or real, got {args.profile!r}")
    for k, v in (REAL if args.profile == "real" else CPU).items():  # fill what was not given
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.bf16 = cuda if args.bf16 is None else args.bf16
    torch.manual_seed(args.seed + rank)  # ranks must sample different completions for their clips
    return rank, world, torch.device("cuda" if cuda else "cpu")


def default_assets(args, master):
    """`python train.py` with no paths: build the synthetic world and the tiny thinker if absent."""
    if not args.data:
        args.data, args.val_data, args.test_data = (f"{SYNTH_DIR}/{s}.jsonl" for s in synth.SPLITS)
        if master:
            synth.ensure_world(SYNTH_DIR, frames=args.frames)
    dist.barrier()
    if not args.model:
        args.model = policy_lib.TINY_DIR
        if master and not (Path(args.model) / "config.json").exists():
            policy_lib.build_tiny(args.model, seed=0, corpus=data.corpus(data.load_manifest(args.data)))
    dist.barrier()


def shard(policy, device="cpu", bf16=False, checkpointing=False):
    """FSDP2: each decoder layer, the vision tower and the audio tower as units, then the root.

    One fp32 process keeps the plain module: there is nothing to shard, and FSDP's hooks made a
    tiny-model CPU step several times slower."""
    policy.to(device)
    if checkpointing:
        policy.gradient_checkpointing_enable()
    if dist.get_world_size() == 1 and not bf16:
        return policy
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for layer in policy.model.language_model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(policy.model.visual, mp_policy=mp)  # the towers as their own units: generate under
    fully_shard(policy.model.audio_tower, mp_policy=mp)  # FSDP2 fails otherwise (ENV_NOTES.md)
    fully_shard(policy, mp_policy=mp)
    register_fsdp_forward_method(policy, "get_video_features")  # rollout.py encodes video outside forward
    return policy


def clip_indices(n, B, step, seed, rank, world):
    """This rank's clips of global batch `step`. Epochs are seeded permutations, so the data
    position is the step itself and a resumed run sees exactly the clips it would have seen."""
    idx = []
    for k in range(step * B, (step + 1) * B):
        epoch, i = divmod(k, n)
        idx.append(int(torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919 * epoch))[i]))
    return idx[rank::world]


def load_manifest(path):
    """data.load_manifest on rank 0, sent to the others: loads running at once on several ranks
    race in the datasets cache folder they share (rebuilt on every load)."""
    out = [data.load_manifest(path) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(out, src=0)
    return out[0]


def global_sum(*xs):
    t = torch.tensor([float(x) for x in xs], dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def encode_video(policy, media):
    """rollout.encode_video, plus a zero for the loss: 0 x each tower this rank's clips do not use,
    run on a blank one-token input. FSDP2 gathers a unit and reduces its gradient only on the ranks
    that run it, at the point of the graph where they run it; so under torchrun every rank runs
    both towers, the towers are gathered up front, in one order, and the root stays gathered until
    run_stage reshards it after the step: real video features pass through the root's forward and
    blank ones do not, so the ranks would otherwise reach its backward gathers at different times."""
    if dist.get_world_size() == 1:
        return rollout.encode_video(policy, media), 0.0
    vc, ac, dev, zero = policy.config.vision_config, policy.config.audio_config, media["input_ids"].device, 0.0
    policy.set_reshard_after_backward(False, recurse=False)
    for tower in (policy.model.visual, policy.model.audio_tower):
        tower.set_reshard_after_forward(False)  # rollout.unsharded sets it back to True
        tower.unshard()
    video = rollout.encode_video(policy, media)
    if video is None:
        m = vc.spatial_merge_size
        px = torch.zeros(m * m, vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2, device=dev)
        blank = policy.get_video_features(px, torch.tensor([[1, m, m]], device=dev), return_dict=True)
        zero = zero + 0 * blank.pooler_output[0].sum()
    if "input_features" not in media:
        T = 2 * ac.n_window  # one chunk of the audio tower
        blank = policy.model.get_audio_features(torch.zeros(1, ac.num_mel_bins, T, device=dev),
                                                torch.ones(1, T, dtype=torch.long, device=dev), return_dict=True)
        zero = zero + 0 * blank.last_hidden_state.sum()
    return video, zero


# ---------------------------------------------------------------- the two stages
def sft_step(args, policy, processor, recs, media, world):
    """Cold start: cross-entropy on the reference reasoning + answer (target tokens only)."""
    tok = processor.tokenizer
    tgt = tok([data.target_text(r) + "<|im_end|>" for r in recs], add_special_tokens=False, padding=True,
              padding_side="right", return_tensors="pt")
    ids, mask = tgt["input_ids"], tgt["attention_mask"].float()  # (n, C)
    (n_tok,) = global_sum(mask.sum())
    video, blank = encode_video(policy, media)  # blank: 0, see encode_video
    logp = rollout.logprobs(policy, rollout.expand(media, 1, video), ids)  # (n, C)
    loss = -(logp * mask).sum() / n_tok + blank  # token-mean over the global batch
    (loss * world).backward()  # FSDP averages gradients over ranks; n_tok is already global
    return {"loss": loss.item() * world, "tokens": n_tok}


def oppo_step(args, policy, ref, processor, matcher, recs, media, cache, world, step):
    tok, G, t = processor.tokenizer, args.G, {"start": time.perf_counter()}
    # 1. rollout: G completions per clip; reference and masked log-probs with the pre-update policy
    roll = rollout.rollout(policy, processor, recs, media, G, ref=ref if args.beta > 0 else None,
                           need_masked=args.perception_loss, rho=args.rho, seed=args.seed + step,
                           temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                           micro_batch=args.micro_batch * G)
    t["rollout"] = time.perf_counter()
    # 2. reward, Eqs. (1)-(4); cue similarities are needed by the reward and by the loss's routing
    total, parts = reward.compute_rewards(roll.texts, roll.records, matcher, w_fmt=args.w_fmt,
                                          w_op=args.w_op if args.perception_reward else 0.0, tau=args.tau,
                                          use_op=args.perception_reward or args.perception_loss)
    t["reward"] = time.perf_counter()
    # 3. advantage, Eq. (5): a clip's G rows are all on this rank
    adv, m_adv = oppo.group_advantages(total, G, scale_std=args.scale_std)
    metrics = {k: float(v) for k, v in m_adv.items()}
    # 4. update, Eqs. (6)-(12), normalised by global counts so every rank and micro-batch agrees
    mask = roll.completion_mask.float()  # (N, C)
    e_v = e_a = torch.zeros_like(mask)
    if args.perception_loss:
        e_v, e_a = perception_loss.evidence_masks(tok, roll.completion_ids, mask, parts["sims"])
    n_tok, n_seq, n_v, n_a = global_sum(mask.sum(), len(mask), e_v.sum(), e_a.sum())
    mb = args.micro_batch
    for c in range(0, len(recs), mb):
        rows = slice(c * G, min(c + mb, len(recs)) * G)  # the last micro-batch may be short
        sub = media if mb >= len(recs) else {k: v.to(mask.device) for k, v in  # the batch's device
                                             data.encode(processor, recs[c:c + mb], cache=cache, frames=args.frames).items()}
        video, blank = encode_video(policy, sub)
        logp = rollout.logprobs(policy, rollout.expand(sub, G, video), roll.completion_ids[rows])  # (n, C), grad
        pick = lambda x: None if x is None else x[rows]
        pg, m = oppo.policy_loss(logp, logp.detach(), pick(roll.ref_logp), adv[rows], mask[rows], beta=args.beta,
                                 eps_low=args.eps_low, eps_high=args.eps_high, agg=args.agg,
                                 num_tokens=n_tok, num_seqs=n_seq)
        op = None
        if args.perception_loss:
            op, m_op = perception_loss.perception_loss(logp, pick(roll.mv_logp), pick(roll.ma_logp), e_v[rows],
                                                       e_a[rows], mask[rows], gamma=args.gamma, eta=args.eta,
                                                       clamp=args.clamp, num_evidence=(n_v, n_a), num_tokens=n_tok)
            m.update(m_op)
        loss = oppo.total_loss(pg, op) + blank  # Eq. (12)
        (loss * world).backward()  # FSDP averages gradients over ranks; the normalisers are global
        m["loss"] = loss.detach() * world  # x world: the mean over ranks (reduce_metrics) is the global loss
        for k, v in m.items():  # the loss adds up over micro-batches (global normalisers), the rest averages
            w = 1.0 if k == "loss" else (rows.stop - rows.start) / len(mask)
            metrics[k] = metrics.get(k, 0.0) + float(v) * w
    t["update"] = time.perf_counter()
    metrics.update({f"rewards/{k}": float(v.mean()) for k, v in parts.items() if torch.is_tensor(v)})
    metrics.update({"rewards/total": float(total.mean()), "completion_length": float(mask.sum(1).mean()),
                    "tokens": n_tok, "n_visual": n_v, "n_acoustic": n_a, "sample": roll.texts[0]})
    metrics.update({f"time/{k}": t[k] - t[p] for p, k in (("start", "rollout"), ("rollout", "reward"), ("reward", "update"))})
    metrics.update({f"time/rollout_{k}": v for k, v in roll.timings.items()})
    return metrics


def run_stage(stage, args, init, rank, world, device, matcher):
    """Train one stage from the weights in `init`; returns the directory of its export."""
    master, out = rank == 0, Path(args.out) / stage
    if args.resume and (out / "final" / "config.json").exists():
        return out / "final"  # finished before
    policy, processor = policy_lib.load_policy(init)
    shard(policy, device, args.bf16, args.activation_checkpointing)
    ref = None
    if stage == "oppo" and args.beta > 0:  # Eq. (7) needs pi_ref; beta = 0 never loads it
        ref = shard(policy_lib.load_policy(init)[0].requires_grad_(False), device, args.bf16)
    total_steps, B, lr = (args.sft_steps, args.sft_batch, args.sft_lr) if stage == "sft" else (args.steps, args.batch, args.lr)
    if B % world:
        raise ValueError(f"--{'sft_' if stage == 'sft' else ''}batch {B} must be divisible by the {world} ranks")
    optim = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / max(1, args.warmup)))
    start = 0
    if args.resume and (last := checkpoint.latest(out / "ckpt")) is not None:
        start = checkpoint.load(last, policy, optim)
        sched.last_epoch = start - 1
        sched.step()
    recs, cache = load_manifest(args.data), {} if args.cache_inputs else None
    log = open(out / "log.jsonl", "a") if master and out.mkdir(parents=True, exist_ok=True) is None else None
    bar = tqdm(range(start, total_steps), desc=stage, disable=not master, initial=start, total=total_steps)
    for step in bar:
        t0 = time.perf_counter()
        batch = [recs[i] for i in clip_indices(len(recs), B, step, args.seed, rank, world)]
        media = {k: v.to(device) for k, v in data.encode(processor, batch, cache=cache, frames=args.frames).items()}
        policy.train()
        if stage == "sft":
            m = sft_step(args, policy, processor, batch, media, world)
        else:
            m = oppo_step(args, policy, ref, processor, matcher, batch, media, cache, world, step)
        if world > 1:
            policy.reshard()  # the root, gathered through the backward (encode_video): its sharded grads
        gnorm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
        gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
        finite = math.isfinite(gnorm) and math.isfinite(global_sum(m["loss"])[0])  # same verdict on every rank
        if finite:
            optim.step()
        optim.zero_grad(set_to_none=True)
        sched.step()
        dt = time.perf_counter() - t0
        m.update({"step": step + 1, "grad_norm": gnorm, "skipped": not finite, "lr": sched.get_last_lr()[0],
                  "time/step": dt, "tokens_per_s": m["tokens"] / dt})
        m.update(reduce_metrics(m, world))
        if master:
            strict = {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in m.items()}
            log.write(json.dumps(strict) + "\n")  # "nan", not NaN: strict JSON
            log.flush()
            bar.set_postfix(loss=f"{m['loss']:.3f}", **({"reward": f"{m['rewards/total']:.2f}"} if stage == "oppo" else {}))
        if (step + 1) % args.save_every == 0 or step + 1 == total_steps:
            checkpoint.save(out / "ckpt", step + 1, policy, optim)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            report = evaluation.evaluate(policy, processor, limit(load_manifest(args.val_data), args.eval_limit),
                                         matcher, frames=args.frames, max_new_tokens=args.max_new_tokens, progress=False)
            if master:
                log.write(json.dumps({"step": step + 1, "eval": evaluation.summary(report)}) + "\n")
    checkpoint.export(policy, processor, out / "final")
    return out / "final"


def reduce_metrics(m, world):
    """Mean of every numeric metric over ranks (rank 0 logs it)."""
    keys = sorted(k for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    t = torch.tensor([float(m[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: v / world for k, v in zip(keys, t.tolist())}


def limit(recs, n):
    return recs[:n] if n else recs


def main(args):
    rank, world, device = setup(args)
    default_assets(args, rank == 0)
    matcher = reward.Matcher(args.embedder or None)  # rewards, routing, and eval's cue recovery
    init = args.init or args.model
    for stage in args.stages.split(","):
        init = run_stage(stage, args, init, rank, world, device, matcher)
    policy, processor = policy_lib.load_policy(init)
    report = evaluation.evaluate(shard(policy, device, args.bf16, args.activation_checkpointing), processor, limit(load_manifest(args.test_data), args.eval_limit),
                                 matcher, frames=args.frames, max_new_tokens=args.max_new_tokens)
    if rank == 0:
        evaluation.save_report(report, Path(args.out) / "test_report.json")
        print(evaluation.table(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(HfArgumentParser(Args).parse_args_into_dataclasses()[0])
