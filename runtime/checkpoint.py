"""Checkpoints that survive a kill, and the run's log: a stage can be resumed at any step.

- `save` writes model + optimizer shards with torch.distributed.checkpoint (each rank writes its
  own shard, no gather), plus each rank's RNG state, the step and the number of ranks, into
  `step_XXXXXXX.tmp/`, then renames the directory and rewrites `latest` (write, then rename: a
  process killed mid-write leaves the previous checkpoint as the one `latest` names, never a
  half-valid one).
- `latest` is the checkpoint `latest` names; an empty pointer, or one naming a directory that is
  gone, falls back to the newest complete checkpoint (with a warning) or raises CheckpointError
  naming it.
- `load` restores all of it, so a resumed run continues with the same next losses; `resume`
  does so for a stage, learning-rate schedule included. A checkpoint of another model (a tensor
  of another shape, or missing) is refused naming the tensor, before anything is read, and one
  written by another number of ranks too (`check_world`).
- `export` gathers the full state dict on rank 0 and writes `save_pretrained` output that
  model.load_policy reads like any Qwen2.5-Omni thinker directory.
"""

import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names it and why."""


def _rank():
    return dist.get_rank() if dist.is_initialized() else 0


def _world():
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def rng_state():
    return {
        "torch": torch.get_rng_state(),
        # this rank's own GPU (the one parallel.init set): a resume may see fewer GPUs
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])


def save(ckpt_dir, step, model, optim, keep=2):
    """Sharded checkpoint of model, optimizer, step and per-rank RNG; then point `latest` at it."""
    ckpt_dir = Path(ckpt_dir)
    final, tmp = ckpt_dir / f"step_{step:07d}", ckpt_dir / f"step_{step:07d}.tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    msd, osd = get_state_dict(model, optim)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    extra = {"step": step, "rng": rng_state(), "world": _world()}
    torch.save(extra, tmp / f"extra_rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        (ckpt_dir / "latest.tmp").write_text(final.name)
        os.replace(ckpt_dir / "latest.tmp", ckpt_dir / "latest")
        old = sorted(p for p in ckpt_dir.glob("step_*") if p.suffix != ".tmp")[:-keep]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
    _barrier()


def latest(ckpt_dir):
    """The newest complete checkpoint: the directory `latest` names; None when there is none. A
    pointer that is empty or names a missing directory falls back to the newest complete
    checkpoint, or raises CheckpointError naming it when there is none."""
    pointer = Path(ckpt_dir) / "latest"
    if not pointer.exists():
        return None
    named = pointer.read_text().strip()
    path = Path(ckpt_dir) / named
    if named and path.is_dir():
        return path
    why = f"names {path}, which does not exist" if named else "is empty"
    complete = sorted(p for p in Path(ckpt_dir).glob("step_*") if _complete(p))
    if not complete:
        raise CheckpointError(
            f"{pointer} {why}, and {ckpt_dir} holds no complete checkpoint: remove {pointer} to "
            "start the stage again"
        )
    warnings.warn(f"{pointer} {why}: resuming from {complete[-1]}, the newest complete one")
    return complete[-1]


def _complete(path):
    """Whether `path` is a checkpoint `save` finished: renamed from .tmp, metadata written."""
    return path.is_dir() and path.suffix != ".tmp" and (path / ".metadata").is_file()


def check_shapes(path, model_state):
    """CheckpointError unless the checkpoint at `path` holds every tensor of the model state dict
    `model_state` (DTensors count by their global shape) at its shape."""
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    for name, tensor in model_state.items():
        entry = saved.get(f"model.{name}")
        if entry is None:
            raise CheckpointError(
                f"{path} is a checkpoint of another model: it has no tensor {name}; resume with "
                "the --model and --init it was written with, or start a new --out"
            )
        if tuple(entry.size) != tuple(tensor.shape):
            raise CheckpointError(
                f"{path} is a checkpoint of another model shape: {name} is "
                f"{tuple(entry.size)} there and {tuple(tensor.shape)} in this model; resume with "
                "the --model and --init it was written with, or start a new --out"
            )


def saved_world(path):
    """The number of ranks that wrote the checkpoint in `path` (one RNG file each)."""
    first = Path(path) / "extra_rank0.pt"
    if first.exists():
        world = torch.load(first, weights_only=False).get("world")
        if world is not None:
            return world
    # written before the world size was stored
    return len(list(Path(path).glob("extra_rank*.pt")))


def check_world(path):
    """Raise WorldSizeError unless this run has as many ranks as the checkpoint's writer: each
    rank's clips (train.clip_indices) and random stream (parallel.rank_seed) depend on it, so a
    resume on another number of ranks would not continue the run it belongs to."""
    saved = saved_world(path)
    if saved != _world():
        raise WorldSizeError(
            f"checkpoint {path} was written by {saved} rank(s), this run has {_world()}: resume "
            f"with torchrun --nproc_per_node={saved} (the batch split and each rank's random "
            "stream depend on the number of ranks), or start a new --out"
        )


class WorldSizeError(RuntimeError):
    """A checkpoint resumed on another number of ranks than wrote it."""


def load(path, model, optim):
    """Restore model, optimizer and this rank's RNG from `path`; returns the saved step."""
    check_world(path)
    msd, osd = get_state_dict(model, optim)
    check_shapes(path, msd)
    # get_state_dict gives every parameter a blank optimizer state, but one that never had a
    # gradient (an unused embedding, a tower no clip reached yet) has none saved: leave it
    # without, as it was
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    kept = {}
    for name, moments in osd["state"].items():
        if any(f"optim.state.{name}.{moment}" in saved for moment in moments):
            kept[name] = moments
    osd["state"] = kept
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path))
    # not strict: the parameters left without optimizer state above
    set_state_dict(
        model,
        optim,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=StateDictOptions(strict=False),
    )
    extra = torch.load(Path(path) / f"extra_rank{_rank()}.pt", weights_only=False)
    set_rng_state(extra["rng"])
    return extra["step"]


def export(model, processor, out_dir):
    """Full state dict gathered on rank 0 -> save_pretrained, written to a temp dir then renamed."""
    sd = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if _rank() == 0:
        out_dir = Path(out_dir)
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=sd)
        processor.save_pretrained(tmp)
        # replace only once the new export is complete
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    _barrier()


def resume(ckpt_dir, model, optim, sched):
    """Continue a stage from the last checkpoint in ckpt_dir: model, optimizer, RNG and the
    learning-rate schedule; returns the step to start from (0 without a checkpoint)."""
    try:
        last = latest(ckpt_dir)
        start = 0 if last is None else load(last, model, optim)
    except CheckpointError as err:
        # as rundir.refuse says it: once, on rank 0
        raise SystemExit(f"train.py: --resume: {err}" if _rank() == 0 else 1) from None
    if last is None:
        return 0
    sched.last_epoch = start - 1
    sched.step()
    return start
