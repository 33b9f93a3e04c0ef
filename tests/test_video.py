"""thinker/video.py: decoding keeps only the frames it samples (memory independent of the clip's
length), seeks without changing a pixel, bounds a frame's pixels, and gives the processor the
frames' true times (docs/method.md, section 8)."""

import subprocess
import sys

import av
import numpy as np
import pytest
import torch
from train_runs import ENV, ROOT

from thinker import batching, media, model, video

# a clip of this many 320 x 240 frames holds about 69 MB of RGB
LONG, SHORT = 300, 8


def write_clip(path, n, width, height, rate, gop=None):
    """An H.264 mp4 of n frames, each a flat shade with a corner pattern, at `rate` frames/s."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", format="mp4") as box:
        stream = box.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"threads": "1"}
        if gop:
            stream.options = {"threads": "1", "g": str(gop)}
        for i in range(n):
            image = np.full((height, width, 3), (7 * i) % 256, np.uint8)
            image[:16, :16] = rng.integers(0, 256, (16, 16, 3))
            box.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        box.mux(stream.encode())
    return path


def peak_growth_kb(path, frames):
    """How far a fresh process's resident memory peaks (KB) above where it was while it decodes
    `path` to `frames` frames, after a first decode of another clip has loaded the codec. Linux:
    writing 5 to clear_refs resets the peak (VmHWM) to the present size (VmRSS)."""
    code = (
        "import re, sys\n"
        "from thinker import media\n"
        "def kb(name):\n"
        "    return int(re.search(name + r':\\s+(\\d+)', open('/proc/self/status').read())[1])\n"
        "media.decode_video(sys.argv[2], 2)\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = kb('VmRSS')\n"
        "media.decode_video(sys.argv[1], int(sys.argv[3]))\n"
        "print(kb('VmHWM') - before)\n"
    )
    warm = path.with_name("warm.mp4")
    if not warm.exists():
        write_clip(warm, 2, 320, 240, 25)
    argv = [sys.executable, "-c", code, str(path), str(warm), str(frames)]
    out = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def test_a_long_clip_decodes_in_the_memory_of_a_short_one(tmp_path):
    long = write_clip(tmp_path / "long.mp4", LONG, 320, 240, 25)
    short = write_clip(tmp_path / "short.mp4", SHORT, 320, 240, 25)
    grown = {name: peak_growth_kb(path, 4) for name, path in (("long", long), ("short", short))}
    # keeping every frame would add LONG x 230 KB (about 69 MB)
    assert grown["long"] < grown["short"] + 16_000, grown


def test_seeking_to_the_sampled_frames_changes_no_pixel(tmp_path):
    """A keyframe every 10 frames: the sampled frames are reached by seeking, and equal those
    of a decode of every frame; their times are the stream's (pts x time_base)."""
    path = write_clip(tmp_path / "gop.mp4", 95, 64, 48, 25, gop=10)
    every = video.decode(path)
    assert every.images.shape == (95, 48, 64, 3)
    for frames in (4, 8, 200):
        chosen = video.sample_indices(95, frames)
        sampled = video.decode(path, frames)
        assert torch.equal(sampled.images, every.images[chosen])
        torch.testing.assert_close(sampled.times, every.times[chosen])
    torch.testing.assert_close(every.times, torch.arange(95, dtype=torch.float64) / 25)
    assert video.count_frames(path) == 95


def test_frames_over_the_pixel_bound_are_downscaled_as_decoded(tmp_path):
    path = write_clip(tmp_path / "wide.mp4", 3, 1920, 1080, 25)
    frames = media.decode_video(path, 2)
    _, height, width, _ = frames.shape
    assert height * width <= video.MAX_PIXELS < 1920 * 1080
    assert width / height == pytest.approx(1920 / 1080, rel=0.01)
    small = write_clip(tmp_path / "small.mp4", 3, 320, 240, 25)
    assert media.decode_video(small, 2).shape == (2, 240, 320, 3)


@pytest.fixture(scope="module")
def processor(tiny_dir):
    return model.load_policy(tiny_dir)[1]


def test_the_processor_is_told_the_true_frame_times(tmp_path, processor):
    """31 frames at 10 fps sampled to 4: frames 0, 10, 20, 30, shown at 0, 1, 2 and 3 s; one
    temporal patch of 2 frames spans 2 s of the clip."""
    path = write_clip(tmp_path / "ten.mp4", 31, 56, 56, 10)
    clip = media.load_clip({"id": "ten", "video": str(path)}, frames=4)
    torch.testing.assert_close(clip.times, torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64))
    record = {"id": "ten", "video": str(path), "subtitle": ""}
    batch = batching.encode(processor, [record], frames=4)
    assert batch["video_second_per_grid"].tolist() == [2.0]
    # at 2 fps (the processor's own default) the same 4 frames span 1 s per patch
    two = write_clip(tmp_path / "two.mp4", 4, 56, 56, 2)
    batch = batching.encode(processor, [dict(record, video=str(two))], frames=4)
    assert batch["video_second_per_grid"].tolist() == [1.0]
    # 8 frames of a 4-frame clip repeat each frame: a patch still spans 0.5 s of the clip
    assert batching.frame_rate(media.load_clip({"video": str(two)}, 8).times, 2) == 4.0
    assert batching.frame_rate(None, 2) == batching.FPS == 2.0


def test_the_synthetic_worlds_cached_inputs_are_unchanged(manifest_world, processor):
    """The cache's frames take their times from the clip's video file (2 fps, 4 frames): every
    processed tensor equals the processor's at its default 2 fps."""
    _, recs = manifest_world
    with_video = [r for r in recs if "video" in r][:6]
    clips = [media.load_clip(r, 4) for r in with_video]
    want = torch.tensor([0.0, 0.5, 1.0, 1.5], dtype=torch.float64)
    assert all(torch.equal(c.times, want) for c in clips)
    batch = batching.encode(processor, with_video, frames=4)
    at_default = batching.encode(processor, with_video, [(c.video, c.audio) for c in clips])
    assert batch.keys() == at_default.keys()
    for key in batch:
        assert torch.equal(batch[key], at_default[key]), key
    assert batch["video_second_per_grid"].tolist() == [1.0] * len(with_video)
