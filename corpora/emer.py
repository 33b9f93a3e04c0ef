"""Reasoning corpora to manifests: EMER, MERR and MER-Caption+ style annotations.

    python -m corpora.emer --annotations EMER/dataset-v1/gt-eng.csv --clips /data/mer2023/train \\
        --out data/emer --holdout 0.1
    python -m corpora.emer --annotations MERR_fine_grained.json --clips /data/mer2023-semi/video \\
        --out data/merr --space merr
    python -m corpora.emer --annotations track3_train_mercaptionplus.csv \\
        --labels_table track2_train_mercaptionplus.csv --subtitles subtitle_chieng.csv \\
        --clips /data/mer2025/video --out data/mercaption

Each annotation row names a clip (`name`, `names` or `video_id`) and holds a reference reasoning
(`reasons`, `reason`, `english`, `smp_reason_caption`, ...), which becomes the record's reasoning.
Per-modality clue fields become its cues: visual clues (`visual_clue`, `visual_prior_list`, ...)
-> visual, acoustic clues (`acoustic_clue`, `audio_prior_list`, ...) -> acoustic, textual clues
-> emotion (without them, the emotion cues of the reasoning, corpora/decompose.py); without clue
fields the cues are decomposed from the reasoning at load. The label is the row's (`emotions`,
`pseu_emotion`, `discrete`, `openset`) or, for tables that hold only reasoning (EMER v2's
`final-EMER-reason.csv`, MER-Caption+'s track3 table), that of `--labels_table`. Label spaces:
`mer` (MER2023's six classes: EMER v1), `merr` (MERR's nine: fear and worried apart), `open`
(open-vocabulary label lists, the built-in synonyms: OV-MERD, MER-Caption+); `auto` picks the
first closed one that holds every label.
"""

import ast
from dataclasses import dataclass, field, replace
from pathlib import Path

from corpora import convert, labels, mer
from corpora.decompose import decompose_cues

NAME = ("name", "names", "video_id", "sample_id")
REASONING = ("reasons", "reason", "reasoning", "english", "smp_reason_caption", "caption")
LABEL = ("emotions", "emotion", "pseu_emotion", "discrete", "openset", "label")
# not "english": EMER v2's english column is the reasoning
SUBTITLE = ("subtitles", "subtitle", "text", "sentence")
CLUES = {
    "visual": ("visual_clue", "visual_clues", "visual_cues", "visual_prior_list"),
    "acoustic": (
        "acoustic_clue",
        "acoustic_clues",
        "audio_clue",
        "audio_clues",
        "audio_prior_list",
    ),
    "emotion": ("textual_clue", "textual_clues", "lexical_clue", "lexical_clues", "text_clue"),
}
MERR_SYNONYMS = {
    "happy": ["happiness", "joy", "joyful", "glad", "cheerful", "delighted", "pleased"],
    "sad": ["sadness", "sorrow", "sorrowful", "grief", "unhappy", "depressed"],
    "neutral": ["neutrality", "calm", "calmness", "indifferent", "composed"],
    "angry": ["anger", "mad", "furious", "fury", "rage", "irritated", "annoyed"],
    "worried": ["worry", "worrying", "anxious", "anxiety", "nervous", "concerned", "uneasy"],
    "surprise": ["surprised", "amazed", "astonished", "shocked", "startled"],
    "fear": ["fearful", "afraid", "scared", "frightened", "terrified"],
    "contempt": ["contemptuous", "scorn", "disdain"],
    "doubt": ["doubtful", "suspicious", "skeptical", "sceptical", "puzzled"],
}
SPACES = {
    "mer": mer.SPACE,
    "merr": labels.space(
        "MERR (9 classes)",
        MERR_SYNONYMS,
        classes=list(MERR_SYNONYMS),
        valence={"happy": 1, "sad": -1, "angry": -1, "worried": -1, "fear": -1, "contempt": -1},
    ),
    "open": replace(labels.BUILTIN, name="open vocabulary (built-in synonyms)"),
}


@dataclass
class Args:
    annotations: str = field(metadata={"help": "the reasoning table (CSV, JSON, JSONL, parquet)"})
    clips: str = field(metadata={"help": "the folder of the clips the table names"})
    out: str = field(metadata={"help": "output folder: train.jsonl (test.jsonl), labels.json"})
    labels_table: str = field(
        default="", metadata={"help": "a table of name and label, for reasoning-only tables"}
    )
    subtitles: str = field(default="", metadata={"help": "a subtitle table (name, english)"})
    space: str = field(default="auto", metadata={"help": "label space: auto, mer, merr, open"})
    holdout: float = field(
        default=0.0, metadata={"help": "share of the clips kept as the test split (by name hash)"}
    )


def label_value(value):
    """A label: one word, or a list for an open-vocabulary label ("['a', 'b']" or "a, b")."""
    text = str(value).strip()
    if text.startswith("["):
        return [str(word).strip() for word in ast.literal_eval(text)]
    if "," in text:
        return [word.strip() for word in text.split(",") if word.strip()]
    return text


def by_name(path, columns):
    """{clip name: value of the first of `columns`} of a table, {} without a path."""
    values = {}
    if not path:
        return values
    for row in convert.read_table(path):
        values[str(convert.column(row, NAME, path))] = convert.column(row, columns, path)
    return values


def cues_of(row, reasoning):
    """The row's cues from its clue fields, or None when it has none (decomposed at load)."""
    found = {kind: next((row[c] for c in names if c in row), None) for kind, names in CLUES.items()}
    if found["visual"] is None and found["acoustic"] is None:
        return None
    cues = {kind: convert.phrases(value) for kind, value in found.items()}
    if found["emotion"] is None:
        cues["emotion"] = decompose_cues(reasoning)["emotion"]
    return cues


def choose_space(name, all_labels):
    """The label space `name`, or with "auto" the first closed space that holds every label."""
    if name != "auto":
        return SPACES[name]
    for key in ("mer", "merr"):
        if not any(SPACES[key].outside(label) for label in all_labels):
            return SPACES[key]
    return SPACES["open"]


def convert_corpus(args):
    rows = convert.read_table(args.annotations)
    extra_labels = by_name(args.labels_table, LABEL)
    subtitles = by_name(args.subtitles, ("english", "sentence", "chinese"))
    parsed = []
    for row in rows:
        name = str(convert.column(row, NAME, args.annotations))
        label = extra_labels.get(name) or convert.column(row, LABEL, args.annotations)
        parsed.append((name, row, label_value(label)))
    space = choose_space(args.space, [label for _, _, label in parsed])
    splits = convert.Splits(args.out)
    for name, row, label in parsed:
        reasoning = str(convert.column(row, REASONING, args.annotations) or "").strip()
        subtitle = subtitles.get(name) or next((row[c] for c in SUBTITLE if c in row), "")
        split = "test" if mer.held_out(name, args.holdout) else "train"
        fields = dict(label=space.canonical(label), subtitle=str(subtitle or "").strip())
        cues = cues_of(row, reasoning)
        splits.add(split, name, Path(args.clips), reasoning=reasoning, cues=cues, **fields)
    splits.write(space, args.annotations)


def main(argv=None):
    convert.command_line(Args, convert_corpus, __doc__, argv)


if __name__ == "__main__":
    main()
