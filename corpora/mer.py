"""MER2023 / MER2024 (Lian et al., the MER challenges) to manifests: 6 classes, subtitles, valence.

    python -m corpora.mer --root /data/mer2023 --out data/mer2023 [--test test1]
    python -m corpora.mer --root /data/mer2024 --out data/mer2024 --holdout 0.1

The published layouts. MER2023: clips in `train/`, `test1/`, `test2/`, `test3/`, each with its
label table `<split>-label.csv` (columns `name,discrete,valence`; test3 has no valence). MER2024:
clips in `video-labeled/` with `label-disdim.csv` (the same columns) and no labelled test split,
so `--holdout` keeps a share of it, chosen by a hash of the clip name, as the test split.
Subtitles come from a table with a `name` column and an `english` (or `chinese`, `sentence`)
column: `subtitle_chieng.csv` of the releases, or a transcription table (`--subtitles`). The six
classes are neutral, angry, happy, sad, worried and surprise; fear and anxiety words fold into
worried, as MER's annotation does.
"""

import zlib
from dataclasses import dataclass, field
from pathlib import Path

from corpora import convert, labels

CLASSES = ("neutral", "angry", "happy", "sad", "worried", "surprise")
# the built-in space's words of the six classes
SPACE = labels.space(
    "MER (6 classes)",
    {c: [w for w, k in labels.BUILTIN.words.items() if k == c] for c in CLASSES},
    classes=CLASSES,
    valence=labels.BUILTIN.valence,
)
# subtitle tables, in the order they are looked for under --root
SUBTITLE_FILES = (
    "subtitle_chieng.csv",
    "transcription-engchi-polish.csv",
    "transcription_merge.csv",
    "transcription.csv",
)
LANGUAGE_COLUMNS = {
    "english": ("english", "english_sentence", "sentence_en", "sentence"),
    "chinese": ("chinese", "chinese_sentence", "sentence_zh", "sentence"),
}


@dataclass
class Args:
    root: str = field(metadata={"help": "the MER2023 or MER2024 folder"})
    out: str = field(metadata={"help": "output folder: train.jsonl, test.jsonl, labels.json"})
    test: str = field(default="test1", metadata={"help": "MER2023's test split: test1..3"})
    holdout: float = field(
        default=0.0,
        metadata={"help": "share of the labelled clips kept as the test split (MER2024: no test)"},
    )
    subtitles: str = field(
        default="", metadata={"help": "subtitle table (default: the first of the releases')"}
    )
    language: str = field(
        default="english", metadata={"help": "subtitle language: english|chinese"}
    )


def label_tables(root, test):
    """[(split, label table, clip folder)] of the layout found under `root`."""
    root = Path(root)
    if (root / "train-label.csv").is_file():
        return [
            ("train", root / "train-label.csv", root / "train"),
            ("test", root / f"{test}-label.csv", root / test),
        ]
    if (root / "label-disdim.csv").is_file():
        return [("train", root / "label-disdim.csv", root / "video-labeled")]
    raise FileNotFoundError(f"{root}: neither train-label.csv (MER2023) nor label-disdim.csv")


def read_subtitles(args):
    """{clip name: subtitle} of the subtitle table, {} when there is none."""
    path = Path(args.subtitles) if args.subtitles else None
    for name in SUBTITLE_FILES:
        if path is None and (Path(args.root) / name).is_file():
            path = Path(args.root) / name
    if path is None:
        return {}
    subtitles = {}
    for row in convert.read_table(path):
        name = convert.column(row, ("name",), path)
        text = convert.column(row, LANGUAGE_COLUMNS[args.language], path)
        subtitles[str(name)] = str(text or "").strip()
    return subtitles


def held_out(name, share):
    """Whether clip `name` is in the held-out share (a hash of the name: the same every run)."""
    return zlib.crc32(name.encode()) % 10_000 < share * 10_000


def valence_of(row):
    value = str(row.get("valence") or "").strip()
    return float(value) if value else None


def convert_corpus(args):
    subtitles = read_subtitles(args)
    splits = convert.Splits(args.out)
    for split, table, clips in label_tables(args.root, args.test):
        for row in convert.read_table(table):
            name = str(convert.column(row, ("name", "names"), table))
            label = convert.column(row, ("discrete", "emotion", "emotions"), table)
            if split == "train" and held_out(name, args.holdout):
                split_of_row = "test"
            else:
                split_of_row = split
            fields = dict(label=SPACE.normalize(label), subtitle=subtitles.get(name, ""))
            splits.add(split_of_row, name, clips, valence=valence_of(row), **fields)
    splits.write(SPACE, args.root)


def main(argv=None):
    convert.command_line(Args, convert_corpus, __doc__, argv)


if __name__ == "__main__":
    main()
