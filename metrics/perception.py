"""MEP-Bench-style perception metrics of docs/method.md, section 7: what the reasoning uses and
what it claims.

Utilization: the share of a sample's ground-truth cues that its reasoning recovers
(recovered_share). Faithfulness: what a run with one modality masked still claims about it,
each clause routed by Eq. (9) against the dataset's cue inventory (claims, chair).
"""

import torch

import perception_loss
from metrics.recognition import mean

SENSES = ("visual", "acoustic")
# each masked run of eval.py: the sense it must not make claims about
CLAIMED = {"no_video": "visual", "no_audio": "acoustic"}


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
