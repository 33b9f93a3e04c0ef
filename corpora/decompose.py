"""Cue decomposition: a reference reasoning split into visual, acoustic and emotion cue clauses.

Records without cue lists get them from the reasoning (docs/method.md, section 8). The reasoning
is EMER-style: "In the video, ... In the audio, ... In the text, ... Therefore ...". A lead-in
opens a section that lasts to the next lead-in. Each sentence splits into clauses at , ; and :.
A clause that names face or voice words of one modality only goes to that modality; any other
clause goes to its section's modality. Clauses of the text section, of a conclusion
("Therefore ...") and clauses outside any visual or acoustic section are emotion cues.
"""

import re

CUE_KINDS = ("visual", "acoustic", "emotion")

# The lead-ins that open a section, each a regular expression matched at a sentence's start.
LEAD_INS = {
    "visual": r"(in|from) the (video|visuals?|images?|frames?|scene|footage)|visually"
    r"|the video shows",
    "acoustic": r"(in|from) the (audio|voice|speech|sound)|acoustically|the audio (reveals|shows)",
    "text": r"(in|from) the (text|subtitles?|transcript|words)|textually",
    "conclusion": r"therefore|thus|overall|in summary|in conclusion|so|hence|taken together"
    r"|combining",
}
SECTIONS = ("visual", "acoustic", "text")

# The face and voice words that place a clause in one modality, whatever its section.
WORDS = {
    "visual": r"face|facial|mouth|lips?|smil\w*|frown\w*|eyes?|eyebrows?|brows?|head|gaze|nods?"
    r"|shakes?|forehead|cheeks?|expression|posture|gestures?|hands?|body|looks? (at|down|up|away)",
    "acoustic": r"voice|vocal|tone|pitch|speech|speaking|speaks|loud\w*|quiet\w*|volume"
    r"|intonation|pace|tempo|sigh\w*|trembl\w*|audio",
}

SENTENCE_END = r"(?<=[.!?])\s+|\n+"
CLAUSE_SEPARATOR = r"[,;:]"
# A clause loses a leading conjunction and its trailing spaces and punctuation.
CLAUSE_TRIM = r"^(and|but|while|also|which|whereas)\s+|[\s.!?]+$"


def decompose_cues(reasoning):
    """{"visual": [...], "acoustic": [...], "emotion": [...]} clauses of a reasoning text."""
    cues = {kind: [] for kind in CUE_KINDS}
    section = None
    for sentence in re.split(SENTENCE_END, reasoning):
        lead = lead_in(sentence)
        if lead is not None:
            sentence = re.sub(rf"^\s*({LEAD_INS[lead]})\b[\s,:]*", "", sentence, flags=re.I)
        # a conclusion does not end the section it follows
        if lead in SECTIONS:
            section = lead
        for clause in re.split(CLAUSE_SEPARATOR, sentence):
            clause = re.sub(CLAUSE_TRIM, "", clause.strip(), flags=re.I)
            # a one-word fragment is no cue
            if len(clause.split()) < 2:
                continue
            cues[clause_kind(clause, lead, section)].append(clause)
    return cues


def lead_in(sentence):
    """The kind of lead-in a sentence opens with (a key of LEAD_INS), or None."""
    for kind, pattern in LEAD_INS.items():
        if re.match(rf"\s*({pattern})\b", sentence, re.I):
            return kind
    return None


def clause_kind(clause, lead, section):
    """The cue kind of a clause in a sentence opened by `lead`, inside `section`."""
    if lead == "conclusion" or section == "text":
        return "emotion"
    senses = []
    for sense, words in WORDS.items():
        if re.search(rf"\b({words})\b", clause, re.I):
            senses.append(sense)
    if len(senses) == 1:
        return senses[0]
    if section in ("visual", "acoustic"):
        return section
    return "emotion"
