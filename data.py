"""Data: manifests, media decoding, cue decomposition, prompts, batching, modality masking.

A manifest (SPEC section 8) is JSON lines {"id", "video", "audio", "subtitle", "label",
"reasoning", "cues": {"visual", "acoustic", "emotion"}}, media paths relative to it, either may be
absent. Real corpora (MER2023/2024, MER-Caption+, MAFW, DFEW) need one; synth.py writes one and
adds `cache` and `scenario`. Media as Qwen2.5-Omni takes them: uniformly sampled frames (8) and
16 kHz mono audio as its own item (use_audio_in_video=False). Masks: SPEC section 5.

    python data.py --check runs/synth/train.jsonl     # load, validate, summarise a manifest
    python data.py --make-world runs/synth            # the default synthetic world (synth.py --help)
"""

import argparse
import json
import re
from collections import Counter
from pathlib import Path

import av
import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from safetensors import SafetensorError
from safetensors.torch import load_file

SR, FRAMES, FPS = 16000, 8, 2.0
CUE_KINDS = ("visual", "acoustic", "emotion")
SYSTEM = "You are an expert in emotion recognition."
INSTRUCTION = (
    "Which emotion does the person show? Output the thinking process in <think> </think> and the final "
    "emotion in <answer> </answer> tags."
)  # R1-Omni's instruction, reworded


class DataError(ValueError):
    """Bad manifest line or unreadable media; the message names the file and line."""


class Manifest(list):
    """The loaded records; `.errors` holds one "file:line: problem" message per skipped line."""


# ---------------------------------------------------------------- 1. manifests
def load_manifest(path, on_error="skip", check_media=True):
    """Records of a manifest: paths resolved, cues filled in (decompose_cues), source = "file:line".

    A line that is not JSON, lacks id or label, repeats an id, or names a missing or unreadable file (header
    opened when check_media and there is no cache) is skipped into .errors (on_error="skip") or raises DataError."""
    import datasets  # its text builder keeps blank lines (row i is line i + 1) and reads .gz too

    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    if not Path(path).is_file():
        raise DataError(f"{path}: manifest not found")
    datasets.disable_progress_bars()
    # Rebuilt every time (cheap): datasets fingerprints a local file by its mtime alone.
    lines = datasets.load_dataset(
        "text", data_files=str(path), split="train", download_mode="force_redownload"
    )["text"]
    records, seen, records.errors = Manifest(), set(), []
    for n, line in enumerate(lines, 1):
        try:
            if not line.strip():
                continue
            rec = _record(json.loads(line), Path(path).parent, check_media)
            if rec["id"] in seen:
                raise DataError(f"id {rec['id']!r} appears twice")
            seen.add(rec["id"])
            records.append(dict(rec, source=f"{path}:{n}"))
        except (json.JSONDecodeError, DataError) as err:
            why = (
                f"not JSON ({err.msg}, column {err.colno})"
                if isinstance(err, json.JSONDecodeError)
                else err
            )
            if on_error == "raise":
                raise DataError(f"{path}:{n}: {why}") from None
            records.errors.append(f"{path}:{n}: {why}")
    return records


def _record(rec, root, check_media):
    if not isinstance(rec, dict):
        raise DataError(f"a record must be a JSON object, got {type(rec).__name__}")
    for key in ("id", "label"):
        if rec.get(key) in (None, "", []):
            raise DataError(f"missing required field {key!r}")
    if not isinstance(rec["label"], (str, list)) or not all(
        isinstance(x, str) for x in list(rec["label"])
    ):
        raise DataError(f"label must be a string or a list of strings, got {rec['label']!r}")
    rec = dict(rec, id=str(rec["id"]), subtitle=str(rec.get("subtitle") or ""))
    for key in ("cache", "video", "audio"):  # a missing cache is only a slower load
        if rec.get(key) and (key != "cache" or (root / rec[key]).is_file()):
            rec[key] = str(root / rec[key])
            if not Path(rec[key]).is_file():
                raise DataError(f"{key} file {rec[key]} not found")
            if (
                check_media and key != "cache" and "cache" not in rec
            ):  # synth's cache came from these files
                try:  # reads the header only; FFmpeg reads wav too
                    with av.open(rec[key]) as box:
                        if not getattr(box.streams, key):
                            raise DataError(f"{key} file {rec[key]} has no {key} stream")
                except av.error.FFmpegError as err:
                    raise DataError(f"{key} file {rec[key]} is unreadable ({err})") from None
        else:
            rec.pop(key, None)
    cues = decompose_cues(rec.get("reasoning") or "") if rec.get("cues") is None else rec["cues"]
    if not isinstance(cues, dict) or not all(isinstance(cues.get(k, []), list) for k in CUE_KINDS):
        raise DataError(f"cues must map {CUE_KINDS} to lists of phrases, got {cues!r}")
    return dict(rec, cues={k: [str(c) for c in cues.get(k, [])] for k in CUE_KINDS})


# ---------------------------------------------------------------- 2. media
def sample_indices(n, frames):
    """`frames` uniformly spaced indices into n frames; a shorter clip repeats frames."""
    return np.linspace(0, n - 1, frames).round().astype(int)


def decode_video(path, frames=None):
    """(T, H, W, 3) uint8 frames of a video file: all of them, or `frames` uniformly sampled."""
    with av.open(str(path)) as box:
        stream = box.streams.video[0]
        out = [
            f.to_ndarray(format="rgb24") for packet in box.demux(stream) for f in packet.decode()
        ]
    if not out:
        raise DataError(f"video file {path} has no frames")
    return torch.from_numpy(
        np.stack(out if frames is None else [out[i] for i in sample_indices(len(out), frames)])
    )


def decode_audio(path, sr=SR):
    """(S,) float32 mono waveform at sr, by soundfile (wav, flac, ...) or FFmpeg; None: no audio."""
    try:
        wave, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (S, C)
        wave = torch.from_numpy(wave.mean(1))
    except (sf.LibsndfileError, RuntimeError):
        with av.open(str(path)) as box:  # e.g. the audio track of a video
            stream, chunks = (box.streams.audio or [None])[0], []
            if stream is not None:
                mono, rate = (
                    av.AudioResampler(format="flt", layout="mono", rate=stream.rate),
                    stream.rate,
                )
                chunks = [
                    r.to_ndarray().reshape(-1)
                    for p in box.demux(stream)
                    for f in p.decode()
                    for r in mono.resample(f)
                ]
        if not chunks:
            return None
        wave = torch.from_numpy(np.concatenate(chunks))
    return AF.resample(wave, rate, sr) if rate != sr else wave


def load_media(record, frames=FRAMES):
    """(video (T, H, W, 3) uint8 | None, audio (S,) float32 16 kHz | None) of a record.

    From synth.py's cache when there is one; without an audio file, from the video's audio
    track. A decoding error becomes a DataError naming the manifest line."""
    try:
        if record.get("cache"):
            cached = load_file(record["cache"])
            video = cached.get("frames")
            return (
                None if video is None else video[sample_indices(len(video), frames)]
            ), cached.get("waveform")
        video = decode_video(record["video"], frames) if record.get("video") else None
        sound = record.get("audio") or record.get("video")
        return video, (decode_audio(sound) if sound else None)
    except (
        av.error.FFmpegError,
        OSError,
        IndexError,
        RuntimeError,
        DataError,
        SafetensorError,
    ) as err:
        raise DataError(
            f"{record.get('source', record.get('id'))}: cannot decode media ({err})"
        ) from None


# ---------------------------------------------------------------- 3. cue decomposition
# EMER-style reasoning: "In the video, ... In the audio, ... In the text, ... Therefore ...". A lead-in opens a
# section lasting to the next one; a clause (split on , ; :) naming face or voice words of one modality only goes
# to that modality, others to the section; text, conclusion ("Therefore ...") and unplaced clauses are emotion.
LEAD_INS = {
    "visual": r"(in|from) the (video|visuals?|images?|frames?|scene|footage)|visually|the video shows",
    "acoustic": r"(in|from) the (audio|voice|speech|sound)|acoustically|the audio (reveals|shows)",
    "text": r"(in|from) the (text|subtitles?|transcript|words)|textually",
    "conclusion": r"therefore|thus|overall|in summary|in conclusion|so|hence|taken together|combining",
}
WORDS = {
    "visual": r"face|facial|mouth|lips?|smil\w*|frown\w*|eyes?|eyebrows?|brows?|head|gaze|nods?|shakes?|"
    r"forehead|cheeks?|expression|posture|gestures?|hands?|body|looks? (at|down|up|away)",
    "acoustic": r"voice|vocal|tone|pitch|speech|speaking|speaks|loud\w*|quiet\w*|volume|intonation|pace|"
    r"tempo|sigh\w*|trembl\w*|audio",
}


def decompose_cues(reasoning):
    """{"visual": [...], "acoustic": [...], "emotion": [...]} clauses of a reasoning text."""
    cues, section = {k: [] for k in CUE_KINDS}, None
    for sentence in re.split(r"(?<=[.!?])\s+|\n+", reasoning):
        lead = next(
            (name for name, p in LEAD_INS.items() if re.match(rf"\s*({p})\b", sentence, re.I)), None
        )
        sentence = (
            re.sub(rf"^\s*({LEAD_INS[lead]})\b[\s,:]*", "", sentence, flags=re.I)
            if lead
            else sentence
        )
        section = lead if lead in ("visual", "acoustic", "text") else section
        for clause in re.split(r"[,;:]", sentence):
            clause = re.sub(
                r"^(and|but|while|also|which|whereas)\s+|[\s.!?]+$", "", clause.strip(), flags=re.I
            )
            if len(clause.split()) < 2:
                continue
            hits = [k for k, w in WORDS.items() if re.search(rf"\b({w})\b", clause, re.I)]
            sense = (
                hits[0]
                if len(hits) == 1
                else section
                if section in ("visual", "acoustic")
                else None
            )
            cues[
                "emotion" if lead == "conclusion" or section == "text" or not sense else sense
            ].append(clause)
    return cues


# ---------------------------------------------------------------- 4. prompts and batches
def messages(record, has_video=True, has_audio=True):
    """R1-Omni-style chat: a system text, then the video, the audio, the subtitle and the instruction."""
    subtitle = f"Subtitle: {record['subtitle']}\n" if record.get("subtitle") else ""
    user = [{"type": "video"}] * has_video + [{"type": "audio"}] * has_audio
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
        {"role": "user", "content": user + [{"type": "text", "text": subtitle + INSTRUCTION}]},
    ]


def target_text(record):
    label = record["label"] if isinstance(record["label"], str) else ", ".join(record["label"])
    return f"<think>{record.get('reasoning') or ''}</think><answer>{label}</answer>"


def corpus(records):
    """Each record's prompt text and target, as often as they occur: a tiny tokenizer's corpus (model.build_tiny)."""
    return [f"{SYSTEM}\nSubtitle: {r['subtitle']}\n{INSTRUCTION}" for r in records] + [
        target_text(r) for r in records
    ]


def _process(processor, record, video, audio):
    """One record's prompt tensors, batch dimension dropped where it is per-record."""
    text = processor.apply_chat_template(
        messages(record, video is not None, audio is not None),
        add_generation_prompt=True,
        tokenize=False,
    )
    # Qwen2_5OmniProcessor's class-level video size (>= 128 x 28x28 pixels a frame) would upscale
    # small frames; a video processor sized below that (the tiny model's 56x56) keeps its own.
    size, floor = (
        processor.video_processor.size,
        getattr(processor, "videos_kwargs", {}).get("size", {}),
    )
    small = size.get("longest_edge") and size["longest_edge"] < floor.get("shortest_edge", 0)
    vkw = dict(
        fps=FPS,
        **({"size": {k: size[k] for k in ("shortest_edge", "longest_edge")}} if small else {}),
    )
    out = processor(
        text=[text],
        videos=None if video is None else [video],
        videos_kwargs=vkw,
        audio=None if audio is None else [np.asarray(audio, np.float32)],
        use_audio_in_video=False,
        return_tensors="pt",
    )
    return {
        k: v[0] if k in ("input_ids", "input_features", "feature_attention_mask") else v
        for k, v in out.items()
        if k != "attention_mask"
    }


def encode(processor, records, media=None, targets=None, cache=None, frames=FRAMES):
    """LEFT-padded batch for the thinker's forward/generate (pass use_audio_in_video=False there).

    media[i] = load_media(records[i]) (loaded when None); records may lack video or audio, and a
    medium's keys are absent when no record has it. targets: strings appended to the prompts
    (plus eos), adding labels (B, L) = -100 off the targets. cache: the caller's dict id ->
    processed prompt tensors (the processor is ~20% of a tiny step), valid while media stay."""
    items = []
    for i, rec in enumerate(records):
        item = None if cache is None else cache.get(rec["id"])
        if item is None:
            item = _process(
                processor, rec, *(media[i] if media is not None else load_media(rec, frames))
            )
            if cache is not None:
                cache[rec["id"]] = item
        items.append(item)
    tok = processor.tokenizer
    tails = [
        tok(t + (tok.eos_token or ""), add_special_tokens=False)["input_ids"] for t in targets or []
    ]
    seqs = [
        it["input_ids"].tolist() + t
        for it, t in zip(items, tails or [[]] * len(items), strict=True)
    ]
    batch = dict(
        tok.pad({"input_ids": seqs}, padding_side="left", return_tensors="pt")
    )  # (B, L) ids and mask
    if targets is not None:
        L = batch["input_ids"].shape[1]
        batch["labels"] = torch.stack(
            [
                torch.where(torch.arange(L) >= L - len(t), row, -100)
                for row, t in zip(batch["input_ids"], tails)
            ]
        )  # (B, L)
    # video: (patches, D), (Bv, 3), (Bv,); audio, padded by the processor to one chunk: (Ba, mels, T), (Ba, T)
    for keys, join in (
        (("pixel_values_videos", "video_grid_thw", "video_second_per_grid"), torch.cat),
        (("input_features", "feature_attention_mask"), torch.stack),
    ):
        have = [it for it in items if keys[0] in it]
        batch.update({key: join([it[key] for it in have]) for key in keys} if have else {})
    return batch


# ---------------------------------------------------------------- 5. modality masking (SPEC section 5)
def mask_modality(batch, modality, rho=0.9, seed=0):
    """x\\v or x\\a: a new batch, rho of each clip's video patch rows or valid audio frames zeroed.

    Every other tensor is the same object (tokens and positions identical). Zero is the
    processed features' zero (mean pixel, constant log-mel), not a silent waveform."""
    if modality not in ("video", "audio") or not 0 <= rho <= 1:
        raise ValueError(
            f"mask_modality wants modality 'video' or 'audio' and 0 <= rho <= 1, got {modality!r}, {rho}"
        )
    out, gen = dict(batch), torch.Generator().manual_seed(seed)
    if modality == "video" and "pixel_values_videos" in batch:
        x, start = batch["pixel_values_videos"].clone(), 0  # (patches, D)
        for n in batch["video_grid_thw"].prod(-1).tolist():
            x[start + torch.randperm(n, generator=gen)[: round(rho * n)]] = 0
            start += n
        out["pixel_values_videos"] = x
    elif modality == "audio" and "input_features" in batch:
        x = batch["input_features"].clone()  # (Ba, mels, T)
        for i, valid in enumerate(batch["feature_attention_mask"].bool()):
            frames = valid.nonzero().squeeze(1)
            x[
                i, :, frames[torch.randperm(len(frames), generator=gen)[: round(rho * len(frames))]]
            ] = 0
        out["input_features"] = x
    return out


def main(argv=None):
    import synth  # imports data: so only here

    ap = argparse.ArgumentParser(
        description=__doc__,
        epilog="The generator, synth.py: " + synth.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--check", metavar="MANIFEST", help="load a manifest, report bad lines, summarise it"
    )
    ap.add_argument(
        "--on-error",
        choices=("skip", "raise"),
        default="skip",
        help="bad lines: skip and count, or stop",
    )
    ap.add_argument(
        "--make-world",
        metavar="DIR",
        help="write the default world (below) into DIR unless it is there",
    )
    a = ap.parse_args(argv)
    if a.make_world:
        print("manifests:", ", ".join(str(p) for p in synth.ensure_world(a.make_world).values()))
    if a.check:
        recs = load_manifest(a.check, on_error=a.on_error)
        print(
            f"{a.check}: {len(recs)} records, {len(recs.errors)} skipped",
            *recs.errors[:10],
            sep="\n  ",
        )
        for name, key in (
            ("labels", lambda r: str(r["label"])),
            ("scenarios", lambda r: r.get("scenario", "-")),
            ("media", lambda r: "+".join(k for k in ("video", "audio") if k in r) or "none"),
        ):
            print(f"{name}:", dict(Counter(map(key, recs))))
        print(
            "cues per record:",
            {k: sum(len(r["cues"][k]) for r in recs) / max(1, len(recs)) for k in CUE_KINDS},
        )
        for rec, (video, audio) in [
            (r, load_media(r)) for r in recs[:1]
        ]:  # decode one clip end to end
            print(
                f"{rec['id']}: video {None if video is None else tuple(video.shape)}, audio "
                f"{None if audio is None else f'{len(audio) / SR:.2f} s'}"
            )
    if not (a.make_world or a.check):
        ap.print_help()


if __name__ == "__main__":
    main()
