"""train.py: SFT and OPPO steps, 2-process FSDP2, kill-and-resume, the export, non-finite losses.

Few runs, shared by the tests (module fixtures), on the tiny thinker and the session's synthetic
world: `ref` (in-process: SFT 8 steps then OPPO 2 steps, both perception switches on), `fsdp`
(the same arguments under torchrun with 2 processes), `fsdp_resumed` (its step-6 checkpoint
resumed by 2 processes), `resumed` (the same arguments as a subprocess SIGKILLed after its first
checkpoint, then resumed in-process), `nan_run` (in-process SFT with a NaN injected into one
step); and fsdp_train_worker.py, the gradients of batches where a rank lacks video or audio.
In-process runs use 1 thread, like the subprocesses (OMP_NUM_THREADS=1), so their floating-point
sums are the same and resumed losses compare exactly.
"""

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict

import checkpoint
import data
import model as policy_lib
import reward
import train

ROOT = Path(__file__).resolve().parents[1]
SFT_STEPS, OPPO_STEPS = 8, 2
pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is disabled"
)  # DCP read/written in one process
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


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


def run_inprocess(matcher, **kw):
    """train.main in this process (1 thread, the module's matcher): the in-memory model is reachable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(train.reward, "Matcher", lambda *a, **k: matcher)
            train.main(train.Args(**kw))
    finally:
        torch.set_num_threads(threads)
        if dist.is_initialized():  # a failed run must not leave its process group to the next
            dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _strict(name):
    raise ValueError(f"{name} is not JSON")


def read_log(path):
    """Every line must be strict JSON (no NaN / Infinity)."""
    return [
        json.loads(line, parse_constant=_strict) for line in Path(path).read_text().splitlines()
    ]


def steps(lines):
    return [ln for ln in lines if "loss" in ln]


def state(path):
    return {k: v.clone() for k, v in policy_lib.load_policy(path)[0].state_dict().items()}


def changed(a, b):
    """Names of the tensors that differ between two state dicts."""
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def dcp_state(ckpt_dir, like):
    """Model tensors of the DCP checkpoint `latest` names, loaded into a fresh model (no process group)."""
    model = policy_lib.load_policy(like)[0]
    sd = get_model_state_dict(model)
    dcp.load({"model": sd}, checkpoint_id=str(checkpoint.latest(ckpt_dir)))
    return {k: v.clone() for k, v in sd.items()}


@pytest.fixture(scope="module")
def batch(synth_dir, tiny_dir):
    """Two clips processed for a forward, to compare logits."""
    _, processor = policy_lib.load_policy(tiny_dir)
    recs = data.load_manifest(synth_dir / "val.jsonl")[:2]
    return data.encode(processor, recs, [data.load_media(r, 4) for r in recs])


def logits(model_or_path, batch):
    model = (
        policy_lib.load_policy(model_or_path)[0]
        if isinstance(model_or_path, (str, Path))
        else model_or_path
    )
    with torch.no_grad():
        return model.eval()(**batch, use_audio_in_video=False).logits


@pytest.fixture(scope="module")
def matcher():
    return reward.Matcher()


@pytest.fixture(scope="module")
def ref(tiny_dir, synth_dir, matcher, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    run_inprocess(matcher, **run_args(tiny_dir, synth_dir, out))
    return out


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
    except subprocess.TimeoutExpired:  # a collective mismatch hangs rather than fails
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    out = "\n".join(
        ln for ln in out.splitlines() if "Loading weights" not in ln and "Writing model" not in ln
    )
    assert proc.returncode == 0, out[-8000:]


def torchrun(*args):
    return start(
        "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", *args
    )


@pytest.fixture(scope="module")
def fsdp(tiny_dir, synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    finish(torchrun("train.py", *cli(run_args(tiny_dir, synth_dir, out))))
    return out


@pytest.fixture(scope="module")
def fsdp_resumed(fsdp, tiny_dir, synth_dir, tmp_path_factory):
    """The 2-process run's sharded checkpoint of step SFT_STEPS - 2 (kept: keep=2), resumed by 2 processes."""
    out = tmp_path_factory.mktemp("fsdp_resumed")
    step = f"step_{SFT_STEPS - 2:07d}"
    shutil.copytree(fsdp / "sft" / "ckpt" / step, out / "sft" / "ckpt" / step)
    (out / "sft" / "ckpt" / "latest").write_text(step)
    finish(
        torchrun("train.py", *cli(run_args(tiny_dir, synth_dir, out, stages="sft", resume=True)))
    )
    return out


@pytest.fixture(scope="module")
def resumed(tiny_dir, synth_dir, matcher, tmp_path_factory):
    """Kill a run (SIGKILL) once `latest` names a checkpoint, leave a half-written later save
    behind, then resume with the same arguments. Returns (out, checkpoint step, log lines before)."""
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
        while (
            not (ckpt / "latest").exists() and proc.poll() is None and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (
        f"the run ended by itself ({proc.returncode}), not by the kill:\n"
        + (out / "stderr.txt").read_text()[-3000:]
    )
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


# ---------------------------------------------------------------- 1. SFT and OPPO steps, logs
def test_sft_lowers_the_loss_and_changes_the_parameters(ref, tiny_dir):
    lines = read_log(ref / "sft" / "log.jsonl")
    evals = [ln for ln in lines if "eval" in ln]  # --eval_every: validation through eval.py
    assert [ln["step"] for ln in evals] == [SFT_STEPS] and {"war", "uar", "U", "F"} <= evals[0][
        "eval"
    ].keys()
    lines = steps(lines)
    assert [ln["step"] for ln in lines] == list(range(1, SFT_STEPS + 1))
    for ln in lines:
        assert {
            "loss",
            "tokens",
            "grad_norm",
            "lr",
            "skipped",
            "time/step",
            "tokens_per_s",
            "flops_per_s",
        } <= ln.keys()
        assert (
            ln["skipped"] is False and math.isfinite(ln["loss"]) and ln["lr"] == pytest.approx(1e-2)
        )
    loss = [ln["loss"] for ln in lines]
    assert sum(loss[-2:]) / 2 < loss[0] - 0.5, loss
    init, sft = state(tiny_dir), state(ref / "sft" / "final")
    diff = changed(init, sft)
    assert len(diff) > 0.9 * len(init), f"only {len(diff)} of {len(init)} tensors moved"
    assert all(k in diff for k in ("lm_head.weight", "model.language_model.embed_tokens.weight"))


def test_oppo_steps_log_every_metric_and_change_the_parameters(ref):
    lines = steps(read_log(ref / "oppo" / "log.jsonl"))
    assert [ln["step"] for ln in lines] == list(range(1, OPPO_STEPS + 1))
    want = {
        "loss",
        "pg_loss",
        "op_loss",
        "kl",
        "kl_visual",
        "kl_acoustic",
        "entropy",
        "ratio_mean",
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "advantages/mean",
        "rewards/total",
        "rewards/acc",
        "rewards/fmt",
        "rewards/op",
        "rewards/op_visual",
        "rewards/op_acoustic",
        "rewards/op_emotion",
        "completion_length",
        "grad_norm",
        "lr",
        "skipped",
        "time/rollout",
        "time/reward",
        "time/masked",
        "time/update",
        "time/rollout_generate",
        "masked_rows",
        "time/step",
        "tokens_per_s",
        "flops_per_s",
        "sample",
    }
    for ln in lines:
        assert want <= ln.keys(), want - ln.keys()
        assert ln["skipped"] is False and isinstance(ln["sample"], str)
        assert all(math.isfinite(v) for v in ln.values() if isinstance(v, float))
        # one update per rollout: the ratio is exactly 1, whatever the micro-batching
        assert ln["ratio_mean"] == pytest.approx(1.0)
        assert ln["op_loss"] != 0 and ln["flops_per_s"] > 0  # the perception loss ran
        assert ln["loss"] == pytest.approx(ln["pg_loss"] + ln["op_loss"], rel=1e-4, abs=1e-6)
    diff = changed(state(ref / "sft" / "final"), state(ref / "oppo" / "final"))
    assert len(diff) > 0.5 * len(state(ref / "sft" / "final")), diff
    assert (ref / "test_report.json").exists()


# ---------------------------------------------------------------- 2. two processes, FSDP2
def test_two_fsdp_processes_give_the_one_process_sft_losses(ref, fsdp):
    one, two = (
        steps(read_log(ref / "sft" / "log.jsonl")),
        steps(read_log(fsdp / "sft" / "log.jsonl")),
    )
    assert [ln["step"] for ln in two] == list(range(1, SFT_STEPS + 1))
    for key in ("loss", "grad_norm", "tokens"):
        torch.testing.assert_close(
            torch.tensor([ln[key] for ln in two]),
            torch.tensor([ln[key] for ln in one]),
            rtol=1e-4,
            atol=1e-4,
            msg=key,
        )
    # the weights too (Adam at lr 1e-2: a wrong gradient moves a tensor by ~1e-2 a step)
    one, two = state(ref / "sft" / "final"), state(fsdp / "sft" / "final")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-3, msg=k)


def test_fsdp_gradients_when_a_rank_lacks_a_medium(tiny_dir, synth_dir, tmp_path):
    """A rank whose clips have no video (or no audio) must still run that tower, or the ranks'
    FSDP2 collectives pair up wrongly (a hang): the gradients must equal the 1-process ones."""
    two, one = tmp_path / "two.pt", tmp_path / "one.pt"
    worker = ROOT / "tests" / "fsdp_train_worker.py"
    procs = [torchrun(worker, tiny_dir, synth_dir, two), start(worker, tiny_dir, synth_dir, one)]
    for proc in procs:
        finish(proc, timeout=200)
    two, one = torch.load(two), torch.load(one)
    assert set(one) == {"rank0_no_video", "rank0_no_audio", "no_video_and_no_audio"}
    for case in one:
        assert two[case]["loss"] == pytest.approx(one[case]["loss"], rel=1e-5)
        g1, g2 = one[case]["grads"], two[case]["grads"]
        assert [k for k in g1 if g1[k] is not None] == [k for k in g2 if g2[k] is not None], case
        for k in g1:
            if g1[k] is not None:
                torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-6, msg=f"{case}: {k}")
    assert math.isfinite(two["oppo"]["loss"]) and math.isfinite(two["oppo"]["grad_norm"])


def test_two_fsdp_processes_run_oppo(fsdp):
    lines = steps(read_log(fsdp / "oppo" / "log.jsonl"))
    assert [ln["step"] for ln in lines] == list(range(1, OPPO_STEPS + 1))
    for ln in lines:
        assert not ln["skipped"] and ln["ratio_mean"] == pytest.approx(1.0)
        # the loss is the global one (each rank's share times the ranks), the parts the mean of the ranks'
        assert ln["loss"] == pytest.approx(ln["pg_loss"] + ln["op_loss"], rel=0.1)
        assert ln["tokens"] == pytest.approx(
            4 * ln["completion_length"]
        )  # B x G = 4 rows over both ranks
    assert changed(state(fsdp / "sft" / "final"), state(fsdp / "oppo" / "final"))


# ---------------------------------------------------------------- 3. kill and resume
def test_resume_after_sigkill_continues_exactly(ref, resumed):
    out, step, before = resumed
    assert before >= step  # the killed run logged its steps up to the checkpoint, maybe beyond it
    lines = steps(read_log(out / "sft" / "log.jsonl"))
    assert [ln["step"] for ln in lines] == list(
        range(1, SFT_STEPS + 1)
    )  # each step logged once: none lost, none twice
    new, want = lines[step:], steps(read_log(ref / "sft" / "log.jsonl"))[step:]
    for key in ("loss", "grad_norm", "lr"):
        assert [ln[key] for ln in new] == [ln[key] for ln in want], key
    assert not changed(state(ref / "sft" / "final"), state(out / "sft" / "final"))
    # the OPPO stage after it starts from the same weights and RNG: same samples, same losses
    oppo = [(ln["loss"], ln["sample"]) for ln in steps(read_log(out / "oppo" / "log.jsonl"))]
    assert oppo == [
        (ln["loss"], ln["sample"]) for ln in steps(read_log(ref / "oppo" / "log.jsonl"))
    ]


def test_resume_trims_the_log_to_the_checkpoint(tmp_path):
    """Steps after the checkpoint run again on resume, so their old lines go, and so does a line
    cut off by the kill; everything else stays, byte for byte."""
    log = tmp_path / "log.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)]
    lines.insert(3, json.dumps({"step": 3, "eval": {"war": 0.5}}) + "\n")
    log.write_text("".join(lines) + '{"step": 6, "lo')
    checkpoint.trim_log(log, 3)
    assert log.read_text() == "".join(lines[:4])
    checkpoint.trim_log(tmp_path / "absent.jsonl", 3)  # a first run has no log yet
    assert not (tmp_path / "absent.jsonl").exists() and not list(tmp_path.glob("*.tmp"))


def test_two_fsdp_processes_resume_exactly(fsdp, fsdp_resumed):
    """Sharded model and optimizer state and per-rank RNG, read back by the 2 ranks (the last step
    has a rank without video: parallel.encode_media's blank tower)."""
    new, want = (
        steps(read_log(fsdp_resumed / "sft" / "log.jsonl")),
        steps(read_log(fsdp / "sft" / "log.jsonl")),
    )
    assert [ln["step"] for ln in new] == [SFT_STEPS - 1, SFT_STEPS]
    assert [(ln["loss"], ln["grad_norm"]) for ln in new] == [
        (ln["loss"], ln["grad_norm"]) for ln in want[-2:]
    ]
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
    model.zero_grad(set_to_none=True)  # as a resumed run builds it
    optim = torch.optim.AdamW(model.parameters(), lr=0.1)

    def killed(*a):
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
    assert all(
        torch.equal(optim.state[p]["exp_avg"], m)
        for p, m in zip(model["used"].parameters(), moments)
    )
    for step in (4, 6):
        checkpoint.save(tmp_path, step, model, optim)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_0000004", "step_0000006"]
    assert checkpoint.latest(tmp_path) == tmp_path / "step_0000006"
    assert checkpoint.latest(tmp_path / "nothing") is None


# ---------------------------------------------------------------- 4. the export
def test_export_equals_the_sharded_checkpoint(ref, fsdp, batch):
    """The final DCP checkpoint holds the trained weights (every rank's shard, for FSDP); the
    Hugging Face export must load through load_policy to exactly those, with the same logits."""
    for out in (ref, fsdp):
        final = out / "sft" / "final"
        assert checkpoint.latest(out / "sft" / "ckpt").name == f"step_{SFT_STEPS:07d}"
        trained, exported = dcp_state(out / "sft" / "ckpt", final), state(final)
        assert not changed(trained, exported)
        model = policy_lib.load_policy(final)[0]
        model.load_state_dict(trained)
        assert torch.equal(logits(model, batch), logits(final, batch))


# ---------------------------------------------------------------- 5. non-finite losses
@pytest.fixture(scope="module")
def nan_run(tiny_dir, synth_dir, matcher, batch, tmp_path_factory):
    """SFT 3 steps, the log-probs of step 2 made NaN; records the weights around it and the logits
    of the in-memory model at export."""
    out, seen = tmp_path_factory.mktemp("nan"), {"calls": 0, "weights": []}
    logprobs, sft_step, export = train.rollout.logprobs, train.sft_step, train.checkpoint.export

    def nan_logprobs(*a, **k):
        seen["calls"] += 1
        lp = logprobs(*a, **k)
        return lp * float("nan") if seen["calls"] == 2 else lp

    def recording_sft_step(args, policy, *a):
        seen["weights"].append({k: v.detach().clone() for k, v in policy.state_dict().items()})
        return sft_step(args, policy, *a)

    def recording_export(policy, processor, out_dir):
        seen["weights"].append({k: v.detach().clone() for k, v in policy.state_dict().items()})
        seen["logits"] = logits(policy, batch)
        return export(policy, processor, out_dir)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train.rollout, "logprobs", nan_logprobs)
        mp.setattr(train, "sft_step", recording_sft_step)
        mp.setattr(train.checkpoint, "export", recording_export)
        run_inprocess(
            matcher,
            **run_args(
                tiny_dir, synth_dir, out, stages="sft", sft_steps=3, save_every=100, eval_limit=1
            ),
        )
    return out, seen


def test_a_nan_loss_skips_the_step(nan_run):
    out, seen = nan_run
    lines = read_log(out / "sft" / "log.jsonl")  # strict JSON even with a NaN loss
    assert [ln["skipped"] for ln in lines] == [False, True, False]
    assert lines[1]["loss"] == "nan" and lines[1]["grad_norm"] == "nan"
    assert math.isfinite(lines[2]["loss"])
    before, after, final = (
        seen["weights"][1],
        seen["weights"][2],
        seen["weights"][3],
    )  # steps 2 and 3, export
    assert not changed(before, after)  # the NaN step wrote nothing
    assert changed(after, final) and all(torch.isfinite(v).all() for v in final.values())


def test_export_reloads_with_the_in_memory_logits(nan_run, batch, tiny_dir):
    out, seen = nan_run
    final = out / "sft" / "final"
    assert not changed(seen["weights"][3], state(final))
    assert torch.equal(logits(final, batch), seen["logits"])
    assert not torch.equal(
        logits(tiny_dir, batch), seen["logits"]
    )  # trained: not the initial model
