"""What fails at the start instead of late or deep: every flag's range, batches that do not split
over the ranks, folders that cannot be written (runtime/validate.py); a broken `latest` and a
checkpoint of another model shape (runtime/checkpoint.py); eval.py's plot format and clips past
the audio window; two runs building the synthetic world at once."""

import json
import os
import threading
import time

import numpy as np
import pytest
import soundfile as sf
import torch
from train_runs import copy_manifest, run_args, run_inprocess

import eval as evaluation
from runtime import checkpoint, config, eval_flags, parallel, rundir, validate
from synthetic import tiny, world
from thinker import model

pytest_plugins = ["train_runs"]
# DCP read and written in one process
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def short_run(tiny_dir, synth_dir, out, **over):
    kw = dict(stages="sft", sft_steps=1, eval_every=0, eval_limit=1)
    return run_args(tiny_dir, synth_dir, out, **{**kw, **over})


# ---------------------------------------------------------------- flags
BAD = {
    "save_every": 0,
    "frames": 0,
    "G": 1,
    "eval_limit": -1,
    "tau": 1.0,
    "theta": 0.0,
    "rho": 1.5,
    "clamp": 0.0,
    "eps_low": -0.1,
    "lr": 0.0,
    "top_p": float("nan"),
    "agg": "mean",
}


def test_flags_out_of_range_refuse_before_anything_runs(tiny_dir, synth_dir, matcher, tmp_path):
    out = tmp_path / "out"
    kw = short_run(tiny_dir, synth_dir, out, stages="sft,oppo", **BAD)
    with pytest.raises(SystemExit) as refused:
        run_inprocess(matcher, **kw)
    message = str(refused.value)
    assert message.startswith("train.py: flags that cannot run:")
    for flag, value in BAD.items():
        assert f"\n  --{flag} {value!r}: " in message, flag
    assert "--save_every 0: must be in [1, inf]" in message
    assert "--tau 1.0: must be in [0, 1)" in message
    assert "--G 1: the group advantage (Eq. 5) of a group of one completion is 0" in message
    assert not out.exists()


def test_batches_must_split_over_the_ranks(tmp_path):
    args = config.Args(profile="cpu", batch=3, sft_batch=6, out=str(tmp_path / "out"))
    config.apply_profile(args, torch.device("cpu"))
    found = validate.problems(args, world=2)
    assert "--batch 3: clips per step over all ranks, not divisible by 2" in found
    assert not any("--sft_batch" in problem for problem in found)
    args.sft_batch = 5
    assert "--sft_batch 5: clips per step over all ranks, not divisible by 2" in (
        validate.problems(args, world=2)
    )
    # a stage that does not run does not need its batch to split
    args.stages = "oppo"
    assert not any("--sft_batch" in p for p in validate.problems(args, world=2))
    args.batch = 4
    assert validate.problems(args, world=2) == []


def test_folders_that_cannot_be_written_refuse_at_the_start(tiny_dir, synth_dir, matcher, tmp_path):
    out = tmp_path / "out"
    (out / "sft").mkdir(parents=True)
    (out / "sft" / "ckpt").write_text("a file where the checkpoints go")
    with pytest.raises(SystemExit) as refused:
        run_inprocess(matcher, **short_run(tiny_dir, synth_dir, out))
    assert f"--out (sft checkpoints) {out / 'sft' / 'ckpt'}: " in str(refused.value)
    assert "is a file, not a folder" in str(refused.value)
    assert not (out / ".lock").exists()
    under_a_file = out / "sft" / "ckpt" / "run"
    assert validate.not_writable(under_a_file) == f"{out / 'sft' / 'ckpt'} is a file, not a folder"
    if os.geteuid() != 0:
        read_only = tmp_path / "read_only"
        read_only.mkdir(mode=0o555)
        assert "cannot write in" in validate.not_writable(read_only / "out")


# ---------------------------------------------------------------- checkpoints
def small_checkpoints(ckpt, steps):
    model_ = torch.nn.Linear(3, 2)
    optim = torch.optim.AdamW(model_.parameters())
    for step in steps:
        checkpoint.save(ckpt, step, model_, optim)
    return model_, optim


def test_an_empty_or_dangling_latest_falls_back_or_is_named(tmp_path):
    ckpt = tmp_path / "out" / "sft" / "ckpt"
    small_checkpoints(ckpt, (2, 4))
    # a save killed before its rename: never the one to fall back to
    (ckpt / "step_0000006.tmp").mkdir()
    for pointer in ("", "step_0000009"):
        (ckpt / "latest").write_text(pointer)
        with pytest.warns(UserWarning, match="resuming from .*step_0000004, the newest complete"):
            assert checkpoint.latest(ckpt) == ckpt / "step_0000004"
    for step in ("step_0000002", "step_0000004"):
        (ckpt / step / ".metadata").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="holds no complete checkpoint"):
        checkpoint.latest(ckpt)
    # rundir's check on --resume names it instead of an IndexError
    args = config.Args(out=str(tmp_path / "out"), resume=True, sft_steps=8)
    changes, problem = rundir.resume_changes(args, ["sft"])
    assert problem.startswith(f"--resume: {ckpt / 'latest'} names {ckpt / 'step_0000009'}")


def test_a_checkpoint_of_another_model_shape_is_named(
    tiny_dir, synth_dir, matcher, tmp_path_factory
):
    wider = tiny.build_tiny(tmp_path_factory.mktemp("wider") / "model", seed=0, size=2)
    out = tmp_path_factory.mktemp("shape")
    policy = model.load_policy(tiny_dir)[0]
    checkpoint.save(out / "sft" / "ckpt", 2, policy, torch.optim.AdamW(policy.parameters()))
    kw = short_run(tiny_dir, synth_dir, out, model=str(wider), sft_steps=4, resume=True)
    with pytest.raises(SystemExit) as refused:
        run_inprocess(matcher, **kw)
    message = str(refused.value)
    step = out / "sft" / "ckpt" / "step_0000002"
    assert message.startswith(
        f"train.py: --resume: {step} is a checkpoint of another model shape: "
    )
    assert " there and " in message and " in this model; resume with the --model" in message


# ---------------------------------------------------------------- eval.py
def test_eval_refuses_a_plot_format_before_evaluating(tiny_dir, synth_dir, monkeypatch, capsys):
    def never(args):
        raise AssertionError("evaluated before --plot was checked")

    monkeypatch.setattr(evaluation, "evaluate_model", never)
    argv = ["--model", str(tiny_dir), "--data", str(synth_dir / "test.jsonl"), "--plot", "x.xyz"]
    with pytest.raises(SystemExit):
        evaluation.main(argv)
    error = capsys.readouterr().err
    assert "--plot x.xyz has the extension .xyz, not one of " in error and "png" in error
    assert evaluation.report.unplottable("plot.svg") is None
    assert evaluation.report.unplottable("plot") is None


def test_eval_counts_and_prints_clips_past_the_audio_window(
    tiny_dir, synth_dir, tmp_path, monkeypatch, capsys
):
    long_wav = tmp_path / "long.wav"
    sf.write(long_wav, np.zeros(3 * 16000, dtype=np.float32), 16000)
    cut = {"audio": str(long_wav), "cache": None}
    test = copy_manifest(synth_dir / "test.jsonl", tmp_path / "test.jsonl", {2: cut}, 4)

    def evaluated(policy, processor, records, *args, **kwargs):
        return {"settings": {"n": len(records)}}

    monkeypatch.setattr(evaluation, "evaluate", evaluated)
    args = eval_flags.Args(model=str(tiny_dir), data=str(test))
    try:
        with pytest.warns(UserWarning, match="longer than the processor's 2 s window"):
            result = evaluation.evaluate_model(args)
    finally:
        parallel.dist.destroy_process_group()
    assert result["settings"]["truncated_audio"] == 1 and result["settings"]["n"] == 4
    assert f"--data {test}: 1 of 4 records have audio longer" in capsys.readouterr().out


# ---------------------------------------------------------------- the synthetic world
def test_two_runs_building_the_world_at_once_build_it_once(tmp_path, monkeypatch):
    made = []
    make = world.make_world

    def slow_make(*args, **kwargs):
        made.append(time.monotonic())
        # long enough for the other run to look for the world meanwhile
        time.sleep(1.0)
        return make(*args, **kwargs)

    monkeypatch.setattr(world, "make_world", slow_make)
    knobs = dict(n_train=6, n_val=2, n_test=2, workers=1)
    found = []

    def build():
        found.append(world.ensure_world(tmp_path, **knobs))

    runs = [threading.Thread(target=build) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert len(made) == 1 and len(found) == 2 and found[0] == found[1]
    assert json.loads((tmp_path / "world.json").read_text())["n_train"] == 6
