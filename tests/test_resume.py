"""Kill and resume: sharded checkpoints that survive a SIGKILL, in one process and in two.

`resumed` kills a run (the arguments of train_runs.ref, as a subprocess) after its first
checkpoint and resumes it in-process; `fsdp_resumed` resumes the step-6 checkpoint of
train_runs.fsdp with 2 processes. Both must continue exactly as the runs they copy.
"""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from train_runs import (
    ENV,
    ROOT,
    SFT_STEPS,
    changed,
    cli,
    finish,
    read_log,
    run_args,
    run_inprocess,
    state,
    steps,
    torchrun,
)

from runtime import checkpoint, logs

pytest_plugins = ["train_runs"]
# DCP read and written in one process
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture(scope="module")
def fsdp_resumed(fsdp, tiny_dir, synth_dir, tmp_path_factory):
    """The 2-process run's sharded checkpoint of step SFT_STEPS - 2 (kept: keep=2), resumed by
    2 processes."""
    out = tmp_path_factory.mktemp("fsdp_resumed")
    step = f"step_{SFT_STEPS - 2:07d}"
    shutil.copytree(fsdp / "sft" / "ckpt" / step, out / "sft" / "ckpt" / step)
    (out / "sft" / "ckpt" / "latest").write_text(step)
    kw = run_args(tiny_dir, synth_dir, out, stages="sft", resume=True)
    finish(torchrun("train.py", *cli(kw)))
    return out


@pytest.fixture(scope="module")
def resumed(tiny_dir, synth_dir, matcher, tmp_path_factory):
    """Kill a run (SIGKILL) once `latest` names a checkpoint, leave a half-written later save
    behind, then resume with the same arguments. Returns (out, checkpoint step, log lines
    before)."""
    out = tmp_path_factory.mktemp("killed")
    kw = run_args(tiny_dir, synth_dir, out)
    ckpt = out / "sft" / "ckpt"
    with open(out / "stderr.txt", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "train.py", *cli(kw)],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        deadline = time.monotonic() + 300
        while not (ckpt / "latest").exists():
            if proc.poll() is not None or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    stderr = (out / "stderr.txt").read_text()[-3000:]
    why = f"the run ended by itself ({proc.returncode}), not by the kill:\n{stderr}"
    assert proc.returncode == -signal.SIGKILL, why
    assert not (out / "sft" / "final").exists()
    step = int(checkpoint.latest(ckpt).name.split("_")[1])
    assert 2 <= step < SFT_STEPS
    # a save killed mid-write: a later step's .tmp with a corrupt DCP metadata file, and a pointer
    # file that never got renamed onto `latest`
    tmp = ckpt / f"step_{step + 2:07d}.tmp"
    tmp.mkdir(exist_ok=True)
    (tmp / ".metadata").write_bytes(b"half a checkpoint")
    (ckpt / "latest.tmp").write_text(tmp.name)
    assert checkpoint.latest(ckpt).name == f"step_{step:07d}"
    before = len(steps(read_log(out / "sft" / "log.jsonl")))
    run_inprocess(matcher, **kw, resume=True)
    return out, step, before


# ---------------------------------------------------------------- the tests
def test_resume_after_sigkill_continues_exactly(ref, resumed):
    out, step, before = resumed
    # the killed run logged its steps up to the checkpoint, maybe beyond it
    assert before >= step
    lines = steps(read_log(out / "sft" / "log.jsonl"))
    # each step logged once: none lost, none twice
    assert [ln["step"] for ln in lines] == list(range(1, SFT_STEPS + 1))
    new, want = lines[step:], steps(read_log(ref / "sft" / "log.jsonl"))[step:]
    for key in ("loss", "grad_norm", "lr"):
        assert [ln[key] for ln in new] == [ln[key] for ln in want], key
    assert not changed(state(ref / "sft" / "final"), state(out / "sft" / "final"))
    # the OPPO stage after it starts from the same weights and RNG: same samples, same losses
    oppo = [(ln["loss"], ln["sample"]) for ln in steps(read_log(out / "oppo" / "log.jsonl"))]
    want = [(ln["loss"], ln["sample"]) for ln in steps(read_log(ref / "oppo" / "log.jsonl"))]
    assert oppo == want


def test_resume_trims_the_log_to_the_checkpoint(tmp_path):
    """Steps after the checkpoint run again on resume, so their old lines go, and so does a line
    cut off by the kill; everything else stays, byte for byte."""
    log = tmp_path / "log.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)]
    lines.insert(3, json.dumps({"step": 3, "eval": {"war": 0.5}}) + "\n")
    log.write_text("".join(lines) + '{"step": 6, "lo')
    logs.trim_log(log, 3)
    assert log.read_text() == "".join(lines[:4])
    # a first run has no log yet
    logs.trim_log(tmp_path / "absent.jsonl", 3)
    assert not (tmp_path / "absent.jsonl").exists() and not list(tmp_path.glob("*.tmp"))


def test_two_fsdp_processes_resume_exactly(fsdp, fsdp_resumed):
    """Sharded model and optimizer state and per-rank RNG, read back by the 2 ranks (the last step
    has a rank without video: thinker.encoders.encode_media's blank tower)."""
    new = steps(read_log(fsdp_resumed / "sft" / "log.jsonl"))
    want = steps(read_log(fsdp / "sft" / "log.jsonl"))
    assert [ln["step"] for ln in new] == [SFT_STEPS - 1, SFT_STEPS]
    got = [(ln["loss"], ln["grad_norm"]) for ln in new]
    assert got == [(ln["loss"], ln["grad_norm"]) for ln in want[-2:]]
    assert not changed(state(fsdp / "sft" / "final"), state(fsdp_resumed / "sft" / "final"))


def test_a_killed_save_never_becomes_the_checkpoint(tmp_path, monkeypatch):
    """A kill between the shards and the rename: `latest` keeps naming the previous step, whose
    weights and optimizer state load back; the next save replaces the stale .tmp, and old
    checkpoints are pruned. A parameter that never had a gradient has no optimizer state, before
    and after the load."""
    model = torch.nn.ModuleDict({"used": torch.nn.Linear(3, 2), "unused": torch.nn.Linear(2, 2)})
    optim = torch.optim.AdamW(model.parameters(), lr=0.1)
    model["used"](torch.ones(1, 3)).sum().backward()
    optim.step()
    checkpoint.save(tmp_path, 2, model, optim)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [optim.state[p]["exp_avg"].clone() for p in model["used"].parameters()]
    with torch.no_grad():
        model["used"].weight.add_(1.0)
    # as a resumed run builds it
    model.zero_grad(set_to_none=True)
    optim = torch.optim.AdamW(model.parameters(), lr=0.1)

    def killed(*args):
        raise KeyboardInterrupt("killed before the rename")

    with monkeypatch.context() as mp:
        mp.setattr(checkpoint.os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            checkpoint.save(tmp_path, 4, model, optim)
    assert (tmp_path / "step_0000004.tmp").is_dir()
    assert checkpoint.latest(tmp_path) == tmp_path / "step_0000002"
    assert checkpoint.load(checkpoint.latest(tmp_path), model, optim) == 2
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert set(optim.state) == set(model["used"].parameters())
    for param, moment in zip(model["used"].parameters(), moments):
        assert torch.equal(optim.state[param]["exp_avg"], moment)
    for step in (4, 6):
        checkpoint.save(tmp_path, step, model, optim)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_0000004", "step_0000006"]
    assert checkpoint.latest(tmp_path) == tmp_path / "step_0000006"
    assert checkpoint.latest(tmp_path / "nothing") is None
