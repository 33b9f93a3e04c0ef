"""What a run logs: each stage's log.jsonl, the run's run.jsonl, and the metrics of a step.

- `Log` is a stage's log.jsonl, one JSON line a step, trimmed on resume to the steps the
  checkpoint holds, so every step is logged once. Beside it: samples.jsonl, a few sampled
  completions of each OPPO step (clip id, completion, every reward part: --log_samples), and
  with --tensorboard every logged number as TensorBoard scalars in `tensorboard/`.
- `log_event` appends a line to `<out>/run.jsonl`: one per start of train.py (the manifests'
  counts) and one per stage started.
- `Clock` times a step's phases; `oppo_metrics` and `sft_metrics` make a step's line: every
  reward part, every loss term, counts, phase timings and model FLOPs (runtime/flops.py).
"""

import json
import math
import os
import time
from pathlib import Path

import torch

from runtime import flops


# ---------------------------------------------------------------- 1. a stage's log
def trim_log(path, step):
    """Keep the JSON lines of steps <= step: a run resumed from step `step` logs the later ones
    again. A last line cut off by a kill goes too. Written to a temp file, then renamed."""
    path = Path(path)
    if not path.exists():
        return
    # not a half-written last line
    lines = [line for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]
    keep = [line for line in lines if json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


class Log:
    """A stage's log.jsonl, one JSON object a line, written by rank 0 alone (`master`); its
    samples.jsonl; with `tensorboard`, its TensorBoard scalars.

    Opened for a run that starts at `start`: the lines of later steps, from a run killed after
    its last checkpoint, go (they run again and are logged once), in all three."""

    def __init__(self, path, start, master, tensorboard=False):
        self.file = None
        self.samples = None
        self.board = None
        if master:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            trim_log(path, start)
            self.file = open(path, "a")
            # opened at its first sample: a stage or a log without samples leaves no empty file
            self.samples_path = path.with_name("samples.jsonl")
            trim_log(self.samples_path, start)
        if master and tensorboard:
            # loaded only when asked for: TensorBoard is an optional view of the same numbers
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops the events of the steps it runs again
            self.board = SummaryWriter(path.parent / "tensorboard", purge_step=start + 1)

    def write(self, record):
        """One line; a non-finite float is written as a string ("nan"), so the line is strict
        JSON. A record's "samples" go to samples.jsonl, one line each, with its step."""
        if self.file is None:
            return
        record = dict(record)
        samples = record.pop("samples", [])
        if samples and self.samples is None:
            self.samples = open(self.samples_path, "a")
        for sample in samples:
            self.samples.write(json.dumps({"step": record.get("step"), **sample}) + "\n")
        if samples:
            self.samples.flush()
        if self.board is not None:
            self.scalars(record)
        strict = {}
        for key, value in record.items():
            if isinstance(value, float) and not math.isfinite(value):
                value = str(value)
            strict[key] = value
        self.file.write(json.dumps(strict) + "\n")
        self.file.flush()

    def scalars(self, record):
        """Every number of a record as a TensorBoard scalar at its step; an evaluation's under
        eval/."""
        step = record.get("step")
        values = dict(record)
        for key, value in record.get("eval", {}).items():
            values[f"eval/{key}"] = value
        for key, value in values.items():
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if is_number and key != "step":
                self.board.add_scalar(key, value, step)
        self.board.flush()

    def close(self):
        if self.file is not None:
            self.file.close()
        if self.samples is not None:
            self.samples.close()
        if self.board is not None:
            self.board.close()


# ---------------------------------------------------------------- 2. the run's log
def log_event(out, event, master):
    """Append `event` as one JSON line to `<out>/run.jsonl` (rank 0, `master`, alone)."""
    if not master:
        return
    log = Log(Path(out) / "run.jsonl", 0, master)
    log.write({"time": now(), **event})
    log.close()


def now():
    return time.strftime("%Y-%m-%d %H:%M:%S")


# ---------------------------------------------------------------- 3. a step's metrics
class Clock:
    """Seconds spent in each phase of a step: `lap(name)` closes the phase that began at the
    previous lap (or at the start)."""

    def __init__(self):
        self.last = time.perf_counter()
        self.seconds = {}

    def lap(self, name):
        current = time.perf_counter()
        self.seconds[name] = current - self.last
        self.last = current


def oppo_metrics(args, policy, roll, rewards, evidence, clock, *parts):
    """An OPPO step's metrics over this rank's rows: rewards = (total (N,), reward.compute_rewards'
    parts); evidence: perception_loss.Evidence; parts: the dicts of the other phases (advantage,
    update, masked rollouts), whose "loss" and "flops" add to the step's."""
    total, reward_parts = rewards
    mask = roll.completion_mask.float()  # (N, C)
    metrics = {"loss": 0.0, "flops": 0.0}
    for part in parts:
        for key, value in part.items():
            if key in ("loss", "flops"):
                metrics[key] += value
            else:
                metrics[key] = value if isinstance(value, str) else float(value)
    for key, value in reward_parts.items():
        if torch.is_tensor(value):
            metrics[f"rewards/{key}"] = float(value.mean())
    metrics["rewards/total"] = float(total.mean())
    metrics["completion_length"] = float(mask.sum(1).mean())
    metrics["sample"] = roll.texts[0]
    metrics["samples"] = samples(roll, total, reward_parts, args.log_samples)
    for phase, seconds in clock.seconds.items():
        metrics[f"time/{phase}"] = seconds
    for phase, seconds in roll.timings.items():
        metrics[f"time/rollout_{phase}"] = seconds
    # rows scored under x\v or x\a
    metrics["masked_rows"] = float(evidence.visual.any(1).sum() + evidence.acoustic.any(1).sum())
    # the no-grad passes: the reference when beta > 0, and the masked rows' share of a pass,
    # which form (b) trains (a forward and a backward: three forwards' FLOPs)
    masked_passes = metrics["masked_rows"] / len(mask) * (3 if args.masked_grad else 1)
    scoring_passes = (args.beta > 0) + masked_passes
    prompt_tokens = float(roll.media["attention_mask"].sum()) * roll.G
    completion_tokens = float(mask.sum())
    metrics["flops"] += flops.step_flops(
        policy, len(mask), prompt_tokens, completion_tokens, scoring_passes
    )
    return metrics


def samples(roll, total, reward_parts, n):
    """The first n completions of a step's rows: clip id, row, completion, total reward and every
    reward part, for samples.jsonl."""
    rows = []
    for i in range(min(n, len(roll.texts))):
        row = {"id": roll.records[i]["id"], "row": i, "completion": roll.texts[i]}
        row["reward"] = float(total[i])
        for key, value in reward_parts.items():
            if torch.is_tensor(value):
                row[key] = float(value[i])
        rows.append(row)
    return rows


def finish_step(metrics, seconds, lr, grad_norm, finite):
    """A step's metrics completed after its optimizer step: the learning rate it used, the
    gradient norm, whether it was skipped, throughput and, on a known GPU, MFU."""
    metrics["lr"] = lr
    metrics["grad_norm"] = grad_norm
    metrics["skipped"] = not finite
    metrics["time/step"] = seconds
    metrics["tokens_per_s"] = metrics["tokens"] / seconds
    metrics["flops_per_s"] = metrics.pop("flops") / seconds
    # a known GPU's dense bf16 peak
    if flops.peak():
        metrics["mfu"] = metrics["flops_per_s"] / flops.peak()
    return metrics


def progress(metrics):
    """The progress bar's figures of a step: its loss and, in OPPO, its mean reward."""
    shown = {"loss": f"{metrics['loss']:.3f}"}
    if "rewards/total" in metrics:
        shown["reward"] = f"{metrics['rewards/total']:.2f}"
    return shown
