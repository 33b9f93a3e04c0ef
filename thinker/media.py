"""Media file I/O: video frames and 16 kHz mono audio, as Qwen2.5-Omni takes them.

Uniformly sampled frames (8 by default) with the times they are shown, and the audio as its own
item (use_audio_in_video=False); see docs/method.md, section 8. `probe` and `probe_cache` read
headers (every load of a manifest; a float sound file is also read, as it can hold NaN);
`load_clip` and `load_media` decode (every training read; thinker/video.py keeps only the sampled
frames); `verify` decodes a record as training reads it, every frame, and checks its cache
against its files (data.py --check). The decoders (PyAV, soundfile, torchaudio) are imported by
the functions that use them: a run on synthetic caches never loads them.
"""

import math
import sys
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from thinker import video as videos
from thinker.audio import SR, decode_audio
from thinker.video import sample_indices

FRAMES = 8
# The feature extractor's hop (WhisperFeatureExtractor as Qwen2.5-Omni sets it, 10 ms at 16 kHz).
# A waveform of n samples gives ceil(n / HOP) mel frames and the audio tower's two stride-2 steps
# ((L - 1) // 2 + 1, then (L - 2) // 2 + 1) turn 2 frames or fewer into 0 audio tokens, which
# crashes the rotary positions beside a video and silently drops the audio without one.
HOP = 160
MIN_AUDIO_SAMPLES = 2 * HOP + 1
# safetensors dtypes of a synthetic cache's tensors
CACHE_DTYPES = {"frames": "U8", "waveform": "F32"}
# sound-file encodings that can hold NaN or infinity, read whole at load
FLOAT_SUBTYPES = ("FLOAT", "DOUBLE")


class DataError(ValueError):
    """Bad manifest line or unreadable media; the message names the file and line."""


# what decoding a bad media file raises (soundfile, safetensors, or no frames at all), FFmpeg's
# errors aside (`decode_errors`)
DECODE_ERRORS = (OSError, IndexError, RuntimeError, DataError, SafetensorError)


def decode_errors():
    """DECODE_ERRORS, and FFmpeg's once PyAV is loaded: before, nothing can have raised one."""
    av = sys.modules.get("av")
    if av is None:
        return DECODE_ERRORS
    return (av.error.FFmpegError, *DECODE_ERRORS)


class Clip(NamedTuple):
    """A record's decoded media: video (T, H, W, 3) uint8, audio (S,) float32 at 16 kHz, and
    times (T,) float64, the second each frame is shown; None where absent or unknown."""

    video: torch.Tensor | None
    audio: torch.Tensor | None
    times: torch.Tensor | None


def audio_window(processor):
    """Seconds of audio a Qwen2.5-Omni processor keeps (its feature extractor truncates the rest):
    2 for the tiny thinker, 300 for Qwen2.5-Omni 3B/7B."""
    return processor.feature_extractor.n_samples / SR


def check_audio_length(samples, path):
    """Raise DataError unless `samples` (16 kHz) of the audio in `path` give an audio token."""
    if samples < MIN_AUDIO_SAMPLES:
        raise DataError(
            f"audio in {path} lasts {samples / SR:.4f} s ({samples} samples at 16 kHz), shorter "
            f"than the {MIN_AUDIO_SAMPLES / SR:.4f} s ({MIN_AUDIO_SAMPLES} samples) that give "
            "one audio token"
        )


# ---------------------------------------------------------------- 1. headers
def probe(path, kind):
    """Open a media file's header only: raise DataError unless it holds a `kind` ("video" or
    "audio") stream; return its audio's length in 16 kHz samples (None: no audio stream, or an
    FFmpeg header that does not say). Exact for sound files, FFmpeg's estimate otherwise. A float
    sound file is read whole: DataError when it holds NaN or infinity. A video stream must hold a
    frame (its first packet is read)."""
    # the decoders load where they are used: a run on synthetic caches never needs them
    import av
    import soundfile as sf

    if kind == "audio":
        try:
            info = sf.info(str(path))
        except (sf.LibsndfileError, RuntimeError):
            # not a sound file: FFmpeg reads it below
            info = None
        if info is not None:
            problem = None
            if info.subtype in FLOAT_SUBTYPES:
                problem = nonfinite(sf.read(str(path), dtype="float32")[0], path)
            if problem:
                raise DataError(problem)
            return math.ceil(info.frames * SR / info.samplerate)
    try:
        with av.open(str(path)) as box:
            streams = getattr(box.streams, kind)
            samples = _header_samples(box)
            empty = kind == "video" and streams and not _has_packet(box, streams[0])
    except av.error.FFmpegError as err:
        raise DataError(f"{kind} file {path} is unreadable ({err})") from None
    if not streams:
        raise DataError(f"{kind} file {path} has no {kind} stream")
    if empty:
        raise DataError(f"video file {path} has no frames (its video stream holds no packet)")
    return samples


def _has_packet(box, stream):
    """Whether an open container's `stream` holds a packet with data (the first one read)."""
    return any(packet.size for packet in box.demux(stream))


def nonfinite(wave, path):
    """Why the audio `wave` (an array or tensor) of `path` cannot be used, when a sample is not
    finite; None when every one is."""
    finite = torch.isfinite(torch.as_tensor(wave))
    if finite.all():
        return None
    first = int((~finite).flatten().nonzero()[0])
    return f"audio of {path} is not finite (NaN or infinity at sample {first})"


def _header_samples(box):
    """Length in 16 kHz samples of an open container's first audio stream, by its header."""
    if not box.streams.audio:
        return None
    stream = box.streams.audio[0]
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    elif box.duration is not None:
        # a microsecond count (av.time_base)
        seconds = box.duration / 1_000_000
    else:
        return None
    return math.ceil(seconds * SR)


def probe_cache(path, has_video, has_audio):
    """Open a synthetic cache's header only: raise DataError unless it holds frames (T, H, W, 3)
    uint8 for a record with video and a waveform (S,) float32 for one with audio; return the
    waveform's length (None: none)."""
    wanted = []
    if has_video:
        wanted.append("frames")
    if has_audio:
        wanted.append("waveform")
    try:
        with safe_open(str(path), "pt") as cache:
            names = set(cache.keys())
            slices = {}
            for name in wanted:
                if name in names:
                    slices[name] = cache.get_slice(name)
            shapes = {name: s.get_shape() for name, s in slices.items()}
            dtypes = {name: s.get_dtype() for name, s in slices.items()}
    except (SafetensorError, OSError) as err:
        raise DataError(
            f"cache file {path} is corrupt ({err}); delete it to decode the media"
        ) from None
    for name in wanted:
        if name not in shapes:
            raise DataError(f"cache file {path} holds no {name}")
        # frames (T, H, W, 3), waveform (S,)
        rank = 4 if name == "frames" else 1
        right_shape = len(shapes[name]) == rank and 0 not in shapes[name]
        if name == "frames" and right_shape:
            right_shape = shapes[name][-1] == 3
        if not right_shape or dtypes[name] != CACHE_DTYPES[name]:
            raise DataError(
                f"cache file {path}: {name} is {dtypes[name]} {shapes[name]}, "
                f"not {CACHE_DTYPES[name]} of the shape a synthetic cache holds"
            )
    if "waveform" in shapes:
        return shapes["waveform"][0]
    return None


# ---------------------------------------------------------------- 2. decoding
def decode_video(path, frames=None):
    """(T, H, W, 3) uint8 frames of a video file: all of them, or `frames` uniformly sampled
    (thinker/video.py: only those are kept)."""
    return videos.decode(path, frames).images


def load_media(record, frames=FRAMES):
    """(video (T, H, W, 3) uint8 | None, audio (S,) float32 16 kHz | None) of a record
    (load_clip)."""
    clip = load_clip(record, frames)
    return clip.video, clip.audio


def load_clip(record, frames=FRAMES):
    """A record's Clip: `frames` uniformly sampled frames (every one when frames is None) with
    the times they are shown, and the audio.

    From the synthetic cache when there is one; without an audio file, from the video's audio
    track. A decoding error, audio too short for an audio token, or audio that is not finite
    becomes a DataError naming the manifest line, the file and the record."""
    where = record.get("source", record.get("id"))
    named = f"(record {record.get('id')!r})"
    path = record.get("cache")
    try:
        if path:
            clip = load_cache(path, frames, record.get("video"))
        else:
            clip = Clip(None, None, None)
            path = record.get("video")
            if path:
                decoded = videos.decode(path, frames)
                clip = Clip(decoded.images, None, decoded.times)
            path = record.get("audio") or record.get("video")
            if path:
                clip = clip._replace(audio=decode_audio(path))
        if clip.audio is not None:
            check_audio_length(len(clip.audio), path)
    except decode_errors() as err:
        raise DataError(
            f"{where}: cannot decode {path} {named}: {type(err).__name__}: {err}"
        ) from None
    # a float wav can hold NaN, which the processor would pass on
    problem = None if clip.audio is None else nonfinite(clip.audio, path)
    if problem:
        raise DataError(f"{where}: {problem} {named}")
    return clip


def load_cache(path, frames, video_path=None):
    """The Clip of a synthetic cache file, which holds every decoded frame (all returned when
    frames is None), their times and the waveform; a cache without times takes those of the
    video file it was decoded from (None: no such file, or another frame count)."""
    cached = load_file(path)
    video = cached.get("frames")  # (T, H, W, 3)
    times = cached.get("times")  # (T,)
    if video is not None and times is None and video_path:
        times = videos.times(video_path)  # (T,)
        if times is not None and len(times) != len(video):
            times = None
    if video is not None and frames is not None:
        chosen = sample_indices(len(video), frames)
        video = video[chosen]  # (frames, H, W, 3)
        if times is not None:
            times = times[chosen]  # (frames,)
    return Clip(video, cached.get("waveform"), times)


# ---------------------------------------------------------------- 3. verification
def verify(record):
    """Decode a record's media as training reads them (load_clip: sampled frames, finite audio)
    and every frame of its video, or, for a record with a synthetic cache, check the cache equal
    to its media files decoded. Raise DataError naming the manifest line, the file and the
    record; return the audio's length in 16 kHz samples (None: no audio)."""
    where = record.get("source", record.get("id"))
    named = f"(record {record.get('id')!r})"
    if not record.get("cache"):
        audio = load_clip(record).audio
        path = record.get("video")
        try:
            if path:
                videos.count_frames(path)
        except decode_errors() as err:
            raise DataError(
                f"{where}: cannot decode {path} {named}: {type(err).__name__}: {err}"
            ) from None
        return None if audio is None else len(audio)
    cached = load_clip(record, frames=None)
    files = {key: value for key, value in record.items() if key != "cache"}
    decoded = load_clip(files, frames=None)
    for name, kept, fresh in zip(("frames", "waveform"), cached[:2], decoded[:2]):
        same = kept is None and fresh is None
        if kept is not None and fresh is not None and kept.shape == fresh.shape:
            same = torch.allclose(kept.float(), fresh.float(), atol=1e-4)
        if not same:
            raise DataError(
                f"{where}: the {name} in cache file {record['cache']} {named} differ from "
                "its media files decoded; delete the cache to decode the media"
            )
    return None if cached.audio is None else len(cached.audio)
