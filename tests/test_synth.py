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
        assert set(cache) == {k for k, m in (("frames", "video"), ("waveform", "audio")) if m in r}
        if "video" in r:
            assert cache["frames"].dtype == torch.uint8 and cache["frames"].shape == (4, 56, 56, 3)
            assert torch.equal(cache["frames"], media.decode_video(out / r["video"]))
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
        scenarios = [r["scenario"] for r in recs]
        counts = {s: scenarios.count(s) for s in synth_plan.MIX}
        for s, share in synth_plan.MIX.items():
            assert abs(counts[s] - share * n) < 1, (split, counts)
        # labels balanced within each scenario
        for s in synth_plan.MIX:
            labels = [r["label"] for r in recs if r["scenario"] == s]
            per = [labels.count(lab) for lab in synth_plan.LABELS]
            assert max(per) - min(per) <= 1, (split, s, per)


def test_every_record_says_exactly_what_was_rendered(synth_world):
    _, records = synth_world
    recs = records["train"] + records["val"]
    for r in recs:
        render, scen, label = r["render"], r["scenario"], r["label"]
        assert ("video" in r) == (render["video"] is not None) and ("audio" in r) == (
            render["audio"] is not None
        )
        expect_video = {"voice_only": {None}, "blank": {"face", "black", "no_face"}}.get(
            scen, {"face"}
        )
        expect_audio = {"face_only": {"flat", None}, "blank": {"voice", "noise"}}.get(
            scen, {"voice"}
        )
        assert render["video"] in expect_video and render["audio"] in expect_audio, r
        if scen == "blank":
            # exactly one blanked
            assert (render["video"] == "face") != (render["audio"] == "voice")
        face, voice = render["video"] == "face", render["audio"] == "voice"
        visual = synth_plan.FACE_CUES[synth_plan.VALENCE[label]] + [
            synth_plan.FACE_DETAILS.get(render["face_detail"])
        ]
        acoustic = synth_plan.VOICE_CUES[synth_plan.AROUSAL[label]] + [
            synth_plan.VOICE_DETAILS.get(render["voice_detail"])
        ]
        # a None detail is no detail
        visual, acoustic = (
            [c for c in visual if c and face],
            [c for c in acoustic if c and voice],
        )
        assert r["cues"]["visual"] == visual and r["cues"]["acoustic"] == acoustic
        assert r["cues"]["emotion"][-1] == label
        assert ("In the video" in r["reasoning"]) == face and (
            "In the audio" in r["reasoning"]
        ) == voice
        for cue in visual + acoustic + r["cues"]["emotion"][:-1]:
            assert cue in r["reasoning"]
        assert r["reasoning"].endswith(f"Therefore the person feels {label}.")
    assert sum(r["subtitle"] == "" for r in recs) > 0  # some empty subtitles
    with_face = [r for r in recs if r["render"]["video"] == "face"]
    # detail_p = 0.5
    assert 0.25 < np.mean([r["render"]["face_detail"] is not None for r in with_face]) < 0.75


def test_the_whole_input_determines_the_label(synth_world):
    """Valence from the face or the subtitle, arousal from the voice or the subtitle: the label
    follows."""
    _, records = synth_world
    table = {(synth_plan.VALENCE[lab], synth_plan.AROUSAL[lab]): lab for lab in synth_plan.LABELS}
    for r in records["train"]:
        text_cue = r["cues"]["emotion"][0] if len(r["cues"]["emotion"]) == 2 else None
        if r["scenario"] == "subtitle":
            assert r["subtitle"] == synth_plan.EMOTION_TEXT[r["label"]][0]
            continue
        valence = next(
            (v for v, cues in synth_plan.FACE_CUES.items() if cues[0] in r["cues"]["visual"]), None
        )
        valence = valence or next(
            v for v, (lines, cue) in synth_plan.VALENCE_TEXT.items() if cue == text_cue
        )
        arousal = next(
            (a for a, cues in synth_plan.VOICE_CUES.items() if cues[0] in r["cues"]["acoustic"]),
            None,
        )
        arousal = arousal or next(
            a for a, (lines, cue) in synth_plan.AROUSAL_TEXT.items() if cue == text_cue
        )
        assert table[valence, arousal] == r["label"]
        if r["scenario"] == "both":  # then the subtitle says nothing about emotion
            assert text_cue is None and r["subtitle"] in synth_plan.NEUTRAL_LINES + [""]


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
    ):
        assert flag in text
