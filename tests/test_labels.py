"""Label spaces (corpora/labels.py) as the accuracy reward, the SFT targets and every recognition
metric read them: a corpus's classes stay apart (MAFW's fear and anxiety), the built-in space
keeps the synthetic world's six labels exactly as before."""

import json

import pytest

import data
from corpora import labels, mafw, mer
from metrics import recognition
from reward import accuracy_reward, normalize_emotion


def test_the_builtin_space_folds_as_the_synthetic_world_needs():
    # fear, scared and anxious are the synthetic world's "worried"; joy is happy
    for word, label in [("anxious", "fear"), ("scared", "worried"), ("Joy!", "happy")]:
        assert accuracy_reward(word, label) == 1.0, (word, label)
    assert normalize_emotion("Fear") == "worried"
    assert labels.BUILTIN.classes == () and normalize_emotion("bittersweet") == "bittersweet"


def test_mafw_keeps_fear_and_anxiety_apart_in_the_reward_and_the_metrics():
    space = mafw.SPACE
    assert len(space.classes) == 11
    assert accuracy_reward("anxious", "fear", labels=space) == 0.0
    assert accuracy_reward("afraid", "fear", labels=space) == 1.0
    assert accuracy_reward("worried", "anxiety", labels=space) == 1.0
    assert accuracy_reward("happy", "happiness", labels=space) == 1.0
    preds = ["anxiety", "fear", "scared", "nervous"]
    gold = ["fear", "anxiety", "fear", "anxiety"]
    out = recognition.war_uar(preds, gold, space)
    # a swapped answer is wrong; a synonym of the right class is right
    assert out["recall"] == {"fear": 0.5, "anxiety": 0.5} and out["war"] == 0.5
    # the built-in space would fold all four into one class and score every answer right
    assert recognition.war_uar(preds, gold)["war"] == 1.0
    assert recognition.hit_rate(preds, gold, space=space) == (0.5, 4)
    assert recognition.valence("disappointed", space) == -1


def test_a_space_round_trips_through_its_file_and_names_conflicts(tmp_path):
    mafw.SPACE.write(tmp_path / "labels.json")
    loaded = labels.load(tmp_path / "labels.json")
    assert (loaded.classes, loaded.words, loaded.valence) == (
        mafw.SPACE.classes,
        mafw.SPACE.words,
        mafw.SPACE.valence,
    )
    spec = {
        "classes": ["fear", "anxiety"],
        "synonyms": {"fear": ["nervous"], "anxiety": ["nervous"]},
    }
    (tmp_path / "bad.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"bad.json: 'nervous' names both 'fear' and 'anxiety'"):
        labels.load(tmp_path / "bad.json")
    spec = {"classes": ["fear"], "synonyms": {"joy": ["glad"]}}
    (tmp_path / "bad.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="'joy', which is not a class"):
        labels.load(tmp_path / "bad.json")


def test_a_manifest_label_outside_a_closed_space_is_a_bad_line(tmp_path):
    lines = [
        {"id": "a", "label": "Worry"},
        {"id": "b", "label": "bittersweet"},
        {"id": "c", "label": ["joy", "sad"]},
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    loaded = data.load_manifest(path, labels=mer.SPACE)
    # labels are written as the space names them
    assert [r["label"] for r in loaded] == ["worried", ["happy", "sad"]]
    assert len(loaded.errors) == 1 and loaded.errors[0].startswith(f"{path}:2: label")
    assert "'bittersweet' is no class of the label space MER (6 classes)" in loaded.errors[0]
    # as written, without a space
    assert [r["label"] for r in data.load_manifest(path)][0] == "Worry"
