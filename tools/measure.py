"""How tools/bench.py measures: exact counts from forward hooks, a synchronised clock, peak memory,
and configurations interleaved round by round so that load drift hits them all alike.
"""

import os
import statistics
import time
from pathlib import Path

import torch


# ---------------------------------------------------------------- counts
def tally(counts, tag, **amounts):
    """Add `amounts` to counts[tag], or to counts["update"] under grad (the update's forward)."""
    key = "update" if torch.is_grad_enabled() else tag
    counts[key].update(amounts)


def video_clips(kwargs):
    return len(kwargs["grid_thw"])


def audio_clips(kwargs):
    return len(kwargs["feature_lens"])


def lm_tokens(kwargs):
    return kwargs["inputs_embeds"].shape[:2].numel()


def call_counter(counts, tag, part, unit, size):
    """A forward pre-hook that counts one call of `part` and size(its kwargs) of its `unit`."""

    def hook(module, args, kwargs):
        tally(counts, tag, **{f"{part}_calls": 1, f"{part}_{unit}": size(kwargs)})

    return hook


def head_row_counter(counts, tag):
    """A forward hook that counts the rows the LM head computes logits for."""

    def hook(module, args, output):
        tally(counts, tag, head_rows=output.shape[:-1].numel())

    return hook


def count_hooks(counts, **models):
    """Hooks counting, per tag (a keyword's name): tower calls and clips, LM forwards and tokens,
    LM-head rows. counts is a defaultdict(Counter); what runs under grad counts as "update"."""
    for tag, policy in models.items():
        parts = (
            ("vision", policy.model.visual, "clips", video_clips),
            ("audio", policy.model.audio_tower, "clips", audio_clips),
            ("lm", policy.model.language_model, "tokens", lm_tokens),
        )
        for part, module, unit, size in parts:
            hook = call_counter(counts, tag, part, unit, size)
            module.register_forward_pre_hook(hook, with_kwargs=True)
        policy.lm_head.register_forward_hook(head_row_counter(counts, tag))


# ---------------------------------------------------------------- clock, memory
def clock():
    """time.perf_counter once the GPU's queued work is done (GPU work is asynchronous)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def peak_mb():
    """Peak memory in MB since the last reset: CUDA allocated; on a CPU the resident set's."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def timed(counts, fn):
    """Seconds "t", peak memory "peak_mb" and the counts ("tag.count") of one call of fn()."""
    counts.clear()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        # Linux: the peak resident set (VmHWM) restarts from now
        Path("/proc/self/clear_refs").write_text("5")
    t0 = clock()
    fn()
    result = {"t": clock() - t0, "peak_mb": peak_mb()}
    for tag, counter in counts.items():
        for key, value in counter.items():
            result[f"{tag}.{key}"] = value
    return result


def timed_round(counts, fn, i):
    """timed(counts, fn) as one round of `interleave` (the round i changes nothing)."""
    return timed(counts, fn)


# ---------------------------------------------------------------- interleaved rounds
def interleave(fns, warmup, reps):
    """{name: fn(i)} round-robin, warmup + reps rounds; {name: [results after the warm-up]}."""
    out = {k: [] for k in fns}
    for i in range(warmup + reps):
        for k, fn in fns.items():
            out[k].append(fn(i))
    return {k: v[warmup:] for k, v in out.items()}


def med(rs, key):
    """The median of `key` over the rounds rs (0 where a round lacks it)."""
    return statistics.median(r.get(key, 0) for r in rs)


def paired(runs, a, b, key="t"):
    """The median over rounds of b/a, each pair measured side by side in one round."""
    return statistics.median(y[key] / x[key] for x, y in zip(runs[a], runs[b]))


def table(title, runs, keys):
    """Print the medians of `keys` per configuration, then each one's counts (equal every round)."""
    rounds = len(next(iter(runs.values())))
    load = os.getloadavg()[0]
    print(f"\n{title}: medians of {rounds} interleaved rounds, load {load:.1f}")
    print(f"{'':>16}" + "".join(f"{k:>12.11}" for k in keys))
    for name, rs in runs.items():
        print(f"{str(name):>16}" + "".join(f"{med(rs, k):>12.4g}" for k in keys))
    for name, rs in runs.items():
        counts = {k: v for k, v in rs[-1].items() if "." in k}
        print(f"  {name}:", counts)
