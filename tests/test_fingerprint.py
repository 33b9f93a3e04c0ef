"""A run records what data it read (runtime/fingerprint.py): --resume on a manifest rewritten
under the same path, or on media replaced or touched, refuses naming the manifest and what
changed, unless --allow_changed_data.

The runs are in this process on a copy of 8 lines of the session's train manifest, one of whose
clips has its media copied beside it, so that touching them leaves the session's world alone.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from train_runs import copy_manifest, read_log, run_args, run_inprocess

import data
from runtime import fingerprint

pytest_plugins = ["train_runs"]
# DCP read and written in one process
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def short_run(tiny_dir, synth_dir, out, train, **over):
    """Two SFT steps on `train`, the final evaluation on one clip."""
    kw = dict(stages="sft", sft_steps=2, save_every=1, eval_every=0, eval_limit=1, data=str(train))
    return run_args(tiny_dir, synth_dir, out, **{**kw, **over})


def own_media(train, n, into):
    """Line n of the manifest `train` rewritten to name copies of its media in `into`."""
    lines = train.read_text().splitlines()
    record = json.loads(lines[n - 1])
    for key in ("video", "audio", "cache"):
        if record.get(key):
            copy = into / f"{key}_{n}{Path(record[key]).suffix}"
            record[key] = str(shutil.copy2(record[key], copy))
    lines[n - 1] = json.dumps(record)
    train.write_text("\n".join(lines) + "\n")
    return record


def test_resume_on_changed_data_refuses_naming_the_manifest_and_the_change(
    tiny_dir, synth_dir, matcher, tmp_path, capsys
):
    train = copy_manifest(synth_dir / "train.jsonl", tmp_path / "train.jsonl", lines=8)
    # the first line whose clip has a video and an audio file
    lines = [json.loads(line) for line in train.read_text().splitlines()]
    n = next(i for i, r in enumerate(lines, 1) if r.get("video") and r.get("audio"))
    mine = own_media(train, n, tmp_path)
    out = tmp_path / "out"
    kw = short_run(tiny_dir, synth_dir, out, train)
    run_inprocess(matcher, **kw)
    recorded = json.loads((out / "data.json").read_text())["manifests"]
    assert set(recorded) == {"--data", "--test_data"}
    assert recorded["--data"]["sha256"] == hashlib.sha256(train.read_bytes()).hexdigest()
    assert len(recorded["--data"]["records"]) == 8
    # the same data: a resume goes on
    run_inprocess(matcher, **kw, resume=True)
    # another line keeps its id but now names another clip, and the copied video is rewritten
    lines = train.read_text().splitlines()
    k = 2 if n != 3 else 3
    other = json.loads(lines[7])
    lines[k] = json.dumps({**other, "id": json.loads(lines[k])["id"]})
    train.write_text("\n".join(lines) + "\n")
    with open(mine["video"], "ab") as video:
        video.write(b"\0")
    before = (out / "data.json").read_bytes()
    with pytest.raises(SystemExit) as refused:
        run_inprocess(matcher, **kw, resume=True)
    message = str(refused.value)
    assert f"--data {train}: 1 records changed, 0 added, 0 removed (of 8)" in message
    assert f"1 media files of 1 records changed size or modification time ({mine['video']})" in (
        message
    )
    assert "--allow_changed_data" in message
    assert (out / "data.json").read_bytes() == before
    # accepted: printed, logged, and recorded as the data the run goes on with
    run_inprocess(matcher, **kw, resume=True, allow_changed_data=True)
    assert "resumed on changed data (--allow_changed_data)" in capsys.readouterr().out
    event = [ln for ln in read_log(out / "run.jsonl") if ln["event"] == "changed_data"]
    assert len(event) == 1 and event[0]["manifests"]["--data"].startswith(f"{train}: 1 records")
    now = json.loads((out / "data.json").read_text())["manifests"]["--data"]
    assert now["sha256"] == hashlib.sha256(train.read_bytes()).hexdigest()


def test_a_touched_medium_or_a_record_added_is_a_change(manifest_world, tmp_path):
    """Unit level: the difference of two fingerprints names records added and removed, and a
    medium whose modification time moved although its bytes did not."""
    out, recs = manifest_world
    path = copy_manifest(out / "train.jsonl", tmp_path / "m.jsonl")

    def load():
        return data.load_manifest(path)

    first = fingerprint.fingerprint(path, load())
    assert fingerprint.difference(first, fingerprint.fingerprint(path, load()), load()) is None
    # the same bytes and modification time under another name: a changed line, not a medium
    cache = tmp_path / "c.safetensors"
    shutil.copy2(recs[0]["cache"], cache)
    lines = path.read_text().splitlines()
    record = json.loads(lines[0])
    lines[0] = json.dumps(dict(record, cache=str(cache)))
    lines.append(json.dumps(dict(record, id="extra")))
    path.write_text("\n".join(lines) + "\n")
    relinked = fingerprint.fingerprint(path, load())
    what = fingerprint.difference(first, relinked, load())
    assert what.startswith("1 records changed, 1 added, 0 removed (of 24)")
    os.utime(cache, ns=(0, 10**9))
    what = fingerprint.difference(relinked, fingerprint.fingerprint(path, load()), load())
    assert what == f"1 media files of 1 records changed size or modification time ({cache})"
