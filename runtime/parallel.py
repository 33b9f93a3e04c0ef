"""Many processes: torch.distributed from torchrun's environment, FSDP2 sharding, global sums.

train.py reads as one process; what only matters when there are several lives here, and every
FSDP2 setting the code depends on is made here: the units and their gradient reduction (`shard`),
parameters kept gathered through a rollout (`unsharded`) and through a backward
(`gather_towers`, `reshard_after_step`).

Devices, one rule: the process group always has a gloo backend, so collectives on CPU tensors
(counts, metrics, Python objects) run on every machine; with a GPU it also has nccl, which FSDP2's
collectives on CUDA tensors use. Model inputs and everything the loss reads live on the training
device; rewards and metrics are computed on the CPU and moved once (train.oppo_step).
"""

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.fsdp import (
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)


def init():
    """Process group from torchrun's environment (a 1-process group under plain python);
    returns (rank, world, device)."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    # see the module docstring
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), torch.device("cuda" if cuda else "cpu")


def fsdp_units(model):
    """The model's FSDP2 units, root included; none without FSDP."""
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def shard(policy, device="cpu", bf16=False, checkpointing=False):
    """FSDP2: each decoder layer, the vision tower and the audio tower as units, then the root.

    One fp32 process keeps the plain module: there is nothing to shard, and FSDP's hooks made a
    tiny-model CPU step several times slower. Gradients are summed over ranks, not averaged: the
    losses are normalised by global counts (train.py), so each rank's loss is its share of the
    global loss and the sum of the ranks' gradients is the global gradient.
    """
    policy.to(device)
    if checkpointing:
        # transformers 5.23: gradient_checkpointing_enable is deprecated
        policy.activation_checkpointing_enable()
    if dist.get_world_size() == 1 and not bf16:
        return policy
    mp = MixedPrecisionPolicy()
    if bf16:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in policy.model.language_model.layers:
        fully_shard(layer, mp_policy=mp)
    # the towers as their own units: generate under FSDP2 fails otherwise
    fully_shard(policy.model.visual, mp_policy=mp)
    fully_shard(policy.model.audio_tower, mp_policy=mp)
    fully_shard(policy, mp_policy=mp)
    # the towers run outside forward (encoders.encode_video, encoders.encode_audio)
    register_fsdp_forward_method(policy, "get_video_features")
    register_fsdp_forward_method(policy, "get_audio_features")
    if dist.get_world_size() > 1:
        for unit in fsdp_units(policy):
            # a plain sum, which gloo and nccl both reduce: no division at all
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)
    return policy


@contextmanager
def unsharded(model):
    """Keep every FSDP2 unit's parameters gathered for the whole block (no-op without FSDP).

    Generation runs one forward per token; with per-unit resharding each decode step would
    all-gather every layer again (docs/performance.md).
    """
    units = fsdp_units(model)
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


def gather_towers(policy):
    """Before a pass with gradient under torchrun: gather both towers, and keep the root gathered
    through the backward until `reshard_after_step`.

    FSDP2 gathers a unit and reduces its gradient only on the ranks that run it, at the point of
    the graph where they run it; so every rank runs both towers (thinker.encoders.encode_media),
    the towers are gathered up front, in one order, and the root stays gathered: real media
    features pass through the root's forward and blank ones do not, so the ranks would otherwise
    reach its backward gathers at different times. The towers stay gathered after forward until
    the next `unsharded` block sets them back.
    """
    policy.set_reshard_after_backward(False, recurse=False)
    for tower in (policy.model.visual, policy.model.audio_tower):
        tower.set_reshard_after_forward(False)
        tower.unshard()


def backward(loss, *towers):
    """loss.backward(), the loss joined by each pass's FSDP2 term (thinker.encoders.Towers:
    `in_graph`, 0 x the output of a tower the rank's clips do not use), so that every rank's
    backward reaches both towers; the term is 0 in value and in gradient.

    Gradients are summed over ranks (`shard`): each rank's loss is its share of the global one.
    """
    for t in towers:
        if torch.is_tensor(t.in_graph):
            loss = loss + t.in_graph
    loss.backward()
    return loss.detach()


def reshard_after_step(policy):
    """After a step's backward under torchrun: reshard the root `gather_towers` kept gathered,
    so its gradients are the sharded ones that the clipping and the optimizer read."""
    if dist.get_world_size() > 1:
        policy.reshard()


def global_sum(*xs):
    """Sums of Python numbers over ranks, in float64: token counts and losses that normalise."""
    t = torch.tensor([float(x) for x in xs], dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def mean_metrics(metrics, world):
    """Mean of every numeric metric over ranks (rank 0 logs it)."""
    keys = []
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            keys.append(key)
    keys.sort()
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: v / world for k, v in zip(keys, t.tolist())}


def from_rank0(fn, *args):
    """fn(*args) computed on rank 0 and sent to the others (a Python object).

    For loading a manifest: loads running at once on several ranks race in the datasets cache
    folder they share (rebuilt on every load)."""
    out = [fn(*args) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(out, src=0)
    return out[0]
