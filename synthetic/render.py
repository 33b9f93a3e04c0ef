"""The synthetic world's media: drawn faces, synthesised voices, and their mp4 files.

The face carries only valence (mouth curvature and brow angle), the voice only arousal (pitch,
pitch movement, loudness, syllable rate); synthetic/world.py decides what each clip renders
(docs/method.md, section 10). Every draw comes from the clip's own generator, so the same seed
gives the same bytes.
"""

import av
import numpy as np

SR = 16000

# Valence -> the mouth's curvature sign; the curvature itself is jittered per clip.
MOUTH_CURVE = {"smile": 1, "flat": 0, "frown": -1}
# Eye detail -> the eyes' half-height in face coordinates (no detail: 0.035), jittered per clip.
EYE_HEIGHT = {"wide": 0.065, "narrow": 0.012}
# Arousal -> (f0 Hz, amplitude, syllables per second, pitch movement), each jittered per clip.
VOICE = {
    "low": (110, 0.05, 2.0, 0.02),
    "mid": (170, 0.13, 3.5, 0.06),
    "high": (260, 0.33, 5.5, 0.15),
}
# Voice detail -> the relative pitch change over the second half of the clip.
CONTOUR = {"rise": 0.4, "fall": -0.3}


def draw_face(rng, n, size, valence, detail=None, kind="face"):
    """(n, size, size, 3) uint8 frames of a drawn face; kind "face" | "no_face" | "black"."""
    if kind == "black":
        return np.zeros((n, size, size, 3), np.uint8)
    y, x = np.mgrid[0:size, 0:size] / size  # (S, S) each, in [0, 1)
    background = rng.uniform(20, 120, 3)
    skin = rng.uniform(150, 230, 3)
    ink = rng.uniform(10, 60, 3)
    cx, cy = 0.5 + rng.uniform(-0.05, 0.05, 2)
    rx = rng.uniform(0.27, 0.31)
    ry = rx * rng.uniform(1.1, 1.2)
    curve = MOUTH_CURVE[valence] * rng.uniform(0.07, 0.09)
    eye_h = EYE_HEIGHT.get(detail, 0.035) * rng.uniform(0.9, 1.1)
    # eye centre (|u|, v) in face coordinates
    ex = 0.35 * rx
    ey = -0.25 * ry
    frames = np.empty((n, size, size, 3))
    for t in range(n):
        dx, dy = rng.normal(0, 0.006, 2)
        # a nod moves the head down and up, a shake side to side, alternating frame to frame
        sway = 0.03 * (1 if t % 2 else -1)
        dx = dx + sway * (detail == "shake")
        dy = dy + sway * (detail == "nod")
        img = np.broadcast_to(background, (size, size, 3)).copy()  # (S, S, 3)
        if kind == "face":
            u = x - cx - dx  # (S, S) face-centred coordinates
            v = y - cy - dy  # (S, S)
            a = np.abs(u)
            eyes = ((a - ex) / 0.05) ** 2 + ((v - ey) / eye_h) ** 2 < 1
            # -1 at the brow's inner end, +1 at the outer end
            w = (a - ex) / 0.07
            brow_y = ey - 0.09 + brow_offset(valence, w)
            brows = (np.abs(w) <= 1) & (np.abs(v - brow_y) < 0.018)
            # -1..1 across the mouth
            across = u / (0.45 * rx)
            # signed distance from the mouth's curved centre line
            off_mouth = v - 0.45 * ry - curve * (0.5 - across**2)
            mouth = (np.abs(across) <= 1) & (np.abs(off_mouth) < 0.022)
            img[(u / rx) ** 2 + (v / ry) ** 2 < 1] = skin
            img[eyes | brows | mouth] = ink
        frames[t] = img + rng.normal(0, 6, img.shape)
    return np.clip(frames, 0, 255).astype(np.uint8)


def brow_offset(valence, w):
    """The brow's height above its rest line along w (-1 inner end, +1 outer end): arched for a
    smile, level when flat, lowered at the inner end for a frown."""
    if valence == "smile":
        return -0.025 * (1 - w**2)
    if valence == "flat":
        return 0 * w
    return 0.025 * (1 - w)


def synth_voice(rng, n, arousal, detail=None, kind="voice", sr=SR):
    """(n,) float32 waveform: a harmonic voice with syllables, a flat hum, or background noise."""
    t = np.arange(n) / sr  # (n,) seconds
    if kind == "noise":
        hiss = rng.normal(0, 0.08, n)
        return np.convolve(hiss, np.ones(16) / 16, "same").astype(np.float32)
    if kind == "flat":
        f0, amp, rate, wobble = 150.0, 0.1, 0.0, 0.0
    else:
        f0, amp, rate, wobble = VOICE[arousal]
        f0 = f0 * rng.uniform(0.9, 1.1)
        amp = amp * rng.uniform(0.85, 1.15)
        rate = rate * rng.uniform(0.85, 1.15)
    wobble_hz = rng.uniform(0.7, 1.5)
    wobble_phase = rng.uniform(0, 2 * np.pi)
    f = f0 * (1 + wobble * np.sin(2 * np.pi * wobble_hz * t + wobble_phase))  # (n,) Hz
    if detail:
        # the contour moves over the second half of the clip: 0 at its middle, 1 at its end
        second_half = np.clip(2 * t / t[-1] - 1, 0, 1)
        f = f * (1 + CONTOUR[detail] * second_half)
    phase = 2 * np.pi * np.cumsum(f) / sr  # (n,)
    # 8 harmonics from 2 trig calls: sin(k x) = 2 cos(x) sin((k-1) x) - sin((k-2) x)
    two_cos = 2 * np.cos(phase)
    prev = np.zeros(n)
    cur = np.sin(phase)
    wave = cur.copy()
    for k in range(2, 9):
        prev, cur = cur, two_cos * cur - prev
        wave += cur / k
    wave /= sum(1 / k for k in range(1, 9))  # (n,)
    if rate == 0:
        envelope = 1.0
    else:
        # one loudness swell per syllable, never quite silent
        syllable_phase = rng.uniform(0, 2 * np.pi)
        envelope = 0.1 + 0.9 * (0.5 - 0.5 * np.cos(2 * np.pi * rate * t + syllable_phase))
    return (amp * envelope * wave + rng.normal(0, 0.003, n)).astype(np.float32)


def write_mp4(path, frames, fps):
    """frames (T, H, W, 3) uint8 as an H.264 mp4 at `fps`, the same bytes on every run."""
    with av.open(str(path), "w", format="mp4") as box:
        stream = box.add_stream("libx264", rate=fps)
        stream.width = frames.shape[2]
        stream.height = frames.shape[1]
        stream.pix_fmt = "yuv420p"
        # crf 12: near-lossless, as mouth and brows are 1-2 px lines; one thread: same bytes
        stream.options = {"crf": "12", "preset": "veryfast", "tune": "zerolatency", "threads": "1"}
        for frame in frames:
            box.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        box.mux(stream.encode())
