"""A manifest's keys and fields as a user writes them wrong (docs/method.md, section 8): a key
that misspells a known one is refused with the key it resembles, a record without any medium is
counted and makes `data.py --check` fail, and a field or media path of the wrong kind is refused
with its file and line, never passed on as text or as "not found"."""

import json
import os
import shutil

import av
import numpy as np
import pytest
import soundfile as sf

import data


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def clip(manifest_world, tmp_path):
    """A world clip's video and audio copied into tmp_path as v.mp4 and a.wav."""
    _, recs = manifest_world
    full = next(r for r in recs if "video" in r and "audio" in r)
    shutil.copy(full["video"], tmp_path / "v.mp4")
    shutil.copy(full["audio"], tmp_path / "a.wav")
    return {"id": "ok", "label": "sad", "video": "v.mp4", "audio": "a.wav"}


def test_misspelt_keys_are_refused_with_the_key_they_resemble(clip, tmp_path, capsys):
    path = write_jsonl(
        tmp_path / "m.jsonl",
        [
            clip,
            {"id": "a", "label": "sad", "video_path": "v.mp4", "audio_path": "a.wav"},
            {"id": "b", "lable": "sad", "audio": "a.wav"},
            {"id": "c", "label": "sad", "audio": "a.wav", "subtitles": "hello"},
            {"id": "d", "label": "sad", "audio": "a.wav", "cues": {"visaul": ["a frown"]}},
            # a key no code reads that resembles none: counted, not refused
            dict(clip, id="e", speaker="Ann"),
            # a known key present: its near namesake is another key, not a misspelling
            dict(clip, id="f", video_file="other.mp4"),
        ],
    )
    loaded = data.load_manifest(path)
    assert [r["id"] for r in loaded] == ["ok", "e", "f"]
    expect = {
        2: "unknown key 'video_path': did you mean 'video'?",
        3: "unknown key 'lable': did you mean 'label'?",
        4: "unknown key 'subtitles': did you mean 'subtitle'?",
        5: "unknown key 'cues.visaul': did you mean 'cues.visual'?",
    }
    assert len(loaded.errors) == len(expect)
    for message, (n, why) in zip(loaded.errors, expect.items()):
        assert message.startswith(f"{path}:{n}: {why}"), message
    assert loaded.unknown_keys == {"speaker": 1, "video_file": 1}
    with pytest.raises(SystemExit) as failed:
        data.main(["--check", str(path)])
    assert failed.value.code == 1
    out = capsys.readouterr().out
    assert "did you mean 'video'?" in out
    assert "keys no code reads: speaker (1 records), video_file (1 records)" in out


def test_records_without_any_medium_are_counted_and_fail_the_check(clip, tmp_path, capsys):
    text_only = {"id": "t", "label": "sad", "subtitle": "I am fine."}
    path = write_jsonl(tmp_path / "m.jsonl", [clip, text_only, dict(text_only, id="u")])
    with pytest.warns(UserWarning, match="2 of 3 records have neither video nor audio"):
        loaded = data.load_manifest(path)
    assert loaded.no_media == 2 and loaded.errors == []
    with pytest.raises(SystemExit) as failed:
        data.main(["--check", str(path)])
    assert failed.value.code == 1
    assert "records with neither video nor audio: 2" in capsys.readouterr().out
    # every record with a medium: the check passes
    path = write_jsonl(tmp_path / "ok.jsonl", [clip])
    data.main(["--check", str(path)])
    assert "records with neither video nor audio: 0" in capsys.readouterr().out


def test_fields_of_the_wrong_kind_are_refused_with_file_and_line(clip, tmp_path):
    lines = [
        clip,
        dict(clip, id="a", subtitle={"text": "hi"}),
        dict(clip, id="b", subtitle=["hi"]),
        dict(clip, id="c", cues={"visual": ["a frown", None]}),
        dict(clip, id="d", cues={"acoustic": [3]}),
        dict(clip, id="e", subtitle=None),
        dict(clip, id="f", subtitle=0),
    ]
    path = write_jsonl(tmp_path / "m.jsonl", lines)
    loaded = data.load_manifest(path)
    assert [r["id"] for r in loaded] == ["ok", "e"] and loaded[1]["subtitle"] == ""
    expect = {
        2: 'subtitle must be a string, got {"text": "hi"}',
        3: 'subtitle must be a string, got ["hi"]',
        4: "cue cues.visual[1] must be a string, got null",
        5: "cue cues.acoustic[0] must be a string, got 3",
        7: "subtitle must be a string, got 0",
    }
    assert loaded.errors == [f"{path}:{n}: {why}" for n, why in expect.items()]


def test_media_paths_that_are_no_file_are_named_precisely(clip, tmp_path):
    (tmp_path / "a_dir").mkdir()
    os.symlink("loop_b", tmp_path / "loop_a")
    os.symlink("loop_a", tmp_path / "loop_b")
    os.symlink("gone.mp4", tmp_path / "dangling.mp4")
    lines = [
        dict(clip, id="dir", video="a_dir"),
        dict(clip, id="loop", audio="loop_a"),
        dict(clip, id="dangling", video="dangling.mp4"),
        dict(clip, id="missing", video="nowhere.mp4"),
    ]
    path = write_jsonl(tmp_path / "m.jsonl", lines)
    loaded = data.load_manifest(path)
    assert loaded == []
    expect = [
        f"{path}:1: video file {tmp_path / 'a_dir'} is a directory, not a file",
        f"{path}:2: audio file {tmp_path / 'loop_a'} is a symbolic link loop",
        f"{path}:3: video file {tmp_path / 'dangling.mp4'} is a symbolic link to gone.mp4, "
        "which does not exist",
        f"{path}:4: video file {tmp_path / 'nowhere.mp4'} not found",
    ]
    assert loaded.errors == expect


def write_frameless_video(path):
    """A Matroska file whose video stream holds no frame (its audio track has 1 s of silence)."""
    with av.open(str(path), "w", format="matroska") as box:
        video = box.add_stream("mpeg4", rate=10)
        video.width, video.height, video.pix_fmt = 64, 64, "yuv420p"
        sound = box.add_stream("pcm_s16le", rate=16000, layout="mono")
        for start in range(0, 16000, 1000):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1000), np.int16), "s16", "mono")
            frame.sample_rate, frame.pts = 16000, start
            box.mux(sound.encode(frame))
        box.mux(sound.encode())


def test_a_video_without_frames_and_audio_that_is_not_finite_are_refused_at_load(clip, tmp_path):
    write_frameless_video(tmp_path / "empty.mkv")
    with av.open(str(tmp_path / "empty.mkv")) as box:
        assert len(box.streams.video) == 1
    wave = np.full(800, 0.1, np.float32)
    wave[500] = np.inf
    sf.write(tmp_path / "inf.wav", wave, 16000, "FLOAT")
    # an integer wav cannot hold NaN: it passes without being read
    sf.write(tmp_path / "pcm.wav", np.full(800, 0.1, np.float32), 16000, "PCM_16")
    lines = [
        dict(clip, id="empty", video="empty.mkv"),
        dict(clip, id="inf", audio="inf.wav"),
        dict(clip, id="pcm", audio="pcm.wav"),
    ]
    path = write_jsonl(tmp_path / "m.jsonl", lines)
    loaded = data.load_manifest(path)
    assert [r["id"] for r in loaded] == ["pcm"]
    assert loaded.errors == [
        f"{path}:1: video file {tmp_path / 'empty.mkv'} has no frames (its video stream holds "
        "no packet)",
        f"{path}:2: audio of {tmp_path / 'inf.wav'} is not finite (NaN or infinity at sample 500)",
    ]
