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
import statistics
import subprocess
import sys
import time
from pathlib import Path

import eval as evaluation

VARIANTS = {  # name: (perception_reward, perception_loss)
    "GRPO": (False, False),
    "GRPO+OPR": (True, False),
    "GRPO+OPL": (False, True),
    "OPPO": (True, True),
}
COLUMNS = ["accuracy", "uar", "U_visual", "U_acoustic", "F_visual", "F_acoustic"]


def run(cmd, log):
    """Run one train.py stage; its output goes to `log`, and a failure names that log."""
    with open(log, "w") as f:
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"study: `{' '.join(cmd)}` failed; see {log}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/study", help="output directory")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated RL seeds")
    p.add_argument("--steps", type=int, default=None, help="RL steps per run (train.py's CPU default if unset)")
    p.add_argument("--sft_steps", type=int, default=None, help="SFT steps (train.py's CPU default if unset)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    p.add_argument("--eval_limit", type=int, default=200, help="test clips evaluated per run")
    p.add_argument("--train_args", default="", help="extra train.py arguments for every RL run, e.g. '--gamma 0.1'")
    a = p.parse_args(argv)
    out, t0 = Path(a.out), time.time()
    out.mkdir(parents=True, exist_ok=True)
    common = [sys.executable, "train.py", "--eval_limit", str(a.eval_limit)]
    sft = common + ["--stages", "sft", "--out", str(out / "sft"), "--resume"]
    if a.sft_steps is not None:
        sft += ["--sft_steps", str(a.sft_steps)]
    run(sft, out / "sft.log")  # resumable: a finished SFT stage is reused
    init = out / "sft" / "sft" / "final"
    reports = {"SFT": [json.loads((out / "sft" / "test_report.json").read_text())]}
    for name in a.variants.split(","):
        use_reward, use_loss = VARIANTS[name]
        for seed in a.seeds.split(","):
            run_dir = out / f"{name}_s{seed}"
            if not (run_dir / "test_report.json").exists():
                cmd = common + ["--stages", "oppo", "--init", str(init), "--out", str(run_dir), "--seed", seed,
                                "--perception_reward", str(use_reward), "--perception_loss", str(use_loss)]
                cmd += (["--steps", str(a.steps)] if a.steps is not None else []) + a.train_args.split()
                run(cmd, out / f"{name}_s{seed}.log")
            reports.setdefault(name, []).append(json.loads((run_dir / "test_report.json").read_text()))
    rows = {name: summarise(rs) for name, rs in reports.items()}
    table = markdown(rows, len(a.seeds.split(",")), time.time() - t0)
    (out / "study.json").write_text(json.dumps(rows, indent=1))
    (out / "table.md").write_text(table)
    evaluation.plot({n: {c: r[c][0] for c in COLUMNS} for n, r in rows.items()}, out / "study.png")
    print(table)


def summarise(reports):
    """Mean and (population) std over seeds of each column."""
    rows = {}
    for c in COLUMNS:
        xs = [evaluation.summary(r)[c] for r in reports]
        rows[c] = (statistics.fmean(xs), statistics.pstdev(xs) if len(xs) > 1 else 0.0)
    return rows


def markdown(rows, n_seeds, seconds):
    head = "| run | " + " | ".join(COLUMNS) + " |\n|---|" + "---|" * len(COLUMNS) + "\n"
    body = "".join(f"| {n} | " + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in (r[c] for c in COLUMNS)) + " |\n"
                   for n, r in rows.items())
    return head + body + f"\nmean ± std over {n_seeds} seed(s) (SFT: one run); wall time {seconds / 60:.1f} min\n"


if __name__ == "__main__":
    main()
