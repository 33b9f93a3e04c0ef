"""A run's output directory (rundir.py): one run at a time, and a --resume that refuses arguments
other than those a stage started with, unless --allow_changed_args.

`six_steps` is train_runs.ref's SFT stopped at step 6: resumed to step 8 with
--allow_changed_args, it must end exactly as ref's SFT.
"""

import json
import os
import shutil
import signal
import time

import pytest
from train_runs import (
    SFT_STEPS,
    changed,
    cli,
    read_log,
    run_args,
    run_inprocess,
    start,
    state,
    steps,
)

pytest_plugins = ["train_runs"]
# DCP read and written in one process
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


# ---------------------------------------------------------------- 2. the lock
def test_one_run_at_a_time_in_an_out_directory(tiny_dir, synth_dir, matcher, tmp_path, capsys):
    """A run on the --out of a running one refuses, naming it; once that one is killed, its lock
    is taken over by the next run, which removes it at its end."""
    out = tmp_path / "out"
    kw = run_args(tiny_dir, synth_dir, out, stages="sft", sft_steps=1, eval_limit=1)
    running = start("train.py", *cli({**kw, "sft_steps": 100000, "save_every": 100000}))
    try:
        deadline = time.monotonic() + 240
        while not (out / "sft" / "log.jsonl").exists() and time.monotonic() < deadline:
            assert running.poll() is None, running.stdout.read()[-3000:]
            time.sleep(0.05)
        with pytest.raises(SystemExit) as refused:
            run_inprocess(matcher, **kw)
    finally:
        os.killpg(running.pid, signal.SIGKILL)
        running.communicate()
    held = f"(pid {running.pid} on host "
    assert f"--out {out} is in use by another run {held}" in str(refused.value)
    run_inprocess(matcher, **kw)
    assert f"left by a run that ended without removing it {held}" in capsys.readouterr().out
    assert not (out / ".lock").exists()
    assert [ln["step"] for ln in steps(read_log(out / "sft" / "log.jsonl"))] == [1]


# ---------------------------------------------------------------- 3. the arguments of a stage
@pytest.fixture(scope="module")
def six_steps(tiny_dir, synth_dir, matcher, tmp_path_factory):
    out = tmp_path_factory.mktemp("six_steps")
    run_inprocess(matcher, **run_args(tiny_dir, synth_dir, out, stages="sft", sft_steps=6))
    return out


def test_resume_with_other_arguments_refuses_naming_each(
    six_steps, tiny_dir, synth_dir, matcher, tmp_path
):
    out = tmp_path / "out"
    shutil.copytree(six_steps, out)
    log = (out / "sft" / "log.jsonl").read_bytes()
    recorded = json.loads((out / "sft" / "args.json").read_text())
    assert (recorded["sft_steps"], recorded["sft_lr"], recorded["seed"]) == (6, 0.01, 0)
    kw = run_args(tiny_dir, synth_dir, out, stages="sft", resume=True, seed=1, sft_lr=0.02)
    with pytest.raises(SystemExit) as refused:
        run_inprocess(matcher, **kw)
    message = str(refused.value)
    for change in ("--sft_steps 6 -> 8", "--sft_lr 0.01 -> 0.02", "--seed 0 -> 1"):
        assert f"sft: {change}" in message
    assert "--allow_changed_args" in message and "eval_limit" not in message
    # a stage cannot go back, allowed or not
    kw = run_args(tiny_dir, synth_dir, out, stages="sft", resume=True, sft_steps=4)
    with pytest.raises(SystemExit, match="at step 6, beyond the 4 steps"):
        run_inprocess(matcher, **kw, allow_changed_args=True)
    assert (out / "sft" / "log.jsonl").read_bytes() == log


def test_more_steps_allowed_continue_a_finished_stage_exactly(
    ref, six_steps, tiny_dir, synth_dir, matcher, tmp_path, capsys
):
    out = tmp_path / "out"
    shutil.copytree(six_steps, out)
    # save_every and eval_limit are exempt: they never change the weights
    kw = run_args(tiny_dir, synth_dir, out, stages="sft", resume=True, save_every=4, eval_limit=1)
    run_inprocess(matcher, **kw, allow_changed_args=True)
    assert "sft: --sft_steps 6 -> 8" in capsys.readouterr().out
    lines = steps(read_log(out / "sft" / "log.jsonl"))
    assert [ln["step"] for ln in lines] == list(range(1, SFT_STEPS + 1))
    want = steps(read_log(ref / "sft" / "log.jsonl"))
    for key in ("loss", "grad_norm", "lr"):
        assert [ln[key] for ln in lines] == [ln[key] for ln in want], key
    assert not changed(state(ref / "sft" / "final"), state(out / "sft" / "final"))
    events = [ln for ln in read_log(out / "run.jsonl") if ln["event"] == "stage"]
    assert [ev["start"] for ev in events] == [0, 6]
    assert events[1]["changed_args"] == {"sft_steps": [6, SFT_STEPS]}
    assert json.loads((out / "sft" / "args.json").read_text())["sft_steps"] == SFT_STEPS
