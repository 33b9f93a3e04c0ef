"""Benchmark: what an OPPO step costs against plain GRPO, where its time goes, and the levers.

    python -m tools.bench                              # CPU: tiny thinker, B=4, G=8, 64 tokens
    python -m tools.bench --only step,levers --steps 7   # sections: step, levers, scaling, switches
    python -m tools.bench --only switches --init runs/oppo/sft/final --tokens 96   # real evidence
    python -m tools.bench --config 7b --B 1 --tokens 512 --frames 8 --size 756   # GPU: 7B shapes

It times the training code itself (train.oppo_step; rollout's generate and scoring) with the
harness of tools/harness.py: medians after a warm-up, configurations interleaved (A B C A B C
...), ratios taken pair by pair so that load drift hits all alike; counts from forward hooks are
exact (tools/measure.py). Rows run to the token cap (min_new_tokens): equal work. The levers
(tools/levers.py) and the numbers are discussed in docs/performance.md.
"""

import os
from dataclasses import dataclass, field
from functools import partial

import torch
from transformers import HfArgumentParser

from tools.harness import batch_for, setup, timed_step
from tools.levers import bench_levers
from tools.measure import interleave, med, paired, table
from tools.shapes import REAL


@dataclass
class Args:
    only: str = field(
        default="step,levers,scaling,switches",
        metadata={"help": "sections to run, comma-separated"},
    )
    config: str = field(default="", metadata={"help": "3b|7b: the real thinker's shapes, GPU only"})
    out: str = field(
        default="runs/bench",
        metadata={"help": "directory of the tiny thinker and the world, built when absent"},
    )
    init: str = field(
        default="",
        metadata={
            "help": "CPU: start from this thinker export (e.g. an SFT checkpoint, whose "
            "completions hold evidence) instead of the random tiny thinker in --out"
        },
    )
    embedder: str = field(
        default="",
        metadata={"help": "sentence-embedding model directory; empty: all-MiniLM-L6-v2"},
    )
    B: int = field(default=4, metadata={"help": "clips per step"})
    G: int = field(default=8, metadata={"help": "completions per clip"})
    beta: float = field(default=0.04, metadata={"help": "KL weight"})
    tokens: int = field(default=64, metadata={"help": "completion tokens a row"})
    frames: int = field(default=4, metadata={"help": "frames per clip"})
    size: int = field(
        default=56,
        metadata={"help": "frame side in px of a new world (756: ~360 tokens a frame, as Qwen's)"},
    )
    steps: int = field(default=5, metadata={"help": "timed steps per configuration"})
    reps: int = field(default=3, metadata={"help": "rounds per lever, scaling point"})
    lever_tokens: int = field(default=16, metadata={"help": "tokens in the generate levers"})
    warmup: int = field(default=1, metadata={"help": "untimed rounds first"})
    threads: int = field(
        default=1,
        metadata={"help": "CPU threads (a second thread stalls on a core another job holds)"},
    )
    scale_G: str = field(default="2,4,8", metadata={"help": "G of the scaling table"})
    scale_tokens: str = field(default="16,32,64", metadata={"help": "token caps"})
    scale_frames: str = field(default="4,8", metadata={"help": "frame counts of the scaling table"})


def ints(text):
    """The integers of a comma-separated list, e.g. --scale_G 2,4,8."""
    return [int(x) for x in text.split(",")]


# ---------------------------------------------------------------- the sections
# the configurations of the step section: config.Args fields replaced (or every_token)
STEP_CONFIGS = {
    "grpo": {"perception_reward": False, "perception_loss": False},
    "oppo": {},
    "oppo_beta0": {"beta": 0.0},
    # both masked passes on all N rows: the upper bound of their cost
    "oppo_every_token": {"every_token": True},
}
STEP_KEYS = (
    "step",
    "generate",
    "masked",
    "ref",
    "reward",
    "update",
    "optim",
    "peak_mb",
    "tok_per_s",
    "gflop_per_s",
    "update_mfu",
    "decode_GBps",
    "decode_bw",
    "C",
    "masked_rows",
)


def bench_step(ctx):
    """GRPO, OPPO, OPPO with beta = 0 and OPPO with every token routed, interleaved."""
    rounds = {name: partial(timed_step, ctx, **over) for name, over in STEP_CONFIGS.items()}
    runs = interleave(rounds, ctx.args.warmup, ctx.args.steps)
    table("Step phases, s", runs, STEP_KEYS)
    for name in ("oppo", "oppo_every_token"):
        step_ratio = paired(runs, "grpo", name, "step")
        scoring_ratio = med(runs[name], "scoring_over_update")
        masked_rows = med(runs[name], "masked_rows")
        print(
            f"  {name}: OPPO/GRPO step {step_ratio:.3f} (target <= 1.35); (ref + masked)/update"
            f" {scoring_ratio:.3f} (target <= 1), masked rows {masked_rows:g}"
        )
    beta_ratio = paired(runs, "oppo", "oppo_beta0", "step")
    padding = med(runs["oppo"], "padding")
    print(f"  beta = 0 / beta > 0 {beta_ratio:.3f}; padding {padding:.1%}")
    return runs


# the configurations of the switches section: OPPO with each faithfulness switch, beside GRPO
SWITCH_CONFIGS = {
    "grpo": {"perception_reward": False, "perception_loss": False},
    "oppo": {},
    "oppo_masked_grad": {"masked_grad": True},
    "oppo_masked_rollouts": {"masked_rollouts": 4},
    # a random thinker routes no evidence: form (a) and (b) of Eq. (10) with every token routed
    "oppo_every_token": {"every_token": True},
    "oppo_masked_grad_every_token": {"masked_grad": True, "every_token": True},
}
SWITCH_KEYS = ("step", "generate", "masked", "ref", "update", "mr", "peak_mb", "masked_rows")


def bench_switches(ctx):
    """GRPO, OPPO and OPPO with each switch (--masked_grad also with every token routed),
    interleaved; ratios to GRPO."""
    rounds = {name: partial(timed_step, ctx, **over) for name, over in SWITCH_CONFIGS.items()}
    runs = interleave(rounds, ctx.args.warmup, ctx.args.steps)
    table("Faithfulness switches, s", runs, SWITCH_KEYS)
    for name in SWITCH_CONFIGS:
        step_ratio = paired(runs, "grpo", name, "step")
        update_ratio = paired(runs, "grpo", name, "update")
        print(f"  {name}: step / GRPO's {step_ratio:.3f}, update / GRPO's {update_ratio:.3f}")
    return runs


def bench_scaling(ctx):
    """OPPO steps with one knob at a time moved from the default: G, the token cap, the frames."""
    args = ctx.args
    scale_G = ints(args.scale_G)
    scale_tokens = ints(args.scale_tokens)
    scale_frames = ints(args.scale_frames)
    batches = {frames: batch_for(ctx, frames) for frames in set(scale_frames) | {args.frames}}
    points = [(G, args.tokens, args.frames) for G in scale_G]
    points += [(args.G, tokens, args.frames) for tokens in scale_tokens]
    points += [(args.G, args.tokens, frames) for frames in scale_frames]
    rounds = {}
    # each point once, in order
    for G, tokens, frames in dict.fromkeys(points):
        batch, media = batches[frames]
        rounds[(G, tokens, frames)] = partial(
            timed_step, ctx, batch=batch, media=media, G=G, max_new_tokens=tokens
        )
    runs = interleave(rounds, 1, args.reps)
    keys = ("step", "generate", "masked", "ref", "update", "C")
    table("OPPO by (G, tokens, frames), s", runs, keys)
    return runs


def main(argv=None):
    parser = HfArgumentParser(Args, description=__doc__.split("\n")[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    cuda = torch.cuda.is_available()
    torch.set_num_threads(args.threads)
    # a random 3B/7B thinker is not run on a CPU
    if args.config not in ("", *REAL) or (args.config and not cuda):
        raise SystemExit(
            f"tools/bench.py --config {args.config}: 3b or 7b, on a CUDA GPU only "
            f"(GPUs here: {int(cuda)})"
        )
    sections = args.only.split(",")
    results = {}
    ctx = setup(args)
    device = torch.cuda.get_device_name() if cuda else "CPU"
    print(
        f"tools/bench.py: B={args.B} G={args.G} tokens={args.tokens} frames={args.frames} "
        f"beta={args.beta}; load {os.getloadavg()[0]:.1f}, "
        f"{torch.get_num_threads()}/{os.cpu_count()} threads; {device}"
    )
    if "step" in sections:
        results["step"] = bench_step(ctx)
    if "levers" in sections:
        results["levers"] = bench_levers(ctx)
        for name, runs in results["levers"].items():
            ratio = paired(runs, "A", "B")
            table(f"Lever {name}: A used, B not, B/A = {ratio:.2f}", runs, ("t", "peak_mb"))
    if "scaling" in sections:
        results["scaling"] = bench_scaling(ctx)
    if "switches" in sections:
        results["switches"] = bench_switches(ctx)
    return results


if __name__ == "__main__":
    main()
