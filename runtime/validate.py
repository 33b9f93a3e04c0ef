"""Every flag of train.py checked before the run starts, each problem naming its flag.

`check` runs right after the profile fills the unset flags (train.main), before any file is
written or model loaded: a value out of its range, a batch that does not split over the ranks,
a model, init or embedder directory that is not there, and an output or checkpoint folder that
cannot be written would otherwise fail late (after a stage) or deep (inside a library).
"""

import os
import tempfile
from pathlib import Path

from runtime import rundir
from variants import masked_rollout

STAGES = ("sft", "oppo")
AGGREGATIONS = ("token-mean", "seq-mean")
# (flag, the lowest value, whether the lowest is allowed, the highest or None, whether the
# highest is allowed)
RANGES = (
    ("save_every", 1, True, None, True),
    ("frames", 1, True, None, True),
    ("sft_steps", 1, True, None, True),
    ("sft_epochs", 0, False, None, True),
    ("steps", 1, True, None, True),
    ("sft_batch", 1, True, None, True),
    ("batch", 1, True, None, True),
    ("micro_batch", 1, True, None, True),
    ("max_new_tokens", 1, True, None, True),
    ("warmup", 0, True, None, True),
    ("eval_every", 0, True, None, True),
    ("eval_limit", 0, True, None, True),
    ("eval_samples", 0, True, None, True),
    ("log_samples", 0, True, None, True),
    ("max_bad_records", 0, True, None, True),
    ("masked_rollouts", 0, True, None, True),
    ("lr", 0, False, None, True),
    ("sft_lr", 0, False, None, True),
    ("weight_decay", 0, True, None, True),
    ("grad_clip", 0, False, None, True),
    ("temperature", 0, False, None, True),
    ("top_p", 0, False, 1, True),
    ("beta", 0, True, None, True),
    ("eps_low", 0, True, 1, False),
    ("eps_high", 0, True, None, True),
    ("w_fmt", 0, True, None, True),
    ("w_op", 0, True, None, True),
    ("tau", 0, True, 1, False),
    ("theta", 0, False, 1, True),
    ("gamma", 0, True, None, True),
    ("eta", 0, True, None, True),
    ("rho", 0, True, 1, True),
    ("clamp", 0, False, None, True),
    ("eta_masked", 0, True, None, True),
    ("masked_rollout_weight", 0, True, None, True),
)


def check(args, world):
    """SystemExit on every rank listing each flag that is wrong (problems), before the run."""
    found = problems(args, world)
    if found:
        rundir.refuse("flags that cannot run:\n  " + "\n  ".join(found))


def problems(args, world):
    """One message per wrong flag of `args` (runtime/config.Args, profile applied), for a run of
    `world` ranks."""
    found = []
    stages = args.stages.split(",")
    if not set(stages) <= set(STAGES) or len(set(stages)) != len(stages):
        found.append(f"--stages {args.stages!r}: a comma-separated subset of {', '.join(STAGES)}")
    if args.agg not in AGGREGATIONS:
        found.append(f"--agg {args.agg!r}: one of {', '.join(AGGREGATIONS)}")
    for flag, low, low_in, high, high_in in RANGES:
        # unset: --sft_steps when --sft_epochs sets the length, --sft_epochs when it does not
        if getattr(args, flag) is None:
            continue
        problem = out_of_range(getattr(args, flag), low, low_in, high, high_in)
        if problem:
            found.append(f"--{flag} {getattr(args, flag)!r}: {problem}")
    if args.G < 2:
        found.append(
            f"--G {args.G}: the group advantage (Eq. 5) of a group of one completion is 0, so "
            "the policy loss would be 0 at every step; give G >= 2"
        )
    if args.masked_rollouts:
        try:
            masked_rollout.modalities(args)
        except ValueError as err:
            found.append(str(err))
    for flag in ("sft_batch", "batch"):
        # the stage that reads the flag
        stage = "sft" if flag == "sft_batch" else "oppo"
        value = getattr(args, flag)
        if stage in stages and isinstance(value, int) and value >= 1 and value % world:
            found.append(
                f"--{flag} {value}: clips per step over all ranks, not divisible by {world}"
            )
    found += missing_dirs(args)
    found += unwritable(args, stages)
    return found


def out_of_range(value, low, low_in, high, high_in):
    """Why `value` is outside [low, high] (a bound excluded when not *_in), or None. NaN is
    outside every range."""
    above = value >= low if low_in else value > low
    below = high is None or (value <= high if high_in else value < high)
    if above and below:
        return None
    left = "[" if low_in else "("
    right = "]" if high_in else ")"
    upper = "inf" if high is None else high
    return f"must be in {left}{low}, {upper}{right}"


def missing_dirs(args):
    """The --model, --init and --embedder directories given that are not directories."""
    found = []
    for flag in ("model", "init", "embedder"):
        path = getattr(args, flag)
        if path and not Path(path).is_dir():
            found.append(f"--{flag} {path}: not a directory")
    return found


def unwritable(args, stages):
    """--out and each stage's checkpoint folder that cannot be written: the nearest part of each
    path that exists must be a folder this process can create a file in (nothing is created)."""
    found = []
    folders = {"--out": Path(args.out)}
    for stage in stages:
        folders[f"--out ({stage} checkpoints)"] = Path(args.out) / stage / "ckpt"
    for flag, folder in folders.items():
        problem = not_writable(folder)
        if problem:
            found.append(f"{flag} {folder}: {problem}")
    return found


def not_writable(folder):
    """Why files cannot be written in `folder` (created first when absent), or None."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        # a probe file, removed at once: the permission bits alone miss read-only mounts
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".write_probe")
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        return f"cannot write in {existing} ({err.strerror})"
    return None
