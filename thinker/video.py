"""Video decoding that keeps only the frames it samples, with the times they are shown.

A clip of any length costs the memory of the frames kept. `_index` reads the packets alone (no
decoding) for the number of frames, each one's presentation time (pts x time_base) and the
keyframes; `decode` then decodes forward to each sampled frame, seeking to a keyframe when one
lies between (a decoder must start from a keyframe), converts only the sampled frames to RGB and
downscales a frame of more than MAX_PIXELS before it leaves the decoder. A file whose packets
carry no timestamps is decoded twice instead, once to count its frames and once to keep them.
The times reach the processor as the clip's true frame rate (thinker/batching.py).
"""

import math
from bisect import bisect_right
from typing import NamedTuple

import numpy as np
import torch

# Larger frames are downscaled, aspect ratio kept, as they are decoded: 768 patches of 28 x 28,
# qwen-omni-utils' VIDEO_MAX_PIXELS, the most of a frame Qwen2.5-Omni's processor keeps
MAX_PIXELS = 768 * 28 * 28


class Frames(NamedTuple):
    """Decoded frames (T, H, W, 3) uint8 and the second each is shown (T,) float64 (None:
    unknown)."""

    images: torch.Tensor
    times: torch.Tensor | None


def sample_indices(n, frames):
    """`frames` uniformly spaced indices into n frames; a shorter clip repeats frames."""
    return np.linspace(0, n - 1, frames).round().astype(int)


def decode(path, frames=None, max_pixels=MAX_PIXELS):
    """Frames of a video file's first video stream: all of them, or `frames` uniformly sampled
    (sample_indices), with their times; IndexError when it has no frame."""
    import av

    with av.open(str(path)) as box:
        stream = box.streams.video[0]
        time_base = stream.time_base
        indexed = _index(box, stream)
    if indexed is None:
        return _decode_counted(path, frames, max_pixels)
    shown, keys = indexed
    if not shown:
        raise IndexError(f"video file {path} has no frames")
    chosen = range(len(shown)) if frames is None else sample_indices(len(shown), frames)
    kept = _decode_at(path, [shown[i] for i in chosen], shown, keys, max_pixels)
    images = [kept[shown[i]][0] for i in chosen]
    times = [float(kept[shown[i]][1] * time_base) for i in chosen]
    return Frames(_stack(images), torch.tensor(times, dtype=torch.float64))


def times(path):
    """(n,) float64: the second each frame of a video file is shown, by its packets alone; None
    when they carry no timestamps."""
    import av

    with av.open(str(path)) as box:
        stream = box.streams.video[0]
        indexed = _index(box, stream)
        if indexed is None:
            return None
        seconds = [float(pts * stream.time_base) for pts in indexed[0]]
        return torch.tensor(seconds, dtype=torch.float64)


def count_frames(path):
    """Decode every frame of a video file, keeping none; how many there are."""
    import av

    n = 0
    with av.open(str(path)) as box:
        for _ in box.decode(box.streams.video[0]):
            n += 1
    return n


def _index(box, stream):
    """(pts of every frame in presentation order, pts of the keyframes, sorted) by demuxing
    `stream` without decoding; None when a packet has no pts."""
    shown = []
    keys = []
    for packet in box.demux(stream):
        # the empty packet that ends the stream
        if packet.size == 0:
            continue
        if packet.pts is None:
            return None
        shown.append(packet.pts)
        if packet.is_keyframe:
            keys.append(packet.pts)
    return sorted(shown), sorted(keys)


def _decode_at(path, wanted, shown, keys, max_pixels):
    """{pts: (RGB frame, pts it was shown at)} for each pts in `wanted`: decoding forward, and
    seeking to the last keyframe at or before the next wanted frame when that skips frames. A
    wanted frame the decoder never gives is taken from the next one it gives."""
    import av

    pending = sorted(set(wanted))
    # each frame's place in presentation order
    place = {pts: i for i, pts in enumerate(shown)}
    kept = {}
    last = -1
    with av.open(str(path)) as box:
        stream = box.streams.video[0]
        frames = box.decode(stream)
        while pending:
            target = pending[0]
            at = bisect_right(keys, target) - 1
            if at >= 0 and place[keys[at]] > last + 1:
                box.seek(keys[at], stream=stream, backward=True)
                frames = box.decode(stream)
            frame = _next_at_or_after(frames, target, path)
            last = place.get(frame.pts, place[target])
            rgb = _rgb(frame, max_pixels)
            while pending and pending[0] <= frame.pts:
                kept[pending.pop(0)] = (rgb, frame.pts)
    return kept


def _next_at_or_after(frames, target, path):
    """The first frame of the decoder `frames` shown at or after pts `target`."""
    for frame in frames:
        if frame.pts is not None and frame.pts >= target:
            return frame
    raise IndexError(f"video file {path} ends before its frame at pts {target}")


def _decode_counted(path, frames, max_pixels):
    """`decode` for a file whose packets have no timestamps: one pass counts the frames, the next
    keeps the sampled ones; their times are each frame's own when the decoder gives them."""
    import av

    n = count_frames(path)
    if not n:
        raise IndexError(f"video file {path} has no frames")
    chosen = range(n) if frames is None else sample_indices(n, frames)
    wanted = set(int(i) for i in chosen)
    kept = {}
    with av.open(str(path)) as box:
        for i, frame in enumerate(box.decode(box.streams.video[0])):
            if i in wanted:
                kept[i] = (_rgb(frame, max_pixels), frame.time)
            if i >= max(wanted):
                break
    images = [kept[i][0] for i in chosen]
    times = [kept[i][1] for i in chosen]
    if None in times:
        return Frames(_stack(images), None)
    return Frames(_stack(images), torch.tensor(times, dtype=torch.float64))


def _rgb(frame, max_pixels):
    """(H, W, 3) uint8 of a decoded frame, downscaled to at most max_pixels, aspect ratio kept."""
    if frame.width * frame.height <= max_pixels:
        return frame.to_ndarray(format="rgb24")
    scale = math.sqrt(max_pixels / (frame.width * frame.height))
    width = max(1, int(frame.width * scale))
    height = max(1, int(frame.height * scale))
    return frame.to_ndarray(format="rgb24", width=width, height=height)


def _stack(images):
    return torch.from_numpy(np.stack(images))  # (T, H, W, 3)
