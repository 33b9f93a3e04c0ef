"""Gradients of train.sft_step on global batches where one rank's clips lack a medium.

    python fsdp_train_worker.py TINY_DIR SYNTH_DIR OUT.pt                          # 1 process, whole batches
    torchrun --nproc_per_node=2 fsdp_train_worker.py TINY_DIR SYNTH_DIR OUT.pt    # rank r takes clips r::2

Under FSDP2 every rank must run every unit (parallel.encode_media); this saves, per batch, the full
gradient of every parameter, which must equal the 1-process gradient of the same global batch.
Under torchrun it then runs one OPPO step (plain GRPO, micro-batches of one clip) on such clips.
"""

import os
import sys

import torch
import torch.distributed as dist

import data
import model as policy_lib
import parallel
import train

tiny, world_dir, out = sys.argv[1:4]
if "RANK" in os.environ:
    dist.init_process_group("gloo")
else:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
rank, world = dist.get_rank(), dist.get_world_size()
policy, processor = policy_lib.load_policy(tiny)
parallel.shard(policy)
recs = parallel.load_manifest(os.path.join(world_dir, "train.jsonl"))  # not on both ranks at once
kind = {
    k: [r for r in recs if ("video" in r, "audio" in r) == k]
    for k in ((True, True), (False, True), (True, False))
}
both, no_video, no_audio = kind[(True, True)], kind[(False, True)], kind[(True, False)]
# global batches of 4, rank r gets clips r::2: (rank 0's clips, rank 1's clips)
cases = {
    "rank0_no_video": (no_video[:2], both[:2]),
    "rank0_no_audio": (no_audio[:2], both[2:4]),
    "no_video_and_no_audio": (no_video[2:4], no_audio[:2]),
}
grads = {}
for name, (r0, r1) in cases.items():
    batch = [r for pair in zip(r0, r1) for r in pair][rank::world]
    m = train.sft_step(
        None, policy, processor, batch, data.encode(processor, batch, frames=4), world
    )
    if world > 1:
        policy.reshard()  # as train.run_stage: the root's parameters are the sharded ones again
    full = {
        n: None
        if p.grad is None
        else p.grad.full_tensor()
        if hasattr(p.grad, "full_tensor")
        else p.grad.clone()
        for n, p in policy.named_parameters()
    }
    grads[name] = {"loss": parallel.global_sum(m["loss"])[0] / world, "grads": full}
    policy.zero_grad(set_to_none=True)
if world > 1:  # OPPO: the rollout, then micro-batches of one clip with and without each medium
    args = train.Args(
        profile="cpu",
        G=2,
        max_new_tokens=6,
        micro_batch=1,
        perception_reward=False,
        perception_loss=False,
    )
    for k, v in train.CPU.items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    batch = [no_video[4], no_audio[0]] if rank == 0 else [both[0], no_video[5]]
    m = train.oppo_step(
        args,
        policy,
        None,
        processor,
        None,
        batch,
        data.encode(processor, batch, frames=4),
        {},
        world,
        0,
    )
    policy.reshard()
    gnorm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    grads["oppo"] = {
        "loss": parallel.global_sum(m["loss"])[0] / world,
        "grad_norm": float(gnorm.full_tensor()),
    }
if rank == 0:
    torch.save(grads, out)
dist.barrier()
dist.destroy_process_group()
