"""Many processes: torch.distributed from torchrun's environment, FSDP2 sharding, global sums.

train.py reads as one process; what only matters when there are several lives here.

Devices, one rule: the process group always has a gloo backend, so collectives on CPU tensors
(counts, metrics, Python objects) run on every machine; with a GPU it also has nccl, which FSDP2's
collectives on CUDA tensors use. Model inputs and everything the loss reads live on the training
device; rewards and metrics are computed on the CPU and moved once (train.oppo_step).
"""

import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

import data
import rollout


def init():
    """Process group from torchrun's environment (a 1-process group under plain python); (rank, world, device)."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"  # see the module docstring
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), torch.device("cuda" if cuda else "cpu")


def shard(policy, device="cpu", bf16=False, checkpointing=False):
    """FSDP2: each decoder layer, the vision tower and the audio tower as units, then the root.

    One fp32 process keeps the plain module: there is nothing to shard, and FSDP's hooks made a
    tiny-model CPU step several times slower."""
    policy.to(device)
    if checkpointing:
        policy.activation_checkpointing_enable()  # transformers 5.23: gradient_checkpointing_enable is deprecated
    if dist.get_world_size() == 1 and not bf16:
        return policy
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    for layer in policy.model.language_model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(policy.model.visual, mp_policy=mp)  # the towers as their own units: generate under
    fully_shard(policy.model.audio_tower, mp_policy=mp)  # FSDP2 fails otherwise (ENV_NOTES.md)
    fully_shard(policy, mp_policy=mp)
    for method in (
        "get_video_features",
        "get_audio_features",
    ):  # rollout.py encodes media outside forward
        register_fsdp_forward_method(policy, method)
    return policy


def encode_media(policy, media):
    """rollout.encode_video and encode_audio, plus a zero for the loss: 0 x each tower this rank's
    clips do not use, run on a blank input. FSDP2 gathers a unit and reduces its gradient only on
    the ranks that run it, at the point of the graph where they run it; so under torchrun every
    rank runs both towers, the towers are gathered up front, in one order, and the root stays
    gathered until train.run_stage reshards it after the step: real media features pass through
    the root's forward and blank ones do not, so the ranks would otherwise reach its backward
    gathers at different times. Returns (video, audio, zero)."""
    if dist.get_world_size() == 1:
        return rollout.encode_video(policy, media), rollout.encode_audio(policy, media), 0.0
    vc, ac, dev, zero = (
        policy.config.vision_config,
        policy.config.audio_config,
        media["input_ids"].device,
        0.0,
    )
    policy.set_reshard_after_backward(False, recurse=False)
    for tower in (policy.model.visual, policy.model.audio_tower):
        tower.set_reshard_after_forward(False)  # rollout.unsharded sets it back to True
        tower.unshard()
    video, audio = rollout.encode_video(policy, media), rollout.encode_audio(policy, media)
    if video is None:
        m = vc.spatial_merge_size
        px = torch.zeros(
            m * m, vc.in_channels * vc.temporal_patch_size * vc.patch_size**2, device=dev
        )
        blank = policy.get_video_features(
            px, torch.tensor([[1, m, m]], device=dev), return_dict=True
        )
        zero = zero + 0 * blank.pooler_output[0].sum()
    if audio is None:
        T = 2 * ac.n_window  # one chunk of the audio tower
        blank = policy.get_audio_features(
            torch.zeros(1, ac.num_mel_bins, T, device=dev),
            torch.ones(1, T, dtype=torch.long, device=dev),
            return_dict=True,
        )
        zero = zero + 0 * blank.last_hidden_state.sum()
    return video, audio, zero


def global_sum(*xs):
    """Sums of Python numbers over ranks, in float64: token counts and losses that normalise."""
    t = torch.tensor([float(x) for x in xs], dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def mean_metrics(m, world):
    """Mean of every numeric metric over ranks (rank 0 logs it)."""
    keys = sorted(
        k for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    )
    t = torch.tensor([float(m[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: v / world for k, v in zip(keys, t.tolist())}


def load_manifest(path):
    """data.load_manifest on rank 0, sent to the others: loads running at once on several ranks
    race in the datasets cache folder they share (rebuilt on every load)."""
    out = [data.load_manifest(path) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(out, src=0)
    return out[0]
