"""The gradient of oppo.update with --masked_grad on a global batch of 4 clips.

    torchrun --nproc_per_node=2 fsdp_masked_grad_worker.py TINY_DIR SYNTH_DIR OUT.pt

Rank r takes clips 2r and 2r + 1; one process (`masked_grad_step` with world 1, as
test_masked_grad.py calls it) takes all four. The clips and the evidence are chosen so that, at
one clip per micro-batch, a rank has no row to score under x\\v (rank 1) or x\\a (rank 0) and a
clip lacks the masked medium: under FSDP2 every rank must still run the same forwards. The
completions are fixed ids and rho = 1 masks a clip the same whatever batch it is in, so the sum
of the ranks' gradients must equal the one process's.
"""

import os
import sys

import torch
import torch.distributed as dist

import data
import oppo
import perception_loss
import rollout
from runtime import config, parallel
from thinker import batching, model, scoring
from variants import masked_grad

G = 2
C = 5


def masked_grad_step(tiny, world_dir):
    """(global loss, {name: full gradient}) of one oppo.update with --masked_grad."""
    rank, world = dist.get_rank(), dist.get_world_size()
    policy, processor = model.load_policy(tiny)
    parallel.shard(policy)
    records = data.load_manifest(os.path.join(world_dir, "train.jsonl"))
    both = [r for r in records if "video" in r and "audio" in r]
    no_video = [r for r in records if "video" not in r and "audio" in r]
    no_audio = [r for r in records if "video" in r and "audio" not in r]
    clips = [no_video[0], both[0], both[1], no_audio[0]]
    N = len(clips) * G
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 200, (N, C), generator=g)  # (N, C)
    mask = torch.ones(N, C, dtype=torch.long)  # (N, C)
    mask[1, 3:] = 0
    mask[6, 2:] = 0
    # visual evidence on rows of clips 0-1 only, acoustic on rows of clips 2-3 only
    e_v = torch.zeros(N, C)  # (N, C)
    e_v[[0, 2, 3], :2] = 1
    e_a = torch.zeros(N, C)  # (N, C)
    e_a[[5, 7], 1:] = 1
    adv = torch.randn(N, generator=g)  # (N,)
    per_rank = len(clips) // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    rows = slice(mine.start * G, mine.stop * G)
    batch = clips[mine]
    media = batching.encode(processor, batch, frames=4)
    mask = mask[rows]
    roll = rollout.Rollout(
        records=[r for r in batch for _ in range(G)],
        media=media,
        completion_ids=ids[rows].masked_fill(mask == 0, 0),
        completion_mask=mask,
        texts=[""] * len(mask),
        G=G,
        positions=scoring.positions(policy, media),
    )
    args = config.Args(
        profile="cpu", G=G, micro_batch=1, masked_grad=True, gamma=1.0, eta_masked=0.5, rho=1.0
    )
    config.apply_profile(args, torch.device("cpu"))
    e_v = e_v[rows] * mask
    e_a = e_a[rows] * mask
    zeros = torch.zeros(mask.shape)  # (n, C)
    masked = masked_grad.masked_inputs(roll, e_v, e_a, args.rho, 0)
    evidence = perception_loss.Evidence(e_v, e_a, zeros, zeros, masked)
    metrics = oppo.update(args, policy, roll, adv[rows], evidence)
    parallel.reshard_after_step(policy)
    grads = {}
    for name, param in policy.named_parameters():
        grad = param.grad
        if grad is not None and hasattr(grad, "full_tensor"):
            grad = grad.full_tensor()
        grads[name] = grad
    loss = parallel.global_sum(metrics["loss"])[0] / world
    return loss, grads


if __name__ == "__main__":
    tiny_dir, synth_dir, out = sys.argv[1:4]
    dist.init_process_group("gloo")
    result = masked_grad_step(tiny_dir, synth_dir)
    if dist.get_rank() == 0:
        torch.save(result, out)
    dist.barrier()
    dist.destroy_process_group()
