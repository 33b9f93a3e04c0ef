"""Non-finite numbers never end a run silently (runtime/health.py): a NaN reward part skips the
OPPO step with the clip and the part named, a non-finite loss skips the step with its clips
named, and a stage that skipped most of its steps is neither exported nor reported. Audio that
is not finite never reaches training: tests/test_manifest_fields.py.

The runs are in this process on the session's world, OPPO straight from the tiny thinker.
"""

import math

import pytest
from train_runs import read_log, run_args, run_inprocess, steps

import data
import reward
import train

pytest_plugins = ["train_runs"]
# DCP read and written in one process
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def oppo_run(tiny_dir, synth_dir, out, **over):
    kw = dict(stages="oppo", steps=3, save_every=100, eval_every=0, eval_limit=1)
    return run_args(tiny_dir, synth_dir, out, **{**kw, **over})


def nan_rewards(on_calls):
    """reward.compute_rewards with row 0's op_visual part (and so its total) made NaN on the
    calls numbered in `on_calls` (from 1); the ids of row 0's clips, by call."""
    compute = reward.compute_rewards
    seen = {"calls": 0, "ids": []}

    def patched(completions, records, *args, **kwargs):
        total, parts = compute(completions, records, *args, **kwargs)
        seen["calls"] += 1
        if seen["calls"] in on_calls:
            parts["op_visual"][0] = math.nan
            total[0] = math.nan
            seen["ids"].append(records[0]["id"])
        return total, parts

    return patched, seen


def test_a_nan_reward_skips_the_step_naming_the_clip_and_the_part(
    tiny_dir, synth_dir, matcher, tmp_path, monkeypatch, capsys
):
    patched, seen = nan_rewards({2})
    monkeypatch.setattr(reward, "compute_rewards", patched)
    out = tmp_path / "out"
    run_inprocess(matcher, **oppo_run(tiny_dir, synth_dir, out))
    lines = steps(read_log(out / "oppo" / "log.jsonl"))
    assert [ln["skipped"] for ln in lines] == [False, True, False]
    (clip,) = seen["ids"]
    reason = f"non-finite reward: clip {clip}: rewards/op_visual = nan"
    assert lines[1]["skip_reason"] == reason and "skip_reason" not in lines[0]
    assert f"oppo step 2 skipped, {reason}" in capsys.readouterr().err
    # one skipped step of three: the stage is exported and reported
    assert (out / "oppo" / "final" / "config.json").exists()
    assert (out / "test_report.json").exists()


def test_a_non_finite_loss_names_the_clips_of_its_step(tiny_dir, synth_dir, matcher, tmp_path):
    logprobs = train.scoring.logprobs
    seen = {"calls": 0}

    def nan_on_step_2(*args, **kwargs):
        seen["calls"] += 1
        logp = logprobs(*args, **kwargs)
        return logp * math.nan if seen["calls"] == 2 else logp

    out = tmp_path / "out"
    kw = run_args(tiny_dir, synth_dir, out, stages="sft", sft_steps=3, save_every=100, eval_limit=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train.scoring, "logprobs", nan_on_step_2)
        run_inprocess(matcher, **kw)
    lines = steps(read_log(out / "sft" / "log.jsonl"))
    assert [ln["skipped"] for ln in lines] == [False, True, False]
    records = data.load_manifest(synth_dir / "train.jsonl")
    # the clips of step 2 (index 1), as the loop draws them
    clips = [records[i]["id"] for i in train.clip_indices(len(records), 4, 1, 0, 0, 1)]
    assert lines[1]["skip_reason"] == f"non-finite loss or gradient on the clips {', '.join(clips)}"


def test_a_stage_that_skipped_most_steps_is_neither_exported_nor_reported(
    tiny_dir, synth_dir, matcher, tmp_path, monkeypatch
):
    patched, _ = nan_rewards({1, 2})
    monkeypatch.setattr(reward, "compute_rewards", patched)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as refused:
        run_inprocess(matcher, **oppo_run(tiny_dir, synth_dir, out))
    message = str(refused.value)
    assert message.startswith("train.py: oppo: 2 of 3 steps were skipped")
    assert str(out / "oppo" / "log.jsonl") in message
    assert not (out / "oppo" / "final").exists() and not (out / "test_report.json").exists()
    # the steps were run and checkpointed: nothing is lost
    assert [ln["skipped"] for ln in steps(read_log(out / "oppo" / "log.jsonl"))] == [
        True,
        True,
        False,
    ]
