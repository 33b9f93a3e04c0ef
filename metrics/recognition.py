"""Emotion recognition metrics of docs/method.md, section 7, as functions of answers and labels.

Closed-set WAR / UAR, and the MER-UniBench scores of AffectGPT (HIT, open-vocabulary precision /
recall / F, sentiment WAF / accuracy), optionally through emotion wheels. Every word goes through
the run's label space (`space`, a corpora.labels.LabelSpace; None: the built-in one), as the
accuracy reward reads it. eval.py produces the answers these score; metrics/perception.py scores
the reasoning.
"""

import re
from pathlib import Path

import reward
from corpora import labels as label_spaces

# the separators between the emotion words of an answer: , ; / (ASCII or CJK) and "and"
WORD_SEP = re.compile(r"[,;/，、；]|\band\b")


def mean(xs):
    """The mean of the values that are not None; None when no value is left."""
    values = [x for x in xs if x is not None]
    if not values:
        return None
    return sum(values) / len(values)


def clusters(text, wheel=None, space=None):
    """The normalised emotion words of an answer or label (their wheel clusters if given).

    `text` is a list of words, or a str split at , ; / and "and"; None holds no word.
    """
    if isinstance(text, (list, tuple)):
        words = text
    else:
        words = WORD_SEP.split(text or "")
    found = set()
    for word in words:
        if not word or not word.strip():
            continue
        cluster = reward.normalize_emotion(word, wheel, space)
        if cluster:
            found.add(cluster)
    return found


# ---------------------------------------------------------------- recognition
def first_emotion(text, space=None):
    """The normalised emotion of an answer or label: a list counts as its first word; None stays."""
    if not text:
        return None
    if isinstance(text, str):
        return reward.normalize_emotion(text, labels=space)
    return reward.normalize_emotion(text[0], labels=space)


def war_uar(preds, labels, space=None):
    """Closed-set WAR and UAR (the DFEW / MAFW / RAVDESS protocol).

    WAR is the accuracy; UAR the mean, over the classes present in the ground truth, of the
    per-class recall. Both sides go through reward.normalize_emotion with the label space
    `space`; an unparseable answer (None) is wrong.
    """
    gold = [first_emotion(x, space) for x in labels]
    pred = [first_emotion(x, space) for x in preds]
    right = [p is not None and p == g for p, g in zip(pred, gold, strict=True)]
    recall = {}
    for c in sorted(set(gold) - {None}):
        recall[c] = mean([r for r, g in zip(right, gold) if g == c])
    return {"war": mean(right), "uar": mean(recall.values()), "recall": recall}


def hit_rate(preds, labels, wheel=None, space=None):
    """MER-UniBench basic-emotion HIT (AffectGPT, Lian et al. 2025).

    The share of samples where any predicted word falls in a ground-truth cluster; samples whose
    ground truth is only neutral (by the label space `space`) are left out. Returns (hit or None,
    n).
    """
    hits = []
    for pred, label in zip(preds, labels):
        if not clusters(label, space=space) - {"neutral"}:
            continue
        hits.append(bool(clusters(pred, wheel, space) & clusters(label, wheel, space)))
    return mean(hits), len(hits)


def open_vocab_prf(preds, labels, wheel=None, space=None):
    """MER-UniBench open-vocabulary scores (AffectGPT): returns (P, R, F, n).

    Per sample with a ground truth G and a prediction P: precision |G & P| / |P| (0 when nothing
    is predicted) and recall |G & P| / |G|, each averaged over the samples, then F = 2PR / (P + R).
    """
    precisions = []
    recalls = []
    for answer, label in zip(preds, labels):
        gold = clusters(label, wheel, space)
        pred = clusters(answer, wheel, space)
        if not gold:
            continue
        precisions.append(len(gold & pred) / len(pred) if pred else 0.0)
        recalls.append(len(gold & pred) / len(gold))
    P = mean(precisions)
    R = mean(recalls)
    if P is None:
        F = None
    elif P + R:
        F = 2 * P * R / (P + R)
    else:
        F = 0.0
    return P, R, F, len(precisions)


def valence(text, space=None):
    """The summed valence (the label space's) of the emotion clusters of a text; unknown words
    count 0."""
    space = space or label_spaces.BUILTIN
    return sum(space.valence.get(c, 0) for c in clusters(text, space=space))


def sentiment(preds, labels, valences=None, space=None):
    """MER-UniBench sentiment (AffectGPT): returns (WAF, accuracy, n).

    A sample's ground-truth valence is its record's numeric "valence", else its label's
    valence() in the label space `space`; only non-zero ones are scored. Positive means > 0, for
    the ground truth and for the prediction's valence(). WAF is the support-weighted mean F1 of
    both classes, as AffectGPT computes it (sklearn f1_score, average="weighted").
    """
    # scikit-learn comes with sentence-transformers
    from sklearn.metrics import accuracy_score, f1_score

    if not valences:
        valences = [None] * len(labels)
    gold_valences = []
    for label, given in zip(labels, valences):
        gold_valences.append(valence(label, space) if given is None else given)
    gold = []
    pred = []
    for answer, gold_valence in zip(preds, gold_valences):
        if gold_valence != 0:
            gold.append(gold_valence > 0)
            pred.append(valence(answer, space) > 0)
    if not gold:
        return None, None, 0
    waf = float(f1_score(gold, pred, average="weighted", zero_division=0))
    accuracy = float(accuracy_score(gold, pred))
    return waf, accuracy, len(gold)


def load_wheels(directory):
    """Emotion wheels: every wheel*.csv in `directory` (AffectGPT's emotion_wheel/ has 5).

    Sorted by name, each a dict word -> cluster from `word,cluster` (or tab-separated) lines;
    blank lines and # comments are skipped (a `word,cluster` header is harmless).
    """
    files = sorted(Path(directory).glob("wheel*.csv"))
    if not files:
        raise FileNotFoundError(f"metrics.load_wheels: no wheel*.csv in {directory}")
    wheels = []
    for path in files:
        wheel = {}
        for n, line in enumerate(path.read_text().splitlines(), 1):
            word, *rest = [c.strip() for c in re.split(r"[,\t]", line)]
            if not word or word.startswith("#"):
                continue
            if len(rest) != 1 or not rest[0]:
                raise ValueError(
                    f"metrics.load_wheels: {path}:{n}: expected `word,cluster`, got {line!r}"
                )
            # both cleaned as normalize_emotion cleans the words it looks up
            wheel[label_spaces.clean(word)] = label_spaces.clean(rest[0])
        wheels.append(wheel)
    return wheels
