"""Many processes: torch.distributed from torchrun's environment, FSDP2 sharding, global sums.

train.py reads as one process; what only matters when there are several lives here, and every
FSDP2 setting the code depends on is made here: the units, their mesh, precision and gradient
reduction (`shard`), the weights read once and broadcast (`load`), parameters kept gathered
through a rollout (`unsharded`) and through a backward (`gather_towers`, `reshard_after_step`),
and each rank's random stream (`rank_seed`).

Devices, one rule: the process group always has a gloo backend, so collectives on CPU tensors
(counts, metrics, Python objects) run on every machine; with a GPU it also has nccl, which FSDP2's
collectives on CUDA tensors use. Model inputs and everything the loss reads live on the training
device; rewards and metrics are computed on the CPU and moved once (train.oppo_step).
"""

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)

from thinker import model

# rank r's random stream is seed + r * STREAMS: rank 0 keeps the seed itself, and no two
# (seed, rank) pairs share a stream while seed < STREAMS and the whole stays under 2**32, the
# part of a seed torch's CPU generator reads (seed 1 + 2**32 draws what seed 1 draws)
STREAMS = 2**20
MAX_RANKS = 2**32 // STREAMS


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


def rank_seed(seed, rank):
    """The seed of rank `rank` in a run seeded `seed`: `seed` itself on rank 0.

    With seed + rank, seed s on rank r + 1 would be seed s + 1 on rank r: adjacent seeds of a
    study would share most of their samples.
    """
    if not 0 <= seed < STREAMS:
        raise ValueError(f"--seed {seed}: a seed from 0 to 2**20 - 1")
    if not 0 <= rank < MAX_RANKS:
        raise ValueError(f"rank {rank}: at most {MAX_RANKS} ranks have their own streams")
    return seed + rank * STREAMS


def fsdp_units(model):
    """The model's FSDP2 units, root included; none without FSDP."""
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def shard(policy, device="cpu", bf16=False, checkpointing=False):
    """FSDP2: each decoder layer, the vision tower and the audio tower as units, in bf16 the LM
    head too, then the root.

    One fp32 process keeps the plain module: there is nothing to shard, and FSDP's hooks made a
    tiny-model CPU step several times slower. Gradients are summed over ranks, not averaged: the
    losses are normalised by global counts (train.py), so each rank's loss is its share of the
    global loss and the sum of the ranks' gradients is the global gradient. A policy built on
    the meta device (`load`) is sharded there, then given memory on `device`.
    """
    meta = any(p.is_meta for p in policy.parameters())
    if not meta:
        policy.to(device)
    if checkpointing:
        # transformers 5.23: gradient_checkpointing_enable is deprecated
        policy.activation_checkpointing_enable()
    if dist.get_world_size() == 1 and not bf16:
        return policy
    # the mesh of the training device: FSDP2's default is the GPU's wherever there is one, which
    # would move a CPU policy and its inputs there
    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy()
    if bf16:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in policy.model.language_model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    # the towers as their own units: generate under FSDP2 fails otherwise
    fully_shard(policy.model.visual, mesh=mesh, mp_policy=mp)
    fully_shard(policy.model.audio_tower, mesh=mesh, mp_policy=mp)
    if bf16:
        shard_head(policy, mesh)
    # the root keeps its parameters gathered between forward and backward (FSDP2's own choice
    # for a root, made explicit: `unsharded` restores what it finds)
    fully_shard(policy, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    if meta:
        policy.to_empty(device=device)
    # the towers run outside forward (encoders.encode_video, encoders.encode_audio)
    register_fsdp_forward_method(policy, "get_video_features")
    register_fsdp_forward_method(policy, "get_audio_features")
    if dist.get_world_size() > 1:
        for unit in fsdp_units(policy):
            # a plain sum, which gloo and nccl both reduce: no division at all
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)
    return policy


def shard_head(policy, mesh):
    """The LM head as a unit of its own that computes in fp32: bf16 logits are rounded by up to
    2^-9 |z| before the log-softmax, a spurious KL between passes of different shapes. A head
    tied to the input embeddings shares its unit (one parameter, one unit)."""
    head = [policy.lm_head]
    embeddings = policy.get_input_embeddings()
    if policy.lm_head.weight is embeddings.weight:
        head.append(embeddings)
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    fully_shard(head, mesh=mesh, mp_policy=fp32)
    # FSDP2 casts the inputs of the unit's first module only (the embeddings, when tied)
    policy.lm_head.register_forward_pre_hook(upcast_input)


def upcast_input(module, args):
    """The hidden states in the dtype of the module's weight."""
    return (args[0].to(module.weight.dtype),)


def load(path, device="cpu", bf16=False, checkpointing=False):
    """(policy, processor) of a model directory (thinker.model.load_policy), sharded (`shard`).

    Under torchrun only rank 0 reads the weights into host memory: every rank builds the thinker
    on the meta device and shards it, then rank 0's full state dict is broadcast and each rank
    keeps its shard. Eight ranks reading a 7B thinker in fp32 at once would hold about 290 GB of
    host memory; this holds one copy, on rank 0.
    """
    if dist.get_world_size() == 1:
        policy, processor = model.load_policy(path)
        return shard(policy, device, bf16, checkpointing), processor
    policy, processor = model.load_policy(path, meta=True)
    full = {}
    buffers = {}
    if dist.get_rank() == 0:
        loaded = model.load_policy(path)[0]
        full = loaded.state_dict()
        buffers = dict(loaded.named_buffers())
    shard(policy, device, bf16, checkpointing)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(policy, full, options=options)
    # buffers outside the state dict (rotary frequencies) came out of the meta device unset
    for name, buffer in policy.named_buffers():
        if dist.get_rank() == 0:
            buffer.copy_(buffers[name])
        dist.broadcast(buffer, src=0)
    return policy, processor


@contextmanager
def unsharded(model):
    """Keep every FSDP2 unit's parameters gathered for the whole block, then give each unit back
    the setting it had (no-op without FSDP).

    Generation runs one forward per token; with per-unit resharding each decode step would
    all-gather every layer again (docs/performance.md).
    """
    units = fsdp_units(model)
    before = [reshards_after_forward(unit) for unit in units]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit, setting in zip(units, before):
            unit.reshard()
            unit.set_reshard_after_forward(setting, recurse=False)


def reshards_after_forward(unit):
    """Whether an FSDP2 unit frees its gathered parameters after forward. FSDP2 has a setter for
    it and no getter: this reads the setter's state (torch 2.11)."""
    group = unit._get_fsdp_state()._fsdp_param_group
    return group.post_forward_mesh_info is not None


def gather_towers(policy):
    """Before a pass with gradient under torchrun: gather both towers, and keep the root gathered
    through the backward until `reshard_after_step`.

    FSDP2 gathers a unit and reduces its gradient only on the ranks that run it, at the point of
    the graph where they run it; so every rank runs both towers (thinker.encoders.encode_media),
    the towers are gathered up front, in one order, and the root stays gathered: real media
    features pass through the root's forward and blank ones do not, so the ranks would otherwise
    reach its backward gathers at different times. `reshard_after_step` sets them back.
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
    so its gradients are the sharded ones that the clipping and the optimizer read, and let the
    towers reshard after forward again."""
    if dist.get_world_size() > 1:
        policy.reshard()
        for tower in (policy.model.visual, policy.model.audio_tower):
            tower.set_reshard_after_forward(True)


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
