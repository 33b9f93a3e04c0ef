"""Micro-batches of clips: one way to cut a step's batch for every pass that scores it.

The update, the reference pass and the masked passes all run `size` clips at a time: `ranges`
gives the clip ranges [c0, c1), `clips` the inputs of one range (its processed batch, rotary
positions and tower outputs), and the range's rows are c0 * G to c1 * G. The passes without
gradient run the towers once over the whole batch and take each range's share of their outputs;
the update runs them on each range, with gradient. When one range is the whole batch, its
inputs are the batch's own objects, untouched.
"""

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling


@dataclass
class Clips:
    """The inputs of a range of n clips."""

    batch: dict  # processed, as batching.encode gives it
    positions: torch.Tensor  # (3, n, P) their prompts' rotary positions (scoring.positions)
    video: BaseModelOutputWithPooling | None = None  # their vision-tower output, if given
    audio: tuple | None = None  # their audio-tower output, one (tokens_k, D) per audio, if given


def ranges(B, size=None):
    """The clip ranges (c0, c1) of `size` clips each that cover B clips (the last may be
    shorter); size None: one range of all B."""
    size = size or B
    return [(c0, min(c0 + size, B)) for c0 in range(0, B, size)]


def entry_range(input_ids, token_id, c0, c1):
    """The entries of clips [c0, c1) in a medium's per-entry tensors, as a slice.

    A medium's entries exist only for the clips that have it (their prompts hold its
    placeholder token `token_id`), one per clip, in clip order."""
    has = (input_ids == token_id).any(1)  # (B,)
    return slice(int(has[:c0].sum()), int(has[:c1].sum()))


def clips(model, batch, c0, c1, pos, video=None, audio=None):
    """Clips [c0, c1) of a processed batch (batching.encode), with their rotary positions from
    `pos` (3, B, P) and, when given, their tower outputs from `video` and `audio`.

    When [c0, c1) is the whole batch these are the very objects passed in; otherwise they equal
    what batching.encode and scoring.positions give for those clips alone.
    """
    if c0 == 0 and c1 == len(batch["input_ids"]):
        return Clips(batch, pos, video, audio)
    ids = batch["input_ids"]
    videos = entry_range(ids, model.config.video_token_id, c0, c1)
    audios = entry_range(ids, model.config.audio_token_id, c0, c1)
    # the prompts are left-padded to the batch's longest: these clips' rows keep only the columns
    # up to their own longest, as batching.encode pads them alone
    attention = batch["attention_mask"][c0:c1]  # (n, P)
    first = int(attention.any(0).nonzero()[0])
    out = {"input_ids": ids[c0:c1, first:], "attention_mask": attention[:, first:]}
    if "pixel_values_videos" in batch and videos.stop > videos.start:
        # (videos + 1,) where each video's patch rows start
        starts = batch["video_grid_thw"].prod(-1).cumsum(0).tolist()
        starts.insert(0, 0)
        patches = slice(starts[videos.start], starts[videos.stop])
        out["pixel_values_videos"] = batch["pixel_values_videos"][patches]
        out["video_grid_thw"] = batch["video_grid_thw"][videos]
        out["video_second_per_grid"] = batch["video_second_per_grid"][videos]
    if "input_features" in batch and audios.stop > audios.start:
        out["input_features"] = batch["input_features"][audios]
        out["feature_attention_mask"] = batch["feature_attention_mask"][audios]
    clip_video = None
    if video is not None and "pixel_values_videos" in out:
        clip_video = BaseModelOutputWithPooling(pooler_output=video.pooler_output[videos])
    clip_audio = None
    if audio is not None and "input_features" in out:
        clip_audio = audio[audios]
    return Clips(out, pos[:, c0:c1, first:], clip_video, clip_audio)
