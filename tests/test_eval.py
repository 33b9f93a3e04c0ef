"""eval.py: every metric against hand-computed values, the MEP-Bench sanity runs, the CLI."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval as E  # noqa: E402
import reward  # noqa: E402
from matching.matcher import Matcher, Sim  # noqa: E402
from metrics import perception  # noqa: E402
from metrics import recognition as metrics  # noqa: E402
from metrics import report as R  # noqa: E402
from synthetic import plan, world  # noqa: E402


@pytest.fixture(scope="module")
def matcher():
    return Matcher()  # ~3.5 s: once per module


# ---------------------------------------------------------------- recognition
def test_war_uar_by_hand():
    # "joy" normalises to happy; None (unparseable) is wrong; angry is never predicted
    preds = ["happy", "happy", "sad", None, "Joy!", "surprise"]
    labels = ["happy", "sad", "sad", "angry", "happy", "sad"]
    out = metrics.war_uar(preds, labels)
    assert out["war"] == pytest.approx(3 / 6)
    assert out["recall"] == pytest.approx({"happy": 1.0, "sad": 1 / 3, "angry": 0.0})
    assert out["uar"] == pytest.approx((1.0 + 1 / 3 + 0.0) / 3)  # only classes in the ground truth
    empty = metrics.war_uar([None, None], ["happy", "sad"])
    assert (empty["war"], empty["uar"]) == (0.0, 0.0)
    with pytest.raises(ValueError):
        metrics.war_uar(["happy"], ["happy", "sad"])


def test_hit_rate_by_hand():
    preds = ["joyful, calm", "neutral", "happy", None, "flabbergasted"]
    labels = ["happy", "neutral", "sad", "angry", "surprise"]
    # neutral ground truth excluded; hits: happy (joyful); misses: sad, angry (no answer),
    # surprise (unseen word)
    assert metrics.hit_rate(preds, labels) == (pytest.approx(1 / 4), 4)
    # neutral-only ground truth
    assert metrics.hit_rate(["neutral", "happy"], ["neutral", "calm"]) == (None, 0)
    wheel = {"flabbergasted": "surprise", "surprise": "surprise"}
    assert metrics.hit_rate(preds, labels, wheel=wheel) == (pytest.approx(2 / 4), 4)


def test_open_vocab_prf_by_hand():
    preds = ["happy, excited, tired", "", "sad", None]
    # the last has no ground truth
    labels = [["happy"], ["angry", "sad"], "sad, worried and angry", []]
    precision = [1 / 2, 0.0, 1.0]  # excited -> happy, so P = {happy, tired}; empty prediction -> 0
    recall = [1.0, 0.0, 1 / 3]
    P, R = sum(precision) / 3, sum(recall) / 3
    assert metrics.open_vocab_prf(preds, labels) == pytest.approx((P, R, 2 * P * R / (P + R), 3))
    assert metrics.open_vocab_prf([None], ["happy"]) == pytest.approx((0.0, 0.0, 0.0, 1))
    assert metrics.open_vocab_prf([], []) == (None, None, None, 0)


def test_sentiment_by_hand():
    labels = ["happy", "sad", "neutral", "angry", "surprise", "happy", "sad"]
    preds = ["joy", "happy", "sad", None, "happy", "angry", "sad"]
    # neutral and surprise have valence 0: dropped. gold / pred positive:
    gold = [True, False, False, True, False]
    pred = [True, True, False, False, False]
    f1 = {}
    for c in (True, False):
        tp = sum(g == p == c for g, p in zip(gold, pred))
        prec, rec = tp / sum(p == c for p in pred), tp / sum(g == c for g in gold)
        f1[c] = 2 * prec * rec / (prec + rec)
    waf = sum(f1[c] * sum(g == c for g in gold) / len(gold) for c in f1)
    assert waf == pytest.approx(0.6)
    assert metrics.sentiment(preds, labels) == pytest.approx((waf, 3 / 5, 5))
    # a record's numeric valence overrides its label; no non-zero valence: nothing to score
    assert metrics.sentiment(["happy"], ["neutral"], [0.7]) == pytest.approx((1.0, 1.0, 1))
    assert metrics.sentiment(["happy"], ["neutral"]) == (None, None, 0)


def test_load_wheels_and_mean_over_wheels(tmp_path, matcher):
    for k in range(1, 6):  # wheels 1-4 know "flabbergasted", wheel 5 does not
        extra = "flabbergasted,astonishment\n" if k < 5 else ""
        (tmp_path / f"wheel{k}.csv").write_text(
            f"word,cluster\n# wheel {k}\nSurprise, astonishment\n{extra}\nhappy\tjoy\n"
        )
    wheels = metrics.load_wheels(tmp_path)
    assert len(wheels) == 5 and wheels[0] == {
        "surprise": "astonishment",
        "flabbergasted": "astonishment",
        "happy": "joy",
        "word": "cluster",
    }  # the header maps itself
    recs = [{"id": "a", "label": "surprise"}, {"id": "b", "label": "happy"}]
    texts = {
        run: [
            "<think>x</think><answer>flabbergasted</answer>",
            "<think>y</think><answer>glad</answer>",
        ]
        for run in E.MASKS
    }
    m = E.score(recs, texts, matcher, wheels=wheels)["metrics"]
    assert m["hit"] == pytest.approx((4 * 2 / 2 + 1 / 2) / 5)  # glad -> happy -> joy in every wheel
    assert E.score(recs, texts, matcher)["metrics"]["hit"] == pytest.approx(1 / 2)  # built-in map
    (tmp_path / "wheel6.csv").write_text("happy,joy\nbroken line with no comma\n")
    with pytest.raises(ValueError, match="wheel6.csv:2"):
        metrics.load_wheels(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowheels"):
        metrics.load_wheels(tmp_path / "nowheels")


# ---------------------------------------------------------------- MEP-Bench pieces
def test_recovered_share_and_chair():
    S = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.59, 0.6]])  # (K=2 clauses, J=3 cues)
    # the 0.59 cue is missed
    assert perception.recovered_share(S, theta=0.6) == pytest.approx(2 / 3)
    assert perception.recovered_share(torch.zeros(2, 0)) is None  # no cues: not counted
    assert perception.recovered_share(torch.zeros(0, 3)) == 0.0  # no clauses: nothing recovered
    counts = [
        {"visual": 1, "acoustic": 3},
        {"visual": 0, "acoustic": 0},
        {"visual": 2, "acoustic": 0},
    ]
    # (CHAIR, F, CHAIR_s)
    assert perception.chair(counts, "visual") == pytest.approx((3 / 6, 3 / 6, 2 / 3))
    assert perception.chair(counts, "acoustic") == pytest.approx((3 / 6, 3 / 6, 1 / 3))
    # no claims
    assert perception.chair([{"visual": 0, "acoustic": 0}], "visual") == (0.0, 1.0, 0.0)


def world_records(n, scenarios=("both", "flat_voice", "no_video", "black_video"), detail_p=0.5):
    """Synthetic records straight from synthetic.plan (no rendering): labels, reasoning and cues."""
    rng, recs = np.random.default_rng(0), []
    kinds = list(plan.SUBTITLE_MIX)
    for i in range(n):
        label, scenario = plan.LABELS[i % 6], scenarios[i % len(scenarios)]
        p = plan.plan(rng, label, scenario, kinds[i % len(kinds)], detail_p)
        recs.append(
            {
                "id": f"r{i}",
                "label": label,
                "reasoning": p["reasoning"],
                "cues": p["cues"],
                "scenario": scenario,
            }
        )
    return recs


def completion(rec, visual=True, acoustic=True):
    """A completion that states the record's visual and/or acoustic cues, then its label."""
    parts = [
        f"In the video, {', '.join(rec['cues']['visual'])}."
        if visual and rec["cues"]["visual"]
        else "",
        f"In the audio, {', '.join(rec['cues']['acoustic'])}."
        if acoustic and rec["cues"]["acoustic"]
        else "",
        f"Therefore the person feels {rec['label']}.",
    ]
    return f"<think>{' '.join(p for p in parts if p)}</think><answer>{rec['label']}</answer>"


class StubSims:
    """matcher.Sim stand-ins that route no clause (all similarities 0): `describes` then rests on
    lead-ins and face or voice words alone."""

    def similarities(self, completions, cue_lists):
        out = []
        for text in completions:
            spans = reward.clause_spans(text)
            zeros = torch.zeros(len(spans), 1)
            out.append(Sim(spans, {"visual": zeros, "acoustic": zeros, "emotion": zeros}))
        return out


def test_describes_counts_sentences_about_a_modality_whatever_their_wording():
    stub = StubSims()
    cases = {
        "<think>In the video, something is there.</think><answer>sad</answer>": (True, False),
        # reworded: no lead-in, but the face's words
        "<think>The lips bend upward a little.</think><answer>happy</answer>": (True, False),
        "<think>Her tone rises. The person feels calm.</think><answer>calm</answer>": (False, True),
        "<think>The person feels sad.</think><answer>sad</answer>": (False, False),
        "<think>In the audio, loud. In the video, a frown.</think><answer>a</answer>": (True, True),
        "no think section": (False, False),
    }
    for text, (visual, acoustic) in cases.items():
        (sim,) = stub.similarities([text], [{}])
        assert perception.describes(text, sim, 0.5) == {"visual": visual, "acoustic": acoustic}
    # and a clause that Eq. (9) routes, in words of neither list
    text = "<think>Something odd happens.</think><answer>sad</answer>"
    (sim,) = stub.similarities([text], [{}])
    sim.S["visual"] = torch.tensor([[0.9]])
    assert perception.describes(text, sim, 0.5) == {"visual": True, "acoustic": False}


def test_faithfulness_per_clip_from_samples_by_hand():
    """Two clips with visual cues (K = 2 samples each under x\\v) and one without (under x):
    F_visual is the share of (clip, sample) pairs without a visual sentence, F_absent_visual
    the same on the full-input samples of the clip without visual cues."""
    recs = [
        {"label": "happy", "cues": {"visual": ["a smile"], "acoustic": ["a loud voice"]}},
        {"label": "sad", "cues": {"visual": ["a frown"], "acoustic": []}},
        {"label": "angry", "cues": {"visual": [], "acoustic": ["a loud voice"]}},
    ]
    video = "<think>In the video, the mouth moves.</think><answer>x</answer>"
    audio = "<think>In the audio, the voice is loud.</think><answer>x</answer>"
    plain = "<think>The person feels it.</think><answer>x</answer>"
    texts = {"full": [video, video, audio], "no_video": [plain] * 3, "no_audio": [plain] * 3}
    samples = {
        "full": [[video, video], [video, plain], [video, audio]],
        "no_video": [[video, plain], [plain, plain], [plain, plain]],
        "no_audio": [[plain, plain], [plain, audio], [audio, audio]],
    }
    report = E.score(recs, texts, StubSims(), samples=samples)
    m, c = report["metrics"], report["counts"]
    assert m["F_visual"] == pytest.approx(3 / 4) and c["F_visual"] == 4
    assert m["F_visual_greedy"] == 1.0
    assert m["F_absent_visual"] == pytest.approx(1 / 2) and c["F_absent_visual"] == 2
    assert m["described_visual"] == pytest.approx(3 / 4)
    # acoustic cues on clips 0 and 2; clip 1 has none
    assert m["F_acoustic"] == pytest.approx(2 / 4)
    assert m["F_absent_acoustic"] == 1.0 and m["described_acoustic"] == pytest.approx(1 / 4)
    assert m["F"] == pytest.approx((3 / 4 + 2 / 4) / 2)


def test_perfect_run_scores_one(matcher):
    recs = world_records(12)
    texts = {
        "full": [f"<think>{r['reasoning']}</think><answer>{r['label']}</answer>" for r in recs],
        # mentions only the audio
        "no_video": [completion(r, visual=False) for r in recs],
        # mentions only the video
        "no_audio": [completion(r, acoustic=False) for r in recs],
    }
    report = E.score(recs, texts, matcher)
    m, c = report["metrics"], report["counts"]
    for k in (
        "war",
        "uar",
        "hit",
        "ov_f",
        "sent_waf",
        "format",
        "U_visual",
        "U_acoustic",
        "U",
        "F_visual",
        "F_acoustic",
        "F",
        "F_absent_visual",
        "F_absent_acoustic",
        "F_pooled_visual",
        "F_pooled_acoustic",
    ):
        assert m[k] == pytest.approx(1.0), k
    assert report["notes"] == []
    assert (
        m["CHAIR_visual"]
        == m["CHAIR_acoustic"]
        == m["CHAIR_s_visual"]
        == m["CHAIR_s_acoustic"]
        == 0.0
    )
    # no_video / black_video records have no visual cues, flat_voice ones no acoustic cues
    assert c["U_visual"] == 6 and c["U_acoustic"] == 9
    # without samples, the greedy answer is each clip's one completion
    assert c["F_visual"] == 6 and c["F_absent_visual"] == 6 and c["F_absent_acoustic"] == 3
    assert c["claims_no_video"]["visual"] == 0 and c["claims_no_video"]["acoustic"] > 0
    assert set(report["per_scenario"]) == {"both", "flat_voice", "no_video", "black_video"}
    assert report["per_scenario"]["both"]["counts"]["n"] == 3
    # a scenario of absence: no clip carries visual cues, the absence measure stands alone
    no_video = report["per_scenario"]["no_video"]["metrics"]
    assert no_video["F_absent_visual"] == 1.0 and no_video["F_visual"] is None
    assert len(report["examples"]) == 3 and report["examples"][0]["full"] == texts["full"][0]
    json.dumps(report)  # serialisable as it is


def test_reciting_both_modalities_is_unfaithful(matcher):
    recs = world_records(6, scenarios=("both",), detail_p=0.0)  # 2 visual + 2 acoustic cues each
    recite = [completion(r) for r in recs]
    m = E.score(recs, {"full": recite, "no_video": recite, "no_audio": recite}, matcher)["metrics"]
    # Every clip describes the masked modality: per-clip faithfulness 0 (docs/method.md, section
    # 7); half of all sensory claims are about it: the pooled CHAIR = 1/2, and every sample
    # makes a claim about it: the sample-level CHAIR_s = 1
    assert m["U"] == pytest.approx(1.0)
    assert m["F_visual"] == 0.0 and m["F_acoustic"] == 0.0
    assert m["F_pooled_visual"] == pytest.approx(0.5) and m["F_pooled_acoustic"] == pytest.approx(
        0.5
    )
    assert m["CHAIR_s_visual"] == m["CHAIR_s_acoustic"] == 1.0
    # Reciting only what is masked (claims about exactly what cannot be perceived) scores 0
    only_v, only_a = (
        [completion(r, acoustic=False) for r in recs],
        [completion(r, visual=False) for r in recs],
    )
    m = E.score(recs, {"full": recite, "no_video": only_v, "no_audio": only_a}, matcher)["metrics"]
    assert (
        m["F_visual"] == pytest.approx(0.0)
        and m["F_acoustic"] == pytest.approx(0.0)
        and m["F"] == 0.0
    )
    # No reasoning at all: utilization 0, no claims (CHAIR 0 by definition), answers unparseable,
    # and faithfulness not measured (not 1.000): nothing was ever described
    report = E.score(recs, {run: [""] * 6 for run in E.MASKS}, matcher)
    m = report["metrics"]
    assert (m["U"], m["war"], m["format"], m["CHAIR_visual"]) == (0.0, 0.0, 0.0, 0.0)
    assert m["F_visual"] is None and m["F_absent_acoustic"] is None and m["F"] is None
    assert len(report["notes"]) == 4 and "never describe the visual" in report["notes"][0]
    with pytest.raises(ValueError, match="no_audio"):
        E.score(recs, {"full": recite, "no_video": recite}, matcher)


# ---------------------------------------------------------------- reports and the CLI
def test_compare_and_plot(tmp_path, matcher, capsys):
    recs = world_records(6)
    good = {run: [completion(r) for r in recs] for run in E.MASKS}
    bad = {run: ["<think>hmm</think><answer>sad</answer>"] * 6 for run in E.MASKS}
    for name, texts in (("base", bad), ("ours", good)):
        R.save(E.score(recs, texts, matcher), tmp_path / f"{name}.json")
    assert not list(tmp_path.glob("*.tmp"))
    png = tmp_path / "cmp.png"
    E.main(
        ["--compare", str(tmp_path / "base.json"), str(tmp_path / "ours.json"), "--plot", str(png)]
    )
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| metric | base | ours |"
    # the table, then the notes of the run that never describes a modality
    assert len(out) == 2 + len(R.KEYS) + 4 and out[-1].startswith("base: F_acoustic_greedy")
    assert "| war | 0.167 | 1.000 |" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "other.json").write_text('{"loss": 1}')
    for name in ("broken.json", "other.json", "missing.json"):
        with pytest.raises(SystemExit, match=name):
            E.main(["--compare", str(tmp_path / name)])


def test_cli_on_tiny_model(tmp_path, capsys):
    from synthetic.tiny import build_tiny

    tiny = build_tiny(tmp_path / "tiny")
    paths = world.make_world(tmp_path / "synth", n_train=0, n_val=0, n_test=6, seed=0)
    out = tmp_path / "report.json"
    E.main(
        [
            "--model",
            str(tiny),
            "--data",
            str(paths["test"]),
            "--out",
            str(out),
            "--limit",
            "5",
            "--max-new-tokens",
            "12",
            "--batch-size",
            "2",
            "--samples",
            "2",
        ]
    )
    report = R.load(out)
    assert report["counts"]["n"] == 5 and report["settings"]["n"] == 5
    assert report["settings"]["samples"] == 2
    assert set(R.KEYS) <= set(report["metrics"])
    assert all(0.0 <= v <= 1.0 for v in R.summary(report).values() if v is not None)
    assert len(report["examples"]) == 3 and all(
        isinstance(e["no_video"], str) for e in report["examples"]
    )
    assert report["per_scenario"]
    assert "| war |" in capsys.readouterr().out
    with pytest.raises(Exception, match="nothing.jsonl"):
        E.main(["--model", str(tiny), "--data", str(tmp_path / "nothing.jsonl")])
