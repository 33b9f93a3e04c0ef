"""Small corpora in their published layouts, for the converter tests (tests/test_corpora.py).

Each writer lays out a few clips as the corpus ships them (folder names, annotation files and
their columns, as corpora/<name>.py documents them), with tiny real clips: 4 frames of 56x56 at
2 fps and a 1 s AAC track, made with PyAV.
"""

import csv
import json

import av
import numpy as np

# (clip, label) of the two splits; MAFW's fear and anxiety both appear in each
MAFW_ROWS = {
    "train": [("00001", "fear"), ("00002", "anxiety"), ("00003", "happiness"), ("00004", "anger")],
    "test": [("00005", "fear"), ("00006", "anxiety")],
}
DFEW_ROWS = {"train": [(1, 7), (2, 1), (3, 3)], "test": [(4, 7), (5, 2)]}
MER_ROWS = {
    "train": [("sample_00000001", "worried", "-2.5"), ("sample_00000002", "happy", "3.0")],
    "test1": [("sample_00000003", "angry", "-3.0"), ("sample_00000004", "neutral", "0")],
}
REASONING = (
    "In the video, the brows are furrowed and the mouth turns down. In the audio, the voice "
    "trembles and is quiet. In the text, the words speak of a loss. Therefore the person is sad."
)


def write_clip(path, seed=0):
    """A 4-frame 56x56 mp4 at 2 fps with a 1 s mono AAC tone."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as box:
        video = box.add_stream("libx264", rate=2)
        video.width, video.height, video.pix_fmt = 56, 56, "yuv420p"
        sound = box.add_stream("aac", rate=16000, layout="mono")
        for _ in range(4):
            pixels = rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)
            box.mux(video.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        tone = 0.3 * np.sin(2 * np.pi * 220 * np.arange(16000) / 16000)
        tone = tone.astype(np.float32)[None]
        for s in range(0, 16000, 1024):
            chunk = np.ascontiguousarray(tone[:, s : s + 1024])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, s
            box.mux(sound.encode(frame))
        box.mux(video.encode())
        box.mux(sound.encode())


def write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def mafw(root):
    """data/clips/<clip>.mp4 and both views of fold 1 (the captioned one tab-separated, with a
    Chinese caption in GBK bytes, as the release mixes encodings)."""
    for seed, (clip, _) in enumerate(MAFW_ROWS["train"] + MAFW_ROWS["test"]):
        write_clip(root / "data" / "clips" / f"{clip}.mp4", seed)
    for split, rows in MAFW_ROWS.items():
        plain = root / "Train & Test Set" / "single" / "no_caption" / "set_1" / f"{split}.txt"
        plain.parent.mkdir(parents=True, exist_ok=True)
        plain.write_text("".join(f"{clip}.mp4 {label}\n" for clip, label in rows))
        captioned = root / "Train & Test Set" / "single" / "with_caption" / "set_1"
        captioned.mkdir(parents=True, exist_ok=True)
        lines = []
        for clip, label in rows:
            english = f"The person frowns and looks away, showing {label}."
            lines.append(f"{clip}.mp4\t{label}\t".encode() + "他皱眉".encode("gbk"))
            lines[-1] += f"\t{english}".encode()
        (captioned / f"{split}.txt").write_bytes(b"\n".join(lines) + b"\n")


def dfew(root):
    """Clip/original/<5-digit id>.mp4 and EmoLabel_DataSplit/{train,test}(single-labeled)/set_1.csv
    (video_name, label 1-7)."""
    for split, rows in DFEW_ROWS.items():
        for name, _ in rows:
            write_clip(root / "Clip" / "original" / f"{name:05d}.mp4", name)
        table = root / "EmoLabel_DataSplit" / f"{split}(single-labeled)" / "set_1.csv"
        write_csv(table, ["video_name", "label"], rows)


def mer2023(root):
    """<split>/<name>.mp4 with <split>-label.csv (name, discrete, valence), subtitle_chieng.csv."""
    subtitles = []
    for split, rows in MER_ROWS.items():
        for seed, (name, _, _) in enumerate(rows):
            write_clip(root / split / f"{name}.mp4", seed)
            subtitles.append((name, "你好", f"I said {name[-1]} things."))
        write_csv(root / f"{split}-label.csv", ["name", "discrete", "valence"], rows)
    write_csv(root / "subtitle_chieng.csv", ["name", "chinese", "english"], subtitles)


def emer(root):
    """EMER v1's gt-eng.csv (names, emotions, subtitles, reasons) over MER2023 train clips."""
    rows = []
    for seed, label in enumerate(["sad", "happy", "worried", "angry"]):
        name = f"sample_0000010{seed}"
        write_clip(root / "train" / f"{name}.mp4", seed)
        rows.append((name, label, "It is over.", REASONING))
    write_csv(root / "gt-eng.csv", ["names", "emotions", "subtitles", "reasons"], rows)


def merr(root):
    """MERR_fine_grained.json: {id: {pseu_emotion, smp_reason_caption, text, visual_prior_list,
    audio_prior_list}} over MER2023-SEMI clips; fear and worried both appear."""
    annotations = {}
    for seed, label in enumerate(["fear", "worried", "doubt", "happy"]):
        name = f"samplenew_0000020{seed}"
        write_clip(root / "video" / f"{name}.mp4", seed)
        annotations[name] = {
            "pseu_emotion": label,
            "smp_reason_caption": REASONING,
            "text": "Where were you?",
            "visual_prior_list": ["Brow Lowerer", "Lip Corner Depressor"],
            "audio_prior_list": "The voice trembles. The pitch is low; the pace is slow.",
        }
    (root / "MERR_fine_grained.json").write_text(json.dumps(annotations))
