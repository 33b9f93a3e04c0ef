"""Model inputs of manifest records: chat prompts, processed and LEFT-padded batches, masking.

A record's prompt is R1-Omni's chat (a system text, the video, the audio, the subtitle and the
instruction); its media are processed as Qwen2.5-Omni takes them: uniformly sampled frames, at
the clip's true frame rate (`frame_rate`), and 16 kHz mono audio as its own item
(use_audio_in_video=False). The masked inputs x\\v and x\\a
keep every token and position of x and zero a fraction of one modality's processed features
(docs/method.md, section 5).
"""

import numpy as np
import torch

from thinker import media

# frames per second the processor is told when the frames' times are unknown (the processor's
# own default)
FPS = 2.0
SYSTEM = "You are an expert in emotion recognition."
# R1-Omni's instruction, reworded
INSTRUCTION = (
    "Which emotion does the person show? Output the thinking process in <think> </think> and "
    "the final emotion in <answer> </answer> tags."
)
# processor outputs of one record that carry a batch dimension of 1, dropped per record
UNBATCHED = ("input_ids", "input_features", "feature_attention_mask")
# video: (patches, D), (Bv, 3), (Bv,), each clip's patch rows contiguous
VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw", "video_second_per_grid")
# audio, padded by the processor to one chunk: (Ba, mels, T), (Ba, T)
AUDIO_KEYS = ("input_features", "feature_attention_mask")


# ---------------------------------------------------------------- 1. prompts
def messages(record, has_video=True, has_audio=True):
    """R1-Omni-style chat: a system text, then the video, audio, subtitle and instruction."""
    subtitle = f"Subtitle: {record['subtitle']}\n" if record.get("subtitle") else ""
    user = []
    if has_video:
        user.append({"type": "video"})
    if has_audio:
        user.append({"type": "audio"})
    user.append({"type": "text", "text": subtitle + INSTRUCTION})
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
        {"role": "user", "content": user},
    ]


def target_text(record):
    label = record["label"] if isinstance(record["label"], str) else ", ".join(record["label"])
    return f"<think>{record.get('reasoning') or ''}</think><answer>{label}</answer>"


def corpus(records):
    """Each record's prompt text, then each target: a tiny tokenizer's corpus (tiny.build_tiny)."""
    prompts = [f"{SYSTEM}\nSubtitle: {r['subtitle']}\n{INSTRUCTION}" for r in records]
    targets = [target_text(r) for r in records]
    return prompts + targets


# ---------------------------------------------------------------- 2. batches
def encode(processor, records, decoded=None, targets=None, cache=None, frames=media.FRAMES):
    """LEFT-padded batch for the thinker's forward/generate (pass use_audio_in_video=False there).

    decoded[i] = media.load_clip(records[i]) (loaded when None; a (video, audio) pair of
    load_media is taken at FPS); records may lack video or audio, and a medium's keys are absent
    when no record has it. targets: strings appended to the prompts (plus eos), adding labels
    (B, L) = -100 off the targets. cache: the caller's dict id -> processed prompt tensors (the
    processor is ~20% of a tiny step), valid while media stay.
    """
    items = _prompt_items(processor, records, decoded, cache, frames)
    tok = processor.tokenizer
    seqs = [item["input_ids"].tolist() for item in items]
    if targets is not None:
        # each target's token ids, closed by eos, follow its prompt's
        tails = target_ids(tok, targets)
        seqs = [seq + tail for seq, tail in zip(seqs, tails, strict=True)]
    padded = tok.pad({"input_ids": seqs}, padding_side="left", return_tensors="pt")
    batch = dict(padded)  # input_ids (B, L), attention_mask (B, L)
    if targets is not None:
        batch["labels"] = _labels(batch["input_ids"], tails)  # (B, L)
    # the clips' video patch rows are concatenated and their audio features stacked; a record
    # without the medium adds nothing
    for keys, join in ((VIDEO_KEYS, torch.cat), (AUDIO_KEYS, torch.stack)):
        with_medium = [item for item in items if keys[0] in item]
        if not with_medium:
            continue
        for key in keys:
            batch[key] = join([item[key] for item in with_medium])
    return batch


def target_ids(tokenizer, targets):
    """The token ids each target string adds after its prompt in `encode`: its own, then eos.
    Their lengths against the model's position limit find references too long to train on."""
    eos = tokenizer.eos_token or ""
    return [tokenizer(t + eos, add_special_tokens=False)["input_ids"] for t in targets]


def _prompt_items(processor, records, decoded, cache, frames):
    """Each record's processed prompt tensors (_process), from `cache` when it holds them."""
    items = []
    for i, rec in enumerate(records):
        item = None
        if cache is not None:
            item = cache.get(rec["id"])
        if item is None:
            clip = decoded[i] if decoded is not None else media.load_clip(rec, frames)
            item = _process(processor, rec, *clip)
            if cache is not None:
                cache[rec["id"]] = item
        items.append(item)
    return items


def frame_rate(times, patch):
    """The frame rate the processor is told for frames shown at `times` (T,) seconds: `patch`
    (its temporal_patch_size) over the mean time between the first frames of consecutive
    temporal patches, so that its video_second_per_grid = patch / rate is the true time one
    grid step of the video's rotary positions spans. FPS when the times are unknown or equal."""
    if times is None or len(times) < 2:
        return FPS
    starts = times[::patch]
    if len(starts) > 1:
        seconds = float(starts[-1] - starts[0]) / (len(starts) - 1)
    else:
        # one patch: its frames' spacing, times the patch
        seconds = float(times[-1] - times[0]) / (len(times) - 1) * patch
    if seconds <= 0:
        return FPS
    return patch / seconds


def _process(processor, record, video, audio, times=None):
    """One record's prompt tensors, batch dimension dropped where it is per-record; `times`: the
    second each frame is shown (None: unknown)."""
    chat = messages(record, video is not None, audio is not None)
    text = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    video_kwargs = {"fps": frame_rate(times, processor.video_processor.temporal_patch_size)}
    # Qwen2_5OmniProcessor's class-level video size (>= 128 x 28x28 pixels a frame) would upscale
    # small frames; a video processor sized below that (the tiny model's 56x56) keeps its own.
    size = processor.video_processor.size
    floor = getattr(processor, "videos_kwargs", {}).get("size", {})
    small = size.get("longest_edge") and size["longest_edge"] < floor.get("shortest_edge", 0)
    if small:
        video_kwargs["size"] = {k: size[k] for k in ("shortest_edge", "longest_edge")}
    out = processor(
        text=[text],
        videos=None if video is None else [video],
        videos_kwargs=video_kwargs,
        audio=None if audio is None else [np.asarray(audio, np.float32)],
        use_audio_in_video=False,
        return_tensors="pt",
    )
    item = {}
    for key, value in out.items():
        if key == "attention_mask":
            continue
        item[key] = value[0] if key in UNBATCHED else value
    return item


def _labels(input_ids, tails):
    """labels (B, L): input_ids (B, L) on each row's target tail, -100 elsewhere (left padding:
    a row's tail is its last len(tail) positions)."""
    L = input_ids.shape[1]
    rows = []
    for row, tail in zip(input_ids, tails):
        rows.append(torch.where(torch.arange(L) >= L - len(tail), row, -100))  # (L,)
    return torch.stack(rows)  # (B, L)


# the media features, cast to the policy's dtype (bfloat16 under --bf16); ids and masks keep theirs
FEATURES = ("pixel_values_videos", "input_features")


def to_policy(batch, param):
    """The batch's tensors on the policy's device, its media FEATURES also in the policy's dtype
    (`param`: one of the policy's parameters)."""
    moved = {}
    for key, value in batch.items():
        if not torch.is_tensor(value):
            moved[key] = value
        elif key in FEATURES:
            moved[key] = value.to(param.device, param.dtype)
        else:
            moved[key] = value.to(param.device)
    return moved


# ---------------------------------------------------------------- 3. modality masking
def mask_modality(batch, modality, rho=0.9, seed=0):
    """x\\v or x\\a: a new batch, rho of each clip's video patch rows or valid audio frames zeroed.

    Every other tensor is the same object (tokens and positions identical). Zero is the
    processed features' zero (mean pixel, constant log-mel), not a silent waveform.
    """
    if modality not in ("video", "audio") or not 0 <= rho <= 1:
        raise ValueError(
            "mask_modality wants modality 'video' or 'audio' and 0 <= rho <= 1, "
            f"got {modality!r}, {rho}"
        )
    out = dict(batch)
    gen = torch.Generator().manual_seed(seed)
    if modality == "video" and "pixel_values_videos" in batch:
        pixels = batch["pixel_values_videos"].clone()  # (patches, D)
        start = 0
        for n in batch["video_grid_thw"].prod(-1).tolist():
            dropped = torch.randperm(n, generator=gen)[: round(rho * n)]
            pixels[start + dropped] = 0
            start += n
        out["pixel_values_videos"] = pixels
    elif modality == "audio" and "input_features" in batch:
        features = batch["input_features"].clone()  # (Ba, mels, T)
        for i, valid in enumerate(batch["feature_attention_mask"].bool()):
            frames = valid.nonzero().squeeze(1)  # (T_valid,)
            order = torch.randperm(len(frames), generator=gen)
            dropped = frames[order[: round(rho * len(frames))]]
            features[i, :, dropped] = 0
        out["input_features"] = features
    return out
