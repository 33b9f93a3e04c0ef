"""Preemption (runtime/preempt.py): SIGTERM or SIGINT finishes the step in progress, checkpoints
it on every rank, releases the lock and exits 143 / 130; --resume then continues exactly.

`sigtermed` sends SIGTERM to a running train.py (the arguments of train_runs.ref, without the
periodic checkpoints) a few SFT steps in, then resumes it in this process: it must end exactly
as ref. Under torchrun a SIGTERM to one rank stops both at the same step.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_runs import (
    ENV,
    ROOT,
    SFT_STEPS,
    changed,
    cli,
    read_log,
    run_args,
    run_inprocess,
    state,
    steps,
    torchrun,
)

from runtime import checkpoint, preempt

pytest_plugins = ["train_runs"]
# DCP read and written in one process
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def logged_steps(log):
    """The steps a stage's log.jsonl holds so far (a line being written is not one)."""
    if not log.exists():
        return 0
    return sum(1 for line in log.read_text().splitlines(keepends=True) if line.endswith("\n"))


def signal_after(proc, log, n, signum, pid=None):
    """Send `signum` to `pid` (default: proc) once `log` holds n steps; proc's output."""
    deadline = time.monotonic() + 300
    while logged_steps(log) < n and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(pid or proc.pid, signum)
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    return out


@pytest.fixture(scope="module")
def sigtermed(tiny_dir, synth_dir, matcher, tmp_path_factory):
    """(out, the step the SIGTERM stopped at, the killed run's output), after the resume."""
    out = tmp_path_factory.mktemp("sigterm")
    # save_every is exempt: the only checkpoint before the last is the one the signal makes
    kw = run_args(tiny_dir, synth_dir, out, save_every=100)
    proc = subprocess.Popen(
        [sys.executable, "train.py", *cli(kw)],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output = signal_after(proc, out / "sft" / "log.jsonl", 2, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    stopped = logged_steps(out / "sft" / "log.jsonl")
    assert 2 <= stopped < SFT_STEPS, output[-3000:]
    assert checkpoint.latest(out / "sft" / "ckpt").name == f"step_{stopped:07d}"
    assert not (out / ".lock").exists() and not (out / "sft" / "final").exists()
    run_inprocess(matcher, **kw, resume=True)
    return out, stopped, output


def test_sigterm_checkpoints_the_step_and_the_resume_continues_exactly(ref, sigtermed):
    out, stopped, output = sigtermed
    assert f"SIGTERM: stopped after sft step {stopped}, checkpoint in " in output
    events = [ln for ln in read_log(out / "run.jsonl") if ln["event"] == "stopped"]
    assert [(ev["stage"], ev["after_step"], ev["signal"]) for ev in events] == [
        ("sft", stopped, "SIGTERM")
    ]
    lines = steps(read_log(out / "sft" / "log.jsonl"))
    # each step logged once: none lost, none twice
    assert [ln["step"] for ln in lines] == list(range(1, SFT_STEPS + 1))
    want = steps(read_log(ref / "sft" / "log.jsonl"))
    for key in ("loss", "grad_norm", "lr"):
        assert [ln[key] for ln in lines] == [ln[key] for ln in want], key
    assert not changed(state(ref / "sft" / "final"), state(out / "sft" / "final"))
    oppo = [(ln["loss"], ln["sample"]) for ln in steps(read_log(out / "oppo" / "log.jsonl"))]
    want = [(ln["loss"], ln["sample"]) for ln in steps(read_log(ref / "oppo" / "log.jsonl"))]
    assert oppo == want
    assert not changed(state(ref / "oppo" / "final"), state(out / "oppo" / "final"))


def test_sigint_in_a_step_finishes_it_and_outside_one_stops_at_once(group, tmp_path):
    """In a stage's loop SIGINT lets the step finish, checkpoints it and exits 130; outside the
    loop a signal ends the run at once; the handlers before the run come back after it."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    stage = tmp_path / "sft"
    finished = []
    before = {signum: signal.getsignal(signum) for signum in preempt.SIGNALS}
    with preempt.handled():
        with pytest.raises(SystemExit) as stopped:
            for step in preempt.deferred(range(5)):
                if step == 1:
                    os.kill(os.getpid(), signal.SIGINT)
                finished.append(step)
                preempt.stop_if_asked(stage, step + 1, model, optimizer)
        assert stopped.value.code == 130 and finished == [0, 1]
        assert checkpoint.latest(stage / "ckpt").name == "step_0000002"
        with pytest.raises(SystemExit) as at_once:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        assert at_once.value.code == 143
    assert {signum: signal.getsignal(signum) for signum in preempt.SIGNALS} == before


def worker(parent, rank):
    """The pid of torchrun's worker process of `rank` (a child of `parent`)."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            ppid = int(status.read_text().split("PPid:")[1].split()[0])
            environ = (status.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(status.parent.name)
    raise LookupError(f"no rank {rank} under pid {parent}")


def test_under_torchrun_one_signalled_rank_stops_both_at_one_step(tiny_dir, synth_dir, tmp_path):
    out = tmp_path / "out"
    kw = run_args(tiny_dir, synth_dir, out, stages="sft", save_every=100, eval_limit=1)
    proc = torchrun("train.py", *cli(kw))
    log = out / "sft" / "log.jsonl"
    deadline = time.monotonic() + 300
    while logged_steps(log) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    output = signal_after(proc, log, 2, signal.SIGTERM, worker(proc.pid, 1))
    assert proc.returncode != 0
    stopped = logged_steps(log)
    assert 2 <= stopped < SFT_STEPS, output[-3000:]
    assert f"SIGTERM: stopped after sft step {stopped}" in output
    last = checkpoint.latest(out / "sft" / "ckpt")
    assert last.name == f"step_{stopped:07d}"
    for rank in (0, 1):
        extra = torch.load(last / f"extra_rank{rank}.pt", weights_only=False)
        assert extra["step"] == stopped
    assert not (out / ".lock").exists()
