"""media.py: media decoding, from synth.py's cache or from the files, frames sampled uniformly and
audio resampled to 16 kHz mono (docs/method.md, section 8)."""

import av
import numpy as np
import pytest
import soundfile as sf
import torch

from synthetic import render as synth_media
from thinker import media


# ---------------------------------------------------------------- media
def test_media_from_the_cache_equal_media_decoded_from_the_files(manifest_world):
    _, recs = manifest_world
    for r in recs[:8]:
        cached = media.load_media(r, frames=4)
        decoded = media.load_media({k: v for k, v in r.items() if k != "cache"}, frames=4)
        for a, b in zip(cached, decoded):
            assert (a is None and b is None) or torch.equal(a, b)
        video, audio = cached
        assert video is None or (video.shape == (4, 56, 56, 3) and video.dtype == torch.uint8)
        assert audio is None or (audio.shape == (32000,) and audio.dtype == torch.float32)


def test_a_clip_shorter_than_the_frame_count_repeats_frames(tmp_path):
    colours = np.array([[200, 0, 0], [0, 200, 0], [0, 0, 200]], np.uint8)
    synth_media.write_mp4(
        tmp_path / "short.mp4", np.broadcast_to(colours[:, None, None], (3, 56, 56, 3)).copy(), 2
    )
    every = media.decode_video(tmp_path / "short.mp4")
    eight = media.load_media({"id": "s", "video": str(tmp_path / "short.mp4")}, frames=8)[0]
    naive = [round(i * (3 - 1) / (8 - 1)) for i in range(8)]  # uniform positions over the 3 frames
    assert every.shape == (3, 56, 56, 3) and eight.shape == (8, 56, 56, 3)
    assert torch.equal(eight, every[naive])
    assert every.float().mean((1, 2)).argmax(1).tolist() == [
        0,
        1,
        2,
    ]  # order kept: red, green, blue


def _peak_hz(wave, sr=16000):
    return float(np.fft.rfftfreq(len(wave), 1 / sr)[np.abs(np.fft.rfft(np.asarray(wave))).argmax()])


def test_audio_is_resampled_to_16k_mono_and_read_from_a_video_track(tmp_path):
    t = np.arange(22050) / 22050
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 440 * t)], 1).astype(
        np.float32
    )
    sf.write(tmp_path / "a.wav", stereo, 22050)
    wave = media.decode_audio(tmp_path / "a.wav")
    assert wave.dtype == torch.float32 and wave.shape == (16000,)
    assert _peak_hz(wave) == pytest.approx(440, abs=2) and wave.abs().max() == pytest.approx(
        0.75, abs=0.03
    )
    # An mp4 with an AAC track at 44.1 kHz and no audio file: the audio comes from the video.
    with av.open(str(tmp_path / "av.mp4"), "w") as box:
        video = box.add_stream("libx264", rate=2)
        video.width, video.height, video.pix_fmt = 56, 56, "yuv420p"
        sound = box.add_stream("aac", rate=44100, layout="mono")
        for i in range(2):
            box.mux(
                video.encode(
                    av.VideoFrame.from_ndarray(
                        np.full((56, 56, 3), 90 * i, np.uint8), format="rgb24"
                    )
                )
            )
        tone = np.sin(2 * np.pi * 440 * np.arange(44100) / 44100).astype(np.float32)[None] * 0.5
        for s in range(0, 44100, 1024):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(tone[:, s : s + 1024]), format="fltp", layout="mono"
            )
            frame.sample_rate, frame.pts = 44100, s
            box.mux(sound.encode(frame))
        box.mux(video.encode())
        box.mux(sound.encode())
    frames, wave = media.load_media({"id": "v", "video": str(tmp_path / "av.mp4")}, frames=8)
    assert frames.shape == (8, 56, 56, 3)
    assert abs(len(wave) - 16000) < 0.1 * 16000 and _peak_hz(wave) == pytest.approx(440, abs=3)
    # A video without an audio track has no audio.
    synth_media.write_mp4(tmp_path / "mute.mp4", np.zeros((2, 56, 56, 3), np.uint8), 2)
    assert media.load_media({"id": "m", "video": str(tmp_path / "mute.mp4")})[1] is None
