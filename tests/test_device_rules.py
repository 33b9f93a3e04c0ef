"""Device rules that hold on every machine, checked on the CPU: activation checkpointing changes
memory, never a number; the process group reduces CPU numbers whatever the training device
(parallel.py: gloo always, nccl beside it with CUDA); a CPU policy shards on a CPU mesh.
scripts/gpu_check.sh runs these on the GPU machine too, where the process group really has both
backends and FSDP2's default mesh is the GPU's."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from unittest.mock import Mock

import pytest
import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import BackendConfig

import data
from runtime import parallel
from thinker import batching, model

ROOT = Path(__file__).resolve().parents[1]
# torchrun's variables: without them parallel.init makes a 1-process group in memory
LAUNCHER = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
PROBE = """
import json
from runtime import parallel
rank, world, device = parallel.init()
sums = parallel.global_sum(3, 4.5, True)
means = parallel.mean_metrics({"loss": 2.0, "tokens": 7, "skipped": False, "sample": "x"}, world)
print(json.dumps([sums, means]))
"""


@pytest.fixture(scope="module")
def sft_batch(tiny_dir, synth_dir):
    """Two validation clips with their reference targets appended, and labels on the targets."""
    processor = model.load_policy(tiny_dir)[1]
    records = data.load_manifest(synth_dir / "val.jsonl")[:2]
    targets = [batching.target_text(record) for record in records]
    return batching.encode(processor, records, targets=targets, frames=4)


def test_activation_checkpointing_changes_no_logprob_or_gradient(group, tiny_dir, sft_batch):
    """parallel.shard(checkpointing=True), through transformers' activation_checkpointing_enable
    (gradient_checkpointing_enable is deprecated in transformers 5.23 and warns)."""
    logp, grads = {}, {}
    for checkpointing in (False, True):
        policy = model.load_policy(tiny_dir)[0].train()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            parallel.shard(policy, "cpu", checkpointing=checkpointing)
            out = policy(**sft_batch, use_audio_in_video=False)
            out.loss.backward()
        messages = [str(warning.message) for warning in caught]
        assert not [text for text in messages if "gradient_checkpointing" in text]
        assert policy.is_activation_checkpointing == checkpointing
        logp[checkpointing] = out.logits.detach().log_softmax(-1)  # (B, L, V)
        grads[checkpointing] = {name: p.grad for name, p in policy.named_parameters()}
    # the recomputation in backward repeats the forward's arithmetic exactly
    torch.testing.assert_close(logp[True], logp[False], rtol=0, atol=0)
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-5, atol=1e-7)


def test_global_sums_of_cpu_numbers_after_init():
    """Counts and metrics are CPU numbers whatever the training device (an nccl-only group fails
    on them: "No backend type associated with device type cpu")."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER}
    env["PYTHONPATH"] = str(ROOT)
    probe = [sys.executable, "-c", PROBE]
    proc = subprocess.run(probe, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sums, means = json.loads(proc.stdout.splitlines()[-1])
    assert sums == [3.0, 4.5, 1.0] and means == {"loss": 2.0, "tokens": 7.0}


@pytest.mark.parametrize("cuda", [False, True], ids=["cpu", "cuda"])
@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_the_process_group_has_a_cpu_backend_on_every_device(monkeypatch, cuda, launcher):
    """parallel.init's backend string, captured without initialising anything."""
    backends = []

    def init_process_group(backend=None, **kwargs):
        backends.append(backend)

    monkeypatch.setattr(torch.cuda, "is_available", Mock(return_value=cuda))
    monkeypatch.setattr(torch.cuda, "set_device", Mock())
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(dist, "get_rank", Mock(return_value=0))
    monkeypatch.setattr(dist, "get_world_size", Mock(return_value=1))
    for name in LAUNCHER:
        monkeypatch.delenv(name, raising=False)
    if launcher == "torchrun":
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("LOCAL_RANK", "0")
    rank, world, device = parallel.init()
    per_device = BackendConfig(backends[0]).get_device_backend_map()
    assert per_device["cpu"] == "gloo", backends
    if cuda:
        assert per_device["cuda"] == "nccl" and device.type == "cuda", (backends, device)


def test_a_cpu_policy_shards_on_a_cpu_mesh_where_fsdp_would_pick_the_gpu(
    group, tiny_dir, monkeypatch
):
    """FSDP2's default mesh is the accelerator's: on a CUDA machine shard(policy, "cpu") would
    move the policy and its inputs to the GPU. parallel.shard gives the training device's mesh;
    here FSDP2 is told the machine's accelerator is CUDA, which this machine may not have."""
    monkeypatch.setattr(torch._C, "_get_accelerator", Mock(return_value=torch.device("cuda")))
    policy = model.load_policy(tiny_dir)[0]
    parallel.shard(policy, "cpu", bf16=True)
    params = list(policy.parameters())
    assert {param.device_mesh.device_type for param in params} == {"cpu"}
    assert {param.device.type for param in params} == {"cpu"}
