"""The CPU ablation study: does OPPO raise utilization and faithfulness over GRPO?

    python study.py                      # SFT once, then 4 RL variants x 3 seeds, then the table
    python study.py --steps 2 --seeds 0 --sft_steps 4 --out runs/study_toy   # a toy run

One SFT cold start on the synthetic train split, then from that one checkpoint four RL runs with
identical budgets (GRPO = accuracy + format; + Omni-Perception Reward; + Omni-Perception Loss;
full OPPO), each evaluated by eval.py on the synthetic test split with full, video-masked and
audio-masked inputs. Writes <out>/table.md (mean and std over seeds), <out>/study.json and
<out>/study.png. Every run is a train.py subprocess, so each is exactly what a user can rerun.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import eval as evaluation

VARIANTS = {  # name: (perception_reward, perception_loss)
    "GRPO": (False, False),
    "GRPO+OPR": (True, False),
    "GRPO+OPL": (False, True),
    "OPPO": (True, True),
}
COLUMNS = {
    "war": "accuracy",
    "uar": "UAR",
    "U_visual": "U^v",
    "U_acoustic": "U^a",
    "F_visual": "F^v",
    "F_acoustic": "F^a",
}  # eval.py's key: the table's name


def run(cmd, log, threads):
    """Run one train.py stage; its output goes to `log`, and a failure names that log."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log, "w") as f:
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode:
            raise SystemExit(f"study: `{' '.join(cmd)}` failed; see {log}")


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="runs/study", help="output directory")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated RL seeds")
    p.add_argument(
        "--steps", type=int, default=None, help="RL steps per run (train.py's CPU default if unset)"
    )
    p.add_argument(
        "--sft_steps", type=int, default=None, help="SFT steps (train.py's CPU default if unset)"
    )
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated subset of " + ", ".join(VARIANTS),
    )
    p.add_argument("--eval_limit", type=int, default=200, help="test clips evaluated per run")
    p.add_argument(
        "--train_args",
        default="",
        help="extra train.py arguments for every run, e.g. '--gamma 0.1'",
    )
    p.add_argument(
        "--jobs", type=int, default=2, help="RL runs at once, one thread each (2 cores: 2)"
    )
    a = p.parse_args(argv)
    out, t0 = Path(a.out), time.time()
    out.mkdir(parents=True, exist_ok=True)
    common = [
        sys.executable,
        str(Path(__file__).with_name("train.py")),
        "--eval_limit",
        str(a.eval_limit),
    ]
    common += a.train_args.split()
    sft = common + ["--stages", "sft", "--out", str(out / "sft"), "--resume"]
    if a.sft_steps is not None:
        sft += ["--sft_steps", str(a.sft_steps)]
    run(sft, out / "sft.log", threads=1)  # resumable: a finished SFT stage is reused
    init = out / "sft" / "sft" / "final"
    reports = {"SFT": [json.loads((out / "sft" / "test_report.json").read_text())]}
    jobs = []
    for name in a.variants.split(","):
        use_reward, use_loss = VARIANTS[name]
        for seed in a.seeds.split(","):
            run_dir = out / f"{name}_s{seed}"
            cmd = common + [
                "--stages",
                "oppo",
                "--init",
                str(init),
                "--out",
                str(run_dir),
                "--seed",
                seed,
                "--perception_reward",
                str(use_reward),
                "--perception_loss",
                str(use_loss),
            ]
            cmd += ["--steps", str(a.steps)] if a.steps is not None else []
            jobs.append((name, run_dir, cmd))
    todo = [
        (cmd, out / f"{d.name}.log", 1)
        for _, d, cmd in jobs
        if not (d / "test_report.json").exists()
    ]
    with ThreadPoolExecutor(a.jobs) as pool:  # each run is its own process; threads only wait
        list(pool.map(lambda job: run(*job), todo))
    for name, run_dir, _ in jobs:
        reports.setdefault(name, []).append(json.loads((run_dir / "test_report.json").read_text()))
    rows = {name: summarise(rs) for name, rs in reports.items()}
    table = markdown(rows, len(a.seeds.split(",")), time.time() - t0)
    (out / "study.json").write_text(json.dumps(rows, indent=1))
    (out / "table.md").write_text(table)
    plot(rows, out / "study.png")
    print(table)


def summarise(reports):
    """Mean and (population) std over seeds of each column."""
    rows = {}
    for c in COLUMNS:
        xs = [evaluation.summary(r)[c] for r in reports]
        rows[c] = (statistics.fmean(xs), statistics.pstdev(xs) if len(xs) > 1 else 0.0)
    return rows


def plot(rows, path):
    """Grouped bars, one group per metric, one bar per run, seed std as error bars."""
    from matplotlib.figure import Figure  # no pyplot: no GUI, no global state

    ax = Figure(figsize=(9, 4)).subplots()
    width = 0.8 / len(rows)
    for i, (name, r) in enumerate(rows.items()):
        ax.bar(
            [k + i * width for k in range(len(COLUMNS))],
            [r[c][0] for c in COLUMNS],
            width,
            yerr=[r[c][1] for c in COLUMNS],
            capsize=2,
            label=name,
        )
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(COLUMNS))], list(COLUMNS.values()))
    ax.set(ylim=(0, 1.05), title="synthetic test split: recognition, utilization U, faithfulness F")
    ax.legend(fontsize="small", ncol=len(rows))
    ax.figure.savefig(path, bbox_inches="tight", dpi=120)


def markdown(rows, n_seeds, seconds):
    head = "| run | " + " | ".join(COLUMNS.values()) + " |\n|---|" + "---|" * len(COLUMNS) + "\n"
    body = "".join(
        f"| {n} | " + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in (r[c] for c in COLUMNS)) + " |\n"
        for n, r in rows.items()
    )
    return (
        head
        + body
        + f"\nmean ± std over {n_seeds} seed(s) (SFT: one run); wall time {seconds / 60:.1f} min\n"
    )


if __name__ == "__main__":
    main()
