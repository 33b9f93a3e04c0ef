"""The thinker's towers, the vision and audio encoders: once per clip per pass, their output
shared by the clip's G rows (thinker/scoring.py), and under FSDP2 run on every rank.

A pass with gradient gets `Towers`: the outputs and the term that keeps a tower this rank's clips
do not use in the graph (runtime/parallel.py: gather_towers says why, backward applies it).
Shapes: B clips; a video's output is (tokens_k, D) per video, pooled; audio one (tokens_k, D)
per audio.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers.modeling_outputs import BaseModelOutputWithPooling

from runtime import parallel


def encode_video(model, batch):
    """Vision tower once over the batch's clips; None when no clip has video."""
    if "pixel_values_videos" not in batch:
        return None
    return model.get_video_features(
        batch["pixel_values_videos"], batch["video_grid_thw"], return_dict=True
    )


def encode_audio(model, batch):
    """Audio tower once over the batch's clips: one (tokens_k, D) tensor per audio; None
    without audio."""
    if "input_features" not in batch:
        return None
    features = model.get_audio_features(
        batch["input_features"], batch["feature_attention_mask"], return_dict=True
    )
    # (B,) the audio tokens of each clip
    tokens = (batch["input_ids"] == model.config.audio_token_id).sum(1)
    return features.last_hidden_state.split(tokens[tokens > 0].tolist())


@dataclass
class Towers:
    """The tower outputs of a pass with gradient, and the FSDP2 term that keeps the towers in
    its graph.

    Under FSDP2 every rank must run both towers (parallel.gather_towers says why): a tower that
    this rank's clips do not use runs on a blank input, and `in_graph` is 0 x its output, which
    parallel.backward adds to the loss: the tower joins the backward without changing any
    gradient. 0.0 in one process.
    """

    video: BaseModelOutputWithPooling | None = None
    audio: tuple | None = None
    in_graph: torch.Tensor | float = 0.0


def encode_media(policy, batch):
    """encode_video and encode_audio for a pass with gradient, as Towers."""
    if dist.get_world_size() == 1:
        return Towers(encode_video(policy, batch), encode_audio(policy, batch))
    parallel.gather_towers(policy)
    towers = Towers()
    for modality in ("video", "audio"):
        encoded = encode_tower(policy, batch, modality)
        setattr(towers, modality, getattr(encoded, modality))
        towers.in_graph = towers.in_graph + encoded.in_graph
    return towers


def encode_tower(policy, batch, modality):
    """The tower of one modality ("video" or "audio") with gradient, as Towers: its output, or
    under FSDP2 on a rank whose clips lack the modality, the blank input's term."""
    towers = Towers()
    if modality == "video":
        towers.video = encode_video(policy, batch)
    else:
        towers.audio = encode_audio(policy, batch)
    if getattr(towers, modality) is not None or dist.get_world_size() == 1:
        return towers
    device = batch["input_ids"].device
    if modality == "video":
        blank = blank_video(policy, device).pooler_output[0]
    else:
        blank = blank_audio(policy, device).last_hidden_state
    towers.in_graph = 0 * blank.sum()
    return towers


def blank_video(policy, device):
    """The vision tower on one all-zero frame of the smallest grid."""
    config = policy.config.vision_config
    merge = config.spatial_merge_size
    patch = config.in_channels * config.temporal_patch_size * config.patch_size**2
    pixels = torch.zeros(merge * merge, patch, device=device)  # (patches, D_patch)
    grid = torch.tensor([[1, merge, merge]], device=device)  # (1, 3) t, h, w
    return policy.get_video_features(pixels, grid, return_dict=True)


def blank_audio(policy, device):
    """The audio tower on one all-zero chunk of mel frames."""
    config = policy.config.audio_config
    T = 2 * config.n_window  # one chunk of the audio tower
    mel = torch.zeros(1, config.num_mel_bins, T, device=device)  # (1, mels, T)
    valid = torch.ones(1, T, dtype=torch.long, device=device)  # (1, T)
    return policy.get_audio_features(mel, valid, return_dict=True)
