"""MAFW (Liu et al., ACM MM 2022) to manifests: 11 single-label classes, 5 folds.

    python -m corpora.mafw --root /data/MAFW --out data/mafw --fold 1 [--captions True]

The published layout: clips in `data/clips/<clip>.mp4` (video with its audio track), and for each
fold `Train & Test Set/single/no_caption/set_<k>/{train,test}.txt`, one `<clip>.mp4 <label>` per
line. `--captions True` reads `single/with_caption/` instead, whose lines add a Chinese and an
English description of the person's affective behaviour (tab-separated, not UTF-8 throughout):
the English one becomes the record's reasoning, its cues decomposed by keyword rules (mostly
visual). The captioned split has no neutral clip. Labels: anger, disgust, fear, happiness,
neutral, sadness, surprise, contempt, anxiety, helplessness, disappointment; fear and anxiety
are separate classes.
"""

from dataclasses import dataclass, field
from pathlib import Path

from corpora import convert, labels

# class -> its word forms and close synonyms; no word names two classes
SYNONYMS = {
    "anger": ["angry", "angrily", "mad", "furious", "fury", "rage", "enraged", "irate"],
    "disgust": ["disgusted", "disgusting", "revulsion", "repulsed"],
    "fear": ["fearful", "afraid", "scared", "frightened", "terrified", "terror", "panic"],
    "happiness": ["happy", "happily", "joy", "joyful", "glad", "cheerful", "delighted", "pleased"],
    "neutral": ["neutrality", "calm", "calmness", "indifferent", "composed"],
    "sadness": ["sad", "sadly", "sorrow", "sorrowful", "grief", "unhappy", "depressed"],
    "surprise": ["surprised", "amazed", "astonished", "astonishment", "shocked", "startled"],
    "contempt": ["contemptuous", "scorn", "disdain"],
    "anxiety": ["anxious", "worried", "worry", "nervous", "nervousness", "uneasy", "concerned"],
    "helplessness": ["helpless", "powerless"],
    "disappointment": ["disappointed", "disappointing", "letdown"],
}
VALENCE = {"happiness": 1, "surprise": 0, "neutral": 0}
SPACE = labels.space(
    "MAFW (11 classes)",
    SYNONYMS,
    classes=list(SYNONYMS),
    valence={c: VALENCE.get(c, -1) for c in SYNONYMS},
)
SPLITS = ("train", "test")


@dataclass
class Args:
    root: str = field(metadata={"help": "the MAFW folder (data/clips, 'Train & Test Set')"})
    out: str = field(metadata={"help": "output folder: train.jsonl, test.jsonl, labels.json"})
    fold: int = field(default=1, metadata={"help": "the fold, set_1 .. set_5"})
    captions: bool = field(
        default=False,
        metadata={"help": "use single/with_caption: the English caption becomes the reasoning"},
    )
    clips: str = field(default="data/clips", metadata={"help": "the clip folder, under --root"})


def split_file(root, fold, captions, split):
    view = "with_caption" if captions else "no_caption"
    return Path(root) / "Train & Test Set" / "single" / view / f"set_{fold}" / f"{split}.txt"


def read_split(path, captions):
    """(clip stem, label, English caption or "") of each line of a split file."""
    rows = []
    for n, raw in enumerate(path.read_bytes().splitlines(), 1):
        # the captioned files mix encodings; the clip, the label and the English text are ASCII
        line = raw.decode("utf-8", errors="replace").strip()
        if not line:
            continue
        parts = line.split("\t") if captions else line.split()
        if len(parts) < (4 if captions else 2):
            raise ValueError(f"{path}:{n}: expected a clip and a label, got {line!r}")
        caption = parts[3].strip() if captions else ""
        rows.append((Path(parts[0]).stem, parts[1].strip(), caption))
    return rows


def convert_corpus(args):
    splits = convert.Splits(args.out)
    clips = Path(args.root) / args.clips
    for split in SPLITS:
        path = split_file(args.root, args.fold, args.captions, split)
        for stem, label, caption in read_split(path, args.captions):
            splits.add(split, stem, clips, label=SPACE.normalize(label), reasoning=caption)
    splits.write(SPACE, args.root)


def main(argv=None):
    convert.command_line(Args, convert_corpus, __doc__, argv)


if __name__ == "__main__":
    main()
