"""MEP-Bench-style perception metrics of docs/method.md, section 7: what the reasoning uses and
what it claims.

Utilization: the share of a sample's ground-truth cues that its reasoning recovers
(recovered_share). Faithfulness, per clip: whether a completion has a sentence about a modality
(`describes`) when that modality was masked although it carried cues, or when it was absent or
uninformative (`faithfulness`); a sentence is about a modality when it opens that modality's
section, names its face or voice words, or holds a clause that Eq. (9) routes to it against the
dataset's cue inventory, so rewording cannot slip past the router. The earlier pooled share of
claims (claims, chair) is kept beside it.
"""

import re

import torch

import perception_loss
import reward
from corpora import decompose
from metrics.recognition import mean

SENSES = ("visual", "acoustic")
# each masked run of eval.py: the sense it must not make claims about
CLAIMED = {"no_video": "visual", "no_audio": "acoustic"}
# each sense, and the run of eval.py that masks it
MASKED = {"visual": "no_video", "acoustic": "no_audio"}


# Eq. (9)
def claims(sim, tau):
    """How many clauses of one completion are visual claims and how many acoustic ones."""
    routes = perception_loss.route_clauses(sim.S["visual"], sim.S["acoustic"], tau)
    return {sense: routes.count(sense) for sense in SENSES}


def cue_inventory(cues):
    """Every visual and every acoustic cue of the dataset, sorted: {sense: [cue, ...]}."""
    inventory = {}
    for sense in SENSES:
        phrases = set()
        for record_cues in cues:
            phrases.update(record_cues.get(sense) or [])
        inventory[sense] = sorted(phrases)
    return inventory


def recovered_share(S, theta=0.6):
    """MEP-Bench-style utilization of one sample: the share of its cues some clause recovers.

    S (K clauses, J cues) holds cosine similarities; a cue is recovered when a clause matches it
    at >= theta. None without cues (the sample is not counted), 0 without clauses.
    """
    K, J = S.shape
    if not J:
        return None
    if K:
        hit = (S.max(dim=0).values >= theta).float()  # (J,)
    else:
        hit = torch.zeros(J)  # (J,)
    return hit.mean().item()


def chair(counts, modality):
    """CHAIR^m (Rohrbach et al. 2018, by modality) of the run with `modality` masked.

    counts: per sample, its number of "visual" and "acoustic" claims. CHAIR = #m-claims /
    #(visual + acoustic claims), 0 without claims. Returns (CHAIR, faithfulness F = 1 - CHAIR,
    CHAIR_s: the share of samples with an m-claim).
    """
    total = sum(c["visual"] + c["acoustic"] for c in counts)
    claimed = sum(c[modality] for c in counts)
    rate = claimed / total if total else 0.0
    return rate, 1.0 - rate, mean([c[modality] > 0 for c in counts])


# ---------------------------------------------------------------- faithfulness per clip
def sentence_spans(text):
    """(start, end) character spans of the sentences of a completion's think section (split at
    . ! ? and newlines), whitespace-trimmed, empty ones dropped."""
    think = reward.think_bounds(text)
    if think is None:
        return []
    start, end = think
    spans = []
    for match in re.finditer(r"[^.!?\n]+", text[start:end]):
        piece = match.group()
        if not piece.strip():
            continue
        first = start + match.start() + len(piece) - len(piece.lstrip())
        spans.append((first, start + match.start() + len(piece.rstrip())))
    return spans


def describes(text, sim, tau):
    """{sense: whether the completion has a sentence about it}: the sentence opens that sense's
    section ("In the video, ..."), names its face or voice words (corpora/decompose.py), or holds
    a clause that Eq. (9) routes to it. sim: the completion's matcher.Sim against the cue
    inventory."""
    routes = perception_loss.route_clauses(sim.S["visual"], sim.S["acoustic"], tau)
    found = {sense: False for sense in SENSES}
    for start, end in sentence_spans(text):
        sentence = text[start:end]
        lead = decompose.lead_in(sentence)
        for sense in SENSES:
            words = re.search(rf"\b({decompose.WORDS[sense]})\b", sentence, re.I)
            routed = any(
                route == sense and a < end and start < b for route, (a, b) in zip(routes, sim.spans)
            )
            if lead == sense or words or routed:
                found[sense] = True
    return found


def inventory_similarities(matcher, completions, inventory):
    """{run: per record, one matcher.Sim per completion} of completions = {run: per record, a
    list of completions}, every clause against the cue inventory; one matcher call for all."""
    flat = []
    for lists in completions.values():
        for texts in lists:
            flat.extend(texts)
    sims = iter(matcher.similarities(flat, [inventory] * len(flat)))
    out = {}
    for run, lists in completions.items():
        out[run] = [[next(sims) for _ in texts] for texts in lists]
    return out


def faithfulness(rows, sense, run, kind, carried):
    """The share of (clip, completion) pairs without a sentence about `sense` in `run`, over the
    clips where `sense` carried cues (carried=True) or did not, and the number of pairs; (None,
    0) without pairs. rows: eval.score's per-clip rows, row[kind][run] holding one
    {sense: bool} (`describes`) per completion: the greedy one ("greedy") or the K samples
    ("sampled")."""
    pairs = []
    for row in rows:
        if row["has"][sense] == carried:
            pairs.extend(not found[sense] for found in row[kind][run])
    return mean(pairs), len(pairs)


def faithfulness_scores(rows):
    """The faithfulness metrics of a run (docs/method.md, section 7), their pair counts, and notes
    on what could not be measured. For each sense m and kind (K samples: no suffix; greedy:
    _greedy): F_m, masked-input faithfulness (x\\m, clips where m carried cues); F_absent_m,
    absence faithfulness (full input, clips where m is absent or uninformative); described_m,
    how often the full input's answers describe m where it carried cues. When they never do,
    F_m and F_absent_m are None: there was nothing the policy could have claimed. Without clips
    where m carried cues (a scenario of absence), F_absent_m alone is measured."""
    scores, counts, notes = {}, {}, []
    for sense, run in MASKED.items():
        for kind, suffix in (("sampled", ""), ("greedy", "_greedy")):
            masked, n_masked = faithfulness(rows, sense, run, kind, True)
            absent, n_absent = faithfulness(rows, sense, "full", kind, False)
            kept, _ = faithfulness(rows, sense, "full", kind, True)
            described = None if kept is None else 1.0 - kept
            # no clip with m's cues (a subset of the clips) leaves the absence measure standing
            if described == 0.0:
                notes.append(
                    f"F_{sense}{suffix}: the full-input answers never describe the {sense} "
                    "modality where it carries cues, so faithfulness measures nothing"
                )
                masked = absent = None
            scores[f"F_{sense}{suffix}"] = masked
            scores[f"F_absent_{sense}{suffix}"] = absent
            scores[f"described_{sense}{suffix}"] = described
            counts[f"F_{sense}{suffix}"] = n_masked
            counts[f"F_absent_{sense}{suffix}"] = n_absent
    return scores, counts, notes
