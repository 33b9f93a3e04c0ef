"""What a run checks before its first step (preflight.py), and what eval.py checks before it
evaluates: bad manifest lines are counted and refuse the run beyond --max_bad_records; every
manifest the run reads is named and loaded at the start; SFT targets beyond the model's positions
refuse the run; a result that cannot be written is refused before the work that makes it.

The runs are in this process (train_runs.run_inprocess) on copies of the session's synthetic
manifests; a refused run stops before it loads the model.
"""

import json

import pytest
from train_runs import copy_manifest, read_log, run_args, run_inprocess

import eval as evaluation
from metrics import report
from runtime import config, parallel, preflight

pytest_plugins = ["train_runs"]
# DCP read and written in one process
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
MISSING = {"video": "/nonexistent/clip.mp4"}


def short_run(tiny_dir, synth_dir, out, **over):
    """One SFT step, the final evaluation on one clip."""
    kw = dict(stages="sft", sft_steps=1, eval_every=0, eval_limit=1)
    return run_args(tiny_dir, synth_dir, out, **{**kw, **over})


# ---------------------------------------------------------------- 1. bad manifest lines
def test_bad_lines_refuse_the_run_naming_the_manifest_and_lines(
    tiny_dir, synth_dir, matcher, tmp_path
):
    train = copy_manifest(
        synth_dir / "train.jsonl", tmp_path / "train.jsonl", {2: MISSING, 4: "{bad", 5: MISSING}, 8
    )
    kw = short_run(tiny_dir, synth_dir, tmp_path / "out", data=str(train))
    with pytest.raises(SystemExit) as refused:
        run_inprocess(matcher, **kw)
    message = str(refused.value)
    assert f"--data {train}: 3 lines skipped, more than --max_bad_records 0" in message
    for line in (2, 4, 5):
        assert f"{train}:{line}: " in message
    assert "--max_bad_records 3" in message
    assert not (tmp_path / "out" / "sft").exists()


def test_skipped_lines_are_printed_logged_and_reported(
    tiny_dir, synth_dir, matcher, tmp_path, capsys
):
    train = copy_manifest(synth_dir / "train.jsonl", tmp_path / "train.jsonl", {3: MISSING}, 8)
    test = copy_manifest(synth_dir / "test.jsonl", tmp_path / "test.jsonl", {1: MISSING}, 4)
    out = tmp_path / "out"
    kw = short_run(tiny_dir, synth_dir, out, data=str(train), test_data=str(test))
    run_inprocess(matcher, **kw, max_bad_records=1)
    printed = capsys.readouterr().out
    assert f"--data {train}: 7 records, 1 lines skipped\n  {train}:3: " in printed
    assert f"--test_data {test}: 3 records, 1 lines skipped\n  {test}:1: " in printed
    start, stage = read_log(out / "run.jsonl")
    counts = start["manifests"]
    assert (counts["train"]["records"], counts["train"]["skipped"]) == (7, 1)
    assert counts["train"]["errors"][0].startswith(f"{train}:3: ")
    assert (stage["stage"], stage["records"], stage["skipped"]) == ("sft", 7, 1)
    reported = json.loads((out / "test_report.json").read_text())["manifests"]
    assert reported == counts
    assert (reported["test"]["records"], reported["test"]["skipped"]) == (3, 1)
    assert reported["test"]["evaluated"] == 1


def test_a_manifest_without_a_good_line_refuses_clearly(tiny_dir, synth_dir, matcher, tmp_path):
    bad = {n: MISSING for n in range(1, 5)}
    train = copy_manifest(synth_dir / "train.jsonl", tmp_path / "train.jsonl", bad, 4)
    kw = short_run(tiny_dir, synth_dir, tmp_path / "out", data=str(train))
    with pytest.raises(SystemExit, match="no usable record, every line skipped") as refused:
        run_inprocess(matcher, **kw)
    assert f"--data {train}" in str(refused.value) and f"{train}:1: " in str(refused.value)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    kw = short_run(tiny_dir, synth_dir, tmp_path / "out", test_data=str(empty))
    with pytest.raises(SystemExit, match=f"--test_data: {empty}: the manifest is empty"):
        run_inprocess(matcher, **kw)


# ---------------------------------------------------------------- 8. every manifest, at the start
@pytest.mark.parametrize("flag", ["test_data", "val_data"])
def test_data_without_the_other_manifests_refuses_at_the_start(
    flag, tiny_dir, synth_dir, matcher, tmp_path
):
    kw = short_run(tiny_dir, synth_dir, tmp_path / "out", eval_every=1, **{flag: ""})
    with pytest.raises(SystemExit, match=f"with --data, give --{flag} "):
        run_inprocess(matcher, **kw)
    assert not (tmp_path / "out").exists()
    # a manifest that is not there is found before the first step too
    kw = short_run(tiny_dir, synth_dir, tmp_path / "out", eval_every=1, **{flag: "nowhere.jsonl"})
    with pytest.raises(SystemExit, match=f"--{flag}: nowhere.jsonl: manifest not found"):
        run_inprocess(matcher, **kw)
    assert not (tmp_path / "out" / "sft").exists()


def test_help_and_defaults_of_the_manifests_agree():
    fields = config.Args.__dataclass_fields__
    for flag in ("val_data", "test_data"):
        assert "required with --data" in fields[flag].metadata["help"]
    # without --data, a manifest given is used; the others are the synthetic world's
    from runtime import preflight

    parallel.init()
    try:
        args = config.Args(data="", test_data="mine.jsonl", model="a model")
        preflight.default_assets(args, master=False)
    finally:
        parallel.dist.destroy_process_group()
    assert (args.data, args.test_data) == ("runs/synth/train.jsonl", "mine.jsonl")


# ---------------------------------------------------------------- 11. the position limit
def test_a_target_beyond_the_position_limit_refuses_before_the_first_step(
    tiny_dir, synth_dir, matcher, tmp_path
):
    """The tiny thinker has 4,096 positions; a reasoning of ~6,000 tokens cannot be trained on."""
    long = {"reasoning": "The brow is furrowed and the voice trembles. " * 700}
    train = copy_manifest(synth_dir / "train.jsonl", tmp_path / "train.jsonl", {2: long}, 8)
    kw = short_run(tiny_dir, synth_dir, tmp_path / "out", data=str(train))
    with pytest.raises(SystemExit, match="more positions than the model's 4096") as refused:
        run_inprocess(matcher, **kw)
    assert f"{train}:2: " in str(refused.value) and f"{train}:1: " not in str(refused.value)
    assert not (tmp_path / "out" / "sft" / "ckpt").exists()


def test_every_prompt_beyond_the_position_limit_refuses_whatever_the_stage(
    tiny_dir, synth_dir, matcher, tmp_path
):
    """--stages oppo: a subtitle of ~6,000 tokens on a train line, then on an evaluated test
    line, cannot be sampled from (prompt and --max_new_tokens)."""
    long = {"subtitle": "The brow is furrowed and the voice trembles. " * 700}
    train = copy_manifest(synth_dir / "train.jsonl", tmp_path / "train.jsonl", {2: long}, 8)
    out = tmp_path / "out"
    kw = short_run(tiny_dir, synth_dir, out, data=str(train), stages="oppo", steps=1)
    with pytest.raises(SystemExit, match="more positions than the model's 4096") as refused:
        run_inprocess(matcher, **kw)
    message = str(refused.value)
    assert message.startswith("train.py: --data: 1 records need") and "to sample from" in message
    assert f"{train}:2: " in message and "+ 8 sampled (--max_new_tokens)" in message
    assert not (out / "oppo" / "ckpt").exists()
    test = copy_manifest(synth_dir / "test.jsonl", tmp_path / "test.jsonl", {1: long}, 4)
    kw = short_run(tiny_dir, synth_dir, out, test_data=str(test), stages="oppo", steps=1)
    with pytest.raises(SystemExit, match="--test_data: 1 records need more positions") as refused:
        run_inprocess(matcher, **kw)
    assert f"{test}:1: " in str(refused.value)
    assert not (out / "oppo" / "ckpt").exists()


# ---------------------------------------------------------------- 4. results that can be written
def test_eval_refuses_an_out_it_cannot_write_before_evaluating(
    tiny_dir, synth_dir, tmp_path, monkeypatch, capsys
):
    def never(args):
        raise AssertionError("evaluated before --out was checked")

    monkeypatch.setattr(evaluation, "evaluate_model", never)
    (tmp_path / "a_file").write_text("")
    cases = {tmp_path: "is a directory", tmp_path / "a_file" / "r.json": "is a file, not a folder"}
    for out, why in cases.items():
        argv = [
            "--model",
            str(tiny_dir),
            "--data",
            str(synth_dir / "test.jsonl"),
            "--out",
            str(out),
        ]
        with pytest.raises(SystemExit):
            evaluation.main(argv)
        error = capsys.readouterr().err
        assert f"--out {out} " in error and why in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_a_failed_report_write_leaves_no_tmp_and_the_table_printed(
    tiny_dir, synth_dir, tmp_path, monkeypatch, capsys
):
    def evaluated(args):
        return {"metrics": {"war": 0.625}}

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluation, "evaluate_model", evaluated)
    out = tmp_path / "r.json"
    argv = ["--model", str(tiny_dir), "--data", str(synth_dir / "test.jsonl"), "--out", str(out)]
    with monkeypatch.context() as mp:
        mp.setattr(report.os, "replace", disk_full)
        with pytest.raises(OSError, match="No space left"):
            evaluation.main(argv)
    assert "| war | 0.625 |" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_audio_longer_than_the_processor_keeps_is_counted_and_printed(
    tiny_dir, synth_dir, tmp_path, capsys
):
    import numpy as np
    import soundfile

    # the tiny thinker's processor keeps 2 s of audio: a 3 s record is cut
    long_wav = tmp_path / "long.wav"
    soundfile.write(long_wav, np.zeros(3 * 16000, dtype=np.float32), 16000)
    cut = {"audio": str(long_wav), "cache": None}
    train = copy_manifest(synth_dir / "train.jsonl", tmp_path / "train.jsonl", {2: cut}, 6)
    kw = short_run(tiny_dir, synth_dir, tmp_path / "out", data=str(train))
    args = config.Args(**kw)
    with pytest.warns(UserWarning, match="longer than the processor's 2 s window"):
        manifests, problem = preflight._load(args)
    assert problem is None
    assert manifests["train"].truncated_audio == 1
    assert (
        "6 records, 0 lines skipped, 1 with audio cut to the first 2 s" in capsys.readouterr().out
    )
    assert preflight.summary(args, manifests)["train"]["truncated_audio"] == 1
