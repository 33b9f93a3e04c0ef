"""Run one rollout on the tiny thinker, alone or under torchrun with FSDP2, and save the result.

python fsdp_rollout_worker.py TINY_DIR SYNTH_DIR OUT.pt
torchrun --nproc_per_node=2 fsdp_rollout_worker.py TINY_DIR SYNTH_DIR OUT.pt
"""

import os
import sys

import torch
import torch.distributed as dist

import data
import rollout
from runtime import parallel
from thinker import batching, encoders, model, scoring
from thinker.media import load_media

tiny, world_dir, out = sys.argv[1:4]
distributed = "RANK" in os.environ
if distributed:
    dist.init_process_group("gloo")
policy, processor = model.load_policy(tiny)
ref = model.load_policy(tiny)[0].requires_grad_(False)
# a reference that differs from the policy, so the ref pass is checked
with torch.no_grad():
    for param in ref.parameters():
        param.mul_(0.9)
if distributed:
    parallel.shard(policy)
    parallel.shard(ref)
manifest = data.load_manifest(os.path.join(world_dir, "train.jsonl"))
recs = [r for r in manifest if r.get("video") and r.get("audio")][:2]
media = batching.encode(processor, recs, [load_media(r, 4) for r in recs])
# every rank samples the same rows: the sharded model must match the whole one
torch.manual_seed(7)
roll = rollout.rollout(policy, processor, recs, media, G=3, ref=ref, max_new_tokens=10)
rank = dist.get_rank() if distributed else 0
every = torch.ones(6, dtype=torch.bool)
mv, ma = rollout.masked_logprobs(policy, roll, every, every, micro_batch=4)
# ragged ranks: rank 0 scores no row under x\v and every other row under x\a, rank 1 all; no hang
need_v = every & (rank == 1)
need_a = torch.arange(6) % (2 - rank) == 0
some = rollout.masked_logprobs(policy, roll, need_v, need_a, micro_batch=4)
# and rank r stops after 4 + 4r tokens; synced_gpus keeps the collectives in step
with torch.no_grad():
    video = encoders.encode_video(policy, media)
    audio = encoders.encode_audio(policy, media)
    inputs = scoring.expand(media, 1, video, audio)
with parallel.unsharded(policy):
    ids, _, _ = rollout.generate(policy, processor, inputs, max_new_tokens=4 + 4 * rank)
lengths = [ids.shape[1]]
if distributed:
    lengths = [None] * dist.get_world_size()
    dist.all_gather_object(lengths, ids.shape[1])
if rank == 0:
    torch.save(
        {
            "ids": roll.completion_ids,
            "mv": mv,
            "ma": ma,
            "ref": roll.ref_logp,
            "some": some,
            "lengths_differ": len(set(lengths)) > 1,
        },
        out,
    )
if distributed:
    dist.destroy_process_group()
