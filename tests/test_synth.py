"""The synthetic world: real media files, exact proportions, determinism, and modalities that are
really separate (a nearest-centroid probe on each modality's raw features)."""

import json
from contextlib import contextmanager
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

import data
import synth

N_TRAIN, N_VAL, N_TEST = 240, 60, 12


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    paths = synth.make_world(out, N_TRAIN, N_VAL, N_TEST, seed=3, workers=2)
    records = {split: [json.loads(line) for line in open(p)] for split, p in paths.items()}
    return out, records


def test_files_decode_with_the_right_shape_rate_and_duration(world):
    out, records = world
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
            assert torch.equal(cache["frames"], data.decode_video(out / r["video"]))
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
    synth.make_world(tmp_path / "a", 8, 4, 4, seed=5, workers=1)
    synth.make_world(tmp_path / "b", 8, 4, 4, seed=5, workers=2)
    synth.make_world(tmp_path / "c", 8, 4, 4, seed=6, workers=1)
    a, b, c = (_tree(tmp_path / x) for x in "abc")
    assert len(a) > 30 and a == b  # manifests, mp4, wav, caches, world.json
    assert a["train.jsonl"] != c["train.jsonl"]


def test_scenario_proportions_and_label_balance(world):
    _, records = world
    for split, n in (("train", N_TRAIN), ("val", N_VAL), ("test", N_TEST)):
        recs = records[split]
        assert len(recs) == n
        counts = {s: sum(r["scenario"] == s for r in recs) for s in synth.MIX}
        for s, share in synth.MIX.items():
            assert abs(counts[s] - share * n) < 1, (split, counts)
        for s in synth.MIX:  # labels balanced within each scenario
            per = [
                sum(r["label"] == lab and r["scenario"] == s for r in recs) for lab in synth.LABELS
            ]
            assert max(per) - min(per) <= 1, (split, s, per)


def test_every_record_says_exactly_what_was_rendered(world):
    _, records = world
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
            assert (render["video"] == "face") != (
                render["audio"] == "voice"
            )  # exactly one blanked
        face, voice = render["video"] == "face", render["audio"] == "voice"
        visual = synth.FACE_CUES[synth.VALENCE[label]] + [
            synth.FACE_DETAILS.get(render["face_detail"])
        ]
        acoustic = synth.VOICE_CUES[synth.AROUSAL[label]] + [
            synth.VOICE_DETAILS.get(render["voice_detail"])
        ]
        visual, acoustic = (
            [c for c in visual if c and face],
            [c for c in acoustic if c and voice],
        )  # None: no detail
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
    assert (
        0.25 < np.mean([r["render"]["face_detail"] is not None for r in with_face]) < 0.75
    )  # detail_p = 0.5


def test_the_whole_input_determines_the_label(world):
    """Valence from the face or the subtitle, arousal from the voice or the subtitle: the label follows."""
    _, records = world
    table = {(synth.VALENCE[lab], synth.AROUSAL[lab]): lab for lab in synth.LABELS}
    for r in records["train"]:
        text_cue = r["cues"]["emotion"][0] if len(r["cues"]["emotion"]) == 2 else None
        if r["scenario"] == "subtitle":
            assert r["subtitle"] == synth.EMOTION_TEXT[r["label"]][0]
            continue
        valence = next(
            (v for v, cues in synth.FACE_CUES.items() if cues[0] in r["cues"]["visual"]), None
        )
        valence = valence or next(
            v for v, (lines, cue) in synth.VALENCE_TEXT.items() if cue == text_cue
        )
        arousal = next(
            (a for a, cues in synth.VOICE_CUES.items() if cues[0] in r["cues"]["acoustic"]), None
        )
        arousal = arousal or next(
            a for a, (lines, cue) in synth.AROUSAL_TEXT.items() if cue == text_cue
        )
        assert table[valence, arousal] == r["label"]
        if r["scenario"] == "both":  # then the subtitle says nothing about emotion
            assert text_cue is None and r["subtitle"] in synth.NEUTRAL_LINES + [""]


# ---------------------------------------------------------------- probes on raw features
@contextmanager
def one_thread():
    """Thousands of tiny tensor ops: thread hand-offs would cost more than the work on 2 busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def face_features(frames):
    """Ink (dark pixels) in a crop centred on the face (the bright skin blob), averaged over frames."""
    feats = []
    for gray in frames.float().mean(-1):  # (H, W)
        ys, xs = torch.nonzero(gray > 135, as_tuple=True)  # skin is brighter than any background
        cy, cx = int(ys.float().mean().round()) + 16, int(xs.float().mean().round()) + 16
        crop = torch.nn.functional.pad(gray, (16, 16, 16, 16))[cy - 14 : cy + 15, cx - 12 : cx + 13]
        feats.append((crop < 0.7 * crop.median()).float())
    return torch.stack(feats).mean(0).flatten()


def voice_features(wave):
    """Mean log power spectrum up to 4 kHz plus the level and spread of the frame energy."""
    power = (
        torch.stft(wave, 512, 256, window=torch.hann_window(512), return_complex=True).abs() ** 2
    )  # (F, T)
    energy = power.sum(0).log()
    return torch.cat(
        [(power.mean(1) + 1e-8).log()[:128], torch.stack([energy.mean(), energy.std()])]
    )


def centroid_accuracy(X, y):
    """Two-fold nearest-centroid accuracy on standardised features."""
    X, y = (X - X.mean(0)) / (X.std(0) + 1e-6), np.array(y)
    accs = []
    for fold in (0, 1):
        train, test = np.arange(len(y)) % 2 != fold, np.arange(len(y)) % 2 == fold
        classes = sorted(set(y[train]))
        centroids = torch.stack([X[train][y[train] == c].mean(0) for c in classes])
        accs.append(
            np.mean(np.array(classes)[torch.cdist(X[test], centroids).argmin(1).numpy()] == y[test])
        )
    return float(np.mean(accs))


@pytest.fixture(scope="module")
def features(world):
    out, records = world
    recs = records["train"] + records["val"]
    caches = [load_file(str(out / r["cache"])) for r in recs]
    with one_thread():
        face = [
            (r, face_features(c["frames"]))
            for r, c in zip(recs, caches)
            if r["render"]["video"] == "face"
        ]
        voice = [
            (r, voice_features(c["waveform"]))
            for r, c in zip(recs, caches)
            if r["render"]["audio"] == "voice"
        ]
    return face, voice, caches


def _probe(pairs, keep, target):
    chosen = [(r, x) for r, x in pairs if keep(r)]
    assert len(chosen) >= 40
    return centroid_accuracy(torch.stack([x for _, x in chosen]), [target(r) for r, _ in chosen])


def test_face_carries_valence_and_voice_arousal_not_the_other_way_round(features):
    face, voice, _ = features
    everything = lambda r: True
    high = lambda r: (
        synth.AROUSAL[r["label"]] == "high"
    )  # happy / angry / surprise: told apart by valence
    frown = lambda r: (
        synth.VALENCE[r["label"]] == "frown"
    )  # sad / worried / angry: told apart by arousal
    label = lambda r: r["label"]
    assert _probe(face, everything, lambda r: synth.VALENCE[r["label"]]) > 0.9
    assert _probe(voice, everything, lambda r: synth.AROUSAL[r["label"]]) > 0.9
    assert _probe(face, high, label) > 0.9 and _probe(voice, high, label) < 0.55  # chance is 1/3
    assert _probe(voice, frown, label) > 0.9 and _probe(face, frown, label) < 0.55
    # One modality alone is capped near 50% on the six labels (SYNTH_NOTES).
    assert (
        0.35 < _probe(face, everything, label) < 0.6
        and 0.35 < _probe(voice, everything, label) < 0.6
    )


@one_thread()
def test_label_free_details_are_visible_in_their_own_modality(world, features):
    _, records = world
    faces, voices = [], []
    for r, cache in zip(records["train"] + records["val"], features[2]):
        if r["render"]["video"] == "face":
            gray = cache["frames"].float().mean(-1)  # (T, H, W)
            centre = torch.stack([torch.nonzero(g > 135).float().mean(0) for g in gray])  # (T, 2)
            sway = (centre[1::2].mean(0) - centre[0::2].mean(0)).abs()  # a nod moves y, a shake x
            cy, cx = centre.mean(0).round().int().tolist()
            eyes = torch.nn.functional.pad(gray.mean(0), (16,) * 4)[
                cy + 6 : cy + 15, cx + 6 : cx + 27
            ]  # the eye band
            ink = (eyes < 0.7 * eyes.median()).float().mean()  # wide eyes: more ink, narrowed: less
            faces.append((r["render"]["face_detail"], torch.cat([sway, ink[None]])))
        if r["render"]["audio"] == "voice":
            stft = torch.stft(
                cache["waveform"], 1024, 256, window=torch.hann_window(1024), return_complex=True
            )
            power, hz = stft.abs() ** 2, torch.arange(stft.shape[0]) * 16000 / 1024  # (F, T), (F,)
            band = (hz > 60) & (hz < 2000)
            centroid = (power[band] * hz[band, None]).sum(0) / power[band].sum(
                0
            )  # (T,) spectral centroid
            n = len(
                centroid
            )  # the contour moves over the second half: compare its end with the first part
            voices.append(
                (
                    r["render"]["voice_detail"],
                    (
                        centroid[int(0.8 * n) :].mean() / centroid[n // 10 : int(0.4 * n)].mean()
                    ).log()[None],
                )
            )
    assert (
        centroid_accuracy(torch.stack([x for _, x in faces]), [str(d) for d, _ in faces]) > 0.75
    )  # 5 classes
    assert (
        centroid_accuracy(torch.stack([x for _, x in voices]), [str(d) for d, _ in voices]) > 0.75
    )  # 3 classes


def test_ensure_world_reuses_a_matching_world_and_regenerates_otherwise(tmp_path):
    knobs = dict(n_train=6, n_val=2, n_test=2, seed=1)
    paths = synth.ensure_world(tmp_path, **knobs)
    stamp = paths["train"].stat().st_mtime_ns
    assert synth.ensure_world(tmp_path, **knobs)["train"].stat().st_mtime_ns == stamp
    synth.ensure_world(tmp_path, **dict(knobs, seed=2))
    assert json.loads((tmp_path / "world.json").read_text())["seed"] == 2


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="size"):
        synth.make_world(tmp_path, 2, 1, 1, size=57)
    with pytest.raises(ValueError, match="mix"):
        synth.make_world(tmp_path, 2, 1, 1, mix={"both": 0.5, "dream": 0.5})


def test_cli_help_names_every_knob(capsys):
    with pytest.raises(SystemExit) as done:
        synth.main(["--help"])
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
