"""Tests for reward.py, Eqs. (1)-(4): hand-written completions and naive formulas written out here.

The matcher itself is tested in tests/test_matcher.py."""

import math
import re

import pytest
import torch
from torch.testing import assert_close

import reward
from matching.matcher import Matcher
from reward import (
    accuracy_reward,
    clause_spans,
    compute_rewards,
    cue_recovery,
    extract_answer,
    format_reward,
    normalize_emotion,
    think_text,
)

CUES = {
    "visual": ["furrowed brows", "clenched jaw", "glaring eyes"],
    "acoustic": ["raised voice", "fast speech rate", "trembling voice"],
    "emotion": ["angry"],
}
RECORD = {"label": "angry", "cues": CUES}


def wrap(think, answer="angry"):
    return f"<think>{think}</think><answer>{answer}</answer>"


@pytest.fixture(scope="module")
def matcher():
    return Matcher()


# Eq. (1) and answer extraction -------------------------------------------------------------

MALFORMED = [  # (completion, fmt, acc against "angry")
    ("", 0.0, 0.0),
    ("She is angry, clearly.", 0.0, 0.0),  # no tags
    ("<think><think>brows are furrowed</think></think><answer>angry</answer>", 1.0, 1.0),  # nested
    ("<think></think><answer>angry</answer>", 0.0, 1.0),  # empty think
    (wrap("The brows are furrowed.", "The emotion is angry because of the face"), 1.0, 0.0),
    (wrap("她的眉头紧锁，声音很大。", "愤怒"), 1.0, 0.0),  # non-ASCII
    (wrap("Café — naïve émotions… 😠!", "angry 😠"), 1.0, 1.0),  # emoji is a symbol, stripped
    ("<think>The brows are furrowed and the voice is raised", 0.0, 0.0),  # truncated
    ("<answer>angry</answer>", 0.0, 1.0),
    (wrap("The brows are furrowed.", ""), 0.0, 0.0),
    ("<think>brows</think><answer>angry", 0.0, 0.0),  # unclosed answer
    # the regex of Eq. (1) lets the answer span "sad</answer><answer>angry"; the last answer counts
    ("<think>a</think><answer>sad</answer><answer>angry</answer>", 1.0, 1.0),
    ("  \n<think>a</think>\n<answer> Angry. </answer>\n", 1.0, 1.0),
]


@pytest.mark.parametrize("text,fmt,acc", MALFORMED)
def test_malformed_completions_score_without_raising(matcher, text, fmt, acc):
    total, parts = compute_rewards([text], [RECORD], matcher)
    assert parts["fmt"].tolist() == [fmt]
    assert parts["acc"].tolist() == [acc]
    assert total.shape == (1,) and torch.isfinite(total).all()
    assert all(0.0 <= parts[k][0] <= 1.0 for k in reward.PARTS)


def test_helpers_never_raise_on_non_strings():
    for bad in (None, 3, b"<think>a</think>"):
        assert format_reward(bad) == 0.0
        assert extract_answer(bad) is None
        assert think_text(bad) == ""
        assert clause_spans(bad) == []
    assert accuracy_reward(None, "happy") == 0.0
    assert think_text("x <think> a, b </think> y") == "a, b"


# Eq. (2) -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "label,right,wrong",
    [
        ("happy", ["Happy", "joy", "Joyful!", "glad", "happiness", " HAPPY. "], ["sad", "neutral"]),
        ("angry", ["anger", "mad", "Furious", "annoyed", "'angry'"], ["happy", "worried", "sad"]),
        ("sad", ["sadness", "unhappy", "sorrowful", "SAD"], ["happy", "neutral"]),
        ("surprise", ["surprised", "amazed", "astonished"], ["worried", "happy"]),
        (
            "worried",
            ["worry", "anxious", "nervous", "fear", "afraid", "scared"],
            ["surprise", "sad"],
        ),
        ("neutral", ["calm", "Neutral."], ["happy", "sad"]),
        ("Joy", ["happy", "glad"], ["sad"]),  # the label is normalised too
        ("disgust", ["Disgust", "disgusted"], ["angry", "contempt"]),
        ("bittersweet", ["Bittersweet!"], ["sad", "happy"]),  # unknown words pass through
    ],
)
def test_synonyms_count_and_other_emotions_do_not(label, right, wrong):
    for answer in right:
        assert accuracy_reward(answer, label) == 1.0, (answer, label)
    for answer in wrong:
        assert accuracy_reward(answer, label) == 0.0, (answer, label)


def test_single_label_needs_exact_match():
    assert normalize_emotion(" Very  HAPPY!! ") == "very happy"
    assert accuracy_reward("very happy", "happy") == 0.0
    assert accuracy_reward("happy, sad, angry, neutral, surprise, worried", "happy") == 0.0  # hedge
    assert accuracy_reward("", "happy") == 0.0 and accuracy_reward("...", "happy") == 0.0


def test_multi_label_set_f1_by_hand():
    # pred {happy, surprise, neutral}, gold {happy, surprise, sad, worried}: 2 shared
    f1 = accuracy_reward("happy, surprised, calm", ["joy", "surprise", "sad", "fear"])
    assert f1 == pytest.approx(2 * 2 / (3 + 4))
    # P = 1/2, R = 1/1 -> F1 = 2/3; the comma-separated label string is a list too
    assert accuracy_reward("Anger; disgust", "angry") == 0.0
    assert accuracy_reward("Anger; disgust", "angry,") == pytest.approx(2 / 3)
    assert accuracy_reward("joy, happy, glad", ["happy"]) == 1.0  # duplicates after norm collapse
    assert accuracy_reward("sad", ["happy", "angry"]) == 0.0
    assert accuracy_reward(", ,", ["happy"]) == 0.0


def test_wheel_hook_groups_words():
    wheel = {"happy": "positive", "surprise": "positive", "cheerful": "positive", "sad": "negative"}
    assert accuracy_reward("amazed", "joyful", wheel=wheel) == 1.0  # via synonyms, then the wheel
    assert accuracy_reward("amazed", "joyful") == 0.0
    assert accuracy_reward("cheerful", "sadness", wheel=wheel) == 0.0
    assert normalize_emotion("Cheerful!", wheel) == "positive"
    assert accuracy_reward("cheerful, sorrow", ["joy", "sad"], wheel=wheel) == 1.0


# Eq. (3) -----------------------------------------------------------------------------------


def test_clause_spans_index_back_into_the_completion():
    text = (
        "  <think> The brows are furrowed, and the jaw is clenched.\nHis voice rises; "
        "he shouts!  Why? ... </think>\n<answer>angry, tense</answer>"
    )
    spans = clause_spans(text)
    assert [text[s:e] for s, e in spans] == [
        "The brows are furrowed",
        "and the jaw is clenched",
        "His voice rises",
        "he shouts",
        "Why",
    ]
    think_start, think_end = text.index("<think>") + 7, text.index("</think>")
    assert all(think_start <= s < e <= think_end for s, e in spans)
    # an independent splitter over think_text gives the same clauses
    naive = [c.strip() for c in re.split(r"[.,;!?\n]", think_text(text)) if c.strip()]
    assert [text[s:e] for s, e in spans] == naive
    assert clause_spans("no tags here, none.") == []
    assert clause_spans("<think>unclosed, still thinking") == []
    nested = "<think><think>inner, part</think></think><answer>x</answer>"
    assert [nested[s:e] for s, e in clause_spans(nested)] == ["inner", "part"]


def test_cue_recovery_matches_naive_loop():
    gen = torch.Generator().manual_seed(0)
    for n, j, tau in [(5, 4, 0.5), (1, 3, 0.0), (7, 1, 0.9), (3, 0, 0.5)]:
        S = torch.rand(n, j, generator=gen) * 2 - 1
        naive = torch.zeros(j)
        for jj in range(j):
            best = max(S[k, jj].item() for k in range(n))
            naive[jj] = max(best - tau, 0.0) / (1 - tau)
        assert_close(cue_recovery(S, tau), naive)
    assert_close(cue_recovery(torch.zeros(0, 3)), torch.zeros(3))  # no clauses: nothing recovered
    assert cue_recovery(torch.ones(2, 2))[0] == 1.0
    with pytest.raises(ValueError, match="tau"):
        cue_recovery(torch.zeros(1, 1), tau=1.0)


def test_visual_restatement_scores_visual_not_acoustic(matcher):
    visual = wrap("Her brow is deeply furrowed, her teeth are gritted, her eyes narrow in a glare.")
    acoustic = wrap("Her voice is raised, she talks at a fast speech rate and her voice trembles.")
    nothing = wrap("The weather was nice yesterday. I like trains.")
    total, parts = compute_rewards([visual, acoustic, nothing], [RECORD] * 3, matcher)
    assert parts["op_visual"][0] > 0.2 and parts["op_acoustic"][0] < 0.05
    assert parts["op_acoustic"][1] > 0.2 and parts["op_visual"][1] < 0.05
    for k in ("op", "op_visual", "op_acoustic", "op_emotion"):
        assert parts[k][2] == 0.0  # names no cue
    assert_close(total[2], torch.tensor(1.1))  # acc + 0.1 * fmt only


# Eq. (4) -----------------------------------------------------------------------------------


def test_parts_sum_to_total_with_given_weights(matcher):
    completions = [
        wrap("The brows are furrowed, his voice is raised. He is angry."),
        wrap("He looks at the floor.", "sad"),
        "<think>Her jaw is clenched</think> angry",
        wrap("The brows are furrowed, his voice is raised."),
        wrap("The brows are furrowed, his voice is raised."),
    ]
    records = [
        RECORD,
        RECORD,
        RECORD,
        {"label": "angry", "cues": {"visual": ["furrowed brows"]}},
        {"label": ["angry", "sad"]},
    ]
    w_fmt, w_op, tau = 0.3, 0.7, 0.4
    total, parts = compute_rewards(completions, records, matcher, w_fmt=w_fmt, w_op=w_op, tau=tau)
    assert set(parts) == set(reward.PARTS) | {"sims"}
    assert all(parts[k].shape == (5,) for k in reward.PARTS)
    assert_close(total, parts["acc"] + w_fmt * parts["fmt"] + w_op * parts["op"])
    for i, (sim, rec) in enumerate(zip(parts["sims"], records)):
        per = {}
        for m in reward.MODALITIES:
            J = len(rec.get("cues", {}).get(m, []))
            if J:
                scores = [
                    max(0.0, max(sim.S[m][k, j].item() for k in range(len(sim.spans))) - tau)
                    / (1 - tau)
                    if sim.spans
                    else 0.0
                    for j in range(J)
                ]
                per[m] = sum(scores) / J
            assert math.isclose(parts[f"op_{m}"][i].item(), per.get(m, 0.0), abs_tol=1e-6)
        naive_op = sum(per.values()) / len(per) if per else 0.0
        assert math.isclose(parts["op"][i].item(), naive_op, abs_tol=1e-6)
    assert parts["op"][0] > 0 and parts["op"][4] == 0  # no cues: no R_op
    assert parts["acc"].tolist() == [1.0, 0.0, 0.0, 1.0, pytest.approx(2 / 3)]


def test_use_op_false_is_plain_grpo_and_embeds_nothing():
    total, parts = compute_rewards(
        [wrap("The brows are furrowed."), "angry"], [RECORD] * 2, None, use_op=False
    )
    assert parts["sims"] is None
    assert all((parts[k] == 0).all() for k in ("op", "op_visual", "op_acoustic", "op_emotion"))
    assert_close(total, torch.tensor([1.1, 0.0]))


def test_empty_group_and_group_without_think(matcher):
    total, parts = compute_rewards([], [], matcher)
    assert total.shape == (0,) and parts["sims"] == []
    total, parts = compute_rewards(["angry", wrap("fine")], [{"label": "angry"}, RECORD], matcher)
    assert parts["sims"][0].S["visual"].shape == (0, 0)  # no think, no cues
    assert parts["sims"][1].S["visual"].shape == (1, 3)
    assert parts["op"][0] == 0


def test_bad_input_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="2 completions, 1 records"):
        compute_rewards(["a", "b"], [RECORD], None, use_op=False)
    with pytest.raises(ValueError, match=r"records\[1\]"):
        compute_rewards(["a", "b"], [RECORD, {"cues": CUES}], None, use_op=False)
    with pytest.raises(ValueError, match="needs a matcher"):
        compute_rewards(["a"], [RECORD], None)
    with pytest.raises(TypeError, match="label"):
        accuracy_reward("happy", None)
    with pytest.raises(FileNotFoundError, match="model_dir"):
        Matcher(tmp_path)
