"""The built-in synthetic emotion world: drawn faces, synthesised voices, known truth.

Every clip shows one of six emotions. The face carries only *valence* (mouth curvature and brow
angle), the voice only *arousal* (pitch, pitch movement, loudness, syllable rate), and the
emotion is the pair (docs/method.md, section 10):

                 low        mid        high
        smile     .          .         happy
        flat    neutral      .         surprise
        frown    sad       worried     angry

so the face alone or the voice alone gets at most 50% of a balanced set right; both give 100%.
About half of the clips (`detail_p`) also carry a label-free detail per modality (eyes wide or
narrowed, a nod or a head shake; the pitch rising or falling at the end). A detail can only be
known from its own modality, so stating it is perception and stating it without that modality
is a hallucination that can be counted exactly.

Scenarios (synthetic/plan.py's SCENARIOS and MIX, exact proportions per split): both modalities
expressive (45%); the face with a flat monotone hum or with no audio file; the voice with no
video file, a black video or a video with the face removed; the face with background noise
instead of a voice. Two absence kinds, the face removed and the noise, never appear in the
training split (HELD_OUT): the test asks whether faithfulness generalises to an absence the
model never saw. The subtitle's kind (an emotion-free line, none, a line giving the arousal, the
valence or the emotion itself) is drawn at the same rates in every scenario, so the subtitle
says nothing about which modality carries cues; a label is then not always determined by the
input (a clip without a face and with no valence in its subtitle). Cue lists and reasoning
mention exactly what was rendered: nothing about an empty or absent modality, a text cue when
the subtitle carries one.

Writes video/*.mp4, audio/*.wav (16 kHz), cache/*.safetensors (decoded frames and waveform, so
training never redraws or re-decodes), {train,val,test}.jsonl and world.json; same seed, same
bytes. The faces, voices and mp4 files are drawn by synthetic/render.py, what each clip shows
and says is planned by synthetic/plan.py.

    python -m synthetic.world --out runs/synth        # 2000 / 200 / 200 clips
"""

import fcntl
import json
import time
from argparse import ArgumentDefaultsHelpFormatter, RawDescriptionHelpFormatter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf
from safetensors.torch import save_file
from transformers import HfArgumentParser

from synthetic.plan import AROUSAL, HELD_OUT, MIX, SPLITS, VALENCE, plan, plans, split_mix
from synthetic.render import SR, draw_face, synth_voice, write_mp4
from thinker import media, video

# where `python train.py` builds the default world
WORLD_DIR = "runs/synth"
VERSION = 3


def make_clip(job):
    """Render, write and cache one clip; return its manifest record."""
    out, split, i, (scenario, kind, label), seed, frames, size, seconds, detail_p = job
    # one generator per clip: the files do not depend on the order or process making them
    rng = np.random.default_rng([seed, SPLITS.index(split), i])
    clip = plan(rng, label, scenario, kind, detail_p)
    cid = f"{split}_{i:05d}"
    rec = {"id": cid}
    cache = {}
    if clip["video"]:
        rec["video"] = f"video/{cid}.mp4"
        fps = Fraction(frames) / Fraction(seconds).limit_denominator(1000)
        images = draw_face(rng, frames, size, VALENCE[label], clip["face_detail"], clip["video"])
        write_mp4(out / rec["video"], images, fps)
        # what a loader would see
        cache["frames"] = media.decode_video(out / rec["video"])
        # the frames' times too: training on the cache needs no video decoder
        times = video.times(out / rec["video"])
        if times is not None:
            cache["times"] = times
    if clip["audio"]:
        rec["audio"] = f"audio/{cid}.wav"
        wave = synth_voice(
            rng, int(seconds * SR), AROUSAL[label], clip["voice_detail"], clip["audio"]
        )
        sf.write(out / rec["audio"], wave, SR, subtype="PCM_16")
        cache["waveform"] = media.decode_audio(out / rec["audio"])
    save_file(cache, out / "cache" / f"{cid}.safetensors")
    render = {
        "video": clip["video"],
        "audio": clip["audio"],
        "face_detail": clip["face_detail"],
        "voice_detail": clip["voice_detail"],
    }
    rec.update(
        subtitle=clip["subtitle"],
        label=label,
        reasoning=clip["reasoning"],
        cues=clip["cues"],
        scenario=scenario,
        subtitle_kind=kind,
        render=render,
        cache=f"cache/{cid}.safetensors",
    )
    return rec


def make_world(
    out_dir="runs/synth",
    n_train=2000,
    n_val=200,
    n_test=200,
    seed=0,
    frames=4,
    size=56,
    seconds=2.0,
    mix=None,
    detail_p=0.5,
    held_out=HELD_OUT,
    workers=None,
):
    """Generate the world into out_dir; returns {split: manifest path}. mix: the validation and
    test splits' scenario shares; the training split leaves the `held_out` scenarios out."""
    mix = dict(MIX if mix is None else mix)
    held_out = list(held_out)
    if set(mix) - set(MIX) or any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"mix must map scenarios {list(MIX)} to non-negative shares, got {mix}")
    if set(held_out) - set(mix) or not sum(split_mix(mix, "train", held_out).values()) > 0:
        raise ValueError(
            f"held_out {held_out} must name scenarios of the mix {list(mix)} and leave the "
            "training split some"
        )
    if size < 28 or size % 2 or frames < 1 or seconds <= 0 or not 0 <= detail_p <= 1:
        raise ValueError(
            f"need even size >= 28, frames >= 1, seconds > 0, 0 <= detail_p <= 1; got "
            f"size={size}, frames={frames}, seconds={seconds}, detail_p={detail_p}"
        )
    out = Path(out_dir)
    for sub in ("video", "audio", "cache"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    sizes = dict(zip(SPLITS, (n_train, n_val, n_test)))
    jobs = []
    for split, n in sizes.items():
        for i, triple in enumerate(plans(split, n, seed, mix, held_out)):
            jobs.append((out, split, i, triple, seed, frames, size, seconds, detail_p))
    if not workers:
        # a pool only pays off for hundreds of clips
        workers = min(2, len(jobs) // 200 + 1)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            records = list(pool.map(make_clip, jobs, chunksize=16))
    else:
        records = [make_clip(job) for job in jobs]
    paths = {split: out / f"{split}.jsonl" for split in SPLITS}
    for split, path in paths.items():
        lines = [json.dumps(r) + "\n" for r in records if r["id"].startswith(split + "_")]
        path.write_text("".join(lines))
    knobs = dict(
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        seed=seed,
        frames=frames,
        size=size,
        seconds=seconds,
        mix=mix,
        detail_p=detail_p,
        held_out=held_out,
    )
    (out / "world.json").write_text(json.dumps(dict(version=VERSION, **knobs), indent=1) + "\n")
    return paths


# The default world's knobs, as make_world's defaults and world.json record them.
DEFAULTS = dict(
    n_train=2000,
    n_val=200,
    n_test=200,
    seed=0,
    frames=4,
    size=56,
    seconds=2.0,
    mix=MIX,
    detail_p=0.5,
    held_out=list(HELD_OUT),
)


def ensure_world(out_dir="runs/synth", **knobs):
    """The world in out_dir, generated only when absent or made with other knobs (DEFAULTS), under
    an flock of `<out_dir>/.build.lock`."""
    knobs = {**DEFAULTS, **knobs}
    # as world.json records it
    knobs["held_out"] = list(knobs["held_out"])
    # the process count does not change the files
    recorded = {k: v for k, v in knobs.items() if k != "workers"}
    want = dict(version=VERSION, **recorded)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    # two runs that find the world absent at once: the second waits for the first's build
    with open(Path(out_dir) / ".build.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            have = json.loads((Path(out_dir) / "world.json").read_text())
        except (OSError, ValueError):
            have = None
        paths = {s: Path(out_dir) / f"{s}.jsonl" for s in SPLITS}
        if have == want and all(path.exists() for path in paths.values()):
            return paths
        return make_world(out_dir, **knobs)


# ---------------------------------------------------------------- command line
def arg(default, help):
    return field(default=default, metadata={"help": help})


# MIX as the --mix flag spells it
MIX_TEXT = ",".join(f"{name}={share}" for name, share in MIX.items())


@dataclass
class Args:
    """The world's flags: the output directory and make_world's knobs."""

    out: str = arg("runs/synth", "output directory")
    n_train: int = arg(2000, "training clips")
    n_val: int = arg(200, "validation clips")
    n_test: int = arg(200, "test clips")
    seed: int = arg(0, "same seed, byte-identical files")
    frames: int = arg(4, "frames per clip")
    size: int = arg(56, "frame height and width, pixels")
    seconds: float = arg(2.0, "clip length in seconds")
    mix: str = arg(MIX_TEXT, "scenario shares, name=share pairs joined by commas")
    detail_p: float = arg(0.5, "chance that an expressive modality also shows a label-free detail")
    held_out: str = arg(",".join(HELD_OUT), "scenarios left out of the training split, by commas")
    workers: int | None = arg(None, "processes; None: 2 for 200+ clips, else 1")


class HelpFormatter(ArgumentDefaultsHelpFormatter, RawDescriptionHelpFormatter):
    """--help with the module docstring laid out as written and each flag's default."""


def parse_mix(text):
    """{"both": 0.5, ...} of "both=0.5,..."; ValueError unless name=share pairs."""
    mix = {}
    for pair in text.split(","):
        name, share = pair.split("=")
        mix[name.strip()] = float(share)
    return mix


def main(argv=None):
    parser = HfArgumentParser(Args, description=__doc__, formatter_class=HelpFormatter)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    try:
        mix = parse_mix(args.mix)
    except ValueError:
        parser.error(f"--mix wants name=share pairs like both=0.5,no_video=0.5, got {args.mix!r}")
    held_out = [name.strip() for name in args.held_out.split(",") if name.strip()]
    start = time.perf_counter()
    paths = make_world(
        args.out,
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        seed=args.seed,
        frames=args.frames,
        size=args.size,
        seconds=args.seconds,
        mix=mix,
        detail_p=args.detail_p,
        held_out=held_out,
        workers=args.workers,
    )
    elapsed = time.perf_counter() - start
    clips = args.n_train + args.n_val + args.n_test
    print(f"wrote {clips} clips in {elapsed:.1f} s:", *map(str, paths.values()))


if __name__ == "__main__":
    main()
