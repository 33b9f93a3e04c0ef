"""data.py: manifests and their bad lines, media decoding, cue decomposition, prompts and batches
for the tiny thinker, and modality masking (SPEC sections 5 and 8)."""

import json
import re
import shutil

import av
import numpy as np
import pytest
import soundfile as sf
import torch

import data
import model
import synth


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    paths = synth.make_world(out, 24, 6, 6, seed=7, workers=1)
    return out, data.load_manifest(paths["train"])


@pytest.fixture(scope="module")
def policy(world, tmp_path_factory):
    path = model.build_tiny(tmp_path_factory.mktemp("tiny"), corpus=data.corpus(world[1]))
    return model.load_policy(path)


def pick(records, *wanted):
    """The first record of each wanted (video state, audio state)."""
    return [
        next(r for r in records if (r["render"]["video"], r["render"]["audio"]) == w)
        for w in wanted
    ]


# ---------------------------------------------------------------- manifests
def test_load_manifest_resolves_paths_and_fills_every_field(world):
    out, recs = world
    assert len(recs) == 24 and recs.errors == []
    for n, r in enumerate(recs, 1):
        assert r["source"] == f"{out / 'train.jsonl'}:{n}"
        for key in ("video", "audio", "cache"):
            assert key not in r or (r[key].startswith(str(out)) and (out / r[key]).is_file())
        assert set(r["cues"]) == {"visual", "acoustic", "emotion"} and isinstance(
            r["subtitle"], str
        )


def test_bad_lines_are_reported_with_file_and_line_then_skipped_or_raised(world, tmp_path):
    out, recs = world
    good = next(r for r in recs if "audio" in r)
    wav = shutil.copy(good["audio"], tmp_path / "ok.wav")
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 10)
    (tmp_path / "broken.wav").write_bytes(b"RIFF....WAVEfmt nonsense")
    lines = [
        json.dumps(
            {
                "id": "a",
                "label": "sad",
                "audio": "ok.wav",
                "reasoning": "In the audio, the voice is low.",
            }
        ),
        '{"id": "b", "label": ',  # 2 not JSON
        "",  # 3 blank: ignored
        json.dumps({"id": "c", "subtitle": "hi"}),  # 4 no label
        json.dumps({"label": "happy"}),  # 5 no id
        json.dumps({"id": "d", "label": "sad", "video": "gone.mp4"}),  # 6 missing file
        json.dumps({"id": "e", "label": "sad", "video": "broken.mp4"}),  # 7 unreadable video
        json.dumps({"id": "f", "label": "sad", "audio": "broken.wav"}),  # 8 unreadable audio
        "[1, 2]",  # 9 not an object
        json.dumps({"id": "a", "label": "sad"}),  # 10 repeated id
        json.dumps({"id": "g", "label": ["happy", "surprise"], "subtitle": ""}),
    ]  # text only, two labels
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    loaded = data.load_manifest(path)
    assert [r["id"] for r in loaded] == ["a", "g"] and loaded[0]["audio"] == str(wav)
    assert loaded[0]["cues"]["acoustic"] == ["the voice is low"]  # decomposed from the reasoning
    expect = {
        2: "not JSON",
        4: "'label'",
        5: "'id'",
        6: "not found",
        7: "unreadable",
        8: "unreadable",
        9: "JSON object",
        10: "twice",
    }
    assert len(loaded.errors) == len(expect)
    for err, (n, why) in zip(loaded.errors, expect.items()):
        assert err.startswith(f"{path}:{n}: ") and why in err, err
    with pytest.raises(data.DataError, match=re.escape(f"{path}:2: not JSON")):
        data.load_manifest(path, on_error="raise")
    # Without the header check the bad files load, and decoding them names the manifest line.
    unchecked = {r["id"]: r for r in data.load_manifest(path, check_media=False)}
    for rid, n in (("e", 7), ("f", 8)):
        with pytest.raises(data.DataError, match=re.escape(f"{path}:{n}: cannot decode")):
            data.load_media(unchecked[rid])
    with pytest.raises(data.DataError, match="manifest not found"):
        data.load_manifest(tmp_path / "nowhere.jsonl")


# ---------------------------------------------------------------- media
def test_media_from_the_cache_equal_media_decoded_from_the_files(world):
    _, recs = world
    for r in recs[:8]:
        cached = data.load_media(r, frames=4)
        decoded = data.load_media({k: v for k, v in r.items() if k != "cache"}, frames=4)
        for a, b in zip(cached, decoded):
            assert (a is None and b is None) or torch.equal(a, b)
        video, audio = cached
        assert video is None or (video.shape == (4, 56, 56, 3) and video.dtype == torch.uint8)
        assert audio is None or (audio.shape == (32000,) and audio.dtype == torch.float32)


def test_a_clip_shorter_than_the_frame_count_repeats_frames(tmp_path):
    colours = np.array([[200, 0, 0], [0, 200, 0], [0, 0, 200]], np.uint8)
    synth.write_mp4(
        tmp_path / "short.mp4", np.broadcast_to(colours[:, None, None], (3, 56, 56, 3)).copy(), 2
    )
    every = data.decode_video(tmp_path / "short.mp4")
    eight = data.load_media({"id": "s", "video": str(tmp_path / "short.mp4")}, frames=8)[0]
    naive = [round(i * (3 - 1) / (8 - 1)) for i in range(8)]  # uniform positions over the 3 frames
    assert every.shape == (3, 56, 56, 3) and eight.shape == (8, 56, 56, 3)
    assert torch.equal(eight, every[naive])
    assert every.float().mean((1, 2)).argmax(1).tolist() == [
        0,
        1,
        2,
    ]  # order kept: red, green, blue


def _peak_hz(wave, sr=16000):
    return float(np.fft.rfftfreq(len(wave), 1 / sr)[np.abs(np.fft.rfft(np.asarray(wave))).argmax()])


def test_audio_is_resampled_to_16k_mono_and_read_from_a_video_track(tmp_path):
    t = np.arange(22050) / 22050
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 440 * t)], 1).astype(
        np.float32
    )
    sf.write(tmp_path / "a.wav", stereo, 22050)
    wave = data.decode_audio(tmp_path / "a.wav")
    assert wave.dtype == torch.float32 and wave.shape == (16000,)
    assert _peak_hz(wave) == pytest.approx(440, abs=2) and wave.abs().max() == pytest.approx(
        0.75, abs=0.03
    )
    # An mp4 with an AAC track at 44.1 kHz and no audio file: the audio comes from the video.
    with av.open(str(tmp_path / "av.mp4"), "w") as box:
        video = box.add_stream("libx264", rate=2)
        video.width, video.height, video.pix_fmt = 56, 56, "yuv420p"
        sound = box.add_stream("aac", rate=44100, layout="mono")
        for i in range(2):
            box.mux(
                video.encode(
                    av.VideoFrame.from_ndarray(
                        np.full((56, 56, 3), 90 * i, np.uint8), format="rgb24"
                    )
                )
            )
        tone = np.sin(2 * np.pi * 440 * np.arange(44100) / 44100).astype(np.float32)[None] * 0.5
        for s in range(0, 44100, 1024):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(tone[:, s : s + 1024]), format="fltp", layout="mono"
            )
            frame.sample_rate, frame.pts = 44100, s
            box.mux(sound.encode(frame))
        box.mux(video.encode())
        box.mux(sound.encode())
    frames, wave = data.load_media({"id": "v", "video": str(tmp_path / "av.mp4")}, frames=8)
    assert frames.shape == (8, 56, 56, 3)
    assert abs(len(wave) - 16000) < 0.1 * 16000 and _peak_hz(wave) == pytest.approx(440, abs=3)
    # A video without an audio track has no audio.
    synth.write_mp4(tmp_path / "mute.mp4", np.zeros((2, 56, 56, 3), np.uint8), 2)
    assert data.load_media({"id": "m", "video": str(tmp_path / "mute.mp4")})[1] is None


# ---------------------------------------------------------------- cue decomposition
def test_decomposition_recovers_the_synthetic_cues_and_reads_emer_style_text(world):
    _, recs = world
    for r in recs:
        cues = data.decompose_cues(r["reasoning"])
        assert cues["visual"] == r["cues"]["visual"] and cues["acoustic"] == r["cues"]["acoustic"]
        assert (
            cues["emotion"][:-1] == r["cues"]["emotion"][:-1] and r["label"] in cues["emotion"][-1]
        )
    text = (
        "In the video, the man frowns and looks down, and his hands are clenched. He seems tired. "
        "In the audio, his voice trembles; the tone is low. His face is pale. "
        "In the text, he says he lost his job. Overall, he feels sad, possibly hopeless."
    )
    assert data.decompose_cues(text) == {
        "visual": [
            "the man frowns and looks down",
            "his hands are clenched",
            "He seems tired",
            "His face is pale",
        ],
        "acoustic": ["his voice trembles", "the tone is low"],
        "emotion": ["he says he lost his job", "he feels sad", "possibly hopeless"],
    }
    assert data.decompose_cues("") == {"visual": [], "acoustic": [], "emotion": []}


# ---------------------------------------------------------------- prompts and batches
def test_target_text_has_the_think_answer_format(world):
    r = world[1][0]
    text = data.target_text(r)
    assert re.fullmatch(
        r"\s*<think>.+?</think>\s*<answer>.+?</answer>\s*", text, re.S
    )  # SPEC Eq. (1)
    assert text == f"<think>{r['reasoning']}</think><answer>{r['label']}</answer>"
    two = data.target_text({"label": ["happy", "surprise"], "reasoning": "x"})
    assert two == "<think>x</think><answer>happy, surprise</answer>"


def test_encode_batches_any_mix_exactly_as_the_processor_does(world, policy):
    _, recs = world
    _, processor = policy
    chosen = pick(recs, ("face", "voice"), (None, "voice"), ("face", None)) + [
        dict(recs[0], subtitle="")
    ]
    media = [data.load_media(r, frames=4) for r in chosen]
    batch = data.encode(processor, chosen, media)
    texts = [
        processor.apply_chat_template(
            data.messages(r, v is not None, a is not None),
            add_generation_prompt=True,
            tokenize=False,
        )
        for r, (v, a) in zip(chosen, media)
    ]
    assert (
        "Subtitle" not in texts[-1] and data.INSTRUCTION in texts[-1]
    )  # empty subtitle: no subtitle line
    ref = processor(
        text=texts,
        videos=[v for v, _ in media if v is not None],
        audio=[a.numpy() for _, a in media if a is not None],
        use_audio_in_video=False,
        padding=True,
        videos_kwargs={"fps": 2.0, "size": {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}},
        return_tensors="pt",
    )
    assert set(batch) == set(ref)
    for key in ref:
        assert torch.equal(batch[key], ref[key]), key
    assert (
        batch["pixel_values_videos"].shape[0] == 3 * 2 * 4 * 4
    )  # 3 videos x (4/2) x (56/14)^2 patches
    assert batch["input_features"].shape[0] == 3 and batch["video_grid_thw"].shape[0] == 3
    lengths = batch["attention_mask"].sum(1)
    L = batch["input_ids"].shape[1]
    for row, ids, n in zip(batch["attention_mask"], batch["input_ids"], lengths):  # LEFT padding
        assert row[: L - n].sum() == 0 and row[L - n :].all()
        assert (ids[: L - n] == processor.tokenizer.pad_token_id).all()
    # Records with no video at all, or no audio at all: those keys are absent.
    assert "pixel_values_videos" not in data.encode(processor, chosen[1:2], media[1:2])
    assert "input_features" not in data.encode(processor, chosen[2:3], media[2:3])


def test_targets_get_labels_only_on_the_target_tokens(world, policy):
    _, recs = world
    _, processor = policy
    tok = processor.tokenizer
    chosen = recs[:3]
    targets = [data.target_text(r) for r in chosen]
    prompts = data.encode(processor, chosen, frames=4)
    batch = data.encode(processor, chosen, targets=targets, frames=4)
    for i, target in enumerate(targets):
        labelled = batch["labels"][i][batch["labels"][i] != -100]
        assert tok.decode(labelled) == target + tok.eos_token
        assert torch.equal(batch["input_ids"][i][-len(labelled) :], labelled)
        n = int(prompts["attention_mask"][i].sum())  # the prompt sits right before the target
        start = batch["input_ids"].shape[1] - len(labelled)
        assert torch.equal(batch["input_ids"][i][start - n : start], prompts["input_ids"][i][-n:])
    assert (
        batch["attention_mask"].sum()
        == prompts["attention_mask"].sum() + (batch["labels"] != -100).sum()
    )


def test_the_prompt_cache_is_used_and_gives_the_same_batch(world, policy):
    _, recs = world
    _, processor = policy
    cache = {}
    first = data.encode(processor, recs[:4], cache=cache, frames=4)
    assert set(cache) == {r["id"] for r in recs[:4]}
    # A cached record is never loaded again: these media paths do not exist.
    gone = [dict(r, cache="/nonexistent.safetensors", video="/nonexistent.mp4") for r in recs[:4]]
    again = data.encode(processor, gone, cache=cache, frames=4)
    assert set(first) == set(again) and all(torch.equal(first[k], again[k]) for k in first)


# ---------------------------------------------------------------- masking (SPEC section 5)
@pytest.fixture(scope="module")
def batch(world, policy):
    _, recs = world
    chosen = pick(recs, ("face", "voice"), (None, "voice"), ("face", None), ("face", "voice"))
    return data.encode(policy[1], chosen, frames=4)


def test_video_mask_zeroes_rho_of_each_clips_patches_and_nothing_else(batch):
    for rho in (0.9, 0.5, 1.0):
        masked = data.mask_modality(batch, "video", rho=rho, seed=1)
        for key in batch:
            if key != "pixel_values_videos":
                assert masked[key] is batch[key]  # tokens, positions and audio untouched
        before, after = batch["pixel_values_videos"], masked["pixel_values_videos"]
        changed = (before != after).any(1)  # (patches,)
        assert torch.equal(after[changed], torch.zeros_like(after[changed]))
        assert torch.equal(after[~changed], before[~changed])
        start = 0
        for n in batch["video_grid_thw"].prod(-1).tolist():
            assert int(changed[start : start + n].sum()) == round(rho * n)
            start += n
    assert torch.equal(
        data.mask_modality(batch, "video", seed=3)["pixel_values_videos"],
        data.mask_modality(batch, "video", seed=3)["pixel_values_videos"],
    )
    assert not torch.equal(
        data.mask_modality(batch, "video", rho=0.5, seed=3)["pixel_values_videos"],
        data.mask_modality(batch, "video", rho=0.5, seed=4)["pixel_values_videos"],
    )
    assert (data.mask_modality(batch, "video", rho=1.0)["pixel_values_videos"] == 0).all()


def test_audio_mask_zeroes_rho_of_each_clips_valid_frames_and_nothing_else(batch):
    masked = data.mask_modality(batch, "audio", rho=0.9, seed=0)
    for key in batch:
        if key != "input_features":
            assert masked[key] is batch[key]
    before, after = batch["input_features"], masked["input_features"]  # (Ba, mels, T)
    for i, valid in enumerate(batch["feature_attention_mask"].bool()):
        changed = (before[i] != after[i]).any(0)  # (T,)
        assert not changed[~valid].any() and int(changed.sum()) == round(0.9 * int(valid.sum()))
        assert (after[i][:, changed] == 0).all() and torch.equal(
            after[i][:, ~changed], before[i][:, ~changed]
        )
    blank = data.mask_modality(batch, "audio", rho=1.0)["input_features"]
    assert (blank.permute(0, 2, 1)[batch["feature_attention_mask"].bool()] == 0).all()
    with pytest.raises(ValueError, match="modality"):
        data.mask_modality(batch, "text")


def test_the_thinker_runs_on_full_and_masked_batches(batch, policy):
    thinker, processor = policy
    with torch.no_grad():
        full = thinker(**batch, use_audio_in_video=False).logits[:, -1]  # (B, V)
        no_v = thinker(
            **data.mask_modality(batch, "video", rho=1.0), use_audio_in_video=False
        ).logits[:, -1]
        no_a = thinker(
            **data.mask_modality(batch, "audio", rho=1.0), use_audio_in_video=False
        ).logits[:, -1]
        out = thinker.generate(**batch, use_audio_in_video=False, max_new_tokens=3, do_sample=False)
    assert torch.isfinite(full).all() and out.shape == (4, batch["input_ids"].shape[1] + 3)
    has_video = [0, 2, 3]  # the chosen clips: face+voice, voice only, face only, face+voice
    has_audio = [0, 1, 3]
    assert not torch.allclose(full[has_video], no_v[has_video]) and torch.allclose(full[1], no_v[1])
    assert not torch.allclose(full[has_audio], no_a[has_audio]) and torch.allclose(full[2], no_a[2])


# ---------------------------------------------------------------- CLI
def test_cli_checks_a_manifest_and_documents_generator_and_loader(world, capsys):
    out, recs = world
    data.main(["--check", str(out / "train.jsonl")])
    text = capsys.readouterr().out
    assert (
        "24 records, 0 skipped" in text
        and "scenarios:" in text
        and f"{recs[0]['id']}: video" in text
    )
    with pytest.raises(SystemExit):
        data.main(["--help"])
    text = capsys.readouterr().out
    assert "--check" in text and "--make-world" in text and "synth.py" in text
