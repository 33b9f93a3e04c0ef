"""The CUDA paths, on one GPU: train.py under torchrun and under plain python, kill and resume,
the export, bf16 log-probs against fp32, and (with OPPO_GPU_7B=1) one OPPO step of a
Qwen2.5-Omni-7B-shaped thinker. scripts/gpu_check.sh runs them, with test_device_rules.py.
Without a GPU they are skipped; the export and bf16 tests still run in their "cpu" form."""

import json
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

import data
from runtime import checkpoint, parallel
from thinker import batching, encoders, model, scoring

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_7b = pytest.mark.skipif(
    os.environ.get("OPPO_GPU_7B") != "1",
    reason="a 7B-shaped step, minutes on a CUDA GPU: set OPPO_GPU_7B=1 (scripts/gpu_check.sh does)",
)
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
# a fixed cuBLAS workspace per stream: GPU matrix products repeat bit for bit from run to run
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
SESSION = dict(cwd=ROOT, env=ENV, stderr=subprocess.STDOUT, start_new_session=True)
SFT_STEPS, OPPO_STEPS = 4, 6
U = 2.0**-8  # bf16's unit roundoff: 8 significant bits
FLAGS = (
    f"--profile=cpu --sft_steps={SFT_STEPS} --steps={OPPO_STEPS} --sft_batch=4 --batch=2 --G=2 "
    f"--max_new_tokens=8 --beta=0.04 --sft_lr=1e-2 --warmup=1 --save_every=2 --eval_limit=2 "
    f"--eval_every={SFT_STEPS}"
).split()
# scripts/gpu_check.sh's embedder (random weights of all-MiniLM-L6-v2's shapes), if it set one
EMBEDDER = os.environ.get("OPPO_EMBEDDER", "")
if EMBEDDER:
    FLAGS.append(f"--embedder={EMBEDDER}")
# the real profile's memory settings (runtime/profiles.py), which the 7B command runs with
REAL_MEMORY = dict(activation_checkpointing=True, sft_micro_batch=1, micro_batch=1)


def torchrun():
    """One process under torchrun: process group from the environment, on a port nobody holds."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return ["-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={port}"]


def run_args(tiny_dir, synth_dir, out, **over):
    """SFT then OPPO on the tiny thinker, with a reference model (beta > 0) and a mid-run eval."""
    paths = dict(model=tiny_dir, out=out, data=synth_dir / "train.jsonl")
    paths.update(val_data=synth_dir / "val.jsonl", test_data=synth_dir / "test.jsonl")
    return [*FLAGS, *(f"--{k}={v}" for k, v in {**paths, **over}.items())]


def start(out, *argv):
    """python argv in the repo root, output to out/output.txt; its own session, so that a hung
    run is killed with every process it started."""
    with open(Path(out) / "output.txt", "a") as sink:
        return subprocess.Popen([sys.executable, *map(str, argv)], stdout=sink, **SESSION)


def finish(proc, out, timeout=300):
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 0, (Path(out) / "output.txt").read_text()[-8000:]


def train_log(out, stage):
    """The logged steps of a stage (eval lines left out)."""
    lines = (Path(out) / stage / "log.jsonl").read_text().splitlines()
    return [step for step in map(json.loads, lines) if "loss" in step]


def cuda_run(tiny_dir, synth_dir, out, *launcher, **over):
    finish(start(out, *launcher, "train.py", *run_args(tiny_dir, synth_dir, out, **over)), out)
    return out


@pytest.fixture(scope="module")
def torchrun_run(tiny_dir, synth_dir, tmp_path_factory):
    """The defaults on CUDA: bf16, FSDP2 on nccl, process group from torchrun's environment; the
    real profile's activation checkpointing and micro-batches of one clip."""
    out = tmp_path_factory.mktemp("torchrun")
    return cuda_run(tiny_dir, synth_dir, out, *torchrun(), **REAL_MEMORY)


@pytest.fixture(scope="module")
def python_run(tiny_dir, synth_dir, tmp_path_factory):
    """Plain python on CUDA in fp32, the plain module (FSDP2 in bf16 on plain python's in-memory
    store is the in-process tests' below); also the uninterrupted run `resumed` is held to."""
    return cuda_run(tiny_dir, synth_dir, tmp_path_factory.mktemp("python"), bf16=False)


@pytest.fixture(scope="module")
def clips(tiny_dir, synth_dir):
    """Two validation clips: their prompts and, as completions, their reference targets."""
    processor = model.load_policy(tiny_dir)[1]
    records = data.load_manifest(synth_dir / "val.jsonl")[:2]
    media = batching.encode(processor, records, frames=4)
    targets = processor.tokenizer(
        [batching.target_text(record) + "<|im_end|>" for record in records],
        add_special_tokens=False,
        padding=True,
        padding_side="right",
        return_tensors="pt",
    )
    return media, targets["input_ids"], targets["attention_mask"].bool()


def completion_logprobs(policy, media, completion_ids, device):
    """scoring's path for B rows (G = 1): each tower once, shared positions, head on completions."""
    media = {k: v.to(device) for k, v in media.items()}
    video = encoders.encode_video(policy, media)
    audio = encoders.encode_audio(policy, media)
    inputs = scoring.expand(media, 1, video, audio, scoring.positions(policy, media))
    return scoring.logprobs(policy, inputs, completion_ids.to(device))  # (B, C)


# ---------------------------------------------------------------- 1. train.py on CUDA
@needs_cuda
@pytest.mark.parametrize("run", ["torchrun_run", "python_run"])
def test_train_py_runs_sft_oppo_and_the_final_eval_on_cuda(run, request):
    out = request.getfixturevalue(run)
    for stage, n in (("sft", SFT_STEPS), ("oppo", OPPO_STEPS)):
        steps = train_log(out, stage)
        assert [step["step"] for step in steps] == list(range(1, n + 1))
        # "nan" is logged as a string: a float here is a finite loss
        assert all(isinstance(step["loss"], float) and not step["skipped"] for step in steps)
    report = json.loads((out / "test_report.json").read_text())
    assert report["settings"]["n"] == 2 and 0 <= report["metrics"]["format"] <= 1


# ---------------------------------------------------------------- 2. kill and resume on CUDA
@pytest.fixture(scope="module")
def resumed(tiny_dir, synth_dir, tmp_path_factory):
    """python_run's arguments, SIGKILLed once the OPPO stage has a checkpoint, then resumed.
    Returns (out, the checkpoint's step)."""
    out = tmp_path_factory.mktemp("killed")
    args = run_args(tiny_dir, synth_dir, out, bf16=False)
    pointer = out / "oppo" / "ckpt" / "latest"
    proc = start(out, "train.py", *args)
    deadline = time.monotonic() + 300
    while not pointer.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    output = (out / "output.txt").read_text()[-3000:]
    assert proc.returncode == -signal.SIGKILL, f"ended by itself ({proc.returncode}):\n{output}"
    step = int(checkpoint.latest(pointer.parent).name.split("_")[1])
    finish(start(out, "train.py", *args, "--resume=True"), out)
    return out, step


@needs_cuda
def test_resume_after_sigkill_continues_like_the_uninterrupted_run(python_run, resumed):
    out, step = resumed
    new, want = train_log(out, "oppo"), train_log(python_run, "oppo")
    assert [line["step"] for line in new] == list(range(1, OPPO_STEPS + 1))
    new, want = new[step:], want[step:]
    # the CUDA generator's state came back with the checkpoint: the same completions are sampled
    assert [line["sample"] for line in new] == [line["sample"] for line in want]
    assert [line["lr"] for line in new] == [line["lr"] for line in want]
    # two processes: CUDA's backward kernels (atomic adds) may round differently in the last
    # bits, so the weights at the checkpoint differ by rounding (bit-exactness: test_train.py)
    for key in ("loss", "grad_norm", "rewards/total"):
        got = torch.tensor([line[key] for line in new])
        expected = torch.tensor([line[key] for line in want])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6, msg=key)


@needs_cuda
def test_fsdp2_bf16_resume_restores_the_exact_weights(torchrun_run, tiny_dir, synth_dir, tmp_path):
    """torchrun_run's SFT checkpoint two steps before the end, resumed by torchrun (FSDP2, bf16)."""
    name = f"step_{SFT_STEPS - 2:07d}"
    shutil.copytree(torchrun_run / "sft" / "ckpt" / name, tmp_path / "sft" / "ckpt" / name)
    (tmp_path / "sft" / "ckpt" / "latest").write_text(name)
    cuda_run(tiny_dir, synth_dir, tmp_path, *torchrun(), stages="sft", resume=True, **REAL_MEMORY)
    new, want = train_log(tmp_path, "sft"), train_log(torchrun_run, "sft")[-2:]
    assert [line["step"] for line in new] == [SFT_STEPS - 1, SFT_STEPS]
    # the first step's loss is a forward of the saved weights on the same clips: bit for bit
    assert new[0]["loss"] == want[0]["loss"]
    # the next one follows a bf16 backward, whose atomic adds differ run to run
    assert new[1]["loss"] == pytest.approx(want[1]["loss"], rel=1e-2)


# ---------------------------------------------------------------- 3. the export
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-fsdp2"])
def test_export_reloads_with_the_in_memory_logits(group, tiny_dir, clips, device, bf16, tmp_path):
    media = {k: v.to(device) for k, v in clips[0].items()}
    policy, processor = model.load_policy(tiny_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        # not the file's weights: the export must write the in-memory ones
        for param in policy.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=generator))
    parallel.shard(policy, device, bf16)
    with torch.no_grad():
        want = policy.eval()(**media, use_audio_in_video=False).logits  # (B, L, V)
    checkpoint.export(policy, processor, tmp_path / "final")
    reloaded = parallel.shard(model.load_policy(tmp_path / "final")[0], device, bf16)
    with torch.no_grad():
        got = reloaded.eval()(**media, use_audio_in_video=False).logits  # (B, L, V)
    assert torch.equal(got, want)


# ---------------------------------------------------------------- 4. bf16 against fp32
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_logprobs_agree_with_fp32(group, tiny_dir, clips, device):
    """The same weights scored in fp32 (plain module) and in bf16 (FSDP2 mixed precision, the LM
    head in fp32: parallel.shard_head). The "cpu" case shards on a CPU mesh on every machine.

    Bound: bf16 rounds each value to within U = 2^-8 of itself. The head computes in fp32, so the
    logits are not rounded; they move by the rounding of the activations and weights of the 2
    decoder layers before the head, errors of both signs that partly cancel, each at most about
    U * Z (Z = max |z|): log p_t = z_t - logsumexp(z) moves by the error of z_t plus a p-weighted
    mean of the errors of all the logits, |delta log p_t| <= 2 U Z, and their mean over tokens
    <= U Z / 2. Seen on CPU bf16 for Z from 7 to 44: max 0.77-1.18 U Z, mean 0.21-0.27 U Z (with
    a bf16 head, which this bound replaced at 4 U Z and U Z: 0.81-1.30 and 0.23-0.36).
    """
    media, completion_ids, mask = clips
    logp, Z = {}, []

    def largest_logit(module, args, logits):
        Z.append(logits.abs().max().item())

    for bf16 in (False, True):
        policy = model.load_policy(tiny_dir)[0]
        with torch.no_grad():
            # logits of a trained model's range (|z| up to ~7), not random weights' (~0.7)
            policy.lm_head.weight.mul_(10.0)
        if not bf16:
            policy.lm_head.register_forward_hook(largest_logit)
        parallel.shard(policy, device, bf16)
        with torch.no_grad():
            logp[bf16] = completion_logprobs(policy, media, completion_ids, device).cpu()
    error = (logp[True] - logp[False]).abs()[mask]  # (completion tokens,)
    assert error.max() <= 2 * U * max(Z), (error.max(), max(Z))
    assert error.mean() <= U * max(Z) / 2, (error.mean(), max(Z))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_the_lm_head_computes_in_fp32_under_bf16(group, tiny_dir, clips, device, tied):
    """Under bf16 the logits are the fp32 product of the head's input and its fp32 weights; a
    head tied to the input embeddings (Qwen2.5-Omni-3B's kind) shares its fp32 unit."""
    media, completion_ids, _ = clips
    policy = model.load_policy(tiny_dir)[0]
    if tied:
        policy.lm_head.weight = policy.get_input_embeddings().weight
    weight = policy.lm_head.weight.detach().clone().to(device)  # (V, D) fp32
    seen = []

    def head(module, args, logits):
        seen.append((args[0], logits))

    policy.lm_head.register_forward_hook(head)
    parallel.shard(policy, device, bf16=True)
    with torch.no_grad():
        completion_logprobs(policy, media, completion_ids, device)
    hidden, logits = seen[-1]
    assert logits.dtype == hidden.dtype == torch.float32
    want = torch.nn.functional.linear(hidden, weight)  # (B, C + 1, V)
    torch.testing.assert_close(logits, want, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- 5. a 7B-shaped OPPO step
@needs_7b
@needs_cuda
def test_a_7b_shaped_oppo_step_runs(tmp_path):
    """tools.bench: GRPO and OPPO steps of a random bf16 Qwen2.5-Omni-7B-shaped thinker, one clip
    of 8 frames of 756 px, 8 completions of 256 tokens; its figures go to $OPPO_GPU_OUT."""
    bench = ["-m", "tools.bench", "--config=7b", "--only=step", "--B=1", "--G=8"]
    bench += ["--tokens=256", "--frames=8", "--size=756", "--steps=1", "--warmup=0", "--threads=8"]
    if EMBEDDER:
        bench.append(f"--embedder={EMBEDDER}")
    proc = start(tmp_path, *bench, f"--out={tmp_path / 'bench'}")
    try:
        finish(proc, tmp_path, timeout=420)
    finally:
        # gpu_check.sh prints the figures, or the error
        if os.environ.get("OPPO_GPU_OUT"):
            shutil.copy(tmp_path / "output.txt", Path(os.environ["OPPO_GPU_OUT"]) / "bench_7b.txt")
    assert "OPPO/GRPO step" in (tmp_path / "output.txt").read_text()
