"""Audio decoding: a 16 kHz mono float32 waveform, as Qwen2.5-Omni's feature extractor takes it,
from a sound file (soundfile: wav, flac, ...) or a media file's audio track (FFmpeg). The decoders
are imported where they decode: a run on cached waveforms never loads them."""

import numpy as np
import torch

SR = 16000


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
