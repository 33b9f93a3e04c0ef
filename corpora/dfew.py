"""DFEW (Jiang et al., ACM MM 2020) to manifests: 7 single-label classes, 5 folds.

    python -m corpora.dfew --root /data/DFEW --out data/dfew --fold 1

The published layout: the original clips (video with their audio track) in
`Clip/original/<id>.<ext>`, 5-digit ids, and the single-labeled folds in
`EmoLabel_DataSplit/{train,test}(single-labeled)/set_<k>.csv` with columns `video_name,label`,
label 1 happy, 2 sad, 3 neutral, 4 angry, 5 surprise, 6 disgust, 7 fear. The face-cropped frame
folders (`Clip/clip_224x224`) have no audio and are not used.
"""

from dataclasses import dataclass, field
from pathlib import Path

from corpora import convert, labels

# DFEW's label numbers
CLASSES = ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear")
SYNONYMS = {
    "happy": ["happiness", "happily", "joy", "joyful", "glad", "cheerful", "delighted"],
    "sad": ["sadness", "sadly", "sorrow", "sorrowful", "grief", "unhappy", "depressed"],
    "neutral": ["neutrality", "calm", "calmness", "indifferent", "composed"],
    "angry": ["anger", "angrily", "mad", "furious", "fury", "rage", "enraged", "irate"],
    "surprise": ["surprised", "amazed", "astonished", "astonishment", "shocked", "startled"],
    "disgust": ["disgusted", "disgusting", "revulsion", "repulsed"],
    "fear": ["fearful", "afraid", "scared", "frightened", "terrified", "terror"],
}
SPACE = labels.space(
    "DFEW (7 classes)",
    SYNONYMS,
    classes=CLASSES,
    valence={"happy": 1, "sad": -1, "angry": -1, "disgust": -1, "fear": -1},
)
SPLITS = ("train", "test")


@dataclass
class Args:
    root: str = field(metadata={"help": "the DFEW folder (Clip, EmoLabel_DataSplit)"})
    out: str = field(metadata={"help": "output folder: train.jsonl, test.jsonl, labels.json"})
    fold: int = field(default=1, metadata={"help": "the fold, set_1 .. set_5"})
    clips: str = field(default="Clip/original", metadata={"help": "the clip folder, under --root"})


def split_file(root, fold, split):
    return Path(root) / "EmoLabel_DataSplit" / f"{split}(single-labeled)" / f"set_{fold}.csv"


def label_of(value, path):
    """The class of a DFEW label number; ValueError naming the file for any other value."""
    number = str(value).strip()
    if not number.isdigit() or not 1 <= int(number) <= len(CLASSES):
        raise ValueError(f"{path}: label {value!r} is not one of DFEW's 1-7")
    return CLASSES[int(number) - 1]


def convert_corpus(args):
    splits = convert.Splits(args.out)
    clips = Path(args.root) / args.clips
    for split in SPLITS:
        path = split_file(args.root, args.fold, split)
        for row in convert.read_table(path):
            name = str(convert.column(row, ("video_name",), path)).strip().zfill(5)
            label = label_of(convert.column(row, ("label",), path), path)
            splits.add(split, name, clips, label=label)
    splits.write(SPACE, args.root)


def main(argv=None):
    convert.command_line(Args, convert_corpus, __doc__, argv)


if __name__ == "__main__":
    main()
