"""Steps that cannot train: named when skipped, and counted before a stage exports.

A non-finite reward part or loss never ends a run: `finite_rewards` sets the rewards of the rows
with a non-finite part to 0 so the step's passes run on every rank alike, and the step's loss is
made NaN, so the optimizer applies no gradient (runtime/optim.py, the same verdict on every
rank). `why_skipped` names, in the step's log line and on stderr, the clips and reward parts
that were not finite, or else the step's clips. `refuse_untrained` stops a stage that skipped
more than half its steps before it exports: its weights are barely trained, and a report on them
would read as a trained model's.
"""

import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from runtime import parallel, rundir

# clips named in a skipped step's reason
SHOWN = 5


def finite_rewards(records, total, parts):
    """(total (N,) with its non-finite entries set to 0, one "clip <id>: rewards/<part> = nan"
    per clip with a non-finite part); records[i] is row i's record, parts reward.compute_rewards'
    named parts."""
    bad = ~torch.isfinite(total)  # (N,)
    if not bad.any():
        return total, []
    problems = []
    for i in bad.nonzero().flatten().tolist():
        named = []
        for name, value in parts.items():
            if torch.is_tensor(value) and not math.isfinite(float(value[i])):
                named.append(f"rewards/{name} = {float(value[i])}")
        named = named or [f"rewards/total = {float(total[i])}"]
        problems.append(f"clip {records[i]['id']}: {', '.join(named)}")
    # a clip's G rows name it once
    problems = list(dict.fromkeys(problems))
    return torch.where(bad, torch.zeros_like(total), total), problems


def note_skipped(metrics, finite, records, stage, step):
    """A step's metrics with its "nonfinite_rewards" taken out and, when the step was skipped
    (not `finite`), its "skip_reason" (why_skipped)."""
    problems = metrics.pop("nonfinite_rewards", [])
    if not finite:
        metrics["skip_reason"] = why_skipped(problems, records, stage, step)
    return metrics


def why_skipped(problems, records, stage, step):
    """Why step `step` of `stage` was skipped, from every rank's non-finite reward `problems`, or
    else every rank's clips (`records`): the same text on every rank, printed by rank 0."""
    mine = (problems, [rec["id"] for rec in records])
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    found = [problem for rank_problems, _ in gathered for problem in rank_problems]
    clips = [clip for _, rank_clips in gathered for clip in rank_clips]
    if found:
        reason = "non-finite reward: " + "; ".join(found[:SHOWN])
    else:
        reason = f"non-finite loss or gradient on the clips {', '.join(clips[:SHOWN])}"
        if len(clips) > SHOWN:
            reason += f" and {len(clips) - SHOWN} more"
    if dist.get_rank() == 0:
        print(f"train.py: {stage} step {step} skipped, {reason}", file=sys.stderr, flush=True)
    return reason


def refuse_untrained(log_path, stage, total_steps):
    """SystemExit on every rank when more than half of the stage's `total_steps` steps were
    skipped, by the stage's log (rank 0 reads it)."""
    problem = parallel.from_rank0(_untrained, log_path, stage, total_steps)
    if problem:
        rundir.refuse(problem)


def _untrained(log_path, stage, total_steps):
    """Why the stage is not a trained model, or None; rank 0."""
    skipped = 0
    if Path(log_path).exists():
        for line in Path(log_path).read_text().splitlines():
            skipped += json.loads(line).get("skipped") is True
    if 2 * skipped <= total_steps:
        return None
    return (
        f"{stage}: {skipped} of {total_steps} steps were skipped (non-finite loss or gradient, "
        f"each named in {log_path}): its weights are not a trained model, so it is neither "
        "exported nor reported; fix the clips the log names and train again"
    )
