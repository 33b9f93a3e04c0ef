"""Media file I/O: video frames and 16 kHz mono audio, as Qwen2.5-Omni takes them.

Uniformly sampled frames (8 by default) and the audio as its own item
(use_audio_in_video=False); see docs/method.md, section 8. `probe` and `probe_cache` read headers
only (every load of a manifest); `load_media` decodes (every training read); `verify` decodes a
record as training reads it and checks its cache against its files (data.py --check).

The decoders (PyAV, soundfile, torchaudio) are imported by the functions that use them: a run on
synthetic caches never loads them, and a machine that runs on caches need not have them.
"""

import math
import sys

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

SR = 16000
FRAMES = 8
# The feature extractor's hop (WhisperFeatureExtractor as Qwen2.5-Omni sets it, 10 ms at 16 kHz).
# A waveform of n samples gives ceil(n / HOP) mel frames and the audio tower's two stride-2 steps
# ((L - 1) // 2 + 1, then (L - 2) // 2 + 1) turn 2 frames or fewer into 0 audio tokens, which
# crashes the rotary positions beside a video and silently drops the audio without one.
HOP = 160
MIN_AUDIO_SAMPLES = 2 * HOP + 1
# safetensors dtypes of a synthetic cache's tensors
CACHE_DTYPES = {"frames": "U8", "waveform": "F32"}


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


def sample_indices(n, frames):
    """`frames` uniformly spaced indices into n frames; a shorter clip repeats frames."""
    return np.linspace(0, n - 1, frames).round().astype(int)


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
    FFmpeg header that does not say). Exact for sound files, FFmpeg's estimate otherwise."""
    import av
    import soundfile as sf

    if kind == "audio":
        try:
            info = sf.info(str(path))
            return math.ceil(info.frames * SR / info.samplerate)
        except (sf.LibsndfileError, RuntimeError):
            # not a sound file: FFmpeg reads it below
            pass
    try:
        with av.open(str(path)) as box:
            streams = getattr(box.streams, kind)
            samples = _header_samples(box)
    except av.error.FFmpegError as err:
        raise DataError(f"{kind} file {path} is unreadable ({err})") from None
    if not streams:
        raise DataError(f"{kind} file {path} has no {kind} stream")
    return samples


def _header_samples(box):
    """Length in 16 kHz samples of an open container's first audio stream, by its header."""
    import av

    if not box.streams.audio:
        return None
    stream = box.streams.audio[0]
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    elif box.duration is not None:
        seconds = box.duration / av.time_base
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
    """(T, H, W, 3) uint8 frames of a video file: all of them, or `frames` uniformly sampled."""
    import av

    images = []
    with av.open(str(path)) as box:
        stream = box.streams.video[0]
        for packet in box.demux(stream):
            for frame in packet.decode():
                images.append(frame.to_ndarray(format="rgb24"))  # (H, W, 3)
    if not images:
        raise DataError(f"video file {path} has no frames")
    if frames is not None:
        images = [images[i] for i in sample_indices(len(images), frames)]
    return torch.from_numpy(np.stack(images))  # (T, H, W, 3)


def decode_audio(path, sr=SR):
    """(S,) float32 mono waveform at sr, by soundfile (wav, flac, ...) or FFmpeg; None: no audio."""
    import soundfile as sf

    try:
        wave, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (S, C)
        wave = torch.from_numpy(wave.mean(1))  # (S,)
    except (sf.LibsndfileError, RuntimeError):
        # not a sound file: the audio track of a video, say
        track = decode_audio_track(path)
        if track is None:
            return None
        wave, rate = track
    if rate != sr:
        import torchaudio.functional as AF

        wave = AF.resample(wave, rate, sr)
    return wave


def decode_audio_track(path):
    """(wave (S,) float32 mono, its sample rate) of a media file's first audio stream by FFmpeg;
    None when it has none or the stream holds no samples."""
    import av

    chunks = []
    with av.open(str(path)) as box:
        if not box.streams.audio:
            return None
        stream = box.streams.audio[0]
        rate = stream.rate
        mono = av.AudioResampler(format="flt", layout="mono", rate=rate)
        for packet in box.demux(stream):
            for frame in packet.decode():
                for resampled in mono.resample(frame):
                    chunks.append(resampled.to_ndarray().reshape(-1))
    if not chunks:
        return None
    return torch.from_numpy(np.concatenate(chunks)), rate


def load_media(record, frames=FRAMES):
    """(video (T, H, W, 3) uint8 | None, audio (S,) float32 16 kHz | None) of a record; every
    frame when frames is None.

    From the synthetic cache when there is one; without an audio file, from the video's audio
    track. A decoding error, or audio too short for an audio token, becomes a DataError naming
    the manifest line, the file and the record."""
    where = record.get("source", record.get("id"))
    path = record.get("cache")
    try:
        if path:
            video, audio = load_cache(path, frames)
        else:
            video = None
            path = record.get("video")
            if path:
                video = decode_video(path, frames)
            path = record.get("audio") or record.get("video")
            audio = None
            if path:
                audio = decode_audio(path)
        if audio is not None:
            check_audio_length(len(audio), path)
    except decode_errors() as err:
        raise DataError(
            f"{where}: cannot decode {path} (record {record.get('id')!r}): "
            f"{type(err).__name__}: {err}"
        ) from None
    return video, audio


def load_cache(path, frames):
    """(video (frames, H, W, 3) uint8 | None, audio (S,) float32 | None) of a synthetic cache file,
    which holds every decoded frame (all returned when frames is None) and the waveform."""
    cached = load_file(path)
    video = cached.get("frames")  # (T, H, W, 3)
    if video is not None and frames is not None:
        video = video[sample_indices(len(video), frames)]  # (frames, H, W, 3)
    return video, cached.get("waveform")


# ---------------------------------------------------------------- 3. verification
def verify(record):
    """Decode a record's media as training reads them (load_media), every frame, and check what
    came out: a finite waveform and, for a record with a synthetic cache, the cache equal to its
    media files decoded. Raise DataError naming the manifest line, the file
    and the record; return the audio's length in 16 kHz samples (None: no audio)."""
    where = record.get("source", record.get("id"))
    named = f"(record {record.get('id')!r})"
    video, audio = load_media(record, frames=None)
    # a float wav can hold NaN, which the processor would pass on
    if audio is not None and not torch.isfinite(audio).all():
        path = record.get("cache") or record.get("audio") or record["video"]
        raise DataError(f"{where}: audio of {path} {named} is not finite")
    if record.get("cache"):
        files = {key: value for key, value in record.items() if key != "cache"}
        decoded = load_media(files, frames=None)
        for name, cached, fresh in zip(("frames", "waveform"), (video, audio), decoded):
            same = cached is None and fresh is None
            if cached is not None and fresh is not None and cached.shape == fresh.shape:
                same = torch.allclose(cached.float(), fresh.float(), atol=1e-4)
            if not same:
                raise DataError(
                    f"{where}: the {name} in cache file {record['cache']} {named} differ from "
                    "its media files decoded; delete the cache to decode the media"
                )
    if audio is None:
        return None
    return len(audio)
