"""Emotion recognition metrics of docs/method.md, section 7, as functions of answers and labels.

Closed-set WAR / UAR, and the MER-UniBench scores of AffectGPT (HIT, open-vocabulary precision /
recall / F, sentiment WAF / accuracy), optionally through emotion wheels. eval.py produces the
answers these score; metrics/perception.py scores the reasoning.
"""

import re
from pathlib import Path

import reward

# the sign of each label's sentiment; surprise counts 0 (a flat face)
VALENCE = {
    "happy": 1,
    "surprise": 0,
    "neutral": 0,
    "sad": -1,
    "angry": -1,
    "worried": -1,
}
# the separators between the emotion words of an answer: , ; / (ASCII or CJK) and "and"
WORD_SEP = re.compile(r"[,;/，、；]|\band\b")


def mean(xs):
    """The mean of the values that are not None; None when no value is left."""
    values = [x for x in xs if x is not None]
    if not values:
        return None
    return sum(values) / len(values)


def clusters(text, wheel=None):
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
        cluster = reward.normalize_emotion(word, wheel)
        if cluster:
            found.add(cluster)
    return found


# ---------------------------------------------------------------- recognition
def first_emotion(text):
    """The normalised emotion of an answer or label: a list counts as its first word; None stays."""
    if not text:
        return None
    if isinstance(text, str):
        return reward.normalize_emotion(text)
    return reward.normalize_emotion(text[0])


def war_uar(preds, labels):
    """Closed-set WAR and UAR (the DFEW / MAFW / RAVDESS protocol).

    WAR is the accuracy; UAR the mean, over the classes present in the ground truth, of the
    per-class recall. Both sides go through reward.normalize_emotion; an unparseable answer
    (None) is wrong.
    """
    gold = [first_emotion(x) for x in labels]
    pred = [first_emotion(x) for x in preds]
    right = [p is not None and p == g for p, g in zip(pred, gold, strict=True)]
    recall = {}
    for c in sorted(set(gold) - {None}):
        recall[c] = mean([r for r, g in zip(right, gold) if g == c])
    return {"war": mean(right), "uar": mean(recall.values()), "recall": recall}


def hit_rate(preds, labels, wheel=None):
    """MER-UniBench basic-emotion HIT (AffectGPT, Lian et al. 2025).

    The share of samples where any predicted word falls in a ground-truth cluster; samples whose
    ground truth is only neutral (by the built-in map) are left out. Returns (hit or None, n).
    """
    hits = []
    for pred, label in zip(preds, labels):
        if not clusters(label) - {"neutral"}:
            continue
        hits.append(bool(clusters(pred, wheel) & clusters(label, wheel)))
    return mean(hits), len(hits)


def open_vocab_prf(preds, labels, wheel=None):
    """MER-UniBench open-vocabulary scores (AffectGPT): returns (P, R, F, n).

    Per sample with a ground truth G and a prediction P: precision |G & P| / |P| (0 when nothing
    is predicted) and recall |G & P| / |G|, each averaged over the samples, then F = 2PR / (P + R).
    """
    precisions = []
    recalls = []
    for answer, label in zip(preds, labels):
        gold = clusters(label, wheel)
        pred = clusters(answer, wheel)
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


def valence(text):
    """The summed VALENCE of the emotion clusters of a text; unknown words count 0."""
    return sum(VALENCE.get(c, 0) for c in clusters(text))


def sentiment(preds, labels, valences=None):
    """MER-UniBench sentiment (AffectGPT): returns (WAF, accuracy, n).

    A sample's ground-truth valence is its record's numeric "valence", else its label's
    valence(); only non-zero ones are scored. Positive means > 0, for the ground truth and for
    the prediction's valence(). WAF is the support-weighted mean F1 of both classes, as AffectGPT
    computes it (sklearn f1_score, average="weighted").
    """
    # scikit-learn comes with sentence-transformers
    from sklearn.metrics import accuracy_score, f1_score

    if not valences:
        valences = [None] * len(labels)
    gold_valences = []
    for label, given in zip(labels, valences):
        gold_valences.append(valence(label) if given is None else given)
    gold = []
    pred = []
    for answer, gold_valence in zip(preds, gold_valences):
        if gold_valence != 0:
            gold.append(gold_valence > 0)
            pred.append(valence(answer) > 0)
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
            wheel[reward._clean(word)] = reward._clean(rest[0])
        wheels.append(wheel)
    return wheels
