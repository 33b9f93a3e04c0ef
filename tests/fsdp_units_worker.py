"""FSDP2 units on 2 gloo ranks: the policy as runtime.parallel.load builds it (weights read on
rank 0 alone, then broadcast), and the all-gathers of one SFT step before and after a rollout's
`parallel.unsharded` block.

    torchrun --nproc_per_node=2 fsdp_units_worker.py TINY_DIR SYNTH_DIR OUT.json
"""

import json
import os
import sys

import torch
import torch.distributed as dist

import data
import rollout
import train
from runtime import config, parallel
from thinker import batching, model

tiny, world_dir, out = sys.argv[1:4]
dist.init_process_group("gloo")
rank = dist.get_rank()
result = {}

# 1. rank 0 reads the weights, every rank gets its shard of them
reads = []
load_policy = model.load_policy


def counted_load(path, *args, meta=False, **kwargs):
    if not meta:
        reads.append(str(path))
    return load_policy(path, *args, meta=meta, **kwargs)


model.load_policy = counted_load
policy, processor = parallel.load(tiny)
model.load_policy = load_policy
plain = model.load_policy(tiny)[0]
want = plain.state_dict()
got = {name: value.full_tensor() for name, value in policy.state_dict().items()}
result["weights_equal"] = got.keys() == want.keys() and all(
    torch.equal(got[name], want[name]) for name in want
)
buffers = dict(plain.named_buffers())
result["buffers_equal"] = all(torch.equal(b, buffers[n]) for n, b in policy.named_buffers())
result["buffers"] = len(buffers)
reads_per_rank = [None, None]
dist.all_gather_object(reads_per_rank, len(reads))
result["reads_per_rank"] = reads_per_rank

# 2. all-gathers of one SFT step, before and after a rollout
gathers = []
all_gather_into_tensor = dist.all_gather_into_tensor


def counted_all_gather(*args, **kwargs):
    gathers.append(1)
    return all_gather_into_tensor(*args, **kwargs)


dist.all_gather_into_tensor = counted_all_gather
recs = parallel.from_rank0(data.load_manifest, os.path.join(world_dir, "train.jsonl"))
clips = [r for r in recs if r.get("video") and r.get("audio")][rank : rank + 1]
media = batching.encode(processor, clips, frames=4)
args = config.Args(sft_micro_batch=0)


def sft_step():
    """train.sft_step as run_stage runs it (the optimizer step left out); its all-gathers."""
    gathers.clear()
    policy.train()
    train.sft_step(args, policy, processor, clips, media)
    parallel.reshard_after_step(policy)
    policy.zero_grad(set_to_none=True)
    return len(gathers)


def settings():
    return [parallel.reshards_after_forward(unit) for unit in parallel.fsdp_units(policy)]


# the first step initialises FSDP2's state
sft_step()
result["settings_before"] = settings()
result["before"] = sft_step()
rollout.rollout(policy, processor, clips, media, G=2, max_new_tokens=4)
result["settings_after"] = settings()
result["after"] = sft_step()
result["root_reshards"] = parallel.reshards_after_forward(policy)
if rank == 0:
    with open(out, "w") as sink:
        json.dump(result, sink)
dist.destroy_process_group()
