"""The training runs that test_train.py and test_resume.py share, and the helpers that read them.

A pytest plugin (both modules load it with `pytest_plugins`), so that its session fixtures run
once for both: `matcher`, `batch` (two clips processed for a forward, to compare logits),
`ref` (train.main in this process: SFT 8 steps then OPPO 2 steps, both perception switches on)
and `fsdp` (the same arguments under torchrun with 2 processes), on the tiny thinker and the
session's synthetic world. In-process runs use 1 thread, like the subprocesses
(OMP_NUM_THREADS=1), so their floating-point sums are the same and resumed losses compare
exactly.

The test modules import its helpers before pytest loads it as a plugin, too late to rewrite its
asserts, so it asks for none: PYTEST_DONT_REWRITE.
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict

import data
import train
from matching.matcher import Matcher
from runtime import checkpoint, config
from thinker import batching, media, model

ROOT = Path(__file__).resolve().parents[1]
SFT_STEPS, OPPO_STEPS = 8, 2
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


# ---------------------------------------------------------------- running train.py
def run_args(tiny_dir, synth_dir, out, **over):
    kw = dict(
        profile="cpu",
        model=str(tiny_dir),
        data=f"{synth_dir}/train.jsonl",
        val_data=f"{synth_dir}/val.jsonl",
        test_data=f"{synth_dir}/test.jsonl",
        out=str(out),
        sft_steps=SFT_STEPS,
        steps=OPPO_STEPS,
        sft_batch=4,
        batch=2,
        G=2,
        max_new_tokens=8,
        eval_limit=2,
        sft_lr=1e-2,
        warmup=1,
        save_every=2,
        eval_every=SFT_STEPS,
    )
    return {**kw, **over}


def cli(kw):
    return [f"--{k}={v}" for k, v in kw.items()]


def copy_manifest(src, dst, changes=None, lines=None):
    """The first `lines` lines of manifest `src` written to `dst`, media paths made absolute so
    that they resolve from there; changes = {line number: fields to set, or a whole line}."""
    src = Path(src)
    changes = changes or {}
    written = []
    for n, line in enumerate(src.read_text().splitlines()[:lines], 1):
        record = json.loads(line)
        for key in ("video", "audio", "cache"):
            if record.get(key):
                record[key] = str(src.parent / record[key])
        change = changes.get(n, {})
        if isinstance(change, str):
            written.append(change)
            continue
        written.append(json.dumps({**record, **change}))
    Path(dst).write_text("\n".join(written) + "\n")
    return Path(dst)


def run_inprocess(matcher, **kw):
    """train.main in this process (1 thread, the session's matcher): the in-memory model is
    reachable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def shared_matcher(*args, **kwargs):
        return matcher

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(train, "Matcher", shared_matcher)
            train.main(config.Args(**kw))
    finally:
        torch.set_num_threads(threads)
        # a failed run must not leave its process group to the next
        if dist.is_initialized():
            dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(*cmd):
    """A subprocess in its own session, so that a hung torchrun goes with all its ranks."""
    return subprocess.Popen(
        [sys.executable, *map(str, cmd)],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(proc, timeout=240):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # a collective mismatch hangs rather than fails
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    kept = []
    for line in out.splitlines():
        if "Loading weights" not in line and "Writing model" not in line:
            kept.append(line)
    out = "\n".join(kept)
    assert proc.returncode == 0, out[-8000:]


def torchrun(*args):
    port = f"--master_port={free_port()}"
    return start("-m", "torch.distributed.run", "--nproc_per_node=2", port, *args)


# ---------------------------------------------------------------- reading a run
def _strict(name):
    raise ValueError(f"{name} is not JSON")


def read_log(path):
    """Every line must be strict JSON (no NaN / Infinity)."""
    lines = Path(path).read_text().splitlines()
    return [json.loads(line, parse_constant=_strict) for line in lines]


def steps(lines):
    return [ln for ln in lines if "loss" in ln]


def state(path):
    return {k: v.clone() for k, v in model.load_policy(path)[0].state_dict().items()}


def changed(a, b):
    """Names of the tensors that differ between two state dicts."""
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def dcp_state(ckpt_dir, like):
    """Model tensors of the DCP checkpoint `latest` names, loaded into a fresh model (no process
    group)."""
    policy = model.load_policy(like)[0]
    sd = get_model_state_dict(policy)
    dcp.load({"model": sd}, checkpoint_id=str(checkpoint.latest(ckpt_dir)))
    return {k: v.clone() for k, v in sd.items()}


def logits(model_or_path, batch):
    policy = model_or_path
    if isinstance(model_or_path, (str, Path)):
        policy = model.load_policy(model_or_path)[0]
    with torch.no_grad():
        return policy.eval()(**batch, use_audio_in_video=False).logits


# ---------------------------------------------------------------- the shared runs
@pytest.fixture(scope="session")
def batch(synth_dir, tiny_dir):
    """Two clips processed for a forward, to compare logits."""
    _, processor = model.load_policy(tiny_dir)
    recs = data.load_manifest(synth_dir / "val.jsonl")[:2]
    return batching.encode(processor, recs, [media.load_media(r, 4) for r in recs])


@pytest.fixture(scope="session")
def matcher():
    return Matcher()


@pytest.fixture(scope="session")
def ref(tiny_dir, synth_dir, matcher, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    run_inprocess(matcher, **run_args(tiny_dir, synth_dir, out))
    return out


@pytest.fixture(scope="session")
def fsdp(tiny_dir, synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    finish(torchrun("train.py", *cli(run_args(tiny_dir, synth_dir, out))))
    return out
