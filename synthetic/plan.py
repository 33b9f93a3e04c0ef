"""What each synthetic clip shows and says: the emotion grid, the scenarios, the cue vocabulary,
the subtitles, `plans`, which assigns each clip of a split its scenario, subtitle kind and
label, and `plan`, which draws one clip's details, subtitle, reasoning and cues.
synthetic/world.py's docstring describes the world; docs/method.md, section 10, gives the reasons.
"""

import numpy as np

SPLITS = ("train", "val", "test")
# Emotion -> the face's valence and the voice's arousal; the emotion is the pair.
LABELS = ["neutral", "happy", "sad", "angry", "surprise", "worried"]
VALENCE = dict(
    neutral="flat", happy="smile", sad="frown", angry="frown", surprise="flat", worried="frown"
)
AROUSAL = dict(neutral="low", happy="high", sad="low", angry="high", surprise="high", worried="mid")
# Scenario -> (video, audio) it renders. Video: "face" (expressive), "black", "no_face" (the face
# removed, background and noise kept) or None (no file); audio: "voice" (expressive), "flat" (a
# monotone hum), "noise" (background noise, no voice) or None (no file).
SCENARIOS = {
    "both": ("face", "voice"),
    "flat_voice": ("face", "flat"),
    "no_audio": ("face", None),
    "no_video": (None, "voice"),
    "black_video": ("black", "voice"),
    "no_face": ("no_face", "voice"),
    "noise_audio": ("face", "noise"),
}
# Scenario -> its share of the validation and test splits.
MIX = {
    "both": 0.45,
    "flat_voice": 0.075,
    "no_audio": 0.075,
    "no_video": 0.15,
    "black_video": 0.1,
    "no_face": 0.075,
    "noise_audio": 0.075,
}
# Absence kinds the training split never shows: the test asks for generalisation, not memory.
HELD_OUT = ("no_face", "noise_audio")
# Subtitle kind -> its share of every scenario, the same in each: the subtitle says nothing about
# which modalities carry cues. plain: an emotion-free line; arousal, valence: a line that gives
# that half of the emotion; emotion: a line that states it.
SUBTITLE_MIX = {"plain": 0.35, "empty": 0.1, "arousal": 0.2, "valence": 0.2, "emotion": 0.15}

# The cue vocabulary: one phrase per thing drawn or synthesized.
FACE_CUES = {
    "smile": ["the mouth curves up in a smile", "the eyebrows arch softly"],
    "flat": ["the mouth is a straight line", "the eyebrows are level"],
    "frown": ["the mouth turns down in a frown", "the eyebrows are drawn together"],
}
VOICE_CUES = {
    "low": ["the voice is low and quiet", "the speech is slow and monotone"],
    "mid": ["the voice is at a medium pitch", "the speech has a steady pace"],
    "high": ["the voice is high-pitched and loud", "the speech is fast and lively"],
}
FACE_DETAILS = {
    "wide": "the eyes are wide open",
    "narrow": "the eyes are narrowed",
    "nod": "the head nods",
    "shake": "the head shakes from side to side",
}
VOICE_DETAILS = {"rise": "the pitch rises at the end", "fall": "the pitch falls at the end"}

# Subtitles: (lines, the text cue they carry).
NEUTRAL_LINES = [
    "I went to the market this morning.",
    "The bus comes at nine.",
    "We talked about the weather.",
    "I put the keys on the table.",
    "The meeting moved to Tuesday.",
    "She called me after lunch.",
]
AROUSAL_TEXT = {
    "low": (["I just want to lie down and rest.", "I am so tired today."], "the words sound tired"),
    "mid": (
        ["I keep thinking about what could happen.", "I cannot stop checking the time."],
        "the words sound tense",
    ),
    "high": (
        ["I can't sit still right now!", "Everything is happening so fast!"],
        "the words sound energetic",
    ),
}
VALENCE_TEXT = {
    "smile": (
        ["Everything turned out great.", "We had a lovely time together."],
        "the words are positive",
    ),
    "flat": (
        ["It is just an ordinary day.", "The report has four pages."],
        "the words are matter-of-fact",
    ),
    "frown": (
        ["Everything went wrong again.", "This is a terrible mess."],
        "the words are negative",
    ),
}
EMOTION_TEXT = {
    "neutral": ("I feel nothing special about it.", "the words say they feel calm"),
    "happy": ("I am so happy about this!", "the words say they are happy"),
    "sad": ("I feel really sad today.", "the words say they are sad"),
    "angry": ("I am furious with you!", "the words say they are angry"),
    "surprise": ("I did not expect that at all!", "the words say they are surprised"),
    "worried": ("I am worried it will go wrong.", "the words say they are worried"),
}


# ---------------------------------------------------------------- a split
def largest_remainder(n, shares):
    """Exact counts that add up to n, proportional to `shares` (a dict): floors, then the clips
    left over to the largest remainders, ties to the first."""
    names = list(shares)
    share = np.array([shares[s] for s in names], float) * n / sum(shares.values())
    counts = np.floor(share).astype(int)
    largest_remainders = np.argsort(counts - share, kind="stable")
    counts[largest_remainders[: n - counts.sum()]] += 1
    return dict(zip(names, counts.tolist()))


def assign(n, mix, rng):
    """n (scenario, subtitle kind, label) triples, shuffled: exact scenario counts, within each
    scenario exact subtitle-kind counts (the same rates in every scenario) and labels balanced
    within each (scenario, kind) cell."""
    triples = []
    for scenario, count in largest_remainder(n, mix).items():
        # one label cycle through the scenario's cells: labels balanced within it
        placed = 0
        for kind, cell in largest_remainder(count, SUBTITLE_MIX).items():
            for _ in range(cell):
                triples.append((scenario, kind, LABELS[placed % len(LABELS)]))
                placed += 1
    order = rng.permutation(n)
    return [triples[j] for j in order]


def split_mix(mix, split, held_out):
    """The scenario shares of a split: the training split leaves the held-out ones out."""
    if split != "train":
        return dict(mix)
    return {name: share for name, share in mix.items() if name not in held_out}


def plans(split, n, seed=0, mix=None, held_out=HELD_OUT):
    """The (scenario, subtitle kind, label) of each clip of a split, as make_world draws them;
    no media are rendered."""
    # a split's plan draws from [seed, 3..5, 0], its clips from [seed, 0..2, i]
    plan_rng = np.random.default_rng([seed, 3 + SPLITS.index(split), 0])
    return assign(n, split_mix(MIX if mix is None else mix, split, held_out), plan_rng)


# ---------------------------------------------------------------- a clip
def plan(rng, label, scenario, subtitle_kind, detail_p=0.5):
    """What one clip renders: modality states, details, subtitle, reasoning and cues."""
    if scenario not in SCENARIOS or subtitle_kind not in SUBTITLE_MIX:
        raise ValueError(
            f"unknown scenario {scenario!r} or subtitle kind {subtitle_kind!r}; expected one of "
            f"{list(SCENARIOS)} and {list(SUBTITLE_MIX)}"
        )
    video, audio = SCENARIOS[scenario]
    face_detail = None
    if video == "face" and rng.random() < detail_p:
        face_detail = list(FACE_DETAILS)[rng.integers(4)]
    voice_detail = None
    if audio == "voice" and rng.random() < detail_p:
        voice_detail = list(VOICE_DETAILS)[rng.integers(2)]
    subtitle, text_cue = plan_subtitle(rng, label, subtitle_kind)
    visual = []
    if video == "face":
        visual = list(FACE_CUES[VALENCE[label]])
        if face_detail:
            visual.append(FACE_DETAILS[face_detail])
    acoustic = []
    if audio == "voice":
        acoustic = list(VOICE_CUES[AROUSAL[label]])
        if voice_detail:
            acoustic.append(VOICE_DETAILS[voice_detail])
    emotion = []
    if text_cue:
        emotion.append(text_cue)
    emotion.append(label)
    return dict(
        video=video,
        audio=audio,
        face_detail=face_detail,
        voice_detail=voice_detail,
        subtitle=subtitle,
        reasoning=reasoning_text(visual, acoustic, text_cue, label),
        cues={"visual": visual, "acoustic": acoustic, "emotion": emotion},
    )


def plan_subtitle(rng, label, kind):
    """(subtitle, the text cue it carries or None) of a given kind: drawn whatever the clip's
    modalities show, so the subtitle cannot tell which of them carry cues."""
    if kind == "emotion":
        return EMOTION_TEXT[label]
    if kind == "valence":
        lines, text_cue = VALENCE_TEXT[VALENCE[label]]
        return lines[rng.integers(len(lines))], text_cue
    if kind == "arousal":
        lines, text_cue = AROUSAL_TEXT[AROUSAL[label]]
        return lines[rng.integers(len(lines))], text_cue
    if kind == "empty":
        return "", None
    return NEUTRAL_LINES[rng.integers(len(NEUTRAL_LINES))], None


def reasoning_text(visual, acoustic, text_cue, label):
    """The reference reasoning: one sentence per modality with cues, then the conclusion."""
    sentences = []
    if visual:
        sentences.append(f"In the video, {', '.join(visual)}.")
    if acoustic:
        sentences.append(f"In the audio, {', '.join(acoustic)}.")
    if text_cue:
        sentences.append(f"In the text, {text_cue}.")
    sentences.append(f"Therefore the person feels {label}.")
    return " ".join(sentences)
