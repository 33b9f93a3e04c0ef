"""Preemption: SIGTERM (a scheduler's) and SIGINT (Ctrl-C) end a run at the end of a step, with a
checkpoint of that step on every rank, the output lock released and exit status 128 + signal
(143, 130), so that --resume continues as from any other checkpoint.

`handled()` installs the handlers for a run (train.main). Inside a stage's loop (`deferred`) a
signal only sets a flag, which `stop_if_asked` reads after each step on every rank at once: an
all-reduce of the flag, so that ranks signalled apart (or one rank alone) stop at the same step.
Outside the loop (loading, evaluating, exporting: no step to lose) and on a second signal, the
handler ends the run at once with the same status, through SystemExit, so the lock goes too.
torchrun passes a SIGTERM it receives to every rank and waits 30 s before killing them.
"""

import signal
import sys
from contextlib import contextmanager

import torch
import torch.distributed as dist

from runtime import checkpoint, logs

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _State:
    """The signal received during a step (0: none), and whether a step is running."""

    received = 0
    deferring = False


STATE = _State()


def _handle(signum, frame):
    if STATE.deferring and not STATE.received:
        STATE.received = signum
        print(
            f"train.py: {signal.Signals(signum).name}: stopping after this step with a "
            "checkpoint (send it again to stop at once, without one)",
            file=sys.stderr,
            flush=True,
        )
        return
    raise SystemExit(128 + signum)


@contextmanager
def handled():
    """SIGTERM and SIGINT handled as the module docstring says, through the block."""
    previous = {signum: signal.signal(signum, _handle) for signum in SIGNALS}
    STATE.received = 0
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        STATE.received = 0
        STATE.deferring = False


def deferred(steps):
    """The steps of a stage's loop, a signal deferred to the end of each (`stop_if_asked`). One
    that comes after the last check ends the run when the loop does: the last step has its
    checkpoint."""
    STATE.deferring = True
    try:
        yield from steps
    finally:
        STATE.deferring = False
    if STATE.received:
        raise SystemExit(128 + STATE.received)


def stop_if_asked(out, step, policy, optimizer):
    """After step `step` of the stage in `out`, on every rank: when any rank received a signal,
    checkpoint the step (unless it just was), log it in the run's log and exit 128 + signal."""
    flag = torch.tensor([STATE.received], dtype=torch.int64)
    # every rank stops at the same step: the highest signal number any rank received
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    signum = int(flag)
    if not signum:
        return
    ckpt = out / "ckpt"
    last = checkpoint.latest(ckpt)
    if last is None or last.name != f"step_{step:07d}":
        checkpoint.save(ckpt, step, policy, optimizer)
    master = dist.get_rank() == 0
    name = signal.Signals(signum).name
    # not "step": the run's log keeps only lines of step 0 (logs.log_event)
    event = {"event": "stopped", "stage": out.name, "after_step": step, "signal": name}
    logs.log_event(out.parent, event, master)
    if master:
        print(
            f"train.py: {name}: stopped after {out.name} step {step}, checkpoint in {ckpt}; "
            "--resume continues from it",
            file=sys.stderr,
            flush=True,
        )
    raise SystemExit(128 + signum)
