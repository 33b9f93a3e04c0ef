"""Gradients of train.sft_step on global batches where one rank's clips lack a medium.

    # 1 process, whole batches
    python fsdp_train_worker.py TINY_DIR SYNTH_DIR OUT.pt
    # rank r takes clips r::2
    torchrun --nproc_per_node=2 fsdp_train_worker.py TINY_DIR SYNTH_DIR OUT.pt

Under FSDP2 every rank must run every unit (thinker.encoders.encode_media); this saves, per batch,
the full gradient of every parameter, which must equal the 1-process gradient of the same
global batch (under torchrun each rank's clips go through SFT one at a time: --sft_micro_batch).
Under torchrun it then runs one OPPO step (plain GRPO, micro-batches of one clip) on such clips.
"""

import os
import sys

import torch
import torch.distributed as dist

import data
import train
from runtime import config, parallel
from thinker import batching, model

tiny, world_dir, out = sys.argv[1:4]
if "RANK" in os.environ:
    dist.init_process_group("gloo")
else:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
rank, world = dist.get_rank(), dist.get_world_size()
policy, processor = model.load_policy(tiny)
parallel.shard(policy)
# not on both ranks at once
recs = parallel.from_rank0(data.load_manifest, os.path.join(world_dir, "train.jsonl"))
both = [r for r in recs if "video" in r and "audio" in r]
no_video = [r for r in recs if "video" not in r and "audio" in r]
no_audio = [r for r in recs if "video" in r and "audio" not in r]
# global batches of 4, rank r gets clips r::2: (rank 0's clips, rank 1's clips)
cases = {
    "rank0_no_video": (no_video[:2], both[:2]),
    "rank0_no_audio": (no_audio[:2], both[2:4]),
    "no_video_and_no_audio": (no_video[2:4], no_audio[:2]),
}
# under torchrun, micro-batches of one clip: the gradient is still the whole batch's
sft_args = config.Args(sft_micro_batch=1 if world > 1 else 0)
grads = {}
for case, (rank0_clips, rank1_clips) in cases.items():
    interleaved = []
    for pair in zip(rank0_clips, rank1_clips):
        interleaved.extend(pair)
    batch = interleaved[rank::world]
    media = batching.encode(processor, batch, frames=4)
    metrics = train.sft_step(sft_args, policy, processor, batch, media)
    # as runtime.optim.optimizer_step: the root's parameters are the sharded ones again
    parallel.reshard_after_step(policy)
    full = {}
    for name, param in policy.named_parameters():
        grad = param.grad
        if grad is not None and hasattr(grad, "full_tensor"):
            grad = grad.full_tensor()
        elif grad is not None:
            grad = grad.clone()
        full[name] = grad
    grads[case] = {"loss": parallel.global_sum(metrics["loss"])[0] / world, "grads": full}
    policy.zero_grad(set_to_none=True)
# OPPO: the rollout, then micro-batches of one clip with and without each medium
if world > 1:
    args = config.Args(
        profile="cpu",
        G=2,
        max_new_tokens=6,
        micro_batch=1,
        perception_reward=False,
        perception_loss=False,
    )
    for key, value in config.CPU.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    batch = [no_video[4], no_audio[0]] if rank == 0 else [both[0], no_video[5]]
    media = batching.encode(processor, batch, frames=4)
    metrics = train.oppo_step(args, policy, None, processor, None, batch, media, 0)
    parallel.reshard_after_step(policy)
    gnorm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    grads["oppo"] = {
        "loss": parallel.global_sum(metrics["loss"])[0] / world,
        "grad_norm": float(gnorm.full_tensor()),
    }
if rank == 0:
    torch.save(grads, out)
dist.barrier()
dist.destroy_process_group()
