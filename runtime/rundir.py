"""A run's output directory: one run at a time, the arguments each stage ran with, the run's log.

- `Lock` is `<out>/.lock`, held by the run that writes `<out>` (rank 0, for every rank): an
  exclusive flock, so the kernel frees it however the run ends, even killed, and the file names
  its holder (host, pid, start) for the message a second run refuses with.
- `start_stage` records every flag of the run in `<out>/<stage>/args.json` when a stage starts
  (train.py --config reads it back; eval.py reads its export's settings from it, `saved_args`),
  and `resume_changes` compares a --resume's arguments with those the stage reads: a stage
  resumed with other arguments is not the run its checkpoint belongs to, so the run refuses,
  naming each flag, unless --allow_changed_args. EXEMPT flags change where, when or how, not
  what, is computed.
- `start_stage` also logs the stage's start in `<out>/run.jsonl` (runtime/logs.py).
"""

import dataclasses
import fcntl
import json
import os
import socket
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist

from runtime import checkpoint, logs, parallel

# never compared on --resume: where the run writes and what it accepts; evaluation and
# checkpoint cadence; memory and speed settings (the same result up to floating-point rounding)
EXEMPT = {
    "out",
    "resume",
    "allow_changed_args",
    "allow_changed_data",
    "max_bad_records",
    "stages",
    "profile",
    "val_data",
    "test_data",
    "eval_every",
    "eval_limit",
    "eval_samples",
    "theta",
    "save_every",
    "micro_batch",
    "sft_micro_batch",
    "activation_checkpointing",
    "cache_inputs",
    "allow_label_only",
    "tensorboard",
    "log_samples",
    "config",
}
# the flags the SFT stage reads (a flag added to its path belongs here), and those only it reads
SFT_READS = {
    "model",
    "init",
    "data",
    "seed",
    "frames",
    "sft_steps",
    "sft_epochs",
    "sft_batch",
    "sft_lr",
    "weight_decay",
    "grad_clip",
    "warmup",
    "bf16",
    "labels",
}
SFT_ONLY = {"sft_steps", "sft_epochs", "sft_batch", "sft_lr"}
# a lock file that names no holder (new, or being written)
UNKNOWN = "holder unknown"


# ---------------------------------------------------------------- 1. the lock
class Lock:
    """`<out>/.lock`: `acquire` on rank 0, `release` at the end of the run (or the kernel does)."""

    def __init__(self, out):
        self.out = Path(out)
        self.path = self.out / ".lock"
        self.file = None

    def acquire(self):
        """Take the lock; None, or why not (a message naming the directory and the holder)."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            return f"--out {self.out}: cannot create the directory ({err.strerror})"
        file = None
        # a run ending between our open and our flock removes the file we locked: open again
        while file is None:
            try:
                file = open(self.path, "a+")
            except OSError as err:
                return f"--out {self.out}: cannot create its lock {self.path} ({err.strerror})"
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = _holder(file)
                file.close()
                if not isinstance(err, BlockingIOError):
                    return f"--out {self.out}: cannot lock {self.path} ({err.strerror})"
                return (
                    f"--out {self.out} is in use by another run ({holder}; {self.path}): wait "
                    "for it to end or choose another --out"
                )
            if not self.path.exists() or self.path.stat().st_ino != os.fstat(file.fileno()).st_ino:
                file.close()
                file = None
        left = _holder(file)
        if left != UNKNOWN:
            print(
                f"train.py: {self.path}, left by a run that ended without removing it ({left}), "
                "is taken over"
            )
        file.seek(0)
        file.truncate()
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": logs.now()}
        file.write(json.dumps(me))
        file.flush()
        self.file = file
        return None

    def release(self):
        """Remove the lock file and free the lock (nothing when this process holds none)."""
        if self.file is None:
            return
        self.path.unlink(missing_ok=True)
        self.file.close()
        self.file = None


@contextmanager
def locked(out):
    """Hold `<out>/.lock` through the block, rank 0 for every rank; SystemExit on every rank,
    naming the holder, when another run holds it."""
    lock = Lock(out)
    problem = parallel.from_rank0(lock.acquire)
    if problem:
        refuse(problem)
    try:
        yield
    finally:
        lock.release()


def refuse(problem):
    """End the run before its first step: rank 0 says why (stderr, status 1), the others end
    with status 1 and no message, so that it is said once."""
    message = 1
    if dist.get_rank() == 0:
        message = f"train.py: {problem}"
    raise SystemExit(message)


def _holder(file):
    """The holder a lock file names, "pid P on host H since T"; UNKNOWN when it names none."""
    file.seek(0)
    try:
        holder = json.loads(file.read())
        return f"pid {holder['pid']} on host {holder['host']} since {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return UNKNOWN


# ---------------------------------------------------------------- 2. the arguments of a stage
def stage_flags(args, stage):
    """The flags of `args` that can change what `stage` computes, with their values (JSON)."""
    values = json.loads(json.dumps(dataclasses.asdict(args)))
    flags = {}
    for flag, value in values.items():
        if stage == "sft":
            read = flag in SFT_READS
        else:
            read = flag not in EXEMPT and flag not in SFT_ONLY
        if read:
            flags[flag] = value
    return flags


def check_resume(args):
    """{stage: {flag: [recorded, now]}} of a --resume's changed arguments (resume_changes, on
    rank 0), {} without --resume; SystemExit on every rank when they are refused."""
    if not args.resume:
        return {}
    changes, problem = parallel.from_rank0(resume_changes, args, args.stages.split(","))
    if problem:
        refuse(problem)
    return changes


def resume_changes(args, stages):
    """For --resume: ({stage: {flag: [recorded, now]}} of the started stages whose arguments
    differ from their args.json, a refusal message or None). Refused: any difference without
    --allow_changed_args, and a step count below the step a stage's checkpoint is at."""
    changes = {}
    refusals = []
    for stage in stages:
        out = Path(args.out) / stage
        try:
            started = checkpoint.latest(out / "ckpt")
        except checkpoint.CheckpointError as err:
            return {}, f"--resume: {err}"
        record = out / "args.json"
        if started is None or not record.exists():
            continue
        try:
            recorded = json.loads(record.read_text())
        except (OSError, ValueError) as err:
            return {}, f"{record}: unreadable ({err}); move it away to resume without the check"
        now = stage_flags(args, stage)
        diff = {}
        for flag, value in now.items():
            if flag in recorded and recorded[flag] != value:
                diff[flag] = [recorded[flag], value]
                refusals.append(f"{stage}: --{flag} {recorded[flag]!r} -> {value!r}")
        try:
            checkpoint.check_world(started)
        except checkpoint.WorldSizeError as err:
            return {}, f"--resume: {err}"
        total = args.sft_steps if stage == "sft" else args.steps
        at = int(started.name.split("_")[1])
        if at > total:
            return {}, (
                f"--resume: {stage}'s checkpoint {started} is at step {at}, beyond the "
                f"{total} steps asked now: a stage cannot go back; start a new --out"
            )
        if diff:
            changes[stage] = diff
    if refusals and not args.allow_changed_args:
        listed = "\n  ".join(refusals)
        return {}, (
            f"--resume with arguments that differ from those the stages started with "
            f"(<stage>/args.json in {args.out}):\n  {listed}\nresume with the recorded values, "
            "or pass --allow_changed_args to go on with the new ones"
        )
    if refusals:
        print(
            "train.py: resumed with changed arguments (--allow_changed_args):",
            *refusals,
            sep="\n  ",
        )
    return changes, None


def start_stage(args, stage, start, records, changes, master):
    """A stage starts at step `start` on `records` (a data.Manifest): record every flag of the
    run (atomically; --config reads the file back) and log the start, the records and the lines
    skipped, in the run's log; rank 0 (`master`) alone writes."""
    if not master:
        return
    out = Path(args.out) / stage
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "args.json.tmp"
    flags = dataclasses.asdict(args)
    flags.pop("config", None)
    tmp.write_text(json.dumps(flags, indent=1))
    os.replace(tmp, out / "args.json")
    event = {"event": "stage", "stage": stage, "start": start, "records": len(records)}
    event["skipped"] = len(records.errors)
    if changes:
        event["changed_args"] = changes
    logs.log_event(args.out, event, master)


def saved_args(export):
    """The flags of the run whose stage exported `export` (`<out>/<stage>/final`): its stage's
    args.json, {} when there is none (a checkpoint not trained here)."""
    path = Path(export).parent / "args.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise SystemExit(f"{path}: unreadable ({err}); give the settings as flags") from None


def from_run(args, export, defaults):
    """Fill each setting of `defaults` that `args` leaves unset (None) from the args.json of the
    run that exported `export` (saved_args), else from `defaults`; print where they came from."""
    saved = saved_args(export)
    filled = []
    for key, default in defaults.items():
        if getattr(args, key) is not None:
            continue
        setattr(args, key, saved.get(key, default))
        filled.append(f"{key} {getattr(args, key)!r}")
    origin = f"{Path(export).parent / 'args.json'}" if saved else "defaults"
    if filled and int(os.environ.get("RANK", 0)) == 0:
        print(f"from {origin}:", ", ".join(filled))
