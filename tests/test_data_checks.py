"""data.py and media.py on bad data: every record that cannot enter training is refused at load
or by `data.py --check` with its file and line, never later inside training
(docs/method.md, section 8)."""

import codecs
import gzip
import json
import pickle
import re
import shutil
import warnings

import av
import numpy as np
import pytest
import soundfile as sf
import torch

import data
from thinker import batching, media, model

MIN = media.MIN_AUDIO_SAMPLES


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def full_clip(recs, into):
    """Copies of a world clip's video, audio and cache in `into`; a record naming them."""
    clip = next(r for r in recs if "video" in r and "audio" in r)
    for key, name in (("video", "v.mp4"), ("audio", "a.wav"), ("cache", "c.safetensors")):
        shutil.copy(clip[key], into / name)
    return {
        "id": "ok",
        "label": "sad",
        "video": "v.mp4",
        "audio": "a.wav",
        "cache": "c.safetensors",
    }


def write_faststart_mp4(path, frames):
    """An H.264 mp4 with its index (moov) at the front, as streaming encoders write them."""
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as box:
        stream = box.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            box.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        box.mux(stream.encode())


def failure_line(text, path, n):
    """The report line of `data.py --check` for manifest line n."""
    return next(line for line in text.splitlines() if line.strip().startswith(f"{path}:{n}: "))


# ---------------------------------------------------------------- --check decodes every record
def test_check_decodes_every_record_and_names_each_that_fails(manifest_world, tmp_path, capsys):
    _, recs = manifest_world
    ok = full_clip(recs, tmp_path)
    frames = media.decode_video(tmp_path / "v.mp4").numpy()
    write_faststart_mp4(tmp_path / "whole.mp4", frames)
    whole = (tmp_path / "whole.mp4").read_bytes()
    assert whole.index(b"moov") < whole.index(b"mdat")
    (tmp_path / "cut.mp4").write_bytes(whole[: len(whole) // 2])
    # a cache whose header is intact and whose tensors end in zeros; one whose header is garbage
    cache = (tmp_path / "c.safetensors").read_bytes()
    (tmp_path / "zeroed.safetensors").write_bytes(cache[:-5000] + bytes(5000))
    (tmp_path / "garbled.safetensors").write_bytes(b"garbage" + cache[7:])
    # a float wav holding a NaN
    sf.write(tmp_path / "nan.wav", np.array([0.1] * 400 + [np.nan], np.float32), 16000, "FLOAT")
    path = write_jsonl(
        tmp_path / "m.jsonl",
        [
            ok,
            {"id": "cut", "label": "sad", "video": "cut.mp4"},
            dict(ok, id="zeroed", cache="zeroed.safetensors"),
            dict(ok, id="garbled", cache="garbled.safetensors"),
            {"id": "nan", "label": "sad", "audio": "nan.wav"},
        ],
    )
    # The load reads headers (and float audio) only: the cut video and the zeroed cache pass it.
    loaded = data.load_manifest(path)
    assert [r["id"] for r in loaded] == ["ok", "cut", "zeroed"]
    garbled = tmp_path / "garbled.safetensors"
    assert len(loaded.errors) == 2
    assert loaded.errors[0].startswith(f"{path}:4: cache file {garbled} is corrupt")
    nan = tmp_path / "nan.wav"
    assert (
        loaded.errors[1]
        == f"{path}:5: audio of {nan} is not finite (NaN or infinity at sample 400)"
    )
    with pytest.raises(SystemExit) as stopped:
        data.main(["--check", str(path)])
    assert stopped.value.code == 1
    out, err = capsys.readouterr()
    assert f"{path}: 1 records, 4 skipped" in out and "decoding" in err
    cut = failure_line(out, path, 2)
    assert f"cannot decode {tmp_path / 'cut.mp4'} (record 'cut')" in cut
    zeroed = failure_line(out, path, 3)
    assert f"cache file {tmp_path / 'zeroed.safetensors'} (record 'zeroed') differ" in zeroed
    assert "corrupt" in failure_line(out, path, 4)
    assert f"audio of {nan} is not finite" in failure_line(out, path, 5)
    # A cache corrupted after the load stops training with its file, line and record named.
    (tmp_path / "c.safetensors").write_bytes(b"garbage" + cache[7:])
    with pytest.raises(data.DataError) as raised:
        media.load_media(loaded[0])
    assert str(raised.value).startswith(
        f"{path}:1: cannot decode {tmp_path / 'c.safetensors'} (record 'ok'): SafetensorError"
    )
    assert "\n" not in str(raised.value)


# ---------------------------------------------------------------- audio too short, too long
def test_audio_too_short_for_one_audio_token_is_refused(manifest_world, tiny_dir, tmp_path):
    _, recs = manifest_world
    thinker, processor = model.load_policy(tiny_dir)
    record = {"id": "x", "label": "sad", "subtitle": ""}

    def audio_tokens(samples):
        wave = 0.1 * torch.randn(samples, generator=torch.Generator().manual_seed(0))
        batch = batching.encode(processor, [record], [(None, wave)])
        return int((batch["input_ids"] == processor.audio_token_id).sum())

    # the minimum, by the processor itself: one sample fewer gives no audio token
    assert processor.feature_extractor.hop_length == media.HOP
    assert audio_tokens(MIN - 1) == 0 and audio_tokens(MIN) == 1
    # beside a video, the thinker runs on the shortest audio that is let in
    video = torch.zeros(8, 56, 56, 3, dtype=torch.uint8)
    batch = batching.encode(processor, [record], [(video, 0.1 * torch.ones(MIN))])
    with torch.no_grad():
        assert torch.isfinite(thinker(**batch, use_audio_in_video=False).logits).all()
    clip = full_clip(recs, tmp_path)
    sf.write(tmp_path / "short.wav", np.full(MIN - 1, 0.1, np.float32), 16000)
    sf.write(tmp_path / "least.wav", np.full(MIN, 0.1, np.float32), 16000)
    # at 8 kHz: 160 samples resample to 320, 161 to 322
    sf.write(tmp_path / "short8k.wav", np.full(160, 0.1, np.float32), 8000)
    sf.write(tmp_path / "least8k.wav", np.full(161, 0.1, np.float32), 8000)
    lines = [
        {"id": "beside_video", "label": "sad", "video": clip["video"], "audio": "short.wav"},
        {"id": "alone", "label": "sad", "audio": "short.wav"},
        {"id": "8k", "label": "sad", "audio": "short8k.wav"},
        {"id": "least", "label": "sad", "video": clip["video"], "audio": "least.wav"},
        {"id": "least8k", "label": "sad", "audio": "least8k.wav"},
    ]
    path = write_jsonl(tmp_path / "m.jsonl", lines)
    loaded = data.load_manifest(path)
    assert [r["id"] for r in loaded] == ["least", "least8k"] and len(loaded.errors) == 3
    short = tmp_path / "short.wav"
    assert loaded.errors[0] == (
        f"{path}:1: audio in {short} lasts 0.0200 s (320 samples at 16 kHz), shorter than the "
        f"0.0201 s (321 samples) that give one audio token"
    )
    assert loaded.errors[1].startswith(f"{path}:2: audio in {short} lasts 0.0200 s")
    assert "(320 samples at 16 kHz)" in loaded.errors[2]
    # unchecked at load, decoding refuses it with the same words
    unchecked = data.load_manifest(path, check_media=False)
    with pytest.raises(data.DataError, match=re.escape(f"{path}:2: cannot decode {short}")):
        media.load_media(unchecked[1])


def test_audio_longer_than_the_window_is_counted_with_one_warning(tiny_dir, tmp_path):
    _, processor = model.load_policy(tiny_dir)
    window = media.audio_window(processor)
    assert window == 2.0 == data.Args().audio_window
    # the processor keeps only the window: 2.5 s give the features of their first 2 s
    long_wave = torch.linspace(-0.5, 0.5, 40000)
    kept = processor.feature_extractor(long_wave.numpy(), sampling_rate=16000)["input_features"]
    first = processor.feature_extractor(long_wave[:32000].numpy(), sampling_rate=16000)
    assert np.array_equal(kept[0], first["input_features"][0])
    sf.write(tmp_path / "long.wav", long_wave.numpy(), 16000)
    sf.write(tmp_path / "fits.wav", long_wave[:32000].numpy(), 16000)
    lines = [{"id": str(i), "label": "sad", "audio": "long.wav"} for i in range(3)]
    lines.append({"id": "fits", "label": "sad", "audio": "fits.wav"})
    path = write_jsonl(tmp_path / "m.jsonl", lines)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = data.load_manifest(path, audio_window=window)
    assert len(loaded) == 4 and loaded.truncated_audio == 3
    assert [str(w.message) for w in caught] == [
        f"{path}: 3 of 4 records have audio longer than the processor's 2 s window; only their "
        "first 2 s are used"
    ]
    assert data.load_manifest(path).truncated_audio is None
    # data.py --check counts the decoded audio
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert data.check(path, audio_window=window).truncated_audio == 3


# ---------------------------------------------------------------- the manifest file itself
def test_empty_foreign_and_bom_manifests_give_one_line_errors(tmp_path):
    record = {"id": "a", "label": "sad", "subtitle": "café"}
    path = tmp_path / "m.jsonl"
    for content in (b"", b"\n  \n"):
        path.write_bytes(content)
        with pytest.raises(
            data.DataError, match=f"^{re.escape(str(path))}: the manifest is empty$"
        ):
            data.load_manifest(path)
    text = json.dumps(record, ensure_ascii=False) + "\n"
    path.write_bytes(codecs.BOM_UTF8 + text.encode() + text.replace('"a"', '"b"').encode())
    assert [r["id"] for r in data.load_manifest(path)] == ["a", "b"]
    # a Latin-1 line among UTF-8 ones
    path.write_bytes(text.encode() + text.replace('"a"', '"b"').encode("latin-1"))
    loaded = data.load_manifest(path)
    assert [r["id"] for r in loaded] == ["a"]
    column = text.index("é") + 1
    assert loaded.errors == [f"{path}:2: not UTF-8 text (byte 0xe9 at column {column})"]
    with pytest.raises(data.DataError, match=f"^{re.escape(str(path))}:2: not UTF-8"):
        data.load_manifest(path, on_error="raise")
    path.write_bytes(text.encode("utf-16"))
    with pytest.raises(data.DataError, match="UTF-16 or UTF-32 text, not UTF-8"):
        data.load_manifest(path)
    packed = tmp_path / "m.jsonl.gz"
    packed.write_bytes(gzip.compress(text.encode()))
    assert [r["id"] for r in data.load_manifest(packed)] == ["a"]
    packed.write_bytes(b"not gzip")
    with pytest.raises(data.DataError, match=f"^{re.escape(str(packed))}: cannot read"):
        data.load_manifest(packed)


# ---------------------------------------------------------------- text no tokenizer or metric takes
def test_lone_surrogates_and_blank_labels_or_cues_are_refused_with_the_field(tmp_path):
    good = {"id": "a", "label": "sad", "subtitle": "hi", "cues": {"visual": ["a frown"]}}
    lines = [
        json.dumps(good),
        json.dumps(dict(good, id="b", subtitle="bad \udcff end")),
        json.dumps(dict(good, id="c", cues={"visual": ["ok", "x\ud800"]})),
        json.dumps(dict(good, id="d", label="   ")),
        json.dumps(dict(good, id="e", label=[""])),
        json.dumps(dict(good, id="f", label=["happy", " "])),
        json.dumps(dict(good, id="g", label=[])),
        json.dumps(dict(good, id="h", cues={"acoustic": ["  "]})),
        json.dumps(dict(good, id="i", reasoning=["not", "text"])),
        json.dumps(dict(good, id="j", video=5)),
        # a surrogate pair is one emoji, and fine
        json.dumps(dict(good, id="k", subtitle="\ud83d\ude00")),
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    loaded = data.load_manifest(path)
    assert [r["id"] for r in loaded] == ["a", "k"] and loaded[1]["subtitle"] == "😀"
    expect = {
        2: "field subtitle holds a lone surrogate escape",
        3: "field cues.visual[1] holds a lone surrogate escape",
        4: "label '   ' is blank",
        5: "label [''] is blank",
        6: "label ['happy', ' '] is blank",
        7: "missing required field 'label'",
        8: "cue cues.acoustic[0] is blank",
        9: "reasoning must be a string",
        10: "video must be a path",
    }
    assert len(loaded.errors) == len(expect)
    for message, (n, why) in zip(loaded.errors, expect.items()):
        assert message.startswith(f"{path}:{n}: {why}"), message


def test_a_manifest_of_only_bad_lines_is_an_empty_manifest_with_every_error(tmp_path):
    lines = ["{", "[1]", json.dumps({"id": "a"}), "[" * 100000, json.dumps({"id": "b", "label": 5})]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines))
    loaded = data.load_manifest(path)
    assert loaded == [] and len(loaded.errors) == 5
    assert loaded.errors[3] == f"{path}:4: not JSON (nested too deeply)"
    # the errors travel with the records from rank 0 to the others
    copy = pickle.loads(pickle.dumps(loaded))
    assert isinstance(copy, data.Manifest) and copy.errors == loaded.errors
    assert copy.truncated_audio is None
