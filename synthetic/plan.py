"""What each synthetic clip shows and says: the emotion grid, the cue vocabulary, the
subtitles, and `plan`, which draws one clip's modality states, details, subtitle, reasoning and
cues. synthetic/world.py's docstring describes the world; docs/method.md, section 10, gives
the reasons.
"""

# Emotion -> the face's valence and the voice's arousal; the emotion is the pair.
LABELS = ["neutral", "happy", "sad", "angry", "surprise", "worried"]
VALENCE = dict(
    neutral="flat", happy="smile", sad="frown", angry="frown", surprise="flat", worried="frown"
)
AROUSAL = dict(neutral="low", happy="high", sad="low", angry="high", surprise="high", worried="mid")
# Scenario -> its share of every split (synthetic/world.py describes them).
MIX = {"both": 0.5, "face_only": 0.125, "voice_only": 0.125, "blank": 0.15, "subtitle": 0.1}

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


def plan(rng, label, scenario, detail_p=0.5):
    """What one clip renders: modality states, details, subtitle, reasoning and cues."""
    valence = VALENCE[label]
    arousal = AROUSAL[label]
    # video: "face", "black", "no_face" or None (no file); audio: "voice", "flat", "noise" or None
    video, audio = "face", "voice"
    if scenario == "face_only":
        audio = ["flat", None][rng.integers(2)]
    elif scenario == "voice_only":
        video = None
    elif scenario == "blank":
        kind = ["black", "no_face", "noise"][rng.integers(3)]
        if kind == "noise":
            audio = kind
        else:
            video = kind
    elif scenario not in MIX:
        raise ValueError(f"unknown scenario {scenario!r}; expected one of {list(MIX)}")
    face_detail = None
    if video == "face" and rng.random() < detail_p:
        face_detail = list(FACE_DETAILS)[rng.integers(4)]
    voice_detail = None
    if audio == "voice" and rng.random() < detail_p:
        voice_detail = list(VOICE_DETAILS)[rng.integers(2)]
    subtitle, text_cue = plan_subtitle(rng, label, scenario, video, audio)
    visual = []
    if video == "face":
        visual = list(FACE_CUES[valence])
        if face_detail:
            visual.append(FACE_DETAILS[face_detail])
    acoustic = []
    if audio == "voice":
        acoustic = list(VOICE_CUES[arousal])
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


def plan_subtitle(rng, label, scenario, video, audio):
    """(subtitle, the text cue it carries or None) of a clip whose modalities are video, audio."""
    if scenario == "subtitle":
        return EMOTION_TEXT[label]
    # when a modality carries nothing, the subtitle supplies the half no modality shows
    if video != "face":
        lines, text_cue = VALENCE_TEXT[VALENCE[label]]
        return lines[rng.integers(len(lines))], text_cue
    if audio != "voice":
        lines, text_cue = AROUSAL_TEXT[AROUSAL[label]]
        return lines[rng.integers(len(lines))], text_cue
    # both modalities expressive: an emotion-free line, empty one time in ten
    if rng.random() < 0.1:
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
