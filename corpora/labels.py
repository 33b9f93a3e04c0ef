"""Label spaces: the emotion classes of a corpus and the words that name each, as data.

`norm` of Eq. (2) (docs/method.md, section 2) reads a label space: it cleans a word (NFKC, lower
case, punctuation and symbols removed) and maps it to its class when the space names it. The
accuracy reward, the SFT targets and every recognition metric read the same space, so a corpus
that separates two emotions (MAFW's fear and anxiety) keeps them apart everywhere.

- `BUILTIN`: the synthetic world's six labels plus disgust and contempt, with their synonyms
  (fear, scared, anxious -> worried; excited -> happy; frustrated -> angry; calm -> neutral).
  Open: an unknown word passes through cleaned. It is the space of every run without --labels.
- `load(path)`: a JSON file {"name", "classes": [...], "synonyms": {class: [words]},
  "valence": {class: -1 | 0 | 1}}; with classes the space is closed, and a manifest label outside
  it is an error (corpora/records.py). The converters of corpora/ write one beside their
  manifests (`labels.json`); `find(manifest)` finds it there.
"""

import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

# the file a converter writes beside its manifests, found by `find`
FILENAME = "labels.json"


def clean(word):
    """Lower case, NFKC, punctuation and symbols removed, whitespace collapsed."""
    word = unicodedata.normalize("NFKC", str(word)).lower()
    chars = []
    for c in word:
        # Unicode categories P* (punctuation) and S* (symbols) become spaces
        is_punctuation_or_symbol = unicodedata.category(c)[0] in "PS"
        chars.append(" " if is_punctuation_or_symbol else c)
    return " ".join("".join(chars).split())


@dataclass(frozen=True)
class LabelSpace:
    """An emotion vocabulary. `words`: cleaned word -> its class; `classes`: the closed set of
    classes (empty: open, unknown words pass through); `valence`: class -> sign, for the
    sentiment metrics (a class it lacks counts 0); `name` and `source` say where it is from."""

    name: str
    words: dict = field(default_factory=dict)
    classes: tuple = ()
    valence: dict = field(default_factory=dict)
    source: str = ""

    def normalize(self, word, wheel=None):
        """The class of a word; `wheel` (word -> group, eval.py's emotion wheels) overrides the
        space for the words it knows. Unknown words pass through cleaned."""
        word = clean(word)
        if wheel is None:
            return self.words.get(word, word)
        if word in wheel:
            return wheel[word]
        word = self.words.get(word, word)
        return wheel.get(word, word)

    def outside(self, label):
        """The words of a label (a str or a list) that are no class of a closed space; [] when
        the space is open."""
        if not self.classes:
            return []
        words = [label] if isinstance(label, str) else list(label)
        return [w for w in words if self.normalize(w) not in self.classes]

    def canonical(self, label):
        """The label as the space names it: each word its class (a list stays a list)."""
        if isinstance(label, str):
            return self.normalize(label)
        return [self.normalize(word) for word in label]

    def to_json(self):
        """The file `load` reads: classes, synonyms grouped by class, valence."""
        synonyms = {}
        for word, label in self.words.items():
            if word != label:
                synonyms.setdefault(label, []).append(word)
        return {
            "name": self.name,
            "classes": list(self.classes),
            "synonyms": synonyms,
            "valence": dict(self.valence),
        }

    def write(self, path):
        Path(path).write_text(json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n")


def space(name, synonyms, classes=(), valence=None, source=""):
    """A LabelSpace from {class: [words]} (each class also names itself). ValueError naming the
    word when a word names two classes, or a class is not in a closed `classes`."""
    words = {}
    for label in classes:
        words[clean(label)] = clean(label)
    for label, names in synonyms.items():
        label = clean(label)
        if classes and label not in words:
            raise ValueError(f"{source or name}: synonyms of {label!r}, which is not a class")
        words.setdefault(label, label)
        for word in names:
            word = clean(word)
            if words.get(word, label) != label:
                raise ValueError(
                    f"{source or name}: {word!r} names both {words[word]!r} and {label!r}"
                )
            words[word] = label
    closed = tuple(clean(c) for c in classes)
    signs = {clean(k): int(v) for k, v in (valence or {}).items()}
    return LabelSpace(name, words, closed, signs, source)


def load(path):
    """The LabelSpace of a JSON file (module docstring); ValueError naming the file when it is
    not one."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot be read as a label space ({err})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("synonyms", {}), dict):
        raise ValueError(f"{path}: a label space is a JSON object with classes and synonyms")
    classes = spec.get("classes") or []
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"{path}: classes must be a list of words")
    name = str(spec.get("name") or path.stem)
    return space(name, spec.get("synonyms", {}), classes, spec.get("valence"), str(path))


def find(manifest):
    """The label space file beside a manifest (FILENAME), or None."""
    path = Path(manifest).parent / FILENAME
    if path.is_file():
        return path
    return None


# ---------------------------------------------------------------- the built-in space
_SYNONYMS = {
    "neutral": "neutral neutrality calm calmness calmly indifferent indifference composed",
    "happy": "happy happiness happily joy joyful joyous glad gladness cheerful cheer delighted "
    "delight pleased pleasure content contented excited excitement elated amused",
    "sad": "sad sadness sadly unhappy unhappiness sorrow sorrowful grief grieving depressed "
    "depression melancholy gloomy heartbroken miserable",
    "angry": "angry anger angrily mad furious fury annoyed annoyance irritated irritation rage "
    "enraged irate frustrated frustration",
    "surprise": "surprise surprised surprising amazed amazement astonished astonishment "
    "shocked shock startled",
    "worried": "worried worry worrying anxious anxiety nervous nervousness fear fearful afraid "
    "scared frightened concerned concern apprehensive",
    "disgust": "disgust disgusted disgusting revulsion",
    "contempt": "contempt contemptuous scorn",
}
# the sign of each label's sentiment; surprise counts 0 (a flat face)
_VALENCE = {"happy": 1, "surprise": 0, "neutral": 0, "sad": -1, "angry": -1, "worried": -1}
BUILTIN = space(
    "built-in",
    {label: words.split() for label, words in _SYNONYMS.items()},
    valence=_VALENCE,
)
