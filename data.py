"""Data: manifests of emotion clips, loaded, validated and summarised.

A manifest (docs/method.md, section 8) is UTF-8 JSON lines {"id", "video", "audio", "subtitle",
"label", "reasoning", "cues": {"visual", "acoustic", "emotion"}}, media paths relative to it,
either medium may be absent. The synthetic world (synthetic/world.py) writes one and adds
`cache` and `scenario`. One line is parsed and checked by corpora/records.py, media files are
read by thinker/media.py, missing cue lists are decomposed from the reasoning by
corpora/decompose.py, and thinker/batching.py makes a batch of records the thinker's inputs.

    python data.py --check runs/synth/train.jsonl   # load, decode every record, summarise
    python data.py --check mer/train.jsonl --audio_window 300   # real data, Qwen2.5-Omni 3B/7B
    python data.py --make_world runs/synth          # the default synthetic world
                                                    # (python -m synthetic.world --help)

A public corpus becomes manifests with its converter, `python -m corpora.<name> --help`: mafw,
dfew, mer (MER2023/2024), emer (EMER, MERR, MER-Caption+ reasoning); each writes the corpus's
label space beside them (labels.json, corpora/labels.py), which --check and training read.
"""

import json
import sys
import warnings
from argparse import RawDescriptionHelpFormatter
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tqdm import tqdm
from transformers import HfArgumentParser

from corpora import labels, records
from corpora.decompose import CUE_KINDS
from thinker import media
from thinker.media import DataError

# what a line that cannot become a record raises
LINE_ERRORS = (UnicodeDecodeError, json.JSONDecodeError, RecursionError, DataError)


class Manifest(list):
    """The loaded records. `.errors`: one "file:line: problem" message per skipped line;
    `.truncated_audio`: how many records have audio longer than the processor's window (None:
    not counted, no window given); `.labels`: the label space its labels were read in (None:
    as written); `.no_media`: how many have neither video nor audio; `.unknown_keys`: {key no
    code reads: records that have it}."""

    def __init__(self, items=(), errors=(), truncated_audio=None, labels=None):
        super().__init__(items)
        self.errors = list(errors)
        self.truncated_audio = truncated_audio
        self.labels = labels
        self.no_media = sum(1 for rec in self if "video" not in rec and "audio" not in rec)
        self.unknown_keys = Counter()


# ---------------------------------------------------------------- 1. manifests
def load_manifest(path, on_error="skip", check_media=True, audio_window=None, labels=None):
    """Records of a manifest: paths resolved, cues filled in, source = "file:line".

    A line that is not UTF-8 JSON, has a key that misspells a known one, lacks id or label, has
    a blank label or cue, holds text that is not valid Unicode (a lone surrogate escape), repeats
    an id, names a missing or unreadable file, a video without frames, float audio that is not
    finite, or audio too short for an audio token (headers read when check_media; a synthetic
    cache instead of the media files when it has one) is skipped into .errors (on_error="skip")
    or raises DataError. Records with neither video nor audio, and keys no code reads, are
    counted (.no_media, .unknown_keys) and warned of. audio_window: seconds the processor keeps
    (media.audio_window); records with longer audio are counted into .truncated_audio and one
    warning. labels: a label space (corpora/labels.py) the labels are written in; a label
    outside a closed one is a bad line.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    lines = records.read_lines(path)
    root = Path(path).parent
    loaded = Manifest(labels=labels)
    seen = set()
    lengths = []
    for n, line in enumerate(lines, 1):
        try:
            text = line.decode("utf-8")
            if not text.strip():
                continue
            value = json.loads(text)
            rec, samples = records.parse(value, root, check_media, labels)
            if rec["id"] in seen:
                raise DataError(f"id {rec['id']!r} appears twice")
        except LINE_ERRORS as err:
            message = f"{path}:{n}: {records.problem(err)}"
            if on_error == "raise":
                raise DataError(message) from None
            loaded.errors.append(message)
            continue
        seen.add(rec["id"])
        loaded.append(dict(rec, source=f"{path}:{n}"))
        loaded.no_media += "video" not in rec and "audio" not in rec
        loaded.unknown_keys.update(records.unknown_keys(value))
        lengths.append(samples)
    if audio_window is not None:
        loaded.truncated_audio = count_truncated(path, lengths, audio_window)
    warn_unused(path, loaded)
    return loaded


def warn_unused(path, loaded):
    """One warning naming the manifest when records have no medium, one when keys are unread."""
    if loaded.no_media:
        warnings.warn(
            f"{path}: {loaded.no_media} of {len(loaded)} records have neither video nor audio "
            "(text alone reaches the model)",
            stacklevel=3,
        )
    if loaded.unknown_keys:
        warnings.warn(f"{path}: {unknown_text(loaded)}", stacklevel=3)


def unknown_text(loaded):
    """ "keys no code reads: speaker (12 records), ..." of a Manifest."""
    counts = [f"{key} ({n} records)" for key, n in sorted(loaded.unknown_keys.items())]
    return f"keys no code reads: {', '.join(counts)}"


def count_truncated(path, lengths, audio_window):
    """How many of the audio lengths (16 kHz samples, None: none or unknown) exceed audio_window
    seconds; one warning naming the manifest when any do."""
    window = audio_window * media.SR
    truncated = sum(1 for samples in lengths if samples is not None and samples > window)
    if truncated:
        warnings.warn(
            f"{path}: {truncated} of {len(lengths)} records have audio longer than the "
            f"processor's {audio_window:g} s window; only their first {audio_window:g} s are used",
            stacklevel=3,
        )
    return truncated


# ---------------------------------------------------------------- 2. the full check
def check(path, on_error="skip", audio_window=None, labels=None):
    """Load a manifest (load_manifest), then decode every record as training reads it
    (media.verify), with a progress bar: the records that decode, in a Manifest whose .errors
    hold every line skipped at load and every record that failed to decode, and whose
    .truncated_audio counts the decoded audio longer than audio_window seconds."""
    loaded = load_manifest(path, on_error, labels=labels)
    readable = Manifest(errors=loaded.errors, labels=labels)
    readable.unknown_keys = loaded.unknown_keys
    lengths = []
    for rec in tqdm(loaded, desc="decoding", unit="clip"):
        try:
            lengths.append(media.verify(rec))
        except DataError as err:
            if on_error == "raise":
                raise
            readable.errors.append(str(err))
            continue
        readable.append(rec)
    if audio_window is not None:
        readable.truncated_audio = count_truncated(path, lengths, audio_window)
    readable.no_media = sum(1 for rec in readable if "video" not in rec and "audio" not in rec)
    return readable


# ---------------------------------------------------------------- 3. command line
@dataclass
class Args:
    """data.py's flags."""

    check: str = field(
        default="",
        metadata={
            "help": "load a manifest, decode every record as training reads it, report each "
            "line or record that fails, summarise it; exit status 1 when any fails",
            "metavar": "MANIFEST",
        },
    )
    on_error: Literal["skip", "raise"] = field(
        default="skip", metadata={"help": "bad lines and records: report and count, or stop"}
    )
    audio_window: float = field(
        default=2.0,
        metadata={
            "help": "seconds of audio the processor keeps (its feature extractor's n_samples / "
            "16000): 2 for the tiny thinker, 300 for Qwen2.5-Omni 3B/7B; longer audio is "
            "counted as truncated",
            "metavar": "SECONDS",
        },
    )
    labels: str = field(
        default="",
        metadata={
            "help": "label space file; empty: labels.json beside the manifest when there is one",
            "metavar": "FILE",
        },
    )
    make_world: str = field(
        default="",
        metadata={
            "help": "write the default world (below) into DIR unless it is there",
            "metavar": "DIR",
        },
    )


def coverage(recs):
    """{"records", "no_reasoning", "no_cues"}: how many records lack a reference reasoning (SFT
    trains an empty think block on them) and how many lack every cue (the Omni-Perception Reward
    and Loss have nothing to act on)."""
    no_reasoning = sum(1 for r in recs if not (r.get("reasoning") or "").strip())
    no_cues = sum(1 for r in recs if not any(r["cues"][kind] for kind in CUE_KINDS))
    return {"records": len(recs), "no_reasoning": no_reasoning, "no_cues": no_cues}


def summarise(path, on_error, audio_window, space):
    """Check a manifest (check) and print its record count, every failing line or record, the
    truncated-audio count, the records without media, the keys no code reads, its label space,
    and its label, scenario, media, reasoning and cue counts. Return whether every line and
    record passed and has a medium."""
    recs = check(path, on_error, audio_window, space)
    print(f"{path}: {len(recs)} records, {len(recs.errors)} skipped", *recs.errors, sep="\n  ")
    print(f"audio longer than the {audio_window:g} s window (truncated): {recs.truncated_audio}")
    print(f"records with neither video nor audio: {recs.no_media}")
    if recs.unknown_keys:
        print(unknown_text(recs))
    print(f"label space: {space.name}, from {space.source or 'the code (no labels file)'}")
    print("labels:", dict(Counter(str(r["label"]) for r in recs)))
    print("scenarios:", dict(Counter(r.get("scenario", "-") for r in recs)))
    print("media:", dict(Counter(_media_present(r) for r in recs)))
    cues_per_record = {}
    for kind in CUE_KINDS:
        total = sum(len(r["cues"][kind]) for r in recs)
        cues_per_record[kind] = total / max(1, len(recs))
    print("cues per record:", cues_per_record)
    print("records without reasoning / without cues:", coverage(recs))
    # the first clip, as training reads it
    for rec in recs[:1]:
        video, audio = media.load_media(rec)
        shape = None if video is None else tuple(video.shape)
        seconds = None if audio is None else f"{len(audio) / media.SR:.2f} s"
        print(f"{rec['id']}: video {shape}, audio {seconds}")
    return not recs.errors and not recs.no_media


def label_space(path, manifest):
    """The label space of --labels `path`, else of labels.json beside `manifest`, else the
    built-in one; DataError naming the file when it is not a label space."""
    if not path and manifest:
        path = labels.find(manifest)
    if not path:
        return labels.BUILTIN
    try:
        return labels.load(path)
    except ValueError as err:
        raise DataError(str(err)) from None


def _media_present(record):
    """The media a record has: "video+audio", "video", "audio" or "none"."""
    present = [kind for kind in ("video", "audio") if kind in record]
    return "+".join(present) or "none"


def main(argv=None):
    parser = HfArgumentParser(
        Args, description=__doc__, formatter_class=RawDescriptionHelpFormatter
    )
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    if args.make_world:
        # the synthetic package is loaded only to build a world
        from synthetic import world

        paths = world.ensure_world(args.make_world)
        print("manifests:", ", ".join(str(p) for p in paths.values()))
    passed = True
    if args.check:
        try:
            space = label_space(args.labels, args.check)
            passed = summarise(args.check, args.on_error, args.audio_window, space)
        except DataError as err:
            # a missing or unreadable manifest, or the first bad line under --on_error raise
            print(f"data.py: {err}", file=sys.stderr)
            passed = False
    if not (args.make_world or args.check):
        parser.print_help()
    if not passed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
