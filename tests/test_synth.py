"""The synthetic world: real media files, exact proportions, determinism, records that say exactly
what was rendered, and the command line. The probes on raw features are in test_synth_probes.py."""

import json
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from synthetic import plan as synth_plan
from synthetic import world
from thinker import media

# the split sizes of conftest's synth_world
N_TRAIN, N_VAL, N_TEST = 240, 60, 12


def test_files_decode_with_the_right_shape_rate_and_duration(synth_world):
    out, records = synth_world
    recs = records["train"][:40]
    videos = [r for r in recs if "video" in r]
    audios = [r for r in recs if "audio" in r]
    assert videos and audios
    for r in videos:
        with av.open(str(out / r["video"])) as box:
            stream = box.streams.video[0]
            frames = [f.to_ndarray(format="rgb24") for f in box.decode(stream)]
            assert stream.codec_context.name == "h264"
            assert float(stream.average_rate) == pytest.approx(4 / 2.0)
            assert float(box.duration / av.time_base) == pytest.approx(2.0, abs=0.05)
        assert len(frames) == 4 and frames[0].shape == (56, 56, 3)
    for r in audios:
        info = sf.info(str(out / r["audio"]))
        assert (info.samplerate, info.channels, info.frames) == (16000, 1, 32000)
    for r in recs:  # the cache is exactly what decoding the files gives
        cache = load_file(str(out / r["cache"]))
        kinds = (("frames", "video"), ("times", "video"), ("waveform", "audio"))
        assert set(cache) == {k for k, m in kinds if m in r}
        if "video" in r:
            assert cache["frames"].dtype == torch.uint8 and cache["frames"].shape == (4, 56, 56, 3)
            assert torch.equal(cache["frames"], media.decode_video(out / r["video"]))
            # 4 frames over 2 s, as the processor is told
            assert cache["times"].tolist() == [0.0, 0.5, 1.0, 1.5]
        if "audio" in r:
            wave, rate = sf.read(str(out / r["audio"]), dtype="float32")
            assert cache["waveform"].dtype == torch.float32 and torch.equal(
                cache["waveform"], torch.from_numpy(wave)
            )


def _tree(root):
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_in_any_process_count(tmp_path):
    world.make_world(tmp_path / "a", 8, 4, 4, seed=5, workers=1)
    world.make_world(tmp_path / "b", 8, 4, 4, seed=5, workers=2)
    world.make_world(tmp_path / "c", 8, 4, 4, seed=6, workers=1)
    a, b, c = (_tree(tmp_path / x) for x in "abc")
    assert len(a) > 30 and a == b  # manifests, mp4, wav, caches, world.json
    assert a["train.jsonl"] != c["train.jsonl"]


def test_scenario_proportions_and_label_balance(synth_world):
    _, records = synth_world
    for split, n in (("train", N_TRAIN), ("val", N_VAL), ("test", N_TEST)):
        recs = records[split]
        assert len(recs) == n
        mix = synth_plan.split_mix(synth_plan.MIX, split, synth_plan.HELD_OUT)
        scenarios = [r["scenario"] for r in recs]
        for s in synth_plan.SCENARIOS:
            share = mix.get(s, 0) / sum(mix.values())
            assert abs(scenarios.count(s) - share * n) < 1, (split, s)
        # labels balanced within each scenario
        for s in mix:
            labels = [r["label"] for r in recs if r["scenario"] == s]
            per = [labels.count(lab) for lab in synth_plan.LABELS]
            assert max(per) - min(per) <= 1, (split, s, per)
    # the held-out absence kinds never reach the training split
    assert not {r["scenario"] for r in records["train"]} & set(synth_plan.HELD_OUT)


def test_subtitle_kinds_have_the_same_rates_in_every_scenario():
    """Exact counts: within each scenario the subtitle kinds follow SUBTITLE_MIX up to rounding,
    whatever the modalities show."""
    triples = synth_plan.plans("train", 2000)
    for scenario in {s for s, _, _ in triples}:
        kinds = [k for s, k, _ in triples if s == scenario]
        for kind, share in synth_plan.SUBTITLE_MIX.items():
            assert abs(kinds.count(kind) - share * len(kinds)) < 1, (scenario, kind)


def planned_records(split, n, seed=0):
    """The records make_world would write for a split, without rendering any media."""
    records = []
    for i, (scenario, kind, label) in enumerate(synth_plan.plans(split, n, seed)):
        rng = np.random.default_rng([seed, synth_plan.SPLITS.index(split), i])
        records.append(synth_plan.plan(rng, label, scenario, kind))
    return records


def naive_bayes(train_x, train_y, test_x):
    """Multinomial naive Bayes on word counts, add-one smoothing: a prediction per test text."""
    classes = sorted(set(train_y))
    counts = {c: {} for c in classes}
    for text, y in zip(train_x, train_y):
        for word in text.lower().split():
            counts[y][word] = counts[y].get(word, 0) + 1
    vocabulary = {w for c in classes for w in counts[c]}
    predictions = []
    for text in test_x:
        scores = {}
        for c in classes:
            total = sum(counts[c].values()) + len(vocabulary)
            prior = np.log(train_y.count(c) / len(train_y))
            words = text.lower().split()
            scores[c] = prior + sum(np.log((counts[c].get(w, 0) + 1) / total) for w in words)
        predictions.append(max(scores, key=scores.get))
    return predictions


@pytest.mark.parametrize("sense", ["visual", "acoustic"])
def test_the_subtitle_alone_cannot_tell_which_modality_carries_cues(sense):
    """A classifier trained on the training split's subtitles gains at most 0.03 over the
    majority class at telling whether a test clip's reference reasoning has cues of a modality."""
    train = planned_records("train", 2000)
    test = planned_records("test", 2000)
    train_y = [bool(r["cues"][sense]) for r in train]
    test_y = [bool(r["cues"][sense]) for r in test]
    predicted = naive_bayes([r["subtitle"] for r in train], train_y, [r["subtitle"] for r in test])
    accuracy = np.mean([p == y for p, y in zip(predicted, test_y)])
    majority = max(np.mean(test_y), 1 - np.mean(test_y))
    assert accuracy <= majority + 0.03, (accuracy, majority)


def test_every_record_says_exactly_what_was_rendered(synth_world):
    _, records = synth_world
    recs = records["train"] + records["val"]
    for r in recs:
        render, label = r["render"], r["label"]
        assert ("video" in r) == (render["video"] is not None) and ("audio" in r) == (
            render["audio"] is not None
        )
        assert (render["video"], render["audio"]) == synth_plan.SCENARIOS[r["scenario"]]
        face, voice = render["video"] == "face", render["audio"] == "voice"
        visual = synth_plan.FACE_CUES[synth_plan.VALENCE[label]] + [
            synth_plan.FACE_DETAILS.get(render["face_detail"])
        ]
        acoustic = synth_plan.VOICE_CUES[synth_plan.AROUSAL[label]] + [
            synth_plan.VOICE_DETAILS.get(render["voice_detail"])
        ]
        # a None detail is no detail
        visual = [c for c in visual if c and face]
        acoustic = [c for c in acoustic if c and voice]
        assert r["cues"]["visual"] == visual and r["cues"]["acoustic"] == acoustic
        assert r["cues"]["emotion"][-1] == label
        assert ("In the video" in r["reasoning"]) == face
        assert ("In the audio" in r["reasoning"]) == voice
        for cue in visual + acoustic + r["cues"]["emotion"][:-1]:
            assert cue in r["reasoning"]
        assert r["reasoning"].endswith(f"Therefore the person feels {label}.")
        # the text cue is cited exactly when the subtitle carries one
        carries = r["subtitle_kind"] in ("arousal", "valence", "emotion")
        assert ("In the text" in r["reasoning"]) == carries == (len(r["cues"]["emotion"]) == 2)
        assert (r["subtitle"] == "") == (r["subtitle_kind"] == "empty")
    with_face = [r for r in recs if r["render"]["video"] == "face"]
    # detail_p = 0.5
    assert 0.25 < np.mean([r["render"]["face_detail"] is not None for r in with_face]) < 0.75


def test_the_subtitle_states_what_its_kind_says(synth_world):
    """An arousal line gives the label's arousal, a valence line its valence, an emotion line the
    emotion; a plain line and an empty one nothing."""
    _, records = synth_world
    for r in records["train"] + records["val"]:
        kind, label, line = r["subtitle_kind"], r["label"], r["subtitle"]
        if kind == "arousal":
            assert line in synth_plan.AROUSAL_TEXT[synth_plan.AROUSAL[label]][0]
        elif kind == "valence":
            assert line in synth_plan.VALENCE_TEXT[synth_plan.VALENCE[label]][0]
        elif kind == "emotion":
            assert line == synth_plan.EMOTION_TEXT[label][0]
        elif kind == "plain":
            assert line in synth_plan.NEUTRAL_LINES


def test_ensure_world_reuses_a_matching_world_and_regenerates_otherwise(tmp_path):
    knobs = dict(n_train=6, n_val=2, n_test=2, seed=1)
    paths = world.ensure_world(tmp_path, **knobs)
    stamp = paths["train"].stat().st_mtime_ns
    assert world.ensure_world(tmp_path, **knobs)["train"].stat().st_mtime_ns == stamp
    world.ensure_world(tmp_path, **dict(knobs, seed=2))
    assert json.loads((tmp_path / "world.json").read_text())["seed"] == 2


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="size"):
        world.make_world(tmp_path, 2, 1, 1, size=57)
    with pytest.raises(ValueError, match="mix"):
        world.make_world(tmp_path, 2, 1, 1, mix={"both": 0.5, "dream": 0.5})
    with pytest.raises(ValueError, match="held_out"):
        world.make_world(tmp_path, 2, 1, 1, held_out=["both", "dream"])


def test_cli_help_names_every_knob(capsys):
    with pytest.raises(SystemExit) as done:
        world.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--out",
        "--n-train",
        "--seed",
        "--frames",
        "--size",
        "--seconds",
        "--mix",
        "--detail-p",
        "--held-out",
    ):
        assert flag in text
