"""data.py: manifests and their bad lines, cue decomposition (cues.py), and the command line
(docs/method.md, section 8)."""

import json
import re
import shutil

import pytest

import data
from corpora.decompose import decompose_cues
from thinker import media


# ---------------------------------------------------------------- manifests
def test_load_manifest_resolves_paths_and_fills_every_field(manifest_world):
    out, recs = manifest_world
    assert len(recs) == 24 and recs.errors == []
    for n, r in enumerate(recs, 1):
        assert r["source"] == f"{out / 'train.jsonl'}:{n}"
        for key in ("video", "audio", "cache"):
            assert key not in r or (r[key].startswith(str(out)) and (out / r[key]).is_file())
        assert set(r["cues"]) == {"visual", "acoustic", "emotion"} and isinstance(
            r["subtitle"], str
        )


def test_bad_lines_are_reported_with_file_and_line_then_skipped_or_raised(manifest_world, tmp_path):
    out, recs = manifest_world
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
            media.load_media(unchecked[rid])
    with pytest.raises(data.DataError, match="manifest not found"):
        data.load_manifest(tmp_path / "nowhere.jsonl")


# ---------------------------------------------------------------- cue decomposition
def test_decomposition_recovers_the_synthetic_cues_and_reads_emer_style_text(manifest_world):
    _, recs = manifest_world
    for r in recs:
        cues = decompose_cues(r["reasoning"])
        assert cues["visual"] == r["cues"]["visual"] and cues["acoustic"] == r["cues"]["acoustic"]
        assert (
            cues["emotion"][:-1] == r["cues"]["emotion"][:-1] and r["label"] in cues["emotion"][-1]
        )
    text = (
        "In the video, the man frowns and looks down, and his hands are clenched. He seems tired. "
        "In the audio, his voice trembles; the tone is low. His face is pale. "
        "In the text, he says he lost his job. Overall, he feels sad, possibly hopeless."
    )
    assert decompose_cues(text) == {
        "visual": [
            "the man frowns and looks down",
            "his hands are clenched",
            "He seems tired",
            "His face is pale",
        ],
        "acoustic": ["his voice trembles", "the tone is low"],
        "emotion": ["he says he lost his job", "he feels sad", "possibly hopeless"],
    }
    assert decompose_cues("") == {"visual": [], "acoustic": [], "emotion": []}


# ---------------------------------------------------------------- CLI
def test_cli_checks_a_manifest_and_documents_generator_and_loader(manifest_world, capsys):
    out, recs = manifest_world
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
    assert "--check" in text and "--make-world" in text and "synthetic.world" in text
