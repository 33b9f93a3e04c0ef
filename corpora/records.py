"""A manifest's lines, and one line parsed: its fields checked, media paths resolved, cues filled
in.

data.load_manifest reads a manifest's lines (`read_lines`) and hands each parsed JSON value to
`parse`; every
problem is a DataError whose message data.py prefixes with the file and line. What is checked:
no key that misspells a known one (`video_path` for `video`), the fields' types, a non-blank
label and string cue phrases, text that is valid Unicode, media paths that are files, and (when
asked) their headers and an audio long enough for an audio token.
"""

import codecs
import difflib
import errno
import gzip
import json
import os
import stat
import zlib
from pathlib import Path

from corpora.decompose import CUE_KINDS, decompose_cues
from thinker import media
from thinker.media import DataError

# the keys a record may have (docs/method.md, section 8); the synthetic world adds the last four
KNOWN = ("id", "label", "video", "audio", "subtitle", "reasoning", "cues", "valence")
KNOWN += ("cache", "scenario", "subtitle_kind", "render")
# a key this close to a known key the record lacks is that key misspelt (difflib's ratio); the
# world's `render` is left out: "gender" or "end" would resemble it
NEAR = 0.6
MEANT = tuple(key for key in KNOWN if key != "render")


# ---------------------------------------------------------------- a manifest's lines
def read_lines(path):
    """A manifest's lines as bytes (line n at index n - 1), a leading UTF-8 byte-order mark
    dropped; gunzipped when the name ends in .gz. Raise DataError naming the file when it is
    missing, unreadable, not gzip, UTF-16 or empty."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: cannot read the manifest ({err})") from None
    # a UTF-16 or UTF-32 byte-order mark
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(f"{path}: the manifest is UTF-16 or UTF-32 text, not UTF-8")
    raw = raw.removeprefix(codecs.BOM_UTF8)
    if not raw.strip():
        raise DataError(f"{path}: the manifest is empty")
    return raw.split(b"\n")


def problem(err):
    """What is wrong with a manifest line, from the error its parsing raised."""
    if isinstance(err, UnicodeDecodeError):
        return f"not UTF-8 text (byte 0x{err.object[err.start]:02x} at column {err.start + 1})"
    if isinstance(err, json.JSONDecodeError):
        return f"not JSON ({err.msg}, column {err.colno})"
    if isinstance(err, RecursionError):
        return "not JSON (nested too deeply)"
    return str(err)


# ---------------------------------------------------------------- one line
def parse(rec, root, check_media, space=None):
    """One parsed manifest line checked and completed, media paths resolved against `root`; and
    its audio's length in 16 kHz samples by the headers (None: no audio, not known, or
    check_media off). With a label space `space` (corpora/labels.py) the label is written as
    the space names it, and a label outside a closed space is an error."""
    if not isinstance(rec, dict):
        raise DataError(f"a record must be a JSON object, got {type(rec).__name__}")
    _misspelt(rec)
    bad = _not_unicode(rec)
    if bad is not None:
        raise DataError(f"field {bad} holds a lone surrogate escape, which is not Unicode text")
    for key in ("id", "label"):
        if rec.get(key) in (None, "", []):
            raise DataError(f"missing required field {key!r}")
    label = rec["label"]
    if not isinstance(label, (str, list)) or not all(isinstance(x, str) for x in list(label)):
        raise DataError(f"label must be a string or a list of strings, got {label!r}")
    labels = [label] if isinstance(label, str) else label
    # a blank label can never be matched by an answer
    if not all(x.strip() for x in labels):
        raise DataError(f"label {label!r} is blank")
    if space is not None:
        label = _in_space(label, space)
    if not isinstance(rec.get("reasoning") or "", str):
        raise DataError(f"reasoning must be a string, got {rec['reasoning']!r}")
    for key in ("video", "audio", "cache"):
        if not isinstance(rec.get(key) or "", str):
            raise DataError(f"{key} must be a path, got {rec[key]!r}")
    subtitle = rec.get("subtitle")
    if subtitle is not None and not isinstance(subtitle, str):
        raise DataError(f"subtitle must be a string, got {json.dumps(subtitle)}")
    rec = dict(rec, id=str(rec["id"]), subtitle=rec.get("subtitle") or "", label=label)
    # a missing cache is only a slower load: the media files are decoded instead
    cache = rec.get("cache")
    if cache and (root / cache).is_file():
        rec["cache"] = str(root / cache)
    else:
        rec.pop("cache", None)
    for kind in ("video", "audio"):
        if not rec.get(kind):
            rec.pop(kind, None)
            continue
        rec[kind] = str(root / rec[kind])
        problem = _not_a_file(rec[kind])
        if problem:
            raise DataError(f"{kind} file {rec[kind]} {problem}")
    samples = None
    if check_media:
        samples = _probe(rec)
    return dict(rec, cues=_cues(rec)), samples


def _in_space(label, space):
    """The label as the space names it; DataError naming the space when a word is no class."""
    outside = space.outside(label)
    if outside:
        classes = ", ".join(space.classes)
        raise DataError(
            f"label {outside[0]!r} is no class of the label space {space.source or space.name} "
            f"({classes}); add it to that space's synonyms or correct the label"
        )
    return space.canonical(label)


def unknown_keys(rec):
    """The keys of a parsed record that no code reads."""
    return [key for key in rec if key not in KNOWN]


def _misspelt(rec, known=KNOWN, meant=MEANT, prefix=""):
    """DataError naming the first unknown key of `rec` that resembles a key of `meant` it lacks."""
    for key in rec:
        if key in known:
            continue
        lacking = [name for name in meant if name not in rec]
        close = difflib.get_close_matches(key.lower(), lacking, n=1, cutoff=NEAR)
        if close:
            raise DataError(
                f"unknown key {prefix + key!r}: did you mean {prefix + close[0]!r}? "
                f"(known keys: {', '.join(known)})"
            )


def _not_a_file(path):
    """Why a media path is not a readable file ("not found", "is a directory", ...); None when
    it is one."""
    try:
        info = os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "is a symbolic link loop"
        if os.path.islink(path):
            return f"is a symbolic link to {os.readlink(path)}, which does not exist"
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            return "not found"
        return f"cannot be read ({err.strerror})"
    if stat.S_ISDIR(info.st_mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    return None


def _probe(rec):
    """A record's audio length in 16 kHz samples by the headers of its media (of its synthetic-world
    cache when it has one, which was decoded from these very files); DataError when a header is
    bad or the audio too short for an audio token."""
    if "cache" in rec:
        samples = media.probe_cache(rec["cache"], "video" in rec, "audio" in rec)
        sound = rec["cache"]
    else:
        samples = None
        for kind in ("video", "audio"):
            if kind in rec:
                # without an audio file, the audio is the video's track
                samples = media.probe(rec[kind], kind)
        sound = rec.get("audio") or rec.get("video")
    if samples is not None:
        media.check_audio_length(samples, sound)
    return samples


def _cues(rec):
    """A record's cue lists: its own, or decomposed from its reasoning; DataError when malformed
    or a phrase is blank."""
    cues = rec.get("cues")
    if cues is None:
        cues = decompose_cues(rec.get("reasoning") or "")
    if not isinstance(cues, dict) or not all(isinstance(cues.get(k, []), list) for k in CUE_KINDS):
        raise DataError(f"cues must map {CUE_KINDS} to lists of phrases, got {cues!r}")
    _misspelt(cues, CUE_KINDS, CUE_KINDS, "cues.")
    phrases = {}
    for kind in CUE_KINDS:
        phrases[kind] = list(cues.get(kind, []))
        for i, phrase in enumerate(phrases[kind]):
            # a null or a number would reach the prompt and the matcher as Python text
            if not isinstance(phrase, str):
                raise DataError(f"cue cues.{kind}[{i}] must be a string, got {json.dumps(phrase)}")
            # a blank cue can never be recovered
            if not phrase.strip():
                raise DataError(f"cue cues.{kind}[{i}] is blank")
    return phrases


def _not_unicode(value, name=""):
    """The name ("subtitle", "cues.visual[2]") of the first string inside a parsed JSON value
    that is not valid Unicode text (a lone surrogate escape such as "\\udcff", which no
    tokenizer encodes); None when every string is."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return name
        return None
    items = []
    if isinstance(value, dict):
        prefix = f"{name}." if name else ""
        items = [(f"{prefix}{key}", item) for key, item in value.items()]
    elif isinstance(value, list):
        items = [(f"{name}[{i}]", item) for i, item in enumerate(value)]
    for item_name, item in items:
        bad = _not_unicode(item, item_name)
        if bad is not None:
            return bad
    return None
