"""The CPU ablation study: does OPPO raise utilization and faithfulness over GRPO?

    python -m tools.study             # SFT once, then 4 RL variants x 3 seeds, then the table
    python -m tools.study --variants GRPO,GRPO+OPR,GRPO+OPL,OPPO   # the ablation of OPPO's parts
    python -m tools.study --steps 2 --seeds 0 --sft_steps 4 --out runs/study_toy   # a toy run

One SFT cold start on the synthetic train split, then from that one checkpoint one RL run per
variant and seed with identical budgets (by default GRPO = accuracy + format; full OPPO; OPPO
with the masked branch trained, --masked_grad; OPPO with masked rollouts, --masked_rollouts 4;
selectable: + Omni-Perception Reward, + Omni-Perception Loss), each evaluated by eval.py on the
synthetic test split with full, video-masked and audio-masked inputs. Writes <out>/table.md
(mean and std over seeds), <out>/study.json and <out>/study.png. Every run is a train.py
subprocess, so each is exactly what a user can rerun.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from metrics import report

TRAIN = Path(__file__).resolve().parents[1] / "train.py"
# each RL variant: the train.py switches that make it
VARIANTS = {
    "GRPO": {"perception_reward": False, "perception_loss": False},
    "GRPO+OPR": {"perception_reward": True, "perception_loss": False},
    "GRPO+OPL": {"perception_reward": False, "perception_loss": True},
    "OPPO": {"perception_reward": True, "perception_loss": True},
    "OPPO+MG": {"perception_reward": True, "perception_loss": True, "masked_grad": True},
    "OPPO+MR": {"perception_reward": True, "perception_loss": True, "masked_rollouts": 4},
}
# the variants a study runs unless --variants says otherwise
DEFAULT_VARIANTS = ("GRPO", "OPPO", "OPPO+MG", "OPPO+MR")
# each column of the table: eval.py's metric key -> the table's name
COLUMNS = {
    "war": "accuracy",
    "uar": "UAR",
    "U_visual": "U^v",
    "U_acoustic": "U^a",
    "F_visual": "F^v",
    "F_acoustic": "F^a",
}


@dataclass
class Args:
    out: str = field(default="runs/study", metadata={"help": "output directory"})
    seeds: str = field(default="0,1,2", metadata={"help": "comma-separated RL seeds"})
    steps: int | None = field(
        default=None, metadata={"help": "RL steps per run (train.py's CPU default if unset)"}
    )
    sft_steps: int | None = field(
        default=None, metadata={"help": "SFT steps (train.py's CPU default if unset)"}
    )
    variants: str = field(
        default=",".join(DEFAULT_VARIANTS),
        metadata={"help": "comma-separated subset of " + ", ".join(VARIANTS)},
    )
    eval_limit: int = field(default=200, metadata={"help": "test clips evaluated per run"})
    train_args: str = field(
        default="", metadata={"help": "extra train.py arguments for every run, e.g. '--gamma 0.1'"}
    )
    jobs: int = field(default=2, metadata={"help": "RL runs at once, one thread each"})


def run(cmd, log, threads):
    """Run one train.py stage; its output goes to `log`, and a failure names that log."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log, "w") as f:
        finished = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if finished.returncode:
        raise SystemExit(f"study: `{' '.join(cmd)}` failed; see {log}")


def rl_command(common, variant, seed, init, run_dir, steps):
    """The train.py command of one RL run: `variant`'s switches from the SFT checkpoint `init`."""
    cmd = common + ["--stages", "oppo", "--init", str(init), "--out", str(run_dir), "--seed", seed]
    for switch, on in VARIANTS[variant].items():
        cmd += [f"--{switch}", str(on)]
    if steps is not None:
        cmd += ["--steps", str(steps)]
    return cmd


def main(argv=None):
    parser = HfArgumentParser(Args, description=__doc__.split("\n")[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    unknown = [variant for variant in args.variants.split(",") if variant not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    out = Path(args.out)
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    common = [sys.executable, str(TRAIN), "--eval_limit", str(args.eval_limit)]
    common += args.train_args.split()

    sft = common + ["--stages", "sft", "--out", str(out / "sft"), "--resume"]
    if args.sft_steps is not None:
        sft += ["--sft_steps", str(args.sft_steps)]
    # resumable: a finished SFT stage is reused
    run(sft, out / "sft.log", threads=1)
    init = out / "sft" / "sft" / "final"
    reports = {"SFT": [json.loads((out / "sft" / "test_report.json").read_text())]}

    seeds = args.seeds.split(",")
    runs = []
    for variant in args.variants.split(","):
        for seed in seeds:
            run_dir = out / f"{variant}_s{seed}"
            cmd = rl_command(common, variant, seed, init, run_dir, args.steps)
            runs.append((variant, run_dir, cmd))
    # a run that has its test report is done: only the others run (again)
    todo = [
        (cmd, run_dir) for _, run_dir, cmd in runs if not (run_dir / "test_report.json").exists()
    ]
    cmds = [cmd for cmd, _ in todo]
    logs = [out / f"{run_dir.name}.log" for _, run_dir in todo]
    # each run is its own process on one thread; the pool's threads only wait for them
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(run, cmds, logs, [1] * len(todo)))
    for variant, run_dir, _ in runs:
        test_report = json.loads((run_dir / "test_report.json").read_text())
        reports.setdefault(variant, []).append(test_report)

    rows = {name: summarise(rs) for name, rs in reports.items()}
    table = markdown(rows, len(seeds), time.time() - t0)
    (out / "study.json").write_text(json.dumps(rows, indent=1))
    (out / "table.md").write_text(table)
    plot(rows, out / "study.png")
    print(table)


def summarise(reports):
    """Mean and (population) std over seeds of each column: {column: (mean, std)}."""
    row = {}
    for column in COLUMNS:
        xs = [report.summary(r)[column] for r in reports]
        std = statistics.pstdev(xs) if len(xs) > 1 else 0.0
        row[column] = (statistics.fmean(xs), std)
    return row


def plot(rows, path):
    """Grouped bars, one group per metric, one bar per run, seed std as error bars."""
    # no pyplot: no GUI, no global state
    from matplotlib.figure import Figure

    ax = Figure(figsize=(9, 4)).subplots()
    width = 0.8 / len(rows)
    for i, (name, row) in enumerate(rows.items()):
        ax.bar(
            [k + i * width for k in range(len(COLUMNS))],
            [row[c][0] for c in COLUMNS],
            width,
            yerr=[row[c][1] for c in COLUMNS],
            capsize=2,
            label=name,
        )
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(COLUMNS))], list(COLUMNS.values()))
    ax.set(ylim=(0, 1.05), title="synthetic test split: recognition, utilization U, faithfulness F")
    ax.legend(fontsize="small", ncol=len(rows))
    ax.figure.savefig(path, bbox_inches="tight", dpi=120)


def markdown(rows, n_seeds, seconds):
    """The table: one line per run, "mean ± std" per column, then the seeds and the wall time."""
    lines = [
        "| run | " + " | ".join(COLUMNS.values()) + " |\n",
        "|---|" + "---|" * len(COLUMNS) + "\n",
    ]
    for name, row in rows.items():
        cells = [f"{row[c][0]:.3f} ± {row[c][1]:.3f}" for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |\n")
    minutes = seconds / 60
    # runs finished by an earlier invocation are reused, not timed again
    footer = (
        f"mean ± std over {n_seeds} seed(s) (SFT: one run); "
        f"wall time of this invocation {minutes:.1f} min"
    )
    lines.append(f"\n{footer}\n")
    return "".join(lines)


if __name__ == "__main__":
    main()
