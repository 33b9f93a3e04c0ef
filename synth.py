"""The built-in synthetic emotion world: drawn faces, synthesized voices, known truth (issue 3).

Every clip shows one of six emotions. The face carries only *valence* (mouth curvature and brow
angle), the voice only *arousal* (pitch, pitch movement, loudness, syllable rate), and the
emotion is the pair (SYNTH_NOTES.md: a tiny thinker learned this core in minutes on a CPU):

                 low        mid        high
        smile     .          .         happy
        flat    neutral      .         surprise
        frown    sad       worried     angry

so the face alone or the voice alone gets at most 50% of a balanced set right; both give 100%.
About half of the clips (`detail_p`) also carry a label-free detail per modality (eyes wide or
narrowed, a nod or a head shake; the pitch rising or falling at the end). A detail can only be
known from its own modality, so stating it is perception and stating it without that modality
is a hallucination that can be counted exactly.

Scenarios (`MIX`, set proportions per split; the choice is ours, see the README):
  both 50%       face and voice expressive, an emotion-free subtitle (10% of them empty);
  face_only 12.5%  the voice is a flat monotone hum or the audio file is absent;
  voice_only 12.5% the video file is absent;
  blank 15%      one modality present but empty: black video, the face removed (background and
                 noise only), or background noise instead of a voice;
  subtitle 10%   both expressive and the subtitle states the emotion outright.
When a modality carries nothing, the subtitle gives the missing half (valence or arousal) in
words, so every label is determined by the whole input and every modality matters. Cue lists
and reasoning mention exactly what was rendered: nothing about an empty or absent modality.

Writes video/*.mp4, audio/*.wav (16 kHz), cache/*.safetensors (decoded frames and waveform, so
training never redraws or re-decodes), {train,val,test}.jsonl and world.json; same seed, same bytes.

    python synth.py --out runs/synth        # 2000 / 200 / 200 clips
"""

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import soundfile as sf
from safetensors.torch import save_file

import data

LABELS = ["neutral", "happy", "sad", "angry", "surprise", "worried"]
VALENCE = dict(
    neutral="flat", happy="smile", sad="frown", angry="frown", surprise="flat", worried="frown"
)  # face
AROUSAL = dict(
    neutral="low", happy="high", sad="low", angry="high", surprise="high", worried="mid"
)  # voice
SPLITS = ("train", "val", "test")
MIX = {"both": 0.5, "face_only": 0.125, "voice_only": 0.125, "blank": 0.15, "subtitle": 0.1}
SR = 16000
VERSION = 1

# The cue vocabulary: one phrase per thing drawn or synthesized.
FACE_CUES = {
    "smile": ["the mouth curves up in a smile", "the eyebrows arch softly"],
    "flat": ["the mouth is a straight line", "the eyebrows are level"],
    "frown": ["the mouth turns down in a frown", "the eyebrows are drawn together"],
}
VOICE_CUES = {
    "low": ["the voice is low and quiet", "the speech is slow and monotone"],
    "mid": ["the voice is at a medium pitch", "the speech has a steady pace"],
    "high": ["the voice is high-pitched and loud", "the speech is fast and lively"],
}
FACE_DETAILS = {
    "wide": "the eyes are wide open",
    "narrow": "the eyes are narrowed",
    "nod": "the head nods",
    "shake": "the head shakes from side to side",
}
VOICE_DETAILS = {"rise": "the pitch rises at the end", "fall": "the pitch falls at the end"}

# Subtitles: (lines, the text cue they carry).
NEUTRAL_LINES = [
    "I went to the market this morning.",
    "The bus comes at nine.",
    "We talked about the weather.",
    "I put the keys on the table.",
    "The meeting moved to Tuesday.",
    "She called me after lunch.",
]
AROUSAL_TEXT = {
    "low": (["I just want to lie down and rest.", "I am so tired today."], "the words sound tired"),
    "mid": (
        ["I keep thinking about what could happen.", "I cannot stop checking the time."],
        "the words sound tense",
    ),
    "high": (
        ["I can't sit still right now!", "Everything is happening so fast!"],
        "the words sound energetic",
    ),
}
VALENCE_TEXT = {
    "smile": (
        ["Everything turned out great.", "We had a lovely time together."],
        "the words are positive",
    ),
    "flat": (
        ["It is just an ordinary day.", "The report has four pages."],
        "the words are matter-of-fact",
    ),
    "frown": (
        ["Everything went wrong again.", "This is a terrible mess."],
        "the words are negative",
    ),
}
EMOTION_TEXT = {
    "neutral": ("I feel nothing special about it.", "the words say they feel calm"),
    "happy": ("I am so happy about this!", "the words say they are happy"),
    "sad": ("I feel really sad today.", "the words say they are sad"),
    "angry": ("I am furious with you!", "the words say they are angry"),
    "surprise": ("I did not expect that at all!", "the words say they are surprised"),
    "worried": ("I am worried it will go wrong.", "the words say they are worried"),
}

# Arousal -> (f0 Hz, amplitude, syllables per second, pitch movement), each jittered per clip.
VOICE = {
    "low": (110, 0.05, 2.0, 0.02),
    "mid": (170, 0.13, 3.5, 0.06),
    "high": (260, 0.33, 5.5, 0.15),
}


def plan(rng, label, scenario, detail_p=0.5):
    """What one clip renders: modality states, details, subtitle, reasoning and cues."""
    val, aro = VALENCE[label], AROUSAL[label]
    video, audio = "face", "voice"
    if scenario == "face_only":
        audio = ["flat", None][rng.integers(2)]
    elif scenario == "voice_only":
        video = None
    elif scenario == "blank":
        kind = ["black", "no_face", "noise"][rng.integers(3)]
        video, audio = (video, kind) if kind == "noise" else (kind, audio)
    elif scenario not in MIX:
        raise ValueError(f"unknown scenario {scenario!r}; expected one of {list(MIX)}")
    face_detail = (
        list(FACE_DETAILS)[rng.integers(4)] if video == "face" and rng.random() < detail_p else None
    )
    voice_detail = (
        list(VOICE_DETAILS)[rng.integers(2)]
        if audio == "voice" and rng.random() < detail_p
        else None
    )
    if scenario == "subtitle":
        subtitle, text_cue = EMOTION_TEXT[label]
    elif video != "face" or audio != "voice":  # the subtitle supplies the half no modality shows
        lines, text_cue = VALENCE_TEXT[val] if video != "face" else AROUSAL_TEXT[aro]
        subtitle = lines[rng.integers(len(lines))]
    else:
        subtitle, text_cue = (
            "" if rng.random() < 0.1 else NEUTRAL_LINES[rng.integers(len(NEUTRAL_LINES))],
            None,
        )
    visual = (
        FACE_CUES[val] + ([FACE_DETAILS[face_detail]] if face_detail else [])
        if video == "face"
        else []
    )
    acoustic = (
        VOICE_CUES[aro] + ([VOICE_DETAILS[voice_detail]] if voice_detail else [])
        if audio == "voice"
        else []
    )
    emotion = ([text_cue] if text_cue else []) + [label]
    reasoning = [
        f"In the video, {', '.join(visual)}." if visual else "",
        f"In the audio, {', '.join(acoustic)}." if acoustic else "",
        f"In the text, {text_cue}." if text_cue else "",
        f"Therefore the person feels {label}.",
    ]
    return dict(
        video=video,
        audio=audio,
        face_detail=face_detail,
        voice_detail=voice_detail,
        subtitle=subtitle,
        reasoning=" ".join(r for r in reasoning if r),
        cues={"visual": visual, "acoustic": acoustic, "emotion": emotion},
    )


def draw_face(rng, n, size, valence, detail=None, kind="face"):
    """(n, size, size, 3) uint8 frames of a drawn face; kind "face" | "no_face" | "black"."""
    if kind == "black":
        return np.zeros((n, size, size, 3), np.uint8)
    y, x = np.mgrid[0:size, 0:size] / size  # (S, S) in [0, 1)
    bg, skin, ink = rng.uniform(20, 120, 3), rng.uniform(150, 230, 3), rng.uniform(10, 60, 3)
    cx, cy = 0.5 + rng.uniform(-0.05, 0.05, 2)
    rx = rng.uniform(0.27, 0.31)
    ry = rx * rng.uniform(1.1, 1.2)
    curve = {"smile": 1, "flat": 0, "frown": -1}[valence] * rng.uniform(0.07, 0.09)
    eye_h = {"wide": 0.065, "narrow": 0.012}.get(detail, 0.035) * rng.uniform(0.9, 1.1)
    ex, ey = 0.35 * rx, -0.25 * ry  # eye centre (|u|, v) in face coordinates
    frames = np.empty((n, size, size, 3))
    for t in range(n):
        dx, dy = rng.normal(0, 0.006, 2)
        sway = 0.03 * (1 if t % 2 else -1)  # a nod or shake alternates frame to frame
        dx, dy = dx + sway * (detail == "shake"), dy + sway * (detail == "nod")
        img = np.broadcast_to(bg, (size, size, 3)).copy()
        if kind == "face":
            u, v = x - cx - dx, y - cy - dy  # (S, S) face-centred coordinates
            a = np.abs(u)
            eyes = ((a - ex) / 0.05) ** 2 + ((v - ey) / eye_h) ** 2 < 1
            w = (a - ex) / 0.07  # -1 at the brow's inner end, +1 at the outer end
            brow_y = (
                ey
                - 0.09
                + {"smile": -0.025 * (1 - w**2), "flat": 0 * w, "frown": 0.025 * (1 - w)}[valence]
            )
            brows = (np.abs(w) <= 1) & (np.abs(v - brow_y) < 0.018)
            m = u / (0.45 * rx)  # -1..1 across the mouth
            mouth = (np.abs(m) <= 1) & (np.abs(v - 0.45 * ry - curve * (0.5 - m**2)) < 0.022)
            img[(u / rx) ** 2 + (v / ry) ** 2 < 1] = skin
            img[eyes | brows | mouth] = ink
        frames[t] = img + rng.normal(0, 6, img.shape)
    return np.clip(frames, 0, 255).astype(np.uint8)


def synth_voice(rng, n, arousal, detail=None, kind="voice", sr=SR):
    """(n,) float32 waveform: a harmonic voice with syllables, a flat hum, or background noise."""
    t = np.arange(n) / sr
    if kind == "noise":
        return np.convolve(rng.normal(0, 0.08, n), np.ones(16) / 16, "same").astype(np.float32)
    if kind == "flat":
        f0, amp, rate, wobble = 150.0, 0.1, 0.0, 0.0
    else:
        f0, amp, rate, wobble = VOICE[arousal]
        f0, amp, rate = (
            f0 * rng.uniform(0.9, 1.1),
            amp * rng.uniform(0.85, 1.15),
            rate * rng.uniform(0.85, 1.15),
        )
    f = f0 * (
        1 + wobble * np.sin(2 * np.pi * rng.uniform(0.7, 1.5) * t + rng.uniform(0, 2 * np.pi))
    )
    if detail:  # the contour moves over the second half of the clip
        f = f * (1 + {"rise": 0.4, "fall": -0.3}[detail] * np.clip(2 * t / t[-1] - 1, 0, 1))
    phase = 2 * np.pi * np.cumsum(f) / sr  # (n,)
    two_cos, prev, cur = 2 * np.cos(phase), np.zeros(n), np.sin(phase)
    wave = cur.copy()
    for k in range(
        2, 9
    ):  # sin(k x) = 2 cos(x) sin((k-1) x) - sin((k-2) x): 8 harmonics, 2 trig calls
        prev, cur = cur, two_cos * cur - prev
        wave += cur / k
    wave /= sum(1 / k for k in range(1, 9))  # (n,)
    env = (
        1.0
        if rate == 0
        else 0.1 + 0.9 * (0.5 - 0.5 * np.cos(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi)))
    )
    return (amp * env * wave + rng.normal(0, 0.003, n)).astype(np.float32)


def write_mp4(path, frames, fps):
    with av.open(str(path), "w", format="mp4") as box:
        stream = box.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        # crf 12: near-lossless, as mouth and brows are 1-2 px lines; one thread: same bytes every run
        stream.options = {"crf": "12", "preset": "veryfast", "tune": "zerolatency", "threads": "1"}
        for frame in frames:
            box.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        box.mux(stream.encode())


def make_clip(job):
    """Render, write and cache one clip; return its manifest record."""
    out, split, i, label, scenario, seed, frames, size, seconds, detail_p = job
    rng = np.random.default_rng(
        [seed, SPLITS.index(split), i]
    )  # per clip: order-free, parallel-safe
    p = plan(rng, label, scenario, detail_p)
    cid = f"{split}_{i:05d}"
    rec, cache = {"id": cid}, {}
    if p["video"]:
        rec["video"] = f"video/{cid}.mp4"
        fps = Fraction(frames) / Fraction(seconds).limit_denominator(1000)
        write_mp4(
            out / rec["video"],
            draw_face(rng, frames, size, VALENCE[label], p["face_detail"], p["video"]),
            fps,
        )
        cache["frames"] = data.decode_video(out / rec["video"])  # what a loader would see
    if p["audio"]:
        rec["audio"] = f"audio/{cid}.wav"
        sf.write(
            out / rec["audio"],
            synth_voice(rng, int(seconds * SR), AROUSAL[label], p["voice_detail"], p["audio"]),
            SR,
            subtype="PCM_16",
        )
        cache["waveform"] = data.decode_audio(out / rec["audio"])
    save_file(cache, out / "cache" / f"{cid}.safetensors")
    rec.update(
        subtitle=p["subtitle"],
        label=label,
        reasoning=p["reasoning"],
        cues=p["cues"],
        scenario=scenario,
        render={
            "video": p["video"],
            "audio": p["audio"],
            "face_detail": p["face_detail"],
            "voice_detail": p["voice_detail"],
        },
        cache=f"cache/{cid}.safetensors",
    )
    return rec


def assign(n, mix, rng):
    """Exact scenario counts (largest remainder) and labels balanced within each scenario, shuffled."""
    names = list(mix)
    share = np.array([mix[s] for s in names], float) * n / sum(mix.values())
    counts = np.floor(share).astype(int)
    counts[np.argsort(counts - share, kind="stable")[: n - counts.sum()]] += 1
    scen = np.repeat(names, counts)
    pairs = [(str(s), LABELS[j % len(LABELS)]) for j, s in enumerate(scen)]
    return [pairs[j] for j in rng.permutation(n)]


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
    workers=None,
):
    """Generate the world into out_dir; returns {split: manifest path}."""
    mix = dict(MIX if mix is None else mix)
    if set(mix) - set(MIX) or any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"mix must map scenarios {list(MIX)} to non-negative shares, got {mix}")
    if size < 28 or size % 2 or frames < 1 or seconds <= 0 or not 0 <= detail_p <= 1:
        raise ValueError(
            f"need even size >= 28, frames >= 1, seconds > 0, 0 <= detail_p <= 1; got "
            f"size={size}, frames={frames}, seconds={seconds}, detail_p={detail_p}"
        )
    out = Path(out_dir)
    for sub in ("video", "audio", "cache"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    sizes = dict(zip(SPLITS, (n_train, n_val, n_test)))
    plans = {
        split: assign(
            n, mix, np.random.default_rng([seed, 3 + SPLITS.index(split), 0])
        )  # [seed, 0..2, i]: clips
        for split, n in sizes.items()
    }
    jobs = [
        (out, split, i, label, scen, seed, frames, size, seconds, detail_p)
        for split in SPLITS
        for i, (scen, label) in enumerate(plans[split])
    ]
    workers = workers or min(2, len(jobs) // 200 + 1)  # a pool only pays off for hundreds of clips
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            records = list(pool.map(make_clip, jobs, chunksize=16))
    else:
        records = [make_clip(j) for j in jobs]
    paths = {split: out / f"{split}.jsonl" for split in SPLITS}
    for split, path in paths.items():
        path.write_text(
            "".join(json.dumps(r) + "\n" for r in records if r["id"].startswith(split + "_"))
        )
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
    )
    (out / "world.json").write_text(json.dumps(dict(version=VERSION, **knobs), indent=1) + "\n")
    return paths


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
)
HELP = dict(
    n_train="training clips",
    n_val="validation clips",
    n_test="test clips",
    seed="same seed, byte-identical files",
    frames="frames per clip",
    size="frame height and width, pixels",
    seconds="clip length in seconds",
    mix="scenario shares, name=share pairs joined by commas",
    detail_p="chance that an expressive modality also shows a label-free detail",
)


def ensure_world(out_dir="runs/synth", **knobs):
    """The world in out_dir, generated only when absent or made with other knobs (DEFAULTS)."""
    want = dict(
        version=VERSION, **{**DEFAULTS, **{k: v for k, v in knobs.items() if k != "workers"}}
    )
    try:
        have = json.loads((Path(out_dir) / "world.json").read_text())
    except (OSError, ValueError):
        have = None
    if have == want and all((Path(out_dir) / f"{s}.jsonl").exists() for s in SPLITS):
        return {s: Path(out_dir) / f"{s}.jsonl" for s in SPLITS}
    return make_world(out_dir, **{**DEFAULTS, **knobs})


def parse_mix(text):
    try:
        return {k.strip(): float(v) for k, v in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--mix wants name=share pairs like both=0.5,blank=0.5, got {text!r}"
        )


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default="runs/synth", help="output directory (default: runs/synth)")
    for key, default in DEFAULTS.items():
        shown = ",".join(f"{k}={v}" for k, v in default.items()) if key == "mix" else default
        ap.add_argument(
            "--" + key.replace("_", "-"),
            type=parse_mix if key == "mix" else type(default),
            default=default,
            help=f"{HELP[key]} (default: {shown})",
        )
    ap.add_argument(
        "--workers", type=int, default=None, help="processes (default: 2 for 200+ clips)"
    )
    a = vars(ap.parse_args(argv))
    start = time.perf_counter()
    paths = make_world(a.pop("out"), **a)
    print(
        f"wrote {sum(a[k] for k in ('n_train', 'n_val', 'n_test'))} clips in {time.perf_counter() - start:.1f} s:",
        *map(str, paths.values()),
    )


if __name__ == "__main__":
    main()
