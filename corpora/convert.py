"""What every corpus converter shares: reading annotation tables, finding clips, writing manifests.

A converter (corpora/mafw.py, dfew.py, mer.py, emer.py) turns a corpus's published layout into
manifests (docs/method.md, section 8) and the corpus's label space (corpora/labels.py), all in one
output folder: `train.jsonl`, `test.jsonl` (and `val.jsonl` where the corpus has one),
`labels.json`. Media paths are written relative to that folder, so the folder can be read from
anywhere; clips named by an annotation but missing on disk are left out, counted and named.
"""

import csv
import json
import os
import re
import tempfile
from argparse import RawDescriptionHelpFormatter
from pathlib import Path

from transformers import HfArgumentParser

from corpora.decompose import CUE_KINDS

# the clip files a corpus may ship, in the order they are looked for
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".flv")
# missing clips named in a summary
SHOWN = 5


def read_table(path, delimiter=","):
    """The rows of an annotation table as dicts of strings: CSV or TSV (read as text, so an id
    such as 00025 keeps its zeros), JSON lines, a JSON list or {id: row} object (the id as
    "name" when the row lacks one), or parquet (the Hugging Face hub's conversion of a hosted
    corpus, read with `datasets`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: annotation file not found")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix == ".jsonl":
        lines = path.read_text(encoding="utf-8-sig").splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    if suffix == ".json":
        return _json_rows(json.loads(path.read_text(encoding="utf-8-sig")), path)
    if suffix == ".tsv":
        delimiter = "\t"
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        return [dict(row) for row in csv.DictReader(f, delimiter=delimiter)]


def _read_parquet(path):
    # the datasets library is loaded only for parquet tables
    from datasets import Dataset

    with tempfile.TemporaryDirectory() as cache:
        table = Dataset.from_parquet(str(path), cache_dir=cache, keep_in_memory=True)
        return table.to_list()


def _json_rows(value, path):
    """A JSON list of rows, or an {id: row} object made a list of rows with "name"."""
    if isinstance(value, list):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a list of rows or an object of rows by id")
    rows = []
    for key, row in value.items():
        rows.append({"name": key, **row})
    return rows


def column(row, names, path):
    """The value of the first of `names` that the row has; KeyError naming the file and the
    columns it has when it has none of them."""
    for name in names:
        if name in row:
            return row[name]
    raise KeyError(f"{path}: no column {' or '.join(names)} (columns: {', '.join(row)})")


def find_clip(folder, stem):
    """The clip `folder/stem.*` (VIDEO_EXTENSIONS, in order), or None."""
    for ext in VIDEO_EXTENSIONS:
        path = Path(folder) / f"{stem}{ext}"
        if path.is_file():
            return path
    return None


def phrases(value):
    """Cue phrases from a clue field: a list of phrases, or a text split into its sentences and
    semicolon-separated parts; blanks dropped."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
    else:
        items = re.split(r"(?<=[.!?])\s+|[;；。\n]+", str(value))
    cleaned = [item.strip().strip(".").strip() for item in items]
    return [item for item in cleaned if item]


def record(name, clip, out, label, subtitle="", reasoning="", cues=None, valence=None):
    """One manifest line: the clip's path relative to the output folder `out`, and only the
    fields the corpus gives."""
    rec = {"id": str(name), "video": os.path.relpath(clip, out), "label": label}
    if subtitle:
        rec["subtitle"] = subtitle
    if reasoning:
        rec["reasoning"] = reasoning
    if cues is not None:
        rec["cues"] = {kind: list(cues.get(kind, [])) for kind in CUE_KINDS}
    if valence is not None:
        rec["valence"] = valence
    return rec


class Splits:
    """The records of each split of a conversion, and the clips that were not found."""

    def __init__(self, out):
        self.out = Path(out)
        self.records = {}
        self.missing = []

    def add(self, split, name, folder, **fields):
        """Add clip `name` (found in `folder`) to `split`; a missing clip is counted instead."""
        clip = find_clip(folder, name)
        if clip is None:
            self.missing.append(f"{split}: {Path(folder) / name}.*")
            return
        rec = record(name, clip.resolve(), self.out.resolve(), **fields)
        self.records.setdefault(split, []).append(rec)

    def write(self, space, source):
        """Write every split's manifest and labels.json into the output folder, print what was
        written; ValueError naming `source` when no clip at all was found."""
        if not any(self.records.values()):
            shown = "\n  ".join(self.missing[:SHOWN])
            raise ValueError(f"{source}: no clip found; looked for:\n  {shown}")
        self.out.mkdir(parents=True, exist_ok=True)
        for split, recs in self.records.items():
            lines = [json.dumps(rec, ensure_ascii=False) for rec in recs]
            (self.out / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
            with_reasoning = sum(1 for rec in recs if rec.get("reasoning"))
            print(f"{self.out / split}.jsonl: {len(recs)} records, {with_reasoning} with reasoning")
        space.write(self.out / "labels.json")
        print(f"{self.out / 'labels.json'}: {space.name}, {len(space.classes)} classes")
        if self.missing:
            shown = self.missing[:SHOWN]
            print(f"{len(self.missing)} clips not found, left out:", *shown, sep="\n  ")


def command_line(args_class, convert_corpus, doc, argv=None):
    """A converter's command line: its Args parsed (its module docstring as --help), then its
    corpus converted."""
    parser = HfArgumentParser(
        args_class, description=doc, formatter_class=RawDescriptionHelpFormatter
    )
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    convert_corpus(args)
